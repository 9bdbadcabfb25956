"""Point-cloud normals by PCA of the k nearest neighbours (depth-map normals are
:func:`difficp.geometry.depth_normals`), and Generalized-ICP's covariances from the same
neighbourhoods (:func:`estimate_covariances`: compiled as :func:`difficp.kdtree.gicp_covariances`
on the CPU, on the forest the ICP search then reuses; PyTorch elsewhere).

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

from difficp.correspondence import (
    NeighborIndex,
    _gather,
    compiled_threads_as_torch,
    lengths_mask,
)

# Leaves of the KD-trees the normals build for themselves (the ICP search's hold
# difficp.kdtree.LEAF_SIZE = 8): k = 30 neighbourhoods span several leaves, and fewer, larger
# leaves measured faster there (Redwood, 40k points, 5 alternating runs, medians: the compiled
# kernel 96.4 -> 87.6 ms, the tree 7.8 -> 6.9 ms), while ICP's nearest-neighbour search gained
# nothing from them (94.5 vs 94.9 ms on 256 x 1024 ModelNet pairs).
NORMALS_LEAF_SIZE = 16


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


# Generalized-ICP's regularised covariances: eigenvalues (epsilon, 1, 1), the smallest along the
# surface normal (Segal et al. 2009; small_gicp and Open3D use epsilon = 1e-3 too).
GICP_EPSILON = 1e-3
GICP_NEIGHBOURS = 20


def regularize_covariances(covariances: Tensor, epsilon: float = GICP_EPSILON) -> Tensor:
    """Generalized-ICP's plane-like covariances: eigenvalues set to ``(epsilon, 1, 1)``.

    Args:
        covariances: ``(..., 3, 3)`` symmetric raw covariances (e.g. of k neighbours).
        epsilon: the variance along the smallest eigenvector (the surface normal), relative to
            1 in the plane.
    Returns:
        ``(..., 3, 3)`` ``I - (1 - epsilon) n n^T`` with ``n`` the eigenvector of the smallest
        eigenvalue (``V diag(epsilon, 1, 1) V^T``: the two unit eigenvalues make the result
        depend on ``n`` alone). Symmetric positive definite for any input, even a degenerate
        (collinear, coincident) neighbourhood; computed in float64, returned in the input dtype.
    """
    if not 0 < epsilon <= 1:
        raise ValueError(f"epsilon must be in (0, 1], got {epsilon}")
    if covariances.shape[-2:] != (3, 3):
        raise ValueError(f"covariances must have shape (..., 3, 3), got {tuple(covariances.shape)}")
    _, vectors = torch.linalg.eigh(covariances.double())
    n = vectors[..., 0]
    eye = torch.eye(3, dtype=n.dtype, device=n.device)
    out = eye - (1.0 - epsilon) * n[..., :, None] * n[..., None, :]
    return out.to(covariances.dtype)


def estimate_covariances(
    points: Tensor,
    k: int = GICP_NEIGHBOURS,
    lengths: Tensor | None = None,
    epsilon: float = GICP_EPSILON,
    index: NeighborIndex | None = None,
) -> Tensor:
    """Generalized-ICP covariances from the ``k`` nearest neighbours, regularised to
    ``(epsilon, 1, 1)`` (:func:`regularize_covariances`). Compute them once per cloud and pass
    them to :func:`difficp.icp` as ``source_covariances`` / ``target_covariances`` to reuse them.

    Args:
        points: ``(N, 3)`` or ``(B, N, 3)``.
        k: neighbours per point, the point itself included (at least 3; clipped to the smallest
            cloud's size).
        lengths: ``(B,)`` valid counts of a padded batch (padding points get the identity).
        epsilon: the regularised variance along the normal.
        index: a :class:`~difficp.correspondence.NeighborIndex` already built on ``points``.
    Returns:
        ``(N, 3, 3)`` / ``(B, N, 3, 3)`` symmetric positive-definite covariances in the dtype of
        ``points``. Not differentiable (treated as constants, like estimated normals).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 3:
        raise ValueError(
            f"k (covariance_k) must be an int >= 3 (a plane needs 3 neighbours), got {k!r}; "
            "the usual value is 20"
        )
    unbatched = points.dim() == 2
    pts = points[None] if unbatched else points
    if pts.dim() != 3 or pts.shape[-1] != 3:
        raise ValueError(f"points must have shape (N, 3) or (B, N, 3), got {tuple(points.shape)}")
    if not 0 < epsilon <= 1:
        raise ValueError(f"epsilon must be in (0, 1], got {epsilon}")
    B, N, _ = pts.shape
    with torch.no_grad():
        mask = lengths_mask(lengths, B, N, pts.device)
        k = min(k, int(mask.sum(1).min()))
        if k >= 1 and _compiled_covariances_apply(pts, index):
            cov = _compiled_covariances(pts, k, epsilon, lengths, index)
        else:
            cov = _torch_covariances(pts, k, epsilon, lengths, index)
    return cov[0] if unbatched else cov


def _compiled_applies(points: Tensor, viewpoint: Tensor | None) -> bool:
    """The compiled path runs on the CPU when nothing asks for a gradient (as for ICP)."""
    if points.device.type != "cpu" or points.numel() == 0:
        return False
    wants_grad = points.requires_grad or (viewpoint is not None and viewpoint.requires_grad)
    if torch.is_grad_enabled() and wants_grad:
        return False
    return _pca_kernel_ready()


def _pca_kernel_ready() -> bool:
    """Whether the KD-forest's PCA kernel (normals and covariances) may run in this process:
    compiled (or cached), and not in a forked child whose parent started numba's pool. In a
    fresh environment: False while `difficp warmup` compiles it in the background."""
    from difficp import kdtree  # numba only when it runs
    from difficp.compile_cache import compile_or_fall_back, kernels_cached

    if kdtree.parallel_unsafe_after_fork():
        return False
    return compile_or_fall_back(
        kernels_cached((kdtree._normals_kernel, kdtree._build_forest, kdtree._build_tree_parallel))
    )


def _torch_covariances(
    pts: Tensor, k: int, epsilon: float, lengths: Tensor | None, index: NeighborIndex | None
) -> Tensor:
    """:func:`estimate_covariances` of ``pts`` ``(B, N, 3)`` in PyTorch (any device), ``k`` at
    most the smallest cloud's size: ``(B, N, 3, 3)`` in ``pts.dtype``."""
    B, N, _ = pts.shape
    mask = lengths_mask(lengths, B, N, pts.device)
    if index is None:
        index = NeighborIndex(pts, lengths)
    # As many query threads as torch uses (scipy's default for large queries is every
    # core, which fights the caller's thread budget).
    idx, found = index.query(pts, k, query_mask=mask, workers=torch.get_num_threads())
    p64 = pts.detach().double()
    # Neighbours relative to their query point (small numbers: no cancellation in the
    # second moments), as k slices of (B, N, 3): elementwise products, no batched 3x3 bmm.
    rel = _gather(p64, idx) - p64[:, :, None, :]  # (B, N, k, 3)
    w = found.double()
    count = w.sum(2).clamp_min(1)
    x, y, z = (rel[..., i] * w for i in range(3))
    m = [t.sum(2) / count for t in (x, y, z)]
    s = [
        (a * b).sum(2) / count - m[i] * m[j]
        for (i, a), (j, b) in (((0, x), (0, x)), ((0, x), (1, y)), ((0, x), (2, z)),
                               ((1, y), (1, y)), ((1, y), (2, z)), ((2, z), (2, z)))
    ]  # fmt: skip
    raw = torch.stack([s[0], s[1], s[2], s[1], s[3], s[4], s[2], s[4], s[5]], -1).unflatten(
        -1, (3, 3)
    )
    cov = regularize_covariances(raw, epsilon)
    eye = torch.eye(3, dtype=cov.dtype, device=cov.device)
    return torch.where(mask[..., None, None], cov, eye).to(pts.dtype)


def _compiled_covariances_apply(points: Tensor, index: NeighborIndex | None) -> bool:
    """Whether :func:`estimate_covariances` runs on the KD-forest: on the CPU, unless the
    caller's index searches with another backend (``search_backend="kdtree"`` keeps the
    PyTorch path), in a process that may start numba's pool, once the kernel is compiled."""
    if points.device.type != "cpu" or (index is not None and index.backend != "compiled"):
        return False
    return _pca_kernel_ready()


def _compiled_covariances(
    pts: Tensor, k: int, epsilon: float, lengths: Tensor | None, index: NeighborIndex | None
) -> Tensor:
    """:func:`estimate_covariances` of ``pts`` ``(B, N, 3)`` on the compiled KD-forest (that of
    ``index`` when given, which the ICP search reuses): ``(B, N, 3, 3)`` in ``pts.dtype``."""
    from difficp.kdtree import gicp_covariances  # here: numba only when it runs

    N = pts.shape[1]
    if index is None:
        index = NeighborIndex(pts.detach(), lengths, "compiled")
    forest, order = index.compiled_forest()
    cov = torch.from_numpy(gicp_covariances(forest, k, epsilon, N))
    if order is not None:  # forest cloud b's point j is the cloud's point order[b, j]
        cov = torch.empty_like(cov).scatter_(
            1, torch.from_numpy(order)[..., None, None].expand(-1, -1, 3, 3), cov
        )
    return cov.to(pts.dtype)


def _compiled_normals(pts: Tensor, k: int, viewpoint: Tensor, lengths: Tensor | None) -> Tensor:
    """:func:`estimate_normals` of ``pts`` ``(B, N, 3)`` on the compiled KD-forest."""
    from difficp.kdtree import build_forest, pca_normals  # here: numba when it runs

    B, N, _ = pts.shape
    compiled_threads_as_torch()
    counts = lengths_mask(lengths, B, N, pts.device).sum(1).numpy()
    forest = build_forest(pts.detach().double().numpy(), counts, leaf_size=NORMALS_LEAF_SIZE)
    normals = pca_normals(forest, k, viewpoint.double().numpy(), N)
    return torch.from_numpy(normals).to(pts.dtype)


def _torch_normals(pts: Tensor, k: int, viewpoint: Tensor, lengths: Tensor | None) -> Tensor:
    """:func:`estimate_normals` of ``pts`` ``(B, N, 3)`` in PyTorch (any device)."""
    B, N, _ = pts.shape
    mask = lengths_mask(lengths, B, N, pts.device)
    # the compiled path's leaves: on the CPU both paths then take the same neighbours where
    # the k-th and (k+1)-th are equally far (a fifth of a depth image's points at k = 30)
    index = NeighborIndex(pts, lengths, leaf_size=NORMALS_LEAF_SIZE)
    idx, found = index.query(pts, k, query_mask=mask)
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
