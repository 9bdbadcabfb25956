"""Point-cloud normals by PCA of the k nearest neighbours (depth-map normals are
:func:`difficp.geometry.depth_normals`).

Two paths compute the same normals: a compiled one on the KD-forest of the ICP fast path
(:func:`difficp.kdtree.pca_normals`: neighbours, covariance and a 3 x 3 Jacobi eigen-solve in one
parallel pass, no ``(B, N, k)`` intermediate), used on the CPU when no gradient is asked for,
and the PyTorch one (neighbours from :mod:`difficp.correspondence`'s search, a batched
``eigh``) for other devices and for points that require grad - the rule
:class:`difficp.fused.FusedSteps` follows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from difficp.correspondence import NeighborIndex, lengths_mask


def estimate_normals(
    points: Tensor, k: int = 16, viewpoint: Tensor | None = None, lengths: Tensor | None = None
) -> Tensor:
    """PCA normals from the ``k`` nearest neighbours, oriented towards ``viewpoint``.

    Args:
        points: ``(N, 3)`` or ``(B, N, 3)``.
        k: neighbourhood size, the point itself included (at least 3, at most the cloud's
            valid points).
        viewpoint: ``(3,)`` or ``(B, 3)``; normals are flipped to face it (default: the origin,
            which is the camera centre for clouds made from depth maps).
        lengths: ``(B,)`` valid counts of a padded batch; padding rows get zero normals.
    Returns:
        Unit normals of the same shape as ``points`` (not differentiable: the neighbourhoods are
        found with a KD-tree).
    """
    unbatched = points.dim() == 2
    pts = points[None] if unbatched else points
    B, N, _ = pts.shape
    k = max(3, min(k, N))
    compiled = _compiled_applies(points, viewpoint)  # before no_grad: it asks about gradients
    with torch.no_grad():
        vp = torch.zeros(3, dtype=pts.dtype, device=pts.device) if viewpoint is None else viewpoint
        vp = vp.to(pts.dtype).reshape(-1, 3).expand(B, 3)
        if compiled:
            normals = _compiled_normals(pts, k, vp, lengths)
        else:
            normals = _torch_normals(pts, k, vp, lengths)
    return normals[0] if unbatched else normals


def _compiled_applies(points: Tensor, viewpoint: Tensor | None) -> bool:
    """The compiled path runs on the CPU when nothing asks for a gradient (as for ICP)."""
    if points.device.type != "cpu" or points.numel() == 0:
        return False
    wants_grad = points.requires_grad or (viewpoint is not None and viewpoint.requires_grad)
    if torch.is_grad_enabled() and wants_grad:
        return False
    from difficp.kdtree import parallel_unsafe_after_fork  # numba only when it runs

    return not parallel_unsafe_after_fork()


def _compiled_normals(pts: Tensor, k: int, viewpoint: Tensor, lengths: Tensor | None) -> Tensor:
    """:func:`estimate_normals` of ``pts`` ``(B, N, 3)`` on the compiled KD-forest."""
    from difficp.kdtree import build_forest, pca_normals, set_threads

    B, N, _ = pts.shape
    threads = torch.get_num_threads()
    set_threads(threads)
    torch.set_num_threads(threads)  # numba's OpenMP start resets the count PyTorch shares
    counts = lengths_mask(lengths, B, N, pts.device).sum(1).numpy()
    forest = build_forest(pts.detach().double().numpy(), counts)
    normals = pca_normals(forest, k, viewpoint.double().numpy(), N)
    return torch.from_numpy(normals).to(pts.dtype)


def _torch_normals(pts: Tensor, k: int, viewpoint: Tensor, lengths: Tensor | None) -> Tensor:
    """:func:`estimate_normals` of ``pts`` ``(B, N, 3)`` in PyTorch (any device)."""
    B, N, _ = pts.shape
    mask = lengths_mask(lengths, B, N, pts.device)
    idx, found = NeighborIndex(pts, lengths).query(pts, k, query_mask=mask)
    nbrs = torch.gather(pts, 1, idx.reshape(B, N * k, 1).expand(-1, -1, 3))
    nbrs = nbrs.reshape(B, N, k, 3)
    # A cloud with fewer than k points has fewer neighbours: only the found ones count.
    w = found[..., None].to(pts.dtype)
    mean = (nbrs * w).sum(2, keepdim=True) / w.sum(2, keepdim=True).clamp_min(1)
    centred = (nbrs - mean) * w
    cov = centred.transpose(-1, -2) @ centred
    _, vecs = torch.linalg.eigh(cov.double())
    normals = vecs[..., 0].to(pts.dtype)
    flip = ((viewpoint[:, None] - pts) * normals).sum(-1, keepdim=True) < 0
    normals = torch.where(flip, -normals, normals)
    return torch.where(mask[..., None], normals, torch.zeros_like(normals))
