"""Non-rigid ICP: correspond -> weight / reject -> Gauss-Newton / LM step on a deformation model.

The same loop as rigid ICP (:mod:`difficp.icp`), with the same correspondence, weighting,
rejection and robust-kernel code and the same :class:`~difficp.ICPConfig`, but the update is a
(damped) Gauss-Newton step on the parameters of a :class:`DeformationModel` instead of a rigid
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

from difficp.config import ICPConfig
from difficp.correspondence import Correspondences
from difficp.icp import correspond, weigh
from difficp.inputs import Problem, prepare_problem
from difficp.metrics import Metric, get_metric
from difficp.nonrigid.model import DeformationModel, ResidualBlock
from difficp.nonrigid.solver import damped_solve, levenberg_marquardt, normal_equations
from difficp.weighting import inlier_statistics

# Fewest weighted correspondences for a pair to take a step.
MIN_CORRESPONDENCES = 3

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
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return NonrigidICPResult(**{k: None if v is None else v[0] for k, v in values.items()})


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


def _enough(corr: Correspondences, weights: Tensor) -> Tensor:
    """``(B,)`` bool: the pair has at least :data:`MIN_CORRESPONDENCES` weighted partners."""
    return ((weights.detach() > 0) & corr.valid).sum(1) >= MIN_CORRESPONDENCES


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
    """One solver update of ``params`` with correspondences fixed. Returns params, damping, cost."""
    sqrt_w = _sqrt_weights(weights)

    def blocks(p: Tensor, with_jacobian: bool) -> list[ResidualBlock]:
        regs = [b.scaled(reg_scale) for b in model.regularizers(p, with_jacobian)]
        data = _data_blocks(model, metric, p, corr, sqrt_w, with_jacobian, point_weight)
        return [*data, *regs]

    if config.solver == "lm":
        return levenberg_marquardt(blocks, params, damping, config.lm_steps)
    H, g, cost = normal_equations(blocks(params, True), params.shape[-1])
    return params + damped_solve(H, g, 0.0), damping, cost


def _correspond(problem: Problem, config: ICPConfig, model: DeformationModel, params: Tensor):
    """Deform the source and find partners (the rigid ICP's step 2, at the identity)."""
    moved = dataclasses.replace(
        problem, source=model.deform(params), source_normals=model.deform_normals(params)
    )
    eye = torch.eye(4, dtype=params.dtype, device=params.device).expand(params.shape[0], 4, 4)
    return correspond(moved, config, eye)


def _run(
    problem: Problem,
    config: ICPConfig,
    model: DeformationModel,
    params: Tensor,
    schedule: Schedule,
    metric: Metric,
    point_weight: float,
    source_weights: PointWeightFn | None = None,
) -> tuple[NonrigidICPResult, Tensor]:
    B = params.shape[0]
    device = params.device
    corr, moved, moved_n = _correspond(problem, config, model, params)
    fitness, rmse = inlier_statistics(corr, problem.source_counts, config.max_distance)
    history = [rmse]
    active = torch.ones(B, dtype=torch.bool, device=device)
    converged = torch.zeros(B, dtype=torch.bool, device=device)
    iterations = torch.zeros(B, dtype=torch.long, device=device)
    damping = torch.full((B,), config.lm_damping, dtype=params.dtype, device=device)
    cost = params.new_zeros(B)
    no_stop_before = _schedule_length(schedule)
    for it in range(config.max_iterations):
        w = weigh(config, metric, corr, moved, moved_n)
        if source_weights is not None:
            w = w * source_weights(moved, moved_n)
        active = active & _enough(corr, w)
        new_params, new_damping, new_cost = _step(
            model,
            metric,
            config,
            params,
            corr,
            w,
            _schedule_value(schedule, it),
            damping,
            point_weight,
        )
        # Applied before the exit test: when every pair has just been lost, params stay an output
        # of this step's graph (with zero gradient through it), so backward() still works.
        params = torch.where(active[:, None], new_params, params)
        if not bool(active.any()):
            break
        damping = torch.where(active, new_damping, damping)
        cost = torch.where(active, new_cost, cost)
        corr, moved, moved_n = _correspond(problem, config, model, params)
        new_fitness, new_rmse = inlier_statistics(corr, problem.source_counts, config.max_distance)
        iterations = iterations + active.long()
        done = (
            active
            & ((new_fitness - fitness).abs() < config.relative_fitness)
            & ((new_rmse - rmse).abs() < config.relative_rmse)
        )
        if it + 1 < no_stop_before:  # the regulariser weights are still changing
            done = torch.zeros_like(done)
        fitness = torch.where(active, new_fitness, fitness)
        rmse = torch.where(active, new_rmse, rmse)
        converged = converged | done
        active = active & ~done
        history.append(rmse)
        if not bool(active.any()):
            break
    transform = model.transform(params) if hasattr(model, "transform") else None
    result = NonrigidICPResult(
        params=params,
        points=moved,
        fitness=fitness,
        inlier_rmse=rmse,
        iterations=iterations,
        converged=converged,
        cost=cost,
        rmse_history=torch.stack(history, 1) if config.return_history else None,
        transform=transform,
    )
    return result, damping


def _implicit_params(
    problem: Problem,
    config: ICPConfig,
    model: DeformationModel,
    params_star: Tensor,
    schedule: Schedule,
    metric: Metric,
    iterations: int,
    point_weight: float,
    source_weights: PointWeightFn | None = None,
) -> Tensor:
    """Re-attach gradients to converged parameters by the implicit function theorem.

    At a converged ``p*`` the gradient ``g(p*, inputs) = J^T r`` vanishes, so
    ``dp*/dinputs = -(dg/dp)^-1 dg/dinputs``. With the Gauss-Newton approximation ``dg/dp ~ H``
    this is the gradient of one step ``p* - H^-1 g(p*, inputs)`` with ``H`` held constant: its
    value is ``p*`` (up to the remaining gradient) and memory does not grow with the iterations.
    A pair without enough correspondences at ``p*`` (lost) has no fixed point: it keeps ``p*``
    with a zero gradient, and the rest of the batch gets exactly the gradient it would get alone.
    """
    p = params_star.detach()
    corr, moved, moved_n = _correspond(problem, config, model, p)
    w = weigh(config, metric, corr, moved, moved_n)
    if source_weights is not None:
        w = w * source_weights(moved, moved_n)
    sqrt_w = _sqrt_weights(w)
    scale = _schedule_value(schedule, max(iterations - 1, 0))
    regs = [b.scaled(scale) for b in model.regularizers(p, True)]
    data = _data_blocks(model, metric, p, corr, sqrt_w, True, point_weight)
    H, g, _ = normal_equations([*data, *regs], p.shape[-1])
    # A lost pair's H may be all zero: its solve divides by the tiny diagonal guard, and even a
    # zero gradient through it would overflow, so it takes no step and gets none through it.
    return torch.where(_enough(corr, w)[:, None], p + damped_solve(H.detach(), g, 0.0), p)


def build_model(
    kind: str,
    source: Tensor,
    source_normals: Tensor | None = None,
    source_lengths: Tensor | None = None,
    **options: Any,
) -> DeformationModel:
    """A built-in model by name: ``"rigid"`` or ``"graph"`` (embedded deformation graph)."""
    if kind == "rigid":
        from difficp.nonrigid.rigid import RigidModel

        return RigidModel(source, source_normals=source_normals, lengths=source_lengths, **options)
    if kind in ("graph", "embedded_deformation"):
        from difficp.nonrigid.deformation_graph import EmbeddedDeformationGraph

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
        config: :class:`~difficp.ICPConfig`; ``**overrides`` replace its fields. ``solver="lm"``
            runs ``lm_steps`` Levenberg-Marquardt trials per iteration, anything else one
            Gauss-Newton step (``"svd"``, the rigid point-to-point default, has no non-rigid
            meaning and also means Gauss-Newton). ``differentiation``: ``"unroll"``
            (backpropagate through every step), ``"implicit"`` (Gauss-Newton implicit gradient of
            the converged parameters) or ``"none"``.
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
    config = config or ICPConfig()
    if overrides:
        config = config.replace(**overrides)
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
    metric = get_metric(config.metric)
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
        if config.differentiation == "implicit":
            with torch.no_grad():
                result, _ = _run(
                    problem,
                    config,
                    model,
                    params,
                    regularizer_schedule,
                    metric,
                    point_weight,
                    source_weights,
                )
            result.params = _implicit_params(
                problem,
                config,
                model,
                result.params,
                regularizer_schedule,
                metric,
                int(result.iterations.max()),
                point_weight,
                source_weights,
            )
            result.points = model.deform(result.params)
            if result.transform is not None:
                result.transform = model.transform(result.params)  # type: ignore[attr-defined]
        else:
            result, _ = _run(
                problem,
                config,
                model,
                params,
                regularizer_schedule,
                metric,
                point_weight,
                source_weights,
            )
    return result._squeeze() if model.unbatched else result


__all__ = ["NonrigidICPResult", "build_model", "nonrigid_icp"]
