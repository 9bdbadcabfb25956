"""ICP configuration: every option of the loop, validated once, up front.

Thresholds and temperatures may be Python floats or 0-d tensors; a tensor that requires grad
makes the result differentiable with respect to it (e.g. learn a temperature end to end).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import operator
from dataclasses import dataclass
from functools import cache, cached_property
from typing import Any, Literal, NamedTuple, SupportsIndex, cast, get_args

import numpy as np
import torch

from difficp.metrics import METRICS as METRIC_REGISTRY
from difficp.metrics import Metric
from difficp.strategies.correspondences import CORRESPONDENCES as CORRESPONDENCE_REGISTRY
from difficp.strategies.correspondences import Correspondence, MatchOptions
from difficp.strategies.kernels import KERNELS, RobustKernel
from difficp.strategies.rejection import REJECTIONS as REJECTION_REGISTRY
from difficp.strategies.rejection import Rejection
from difficp.strategies.solvers import SOLVERS as SOLVER_REGISTRY
from difficp.strategies.solvers import Solver
from difficp.weighting import Weighting

Scalar = float | torch.Tensor

# The allowed values of the string options come from the strategy registries.
CORRESPONDENCES = CORRESPONDENCE_REGISTRY.names
METRICS = METRIC_REGISTRY.names
SOLVERS = SOLVER_REGISTRY.names
REJECTIONS = REJECTION_REGISTRY.names
ROBUST_KERNELS = KERNELS.names
# The fixed (non-strategy) choices: the annotation is the one list.
Differentiation = Literal["unroll", "implicit", "none"]
CriteriaScale = Literal["absolute", "relative"]
DIFFERENTIATIONS: tuple[str, ...] = get_args(Differentiation)
CRITERIA_SCALES: tuple[str, ...] = get_args(CriteriaScale)


# Config options that may be tensors (and so carry gradients or be learnt).
TENSOR_OPTIONS = (
    "temperature",
    "rejection_temperature",
    "max_distance",
    "max_normal_angle",
    "kernel_scale",
    "lambda_geometric",
)


# Temperatures and kernel scales divide distances: below this they underflow to 0 in float32.
_SMALLEST_DIVISOR = float(torch.finfo(torch.float32).tiny)


def _show(value: object) -> str:
    """``value`` as the user wrote it: ``1e-300`` stays ``1e-300`` (not a float32 ``0.0``) and
    ``0.1`` stays ``0.1`` (not ``0.10000000149011612``)."""
    if isinstance(value, torch.Tensor):
        v = value.detach()
        if v.numel() != 1:
            return f"a tensor of shape {tuple(v.shape)}"
        if v.is_floating_point() and torch.finfo(v.dtype).bits < 64:
            return format(float(v), ".8g")  # the digits its precision holds
        return str(v.item())
    if isinstance(value, (numbers.Real, np.generic)) and not isinstance(value, bool):
        return str(value)
    return repr(value)


def _number(name: str, value: object) -> float:
    """A real scalar option (Python/numpy number or one-element tensor) as a float, or raise
    a TypeError / ValueError that names ``ICPConfig.<name>`` and the fix."""
    if isinstance(value, (bool, np.bool_)) or (
        isinstance(value, torch.Tensor) and value.dtype == torch.bool
    ):
        raise TypeError(f"ICPConfig.{name} must be a number, got the bool {value!r}")
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dim() > 1:
            raise ValueError(
                f"ICPConfig.{name} must be a scalar (a number or a 0-d tensor), got a tensor of "
                f"shape {tuple(value.shape)}"
            )
        if value.is_complex():
            raise TypeError(f"ICPConfig.{name} must be a real number, got dtype {value.dtype}")
        return float(value.detach())
    if isinstance(value, numbers.Real):
        return float(value)
    fix = f"; convert it first, e.g. float({value!r})" if isinstance(value, str) else ""
    raise TypeError(
        f"ICPConfig.{name} must be a number or a 0-d tensor, got {type(value).__name__} "
        f"{value!r}{fix}"
    )


def _positive(
    name: str, value: Scalar | None, allow_none: bool = True, divisor: bool = False
) -> None:
    if value is None:
        if not allow_none:
            raise ValueError(f"ICPConfig.{name} must be given (a positive number)")
        return
    f = _number(name, value)
    if not math.isfinite(f) or f <= 0:
        raise ValueError(f"ICPConfig.{name} must be a finite positive number, got {_show(value)}")
    if divisor and f < _SMALLEST_DIVISOR:
        raise ValueError(
            f"ICPConfig.{name} must be a finite positive number of at least "
            f"{_SMALLEST_DIVISOR:.3g} (it divides distances, and smaller values are 0 in "
            f"float32), got {_show(value)}"
        )


def _integer(name: str, value: object, minimum: int) -> int:
    """An int option (Python, numpy or 0-d tensor integer; not a bool) as an ``int``."""
    if isinstance(value, (bool, np.bool_)) or (
        isinstance(value, torch.Tensor) and value.dtype == torch.bool
    ):
        raise TypeError(f"ICPConfig.{name} must be an int, got the bool {value!r}")
    try:
        # int, numpy ints, 0-d integer tensors; anything else raises the TypeError below
        number = operator.index(cast(SupportsIndex, value))
    except TypeError:
        raise TypeError(
            f"ICPConfig.{name} must be an int, got {type(value).__name__} {_show(value)}"
        ) from None
    if number < minimum:
        raise ValueError(f"ICPConfig.{name} must be an int >= {minimum}, got {number}")
    return number


def _choice(name: str, value: object, choices: tuple) -> None:
    if not isinstance(value, (str, type(None))) or value not in choices:
        raise ValueError(f"ICPConfig.{name}={value!r} is not one of {choices}")


class Strategies(NamedTuple):
    """The strategy objects an :class:`ICPConfig` names (see :mod:`difficp.strategies`)."""

    correspondence: Correspondence
    rejection: Rejection
    kernel: RobustKernel
    metric: Metric
    solver: Solver


@cache
def _default_config() -> ICPConfig:
    """The default :class:`ICPConfig` (frozen, so one instance serves every call: validating it
    again on each small ICP call cost ~40 us)."""
    return ICPConfig()


def resolve_config(config: object, overrides: dict) -> ICPConfig:
    """``config`` (None = defaults) with keyword ``overrides`` applied; a clear TypeError for
    anything that is not an :class:`ICPConfig` (e.g. a dict of options)."""
    if config is None:
        config = _default_config()
    elif not isinstance(config, ICPConfig):
        fix = (
            "build one with difficp.ICPConfig(**options) or pass the options as keywords, "
            "e.g. difficp.icp(source, target, max_distance=0.05)"
        )
        raise TypeError(f"config must be a difficp.ICPConfig, got {type(config).__name__}; {fix}")
    if not overrides:
        return config
    key = _replacement_key(config, overrides)
    if key is None:
        return config.replace(**overrides)
    cached = _REPLACEMENTS.get(key)
    # the key holds id(config): the entry keeps that config alive, so the id cannot be reused
    if cached is None or cached[0] is not config:
        if len(_REPLACEMENTS) >= _REPLACEMENTS_KEPT:
            _REPLACEMENTS.clear()
        cached = (config, config.replace(**overrides))
        _REPLACEMENTS[key] = cached
    return cached[1]


# Configs built from keyword overrides, by (config, overrides): ICPConfig is frozen, so a call
# repeated with the same plain options (a loop over small pairs) can take the one built and
# validated before (measured ~30 us of a 0.4 ms 100-point call).
_REPLACEMENTS: dict[tuple, tuple[ICPConfig, ICPConfig]] = {}
_REPLACEMENTS_KEPT = 64
_PLAIN = (str, int, float, bool, type(None))


def _replacement_key(config: ICPConfig, overrides: dict) -> tuple | None:
    """A hashable key of plain (immutable scalar) overrides; None when any is not plain, or
    when ``config`` holds a tensor option (tensors, parameters: those configs are rebuilt and
    validated on every call, as a learnt temperature may have left its range since)."""
    if not all(type(value) in _PLAIN for value in overrides.values()):
        return None
    if any(isinstance(getattr(config, name), torch.Tensor) for name in TENSOR_OPTIONS):
        return None
    # the type too: True == 1 and 1.0 == 1, but bools are refused where ints are not
    items = sorted((name, type(value).__name__, value) for name, value in overrides.items())
    return (id(config), *items)


@dataclass(frozen=True)
class ICPConfig:
    """All ICP options. Distances are in the units of the points; angles in degrees.

    The strategy options (``correspondence``, ``rejection``, ``robust_kernel``, ``metric``,
    ``solver``) take the names registered in :mod:`difficp.strategies`, listed below; an
    unknown name is a ValueError listing the registered ones.

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
        metric: ``"point_to_point"``, ``"point_to_plane"`` (target normals), ``"symmetric"``
            (Rusinkiewicz 2019; source and target normals) or ``"gicp"`` (Generalized-ICP,
            Segal et al. 2009: plane-to-plane with per-point covariances, given as
            ``source_covariances`` / ``target_covariances`` or estimated from the
            ``covariance_k`` nearest neighbours by :func:`difficp.estimate_covariances`).
        covariance_k: neighbours per point of the estimated GICP covariances (20, as small_gicp).
        solver: ``"svd"`` (weighted Procrustes; point_to_point only), ``"linear"`` (one linearised
            Gauss-Newton step per iteration) or ``"lm"`` (Levenberg-Marquardt, ``lm_steps`` damped
            steps per iteration starting from damping ``lm_damping``). None picks ``"svd"`` for
            point_to_point and ``"linear"`` otherwise.
        ``"colored"`` (Park et al. 2017, Open3D's colored ICP; target normals and
            ``source_colors`` / ``target_colors``): point-to-plane and photometric rows,
            weighted ``lambda_geometric`` / ``1 - lambda_geometric`` (Open3D's 0.968). The
            target's intensity gradients are fitted once over ``color_neighbors`` nearest
            neighbours within ``color_radius`` (None: ``2 * max_distance`` as Open3D, or no
            radius without a ``max_distance``); see :mod:`difficp.colors`.
    Stopping (Open3D's criteria): stop a pair when both |change of fitness| < relative_fitness and
        |change of inlier RMSE| < relative_rmse, or after max_iterations.
        criteria_scale: ``"absolute"`` (Open3D's: relative_rmse in distance units; warns when
            that is coarse for the cloud's size, e.g. clouds of 1e-6 units would stop after one
            step) or ``"relative"`` (the RMSE change is divided by the source cloud's RMS radius,
            so the same criteria work at any scale; translation_tolerance too).
        translation_tolerance, rotation_tolerance: also stop a rigid pair whose last step moved
            it by less than both (small_gicp's ``translation_eps`` / ``rotation_eps``, PCL's
            transformation epsilon): the update's translation norm and rotation angle
            (degrees, as ``max_normal_angle``). 0 leaves that part unchecked; both 0 (the
            default) turn this rule off.
            Non-rigid ICP refuses them (its steps are not rigid motions).
    differentiation: ``"unroll"`` (backpropagate through the iterations), ``"implicit"``
        (gradient of the converged transform by the implicit function theorem) or ``"none"``
        (no autograd graph at all; fastest).
    """

    # The strategy options are plain strings checked against their registries (a new strategy
    # needs no edit here; tests/test_architecture.py checks this docstring names every one).
    correspondence: str = "nearest"
    temperature: Scalar = 1e-3
    soft_k: int | None = None
    weight_distance: bool = False
    weight_normal: bool = False
    max_distance: Scalar | None = None
    max_normal_angle: Scalar | None = None
    rejection: str = "hard"
    rejection_temperature: Scalar = 1e-2
    robust_kernel: str | None = None
    kernel_scale: Scalar = 1.0
    metric: str = "point_to_point"
    solver: str | None = None
    lm_damping: float = 1e-4
    lm_steps: int = 3
    max_iterations: int = 30
    relative_fitness: float = 1e-6
    relative_rmse: float = 1e-6
    criteria_scale: CriteriaScale = "absolute"
    translation_tolerance: float = 0.0
    rotation_tolerance: float = 0.0
    differentiation: Differentiation = "unroll"
    return_history: bool = False
    covariance_k: int = 20
    lambda_geometric: Scalar = 0.968
    color_neighbors: int = 30
    color_radius: float | None = None

    def __post_init__(self) -> None:
        _choice("correspondence", self.correspondence, CORRESPONDENCES)
        _choice("metric", self.metric, METRICS)
        _choice("solver", self.solver, (None, *SOLVERS))
        solvable = None if self.solver is None else SOLVER_REGISTRY[self.solver].metrics
        if solvable is not None and self.metric not in solvable:
            others = [n for n in SOLVERS if SOLVER_REGISTRY[n].metrics is None]
            fix = " or ".join(f"solver={n!r}" for n in others)
            raise ValueError(
                f"ICPConfig.solver={self.solver!r} only solves metric="
                f"{' or '.join(repr(m) for m in solvable)}, not {self.metric!r}; use {fix}"
            )
        _choice("rejection", self.rejection, REJECTIONS)
        _choice("robust_kernel", self.robust_kernel, ROBUST_KERNELS)
        _choice("differentiation", self.differentiation, DIFFERENTIATIONS)
        _choice("criteria_scale", self.criteria_scale, CRITERIA_SCALES)
        _positive("temperature", self.temperature, allow_none=False, divisor=True)
        _positive("rejection_temperature", self.rejection_temperature, False, divisor=True)
        _positive("kernel_scale", self.kernel_scale, allow_none=False, divisor=True)
        _positive("max_distance", self.max_distance)
        if self.max_normal_angle is not None:
            angle = _number("max_normal_angle", self.max_normal_angle)
            if not 0 < angle <= 180:
                raise ValueError(
                    "ICPConfig.max_normal_angle must be in (0, 180] degrees, got "
                    f"{_show(self.max_normal_angle)}"
                )
        lam = _number("lambda_geometric", self.lambda_geometric)
        if not 0 <= lam <= 1:
            raise ValueError(
                f"ICPConfig.lambda_geometric must be in [0, 1] (the weight of the point-to-plane "
                f"term of metric='colored'), got {_show(self.lambda_geometric)}"
            )
        _positive("color_radius", self.color_radius)
        object.__setattr__(
            self, "color_neighbors", _integer("color_neighbors", self.color_neighbors, 1)
        )
        if self.needs_colors and CORRESPONDENCE_REGISTRY[self.correspondence].depth_target:
            raise ValueError(
                "ICPConfig.metric='colored' needs point-cloud targets with colours; it does not "
                "run with correspondence='projective' (use 'nearest' or 'soft')"
            )
        # Integers: numpy / 0-d tensor ints are stored as int; bools are refused (True is not 1
        # iteration by intent).
        if self.soft_k is not None:
            object.__setattr__(self, "soft_k", _integer("soft_k", self.soft_k, 1))
        object.__setattr__(
            self, "max_iterations", _integer("max_iterations", self.max_iterations, 1)
        )
        object.__setattr__(self, "lm_steps", _integer("lm_steps", self.lm_steps, 1))
        # A plane through a point needs at least 3 neighbours (the point included).
        object.__setattr__(self, "covariance_k", _integer("covariance_k", self.covariance_k, 3))
        if self.needs_covariances and CORRESPONDENCE_REGISTRY[self.correspondence].depth_target:
            raise ValueError(
                f"ICPConfig.metric={self.metric!r} needs point-cloud covariances, which a "
                "depth-map target (correspondence='projective') has none of; use "
                "correspondence='nearest' on back-projected points or metric='point_to_plane'"
            )
        # lm_damping = inf would make every LM step zero: the pair "converges" without moving.
        _positive("lm_damping", self.lm_damping, allow_none=False)
        for name in (
            "relative_fitness",
            "relative_rmse",
            "translation_tolerance",
            "rotation_tolerance",
        ):
            value = getattr(self, name)
            if not _number(name, value) >= 0:
                raise ValueError(f"ICPConfig.{name} must be >= 0, got {_show(value)}")

    @property
    def resolved_solver(self) -> str:
        """The solver in use: ``solver``, or the metric's default when it is None."""
        if self.solver is not None:
            return self.solver
        return METRIC_REGISTRY[self.metric].default_solver

    # The flags below depend on strategy names and plain options only (never on a tensor
    # option's value), so each is computed once per (frozen) config.
    @cached_property
    def uses_normal_criteria(self) -> bool:
        """Whether normals weigh or reject correspondences."""
        return bool(self.weight_normal) or self.max_normal_angle is not None

    def _metric_needs(self, what: str) -> bool:
        """The metric's ``needs_<what>`` flag (False where its class does not declare it)."""
        return bool(getattr(METRIC_REGISTRY[self.metric], f"needs_{what}", False))

    @cached_property
    def needs_source_normals(self) -> bool:
        """Whether the source must carry normals (the metric's, or any normal criterion)."""
        return self._metric_needs("source_normals") or self.uses_normal_criteria

    @cached_property
    def needs_target_normals(self) -> bool:
        """Whether the target must carry normals (the metric's, or any normal criterion)."""
        return self._metric_needs("target_normals") or self.uses_normal_criteria

    @cached_property
    def needs_covariances(self) -> bool:
        """Whether the metric reads per-point covariances (``"gicp"``)."""
        return self._metric_needs("covariances")

    @cached_property
    def needs_colors(self) -> bool:
        """Whether the metric reads ``source_colors`` / ``target_colors`` (``"colored"``)."""
        return self._metric_needs("colors")

    @property
    def stops_on_small_steps(self) -> bool:
        """Whether a rigid pair also stops on a small step (a translation or rotation
        tolerance is set)."""
        return self.translation_tolerance > 0 or self.rotation_tolerance > 0

    @property
    def resolved_color_radius(self) -> float | None:
        """The radius of the colour-gradient neighbourhoods: ``color_radius``, else Open3D's
        ``2 * max_distance`` (None: no radius)."""
        if self.color_radius is not None:
            return float(self.color_radius)
        if self.max_distance is None:
            return None
        return 2.0 * float(torch.as_tensor(self.max_distance).detach())

    @cached_property
    def strategies(self) -> Strategies:
        """The strategy objects of the string options, from their registries."""
        return Strategies(
            CORRESPONDENCE_REGISTRY[self.correspondence],
            REJECTION_REGISTRY[self.rejection],
            KERNELS[self.robust_kernel],
            METRIC_REGISTRY[self.metric],
            SOLVER_REGISTRY[self.resolved_solver],
        )

    @property
    def match_options(self) -> MatchOptions:
        """What the correspondence search reads (step 2); not cached: a learnt (tensor)
        ``max_distance`` changes in place."""
        radius = None
        if self.max_distance is not None and REJECTION_REGISTRY[self.rejection].bounds_search:
            radius = float(torch.as_tensor(self.max_distance).detach())
        return MatchOptions(radius, self.temperature, self.soft_k, self.needs_target_normals)

    @property
    def weighting(self) -> Weighting:
        """What weighting and rejection read (steps 3-4)."""
        return Weighting(
            self.max_distance,
            self.max_normal_angle,
            REJECTION_REGISTRY[self.rejection],
            self.rejection_temperature,
            bool(self.weight_distance),
            bool(self.weight_normal),
        )

    def replace(self, **changes: Any) -> ICPConfig:
        """A copy with some options changed (validated again).

        Raises:
            TypeError: an unknown option, naming the closest known one (``max_dist`` ->
                ``max_distance``).
        """
        known = [f.name for f in dataclasses.fields(self)]
        unknown = [name for name in changes if name not in known]
        if unknown:
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
                hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise TypeError(
                f"unknown ICP option {', '.join(hints)}; the options are the fields of "
                "difficp.ICPConfig (see its docstring)"
            )
        return dataclasses.replace(self, **changes)
