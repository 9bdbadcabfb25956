"""Step 5b of ICP: solve for the rigid update, differentiably.

* :func:`lu_solve` - every linear system goes through one LU factorisation; its backward is a
  second solve with the transposed (adjoint) factors, so it is right for any square matrix.
* :func:`weighted_procrustes` - closed-form point-to-point update by SVD (Kabsch), with
  finite gradients for degenerate input.
* :func:`gauss_newton_update` - one linearised (Gauss-Newton) step of any metric.
* :func:`levenberg_marquardt_update` - damped steps with per-pair accept/reject.

Non-rigid ICP's parameters live in a flat ``(B, P)`` vector: its least-squares terms come as
row-sparse :class:`ResidualBlock` s, whose normal equations :func:`block_normal_equations`
assembles by scatter-adding each row's small ``Q x Q`` block into the ``(B, P, P)`` system (so a
deformation graph costs ``O(N Q^2)``, not ``O(N P^2)``); :func:`damped_solve` and
:func:`block_levenberg_marquardt` solve them. Every operation is differentiable, so unrolling
the steps gives gradients of the fitted parameters w.r.t. everything the residuals depend on.
Both Levenberg-Marquardt loops accept a trial by :func:`marquardt_accept`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from difficp.correspondence import Correspondences
from difficp.geometry import (
    make_transform,
    norm3_twin,
    rotate_vectors,
    rotation_between,
    rotation_between_twin,
    transform_points,
    unit_vectors,
)
from difficp.metrics import Metric
from difficp.strategies.registry import compiled_helper

# float64 limits of the compiled twins (plain floats: numba folds them as constants)
_TINY64 = float(np.finfo(np.float64).tiny)
_EPS64 = float(np.finfo(np.float64).eps)

# Damping of the Procrustes derivative: 1/(s_i + s_j) -> t/(t^2 + eps^2) (see weighted_procrustes).
SVD_GRADIENT_EPS = 1e-6


class _LUSolve(torch.autograd.Function):
    """x = A^-1 b by LU; backward: g_b = A^-T g_x (same factors, adjoint solve), g_A = -g_b x^T."""

    @staticmethod
    def forward(ctx, A: Tensor, b: Tensor) -> Tensor:
        LU, pivots = torch.linalg.lu_factor(A)
        x = torch.linalg.lu_solve(LU, pivots, b[..., None])[..., 0]
        ctx.save_for_backward(LU, pivots, x)
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x: Tensor) -> tuple[Tensor, Tensor]:
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


def rank_tolerance(eps: float) -> float:
    """Smallest pivot of a Jacobi-scaled normal matrix that still counts as full rank.

    ``eps^(3/4)``: below it rounding alone (``eps`` relative) moves the step in that direction
    by more than ``eps^(1/4)`` of its size. In float64 the bound is raised to
    ``sqrt(eps64)`` (~1.5e-8, the Jacobian's columns dependent to ~1e-4): such a direction is
    fixed by the data ~10^4 times more weakly than the best one, so a Gauss-Newton step along
    it can be thousands of times the cloud's size (a few source points matched to a few target
    planes after a large offset) and is still steered by rounding (summation order) at
    ``eps^(3/4)``. In float32 ``eps^(3/4)`` (~6e-6) is already the larger.
    """
    return max(eps**0.75, _EPS64**0.5)


_RANK_TOLERANCE64 = rank_tolerance(_EPS64)


def regularize(A: Tensor) -> tuple[Tensor, Tensor]:
    """Make normal matrices ``(B, 6, 6)`` safely invertible.

    Adds ``eps`` times the mean diagonal of its block (rotation, translation) to each diagonal
    entry (eps = dtype epsilon): invisible for well-posed systems, so steps match Open3D's. Per
    block, because the two have different units: at 1e-5 units the rotation block is 1e-10 of
    the translation block, and a jitter from the whole trace would swamp it (float32 steps
    then lost the rotation).

    A numerically rank-deficient system (a plane under point_to_plane, a line under point_to_point,
    every point matched to one target point: the LU of the Jacobi-scaled matrix has a pivot below
    :func:`rank_tolerance`) would step by rounding noise in its null space, as far as the real step
    or farther, and differently for every summation order. Its null space (the eigenvectors of the
    Jacobi-scaled matrix below ``sqrt(eps)``) gets a unit eigenvalue instead: the step there is 0 to
    rounding (the minimum-norm step in units of the cloud's size), while the determined components
    are untouched. The eigenvectors are not differentiated (the projector is held fixed); pairs with
    an all-zero matrix get the identity. Returns the matrix and a ``(B,)`` bool of the pairs with a
    usable system.
    """
    n = A.shape[-1]
    info = torch.finfo(A.dtype)
    diagonal = A.diagonal(dim1=-2, dim2=-1)
    trace = diagonal.sum(-1)
    usable = trace > info.tiny
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    # Rank test on the Jacobi-scaled matrix, so that units (rotation vs translation) and the
    # distance of the cloud from the origin do not look like rank loss.
    root = A.detach().diagonal(dim1=-2, dim2=-1).clamp_min(info.tiny).sqrt()
    scaled = A.detach() / (root[:, :, None] * root[:, None, :])
    LU, _, failed = torch.linalg.lu_factor_ex(scaled)
    smallest_pivot = LU.diagonal(dim1=-2, dim2=-1).abs().amin(-1)
    deficient = (failed != 0) | (smallest_pivot < rank_tolerance(info.eps))
    half = n // 2
    block_mean = torch.cat(
        [
            diagonal[:, :half].mean(-1, keepdim=True).expand(-1, half),
            diagonal[:, half:].mean(-1, keepdim=True).expand(-1, n - half),
        ],
        dim=-1,
    )
    A = A + torch.diag_embed((info.eps * block_mean).clamp_min(info.tiny))
    if bool((deficient & usable).any()):
        values, vectors = torch.linalg.eigh(scaled)
        null = ((values <= info.eps**0.5) & deficient[:, None]).to(A.dtype)
        projector = (vectors * null[:, None, :]) @ vectors.transpose(-1, -2)
        A = A + root[:, :, None] * projector * root[:, None, :]
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

    Where every rotation about a line fits equally well (collinear points: ``H`` of rank one)
    or every rotation does (all points identical: ``H = 0``, to rounding), the SVD would pick
    one at random; we return the one closest to the identity (minimal motion): the smallest
    rotation taking the source line onto the target line, or the identity.
    """
    # Weighted sums as matrix products and each centred cloud made once: elementwise passes
    # broadcast over a 3-long last axis are the slow part of this function on the CPU (it ran
    # 2 ms for 32 x 1024 points, 1.3 ms now).
    w_row = weights[:, None, :]  # (B, 1, N)
    total = weights.sum(1)[:, None, None].clamp_min(torch.finfo(source.dtype).tiny)
    p_mean = (w_row @ source) / total  # (B, 1, 3)
    q_mean = (w_row @ target) / total
    source_centred = source - p_mean
    target_centred = target - q_mean
    weighted_target = target_centred * weights[..., None]
    H = (weighted_target.transpose(1, 2) @ source_centred) / total
    import roma  # here: importing roma loads torch._dynamo (seconds)

    # its singular values too: minimal_motion_rotation needs the largest two (the sign flip
    # that makes R proper only touches the smallest), and a second SVD cost ~0.1 ms per call
    R, singular_values = roma.special_procrustes(
        H, gradient_eps=gradient_eps, method="svd", return_singular_values=True
    )
    with torch.no_grad():
        # Rounding error of H: its terms carry ~eps of coordinates as large as the means and
        # of differences as large as the offset between them plus the spread.
        spread = ((w_row @ source_centred.square()).sum((1, 2)) / total[:, 0, 0]).sqrt()
        target_spread = (weighted_target * target_centred).sum((1, 2)) / total[:, 0, 0]
        spread = spread + target_spread.sqrt()
        offset = (q_mean - p_mean)[:, 0].norm(dim=-1)
        size = p_mean[:, 0].norm(dim=-1) + offset + spread
        noise = PROCRUSTES_NOISE * torch.finfo(H.dtype).eps * size * (offset + spread)
    R = minimal_motion_rotation(H, R, noise, gradient_eps, singular_values.detach())
    t = q_mean[:, 0] - (R @ p_mean[:, 0, :, None])[..., 0]
    return make_transform(R, t)


# Singular values of a cross-covariance below this many epsilons of its coordinates' size are
# rounding noise (numerically collinear / coincident points).
PROCRUSTES_NOISE = 100.0
# Points whose cross-covariance has a second singular value below eps ** LINE_EXPONENT of its
# first are a line to numerical precision (the linearised solvers' rounding bound eps^(3/4) on
# the Jacobi-scaled normal matrix, whose eigenvalues are the squares of these ratios). Above it
# the rotation about the line is fixed by a thickness of s1 / s0 of the line's length, and
# rounding moves it by eps * s0 / s1: soft partners that all fall between two target points (the
# others weighing 1e-11) gave s1 / s0 ~ 1e-11, and results that changed by 5e-6 with the
# summation order (batched against one pair). Unlike a linearised step, which grows without
# bound as its direction loses rank (see rank_tolerance), the error here is an angle, so the
# float64 raise of that bound is not needed.
LINE_EXPONENT = 0.375


def minimal_motion_rotation(
    H: Tensor,
    R: Tensor,
    noise: Tensor,
    gradient_eps: float = SVD_GRADIENT_EPS,
    singular_values: Tensor | None = None,
) -> Tensor:
    """``R`` ``(B, 3, 3)``, except where the cross-covariance ``H`` ``(B, 3, 3)`` leaves the
    Procrustes rotation undetermined: singular values at or below ``noise`` ``(B,)``, or a
    second one below ``eps ** LINE_EXPONENT`` of the first. ``singular_values`` ``(B, 3)``:
    ``H``'s, largest first, if known (the third may carry a sign; it is not used).

    Rank one (``H ~ s u v^T``: collinear points, to that precision), every rotation with ``R v = u``
    maximises ``trace(R^T H)``; we take the smallest one, about ``v x u``. Rank zero (coincident
    points): the identity. Differentiable in ``H``, with the derivative of ``u`` and ``v``
    (``1 / s``) damped as the SVD's (``s / (s^2 + gradient_eps^2)``): a rank-one ``H`` of size
    ``1e-12`` (soft partners all on one target point, apart from weights of ``1e-11``) otherwise
    gives gradients of ``1e11``, and rounding differences between equal problems become visible
    in them.
    """
    with torch.no_grad():
        s = torch.linalg.svdvals(H) if singular_values is None else singular_values
        zero = s[:, 0] <= noise
        thin = torch.finfo(H.dtype).eps ** LINE_EXPONENT * s[:, 0]
        line = (s[:, 1] <= torch.maximum(noise, thin)) & ~zero
    if not bool((zero | line).any()):
        return R
    eye = torch.eye(3, dtype=R.dtype, device=R.device).expand_as(R)
    if bool(line.any()):
        # The column of H with the largest norm is s u v_j; H^T u then gives v (same sign).
        column = H.detach().norm(dim=1).argmax(-1)
        u = damped_unit_vectors(
            torch.gather(H, 2, column[:, None, None].expand(-1, 3, 1))[..., 0], gradient_eps
        )
        v = damped_unit_vectors((H.transpose(1, 2) @ u[..., None])[..., 0], gradient_eps)
        R = torch.where(line[:, None, None], rotation_between(v, u), R)
    return torch.where(zero[:, None, None], eye, R)


class _DampedUnitVectors(torch.autograd.Function):
    """``x / |x|`` ``(B, 3)``; backward ``(I - x^ x^T) g |x| / (|x|^2 + eps^2)`` instead of
    ``/ |x|``: the exact derivative where ``|x| >> eps``, bounded by ``1 / (2 eps)`` below."""

    @staticmethod
    def forward(ctx, x: Tensor, eps: float) -> Tensor:
        unit = unit_vectors(x)
        ctx.save_for_backward(x, unit)
        ctx.eps = eps
        return unit

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        x, unit = ctx.saved_tensors
        n = x.norm(dim=-1, keepdim=True)
        tangent = grad - unit * (unit * grad).sum(-1, keepdim=True)
        return tangent * (n / (n * n + ctx.eps**2)), None


def damped_unit_vectors(x: Tensor, eps: float) -> Tensor:
    """``x`` ``(B, 3)`` normalised (as :func:`~difficp.geometry.unit_vectors`), with its
    derivative damped below ``|x| ~ eps`` as the Procrustes SVD's (``gradient_eps``)."""
    return _DampedUnitVectors.apply(x, eps)


def compiled_procrustes(moments: np.ndarray, center: np.ndarray, out: np.ndarray) -> None:
    """Compiled twin of :func:`weighted_procrustes`: the ``(4, 4)`` update into ``out`` from the
    18 moments about ``center`` (the layout of :data:`difficp.fused.MOMENTS`: the weight ``w``,
    the weighted means ``p`` (3) and ``q`` (3) of the sources and their partners, the co-moment
    ``sum w (q_i - q)(p_i - p)^T`` (9) and the spreads ``sum w |p_i - p|^2``,
    ``sum w |q_i - q|^2``)."""
    w = max(moments[0], _TINY64)
    p = moments[1:4]
    q = moments[4:7]
    H = moments[7:16].reshape(3, 3) / w
    U, s, Vt = np.linalg.svd(H)
    # Below the rounding error of H a singular value is noise: weighted_procrustes's bound, from
    # the same weighted spreads (the source's unweighted radius in their place called a pair
    # with its weight on two points "collinear" where the reference did not: fuzz case 55323)
    offset = norm3_twin(q - p)
    spread = math.sqrt(max(moments[16], 0.0) / w) + math.sqrt(max(moments[17], 0.0) / w)
    noise = (
        PROCRUSTES_NOISE * _EPS64 * (norm3_twin(center + p) + offset + spread) * (offset + spread)
    )
    if s[0] <= noise:  # coincident points: every rotation fits; the identity moves least
        R = np.eye(3)
    elif s[1] <= max(noise, _EPS64**LINE_EXPONENT * s[0]):
        # collinear points: the smallest rotation taking v to u
        R = rotation_between_twin(Vt[0].copy(), U[:, 0].copy())
    else:
        if np.linalg.det(U @ Vt) < 0:  # a reflection: flip the least significant direction
            U[:, 2] = -U[:, 2]
        R = U @ Vt
    out[:3, :3] = R
    out[:3, 3] = (q + center) - R @ (p + center)


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
    center: Tensor | None = None,
    far: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One linearised step: solve ``(A + damping * diag(A)) x = -g`` and return the update.

    The normal equations are formed in coordinates centred on ``center``: far from the origin
    the uncentred ones lose every digit of the rotation (their rotation block grows like
    ``|p|^2``). That is an exact change of variables of the same least-squares problem, so the
    step is the same (Open3D's, which rotates about the world origin) up to rounding; only the
    ``damping`` (LM) term acts on the centred diagonal. Pairs flagged ``far`` instead rotate
    about ``center`` (see :func:`linearization_pivot`).

    Args:
        center: ``(B, 3)``; default: the centroid of the source points with positive weight.
        far: ``(B,)`` bool; default: all False (rotate about the world origin).
    Returns:
        The ``(B, 4, 4)`` update (identity for pairs without a usable system) and a ``(B,)``
        bool of the pairs whose system was usable.
    """
    if center is None:
        center = positive_weight_centroid(source, weights)
    c = center[:, None, :]
    centred = dataclasses.replace(corr, points=corr.points - c)
    r = metric.residuals(source - c, source_normals, centred)
    J = metric.jacobian(source - c, source_normals, centred)
    A, g = normal_equations(r, J, weights)
    if damping is not None:
        A = A + damping[:, None, None] * torch.diag_embed(A.diagonal(dim1=-2, dim2=-1))
    step, usable = solve_normal_equations(A, g)
    return _step_to_transform(metric, step, center, far), usable


# A pair whose moved source centroid lies farther than this many RMS radii from the origin
# rotates its linearised steps about that centroid (see linearization_pivot).
FAR_FROM_ORIGIN = 10.0


def linearization_pivot(centroid: Tensor, radius: Tensor) -> Tensor:
    """``(B,)`` bool: the pair's linearised step rotates about its source centroid.

    Open3D composes a linearised step ``(omega, v)`` as ``p -> R(omega) p + v``: a rotation
    about the world origin, whose second-order error ``|omega|^2 |c| / 2`` grows with the
    cloud's distance ``|c|`` from the origin (at 1e3 units a 3 degree step throws a unit cloud
    off by 2.4 units, and Open3D ends 100 degrees off). We keep Open3D's step, and so its
    iterates, for clouds within ``FAR_FROM_ORIGIN`` RMS radii of the origin, and rotate about
    the centroid beyond: the same fixed points, and the same first-order step.

    Args:
        centroid: ``(B, 3)`` centroid of the moved source; radius: ``(B,)`` its RMS radius.
    """
    return centroid.detach().norm(dim=-1) > FAR_FROM_ORIGIN * radius.detach()


def positive_weight_centroid(points: Tensor, weights: Tensor) -> Tensor:
    """``(B, 3)`` mean of the points ``(B, N, 3)`` whose weight ``(B, N)`` is positive (0 if none)."""
    mask = (weights.detach() > 0).to(points.dtype)
    return (mask[..., None] * points).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)


def _step_to_transform(metric: Metric, step: Tensor, center: Tensor, far: Tensor | None) -> Tensor:
    """The ``(B, 4, 4)`` update of a ``(B, 6)`` step solved in coordinates centred on
    ``center`` ``(B, 3)``: about the world origin, or about ``center`` where ``far``."""
    # The same linearised residual in world coordinates has translation v - k (omega x c):
    # (p - c) x n . omega = p x n . omega - n . (omega x c), k the metric's centre_factor (how
    # far its linearisation point moves under centring: symmetric's p + q moves by 2c).
    k = metric.centre_factor
    omega = step[:, :3]
    world = torch.cat([omega, step[:, 3:] - k * torch.cross(omega, center, dim=-1)], dim=-1)
    update = metric.step_to_transform(world)
    if far is None or not bool(far.any()):
        return update
    local = metric.step_to_transform(step)
    R = local[:, :3, :3]
    about_center = make_transform(R, local[:, :3, 3] + center - (R @ center[..., None])[..., 0])
    return torch.where(far[:, None, None], about_center, update)


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


@compiled_helper
def _lu_solve_in_place_twin(M: np.ndarray, rhs: np.ndarray, x: np.ndarray) -> float:
    """LU with partial pivoting of ``M`` (overwritten; compiled helper); solves into ``x``
    unless ``rhs`` is empty. Returns the smallest absolute pivot (0: singular, ``x`` untouched)."""
    n = M.shape[0]
    smallest = np.inf
    for k in range(n):
        pivot = k
        for i in range(k + 1, n):
            if abs(M[i, k]) > abs(M[pivot, k]):
                pivot = i
        if M[pivot, k] == 0.0:
            return 0.0
        smallest = min(smallest, abs(M[pivot, k]))
        if pivot != k:
            for j in range(n):
                M[k, j], M[pivot, j] = M[pivot, j], M[k, j]
            if rhs.size:
                rhs[k], rhs[pivot] = rhs[pivot], rhs[k]
        for i in range(k + 1, n):
            f = M[i, k] / M[k, k]
            for j in range(k, n):
                M[i, j] -= f * M[k, j]
            if rhs.size:
                rhs[i] -= f * rhs[k]
    if rhs.size:
        for k in range(n - 1, -1, -1):
            acc = rhs[k]
            for j in range(k + 1, n):
                acc -= M[k, j] * x[j]
            x[k] = acc / M[k, k]
    return smallest


def compiled_solve_normal_equations(A: np.ndarray, g: np.ndarray, x: np.ndarray) -> bool:
    """Compiled twin of :func:`solve_normal_equations` for one ``(6, 6)`` system: ``x`` ``(6,)``
    solving ``A x = -g`` regularised like :func:`regularize`; False, and a zero ``x``, for an
    unusable or singular system."""
    n = A.shape[0]
    trace = 0.0
    for k in range(n):
        trace += A[k, k]
    x[:] = 0.0
    if not trace > _TINY64:
        return False
    root = np.empty(n)
    for i in range(n):
        root[i] = math.sqrt(max(A[i, i], _TINY64))
    scaled = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            scaled[i, j] = A[i, j] / (root[i] * root[j])
    deficient = _lu_solve_in_place_twin(scaled.copy(), np.empty(0), x) < _RANK_TOLERANCE64
    M = A.copy()
    half = n // 2
    rotation = 0.0
    for k in range(half):
        rotation += A[k, k]
    # eps x the mean diagonal of each block (rotation, translation): they differ in units
    for k in range(n):
        block = rotation / half if k < half else (trace - rotation) / (n - half)
        M[k, k] += max(_EPS64 * block, _TINY64)
    if deficient:
        # unit eigenvalue for the null space of the Jacobi-scaled matrix: a zero step there
        values, vectors = np.linalg.eigh(scaled)
        for e in range(n):
            if values[e] <= math.sqrt(_EPS64):
                for i in range(n):
                    for j in range(n):
                        M[i, j] += root[i] * vectors[i, e] * vectors[j, e] * root[j]
    return _lu_solve_in_place_twin(M, -g.copy(), x) > 0.0


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
    center: Tensor | None = None,
    far: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``steps`` Levenberg-Marquardt steps with the correspondences and weights held fixed.

    Each step solves the damped normal equations; a pair accepts it when its cost falls
    (then damping / 10), else keeps its pose (damping * 10). Accept/reject is a per-pair
    ``torch.where``, so the batch never splits and gradients flow through accepted steps.

    Args:
        damping: ``(B,)`` current damping per pair (carried across ICP iterations).
        center, far: as :func:`gauss_newton_update` (``center`` follows the accepted steps).
    Returns:
        The accumulated ``(B, 4, 4)`` update, the new damping ``(B,)``, and usable ``(B,)``.
    """
    B = source.shape[0]
    if center is None:
        center = positive_weight_centroid(source, weights)
    eye = torch.eye(4, dtype=source.dtype, device=source.device).expand(B, 4, 4)
    # The state: the accumulated update, the moved points and normals, the pivot.
    start = _RigidLMState(eye, source, source_normals, center)

    def propose(x: _RigidLMState, damping: Tensor) -> LMTrial:
        delta, ok = gauss_newton_update(
            metric, x.points, x.normals, corr, weights, damping, x.center, far
        )
        n = None if x.normals is None else rotate_vectors(x.normals, delta)
        trial = _RigidLMState(
            delta @ x.update,
            transform_points(x.points, delta),
            n,
            transform_points(x.center[:, None], delta)[:, 0],
        )
        return LMTrial(trial, weighted_cost(metric, trial.points, n, corr, weights), ok, None)

    cost = weighted_cost(metric, source, source_normals, corr, weights)
    state, damping, _, usable = levenberg_marquardt(start, cost, damping, steps, propose)
    return state.update, damping, usable


# Levenberg-Marquardt damping stays within these bounds.
LM_DAMPING_RANGE = (1e-12, 1e12)


def marquardt_accept(
    new_cost: Tensor, cost: Tensor, damping: Tensor, ok: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Marquardt's rule, per pair: accept a trial whose cost ``(B,)`` is below the current
    ``cost`` (and that is ``ok``), then divide the damping ``(B,)`` by 10, else multiply it by 10.

    Returns the ``(B,)`` bool accept and the new damping. The choice is not differentiated; the
    callers apply it with ``torch.where``, so accepted steps stay differentiable.
    """
    accept = new_cost.detach() < cost.detach()
    if ok is not None:
        accept = accept & ok
    damping = torch.where(accept, damping / 10, damping * 10).clamp(*LM_DAMPING_RANGE)
    return accept, damping


class _RigidLMState(NamedTuple):
    update: Tensor  # (B, 4, 4) accumulated
    points: Tensor  # (B, N, 3) the source moved by it
    normals: Tensor | None  # (B, N, 3)
    center: Tensor  # (B, 3) the linearisation centre, moved by it


# What the loop carries: a tensor or a tuple of tensors (None entries allowed), batch first.
LMState = TypeVar("LMState")


class LMTrial(NamedTuple):
    """What ``propose`` returns to :func:`levenberg_marquardt`."""

    state: Any  # the trial state
    cost: Tensor  # (B,) its cost
    ok: Tensor | None  # (B,) bool, the pair's system was usable (None: all)
    cost_here: Tensor | None  # (B,) cost at the state it started from, when known for free


def _choose(accept: Tensor, trial: Any, current: Any) -> Any:
    """``trial`` where ``accept`` ``(B,)``, else ``current``: tensors, or tuples of them."""
    if isinstance(trial, Tensor):
        return torch.where(accept.reshape(-1, *([1] * (trial.dim() - 1))), trial, current)
    if trial is None:
        return None
    return type(trial)(*(_choose(accept, t, c) for t, c in zip(trial, current, strict=True)))


def levenberg_marquardt(
    state: LMState,
    cost: Tensor | None,
    damping: Tensor,
    steps: int,
    propose: Callable[[LMState, Tensor], LMTrial],
) -> tuple[LMState, Tensor, Tensor, Tensor]:
    """``steps`` Levenberg-Marquardt trials per pair: the one loop of the rigid
    (:func:`levenberg_marquardt_update`) and the non-rigid (:func:`block_levenberg_marquardt`)
    solvers.

    ``propose(state, damping)`` returns an :class:`LMTrial` from the damped normal equations at
    ``state``; each pair accepts its trial by :func:`marquardt_accept` (the batch never splits:
    ``torch.where``, so accepted steps stay differentiable). ``cost`` ``(B,)`` at ``state``, or
    None where ``propose`` reports it (it has the residuals there anyway). Returns the state,
    the damping ``(B,)``, the cost ``(B,)`` and ``(B,)`` bool: every trial's system was usable.
    """
    usable: Tensor | bool = True
    for _ in range(steps):
        trial, trial_cost, ok, here = propose(state, damping)
        if cost is None:
            cost = here
        assert cost is not None, "propose must report the cost when none is given"
        if ok is not None:
            usable = usable & ok
        accept, damping = marquardt_accept(trial_cost, cost, damping, ok)
        state = _choose(accept, trial, state)
        cost = torch.where(accept, trial_cost, cost)
    assert cost is not None, "levenberg_marquardt needs steps >= 1 or a cost"
    return state, damping, cost, torch.ones_like(cost, dtype=torch.bool) & usable


# --------------------------------------------------------------------------------------------
# Flat parameter vectors (non-rigid ICP): row-sparse residual blocks
# --------------------------------------------------------------------------------------------


@dataclass
class ResidualBlock:
    """A group of least-squares residual rows and their (row-sparse) Jacobian.

    Attributes:
        residuals: ``(B, R, D)`` residuals (already multiplied by the square root of their weight).
        jacobian: ``(B, R, D, Q)`` derivative of each row's residuals w.r.t. the ``Q`` parameters it
            depends on, or None when only the residuals were asked for (cost evaluation).
        index: ``(B, R, Q)`` long, the global parameter index of each local parameter; None means
            dense (``Q`` equals the model's ``P`` and local parameter ``q`` is global ``q``).
    """

    residuals: Tensor
    jacobian: Tensor | None = None
    index: Tensor | None = None

    def scaled(self, factor: float | Tensor) -> ResidualBlock:
        """The block for the cost scaled by ``factor`` (residuals and Jacobian by its sqrt)."""
        s = torch.as_tensor(factor, dtype=self.residuals.dtype, device=self.residuals.device).sqrt()
        jac = None if self.jacobian is None else self.jacobian * s
        return ResidualBlock(self.residuals * s, jac, self.index)

    def cost(self) -> Tensor:
        """``(B,)`` sum of squared residuals."""
        return (self.residuals**2).flatten(1).sum(1)


# Residual blocks at given parameters: (params (B, P), with_jacobian) -> blocks.
BlockFn = Callable[[Tensor, bool], list[ResidualBlock]]


def block_normal_equations(
    blocks: list[ResidualBlock], num_params: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Assemble ``H = J^T J`` ``(B, P, P)``, ``g = J^T r`` ``(B, P)`` and the cost ``(B,)``."""
    ref = blocks[0].residuals
    B, P = ref.shape[0], num_params
    H = ref.new_zeros(B, P * P)
    g = ref.new_zeros(B, P)
    cost = ref.new_zeros(B)
    for block in blocks:
        r, J, idx = block.residuals, block.jacobian, block.index
        if J is None:
            raise ValueError("block_normal_equations needs blocks with Jacobians")
        cost = cost + block.cost()
        if idx is None:
            Jf = J.flatten(1, 2)  # (B, R*D, P)
            H = H + (Jf.transpose(1, 2) @ Jf).reshape(B, P * P)
            g = g + (Jf.transpose(1, 2) @ r.reshape(B, -1, 1))[..., 0]
            continue
        H_local = torch.einsum("brdp,brdq->brpq", J, J)  # (B, R, Q, Q)
        g_local = torch.einsum("brdp,brd->brp", J, r)  # (B, R, Q)
        flat = (idx[..., :, None] * P + idx[..., None, :]).reshape(B, -1)
        H = H.scatter_add(1, flat, H_local.reshape(B, -1))
        g = g.scatter_add(1, idx.reshape(B, -1), g_local.reshape(B, -1))
    return H.reshape(B, P, P), g, cost


def block_cost(blocks: list[ResidualBlock]) -> Tensor:
    """``(B,)`` sum of squared residuals of all blocks."""
    return torch.stack([b.cost() for b in blocks]).sum(0)


def damped_solve(H: Tensor, g: Tensor, damping: Tensor | float) -> Tensor:
    """``delta`` ``(B, P)`` solving ``(H + damping * (diag(H) + eps)) delta = -g``.

    Marquardt's scaling by ``diag(H)`` keeps the step invariant to parameter units; the small
    ``eps`` (relative to the mean diagonal) makes parameters no residual constrains (e.g. the
    unobserved side of a graph with no regulariser) stay put instead of making ``H`` singular.
    A pair with an all-zero ``H`` (no residual at all: it lost every correspondence and has no
    regulariser) solves with the identity instead, so its step (0, as ``g = 0``) and the
    gradients through it stay finite.
    """
    diag = H.diagonal(dim1=-2, dim2=-1)
    mean = diag.mean(-1, keepdim=True)
    # The guard must stay a normal number: 1e-9 * tiny would be subnormal, its inverse inf.
    usable = mean.detach() > torch.finfo(H.dtype).tiny * 1e9
    eps = 1e-9 * torch.where(usable, mean, torch.ones_like(mean))
    lam = torch.as_tensor(damping, dtype=H.dtype, device=H.device).reshape(-1, 1)
    A = H + torch.diag_embed(lam * diag + eps)
    eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    A = torch.where(usable[..., None], A, eye)
    return -torch.linalg.solve(A, g[..., None])[..., 0]


def block_levenberg_marquardt(
    blocks_fn: BlockFn, params: Tensor, damping: Tensor, steps: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``steps`` Levenberg-Marquardt trials from ``params`` ``(B, P)``, per pair.

    A trial is accepted (and the damping divided by 10) if it lowers that pair's cost, else it is
    rejected and the damping multiplied by 10 (:func:`marquardt_accept`).

    Args:
        damping: ``(B,)`` current Marquardt damping (carried across ICP iterations).
    Returns:
        The change of ``params`` ``(B, P)``, ``damping`` ``(B,)``, cost ``(B,)`` at the new params.
    """
    P = params.shape[-1]

    def propose(current: Tensor, damping: Tensor) -> LMTrial:
        H, g, cost_here = block_normal_equations(blocks_fn(current, True), P)
        trial = current + damped_solve(H, g, damping)
        return LMTrial(trial, block_cost(blocks_fn(trial, False)), None, cost_here)

    current, damping, cost, _ = levenberg_marquardt(params, None, damping, steps, propose)
    return current - params, damping, cost
