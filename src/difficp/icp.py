"""The ICP loop: correspond -> weight / reject -> solve -> update -> stop, batched over pairs.

Every pair of the batch runs in lock-step; a pair that has met the stopping criteria (or lost
every correspondence) keeps its transform, by ``torch.where``, while the others go on.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from difficp.config import ICPConfig, resolve_config
from difficp.correspondence import Correspondences, DepthTarget
from difficp.geometry import (
    make_transform,
    rotate_vectors,
    se3_exp,
    se3_log,
    transform_points,
)
from difficp.inputs import Problem, prepare_problem
from difficp.metrics import Metric, get_metric
from difficp.solvers import linearization_pivot
from difficp.strategies.correspondences import for_target
from difficp.strategies.kernels import robust_weights
from difficp.strategies.solvers import SolveInput
from difficp.weighting import correspondence_weights, inlier_statistics

if TYPE_CHECKING:
    from difficp.fused import FusedSteps

# A pair needs this many weighted correspondences for a determined 6-DoF update.
MIN_CORRESPONDENCES = 3

# Singular values of the implicit system ``I - df/dxi`` (see :func:`_implicit_transform`) below
# this (absolute, and relative to the largest) are dropped. ``1 - sigma`` is how much of a
# perturbation along that direction one ICP step leaves: below 1e-4 the loop would need more
# than 1e4 iterations to undo it, so the forward pass never resolved that direction (a symmetry
# of the shape, or one the solvers' regularisation pins at ~1e-8 of the trace), and the exact
# inverse would amplify rounding noise by up to 1e16 (measured 6e9-8e10 on a sphere). Well-posed
# systems have sigma of order 0.1-1: their gradients are unchanged.
IMPLICIT_SINGULAR_TOL = 1e-4


@dataclass
class ICPResult:
    """Result of :func:`icp`. Batched inputs give batched fields; a single pair gives unbatched.

    Attributes:
        transform: ``(B, 4, 4)`` maps source into target: ``target ~ source @ R.T + t``.
        fitness: ``(B,)`` inlier correspondences (closer than ``max_distance``) / source points.
        inlier_rmse: ``(B,)`` RMSE of the inlier distances (Open3D's definition).
        iterations: ``(B,)`` int, ICP iterations each pair ran.
        converged: ``(B,)`` bool, met the relative fitness / RMSE criteria before
            ``max_iterations`` (False for a pair that lost all its correspondences).
        rmse_history: ``(B, K + 1)`` inlier RMSE at the start and after every iteration, when
            ``config.return_history`` (else None).
    """

    transform: Tensor
    fitness: Tensor
    inlier_rmse: Tensor
    iterations: Tensor
    converged: Tensor
    rmse_history: Tensor | None = None

    def to(self, dtype: torch.dtype) -> ICPResult:
        """The same result with float fields in ``dtype``."""
        return ICPResult(
            self.transform.to(dtype),
            self.fitness.to(dtype),
            self.inlier_rmse.to(dtype),
            self.iterations,
            self.converged,
            None if self.rmse_history is None else self.rmse_history.to(dtype),
        )

    def _squeeze(self) -> ICPResult:
        return ICPResult(
            self.transform[0],
            self.fitness[0],
            self.inlier_rmse[0],
            self.iterations[0],
            self.converged[0],
            None if self.rmse_history is None else self.rmse_history[0],
        )


@dataclass
class _State:
    """Per-pair loop state (all leading dimension B)."""

    transform: Tensor
    corr: Correspondences
    moved: Tensor
    moved_normals: Tensor | None
    fitness: Tensor
    rmse: Tensor


def correspond(
    problem: Problem, config: ICPConfig, transform: Tensor
) -> tuple[Correspondences, Tensor, Tensor | None]:
    """Step 2: move the source by ``transform`` ``(B, 4, 4)`` and find its partners.

    Returns the correspondences and the moved source points / normals ``(B, N, 3)``.
    """
    moved = transform_points(problem.source, transform)
    moved_normals = (
        None
        if problem.source_normals is None
        else rotate_vectors(problem.source_normals, transform)
    )
    strategy = for_target(config.correspondence, problem.target)
    corr = strategy.find(moved, problem.target, problem.source_mask, config.match_options)
    return corr, moved, moved_normals


def weigh(
    config: ICPConfig,
    metric: Metric,
    corr: Correspondences,
    moved: Tensor,
    moved_normals: Tensor | None,
) -> Tensor:
    """Steps 3-4: ``(B, N)`` weights (rejection x linear weights x robust IRLS weights)."""
    w = correspondence_weights(corr, moved_normals, config.weighting)
    if config.robust_kernel is not None:
        residual = metric.residuals(moved, moved_normals, corr).norm(dim=-1)
        w = w * robust_weights(residual, config.robust_kernel, config.kernel_scale)
    # Weights that underflowed to subnormals (a sigmoid far past its threshold) count as 0:
    # whether they do otherwise depends on how the exponential rounds (the compiled path's
    # does not underflow where torch.sigmoid does), and 3 of them would make a step.
    return torch.where(w >= torch.finfo(w.dtype).tiny, w, torch.zeros_like(w))


def solve(
    config: ICPConfig,
    metric: Metric,
    corr: Correspondences,
    moved: Tensor,
    moved_normals: Tensor | None,
    weights: Tensor,
    damping: Tensor,
    center: Tensor | None = None,
    far: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Step 5: the ``(B, 4, 4)`` update to left-multiply onto the transform, and new LM damping.

    ``center`` ``(B, 3)`` / ``far`` ``(B,)``: where the linearised solvers centre their normal
    equations and which pairs rotate about it (:func:`difficp.solvers.gauss_newton_update`).
    """
    x = SolveInput(metric, corr, moved, moved_normals, weights, center, far)
    return config.strategies.solver.compute_update(x, damping, config.lm_steps)


def orthonormalize(transform: Tensor) -> Tensor:
    """``transform`` ``(B, 4, 4)`` with its rotation block pulled back onto SO(3).

    Composing thousands of updates lets rounding drift the rotation off SO(3) (float32:
    orthonormality error 1e-4 after 1000 iterations). One Newton-Schulz step of the polar
    decomposition, ``R <- R (3 I - R^T R) / 2``, squares the error each iteration, so it never
    builds up; it is differentiable, costs two 3x3 products, and moves an orthonormal float64
    rotation only by rounding (Open3D parity is unchanged).
    """
    R = transform[..., :3, :3]
    eye = torch.eye(3, dtype=R.dtype, device=R.device)
    R = 0.5 * R @ (3 * eye - R.transpose(-1, -2) @ R)
    return make_transform(R, transform[..., :3, 3])


def _where(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return torch.where(mask.reshape(-1, *([1] * (a.dim() - 1))), a, b)


class ReferenceSteps:
    """The iterations in PyTorch (differentiable): :func:`correspond`, :func:`weigh`,
    :func:`solve` on ``(B, N)`` tensors. The compiled twin is :class:`difficp.fused.FusedSteps`."""

    def __init__(self, problem: Problem, config: ICPConfig) -> None:
        self.problem = problem
        self.config = config
        self.metric = config.strategies.metric
        self.dtype = problem.source.dtype
        self.mask = problem.source_mask[..., None].to(self.dtype)
        self.count = problem.source_counts.clamp_min(1)[:, None].to(self.dtype)
        with torch.no_grad():
            self.radius = source_radius(problem)

    def evaluate(self, transform: Tensor, active: Tensor) -> tuple[Tensor, Tensor, Any]:
        """Correspondences at ``transform``: fitness ``(B,)``, RMSE ``(B,)``, state for :meth:`step`."""
        corr, moved, moved_n = correspond(self.problem, self.config, transform)
        fitness, rmse = inlier_statistics(
            corr, self.problem.source_counts, self.config.max_distance
        )
        return fitness, rmse, (corr, moved, moved_n)

    def step(self, state: Any, damping: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The ``(B, 4, 4)`` update, new LM damping, and ``(B,)`` bool: enough correspondences."""
        corr, moved, moved_n = state
        w = weigh(self.config, self.metric, corr, moved, moved_n)
        enough = ((w.detach() > 0) & corr.valid).sum(1) >= MIN_CORRESPONDENCES
        center = (moved * self.mask).sum(1) / self.count
        far = linearization_pivot(center, self.radius)
        update, damping = solve(
            self.config, self.metric, corr, moved, moved_n, w, damping, center, far
        )
        return update, damping, enough


def source_radius(problem: Problem) -> Tensor:
    """``(B,)`` RMS distance of each source cloud's real points from their centroid (a rigid
    motion leaves it unchanged)."""
    mask = problem.source_mask[..., None].to(problem.source.dtype)
    count = problem.source_counts.clamp_min(1)[:, None].to(problem.source.dtype)
    source = problem.source.detach()
    mean = (source * mask).sum(1) / count
    return ((((source - mean[:, None]) ** 2) * mask).sum((1, 2)) / count[:, 0]).sqrt()


def run_loop(
    steps: ReferenceSteps | FusedSteps,
    init: Tensor,
    config: ICPConfig,
    rmse_tolerance: Tensor | None = None,
) -> tuple[ICPResult, Tensor]:
    """The iterations, with Open3D's stopping rule per pair. Returns the batched result (in the
    dtype of ``steps``) and the final LM damping. ``rmse_tolerance`` ``(B,)``: the RMSE change
    below which a pair may stop (default ``config.relative_rmse``; see :func:`rmse_tolerance`).
    """
    B = init.shape[0]
    device = init.device
    T = init.to(steps.dtype)
    active = torch.ones(B, dtype=torch.bool, device=device)
    fitness, rmse, state = steps.evaluate(T, active)
    history = [rmse]
    converged = torch.zeros(B, dtype=torch.bool, device=device)
    iterations = torch.zeros(B, dtype=torch.long, device=device)
    damping = torch.full((B,), config.lm_damping, dtype=T.dtype, device=device)
    tolerance = torch.full((B,), config.relative_rmse, dtype=rmse.dtype, device=device)
    if rmse_tolerance is not None:
        tolerance = rmse_tolerance.to(dtype=rmse.dtype, device=device)
    for _ in range(config.max_iterations):
        update, new_damping, enough = steps.step(state, damping)
        # A pair with too few weighted correspondences stops here with its last good transform.
        active = active & enough
        # Applied before the exit test: when every pair has just been lost, T stays an output of
        # this step's graph (with zero gradient through it), so backward() still works.
        T = _where(active, orthonormalize(update @ T), T)
        if not bool(active.any()):
            break
        damping = torch.where(active, new_damping, damping)
        new_fitness, new_rmse, state = steps.evaluate(T, active)
        iterations = iterations + active.long()
        done = (
            active
            & ((new_fitness - fitness).abs() < config.relative_fitness)
            & ((new_rmse - rmse).abs() < tolerance)
        )
        fitness = torch.where(active, new_fitness, fitness)
        rmse = torch.where(active, new_rmse, rmse)
        converged = converged | done
        active = active & ~done
        history.append(rmse)
        if not bool(active.any()):
            break
    result = ICPResult(
        transform=T,
        fitness=fitness,
        inlier_rmse=rmse,
        iterations=iterations,
        converged=converged,
        rmse_history=torch.stack(history, dim=1) if config.return_history else None,
    )
    return result, damping


# Absolute RMSE criteria above this fraction of a cloud's RMS radius are coarse (warned).
COARSE_CRITERIA = 1e-2


def rmse_tolerance(problem: Problem, config: ICPConfig) -> Tensor:
    """``(B,)`` the inlier-RMSE change below which each pair may stop.

    ``criteria_scale="absolute"``: ``relative_rmse`` (Open3D's), with a warning when that is
    coarser than ``COARSE_CRITERIA`` of a source cloud's RMS radius (tiny clouds would stop
    after a step or two, reporting convergence). ``"relative"``: ``relative_rmse`` times the
    radius.
    """
    with torch.no_grad():
        radius = source_radius(problem)
    if config.criteria_scale == "relative":
        return config.relative_rmse * radius
    if config.relative_rmse > 0 and bool((config.relative_rmse > COARSE_CRITERIA * radius).any()):
        smallest = float(radius.min())
        warnings.warn(
            f"ICPConfig.relative_rmse={config.relative_rmse:g} is coarse for a source cloud of "
            f"RMS radius {smallest:.3g} (the criteria are absolute, as in Open3D), so ICP may "
            "stop after a step or two; pass criteria_scale='relative' (the RMSE change is then "
            "divided by the cloud's radius) or a smaller relative_rmse",
            stacklevel=3,
        )
    return torch.full_like(radius, config.relative_rmse)


def _implicit_transform(
    problem: Problem, config: ICPConfig, converged_T: Tensor, damping: Tensor
) -> Tensor:
    """Re-attach gradients to a converged transform by the implicit function theorem.

    With ``T = exp(xi) T*`` and one ICP step ``f(xi, theta) = log(step(exp(xi) T*) T*^-1)`` (6-D,
    per pair), the converged transform is a fixed point ``xi* = f(xi*, theta)`` at ``xi* = 0``.
    Differentiating, ``d xi*/d theta = (I - df/dxi)^-1 df/dtheta``. We build one step's graph,
    form the ``(B, 6, 6)`` Jacobian ``df/dxi`` with six backward passes, and return
    ``exp(xi) T*`` with ``xi = (I - df/dxi)^+ (f - f.detach())``: its value is exactly ``T*``
    and its gradient is the implicit one. Memory and backward time do not depend on how many
    iterations the forward took.

    ``(I - df/dxi)^+`` is a pseudo-inverse that drops singular values below
    :data:`IMPLICIT_SINGULAR_TOL` (see there): a shape with a symmetry (sphere, plane, line)
    has a continuum of fixed points, and the minimum-norm derivative does not slide along it.
    A pair without enough correspondences at ``T*`` (lost) has no fixed point: it gets a zero
    gradient, and the rest of the batch exactly the gradient it would get alone.
    """
    metric = get_metric(config.metric)
    B = converged_T.shape[0]
    T_star = converged_T.detach()
    with torch.enable_grad():
        xi = torch.zeros(B, 6, dtype=T_star.dtype, device=T_star.device, requires_grad=True)
        T = se3_exp(xi) @ T_star
        corr, moved, moved_n = correspond(problem, config, T)
        w = weigh(config, metric, corr, moved, moved_n)
        # The loop's own test (ReferenceSteps.step): a pair below it took no step from T*.
        enough = ((w.detach() > 0) & corr.valid).sum(1) >= MIN_CORRESPONDENCES
        # LM's accept/reject makes its step the identity at a minimum (no step lowers the
        # cost), which hides the fixed point's sensitivity. Its undamped Gauss-Newton step has
        # the same fixed point (zero gradient), and the implicit derivative depends only on it.
        step_config = config.replace(solver="linear") if config.resolved_solver == "lm" else config
        update, _ = solve(step_config, metric, corr, moved, moved_n, w, damping)
        # T T*^-1 = exp(xi), so one step moves T* by update @ exp(xi).
        f = se3_log(update @ se3_exp(xi))
        rows = [
            torch.autograd.grad(f[:, k].sum(), xi, retain_graph=True, allow_unused=True)[0]
            for k in range(6)
        ]
        jac = torch.stack([torch.zeros_like(xi) if r is None else r for r in rows], dim=1)
    jac = jac.detach()
    ok = enough & torch.isfinite(jac).flatten(1).all(1)
    eye = torch.eye(6, dtype=jac.dtype, device=jac.device)
    # A lost pair's system is replaced by 0 (pseudo-inverse 0) before the SVD, so nothing it
    # holds (a singular or non-finite Jacobian) can reach the others' solves.
    system = torch.where(ok[:, None, None], eye - jac, torch.zeros_like(jac))
    inverse = torch.linalg.pinv(system, atol=IMPLICIT_SINGULAR_TOL, rtol=IMPLICIT_SINGULAR_TOL)
    # The where (not just the zero inverse) keeps a non-finite f of a lost pair out of the value.
    delta = torch.where(ok[:, None], f - f.detach(), torch.zeros_like(f))
    implicit_xi = (inverse @ delta[..., None])[..., 0]
    return se3_exp(implicit_xi) @ T_star


SEARCH_BACKENDS = ("auto", "kdtree", "brute_force", "compiled")

# Config options that may be tensors (and so carry gradients or be learnt).
_TENSOR_OPTIONS = (
    "temperature",
    "rejection_temperature",
    "max_distance",
    "max_normal_angle",
    "kernel_scale",
)


def _requires_grad(problem: Problem, config: ICPConfig) -> bool:
    """Whether anything the loop reads asks for a gradient."""
    if not torch.is_grad_enabled():
        return False
    target = problem.target
    tensors = [problem.source, problem.source_normals, problem.init]
    if isinstance(target, DepthTarget):
        tensors += [target.points, target.normals, target.intrinsics, target.world_to_camera]
    else:
        tensors += [target.points, target.normals]
    tensors += [getattr(config, name) for name in _TENSOR_OPTIONS]
    return any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def _choose_steps(
    problem: Problem, config: ICPConfig, search_backend: str, needs_grad: bool
) -> ReferenceSteps | FusedSteps:
    """The compiled fast path when it computes the same thing and no gradient is needed (or on
    request), else the PyTorch reference."""
    if search_backend in ("kdtree", "brute_force"):
        return ReferenceSteps(problem, config)
    if search_backend == "auto" and (needs_grad or config.correspondence != "nearest"):
        return ReferenceSteps(problem, config)  # without importing numba (~70 MB)
    from difficp.fused import FusedSteps, fused_supported

    reason = fused_supported(problem, config)
    if search_backend == "compiled":
        if needs_grad:
            reason = "it gives no gradients; use differentiation='implicit' or 'none'"
        if reason is not None:
            raise ValueError(f"search_backend='compiled' cannot run this problem: {reason}")
    if reason is None and not needs_grad:
        return FusedSteps(problem, config)
    return ReferenceSteps(problem, config)


def icp(
    source: Tensor,
    target: Tensor,
    init: Tensor | None = None,
    source_lengths: Tensor | None = None,
    target_lengths: Tensor | None = None,
    source_normals: Tensor | None = None,
    target_normals: Tensor | None = None,
    config: ICPConfig | None = None,
    *,
    intrinsics: Tensor | None = None,
    target_pose: Tensor | None = None,
    search_backend: str = "auto",
    **overrides: Any,
) -> ICPResult:
    """Register ``source`` to ``target`` by (differentiable) ICP.

    Args:
        source: ``(N, 3)`` or ``(B, N, 3)`` points, any float dtype / device.
        target: ``(M, 3)`` / ``(B, M, 3)`` points; with ``correspondence="projective"`` a depth map
            ``(H, W)`` / ``(B, H, W)`` (z-depth, 0 = invalid) seen by a pinhole camera.
        init: ``(4, 4)`` / ``(B, 4, 4)`` initial rigid source->target transform (identity).
        source_lengths, target_lengths: ``(B,)`` valid counts of padded batches.
        source_normals, target_normals: unit normals shaped like the points (for a depth-map target
            ``(B, H, W, 3)`` camera-frame normals; estimated from the depth map when omitted).
        config: :class:`ICPConfig`; ``**overrides`` replace its fields, e.g.
            ``icp(s, t, metric="point_to_plane", max_distance=0.05)``.
        intrinsics: ``(3, 3)`` / ``(B, 3, 3)`` pinhole matrix of the depth-map target.
        target_pose: ``(4, 4)`` / ``(B, 4, 4)`` camera-to-world pose of the depth-map target
            (identity: the result maps the source into the target camera frame).
        search_backend: how partners are found. ``"auto"`` (default): the compiled fast path
            (:mod:`difficp.fused`) when correspondences are hard nearest neighbours on the CPU
            and nothing needs a gradient, else a scipy KD-tree on the CPU and a chunked
            brute-force search on other devices. ``"kdtree"`` / ``"brute_force"`` force those
            (PyTorch reference path); ``"compiled"`` forces the fast path or raises.

    Returns:
        :class:`ICPResult`; a single (unbatched) pair gives unbatched fields.

    Raises:
        ValueError: bad input (NaN/inf, empty or mismatched shapes, non-rigid init, missing
            normals or intrinsics), naming the argument and the fix.
    """
    config = resolve_config(config, overrides)
    if search_backend not in SEARCH_BACKENDS:
        raise ValueError(f"search_backend must be one of {SEARCH_BACKENDS}, got {search_backend!r}")
    index_backend = "kdtree" if search_backend == "compiled" else search_backend
    grad_context = torch.no_grad() if config.differentiation == "none" else nullcontext()
    with grad_context:
        problem = prepare_problem(
            source,
            target,
            config,
            init,
            source_lengths,
            target_lengths,
            source_normals,
            target_normals,
            intrinsics,
            target_pose,
            index_backend,
        )
        loop_needs_grad = config.differentiation == "unroll" and _requires_grad(problem, config)
        steps = _choose_steps(problem, config, search_backend, loop_needs_grad)
        tolerance = rmse_tolerance(problem, config)
        if config.differentiation == "implicit":
            with torch.no_grad():
                result, damping = run_loop(steps, problem.init, config, tolerance)
            result.transform = _implicit_transform(
                problem,
                config,
                result.transform.to(problem.source.dtype),
                damping.to(problem.source.dtype),
            )
        else:
            result, _ = run_loop(steps, problem.init, config, tolerance)
    result = result.to(problem.result_dtype or problem.source.dtype)
    return result._squeeze() if problem.unbatched else result


class ICP(nn.Module):
    """:func:`icp` as a module: ``ICP(config)(source, target, init=..., ...)``.

    Tensor-valued options of the config (temperatures, thresholds) given as ``nn.Parameter``
    are registered, so an optimiser can learn them.
    """

    def __init__(self, config: ICPConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        self.config = resolve_config(config, overrides)
        for field in _TENSOR_OPTIONS:
            value = getattr(self.config, field)
            if isinstance(value, nn.Parameter):
                self.register_parameter(field, value)

    def forward(
        self, source: Tensor, target: Tensor, init: Tensor | None = None, **kwargs: Any
    ) -> ICPResult:
        return icp(source, target, init, config=self.config, **kwargs)

    def extra_repr(self) -> str:
        return repr(self.config)


__all__ = ["ICP", "ICPResult", "correspond", "icp", "solve", "weigh"]
