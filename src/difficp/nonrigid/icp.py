"""Non-rigid ICP: correspond -> weight / reject -> Gauss-Newton / LM step on a deformation model.

The same loop as rigid ICP (:func:`difficp.loop.run_loop`, driven by :class:`NonrigidSteps`), with
the same correspondence, weighting, rejection and robust-kernel code and the same
:class:`~difficp.ICPConfig`, but the update is a (damped) Gauss-Newton step on the parameters of a :class:`DeformationModel` instead of a rigid
6-D step. The data residual of source point ``i`` is the metric's residual at the deformed point
``x_i(params)`` against its (fixed, for the step) partner; its Jacobian is the metric's derivative
in the point (``I`` for point-to-point, ``n^T`` for point-to-plane, ``(n_p + n_q)^T`` for symmetric,
normals held fixed) times the model's point Jacobian.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from difficp.config import ICPConfig, resolve_config
from difficp.correspondence import Correspondences
from difficp.implicit import implicit_params
from difficp.inputs import Problem, prepare_problem
from difficp.loop import enough_correspondences, rmse_tolerance, run_loop
from difficp.metrics import Metric, get_metric
from difficp.nonrigid.deformation_graph import EmbeddedDeformationGraph
from difficp.nonrigid.model import DeformationModel, ResidualBlock
from difficp.nonrigid.rigid import RigidModel
from difficp.registration import find_partners, weigh
from difficp.solvers import block_normal_equations
from difficp.strategies.solvers import SOLVERS, Solver
from difficp.weighting import inlier_statistics

Schedule = Callable[[int], float] | Sequence[float] | None
# Extra per-point weights from the deformed points and normals: (B, N, 3), (B, N, 3)|None -> (B, N)
PointWeightFn = Callable[[Tensor, Tensor | None], Tensor]


@dataclass
class NonrigidICPResult:
    """Result of :func:`nonrigid_icp` (batched fields; unbatched for a single ``(N, 3)`` source).

    Attributes:
        params: ``(B, P)`` fitted model parameters.
        points: ``(B, N, 3)`` the deformed source ``model.deform(params)``.
        fitness: ``(B,)`` inlier correspondences (closer than ``max_distance``) / source points.
        inlier_rmse: ``(B,)`` RMSE of the inlier distances.
        iterations: ``(B,)`` int, iterations each pair ran.
        converged: ``(B,)`` bool, met the relative fitness / RMSE criteria.
        cost: ``(B,)`` final objective (weighted data + regularisers) of the last step.
        rmse_history: ``(B, K + 1)`` inlier RMSE at the start and after each iteration, when
            ``config.return_history``.
        transform: ``(B, 4, 4)`` when the model has a ``transform(params)`` (rigid), else None.
    """

    params: Tensor
    points: Tensor
    fitness: Tensor
    inlier_rmse: Tensor
    iterations: Tensor
    converged: Tensor
    cost: Tensor
    rmse_history: Tensor | None = None
    transform: Tensor | None = None

    def _squeeze(self) -> NonrigidICPResult:
        first: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            first[f.name] = None if value is None else value[0]
        return NonrigidICPResult(**first)


def _schedule_value(schedule: Schedule, iteration: int) -> float:
    if schedule is None:
        return 1.0
    if callable(schedule):
        return float(schedule(iteration))
    return float(schedule[min(iteration, len(schedule) - 1)])


def _schedule_length(schedule: Schedule) -> int:
    """Iterations before which the schedule may still change (no early stop before)."""
    if schedule is None or callable(schedule):
        return 0
    return len(schedule)


def _sqrt_weights(weights: Tensor) -> Tensor:
    """``(B, N)`` square roots of the correspondence weights, with a zero (not NaN) gradient
    where a weight is 0.

    ``sqrt``'s derivative is infinite at 0, and a rejected or lost point (weight exactly 0, whose
    own derivative is 0) would send ``0 * inf = NaN`` into the whole backward pass. The normal
    equations use ``sqrt(w)^2 = w``, whose derivative at ``w = 0`` multiplies ``dw = 0``: dropping
    it changes nothing else.
    """
    positive = weights > 0
    safe = torch.where(positive, weights, torch.ones_like(weights))
    return torch.where(positive, safe.sqrt(), torch.zeros_like(weights))


def _data_blocks(
    model: DeformationModel,
    metric: Metric,
    params: Tensor,
    corr: Correspondences,
    sqrt_w: Tensor,
    with_jacobian: bool,
    point_weight: float = 0.0,
) -> list[ResidualBlock]:
    """The weighted data residuals ``(B, N, m)`` at ``params`` against fixed partners ``corr``,
    plus ``point_weight`` times point-to-point residuals when that is positive."""
    x = model.deform(params)
    n = model.deform_normals(params)
    metrics = [(metric, 1.0)]
    if point_weight > 0 and metric.name != "point_to_point":
        metrics.append((get_metric("point_to_point"), point_weight))
    values, index = model.point_jacobian(params) if with_jacobian else (None, None)
    blocks = []
    for m, weight in metrics:
        sw = sqrt_w * weight**0.5
        r = m.residuals(x, n, corr) * sw[..., None]
        if values is None:
            blocks.append(ResidualBlock(r))
            continue
        # d r / d x: the translation columns of the metric's rigid-step Jacobian.
        dr_dx = m.jacobian(x, n, corr)[..., 3:] * sw[..., None, None]  # (B, N, m, 3)
        blocks.append(ResidualBlock(r, dr_dx @ values, index))
    return blocks


def _step(
    model: DeformationModel,
    metric: Metric,
    config: ICPConfig,
    params: Tensor,
    corr: Correspondences,
    weights: Tensor,
    reg_scale: float,
    damping: Tensor,
    point_weight: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """One solver update of ``params`` with correspondences fixed: the ``(B, P)`` change of the
    parameters, the new damping ``(B,)`` and the cost ``(B,)``."""
    sqrt_w = _sqrt_weights(weights)

    def blocks(p: Tensor, with_jacobian: bool) -> list[ResidualBlock]:
        regs = [b.scaled(reg_scale) for b in model.regularizers(p, with_jacobian)]
        data = _data_blocks(model, metric, p, corr, sqrt_w, with_jacobian, point_weight)
        return [*data, *regs]

    solver = nonrigid_solver(config)
    return solver.compute_param_update(blocks, params, damping, config.lm_steps)


def nonrigid_solver(config: ICPConfig) -> Solver:
    """The solver strategy of non-rigid ICP: ``config.solver``, Gauss-Newton (``"linear"``)
    when None (whatever the metric: the rigid default ``"svd"`` fits no deformation model).

    Raises:
        ValueError: the solver cannot fit a deformation model (its ``nonrigid_reason``).
    """
    solver = SOLVERS[config.solver or "linear"]
    if solver.nonrigid_reason is not None:
        raise ValueError(solver.nonrigid_reason)
    return solver


def _correspond(
    problem: Problem, config: ICPConfig, model: DeformationModel, params: Tensor
) -> tuple[Correspondences, Tensor, Tensor | None]:
    """Deform the source by ``params`` ``(B, P)`` and find its partners (the rigid ICP's step 2).

    Returns the correspondences and the deformed source points / normals ``(B, N, 3)``.
    """
    moved = model.deform(params)
    moved_normals = model.deform_normals(params)
    corr = find_partners(moved, problem.source_mask, problem.target, config)
    return corr, moved, moved_normals


class NonrigidSteps:
    """The :class:`~difficp.loop.Steps` of non-rigid ICP: the value is the ``(B, P)`` parameters
    of ``model``, an update is added to it (:func:`_add`).

    Also records what :class:`NonrigidICPResult` reports beyond the loop: the cost of every step
    and the deformed source at the last evaluation.
    """

    def __init__(
        self,
        problem: Problem,
        config: ICPConfig,
        model: DeformationModel,
        schedule: Schedule,
        point_weight: float,
        source_weights: PointWeightFn | None = None,
    ) -> None:
        self.problem = problem
        self.config = config
        self.model = model
        self.metric = config.strategies.metric
        self.schedule = schedule
        self.point_weight = point_weight
        self.source_weights = source_weights
        self.dtype = problem.source.dtype
        self.costs: list[Tensor] = []  # (B,) cost of each step, in order
        self.points: Tensor | None = None  # (B, N, 3) deformed source at the last evaluation

    def evaluate(self, params: Tensor, active: Tensor) -> tuple[Tensor, Tensor, Any]:
        corr, moved, moved_n = _correspond(self.problem, self.config, self.model, params)
        self.points = moved
        counts = self.problem.source_counts
        fitness, rmse = inlier_statistics(corr, counts, self.config.max_distance)
        return fitness, rmse, (params, corr, moved, moved_n)

    def step(self, state: Any, damping: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        params, corr, moved, moved_n = state
        w = self.weights(corr, moved, moved_n)
        enough = enough_correspondences(corr.valid, w)
        reg_scale = _schedule_value(self.schedule, len(self.costs))
        update, damping, cost = _step(
            self.model,
            self.metric,
            self.config,
            params,
            corr,
            w,
            reg_scale,
            damping,
            self.point_weight,
        )
        self.costs.append(cost)
        return update, damping, enough

    def weights(self, corr: Correspondences, moved: Tensor, moved_n: Tensor | None) -> Tensor:
        """``(B, N)`` the rigid ICP's weights times ``source_weights``."""
        w = weigh(self.config, self.metric, corr, moved, moved_n)
        if self.source_weights is not None:
            w = w * self.source_weights(moved, moved_n)
        return w

    def final_cost(self, iterations: Tensor) -> Tensor:
        """``(B,)`` the cost of each pair's last applied step (0 before any): a pair that ran
        ``k`` iterations applied exactly the first ``k`` steps."""
        if not self.costs:
            return torch.zeros(iterations.shape, dtype=self.dtype, device=iterations.device)
        costs = torch.stack(self.costs, 1)  # (B, K)
        last = costs.gather(1, (iterations - 1).clamp_min(0)[:, None])[:, 0]
        return torch.where(iterations > 0, last, torch.zeros_like(last))

    def implicit(self, params_star: Tensor, iterations: int) -> Tensor:
        """``params_star`` ``(B, P)`` with the implicit gradient of the fixed point
        (:func:`difficp.implicit.implicit_params`), regularisers scaled as in its last step."""
        scale = _schedule_value(self.schedule, max(iterations - 1, 0))

        def system(p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            corr, moved, moved_n = _correspond(self.problem, self.config, self.model, p)
            w = self.weights(corr, moved, moved_n)
            sqrt_w = _sqrt_weights(w)
            regs = [b.scaled(scale) for b in self.model.regularizers(p, True)]
            data = _data_blocks(self.model, self.metric, p, corr, sqrt_w, True, self.point_weight)
            H, g, _ = block_normal_equations([*data, *regs], p.shape[-1])
            return H, g, enough_correspondences(corr.valid, w)

        return implicit_params(system, params_star)


def _add(update: Tensor, params: Tensor) -> Tensor:
    """Non-rigid ICP's update rule: parameters ``(B, P)`` plus the step ``(B, P)``."""
    return params + update


def _run(
    steps: NonrigidSteps, params: Tensor, schedule: Schedule, tolerance: Tensor
) -> NonrigidICPResult:
    loop = run_loop(
        steps,
        params,
        steps.config,
        tolerance,
        apply=_add,
        min_iterations=_schedule_length(schedule),
    )
    model = steps.model
    assert steps.points is not None
    return NonrigidICPResult(
        params=loop.value,
        points=steps.points,
        fitness=loop.fitness,
        inlier_rmse=loop.inlier_rmse,
        iterations=loop.iterations,
        converged=loop.converged,
        cost=steps.final_cost(loop.iterations),
        rmse_history=loop.rmse_history,
        transform=model.transform(loop.value) if hasattr(model, "transform") else None,
    )


def build_model(
    kind: str,
    source: Tensor,
    source_normals: Tensor | None = None,
    source_lengths: Tensor | None = None,
    **options: Any,
) -> DeformationModel:
    """A built-in model by name: ``"rigid"`` or ``"graph"`` (embedded deformation graph)."""
    if kind == "rigid":
        return RigidModel(source, source_normals=source_normals, lengths=source_lengths, **options)
    if kind in ("graph", "embedded_deformation"):
        return EmbeddedDeformationGraph(
            source, source_normals=source_normals, lengths=source_lengths, **options
        )
    raise ValueError(f"unknown model {kind!r}; use 'rigid', 'graph' or a DeformationModel instance")


def nonrigid_icp(
    source: Tensor | None,
    target: Tensor,
    model: DeformationModel | str = "graph",
    config: ICPConfig | None = None,
    *,
    source_normals: Tensor | None = None,
    source_lengths: Tensor | None = None,
    target_normals: Tensor | None = None,
    target_lengths: Tensor | None = None,
    intrinsics: Tensor | None = None,
    target_pose: Tensor | None = None,
    init_params: Tensor | None = None,
    regularizer_schedule: Schedule = None,
    point_weight: float = 0.0,
    source_weights: PointWeightFn | None = None,
    model_options: dict[str, Any] | None = None,
    search_backend: str = "auto",
    **overrides: Any,
) -> NonrigidICPResult:
    """Fit a deformation model of ``source`` to ``target`` by non-rigid ICP.

    Args:
        source: ``(N, 3)`` / ``(B, N, 3)`` source points; used to build the model when ``model``
            is a name, checked against ``model.rest_points`` otherwise (None: take the model's).
        target: ``(M, 3)`` / ``(B, M, 3)`` points, or a depth map with
            ``correspondence="projective"`` (then ``intrinsics``, ``target_pose`` as in rigid ICP).
        model: a :class:`DeformationModel`, or ``"rigid"`` / ``"graph"`` (built from ``source``
            with ``model_options``, e.g. ``{"num_nodes": 64}``).
        config: :class:`~difficp.ICPConfig`; ``**overrides`` replace its fields. ``solver``:
            ``"linear"`` or None (one Gauss-Newton step per iteration) or ``"lm"`` (``lm_steps``
            Levenberg-Marquardt trials); ``"svd"`` (rigid Procrustes) is refused.
            ``differentiation``: ``"unroll"`` (backpropagate through every step), ``"implicit"``
            (Gauss-Newton implicit gradient of the converged parameters) or ``"none"``.
        source_normals, source_lengths, target_normals, target_lengths: as in :func:`difficp.icp`.
        init_params: ``(B, P)`` starting parameters (default ``model.initial_params()``).
        regularizer_schedule: factor on the regularisers per iteration, a sequence (last value
            repeats) or a function of the iteration; e.g. start stiff and relax, as in Amberg et
            al.'s optimal-step non-rigid ICP. The loop does not stop before a sequence ends.
        point_weight: add this times the point-to-point residuals to a point-to-plane or
            symmetric metric. Point-to-plane alone lets a deformable surface slide along itself
            (on a tube, along and around its axis) at no cost; a small point term pins it.
        source_weights: optional ``f(points, normals) -> (B, N)`` factor on each deformed source
            point's correspondence weight, e.g. visibility from known cameras in a partial scan
            (points facing away from every camera cannot have a partner in the scan).

    Returns:
        :class:`NonrigidICPResult`.
    """
    config = resolve_config(config, overrides)
    nonrigid_solver(config)  # refuses one that fits no deformation model, before any work
    if config.stops_on_small_steps:
        raise ValueError(
            "translation_tolerance / rotation_tolerance stop a rigid pair on a small rigid "
            "step; non-rigid ICP steps on model parameters: use relative_fitness / relative_rmse"
        )
    if isinstance(model, str):
        if source is None:
            raise ValueError(f"model={model!r} is built from the source; pass source=(N, 3) points")
        model = build_model(model, source, source_normals, source_lengths, **(model_options or {}))
    elif source is not None and tuple(source.shape[-2:]) != tuple(model.rest_points.shape[-2:]):
        raise ValueError(
            f"source has shape {tuple(source.shape)} but the model was built on "
            f"{tuple(model.rest_points.shape)}; pass source=None to use the model's points"
        )
    if config.needs_source_normals and model.rest_normals is None:
        raise ValueError(
            "this configuration needs source normals: build the model with source_normals="
        )
    grad_context = torch.no_grad() if config.differentiation == "none" else nullcontext()
    with grad_context:
        problem = prepare_problem(
            model.rest_points,
            target,
            config,
            None,
            model.lengths,
            target_lengths,
            model.rest_normals,
            target_normals,
            intrinsics,
            target_pose,
            search_backend,
        )
        params = model.initial_params() if init_params is None else init_params
        params = params.to(problem.source.dtype)
        if params.shape != (problem.source.shape[0], model.num_params):
            raise ValueError(
                f"init_params must have shape {(problem.source.shape[0], model.num_params)}, "
                f"got {tuple(params.shape)}"
            )
        steps = NonrigidSteps(
            problem, config, model, regularizer_schedule, point_weight, source_weights
        )
        # criteria_scale="relative": the RMSE criterion in units of the rest source's radius.
        tolerance = rmse_tolerance(problem, config)
        if config.differentiation == "implicit":
            with torch.no_grad():
                result = _run(steps, params, regularizer_schedule, tolerance)
            result.params = steps.implicit(result.params, int(result.iterations.max()))
            result.points = model.deform(result.params)
            if result.transform is not None:
                result.transform = model.transform(result.params)  # type: ignore[attr-defined]
        else:
            result = _run(steps, params, regularizer_schedule, tolerance)
    return result._squeeze() if model.unbatched else result


__all__ = ["NonrigidICPResult", "build_model", "nonrigid_icp"]
