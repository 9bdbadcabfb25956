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

Two paths fit the same gradients (to rounding): on the CPU, when no gradient is asked for, a
compiled one on the KD-forest of the ICP fast path (:func:`difficp.kdtree.intensity_gradients`:
neighbours, sums and a 3 x 3 Cholesky solve in one parallel pass, no ``(B, M, k)``
intermediate; the rule of :func:`difficp.estimate_normals`), and the PyTorch one (batched
products and solves) for other devices, for inputs that require grad, and for an index of
another search backend.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from difficp.compile_cache import compile_or_fall_back, kernels_cached
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
    if _compiled_applies(points, normals, values, index):
        with torch.no_grad():
            return _compiled_gradients(points, normals, values, k, radius, lengths, index)
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


def _compiled_applies(
    points: Tensor, normals: Tensor, values: Tensor, index: NeighborIndex | None
) -> bool:
    """Whether :func:`intensity_gradients` runs on the compiled KD-forest: on the CPU, when no
    input asks for a gradient, unless the caller's index searches with another backend
    (``search_backend="kdtree"`` keeps the PyTorch path), in a process that may start numba's
    pool, once the kernel is compiled (or ``DIFFICP_COMPILE=now``)."""
    if points.device.type != "cpu" or points.numel() == 0:
        return False
    if index is not None and index.backend != "compiled":
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (points, normals, values)):
        return False
    return _gradient_kernel_ready()


def _gradient_kernel_ready() -> bool:
    """Whether the KD-forest's colour-gradient kernel may run in this process: compiled (or
    cached), and not in a forked child whose parent started numba's pool. In a fresh
    environment: False while `difficp warmup` compiles it in the background."""
    from difficp import kdtree  # here: numba only when it runs

    if kdtree.parallel_unsafe_after_fork():
        return False
    kernels = (
        kdtree._intensity_gradient_kernel,
        kdtree._build_forest,
        kdtree._build_tree_parallel,
    )
    return compile_or_fall_back(kernels_cached(kernels))


def _compiled_gradients(
    points: Tensor,
    normals: Tensor,
    values: Tensor,
    k: int,
    radius: float | None,
    lengths: Tensor | None,
    index: NeighborIndex | None,
) -> Tensor:
    """:func:`intensity_gradients` on the compiled KD-forest (that of ``index`` when given,
    which the ICP search then reuses): ``(B, M, 3)`` in ``points.dtype``."""
    from difficp.kdtree import intensity_gradients as forest_gradients  # here: numba when run

    if index is None:
        index = NeighborIndex(points.detach(), lengths, "compiled")
    B, M, _ = points.shape
    k = int(max(1, min(k, int(index.counts.min().clamp_min(1)))))  # as the PyTorch path
    forest, order = index.compiled_forest()
    # each tree point's position in its cloud (through the compaction of a mask with holes)
    cloud = np.repeat(np.arange(B), np.diff(forest.point_offset))
    column = forest.order if order is None else order[cloud, forest.order]
    n = normals.detach().double().numpy()[cloud, column]
    v = values.detach().double().numpy()[cloud, column]
    out = forest_gradients(forest, n, v, k, radius, M, column)
    return torch.from_numpy(out).to(points.dtype)


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
