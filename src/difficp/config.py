"""ICP configuration: every option of the loop, validated once, up front.

Thresholds and temperatures may be Python floats or 0-d tensors; a tensor that requires grad
makes the result differentiable with respect to it (e.g. learn a temperature end to end).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch

Scalar = float | torch.Tensor

CORRESPONDENCES = ("nearest", "soft", "projective")
METRICS = ("point_to_point", "point_to_plane", "symmetric")
SOLVERS = ("svd", "linear", "lm")
REJECTIONS = ("hard", "soft")
ROBUST_KERNELS = (None, "huber", "cauchy", "geman_mcclure", "tukey")
DIFFERENTIATIONS = ("unroll", "implicit", "none")
CRITERIA_SCALES = ("absolute", "relative")


def _positive(name: str, value: Scalar | None, allow_none: bool = True) -> None:
    if value is None:
        if not allow_none:
            raise ValueError(f"ICPConfig.{name} must be given (a positive number)")
        return
    v = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if v.numel() != 1:
        raise ValueError(
            f"ICPConfig.{name} must be a scalar, got a tensor of shape {tuple(v.shape)}"
        )
    f = float(v)
    if not math.isfinite(f) or f <= 0:
        raise ValueError(f"ICPConfig.{name} must be a finite positive number, got {f}")


def _choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"ICPConfig.{name}={value!r} is not one of {choices}")


@dataclass(frozen=True)
class ICPConfig:
    """All ICP options. Distances are in the units of the points; angles in degrees.

    Correspondences (step 2):
        correspondence: ``"nearest"`` (hard nearest neighbour: exact, not differentiable in the
            choice of partner), ``"soft"`` (partner = softmax(-|p-q|^2 / temperature)-weighted mean of
            the targets, differentiable) or ``"projective"`` (target is a depth map; source points are
            projected into it with pinhole intrinsics).
        temperature: softmax temperature of ``"soft"``, in squared distance units.
        soft_k: restrict the soft partner to the ``soft_k`` nearest targets (None = all targets).
    Weighting (step 3):
        weight_distance: multiply by ``1 - d / d_max`` (d_max = ``max_distance``, else the largest
            distance of the pair's current correspondences).
        weight_normal: multiply by ``max(n_s . n_t, 0)``, the agreement of the normals.
    Rejection (step 4):
        max_distance: reject correspondences farther than this (None = keep all).
        max_normal_angle: reject correspondences whose normals differ by more than this (degrees).
        rejection: ``"hard"`` (a 0/1 mask) or ``"soft"`` (sigmoid((max_distance - d)/T_r) and
            sigmoid((n_s . n_t - cos(max_normal_angle))/T_r), differentiable in the thresholds).
        rejection_temperature: T_r of soft rejection, for the distance term in distance units; the
            normal term uses it as is (cosine units).
        robust_kernel: IRLS weights from the metric residuals, one of None, ``"huber"``,
            ``"cauchy"``, ``"geman_mcclure"``, ``"tukey"``; ``kernel_scale`` is their scale.
    Error metric and solver (step 5):
        metric: ``"point_to_point"``, ``"point_to_plane"`` (target normals) or ``"symmetric"``
            (Rusinkiewicz 2019; source and target normals).
        solver: ``"svd"`` (weighted Procrustes; point_to_point only), ``"linear"`` (one linearised
            Gauss-Newton step per iteration) or ``"lm"`` (Levenberg-Marquardt, ``lm_steps`` damped
            steps per iteration starting from damping ``lm_damping``). None picks ``"svd"`` for
            point_to_point and ``"linear"`` otherwise.
    Stopping (Open3D's criteria): stop a pair when both |change of fitness| < relative_fitness and
        |change of inlier RMSE| < relative_rmse, or after max_iterations.
        criteria_scale: ``"absolute"`` (Open3D's: relative_rmse in distance units; warns when
            that is coarse for the cloud's size, e.g. clouds of 1e-6 units would stop after one
            step) or ``"relative"`` (the RMSE change is divided by the source cloud's RMS radius,
            so the same criteria work at any scale).
    differentiation: ``"unroll"`` (backpropagate through the iterations), ``"implicit"``
        (gradient of the converged transform by the implicit function theorem) or ``"none"``
        (no autograd graph at all; fastest).
    """

    correspondence: Literal["nearest", "soft", "projective"] = "nearest"
    temperature: Scalar = 1e-3
    soft_k: int | None = None
    weight_distance: bool = False
    weight_normal: bool = False
    max_distance: Scalar | None = None
    max_normal_angle: Scalar | None = None
    rejection: Literal["hard", "soft"] = "hard"
    rejection_temperature: Scalar = 1e-2
    robust_kernel: Literal["huber", "cauchy", "geman_mcclure", "tukey"] | None = None
    kernel_scale: Scalar = 1.0
    metric: Literal["point_to_point", "point_to_plane", "symmetric"] = "point_to_point"
    solver: Literal["svd", "linear", "lm"] | None = None
    lm_damping: float = 1e-4
    lm_steps: int = 3
    max_iterations: int = 30
    relative_fitness: float = 1e-6
    relative_rmse: float = 1e-6
    criteria_scale: Literal["absolute", "relative"] = "absolute"
    differentiation: Literal["unroll", "implicit", "none"] = "unroll"
    return_history: bool = False

    def __post_init__(self) -> None:
        _choice("correspondence", self.correspondence, CORRESPONDENCES)
        _choice("metric", self.metric, METRICS)
        _choice("solver", self.solver, (None, *SOLVERS))
        if self.solver == "svd" and self.metric != "point_to_point":
            raise ValueError(
                f"ICPConfig.solver='svd' only solves metric='point_to_point', not {self.metric!r}; "
                "use solver='linear' or solver='lm'"
            )
        _choice("rejection", self.rejection, REJECTIONS)
        _choice("robust_kernel", self.robust_kernel, ROBUST_KERNELS)
        _choice("differentiation", self.differentiation, DIFFERENTIATIONS)
        _choice("criteria_scale", self.criteria_scale, CRITERIA_SCALES)
        _positive("temperature", self.temperature, allow_none=False)
        _positive("rejection_temperature", self.rejection_temperature, allow_none=False)
        _positive("kernel_scale", self.kernel_scale, allow_none=False)
        _positive("max_distance", self.max_distance)
        if self.max_normal_angle is not None:
            angle = float(torch.as_tensor(self.max_normal_angle).detach())
            if not 0 < angle <= 180:
                raise ValueError(
                    f"ICPConfig.max_normal_angle must be in (0, 180] degrees, got {angle}"
                )
        if self.soft_k is not None and (not isinstance(self.soft_k, int) or self.soft_k < 1):
            raise ValueError(
                f"ICPConfig.soft_k must be a positive int or None, got {self.soft_k!r}"
            )
        if not isinstance(self.max_iterations, int) or self.max_iterations < 1:
            raise ValueError(
                f"ICPConfig.max_iterations must be a positive int, got {self.max_iterations!r}"
            )
        if not isinstance(self.lm_steps, int) or self.lm_steps < 1:
            raise ValueError(f"ICPConfig.lm_steps must be a positive int, got {self.lm_steps!r}")
        if not self.lm_damping > 0:
            raise ValueError(f"ICPConfig.lm_damping must be positive, got {self.lm_damping}")
        for name in ("relative_fitness", "relative_rmse"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"ICPConfig.{name} must be >= 0, got {getattr(self, name)}")

    @property
    def resolved_solver(self) -> str:
        """The solver in use: ``solver``, or the metric's default when it is None."""
        if self.solver is not None:
            return self.solver
        return "svd" if self.metric == "point_to_point" else "linear"

    @property
    def needs_source_normals(self) -> bool:
        """Whether the source must carry normals (symmetric metric or any normal criterion)."""
        uses_normal_criteria = self.weight_normal or self.max_normal_angle is not None
        return self.metric == "symmetric" or uses_normal_criteria

    @property
    def needs_target_normals(self) -> bool:
        """Whether the target must carry normals (any metric but point_to_point, or normal criteria)."""
        uses_normal_criteria = self.weight_normal or self.max_normal_angle is not None
        return self.metric != "point_to_point" or uses_normal_criteria

    def replace(self, **changes: object) -> ICPConfig:
        """A copy with some options changed (validated again)."""
        return dataclasses.replace(self, **changes)
