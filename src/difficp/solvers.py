"""Step 5b of ICP: solve for the rigid update, differentiably.

* :func:`lu_solve` - every linear system goes through one LU factorisation; its backward is a
  second solve with the transposed (adjoint) factors, so it is right for any square matrix.
* :func:`weighted_procrustes` - closed-form point-to-point update by SVD (Kabsch), with
  finite gradients for degenerate input.
* :func:`gauss_newton_update` - one linearised (Gauss-Newton) step of any metric.
* :func:`levenberg_marquardt_update` - damped steps with per-pair accept/reject.
"""

from __future__ import annotations

import roma
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from difficp.correspondence import Correspondences
from difficp.geometry import make_transform, rotate_vectors, transform_points
from difficp.metrics import Metric

# Damping of the Procrustes derivative: 1/(s_i + s_j) -> t/(t^2 + eps^2) (see weighted_procrustes).
SVD_GRADIENT_EPS = 1e-6


class _LUSolve(torch.autograd.Function):
    """x = A^-1 b by LU; backward: g_b = A^-T g_x (same factors, adjoint solve), g_A = -g_b x^T."""

    @staticmethod
    def forward(ctx, A: Tensor, b: Tensor) -> Tensor:  # type: ignore[override]
        LU, pivots = torch.linalg.lu_factor(A)
        x = torch.linalg.lu_solve(LU, pivots, b[..., None])[..., 0]
        ctx.save_for_backward(LU, pivots, x)
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        LU, pivots, x = ctx.saved_tensors
        grad_b = torch.linalg.lu_solve(LU, pivots, grad_x[..., None], adjoint=True)[..., 0]
        grad_A = -grad_b[..., :, None] * x[..., None, :]
        return grad_A, grad_b


def lu_solve(A: Tensor, b: Tensor) -> Tensor:
    """Solve ``A x = b`` for a batch: ``A`` ``(B, n, n)``, ``b`` ``(B, n)`` -> ``(B, n)``.

    Differentiable in ``A`` and ``b`` (first order) with a backward that reuses the forward LU
    factors. ``A`` must be non-singular; :func:`regularize` makes normal equations so.
    """
    return _LUSolve.apply(A, b)


def regularize(A: Tensor) -> tuple[Tensor, Tensor]:
    """Make normal matrices ``(B, 6, 6)`` safely invertible.

    Adds ``eps * trace/6`` to the diagonal (eps = dtype epsilon): invisible for well-posed
    systems, so steps match Open3D's. A numerically rank-deficient system (a plane under
    point_to_plane, a line under point_to_point: the LU of the Jacobi-scaled matrix has a pivot
    below ``eps^(3/4)``) would then step by rounding noise / jitter in its null space, as far as
    the real step; it gets ``sqrt(eps) * trace/6`` instead, which keeps that component ~1e-8 of
    the step (close to the minimum-norm step; a diagonal-scaled damping would not be: it trades
    cheap null-space motion for the expensive coordinates). Pairs with an all-zero matrix get
    the identity. Returns the matrix and a ``(B,)`` bool of the pairs with a usable system.
    """
    n = A.shape[-1]
    info = torch.finfo(A.dtype)
    trace = A.diagonal(dim1=-2, dim2=-1).sum(-1)
    usable = trace > info.tiny
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    # Rank test on the Jacobi-scaled matrix, so that units (rotation vs translation) and the
    # distance of the cloud from the origin do not look like rank loss.
    scale = A.detach().diagonal(dim1=-2, dim2=-1).clamp_min(info.tiny).rsqrt()
    scaled = A.detach() * scale[:, :, None] * scale[:, None, :]
    LU, _, failed = torch.linalg.lu_factor_ex(scaled)
    smallest_pivot = LU.diagonal(dim1=-2, dim2=-1).abs().amin(-1)
    deficient = (failed != 0) | (smallest_pivot < info.eps**0.75)
    relative = torch.where(deficient, info.eps**0.5, info.eps).to(A.dtype)
    jitter = (relative * trace / n).clamp_min(info.tiny)
    A = A + jitter[:, None, None] * eye
    return torch.where(usable[:, None, None], A, eye.expand_as(A)), usable


def weighted_procrustes(
    source: Tensor, target: Tensor, weights: Tensor, gradient_eps: float = SVD_GRADIENT_EPS
) -> Tensor:
    """Rigid ``(B, 4, 4)`` minimising ``sum_i w_i |R p_i + t - q_i|^2`` (weighted Kabsch).

    Args:
        source: ``(B, N, 3)`` points ``p``; target: ``(B, N, 3)`` partners ``q``.
        weights: ``(B, N)`` non-negative.
        gradient_eps: damping of the SVD derivative.

    The rotation is ``roma.special_procrustes`` of the weighted cross-covariance
    ``H = sum w (q - q_mean)(p - p_mean)^T / sum w`` (SVD with the determinant sign fix).
    Degenerate input (collinear, planar or duplicated points: repeated or zero singular values)
    makes the exact derivative blow up through ``1 / (s_i + s_j)`` terms; roma replaces each by
    the damped pseudo-inverse ``t / (t^2 + eps^2)``, bounded by ``1 / (2 eps)``, so gradients stay
    finite. The rotation itself is exact (undamped) in the forward pass.
    """
    w = weights[..., None]
    total = w.sum(1, keepdim=True).clamp_min(torch.finfo(source.dtype).tiny)
    p_mean = (w * source).sum(1, keepdim=True) / total
    q_mean = (w * target).sum(1, keepdim=True) / total
    H = ((w * (target - q_mean)).transpose(1, 2) @ (source - p_mean)) / total
    R = roma.special_procrustes(H, gradient_eps=gradient_eps, method="svd")
    t = q_mean[:, 0] - (R @ p_mean[:, 0, :, None])[..., 0]
    return make_transform(R, t)


def normal_equations(residuals: Tensor, jacobian: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """``A = sum w J^T J`` ``(B, 6, 6)`` and ``g = sum w J^T r`` ``(B, 6)``."""
    B = residuals.shape[0]
    J = jacobian.reshape(B, -1, 6)
    r = residuals.reshape(B, -1)
    w = weights[..., None].expand_as(residuals).reshape(B, -1)
    Jw = J * w[..., None]
    return Jw.transpose(1, 2) @ J, (Jw * r[..., None]).sum(1)


def gauss_newton_update(
    metric: Metric,
    source: Tensor,
    source_normals: Tensor | None,
    corr: Correspondences,
    weights: Tensor,
    damping: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One linearised step: solve ``(A + damping * diag(A)) x = -g`` and return the update.

    Returns the ``(B, 4, 4)`` update (identity for pairs without a usable system) and a ``(B,)``
    bool of the pairs whose system was usable.
    """
    r = metric.residuals(source, source_normals, corr)
    J = metric.jacobian(source, source_normals, corr)
    A, g = normal_equations(r, J, weights)
    if damping is not None:
        A = A + damping[:, None, None] * torch.diag_embed(A.diagonal(dim1=-2, dim2=-1))
    step, usable = solve_normal_equations(A, g)
    return metric.step_to_transform(step), usable


def solve_normal_equations(A: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """The step ``x`` ``(B, 6)`` solving ``A x = -g`` for normal equations ``A`` ``(B, 6, 6)``.

    Regularised (:func:`regularize`); a pair whose system is unusable (no correspondences, or
    singular to working precision) gets a zero step. Returns the step and ``(B,)`` bool usable.
    """
    A, usable = regularize(A)
    # A pair with very few correspondences can still be singular to working precision (the
    # jitter vanishes in rounding); it gets a zero step and is reported unusable.
    singular = torch.linalg.lu_factor_ex(A.detach())[2] != 0
    if bool(singular.any()):
        eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        A = torch.where(singular[:, None, None], eye, A)
        g = torch.where(singular[:, None], torch.zeros_like(g), g)
        usable = usable & ~singular
    step = lu_solve(A, -g)
    return torch.where(usable[:, None], step, torch.zeros_like(step)), usable


def weighted_cost(
    metric: Metric,
    source: Tensor,
    source_normals: Tensor | None,
    corr: Correspondences,
    weights: Tensor,
) -> Tensor:
    """``(B,)`` weighted sum of squared residuals."""
    r = metric.residuals(source, source_normals, corr)
    return (weights * (r * r).sum(-1)).sum(1)


def levenberg_marquardt_update(
    metric: Metric,
    source: Tensor,
    source_normals: Tensor | None,
    corr: Correspondences,
    weights: Tensor,
    damping: Tensor,
    steps: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """``steps`` Levenberg-Marquardt steps with the correspondences and weights held fixed.

    Each step solves the damped normal equations; a pair accepts it when its cost falls
    (then damping / 10), else keeps its pose (damping * 10). Accept/reject is a per-pair
    ``torch.where``, so the batch never splits and gradients flow through accepted steps.

    Args:
        damping: ``(B,)`` current damping per pair (carried across ICP iterations).
    Returns:
        The accumulated ``(B, 4, 4)`` update, the new damping ``(B,)``, and usable ``(B,)``.
    """
    B = source.shape[0]
    update = torch.eye(4, dtype=source.dtype, device=source.device).expand(B, 4, 4)
    p, n = source, source_normals
    cost = weighted_cost(metric, p, n, corr, weights)
    usable = torch.ones(B, dtype=torch.bool, device=source.device)
    for _ in range(steps):
        delta, ok = gauss_newton_update(metric, p, n, corr, weights, damping)
        usable = usable & ok
        p_new = transform_points(p, delta)
        n_new = None if n is None else rotate_vectors(n, delta)
        new_cost = weighted_cost(metric, p_new, n_new, corr, weights)
        accept = (new_cost.detach() < cost.detach()) & ok
        update = torch.where(accept[:, None, None], delta @ update, update)
        p = torch.where(accept[:, None, None], p_new, p)
        if n is not None and n_new is not None:
            n = torch.where(accept[:, None, None], n_new, n)
        cost = torch.where(accept, new_cost, cost)
        damping = torch.where(accept, damping / 10, damping * 10).clamp(1e-12, 1e12)
    return update, damping, usable
