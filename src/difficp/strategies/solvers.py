"""Solvers (step 5b): one class per ``ICPConfig.solver`` value, each turning weighted
correspondences into a rigid update with :meth:`Solver.compute_update` (the theseus shape: one
loop, solvers override the step). The mathematics lives in :mod:`difficp.solvers`, with the
compiled twins of the per-pair solves beside their PyTorch versions
(:func:`~difficp.solvers.compiled_procrustes` for ``compiled_sums = "moments"``,
:func:`~difficp.solvers.compiled_solve_normal_equations` for ``"normal_equations"``), which
:mod:`difficp.fused` compiles.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from difficp.correspondence import Correspondences
from difficp.metrics import Metric
from difficp.solvers import (
    BlockFn,
    block_levenberg_marquardt,
    block_normal_equations,
    damped_solve,
    gauss_newton_update,
    levenberg_marquardt_update,
    weighted_procrustes,
)
from difficp.strategies.registry import Registry


@dataclass
class SolveInput:
    """The weighted correspondences of one iteration, as the solvers read them.

    Attributes:
        metric: the error metric; corr: the correspondences.
        moved, moved_normals: ``(B, N, 3)`` source points / normals at the current transform.
        weights: ``(B, N)``.
        center, far: ``(B, 3)`` / ``(B,)``, see :func:`difficp.solvers.gauss_newton_update`.
    """

    metric: Metric
    corr: Correspondences
    moved: Tensor
    moved_normals: Tensor | None
    weights: Tensor
    center: Tensor | None = None
    far: Tensor | None = None

    @property
    def system(self) -> tuple[Metric, Tensor, Tensor | None, Correspondences, Tensor]:
        """``(metric, moved, moved_normals, corr, weights)``: the leading arguments of the
        linearised solvers of :mod:`difficp.solvers`."""
        return self.metric, self.moved, self.moved_normals, self.corr, self.weights


class Solver:
    """Computes the ``(B, 4, 4)`` update to left-multiply onto the transform."""

    name: str
    # Metrics it can solve (None: any).
    metrics: tuple[str, ...] | None = None
    # What the compiled path (difficp.fused) accumulates for it and solves per pair:
    # "moments" (Procrustes) or "normal_equations"; None: not compiled, see fused_reason.
    compiled_sums: str | None = None
    fused_reason: str | None = None
    # Why non-rigid ICP (flat parameters, :mod:`difficp.nonrigid`) cannot use it; None: it can.
    nonrigid_reason: str | None = None
    # The solver whose step the implicit gradient differentiates at the fixed point, where this
    # one's step is not smooth there (None: this one's own).
    fixed_point_solver: str | None = None

    def compute_update(self, x: SolveInput, damping: Tensor, steps: int) -> tuple[Tensor, Tensor]:
        """The update and the new LM damping ``(B,)`` (``steps``: damped steps, LM only)."""
        raise NotImplementedError

    def compute_param_update(
        self, blocks: BlockFn, params: Tensor, damping: Tensor, steps: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Non-rigid ICP's step: from the residual blocks ``blocks(p, with_jacobian)`` at
        ``params`` ``(B, P)``, the ``(B, P)`` change of the parameters, the new damping ``(B,)``
        and the cost ``(B,)``."""
        raise NotImplementedError


SOLVERS: Registry[Solver] = Registry("solver")


@SOLVERS.register("svd")
class ProcrustesSolver(Solver):
    """Weighted Procrustes (closed form, point_to_point only)."""

    metrics = ("point_to_point",)
    compiled_sums = "moments"
    nonrigid_reason = (
        "solver='svd' (closed-form rigid Procrustes) does not fit a deformation model; use "
        "solver='linear' (one Gauss-Newton step per iteration, the default) or solver='lm'"
    )

    def compute_update(self, x: SolveInput, damping: Tensor, steps: int) -> tuple[Tensor, Tensor]:
        return weighted_procrustes(x.moved, x.corr.points, x.weights), damping


@SOLVERS.register("linear")
class GaussNewtonSolver(Solver):
    """One linearised (Gauss-Newton) step per iteration."""

    compiled_sums = "normal_equations"

    def compute_update(self, x: SolveInput, damping: Tensor, steps: int) -> tuple[Tensor, Tensor]:
        return gauss_newton_update(*x.system, center=x.center, far=x.far)[0], damping

    def compute_param_update(
        self, blocks: BlockFn, params: Tensor, damping: Tensor, steps: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        H, g, cost = block_normal_equations(blocks(params, True), params.shape[-1])
        return damped_solve(H, g, 0.0), damping, cost


@SOLVERS.register("lm")
class LevenbergMarquardtSolver(Solver):
    """``lm_steps`` damped steps per iteration with per-pair accept / reject."""

    fused_reason = "the Levenberg-Marquardt solver is not compiled"
    # LM's accept/reject makes its step the identity at a minimum (no step lowers the cost),
    # which hides the fixed point's sensitivity; its undamped Gauss-Newton step has the same
    # fixed point (zero gradient), and the implicit derivative depends only on that.
    fixed_point_solver = "linear"

    def compute_update(self, x: SolveInput, damping: Tensor, steps: int) -> tuple[Tensor, Tensor]:
        update, damping, _ = levenberg_marquardt_update(*x.system, damping, steps, x.center, x.far)
        return update, damping

    def compute_param_update(
        self, blocks: BlockFn, params: Tensor, damping: Tensor, steps: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        return block_levenberg_marquardt(blocks, params, damping, steps)


__all__ = ["SOLVERS", "SolveInput", "Solver"]
