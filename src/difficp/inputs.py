"""Validation and batching of ICP inputs: every bad input fails here, with a message that names
the argument and the fix, before any work is done."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

from difficp.colors import colored_features
from difficp.config import ICPConfig
from difficp.correspondence import (
    DepthTarget,
    NeighborIndex,
    PointTarget,
    lengths_mask,
    spatial_order,
)
from difficp.geometry import (
    check_intrinsics,
    depth_normals,
    depth_to_points,
    invert_transform,
    rotate_vectors,
    transform_points,
)
from difficp.normals import estimate_covariances

# Sources at least this large are put in spatial order for the KD-tree. Smaller trees stay in
# cache whatever the order, and ordering (~30 small tensor ops) cost 1-2 ms at 1000 points:
# more than the whole compiled ICP loop.
SPATIAL_ORDER_MIN_POINTS = 4096

# Half-precision inputs are computed in float32 (CPU linear algebra has no float16 kernels, and
# float16 squared distances overflow at 256) and the result is returned in the input dtype.
HALF_DTYPES = (torch.float16, torch.bfloat16)

# A normal shorter than this is "zero": it has no direction to weigh or reject by.
ZERO_NORMAL = 1e-6

# A rigid init / target_pose whose rotation block is off orthonormal (max |R^T R - I|) by more
# than the rounding of its dtype is projected onto SO(3) with a warning, up to this tolerance;
# beyond it, it is refused (it is not a rotation with a little noise).
ROTATION_TOLERANCE = 1e-2
# Up to this many epsilons of its dtype (and 1e-6) off orthonormal, a rotation block is taken as
# rounding and projected silently: a float32 rotation from a network's SVD head (DCP) came out
# 1.3e-6 = 11 eps off, which a bound of 10 eps warned about.
ROUNDING_EPSILONS = 100


def rounding_tolerance(dtype: torch.dtype | np.dtype) -> float:
    """How far (max |R^T R - I|, and the last row from 0 0 0 1) a rigid transform given in
    ``dtype`` may be off from its rounding alone: not worth a warning."""
    eps = torch.finfo(dtype).eps if isinstance(dtype, torch.dtype) else np.finfo(dtype).eps
    return max(1e-6, ROUNDING_EPSILONS * float(eps))


def _take(values: Tensor, order: Tensor) -> Tensor:
    """``values`` ``(B, N, C)`` reordered by ``order`` ``(B, N)`` (differentiable)."""
    return torch.gather(values, 1, order[..., None].expand(-1, -1, values.shape[-1]))


@dataclass
class Problem:
    """Batched, validated ICP inputs.

    ``source``/``source_normals`` ``(B, N, 3)``, ``source_mask`` ``(B, N)``, ``source_counts`` ``(B,)``,
    ``init`` ``(B, 4, 4)``, ``target`` prepared for the chosen correspondences, and ``unbatched``
    when the caller passed a single pair (results are then squeezed).
    """

    source: Tensor
    source_normals: Tensor | None
    source_mask: Tensor
    source_counts: Tensor
    target: PointTarget | DepthTarget
    init: Tensor
    unbatched: bool
    result_dtype: torch.dtype | None = None  # the inputs' dtype, when computed in another one
    source_covariances: Tensor | None = None  # (B, N, 3, 3), metric "gicp"
    source_features: Tensor | None = None  # (B, N, F) colour terms of metric "colored"

    # Per-problem constants of the source, once and in NumPy (ten small torch calls cost ~50 us
    # of a 100-point call): the stopping rule's scale and the compiled path's centroids.
    @cached_property
    def _source_moments_np(self) -> tuple[np.ndarray, np.ndarray]:
        source = self.source.detach().cpu().numpy().astype(np.float64, copy=False)
        mask = self.source_mask.cpu().numpy().astype(np.float64)
        return masked_moments(source, mask, self.source_counts.cpu().numpy())

    @property
    def source_centroid_np(self) -> np.ndarray:
        """``(B, 3)`` float64 centroid of each source cloud's real points."""
        return self._source_moments_np[0]

    @property
    def source_radius_np(self) -> np.ndarray:
        """``(B,)`` float64 RMS distance of each source cloud's real points from their centroid
        (a rigid motion leaves it unchanged)."""
        return self._source_moments_np[1]


def masked_moments(
    points: np.ndarray, mask: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(B, 3)`` centroid and ``(B,)`` RMS radius about it of each cloud's real points.

    Args:
        points: ``(B, N, 3)`` float64.
        mask: ``(B, N)`` float64, 1 for a real point, 0 for padding.
        counts: ``(B,)`` real points per cloud.
    """
    counts = np.maximum(counts, 1).astype(np.float64)
    # masked sums as contractions: no (B, N, 3) temporaries but the centred points
    # (256 x 1024 points: 13.7 -> 5.3 ms)
    mean = np.einsum("bn,bnd->bd", mask, points) / counts[:, None]
    centred = points - mean[:, None]
    return mean, np.sqrt(np.einsum("bn,bnd,bnd->b", mask, centred, centred) / counts)


def _as_float_tensor(name: str, value: object) -> Tensor:
    if value is None:
        raise ValueError(f"{name} is required")
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, Tensor):
        raise ValueError(
            f"{name} must be a torch.Tensor or numpy array, got {type(value).__name__}"
        )
    if not value.is_floating_point():
        raise ValueError(
            f"{name} must be a floating-point tensor, got dtype {value.dtype}; use .float()"
        )
    return value.float() if value.dtype in HALF_DTYPES else value


def _check_finite(name: str, value: Tensor) -> None:
    if not torch.isfinite(value.detach()).all():
        raise ValueError(f"{name} contains NaN or inf values; remove or replace them before ICP")


# Squared distances and the normal equations (sums of squares over many points) must not
# overflow: coordinates are refused above sqrt(largest float) / this margin.
OVERFLOW_MARGIN = 1e4


def _check_coordinates(name: str, value: Tensor) -> None:
    """Refuse NaN/inf and coordinates that overflow when squared, from one reduction (the
    largest magnitude is NaN when any coordinate is NaN). ``value`` is not empty."""
    largest = float(value.detach().abs().amax())
    if not math.isfinite(largest):
        _check_finite(name, value)  # NaN/inf: its message
    if value.dtype not in (torch.float32, torch.float64):
        return
    limit = torch.finfo(value.dtype).max ** 0.5 / OVERFLOW_MARGIN
    if largest > limit:
        hint = " or use float64" if value.dtype == torch.float32 else ""
        raise ValueError(
            f"{name} has coordinates up to {largest:.3g}, which overflow {value.dtype} when "
            f"squared (limit {limit:.3g}); rescale the clouds (divide source and target by a "
            f"common factor, then multiply the result's translation by it){hint}"
        )


def _batched_points(name: str, value: object) -> tuple[Tensor, bool]:
    t = _as_float_tensor(name, value)
    if t.dim() not in (2, 3) or t.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (N, 3) or (B, N, 3), got {tuple(t.shape)}")
    if t.shape[-2] == 0 or (t.dim() == 3 and t.shape[0] == 0):
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); ICP needs at least 3 points")
    _check_coordinates(name, t)
    return (t[None], True) if t.dim() == 2 else (t, False)


def _lengths(
    name: str, lengths: object, batch: int, size: int, device: torch.device
) -> Tensor | None:
    if lengths is None:
        return None
    t = torch.as_tensor(lengths, device=device)
    if t.shape != (batch,) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(
            f"{name} must be an int tensor of shape ({batch},), got {tuple(t.shape)} {t.dtype}"
        )
    if (t < 1).any() or (t > size).any():
        raise ValueError(
            f"{name} must be in [1, {size}] (an empty cloud cannot be registered), got {t.tolist()}"
        )
    return t.long()


def _normals(name: str, value: object, points: Tensor, unbatched: bool) -> Tensor | None:
    if value is None:
        return None
    n = _as_float_tensor(name, value)
    n = n[None] if unbatched and n.dim() == points.dim() - 1 else n
    if n.shape != points.shape:
        raise ValueError(
            f"{name} must have the shape of its points {tuple(points.shape)}, got {tuple(n.shape)}"
        )
    _check_finite(name, n)
    return n.to(points.dtype)


def _check_normal_lengths(name: str, normals: Tensor, mask: Tensor) -> None:
    """Refuse zero normals among the valid points (they would give no residual / weight)."""
    zero = (normals.detach().norm(dim=-1) < ZERO_NORMAL) & mask
    if bool(zero.any()):
        raise ValueError(
            f"{name} has {int(zero.sum())} zero normals (length < {ZERO_NORMAL:g}) among its valid "
            "points; every point needs a unit normal: estimate them with "
            "difficp.estimate_normals(points) or drop those points"
        )


def _expand_batch(name: str, t: Tensor, batch: int) -> Tensor:
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    raise ValueError(
        f"{name} has batch size {t.shape[0]} but source has {batch}; pass matching batches"
    )


def _init(
    init: object, batch: int, dtype: torch.dtype, device: torch.device, name: str = "init"
) -> Tensor:
    """``(B, 4, 4)`` rigid transform in ``dtype``: identity when None; a rotation block a little
    off SO(3) is projected onto it (with a warning), a far-off one refused."""
    if init is None:
        return torch.eye(4, dtype=dtype, device=device).expand(batch, 4, 4).clone()
    given = _as_float_tensor(name, init)
    quiet = rounding_tolerance(_float_dtype(init) or given.dtype)
    tolerance = max(ROTATION_TOLERANCE, 2 * quiet)
    T = given.to(device=device, dtype=dtype)
    if T.shape[-2:] != (4, 4) or T.dim() not in (2, 3):
        raise ValueError(
            f"{name} must be a (4, 4) or (B, 4, 4) transform, got shape {tuple(T.shape)}"
        )
    _check_finite(name, T)
    T = _expand_batch(name, T[None] if T.dim() == 2 else T, batch)
    R = T[:, :3, :3].detach().double()
    eye = torch.eye(3, dtype=R.dtype, device=R.device)
    off = float((R.transpose(-1, -2) @ R - eye).abs().amax())
    det = float(torch.linalg.det(R).amin())
    last_row = torch.tensor([0, 0, 0, 1], dtype=R.dtype, device=R.device)
    bottom = float((T[:, 3].detach().double() - last_row).abs().amax())
    if off > tolerance or det <= 0 or bottom > tolerance:
        raise ValueError(
            f"{name} must be a rigid transform (orthonormal rotation with det +1, last row "
            f"0 0 0 1); its rotation block is {off:.3g} from orthonormal (max |R^T R - I|, "
            f"tolerance {tolerance:g}), its determinant {det:.6g}, its last row "
            f"{bottom:.3g} from 0 0 0 1; project it with roma.special_procrustes or build it "
            "with difficp.geometry.make_transform"
        )
    if off > quiet or bottom > quiet:
        warnings.warn(
            f"{name} is not exactly rigid: its rotation block is {off:.3g} from orthonormal "
            f"(max |R^T R - I|, tolerance {tolerance:g}); using the nearest rotation instead "
            "(otherwise the result would not be a rigid transform either)",
            stacklevel=4,
        )
        import roma  # here: importing roma loads torch._dynamo (seconds)

        top = torch.cat([roma.special_procrustes(T[:, :3, :3]), T[:, :3, 3:]], dim=-1)
        T = torch.cat([top, last_row.to(T).expand(batch, 1, 4)], dim=-2)
    return T


# Covariances whose largest |C - C^T| exceeds this fraction of their largest entry are refused
# as not symmetric (float32 rounding of a symmetric product stays far below it).
SYMMETRY_TOLERANCE = 1e-5


def _covariances(name: str, value: object, points: Tensor, mask: Tensor, unbatched: bool) -> Tensor:
    """User covariances ``(N, 3, 3)`` / ``(B, N, 3, 3)`` for ``points`` ``(B, N, 3)`` (real points:
    ``mask``), checked: the shape, finite, symmetric, positive definite on the real points."""
    c = _as_float_tensor(name, value)
    c = c[None] if unbatched and c.dim() == 3 else c
    if c.dim() == 4 and c.shape[0] == 1 and points.shape[0] > 1:
        c = c.expand(points.shape[0], *c.shape[1:])
    expected = (*points.shape, 3)
    if tuple(c.shape) != expected:
        raise ValueError(
            f"{name} must have shape (N, 3, 3) or (B, N, 3, 3) matching its points, here "
            f"{expected}, got {tuple(c.shape)}; estimate them with difficp.estimate_covariances"
        )
    _check_finite(name, c)
    c = c.to(points.dtype)
    d = c.detach().double()
    scale = float(d.abs().amax()) if d.numel() else 0.0
    asymmetry = float((d - d.transpose(-1, -2)).abs().amax()) if d.numel() else 0.0
    if asymmetry > SYMMETRY_TOLERANCE * scale:
        raise ValueError(
            f"{name} are not symmetric (max |C - C^T| = {asymmetry:.3g}); pass covariance "
            "matrices, e.g. (C + C^T) / 2"
        )
    bad = (torch.linalg.cholesky_ex(d)[1] != 0) & mask
    if bool(bad.any()):
        raise ValueError(
            f"{name} has {int(bad.sum())} degenerate covariances (not positive definite) among "
            "its valid points; GICP inverts them: regularise them with "
            "difficp.regularize_covariances(covariances) (eigenvalues 1e-3, 1, 1) or estimate "
            "them with difficp.estimate_covariances(points)"
        )
    return c


def _colors(name: str, value: object, points: Tensor, unbatched: bool) -> Tensor:
    """``(B, N, 3)`` RGB in [0, 1] shaped like ``points``, or a ValueError naming the fix."""
    if isinstance(value, (np.ndarray, Tensor)) and not (
        value.dtype.kind == "f" if isinstance(value, np.ndarray) else value.is_floating_point()
    ):
        raise ValueError(
            f"{name} must be float RGB in [0, 1], got dtype {value.dtype}; for 8-bit colours "
            f"pass {name}=colors / 255.0"
        )
    c = _as_float_tensor(name, value)
    c = c[None] if unbatched and c.dim() == points.dim() - 1 else c
    if c.dim() != 3 or c.shape[-1] != 3 or c.shape[1] != points.shape[1]:
        raise ValueError(
            f"{name} must be RGB shaped like its points {tuple(points.shape)} (N, 3) or "
            f"(B, N, 3), got {tuple(c.shape)}"
        )
    _check_finite(name, c)
    low, high = float(c.detach().amin()), float(c.detach().amax())
    if low < 0 or high > 1:
        raise ValueError(
            f"{name} must be RGB in [0, 1], got values in [{low:.6g}, {high:.6g}]; for 8-bit "
            f"colours pass {name}=colors / 255.0"
        )
    return _expand_batch(name, c, points.shape[0]).to(points.dtype)


def _check_colors(config: ICPConfig, source_colors: object, target_colors: object) -> None:
    """Colours are given exactly when the metric reads them."""
    pairs = (("source_colors", source_colors), ("target_colors", target_colors))
    given = [name for name, value in pairs if value is not None]
    if config.needs_colors:
        missing = [n for n in ("source_colors", "target_colors") if n not in given]
        if missing:
            raise ValueError(
                f"metric={config.metric!r} needs {' and '.join(missing)}: (N, 3) / (B, N, 3) RGB "
                "in [0, 1] (difficp.io.read_point_cloud(path).colors reads them from PLY / PCD)"
            )
    elif given:
        raise ValueError(
            f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} only used by "
            f"metric='colored', not {config.metric!r}; set metric='colored' or drop them"
        )


def _missing_normals(name: str) -> ValueError:
    return ValueError(
        f"{name} are required by this configuration (metric / normal weighting or rejection); "
        f"pass {name}=... or estimate them with difficp.estimate_normals(points)"
    )


@dataclass
class _Source:
    """The checked source side of a problem, in the order the search will visit it."""

    points: Tensor  # (B, N, 3)
    normals: Tensor | None
    lengths: Tensor | None
    mask: Tensor  # (B, N) bool
    covariances: Tensor | None  # (B, N, 3, 3), metric "gicp"
    colors: Tensor | None  # (B, N, 3), metric "colored"

    def reordered(self, order: Tensor) -> _Source:
        """The same cloud with its points (and their attributes) taken in ``order``."""

        def take(t: Tensor | None) -> Tensor | None:
            return None if t is None else _take(t.flatten(2), order).unflatten(2, t.shape[2:])

        return _Source(
            _take(self.points, order),
            take(self.normals),
            self.lengths,
            self.mask,
            take(self.covariances),
            take(self.colors),
        )


def _check_covariance_inputs(
    config: ICPConfig, source_covariances: object, target_covariances: object
) -> None:
    """Covariances are given only when the metric reads them."""
    if config.needs_covariances:
        return
    for name, value in (
        ("source_covariances", source_covariances),
        ("target_covariances", target_covariances),
    ):
        if value is not None:
            raise ValueError(f"{name} are only used by metric='gicp', not {config.metric!r}")


def _prepare_source(
    source: object,
    config: ICPConfig,
    source_lengths: object,
    source_normals: object,
    source_covariances: object,
    source_colors: object,
) -> tuple[_Source, bool]:
    """The checked, batched source cloud and whether it was given unbatched."""
    src, unbatched = _batched_points("source", source)
    B, N, _ = src.shape
    normals = _normals("source_normals", source_normals, src, unbatched)
    if config.needs_source_normals and normals is None:
        raise _missing_normals("source_normals")
    lengths = _lengths("source_lengths", source_lengths, B, N, src.device)
    mask = lengths_mask(lengths, B, N, src.device)
    colors = (
        None if source_colors is None else _colors("source_colors", source_colors, src, unbatched)
    )
    if config.needs_source_normals:
        assert normals is not None
        _check_normal_lengths("source_normals", normals, mask)
    covariances = None
    if source_covariances is not None:
        covariances = _covariances("source_covariances", source_covariances, src, mask, unbatched)
    elif config.needs_covariances:
        covariances = estimate_covariances(src, config.covariance_k, lengths)
    return _Source(src, normals, lengths, mask, covariances, colors), unbatched


def _point_target(
    target: object,
    source: _Source,
    config: ICPConfig,
    target_lengths: object,
    target_normals: object,
    target_covariances: object,
    target_colors: object,
    search_backend: str,
) -> tuple[PointTarget, _Source, Tensor | None]:
    """The checked target cloud with its neighbour index, the source reordered for the search
    (when that pays) and the source's colour features (metric "colored", else None)."""
    src = source.points
    B, N, _ = src.shape
    device = src.device
    tgt_points, tgt_unbatched = _batched_points("target", target)
    if tgt_points.device != device:
        raise ValueError(f"target is on {tgt_points.device} but source on {device}; move one")
    dtype = torch.promote_types(src.dtype, tgt_points.dtype)
    tgt_points = _expand_batch("target", tgt_points.to(dtype), B)
    M = tgt_points.shape[1]
    tgt_normals = _normals("target_normals", target_normals, tgt_points, tgt_unbatched)
    if tgt_normals is not None:
        tgt_normals = _expand_batch("target_normals", tgt_normals, B)
    if config.needs_target_normals and tgt_normals is None:
        raise _missing_normals("target_normals")
    t_lengths = _lengths("target_lengths", target_lengths, B, M, device)
    tgt_mask = lengths_mask(t_lengths, B, M, device)
    if config.needs_target_normals:
        assert tgt_normals is not None
        _check_normal_lengths("target_normals", tgt_normals, tgt_mask)
    index = None
    if config.strategies.correspondence.needs_index(config.soft_k):
        index = NeighborIndex(tgt_points, t_lengths, search_backend)  # type: ignore[arg-type]
        if index.backend in ("kdtree", "compiled") and N >= SPATIAL_ORDER_MIN_POINTS:
            # Results do not depend on the order of the source points (they are summed),
            # so reorder them once for faster queries in every iteration.
            source = source.reordered(spatial_order(src, source.mask))
    tgt_cov = None
    if target_covariances is not None:
        tgt_cov = _covariances(
            "target_covariances", target_covariances, tgt_points, tgt_mask, tgt_unbatched
        )
    elif config.needs_covariances:
        tgt_cov = estimate_covariances(tgt_points, config.covariance_k, t_lengths, index=index)
    source_features = target_features = None
    if config.needs_colors:
        assert tgt_normals is not None and source.colors is not None
        tgt_colors = _colors("target_colors", target_colors, tgt_points, tgt_unbatched)
        source_features, target_features = _color_features(
            config,
            source.colors.to(dtype),
            tgt_colors,
            tgt_points,
            tgt_normals,
            t_lengths,
            index,
        )
    tgt = PointTarget(
        tgt_points, tgt_normals, tgt_mask, index, covariances=tgt_cov, features=target_features
    )
    return tgt, source, source_features


def prepare_problem(
    source: object,
    target: object,
    config: ICPConfig,
    init: object = None,
    source_lengths: object = None,
    target_lengths: object = None,
    source_normals: object = None,
    target_normals: object = None,
    intrinsics: object = None,
    target_pose: object = None,
    search_backend: str = "auto",
    source_covariances: object = None,
    target_covariances: object = None,
    source_colors: object = None,
    target_colors: object = None,
    init_name: str = "init",
) -> Problem:
    """Validate and batch every input of :func:`difficp.icp` (see there for shapes);
    ``init_name``: what error messages call ``init``."""
    _check_colors(config, source_colors, target_colors)
    _check_covariance_inputs(config, source_covariances, target_covariances)
    result_dtype = _input_dtype(source, target, config)
    src, unbatched = _prepare_source(
        source, config, source_lengths, source_normals, source_covariances, source_colors
    )
    B = src.points.shape[0]
    source_features = None
    tgt: PointTarget | DepthTarget
    if config.strategies.correspondence.depth_target:
        tgt = _depth_target(target, intrinsics, target_pose, target_normals, B, src.points)
        dtype = src.points.dtype
    else:
        if intrinsics is not None:
            raise ValueError("intrinsics is only used with correspondence='projective'")
        tgt, src, source_features = _point_target(
            target,
            src,
            config,
            target_lengths,
            target_normals,
            target_covariances,
            target_colors,
            search_backend,
        )
        dtype = tgt.points.dtype

    def cast(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(dtype)

    return Problem(
        source=src.points.to(dtype),
        source_normals=cast(src.normals),
        source_mask=src.mask,
        source_counts=src.mask.sum(1),
        target=tgt,
        init=_init(init, B, dtype, src.points.device, init_name),
        unbatched=unbatched,
        result_dtype=result_dtype,
        source_covariances=cast(src.covariances),
        source_features=source_features,
    )


def _color_features(
    config: ICPConfig,
    source_colors: Tensor,
    target_colors: Tensor,
    target_points: Tensor,
    target_normals: Tensor,
    target_lengths: Tensor | None,
    index: NeighborIndex | None,
) -> tuple[Tensor, Tensor]:
    """The ``"colored"`` metric's source ``(B, N, 1)`` and target ``(B, M, 5)`` features."""
    return colored_features(
        source_colors,
        target_colors,
        target_points,
        target_normals,
        config.lambda_geometric,
        config.color_neighbors,
        config.resolved_color_radius,
        target_lengths,
        index if index is not None else NeighborIndex(target_points, target_lengths),
    )


def _float_dtype(value: object) -> torch.dtype | None:
    """The torch dtype of a float tensor or numpy array (None for anything else)."""
    if isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating):
        return torch.from_numpy(np.empty(0, value.dtype)).dtype
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.dtype
    return None


def _input_dtype(source: object, target: object, config: ICPConfig) -> torch.dtype | None:
    """The dtype results are returned in: the promoted float dtype of the inputs (None when
    they are not float tensors / arrays; validation reports that)."""
    depth_map = config.strategies.correspondence.depth_target  # depths do not set the dtype
    inputs = (source,) if depth_map else (source, target)
    dtypes = [d for d in map(_float_dtype, inputs) if d is not None]
    if not dtypes:
        return None
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def _depth_target(
    depth: object,
    intrinsics: object,
    target_pose: object,
    target_normals: object,
    batch: int,
    source: Tensor,
) -> DepthTarget:
    d = _as_float_tensor("target (depth map)", depth)
    if d.dim() not in (2, 3) or min(d.shape[-2:]) < 2:
        raise ValueError(
            f"with correspondence='projective' target must be a depth map (H, W) or (B, H, W), "
            f"got shape {tuple(d.shape)}"
        )
    _check_finite("target (depth map)", d)
    if (d < 0).any():
        raise ValueError("target depth map has negative values; use 0 for invalid pixels")
    d = _expand_batch("target (depth map)", (d[None] if d.dim() == 2 else d).to(source), batch)
    if intrinsics is None:
        raise ValueError("correspondence='projective' needs intrinsics=(3, 3) pinhole matrix")
    K = check_intrinsics(_as_float_tensor("intrinsics", intrinsics).to(source), batch)
    K = _expand_batch("intrinsics", K, batch)
    pose = (
        _init(target_pose, batch, source.dtype, source.device, "target_pose")
        if target_pose is not None
        else None
    )
    cam_points = depth_to_points(d, K)
    valid = d > 0
    if target_normals is not None:
        cam_normals = _as_float_tensor("target_normals", target_normals).to(source)
        if cam_normals.shape[-3:] != cam_points.shape[-3:]:
            raise ValueError(
                f"with a depth-map target, target_normals must be (B, H, W, 3) camera-frame normals, "
                f"got {tuple(cam_normals.shape)}"
            )
        cam_normals = _expand_batch(
            "target_normals", cam_normals.reshape(-1, *cam_points.shape[-3:]), batch
        )
    else:
        cam_normals = depth_normals(cam_points, valid)
    if pose is None:
        pose = torch.eye(4, dtype=source.dtype, device=source.device).expand(batch, 4, 4)
        world_points, world_normals = cam_points, cam_normals
    else:
        B, H, W, _ = cam_points.shape
        world_points = transform_points(cam_points.reshape(B, H * W, 3), pose).reshape(B, H, W, 3)
        world_normals = rotate_vectors(cam_normals.reshape(B, H * W, 3), pose).reshape(B, H, W, 3)
    return DepthTarget(world_points, world_normals, valid, K, invert_transform(pose))
