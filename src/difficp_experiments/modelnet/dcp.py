"""Deep Closest Point (Wang & Solomon, ICCV 2019): DGCNN embedding, optional transformer, SVD head.

DCP-v1 = DGCNN + identity pointer + SVD head; DCP-v2 adds the transformer "pointer" that lets each
cloud's embedding attend to the other's (:class:`Transformer`, the paper's sizes and the official
code's layout: width 512, 4 heads, feed-forward 1024, one encoder and one decoder layer, pre-norm
residuals, no dropout; about 5.26 M parameters on top of DCP-v1's 0.31 M). Module and parameter names follow the official
checkpoint (``emb_nn.conv1..conv5``, ``emb_nn.bn1..bn5``, ``head.reflect``), so
``DCP(pointer="identity").load_state_dict(torch.load("dcp_v1.t7"), strict=True)`` works.

Conventions here (the library's): clouds are ``(B, N, 3)`` row vectors; the returned ``(R, t)``
maps the source into the target, ``target ~ source @ R.T + t``. Internally the networks work on
channels-first ``(B, C, N)`` tensors, as the checkpoint's 1x1 convolutions expect.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import difficp
from difficp._atomic import load_checkpoint
from difficp.geometry import make_transform


def knn_indices(x: Tensor, k: int) -> Tensor:
    """Indices ``(B, N, k)`` of the ``k`` nearest points (self included) of ``x`` ``(B, C, N)``."""
    sq = (x * x).sum(dim=1)  # (B, N)
    neg_dist = 2 * x.transpose(1, 2) @ x - sq[:, :, None] - sq[:, None, :]
    return neg_dist.topk(k=k, dim=-1).indices


def graph_features(x: Tensor, k: int) -> Tensor:
    """Edge features ``(B, 2C, N, k)``: each neighbour's coordinates stacked over the centre's.

    DCP's DGCNN concatenates ``(x_j, x_i)`` (not DGCNN's ``(x_j - x_i, x_i)``); the official
    weights were trained with this order, so it has to be kept.
    """
    B, C, N = x.shape
    idx = knn_indices(x, k)  # (B, N, k)
    pts = x.transpose(1, 2)  # (B, N, C)
    neighbours = pts[torch.arange(B, device=x.device)[:, None, None], idx]  # (B, N, k, C)
    centre = pts[:, :, None, :].expand(B, N, k, C)
    return torch.cat([neighbours, centre], dim=-1).permute(0, 3, 1, 2).contiguous()


class DGCNN(nn.Module):
    """DCP's DGCNN: one k-NN graph on the input coordinates, then five 1x1 convolutions.

    Layers 1-4 (6->64->64->128->256) act on edge features and are each max-pooled over the ``k``
    neighbours; the four pooled maps are concatenated (512 channels) and mapped to ``emb_dims``.
    Input ``(B, 3, N)``, output ``(B, emb_dims, N)``.
    """

    def __init__(self, emb_dims: int = 512, k: int = 20) -> None:
        super().__init__()
        self.k = k
        widths = [(6, 64), (64, 64), (64, 128), (128, 256)]
        for i, (c_in, c_out) in enumerate(widths, start=1):
            setattr(self, f"conv{i}", nn.Conv2d(c_in, c_out, kernel_size=1, bias=False))
            setattr(self, f"bn{i}", nn.BatchNorm2d(c_out))
        self.conv5 = nn.Conv2d(512, emb_dims, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(emb_dims)

    def forward(self, x: Tensor) -> Tensor:
        B, _, N = x.shape
        h = graph_features(x, self.k)
        pooled = []
        for i in range(1, 5):
            h = F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(h)))
            pooled.append(h.max(dim=-1, keepdim=True).values)
        h = torch.cat(pooled, dim=1)  # (B, 512, N, 1)
        return F.relu(self.bn5(self.conv5(h))).view(B, -1, N)


class DCPLayerNorm(nn.Module):
    """DCP's layer norm: ``a_2 * (x - mean) / (std + eps) + b_2`` over the last dimension.

    Not :class:`torch.nn.LayerNorm`: the official code divides by the *unbiased* standard
    deviation plus ``eps`` (not by ``sqrt(var + eps)``), and names its gain/bias ``a_2``/``b_2``.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.a_2 = nn.Parameter(torch.ones(dim))
        self.b_2 = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        std = x.std(dim=-1, keepdim=True)
        return self.a_2 * (x - mean) / (std + self.eps) + self.b_2


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention, ``linears`` = (query, key, value, output).

    Inputs ``(B, L, C)`` / ``(B, S, C)``; output ``(B, L, C)``. No dropout (the official model
    builds none: its ``--dropout`` option is never wired into the attention).
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"embedding width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.linears = nn.ModuleList([nn.Linear(dim, dim) for _ in range(4)])

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        B, L, C = query.shape
        q, k, v = (
            lin(x).view(B, -1, self.heads, C // self.heads).transpose(1, 2)
            for lin, x in zip(self.linears, (query, key, value), strict=False)
        )
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d_head)) v
        return self.linears[3](out.transpose(1, 2).reshape(B, L, C))


class FeedForward(nn.Module):
    """Position-wise ``w_2(relu(w_1(x)))``, ``(B, L, C) -> (B, L, C)``."""

    def __init__(self, dim: int, ff_dims: int) -> None:
        super().__init__()
        self.w_1 = nn.Linear(dim, ff_dims)
        self.w_2 = nn.Linear(ff_dims, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_2(F.relu(self.w_1(x)))


class Sublayer(nn.Module):
    """Pre-norm residual connection ``x + f(norm(x))`` (the official layout; no dropout)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = DCPLayerNorm(dim)

    def forward(self, x: Tensor, f: Callable[[Tensor], Tensor]) -> Tensor:
        return x + f(self.norm(x))


class EncoderLayer(nn.Module):
    """Self-attention then feed-forward, each in a :class:`Sublayer`."""

    def __init__(self, dim: int, heads: int, ff_dims: int) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(dim, heads)
        self.feed_forward = FeedForward(dim, ff_dims)
        self.sublayer = nn.ModuleList([Sublayer(dim) for _ in range(2)])

    def forward(self, x: Tensor) -> Tensor:
        x = self.sublayer[0](x, lambda h: self.self_attn(h, h, h))
        return self.sublayer[1](x, self.feed_forward)


class DecoderLayer(nn.Module):
    """Self-attention, attention to the encoder's memory, feed-forward (three sublayers)."""

    def __init__(self, dim: int, heads: int, ff_dims: int) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(dim, heads)
        self.src_attn = MultiHeadAttention(dim, heads)
        self.feed_forward = FeedForward(dim, ff_dims)
        self.sublayer = nn.ModuleList([Sublayer(dim) for _ in range(3)])

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        x = self.sublayer[0](x, lambda h: self.self_attn(h, h, h))
        x = self.sublayer[1](x, lambda h: self.src_attn(h, memory, memory))
        return self.sublayer[2](x, self.feed_forward)


class _Stack(nn.Module):
    """``layers`` then a final :class:`DCPLayerNorm` (``norm``)."""

    def __init__(self, layers: list[nn.Module], dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = DCPLayerNorm(dim)


class _EncoderDecoder(nn.Module):
    def __init__(self, dim: int, n_blocks: int, heads: int, ff_dims: int) -> None:
        super().__init__()
        self.encoder = _Stack([EncoderLayer(dim, heads, ff_dims) for _ in range(n_blocks)], dim)
        self.decoder = _Stack([DecoderLayer(dim, heads, ff_dims) for _ in range(n_blocks)], dim)

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        """Encode ``src`` ``(B, N, C)``, decode ``tgt`` ``(B, M, C)`` against it -> ``(B, M, C)``."""
        memory = src
        for layer in self.encoder.layers:
            memory = layer(memory)
        memory = self.encoder.norm(memory)
        x = tgt
        for layer in self.decoder.layers:
            x = layer(x, memory)
        return self.decoder.norm(x)


class Transformer(nn.Module):
    """DCP-v2's attention "pointer", as in the paper and the official code.

    One encoder-decoder (``n_blocks`` encoder and decoder layers, width ``emb_dims``, ``n_heads``
    heads, feed-forward ``ff_dims``; DCP: 512, 1, 4, 1024), shared by both directions:
    ``tgt_p = decode(tgt | encode(src))`` and ``src_p = decode(src | encode(tgt))``. Pre-norm
    residual sublayers, a final layer norm on each stack, no dropout, no positional encoding.
    :class:`DCP` adds the outputs to the embeddings (``src_emb + src_p``).

    Parameter names follow the official module tree (``model.encoder.layers.0.self_attn.
    linears.0.weight``, ``...sublayer.0.norm.a_2``, ``model.decoder.norm.b_2``, ...), so a state
    dict saved by the official code should load strictly (not tested: its DCP-v2 weights are not
    available here).

    ``forward(src_emb (B, C, N), tgt_emb (B, C, M))`` -> ``(src_p (B, C, N), tgt_p (B, C, M))``.
    """

    def __init__(
        self, emb_dims: int = 512, n_blocks: int = 1, n_heads: int = 4, ff_dims: int = 1024
    ) -> None:
        super().__init__()
        self.model = _EncoderDecoder(emb_dims, n_blocks, n_heads, ff_dims)

    def forward(self, src_emb: Tensor, tgt_emb: Tensor) -> tuple[Tensor, Tensor]:
        src, tgt = src_emb.transpose(1, 2), tgt_emb.transpose(1, 2)
        tgt_p = self.model(src, tgt)
        src_p = self.model(tgt, src)
        return src_p.transpose(1, 2), tgt_p.transpose(1, 2)


class _Block(nn.Module):
    """Pre-norm residual block of :class:`CompactTransformer` (legacy)."""

    def __init__(self, dim: int, heads: int, ff_dims: int, cross: bool) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_cross = nn.LayerNorm(dim) if cross else None
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True) if cross else None
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_dims), nn.ReLU(), nn.Linear(ff_dims, dim))

    def forward(self, x: Tensor, memory: Tensor | None = None) -> Tensor:
        h = self.norm_self(x)
        x = x + self.self_attn(h, h, h, need_weights=False)[0]
        if self.cross_attn is not None and self.norm_cross is not None and memory is not None:
            h = self.norm_cross(x)
            x = x + self.cross_attn(h, memory, memory, need_weights=False)[0]
        return x + self.ff(self.norm_ff(x))


class CompactTransformer(nn.Module):
    """Legacy, *not* DCP's: the narrow pointer of the first CPU "DCP-v2" (kept so that its
    checkpoints, whose config has ``model_dims``, still load).

    Attention at width ``model_dims`` between linear projections in and out, torch's layer norm,
    and a zero-initialised output projection (a fresh one adds nothing to the embeddings).
    Same call signature as :class:`Transformer`. Built only by :class:`DCP`, which passes every
    size (the legacy checkpoints' own sizes are filled in by :func:`load_dcp_checkpoint`).
    """

    def __init__(
        self, emb_dims: int, n_blocks: int, n_heads: int, ff_dims: int, model_dims: int
    ) -> None:
        super().__init__()
        self.proj_in = nn.Linear(emb_dims, model_dims)
        self.encoder = nn.ModuleList(
            [_Block(model_dims, n_heads, ff_dims, cross=False) for _ in range(n_blocks)]
        )
        self.encoder_norm = nn.LayerNorm(model_dims)
        self.decoder = nn.ModuleList(
            [_Block(model_dims, n_heads, ff_dims, cross=True) for _ in range(n_blocks)]
        )
        self.decoder_norm = nn.LayerNorm(model_dims)
        self.proj_out = nn.Linear(model_dims, emb_dims)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def _run(self, memory_in: Tensor, query: Tensor) -> Tensor:
        memory = memory_in
        for block in self.encoder:
            memory = block(memory)
        memory = self.encoder_norm(memory)
        x = query
        for block in self.decoder:
            x = block(x, memory)
        return self.proj_out(self.decoder_norm(x))

    def forward(self, src_emb: Tensor, tgt_emb: Tensor) -> tuple[Tensor, Tensor]:
        s = self.proj_in(src_emb.transpose(1, 2))  # (B, N, model_dims)
        t = self.proj_in(tgt_emb.transpose(1, 2))
        tgt_p = self._run(s, t)
        src_p = self._run(t, s)
        return src_p.transpose(1, 2), tgt_p.transpose(1, 2)


class SVDHead(nn.Module):
    """Soft pointer + weighted Procrustes: ``R, t`` from embeddings ``(B, C, N)``, ``(B, C, M)``.

    Each source point's partner is the softmax(<e_i, f_j> / sqrt(C))-weighted mean of the target
    points; the rotation is the SVD solution of the centred cross-covariance, with the last
    singular vector flipped (``reflect`` = diag(1, 1, -1)) when it would otherwise be a reflection.
    """

    def __init__(self) -> None:
        super().__init__()
        reflect = torch.eye(3)
        reflect[2, 2] = -1
        # A frozen parameter (not a buffer) because the official checkpoint stores it that way.
        self.reflect = nn.Parameter(reflect, requires_grad=False)

    def forward(
        self, src_emb: Tensor, tgt_emb: Tensor, src: Tensor, tgt: Tensor
    ) -> tuple[Tensor, Tensor]:
        """src ``(B, N, 3)``, tgt ``(B, M, 3)`` -> ``R`` ``(B, 3, 3)``, ``t`` ``(B, 3)``."""
        scale = math.sqrt(src_emb.shape[1])
        scores = torch.softmax(src_emb.transpose(1, 2) @ tgt_emb / scale, dim=-1)  # (B, N, M)
        partner = scores @ tgt  # (B, N, 3)
        return procrustes(src, partner, self.reflect)


def procrustes(src: Tensor, dst: Tensor, reflect: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Least-squares rigid ``(R, t)``, ``dst ~ src @ R.T + t``, for matched ``(B, N, 3)`` clouds."""
    mu_s, mu_d = src.mean(dim=1, keepdim=True), dst.mean(dim=1, keepdim=True)
    H = (src - mu_s).transpose(1, 2) @ (dst - mu_d)  # (B, 3, 3) = sum_i x_i y_i^T
    U, _, Vh = torch.linalg.svd(H)
    V = Vh.transpose(1, 2)
    R = V @ U.transpose(1, 2)
    if reflect is None:
        reflect = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=src.dtype, device=src.device))
    flip = (torch.linalg.det(R) < 0)[:, None, None]
    R = torch.where(flip, V @ reflect.to(src.dtype) @ U.transpose(1, 2), R)
    t = mu_d[:, 0] - (R @ mu_s[:, 0, :, None])[..., 0]
    return R, t


POINTERS = ("identity", "transformer", "compact_transformer")


class DCP(nn.Module):
    """Deep Closest Point. ``pointer="identity"`` is DCP-v1, ``"transformer"`` DCP-v2.

    ``"compact_transformer"`` is the legacy narrow pointer (:class:`CompactTransformer`; only
    ``model_dims`` applies to it). ``forward(source (B, N, 3), target (B, M, 3))`` returns
    ``(R (B, 3, 3), t (B, 3))`` with ``target ~ source @ R.T + t``.
    """

    def __init__(
        self,
        emb_dims: int = 512,
        k: int = 20,
        pointer: str = "identity",
        n_blocks: int = 1,
        n_heads: int = 4,
        ff_dims: int = 1024,
        model_dims: int = 128,
    ) -> None:
        super().__init__()
        if pointer not in POINTERS:
            raise ValueError(f"pointer must be one of {POINTERS}, got {pointer!r}")
        self.emb_nn = DGCNN(emb_dims=emb_dims, k=k)
        self.pointer: nn.Module | None = None
        if pointer == "transformer":
            self.pointer = Transformer(emb_dims, n_blocks, n_heads, ff_dims)
        elif pointer == "compact_transformer":
            self.pointer = CompactTransformer(emb_dims, n_blocks, n_heads, ff_dims, model_dims)
        self.head = SVDHead()

    def embed(self, source: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Per-point embeddings ``(B, C, N)`` and ``(B, C, M)`` (after the pointer, if any)."""
        src_emb = self.emb_nn(source.transpose(1, 2))
        tgt_emb = self.emb_nn(target.transpose(1, 2))
        if self.pointer is not None:
            src_p, tgt_p = self.pointer(src_emb, tgt_emb)
            src_emb, tgt_emb = src_emb + src_p, tgt_emb + tgt_p
        return src_emb, tgt_emb

    def forward(self, source: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        src_emb, tgt_emb = self.embed(source, target)
        return self.head(src_emb, tgt_emb, source, target)

    def forward_both(self, source: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(R_ab, t_ab, R_ba, t_ba)``: source->target and, from the same embeddings, the SVD
        head run the other way (target->source), for DCP's cycle-consistency loss."""
        src_emb, tgt_emb = self.embed(source, target)
        R_ab, t_ab = self.head(src_emb, tgt_emb, source, target)
        R_ba, t_ba = self.head(tgt_emb, src_emb, target, source)
        return R_ab, t_ab, R_ba, t_ba


def dcp_loss(R: Tensor, t: Tensor, R_gt: Tensor, t_gt: Tensor) -> Tensor:
    """DCP's training loss: ``mse(R^T R_gt, I) + mse(t, t_gt)``.

    As in the official code, each term is a *mean* over its elements (9 and 3 per pair) and the
    batch, i.e. ``|R^T R_gt - I|_F^2 / 9 + |t - t_gt|^2 / 3`` averaged over pairs.
    """
    eye = torch.eye(3, dtype=R.dtype, device=R.device).expand_as(R)
    return F.mse_loss(R.transpose(1, 2) @ R_gt, eye) + F.mse_loss(t, t_gt)


def cycle_loss(R_ab: Tensor, t_ab: Tensor, R_ba: Tensor, t_ba: Tensor) -> Tensor:
    """DCP's cycle-consistency term: ``mse(R_ba R_ab, I) + mean(|R_ba^T t_ab + t_ba|^2)``.

    Written as the official code has it (the translation term uses ``R_ba^T``, where the exact
    inverse would need ``R_ba t_ab``; at the fixed point ``R_ba = R_ab^T`` they differ). DCP adds
    it with weight 0.1 when ``--cycle`` is on; it is off in the published runs (the default).
    """
    eye = torch.eye(3, dtype=R_ab.dtype, device=R_ab.device).expand_as(R_ab)
    rot = F.mse_loss(R_ba @ R_ab, eye)
    trans = ((R_ba.transpose(1, 2) @ t_ab[..., None])[..., 0] + t_ba).pow(2).mean()
    return rot + trans


def load_dcp_v1(path: str | os.PathLike) -> DCP:
    """DCP-v1 (DGCNN, emb_dims 512, k 20, identity pointer, SVD head) from the official weights."""
    model = DCP(pointer="identity")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


class RefinedDCP(nn.Module):
    """DCP followed by a fixed number of differentiable difficp ICP iterations.

    ``forward(source (B,N,3), target (B,M,3))`` -> refined ``(R (B,3,3), t (B,3))``. Soft
    correspondences (softmax over ``-|p - q|^2 / temperature``) keep every step differentiable, so
    a loss on the refined pose trains the network *through* ICP.
    """

    def __init__(self, dcp: DCP, iterations: int = 3, temperature: float = 1e-3) -> None:
        super().__init__()
        self.dcp = dcp
        self.iterations = iterations
        self.temperature = temperature

    def icp_config(self) -> difficp.ICPConfig:
        return difficp.ICPConfig(
            metric="point_to_point",
            solver="svd",
            correspondence="soft",
            temperature=self.temperature,
            max_iterations=self.iterations,
            relative_fitness=0.0,
            relative_rmse=0.0,
            differentiation="unroll",
        )

    def forward(self, source: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        R, t = self.dcp(source, target)
        res = difficp.icp(source, target, init=make_transform(R, t), config=self.icp_config())
        return res.transform[:, :3, :3], res.transform[:, :3, 3]


def load_dcp_checkpoint(path: str | os.PathLike) -> nn.Module:
    """A model saved by :mod:`difficp_experiments.modelnet.train_dcp`: a :class:`DCP`, or a
    :class:`RefinedDCP` when the checkpoint's config has an ``"icp"`` entry (end-to-end model).

    Accepts the model files (``{"config", "model", ...}``) and the resumable state files
    (which also hold the optimiser). Checkpoints of the legacy narrow transformer (recognised by its
    ``pointer.proj_in`` weights) load as ``pointer="compact_transformer"``.
    """
    ckpt = load_checkpoint(path, fallback=False)
    config = dict(ckpt["config"])
    icp = config.pop("icp", None)
    if "pointer.proj_in.weight" in ckpt["model"]:  # legacy narrow transformer, old defaults
        config = {"ff_dims": 256, "model_dims": 128, **config, "pointer": "compact_transformer"}
    model = DCP(**config)
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    model.load_state_dict(state, strict=True)
    if icp is not None:
        return RefinedDCP(model, **icp).eval()
    return model.eval()
