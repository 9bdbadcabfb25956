"""Colour features of colored ICP (Park, Zhou & Koltun, ICCV 2017), as Open3D computes them.

* :func:`intensity` - a point's intensity, the mean of its R, G, B (Open3D's ``(r + g + b) / 3``).
* :func:`intensity_gradients` - each target point's intensity gradient ``d`` ``(3,)`` on its
  tangent plane, fitted by least squares to its neighbours (Open3D's
  ``InitializePointCloudForColoredICP``): with ``q`` the point, ``n`` its normal and ``q_j``
  its neighbours (the point itself, the first neighbour found, left out),
  ``min_d sum_j (d . (P q_j - q) - (I_j - I_q))^2 + ((K - 1) d . n)^2``, ``P`` the projection
  onto the tangent plane and ``K`` the neighbours found including the point; the last term
  keeps ``d`` in the plane. Points with fewer than 4 neighbours (including themselves) or a
  singular system get ``d = 0``.
* :func:`colored_features` - the per-point features the ``"colored"`` metric reads
  (:class:`difficp.metrics.Colored`): the weights ``sqrt(lambda)`` / ``sqrt(1 - lambda)`` folded in.

Neighbours are Open3D's hybrid search (``KDTreeSearchParamHybrid(2 * max_distance, 30)`` in
``registration_colored_icp``): the ``k`` nearest within ``radius``. Everything is differentiable
in the colours, points and normals (the choice of neighbours is not).
"""

from __future__ import annotations

import torch
from torch import Tensor

from difficp.correspondence import NeighborIndex, _gather

# Open3D fits a gradient only where the hybrid search finds at least this many points (the
# point itself included).
MIN_NEIGHBOURS = 4


def intensity(colors: Tensor) -> Tensor:
    """``(..., 3)`` RGB -> ``(...)`` intensity, the mean of the three channels (Open3D's)."""
    return colors.sum(-1) / 3.0


def intensity_gradients(
    points: Tensor,
    normals: Tensor,
    values: Tensor,
    k: int = 30,
    radius: float | None = None,
    lengths: Tensor | None = None,
    index: NeighborIndex | None = None,
) -> Tensor:
    """Tangent-plane gradients of ``values`` over each cloud (see the module docstring).

    Args:
        points: ``(B, M, 3)``; normals: ``(B, M, 3)`` unit normals; values: ``(B, M)`` intensity.
        k: neighbours searched, the point itself included (Open3D's ``max_nn``).
        radius: only neighbours within it (Open3D's hybrid radius); None = the ``k`` nearest.
        lengths: ``(B,)`` valid counts of a padded batch (padding gets a zero gradient).
        index: a :class:`NeighborIndex` already built on ``points`` (built here otherwise).
    Returns:
        ``(B, M, 3)`` gradients, differentiable in ``points``, ``normals`` and ``values``.
    """
    if index is None:
        index = NeighborIndex(points, lengths)
    k = int(max(1, min(k, int(index.counts.min().clamp_min(1)))))
    idx, found = index.query(points, k, query_mask=index.mask, max_distance=radius)
    # Open3D skips the first neighbour found: the point itself.
    idx, found = idx[..., 1:], found[..., 1:]
    q, n = points[:, :, None, :], normals[:, :, None, :]
    offset = _gather(points, idx) - q  # (B, M, k-1, 3)
    # Projected onto the tangent plane: P q_j - q = (q_j - q) - ((q_j - q) . n) n.
    a = offset - (offset * n).sum(-1, keepdim=True) * n
    b = _gather(values[..., None], idx)[..., 0] - values[..., None]
    # Rows of neighbours not found are zeroed, so they add nothing to the sums below.
    a = a * found[..., None].to(a.dtype)
    count = found.sum(-1)  # neighbours other than the point itself: Open3D's nn - 1
    c = count.to(points.dtype)[..., None, None]
    normal = normals[..., :, None] * normals[..., None, :]
    # sum_j a_j a_j^T and sum_j a_j b_j as batched products over the (k - 1) neighbours.
    A = a.transpose(-1, -2) @ a + c * c * normal
    rhs = (a.transpose(-1, -2) @ b[..., None])[..., 0]
    # Points Open3D leaves at zero: too few neighbours, or a singular system (its LDLT fails).
    usable = count + 1 >= MIN_NEIGHBOURS
    eye = torch.eye(3, dtype=A.dtype, device=A.device)
    _, info = torch.linalg.cholesky_ex(A.detach())
    usable = usable & (info == 0)
    A = torch.where(usable[..., None, None], A, eye)
    gradient = torch.linalg.solve(A, rhs)
    return torch.where(usable[..., None], gradient, torch.zeros_like(gradient))


def colored_features(
    source_colors: Tensor,
    target_colors: Tensor,
    target_points: Tensor,
    target_normals: Tensor,
    lambda_geometric: float | Tensor,
    k: int,
    radius: float | None,
    target_lengths: Tensor | None = None,
    index: NeighborIndex | None = None,
) -> tuple[Tensor, Tensor]:
    """The features of the ``"colored"`` metric.

    Args:
        source_colors: ``(B, N, 3)``; target_colors: ``(B, M, 3)`` RGB in ``[0, 1]``.
        target_points, target_normals: ``(B, M, 3)``.
        lambda_geometric: weight of the point-to-plane term (Open3D's 0.968 by default).
        k, radius, target_lengths, index: the gradients' neighbours (:func:`intensity_gradients`).
    Returns:
        source features ``(B, N, 1)``: ``sqrt(1 - lambda) I_p``; target features ``(B, M, 5)``:
        ``sqrt(lambda)``, ``sqrt(1 - lambda) I_q`` and ``sqrt(1 - lambda) d_q`` (3).
    """
    lam = torch.as_tensor(lambda_geometric, dtype=target_points.dtype, device=target_points.device)
    geometric = lam.sqrt()
    photometric = (1 - lam).clamp_min(0).sqrt()
    value = intensity(target_colors)
    gradient = intensity_gradients(
        target_points, target_normals, value, k, radius, target_lengths, index
    )
    target = torch.cat(
        [
            geometric.expand_as(value)[..., None],
            photometric * value[..., None],
            photometric * gradient,
        ],
        dim=-1,
    )
    return photometric * intensity(source_colors)[..., None], target


__all__ = ["colored_features", "intensity", "intensity_gradients"]
