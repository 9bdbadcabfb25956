"""The ICP loop: iterate a :class:`Steps` (correspond -> weight / reject -> solve -> update) until
Open3D's stopping rule (or, when asked, small_gicp's small-step rule) holds, batched over pairs.

Every pair of the batch runs in lock-step; a pair that has met the stopping criteria (or lost
every correspondence) keeps its transform, by ``torch.where``, while the others go on.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeGuard, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from difficp.config import ICPConfig
from difficp.geometry import orthonormalize
from difficp.inputs import Problem

# A pair needs this many weighted correspondences for a determined 6-DoF update.
MIN_CORRESPONDENCES = 3


@dataclass(frozen=True)
class Progress:
    """Where a run stands, given to the ``progress`` callback of :func:`difficp.icp` (and
    :func:`run_loop`) after the first correspondences and after every iteration.

    Attributes:
        iteration: iterations done (0: the initial correspondences, before any step).
        max_iterations: the cap of this run (``ICPConfig.max_iterations``).
        fitness, inlier_rmse: ``(B,)`` current values (detached).
        active: pairs still iterating (0 on the last call of a run that stopped early).
        stage, stages: the stage (0-based) and number of stages of a
            :func:`~difficp.sampling.multiscale_icp` run (0 and 1 otherwise).
    """

    iteration: int
    max_iterations: int
    fitness: Tensor
    inlier_rmse: Tensor
    active: int
    stage: int = 0
    stages: int = 1


ProgressCallback = Callable[[Progress], None]


@dataclass
class ICPResult:
    """Result of :func:`icp`. Batched inputs give batched fields; a single pair gives unbatched.

    Attributes:
        transform: ``(B, 4, 4)`` maps source into target: ``target ~ source @ R.T + t``.
        fitness: ``(B,)`` inlier correspondences (closer than ``max_distance``) / source points.
        inlier_rmse: ``(B,)`` RMSE of the inlier distances (Open3D's definition).
        iterations: ``(B,)`` int, ICP iterations each pair ran.
        converged: ``(B,)`` bool, met the stopping criteria (relative fitness and RMSE, or a
            small step) before ``max_iterations`` (False for a pair that lost all its
            correspondences).
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

    @classmethod
    def from_loop(cls, loop: LoopResult) -> ICPResult:
        """The rigid result of :func:`run_loop` (its value is the transform)."""
        return cls(
            loop.value,
            loop.fitness,
            loop.inlier_rmse,
            loop.iterations,
            loop.converged,
            loop.rmse_history,
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


@runtime_checkable
class Steps(Protocol):
    """One ICP iteration, split for :func:`run_loop`. Implemented by
    :class:`difficp.registration.ReferenceSteps` (PyTorch), :class:`difficp.fused.FusedSteps` (compiled)
    and :class:`difficp.nonrigid.icp.NonrigidSteps` (deformation models).

    The loop holds the per-pair value being fitted (a ``(B, 4, 4)`` transform, or ``(B, P)``
    model parameters) and never looks inside ``state``, nor inside ``update`` except for the
    small-step rule of a rigid loop (``update`` ``(B, 4, 4)`` then).
    """

    dtype: torch.dtype

    def evaluate(self, value: Tensor, active: Tensor) -> tuple[Tensor, Tensor, Any]:
        """Correspondences at ``value`` for the ``active`` ``(B,)`` pairs (the others may be
        skipped): fitness ``(B,)``, inlier RMSE ``(B,)`` and the state :meth:`step` needs."""
        ...

    def step(self, state: Any, damping: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Weigh, reject and solve: the update of the value, the new LM damping ``(B,)``, and
        ``(B,)`` bool, the pair had at least :data:`MIN_CORRESPONDENCES` weighted partners."""
        ...


class Tolerances(NamedTuple):
    """The per-pair ``(B,)`` tolerances of :func:`run_loop`'s stopping rule, as it got them:
    ``rmse`` (the inlier-RMSE change; None: ``config.relative_rmse``) and ``step`` (the
    small-step rule's translation; None: no such rule)."""

    rmse: Tensor | None
    step: Tensor | None


@runtime_checkable
class WholeLoop(Protocol):
    """:class:`Steps` that can also run a problem's whole rigid loop in one call
    (:class:`difficp.fused.FusedSteps`); :func:`run_loop` hands such problems over."""

    def run_loop(
        self, init: Tensor, config: ICPConfig, tolerances: Tolerances, min_iterations: int
    ) -> LoopResult | None:
        """The loop's result for ``init`` ``(B, 4, 4)``, with :func:`run_loop`'s stopping rule,
        or None to let :func:`run_loop` iterate."""
        ...


# isinstance against a runtime-checkable protocol walks its attributes (~20 us): once per class
_WHOLE_LOOP_CLASSES: dict[type, bool] = {}


def _runs_whole_loops(steps: Steps) -> TypeGuard[WholeLoop]:
    kind = type(steps)
    known = _WHOLE_LOOP_CLASSES.get(kind)
    if known is None:
        known = _WHOLE_LOOP_CLASSES[kind] = isinstance(steps, WholeLoop)
    return known


def enough_correspondences(valid: Tensor, weights: Tensor) -> Tensor:
    """``(B,)`` bool: at least :data:`MIN_CORRESPONDENCES` valid partners ``(B, N)`` have a
    positive weight ``(B, N)``."""
    return ((weights.detach() > 0) & valid).sum(1) >= MIN_CORRESPONDENCES


def compose_rigid(update: Tensor, transform: Tensor) -> Tensor:
    """Rigid ICP's update rule: ``update`` ``(B, 4, 4)`` left-multiplied onto ``transform``,
    pulled back onto SO(3) (:func:`difficp.geometry.orthonormalize`)."""
    return orthonormalize(update @ transform)


@dataclass
class LoopResult:
    """How :func:`run_loop` ended, per pair (leading dimension ``B``).

    Attributes:
        value: the fitted ``(B, 4, 4)`` transform or ``(B, P)`` parameters.
        fitness, inlier_rmse, iterations, converged, rmse_history: as :class:`ICPResult`.
        damping: ``(B,)`` the final Levenberg-Marquardt damping.
    """

    value: Tensor
    fitness: Tensor
    inlier_rmse: Tensor
    iterations: Tensor
    converged: Tensor
    rmse_history: Tensor | None
    damping: Tensor


def _where(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return torch.where(mask.reshape(-1, *([1] * (a.dim() - 1))), a, b)


def source_radius(problem: Problem) -> Tensor:
    """``(B,)`` RMS distance of each source cloud's real points from their centroid (a rigid
    motion leaves it unchanged), in the source's dtype and on its device."""
    radius = torch.from_numpy(problem.source_radius_np)
    return radius.to(dtype=problem.source.dtype, device=problem.source.device)


def run_loop(
    steps: Steps,
    init: Tensor,
    config: ICPConfig,
    rmse_tolerance: Tensor | None = None,
    step_tolerance: Tensor | None = None,
    apply: Callable[[Tensor, Tensor], Tensor] = compose_rigid,
    min_iterations: int = 0,
    progress: ProgressCallback | None = None,
) -> LoopResult:
    """The iterations, with Open3D's stopping rule per pair, from ``init`` (the ``(B, 4, 4)``
    transforms or ``(B, P)`` parameters); the result is in the dtype of ``steps``.

    Args:
        rmse_tolerance: ``(B,)`` the RMSE change below which a pair may stop (default
            ``config.relative_rmse``; see :func:`rmse_tolerance`).
        step_tolerance: ``(B,)`` a rigid pair also stops once its update moved it by less than
            this translation and ``config.rotation_tolerance``'s angle (see
            :func:`step_tolerance`; None: no such rule).
        apply: ``apply(update, value)``, the new value after a step (default
            :func:`compose_rigid`; non-rigid parameters add).
        min_iterations: no pair counts as converged before this many iterations.
        progress: called with a :class:`Progress` after the first evaluation and after every
            iteration (None: not at all; it costs nothing then).
    """
    if (
        apply is compose_rigid
        and init.device.type == "cpu"
        and not progress
        and _runs_whole_loops(steps)
    ):
        # the compiled fast path runs the whole loop in one call (it reports no progress from
        # inside: a caller who asks for progress gets these lock-step iterations instead)
        tolerances = Tolerances(rmse_tolerance, step_tolerance)
        result = steps.run_loop(init, config, tolerances, min_iterations)
        if result is not None:
            return result
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
    if step_tolerance is not None:
        if apply is not compose_rigid:
            raise ValueError("the small-step rule (step_tolerance) is for rigid loops only")
        rotation = rotation_bound(config)
        step_tolerance = step_tolerance.to(dtype=rmse.dtype, device=device)

    def report(done: int) -> None:
        if progress is not None:
            count = int(active.sum())
            progress(Progress(done, config.max_iterations, fitness.detach(), rmse.detach(), count))

    report(0)
    for iteration in range(config.max_iterations):
        update, new_damping, enough = steps.step(state, damping)
        small = None
        if step_tolerance is not None:
            small = small_rigid_step(update.detach(), step_tolerance, rotation)
        # A pair with too few weighted correspondences stops here with its last good transform.
        active = active & enough
        # Applied before the exit test: when every pair has just been lost, T stays an output of
        # this step's graph (with zero gradient through it), so backward() still works.
        T = _where(active, apply(update, T), T)
        if not bool(active.any()):
            break
        damping = torch.where(active, new_damping, damping)
        new_fitness, new_rmse, state = steps.evaluate(T, active)
        iterations = iterations + active.long()
        done = ((new_fitness - fitness).abs() < config.relative_fitness) & (
            (new_rmse - rmse).abs() < tolerance
        )
        if small is not None:
            done = done | small
        done = active & done
        if iteration + 1 < min_iterations:
            done = torch.zeros_like(done)
        fitness = torch.where(active, new_fitness, fitness)
        rmse = torch.where(active, new_rmse, rmse)
        converged = converged | done
        active = active & ~done
        history.append(rmse)
        report(iteration + 1)
        if not bool(active.any()):
            break
    return LoopResult(
        value=T,
        fitness=fitness,
        inlier_rmse=rmse,
        iterations=iterations,
        converged=converged,
        rmse_history=torch.stack(history, dim=1) if config.return_history else None,
        damping=damping,
    )


# Absolute RMSE criteria above this fraction of a cloud's RMS radius are coarse (warned).
COARSE_CRITERIA = 1e-2


def step_tolerance(problem: Problem, config: ICPConfig) -> Tensor | None:
    """``(B,)`` the translation below which a rigid pair's step counts as small
    (``config.translation_tolerance``, times the source's RMS radius with
    ``criteria_scale="relative"``; inf where it is 0: not checked), or None when the small-step
    rule is off."""
    return step_tolerance_for(source_radius(problem), config)


def step_tolerance_for(radius: Tensor, config: ICPConfig) -> Tensor | None:
    """:func:`step_tolerance` for sources of RMS radius ``radius`` ``(B,)`` (in the problem's
    dtype)."""
    if not config.stops_on_small_steps:
        return None
    if config.translation_tolerance == 0:
        return torch.full_like(radius, math.inf)
    return _in_criteria_units(config.translation_tolerance, radius, config)


def _in_criteria_units(value: float, radius: Tensor, config: ICPConfig) -> Tensor:
    """``(B,)`` a distance criterion as the loop compares it: ``value`` itself
    (``criteria_scale="absolute"``) or ``value`` times each source cloud's RMS radius
    ``radius`` ``(B,)``."""
    if config.criteria_scale == "relative":
        return value * radius
    return torch.full_like(radius, value)


def rotation_bound(config: ICPConfig) -> float:
    """The rotation angle (radians; the option is in degrees) below which a step counts as
    small: inf when unchecked."""
    if not config.rotation_tolerance > 0:
        return math.inf
    return math.radians(config.rotation_tolerance)


def small_rigid_step(update: Tensor, translation: Tensor, rotation: float) -> Tensor:
    """``(B,)`` bool: the rigid ``update`` ``(B, 4, 4)`` translates by less than
    ``translation`` ``(B,)`` and rotates by less than ``rotation`` radians.

    The angle is ``atan2(|axial part|, (trace - 1) / 2)``: accurate at small angles, where
    ``acos`` of the trace loses half the digits."""
    R = update[:, :3, :3]
    axial = torch.stack(
        [R[:, 2, 1] - R[:, 1, 2], R[:, 0, 2] - R[:, 2, 0], R[:, 1, 0] - R[:, 0, 1]], dim=-1
    )
    cosine = (R.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    angle = torch.atan2(axial.norm(dim=-1) / 2, cosine)
    return (update[:, :3, 3].norm(dim=-1) < translation) & (angle < rotation)


def compiled_small_rigid_step(update: np.ndarray, translation: float, rotation: float) -> bool:
    """Compiled twin of :func:`small_rigid_step` for one ``(4, 4)`` update."""
    ax = update[2, 1] - update[1, 2]
    ay = update[0, 2] - update[2, 0]
    az = update[1, 0] - update[0, 1]
    cosine = (update[0, 0] + update[1, 1] + update[2, 2] - 1.0) / 2.0
    angle = math.atan2(math.sqrt(ax * ax + ay * ay + az * az) / 2.0, cosine)
    moved = math.sqrt(update[0, 3] ** 2 + update[1, 3] ** 2 + update[2, 3] ** 2)
    return moved < translation and angle < rotation


def rmse_tolerance(problem: Problem, config: ICPConfig) -> Tensor:
    """``(B,)`` the inlier-RMSE change below which each pair may stop.

    ``criteria_scale="absolute"``: ``relative_rmse`` (Open3D's), with a warning when that is
    coarser than ``COARSE_CRITERIA`` of a source cloud's RMS radius (tiny clouds would stop
    after a step or two, reporting convergence). ``"relative"``: ``relative_rmse`` times the
    radius.
    """
    if coarse_rmse_criterion(problem.source_radius_np, config):
        smallest = float(problem.source_radius_np.min())
        warnings.warn(
            f"ICPConfig.relative_rmse={config.relative_rmse:g} is coarse for a source cloud "
            f"of RMS radius {smallest:.3g} (the criteria are absolute, as in Open3D), so ICP "
            "may stop after a step or two; pass criteria_scale='relative' (the RMSE change "
            "is then divided by the cloud's radius) or a smaller relative_rmse",
            stacklevel=3,
        )
    return rmse_criterion_for(source_radius(problem), config)


def rmse_criterion_for(radius: Tensor, config: ICPConfig) -> Tensor:
    """:func:`rmse_tolerance` for sources of RMS radius ``radius`` ``(B,)`` (in the problem's
    dtype), without its warning."""
    return _in_criteria_units(config.relative_rmse, radius, config)


def coarse_rmse_criterion(radius: np.ndarray, config: ICPConfig) -> bool:
    """Whether :func:`rmse_tolerance` warns for sources of RMS radius ``radius`` ``(B,)``: an
    absolute RMSE criterion above :data:`COARSE_CRITERIA` of the smallest radius."""
    if config.criteria_scale != "absolute" or not config.relative_rmse > 0:
        return False
    # NumPy: torch calls cost more here
    return bool(config.relative_rmse > COARSE_CRITERIA * float(radius.min()))
