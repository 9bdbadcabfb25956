"""Point-cloud normals by PCA of the k nearest neighbours (found with :mod:`difficp.correspondence`'s
neighbour search; depth-map normals are :func:`difficp.geometry.depth_normals`)."""

from __future__ import annotations

import torch
from torch import Tensor

from difficp.correspondence import knn_indices


def estimate_normals(
    points: Tensor, k: int = 16, viewpoint: Tensor | None = None, lengths: Tensor | None = None
) -> Tensor:
    """PCA normals from the ``k`` nearest neighbours, oriented towards ``viewpoint``.

    Args:
        points: ``(N, 3)`` or ``(B, N, 3)``.
        k: neighbourhood size (clipped to the number of points).
        viewpoint: ``(3,)`` or ``(B, 3)``; normals are flipped to face it (default: the origin,
            which is the camera centre for clouds made from depth maps).
        lengths: ``(B,)`` valid counts of a padded batch.
    Returns:
        Unit normals of the same shape as ``points`` (not differentiable: the neighbourhoods are
        found with a KD-tree; the eigen-decomposition itself is batched in torch).
    """
    unbatched = points.dim() == 2
    pts = points[None] if unbatched else points
    B, N, _ = pts.shape
    k = max(3, min(k, N))
    with torch.no_grad():
        idx = knn_indices(pts, pts, k, query_lengths=lengths, reference_lengths=lengths)
        nbrs = torch.gather(pts, 1, idx.reshape(B, N * k, 1).expand(-1, -1, 3))
        nbrs = nbrs.reshape(B, N, k, 3)
        centred = nbrs - nbrs.mean(dim=2, keepdim=True)
        cov = centred.transpose(-1, -2) @ centred
        _, vecs = torch.linalg.eigh(cov.double())
        normals = vecs[..., 0].to(pts.dtype)
        vp = torch.zeros(3, dtype=pts.dtype, device=pts.device) if viewpoint is None else viewpoint
        vp = vp.reshape(-1, 1, 3) if vp.dim() == 2 else vp.reshape(1, 1, 3)
        flip = ((vp - pts) * normals).sum(-1, keepdim=True) < 0
        normals = torch.where(flip, -normals, normals)
    return normals[0] if unbatched else normals
