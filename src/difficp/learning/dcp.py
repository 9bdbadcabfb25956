"""Deep Closest Point (Wang & Solomon, ICCV 2019): DGCNN embedding, optional transformer, SVD head.

DCP-v1 = DGCNN + identity pointer + SVD head; DCP-v2 adds the transformer "pointer" that lets each
cloud's embedding attend to the other's. Module and parameter names follow the official
checkpoint (``emb_nn.conv1..conv5``, ``emb_nn.bn1..bn5``, ``head.reflect``), so
``DCP(pointer="identity").load_state_dict(torch.load("dcp_v1.t7"), strict=True)`` works.

Conventions here (the library's): clouds are ``(B, N, 3)`` row vectors; the returned ``(R, t)``
maps the source into the target, ``target ~ source @ R.T + t``. Internally the networks work on
channels-first ``(B, C, N)`` tensors, as the checkpoint's 1x1 convolutions expect.
"""

from __future__ import annotations

import math
import os

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


class _Block(nn.Module):
    """Pre-norm residual block: self-attention, optional cross-attention, feed-forward."""

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


class Transformer(nn.Module):
    """DCP-v2's attention "pointer": an encoder-decoder shared by both directions.

    ``forward(src_emb, tgt_emb)`` with ``(B, C, N)`` / ``(B, C, M)`` embeddings returns the
    residuals ``(src_p, tgt_p)`` of the same shapes: ``tgt_p`` decodes the target with the
    encoded source as memory, ``src_p`` the other way round.

    Departure from the paper, for a CPU budget: attention runs at width ``model_dims`` (default
    128, the paper uses the full 512) between a linear projection in and out; with ``model_dims ==
    emb_dims`` and ``ff_dims=1024`` it is the paper's size (about 16x the compute). The output
    projection starts at zero, so a fresh transformer adds nothing: DCP-v2 then starts exactly as
    the DCP-v1 it is built on.
    """

    def __init__(
        self,
        emb_dims: int = 512,
        n_blocks: int = 1,
        n_heads: int = 4,
        ff_dims: int = 256,
        model_dims: int = 128,
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


class DCP(nn.Module):
    """Deep Closest Point. ``pointer="identity"`` is DCP-v1, ``"transformer"`` DCP-v2.

    ``forward(source (B, N, 3), target (B, M, 3))`` returns ``(R (B, 3, 3), t (B, 3))`` with
    ``target ~ source @ R.T + t``.
    """

    def __init__(
        self,
        emb_dims: int = 512,
        k: int = 20,
        pointer: str = "identity",
        n_blocks: int = 1,
        n_heads: int = 4,
        ff_dims: int = 256,
        model_dims: int = 128,
    ) -> None:
        super().__init__()
        if pointer not in ("identity", "transformer"):
            raise ValueError(f"pointer must be 'identity' or 'transformer', got {pointer!r}")
        self.emb_nn = DGCNN(emb_dims=emb_dims, k=k)
        self.pointer = (
            Transformer(emb_dims, n_blocks, n_heads, ff_dims, model_dims)
            if pointer == "transformer"
            else None
        )
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


def dcp_loss(R: Tensor, t: Tensor, R_gt: Tensor, t_gt: Tensor) -> Tensor:
    """DCP's training loss ``|R^T R_gt - I|_F^2 + |t - t_gt|^2`` averaged over the batch."""
    eye = torch.eye(3, dtype=R.dtype, device=R.device)
    rot = ((R.transpose(1, 2) @ R_gt - eye) ** 2).sum(dim=(1, 2))
    return (rot + ((t - t_gt) ** 2).sum(dim=1)).mean()


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
    """A model saved by :mod:`difficp.learning.train_dcp`: a :class:`DCP`, or a
    :class:`RefinedDCP` when the checkpoint's config has an ``"icp"`` entry (end-to-end model)."""
    ckpt = load_checkpoint(path, fallback=False)
    config = dict(ckpt["config"])
    icp = config.pop("icp", None)
    model = DCP(**config)
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    model.load_state_dict(state, strict=True)
    if icp is not None:
        return RefinedDCP(model, **icp).eval()
    return model.eval()
