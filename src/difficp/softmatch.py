"""Dense soft correspondences in bounded memory.

The dense soft partner of a source point ``p_i`` is ``sum_j W_ij q_j`` with
``W_i = softmax_j(-|p_i - q_j|^2 / T)`` over *all* targets. Plain autograd would keep every
``N x M`` weight matrix for the backward (100k x 100k points = 40 GB). Here a custom autograd
function works through the source points in chunks, keeps only the inputs, and recomputes each
chunk's weights in the backward, so peak memory is ``O(chunk * M)`` whatever N is.

Gradients (with ``g`` the incoming gradient of a partner and ``o_i`` the partner itself):
``dL/dlogit_ij = W_ij ((v_j - o_i) . g_i)`` and ``logit_ij = -|p_i - q_j|^2 / T`` give the
source, target and temperature terms; the normals' term is ``W^T g``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

# Elements of one (chunk x M) weight block; 2^22 float32 = 16 MB per temporary.
DEFAULT_BLOCK = 1 << 22


def _chunk_size(batch: int, targets: int, block: int) -> int:
    return max(1, block // max(1, batch * targets))


def _weights(
    p: Tensor, q: Tensor, q_sq: Tensor, mask: Tensor, temperature: Tensor
) -> tuple[Tensor, Tensor]:
    """Softmax weights ``(B, c, M)`` of source chunk ``p`` ``(B, c, 3)`` and the squared distances."""
    d2 = ((p * p).sum(-1, keepdim=True) - 2 * p @ q.transpose(1, 2) + q_sq[:, None, :]).clamp_min(0)
    logits = torch.where(mask[:, None, :], -d2 / temperature, torch.full_like(d2, -math.inf))
    return torch.softmax(logits, dim=-1), d2


class _DenseSoftMatch(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        source: Tensor,
        target: Tensor,
        normals: Tensor,
        temperature: Tensor,
        mask: Tensor,
        block: int,
    ) -> tuple[Tensor, Tensor]:
        B, N, _ = source.shape
        M = target.shape[1]
        chunk = _chunk_size(B, M, block)
        q_sq = (target * target).sum(-1)
        values = torch.cat([target, normals], dim=-1)
        out = torch.empty(B, N, values.shape[-1], dtype=source.dtype, device=source.device)
        for s in range(0, N, chunk):
            W, _ = _weights(source[:, s : s + chunk], target, q_sq, mask, temperature)
            out[:, s : s + chunk] = W @ values
        ctx.save_for_backward(source, target, normals, temperature, mask, out)
        ctx.block = block
        return out[..., :3], out[..., 3:]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_points: Tensor, grad_normals: Tensor):
        source, target, normals, temperature, mask, out = ctx.saved_tensors
        B, N, _ = source.shape
        M = target.shape[1]
        chunk = _chunk_size(B, M, ctx.block)
        q_sq = (target * target).sum(-1)
        values = torch.cat([target, normals], dim=-1)
        grad_out = torch.cat([grad_points, grad_normals], dim=-1)
        g_source = torch.zeros_like(source)
        g_values = torch.zeros_like(values)
        g_target_logit = torch.zeros_like(target)
        g_temperature = torch.zeros((), dtype=source.dtype, device=source.device)
        for s in range(0, N, chunk):
            p = source[:, s : s + chunk]
            g = grad_out[:, s : s + chunk]
            W, d2 = _weights(p, target, q_sq, mask, temperature)
            # dL/dlogit_ij = W_ij (v_j . g_i - o_i . g_i)
            g_logit = W * (
                g @ values.transpose(1, 2) - (out[:, s : s + chunk] * g).sum(-1, keepdim=True)
            )
            g_values += W.transpose(1, 2) @ g
            # logit = -|p - q|^2 / T
            row = g_logit.sum(-1, keepdim=True)
            g_source[:, s : s + chunk] = -2.0 / temperature * (p * row - g_logit @ target)
            col = g_logit.sum(1)[..., None]
            g_target_logit += 2.0 / temperature * (g_logit.transpose(1, 2) @ p - target * col)
            g_temperature += (g_logit * d2).sum() / temperature**2
        g_target = g_values[..., :3] + g_target_logit
        g_normals = g_values[..., 3:]
        g_temp = g_temperature if ctx.needs_input_grad[3] else None
        return g_source, g_target, g_normals, g_temp, None, None


def dense_soft_match(
    source: Tensor,
    target: Tensor,
    target_normals: Tensor | None,
    temperature: Tensor | float,
    target_mask: Tensor,
    block: int = DEFAULT_BLOCK,
    normalize: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Dense soft partners and their re-normalised normals in ``O(chunk * M)`` memory.

    Args:
        source: ``(B, N, 3)``; target: ``(B, M, 3)``; target_normals: ``(B, M, 3)`` or None.
        temperature: positive scalar (float or 0-d tensor, differentiable).
        target_mask: ``(B, M)`` bool of real target points (a pair needs at least one).
        block: elements of one ``chunk x M`` block (memory knob).
        normalize: re-normalise the weighted mean of ``target_normals`` (False: return the
            plain weighted mean of any ``(B, M, C)`` per-point values, e.g. covariances).
    Returns:
        partners ``(B, N, 3)`` and unit normals ``(B, N, 3)`` (None without target normals).
    """
    # Distances by |p|^2 - 2 p.q + |q|^2 lose precision far from the origin: centre first
    # (softmax weights are translation invariant).
    centre = target.detach().mean(dim=1, keepdim=True)
    T = torch.as_tensor(temperature, dtype=source.dtype, device=source.device)
    normals = (
        target_normals if target_normals is not None else target.new_zeros(*target.shape[:2], 0)
    )
    points, raw_normals = _DenseSoftMatch.apply(
        source - centre, target - centre, normals, T, target_mask, block
    )
    points = points + centre
    if target_normals is None:
        return points, None
    if not normalize:
        return points, raw_normals
    norm = raw_normals.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(source.dtype).tiny)
    return points, raw_normals / norm


def dense_soft_mean(
    source: Tensor,
    target: Tensor,
    values: Tensor,
    temperature: Tensor | float,
    target_mask: Tensor,
    block: int = DEFAULT_BLOCK,
) -> Tensor:
    """The dense softmax-weighted mean of per-target ``values`` ``(B, M, F)`` -> ``(B, N, F)``,
    with the weights of :func:`dense_soft_match` (same memory bound; differentiable in all)."""
    centre = target.detach().mean(dim=1, keepdim=True)
    T = torch.as_tensor(temperature, dtype=source.dtype, device=source.device)
    _, mean = _DenseSoftMatch.apply(source - centre, target - centre, values, T, target_mask, block)
    return mean


def _gather_rows(values: Tensor, index: Tensor) -> Tensor:
    """``values`` ``(B, M, C)`` at ``index`` ``(B, N, k)`` -> ``(B, N, k, C)`` (no autograd)."""
    B, M, C = values.shape
    offsets = (torch.arange(B, device=index.device) * M).reshape(B, 1, 1)
    return (
        values.reshape(B * M, C)
        .index_select(0, (index + offsets).reshape(-1))
        .reshape(*index.shape, C)
    )


class _TopKSoftMatch(torch.autograd.Function):
    """Softmax-weighted partners over given neighbours, with a hand-written backward: one
    autograd node per ICP iteration instead of ~15 (gather, differences, softmax, weighted sum),
    and no ``(B, N, k, 3)`` tensor kept for the backward (the neighbours are gathered again)."""

    @staticmethod
    def forward(
        ctx,
        source: Tensor,
        values: Tensor,
        temperature: Tensor,
        index: Tensor,
        found: Tensor,
    ) -> Tensor:
        nb = _gather_rows(values, index)  # (B, N, k, C): points, then normals if any
        diff = source[:, :, None, :] - nb[..., :3]
        d2 = (diff * diff).sum(-1)
        logits = torch.where(found, -d2 / temperature, torch.full_like(d2, -math.inf))
        # A point without neighbours gets uniform weights (its partner is masked out anyway)
        # and, as before, no gradient through its distances.
        any_found = found.any(-1, keepdim=True)
        W = torch.softmax(torch.where(any_found, logits, torch.zeros_like(logits)), dim=-1)
        out = (W[..., None] * nb).sum(-2)
        ctx.save_for_backward(source, values, temperature, index, W, out, any_found)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        source, values, temperature, index, W, out, any_found = ctx.saved_tensors
        B, M, C = values.shape
        nb = _gather_rows(values, index)
        diff = source[:, :, None, :] - nb[..., :3]
        # dL/dlogit_ij = W_ij (v_j . g_i - o_i . g_i); logit_ij = -|p_i - q_j|^2 / T
        g_logit = W * (
            (nb * grad_out[:, :, None, :]).sum(-1) - (out * grad_out).sum(-1, keepdim=True)
        )
        g_logit = torch.where(any_found, g_logit, torch.zeros_like(g_logit))
        g_source = None
        if ctx.needs_input_grad[0]:
            g_source = (-2.0 / temperature) * (g_logit[..., None] * diff).sum(-2)
        g_values = None
        if ctx.needs_input_grad[1]:
            g_nb = W[..., None] * grad_out[:, :, None, :]
            g_nb[..., :3] += (2.0 / temperature) * g_logit[..., None] * diff
            offsets = (torch.arange(B, device=index.device) * M).reshape(B, 1, 1)
            g_values = torch.zeros(B * M, C, dtype=values.dtype, device=values.device)
            g_values.index_add_(0, (index + offsets).reshape(-1), g_nb.reshape(-1, C))
            g_values = g_values.reshape(B, M, C)
        g_temperature = None
        if ctx.needs_input_grad[2]:
            d2 = (diff * diff).sum(-1)
            g_temperature = (g_logit * d2).sum() / temperature**2
        return g_source, g_values, g_temperature, None, None


def topk_soft_match(
    source: Tensor,
    target: Tensor,
    target_normals: Tensor | None,
    temperature: Tensor | float,
    index: Tensor,
    found: Tensor,
) -> tuple[Tensor, Tensor | None]:
    """Soft partners over each source point's given neighbours, and their (raw, not
    re-normalised) weighted normals.

    Args:
        source: ``(B, N, 3)``; target: ``(B, M, 3)``; target_normals: ``(B, M, C)`` or None:
            normals, or any channels averaged with the same weights (normals + covariances).
        temperature: positive scalar (float or 0-d tensor, differentiable).
        index: ``(B, N, k)`` neighbour indices into the target (from a search without
            gradient); found: ``(B, N, k)`` bool, the neighbour exists.
    Returns:
        partners ``(B, N, 3)`` and weighted channels ``(B, N, C)`` (None without them):
        ``sum_j W_ij q_j`` with ``W_i = softmax_j(-|p_i - q_j|^2 / T)`` over found neighbours.
    """
    T = torch.as_tensor(temperature, dtype=source.dtype, device=source.device)
    values = target if target_normals is None else torch.cat([target, target_normals], dim=-1)
    out = _TopKSoftMatch.apply(source, values, T, index, found)
    return out[..., :3], None if target_normals is None else out[..., 3:]
