"""Rigid ICP: its steps (correspond -> weight / reject -> solve) and :func:`icp` / :class:`ICP`,
which run them through :func:`difficp.loop.run_loop`."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from difficp import express
from difficp.config import TENSOR_OPTIONS, ICPConfig, resolve_config
from difficp.correspondence import Correspondences, DepthTarget
from difficp.geometry import rotate_vectors, transform_points
from difficp.implicit import implicit_transform
from difficp.inputs import PointTarget, Problem, prepare_problem
from difficp.loop import (
    ICPResult,
    ProgressCallback,
    Steps,
    enough_correspondences,
    rmse_tolerance,
    run_loop,
    source_radius,
    step_tolerance,
)
from difficp.metrics import Metric
from difficp.solvers import linearization_pivot
from difficp.strategies.correspondences import for_target
from difficp.strategies.kernels import robust_weights
from difficp.strategies.solvers import SolveInput
from difficp.weighting import correspondence_weights, inlier_statistics


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
    corr = find_partners(moved, problem.source_mask, problem.target, config)
    if problem.source_covariances is not None and corr.covariances is not None:
        corr.covariances = combined_covariances(
            corr.covariances, problem.source_covariances, transform, problem.source_mask
        )
    corr.source_features = problem.source_features  # the colour terms of metric "colored"
    return corr, moved, moved_normals


def combined_covariances(
    partner: Tensor, source: Tensor, transform: Tensor, source_mask: Tensor
) -> Tensor:
    """GICP's ``C = S_q + R S_p R^T`` ``(B, N, 3, 3)``: the partners' covariances ``partner``
    plus the source points' ``source`` rotated by ``transform`` ``(B, 4, 4)``; the identity at
    padding points (``source_mask`` ``(B, N)`` False), so that every ``C`` can be factorised."""
    R = transform[:, None, :3, :3]
    C = partner + R @ source @ R.transpose(-1, -2)
    eye = torch.eye(3, dtype=C.dtype, device=C.device)
    return torch.where(source_mask[..., None, None], C, eye)


def find_partners(
    moved: Tensor, source_mask: Tensor, target: PointTarget | DepthTarget, config: ICPConfig
) -> Correspondences:
    """The partners of source points ``moved`` ``(B, N, 3)`` (already in the target's frame;
    ``source_mask`` ``(B, N)`` their real points) by ``config.correspondence``."""
    strategy = for_target(config.correspondence, target)
    corr = strategy.find(moved, target, source_mask, config.match_options)
    return corr


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


def solve(config: ICPConfig, x: SolveInput, damping: Tensor) -> tuple[Tensor, Tensor]:
    """Step 5: the ``(B, 4, 4)`` update to left-multiply onto the transform, and new LM damping
    ``(B,)``, by the config's solver from the weighted correspondences ``x`` (whose ``center`` /
    ``far`` say where the linearised solvers centre their normal equations and which pairs
    rotate about it: :func:`difficp.solvers.gauss_newton_update`)."""
    return config.strategies.solver.compute_update(x, damping, config.lm_steps)


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
        enough = enough_correspondences(corr.valid, w)
        center = (moved * self.mask).sum(1) / self.count
        far = linearization_pivot(center, self.radius)
        x = SolveInput(self.metric, corr, moved, moved_n, w, center, far)
        update, damping = solve(self.config, x, damping)
        return update, damping, enough


def fixed_point_step(
    problem: Problem, config: ICPConfig, damping: Tensor
) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """One differentiable ICP step as a function of the transform, for
    :func:`difficp.implicit.implicit_transform`: ``T`` ``(B, 4, 4)`` -> the ``(B, 4, 4)`` update
    and ``(B,)`` bool, the pair had enough correspondences to take it (the loop's own test:
    a pair below it took no step from ``T*``). The loop's :class:`ReferenceSteps`, with the
    solver's fixed-point solver where it names one."""
    # A solver whose step is not smooth at the fixed point (LM) names the one to differentiate.
    fixed = config.strategies.solver.fixed_point_solver
    steps = ReferenceSteps(problem, config if fixed is None else config.replace(solver=fixed))

    def step(transform: Tensor) -> tuple[Tensor, Tensor]:
        corr, moved, moved_n = correspond(problem, steps.config, transform)
        update, _, enough = steps.step((corr, moved, moved_n), damping)
        return update, enough

    return step


SEARCH_BACKENDS = ("auto", "kdtree", "brute_force", "compiled")


def _requires_grad(problem: Problem, config: ICPConfig) -> bool:
    """Whether anything the loop reads asks for a gradient."""
    if not torch.is_grad_enabled():
        return False
    target = problem.target
    tensors = [problem.source, problem.source_normals, problem.init]
    tensors += [problem.source_covariances, problem.source_features]
    if isinstance(target, DepthTarget):
        tensors += [target.points, target.normals, target.intrinsics, target.world_to_camera]
    else:
        tensors += [target.points, target.normals, target.covariances, target.features]
    tensors += [getattr(config, name) for name in TENSOR_OPTIONS]
    return any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def _choose_steps(
    problem: Problem, config: ICPConfig, search_backend: str, needs_grad: bool
) -> Steps:
    """The compiled fast path when it computes the same thing and no gradient is needed (or on
    request), else the PyTorch reference."""
    if search_backend in ("kdtree", "brute_force"):
        return ReferenceSteps(problem, config)
    compiled = for_target(config.correspondence, problem.target).fused_reason is None
    if search_backend == "auto" and (needs_grad or not compiled):
        return ReferenceSteps(problem, config)  # without importing numba (~70 MB)
    # Imported here, not at the top: importing difficp must not load numba (~70 MB).
    from difficp.fused import compile_now, fused_steps, fused_supported

    reason = fused_supported(problem, config)
    if search_backend == "compiled":
        if needs_grad:
            reason = "it gives no gradients; use differentiation='implicit' or 'none'"
        if reason is not None:
            raise ValueError(f"search_backend='compiled' cannot run this problem: {reason}")
    # "auto" in a fresh environment: the PyTorch path while the fast path compiles
    if reason is None and not needs_grad and (search_backend == "compiled" or compile_now(problem)):
        return fused_steps(problem, config)
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
    progress: ProgressCallback | None = None,
    source_covariances: Tensor | None = None,
    target_covariances: Tensor | None = None,
    source_colors: Tensor | None = None,
    target_colors: Tensor | None = None,
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
        source_colors, target_colors: RGB in ``[0, 1]`` shaped like the points, for (and only
            for) ``metric="colored"``; gradients flow into them.
        search_backend: how partners are found. ``"auto"`` (default): the compiled fast path
            (:mod:`difficp.fused`) when correspondences are hard (nearest or projective) on the CPU
            and nothing needs a gradient, else a scipy KD-tree on the CPU and a chunked
            brute-force search on other devices. ``"kdtree"`` / ``"brute_force"`` force those
            (PyTorch reference path); ``"compiled"`` forces the fast path or raises. A small
            problem on the fast path (at most 4096 source points in all, no lengths) goes
            straight to one compiled call
            (:mod:`difficp.express`), with the same result.
        progress: called with a :class:`~difficp.loop.Progress` (iteration, fitness, inlier
            RMSE, pairs still active) after the first correspondences and after every
            iteration, e.g. to show progress of a long run (``difficp register`` does).
        source_covariances, target_covariances: ``(N, 3, 3)`` / ``(B, N, 3, 3)`` (and ``M``)
            symmetric positive-definite per-point covariances of ``metric="gicp"`` (estimated
            by :func:`difficp.estimate_covariances` with ``covariance_k`` neighbours when
            omitted; pass them to reuse a cloud's covariances across calls).

    Returns:
        :class:`ICPResult`; a single (unbatched) pair gives unbatched fields.

    Raises:
        ValueError: bad input (NaN/inf, empty or mismatched shapes, non-rigid init, missing
            normals, colours or intrinsics), naming the argument and the fix.
    """
    config = resolve_config(config, overrides)
    if search_backend not in SEARCH_BACKENDS:
        raise ValueError(f"search_backend must be one of {SEARCH_BACKENDS}, got {search_backend!r}")
    if express.may_take(search_backend, source, progress, source_lengths, target_lengths):
        others = (intrinsics, target_pose, source_covariances, target_covariances)
        if all(value is None for value in (*others, source_colors, target_colors)):
            result = express.express_icp(
                source, target, init, source_normals, target_normals, config, search_backend
            )
            if result is not None:
                return result
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
            source_covariances,
            target_covariances,
            source_colors,
            target_colors,
        )
        loop_needs_grad = config.differentiation == "unroll" and _requires_grad(problem, config)
        steps = _choose_steps(problem, config, search_backend, loop_needs_grad)
        tolerance = rmse_tolerance(problem, config)
        small_step = step_tolerance(problem, config)
        if config.differentiation == "implicit":
            with torch.no_grad():
                loop = run_loop(
                    steps, problem.init, config, tolerance, small_step, progress=progress
                )
            dtype = problem.source.dtype
            step = fixed_point_step(problem, config, loop.damping.to(dtype))
            loop.value = implicit_transform(step, loop.value.to(dtype))
        else:
            loop = run_loop(steps, problem.init, config, tolerance, small_step, progress=progress)
        result = ICPResult.from_loop(loop)
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
        for field in TENSOR_OPTIONS:
            value = getattr(self.config, field)
            if isinstance(value, nn.Parameter):
                self.register_parameter(field, value)

    def forward(
        self, source: Tensor, target: Tensor, init: Tensor | None = None, **kwargs: Any
    ) -> ICPResult:
        return icp(source, target, init, config=self.config, **kwargs)

    def extra_repr(self) -> str:
        return repr(self.config)


__all__ = ["ICP", "ICPResult", "correspond", "find_partners", "icp", "solve", "weigh"]
