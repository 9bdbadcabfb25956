"""Point selection (ICP step 1): voxel down-sampling, and coarse-to-fine multi-scale ICP.

:func:`voxel_downsample` replaces every occupied voxel of a (padded, batched) cloud by the mean
of its points, as Open3D's ``PointCloud.voxel_down_sample``. :func:`multiscale_icp` runs
:func:`difficp.icp` on a pyramid of such clouds, coarse to fine, each level starting from the
transform of the one before (Open3D's multi-scale ICP tutorial); :func:`parse_scales` reads the
pyramid from a command-line string.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import Tensor

from difficp.config import ICPConfig, resolve_config
from difficp.loop import ICPResult, Progress, ProgressCallback
from difficp.normals import estimate_normals
from difficp.registration import icp

# Voxel indices are int64; Open3D refuses a voxel size that gives more than INT_MAX voxels per
# axis. We allow up to 2**62 per axis, leaving headroom for the floor and the +1 of a boundary.
_MAX_VOXELS_PER_AXIS = 2.0**62


class VoxelGrid(NamedTuple):
    """Result of :func:`voxel_downsample` (batched input gives batched fields).

    Attributes:
        points: ``(B, M, 3)`` (or ``(M, 3)``) mean position of each occupied voxel; rows past a
            cloud's length are zero padding.
        normals: ``(B, M, 3)`` unit mean normal per voxel, or None when no normals were given.
        colors: ``(B, M, C)`` mean colour per voxel, or None when no colours were given.
        lengths: ``(B,)`` (or 0-d) int64 number of occupied voxels of each cloud.
    """

    points: Tensor
    normals: Tensor | None
    colors: Tensor | None
    lengths: Tensor


def _check_voxel_size(voxel_size: float | Tensor, name: str = "voxel_size") -> float:
    if isinstance(voxel_size, Tensor):
        if voxel_size.numel() != 1:
            raise ValueError(
                f"{name} must be a scalar, got a tensor of shape {tuple(voxel_size.shape)}"
            )
        size = float(voxel_size.detach())
    else:
        # float() directly: torch.as_tensor would round a Python float to float32 first, which
        # moves voxel boundaries by ~1e-7 of the coordinates (enough to split Open3D's voxels).
        try:
            size = float(voxel_size)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {voxel_size!r}") from None
    if not math.isfinite(size) or size <= 0:
        raise ValueError(f"{name} must be a finite positive number, got {size}")
    return size


def _check_attribute(name: str, value: Tensor, points: Tensor) -> Tensor:
    """``value`` ``(N, C)`` / ``(B, N, C)`` batched like the points; a ValueError naming it if not."""
    if not isinstance(value, Tensor) or not value.is_floating_point():
        raise ValueError(
            f"{name} must be a float torch.Tensor, got "
            f"{getattr(value, 'dtype', type(value).__name__)}"
        )
    if value.dim() != points.dim() or value.shape[:-1] != points.shape[:-1]:
        raise ValueError(
            f"{name} has shape {tuple(value.shape)} but the points have {tuple(points.shape)}: "
            f"{name} needs one row per point, {tuple(points.shape[:-1])} + (channels,)"
        )
    if value.device != points.device:
        raise ValueError(f"{name} is on {value.device} but the points are on {points.device}")
    return value[None] if value.dim() == 2 else value


def _check_lengths(lengths: Tensor | None, B: int, N: int, device: torch.device) -> Tensor:
    if lengths is None:
        return torch.full((B,), N, dtype=torch.long, device=device)
    lengths = torch.as_tensor(lengths, device=device)
    if lengths.shape != (B,) or lengths.is_floating_point() or lengths.is_complex():
        raise ValueError(
            f"lengths must be an integer tensor of shape ({B},) (one count per cloud), got "
            f"{tuple(lengths.shape)} ({lengths.dtype})"
        )
    if B and (int(lengths.min()) < 0 or int(lengths.max()) > N):
        raise ValueError(f"lengths must lie in [0, {N}] (the padded size), got {lengths.tolist()}")
    return lengths.long()


def _unique_rows(keys: Tensor) -> tuple[Tensor, Tensor]:
    """Distinct rows of ``keys`` ``(V, 4)`` (cloud, ix, iy, iz), all >= 0, in lexicographic order.

    Returns the cloud of each distinct row ``(U,)`` and, for each input row, the index of its
    distinct row ``(V,)``. Rows are packed into one int64 (mixed radix) when that cannot
    overflow: a 1-D ``torch.unique`` is a sort, about 20 times faster than ``unique(dim=0)``.
    """
    if keys.shape[0] == 0:
        return keys[:, 0], keys[:, 0]
    radix = [int(r) + 1 for r in keys.amax(dim=0).tolist()]
    if math.prod(radix) < 2**63:
        packed = keys[:, 0]
        for axis in range(1, 4):
            packed = packed * radix[axis] + keys[:, axis]
        unique, inverse = torch.unique(packed, sorted=True, return_inverse=True)
        stride = radix[1] * radix[2] * radix[3]
        return torch.div(unique, stride, rounding_mode="floor"), inverse
    unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
    return unique[:, 0], inverse


def voxel_downsample(
    points: Tensor,
    voxel_size: float | Tensor,
    lengths: Tensor | None = None,
    normals: Tensor | None = None,
    colors: Tensor | None = None,
) -> VoxelGrid:
    """Replace the points of each occupied voxel by their mean (Open3D's ``voxel_down_sample``).

    A point ``p`` of a cloud falls in voxel ``floor((p - (min_bound - voxel_size / 2)) /
    voxel_size)``, ``min_bound`` being that cloud's own per-axis minimum over its valid points
    (Open3D's convention, so both give the same voxels and the same means). Normals are averaged
    and then re-normalised to unit length (Open3D leaves the average unnormalised; a voxel whose
    normals cancel gets a zero normal); colours (any number of channels) are averaged.

    Everything is vectorised over the batch and the points (one ``torch.unique`` over
    (cloud, voxel) keys and ``index_add``), on any device and float dtype. The means are
    differentiable in ``points``, ``normals`` and ``colors``; which voxel a point falls in is not
    (piecewise constant).

    Args:
        points: ``(N, 3)`` or padded ``(B, N, 3)``.
        voxel_size: edge of the cubic voxels, in the units of the points (a finite positive float).
        lengths: ``(B,)`` valid counts of a padded batch (default: all ``N``); rows past a cloud's
            length are ignored.
        normals: ``(N, 3)`` / ``(B, N, 3)`` normals of the points, or None.
        colors: ``(N, C)`` / ``(B, N, C)`` colours (or any per-point features), or None.

    Returns:
        :class:`VoxelGrid` ``(points, normals, colors, lengths)``: ``(B, M, 3)`` voxel means
        padded with zeros to ``M`` = the largest number of occupied voxels, ``(B, M, 3)`` unit
        normals, ``(B, M, C)`` colours and ``(B,)`` counts; unbatched input gives ``(M, 3)`` ...
        and a 0-d count. Within a cloud, voxels are ordered lexicographically by index (x, y, z).

    Raises:
        ValueError: ``voxel_size`` not finite and positive (or so small the voxel indices would
            overflow), points not ``(N, 3)`` / ``(B, N, 3)`` floats, NaN/inf in a valid row of
            points, normals or colours, normals/colours/lengths not matching the points.
    """
    size = _check_voxel_size(voxel_size)
    pts, lengths, nrm, col = _check_cloud(points, lengths, normals, colors)
    N = pts.shape[1]
    valid = torch.arange(N, device=pts.device)[None] < lengths[:, None]  # (B, N)
    for name, value in (("points", pts), ("normals", nrm), ("colors", col)):
        if value is not None and not bool((torch.isfinite(value.detach()).all(-1) | ~valid).all()):
            raise ValueError(f"{name} contains NaN or inf (in a valid row); remove those points")
    with torch.no_grad():  # voxel assignment is piecewise constant: not differentiated
        cell = _voxel_cells(pts.detach(), valid, lengths, size)
        slots = _voxel_slots(cell, valid, lengths, pts.dtype)
    out_normals = None if nrm is None else _unit_or_zero(slots.mean(nrm))
    grid = VoxelGrid(
        slots.mean(pts), out_normals, None if col is None else slots.mean(col), slots.lengths
    )
    if points.dim() == 2:  # unbatched
        return VoxelGrid(
            grid.points[0],
            None if grid.normals is None else grid.normals[0],
            None if grid.colors is None else grid.colors[0],
            grid.lengths[0],
        )
    return grid


def _check_cloud(
    points: Tensor, lengths: Tensor | None, normals: Tensor | None, colors: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """The arguments of :func:`voxel_downsample`, checked and batched: ``(B, N, 3)`` points,
    ``(B,)`` lengths, normals and colours (or None)."""
    if not isinstance(points, Tensor) or not points.is_floating_point():
        raise ValueError(
            f"points must be a float torch.Tensor (N, 3) or (B, N, 3), got "
            f"{getattr(points, 'dtype', type(points).__name__)}"
        )
    if points.dim() not in (2, 3) or points.shape[-1] != 3:
        raise ValueError(f"points must be (N, 3) or (B, N, 3), got {tuple(points.shape)}")
    if points.dim() == 2 and lengths is not None:
        raise ValueError("lengths is only for padded batches (B, N, 3); got (N, 3) points")
    pts = points[None] if points.dim() == 2 else points
    B, N, _ = pts.shape
    lengths = _check_lengths(lengths, B, N, pts.device)
    nrm = None if normals is None else _check_attribute("normals", normals, points)
    if nrm is not None and nrm.shape[-1] != 3:
        raise ValueError(
            f"normals must have 3 channels, got shape {tuple(nrm.shape[-points.dim() :])}"
        )
    col = None if colors is None else _check_attribute("colors", colors, points)
    return pts, lengths, nrm, col


def _voxel_cells(p: Tensor, valid: Tensor, lengths: Tensor, size: float) -> Tensor:
    """``(B, N, 3)`` int64 voxel index of every point on Open3D's grid, per cloud."""
    B, N, _ = p.shape
    inf = torch.tensor(float("inf"), dtype=p.dtype, device=p.device)
    if N == 0:  # amin/amax refuse an empty axis; an empty cloud has no grid anyway
        lower = upper = p.new_zeros(B, 3)
    else:
        lower = torch.where(valid[..., None], p, inf).amin(dim=1)  # (B, 3)
        upper = torch.where(valid[..., None], p, -inf).amax(dim=1)
    extent = torch.where(lengths[:, None] > 0, upper - lower, torch.zeros_like(lower))
    if B and float(extent.max()) / size >= _MAX_VOXELS_PER_AXIS:
        raise ValueError(
            f"voxel_size={size} is too small for clouds spanning {float(extent.max())}: "
            "the voxel indices would overflow int64"
        )
    origin = lower - size * 0.5  # Open3D: min_bound - voxel_size / 2
    # Same operations as Open3D ((p - origin) / size, then floor) so float64 ties agree.
    return torch.floor((p - origin[:, None]) / size).long()


class _VoxelSlots(NamedTuple):
    """Where every input row goes in the padded ``(B, M)`` output of :func:`voxel_downsample`.

    Attributes:
        slot: ``(B * N,)`` flat output slot of each row; padding rows go to an extra slot
            ``B * M`` that is dropped (so their values, even NaN, never mix).
        denominator: ``(B * M, 1)`` points per slot (1 for empty padding slots: they stay 0).
        lengths: ``(B,)`` int64 occupied voxels per cloud.
        shape: ``(B, N, M)``.
    """

    slot: Tensor
    denominator: Tensor
    lengths: Tensor
    shape: tuple[int, int, int]

    def mean(self, values: Tensor) -> Tensor:
        """``(B, N, C)`` -> ``(B, M, C)`` per-voxel means (differentiable in ``values``)."""
        B, N, M = self.shape
        C = values.shape[-1]
        total = values.new_zeros(B * M + 1, C).index_add(0, self.slot, values.reshape(B * N, C))
        return (total[: B * M] / self.denominator.to(values.dtype)).reshape(B, M, C)


def _voxel_slots(cell: Tensor, valid: Tensor, lengths: Tensor, dtype: torch.dtype) -> _VoxelSlots:
    """The output slots of the points in voxels ``cell`` ``(B, N, 3)``: one torch.unique over
    (cloud, voxel) keys, voxels in lexicographic order within each cloud."""
    B, N, _ = cell.shape
    device = cell.device
    batch = torch.arange(B, device=device)[:, None].expand(B, N)
    keys = torch.cat([batch[..., None], cell], dim=-1).reshape(B * N, 4)  # cells >= 0
    # Rows of the valid points (boolean indexing is slow on the CPU: select once, by index).
    rows = None if bool((lengths == N).all()) else valid.reshape(-1).nonzero()[:, 0]
    if rows is not None:
        keys = keys.index_select(0, rows)  # (V, 4)
    voxel_cloud, inverse = _unique_rows(keys)
    per_cloud = torch.bincount(voxel_cloud, minlength=B)  # (B,)
    M = int(per_cloud.max()) if B and voxel_cloud.shape[0] else 0
    first = torch.cumsum(per_cloud, 0) - per_cloud  # first voxel of each cloud
    slot_of_voxel = voxel_cloud * M + (
        torch.arange(voxel_cloud.shape[0], device=device) - first[voxel_cloud]
    )
    slot = slot_of_voxel[inverse]  # (V,)
    if rows is not None:
        slot = torch.full((B * N,), B * M, dtype=torch.long, device=device).index_copy_(
            0, rows, slot
        )
    count = torch.zeros(B * M + 1, dtype=dtype, device=device)
    count.index_add_(0, slot, torch.ones_like(slot, dtype=dtype))
    return _VoxelSlots(slot, count[: B * M].clamp(min=1)[:, None], per_cloud.long(), (B, N, M))


def _unit_or_zero(vectors: Tensor) -> Tensor:
    """``vectors`` ``(..., 3)`` scaled to unit length; a zero one (cancelling normals, padding)
    stays zero instead of becoming NaN."""
    norm = vectors.norm(dim=-1, keepdim=True)
    return torch.where(norm > 0, vectors / norm.clamp(min=torch.finfo(vectors.dtype).tiny), vectors)


# --------------------------------------------------------------------------------------------
# Multi-scale ICP
# --------------------------------------------------------------------------------------------

Stage = tuple[float | None, float | None, int | None]


def _check_stages(stages: Sequence[Sequence[Any]]) -> list[Stage]:
    if isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence) or len(stages) == 0:
        raise ValueError(
            "stages must be a non-empty sequence of (voxel_size, max_distance, max_iterations), "
            f"got {stages!r}; parse a string like '0.05:0.1:30,none:0.02:14' with parse_scales"
        )
    checked: list[Stage] = []
    for i, stage in enumerate(stages):
        if isinstance(stage, (str, bytes)) or not isinstance(stage, Sequence) or len(stage) != 3:
            raise ValueError(
                f"stages[{i}] must be (voxel_size, max_distance, max_iterations), got {stage!r}"
            )
        voxel, distance, iterations = stage
        voxel = None if voxel is None else _check_voxel_size(voxel, f"stages[{i}] voxel_size")
        if distance is not None and not isinstance(distance, Tensor):
            distance = _check_voxel_size(distance, f"stages[{i}] max_distance")
        if iterations is not None and (
            isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1
        ):
            raise ValueError(
                f"stages[{i}] max_iterations must be a positive int or None, got {iterations!r}"
            )
        checked.append((voxel, distance, iterations))
    return checked


def _scale_field(field: str, what: str, stage: int, integer: bool = False) -> Any:
    """One field of a :func:`parse_scales` stage: None for ``none``, else a positive number."""
    if field.lower() == "none":
        return None
    try:
        value: float | int = int(field) if integer else float(field)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise ValueError(
            f"scales stage {stage}: {what} {field!r} is not {kind} (or 'none')"
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"scales stage {stage}: {what} must be finite and positive, got {field}")
    return value


def parse_scales(text: str) -> list[Stage]:
    """Read multi-scale stages from a string, e.g. for ``--scales``.

    ``"0.05:0.1:30,0.025:0.05:20,none:0.02:14"`` -> ``[(0.05, 0.1, 30), (0.025, 0.05, 20),
    (None, 0.02, 14)]``: comma-separated stages, each ``voxel_size:max_distance:max_iterations``;
    ``none`` as a voxel size means full resolution, as a distance or iteration count the
    configuration's value.

    Raises:
        ValueError: an empty string or stage, not three fields, a field that is not a number,
            a non-positive size or distance, a non-integer or non-positive iteration count.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"scales must be a non-empty string like '0.05:0.1:30', got {text!r}")
    stages: list[Stage] = []
    for i, item in enumerate(text.split(","), start=1):
        fields = [f.strip() for f in item.split(":")]
        if len(fields) != 3 or not all(fields):
            raise ValueError(
                f"scales stage {i} {item.strip()!r} must be voxel_size:max_distance:"
                "max_iterations, e.g. 0.05:0.1:30 (voxel_size 'none' = full resolution)"
            )
        stages.append(
            (
                _scale_field(fields[0], "voxel_size", i),
                _scale_field(fields[1], "max_distance", i),
                _scale_field(fields[2], "max_iterations", i, integer=True),
            )
        )
    return stages


def multiscale_icp(
    source: Tensor,
    target: Tensor,
    stages: Sequence[Sequence[Any]],
    init: Tensor | None = None,
    source_lengths: Tensor | None = None,
    target_lengths: Tensor | None = None,
    source_normals: Tensor | None = None,
    target_normals: Tensor | None = None,
    config: ICPConfig | None = None,
    *,
    normals_k: int = 16,
    search_backend: str = "auto",
    progress: ProgressCallback | None = None,
    **overrides: Any,
) -> ICPResult:
    """Coarse-to-fine ICP over voxel down-sampled copies of both clouds.

    For each stage ``(voxel_size, max_distance, max_iterations)`` in order, both clouds are
    down-sampled with :func:`voxel_downsample` (``voxel_size`` None: full resolution), normals
    carried along when given, and :func:`difficp.icp` runs from the previous stage's transform
    with that ``max_distance`` and ``max_iterations`` (None: the config's). Normals a metric
    needs but that were not given are estimated on each stage's cloud
    (:func:`difficp.estimate_normals` with ``normals_k`` neighbours), as in Open3D's multi-scale
    tutorial. Large voxels and distances at the start let the pose travel far; the last, finest
    stage sets the accuracy.

    The down-sampled points are differentiable means of the inputs and each stage starts from
    the previous stage's (differentiable) transform, so gradients flow through every stage
    (voxel assignment and estimated normals are piecewise constant).

    Args:
        source, target: ``(N, 3)`` / ``(B, N, 3)`` and ``(M, 3)`` / ``(B, M, 3)`` points.
        stages: sequence of ``(voxel_size, max_distance, max_iterations)``, coarse to fine
            (see :func:`parse_scales` for the string form).
        init: ``(4, 4)`` / ``(B, 4, 4)`` initial transform of the first stage (identity).
        source_lengths, target_lengths: ``(B,)`` valid counts of padded batches.
        source_normals, target_normals: unit normals shaped like the points, or None.
        config: :class:`ICPConfig` shared by all stages; ``**overrides`` replace its fields.
        normals_k: neighbours for normals estimated per stage.
        search_backend: passed to :func:`difficp.icp`.
        progress: passed to :func:`difficp.icp`, with each call's
            :class:`~difficp.loop.Progress` telling its ``stage`` of ``stages``.

    Returns:
        :class:`ICPResult`: the last stage's transform, fitness and inlier RMSE (measured on
        that stage's clouds), ``iterations`` summed over the stages, ``converged`` of the last
        stage, and with ``return_history`` the stages' RMSE histories concatenated.

    Raises:
        ValueError: bad stages (naming ``stages[i]``), or any input :func:`difficp.icp` or
            :func:`voxel_downsample` rejects.
    """
    checked = _check_stages(stages)
    config = resolve_config(config, overrides)
    _check_multiscale_inputs(source, target, normals_k)
    unbatched = source.dim() == 2
    clouds = (
        _Cloud(source, source_normals, source_lengths),
        _Cloud(target, target_normals, target_lengths),
    )
    transform = init
    results: list[ICPResult] = []
    for stage, (voxel, distance, iterations) in enumerate(checked):
        stage_progress = None
        if progress is not None:
            stage_progress = partial(_stage_progress, progress, stage, len(checked))
        stage_config = config.replace(
            max_distance=config.max_distance if distance is None else distance,
            max_iterations=config.max_iterations if iterations is None else iterations,
        )
        src, tgt = (cloud.downsampled(voxel, unbatched) for cloud in clouds)
        src = src.with_normals(stage_config.needs_source_normals, normals_k)
        tgt = tgt.with_normals(stage_config.needs_target_normals, normals_k)
        result = icp(
            src.points,
            tgt.points,
            init=transform,
            **src.icp_options("source"),
            **tgt.icp_options("target"),
            config=stage_config,
            search_backend=search_backend,
            progress=stage_progress,
        )
        transform = result.transform
        results.append(result)
    return _chain_results(results)


def _check_multiscale_inputs(source: Tensor, target: Tensor, normals_k: int) -> None:
    if not isinstance(normals_k, int) or normals_k < 3:
        raise ValueError(f"normals_k must be an int >= 3, got {normals_k!r}")
    for name, value in (("source", source), ("target", target)):
        if not isinstance(value, Tensor) or value.dim() not in (2, 3) or value.shape[-1] != 3:
            raise ValueError(
                f"{name} must be an (N, 3) or (B, N, 3) tensor for multiscale_icp, got "
                f"{tuple(getattr(value, 'shape', ())) or type(value).__name__}"
            )
    if source.dim() != target.dim():
        raise ValueError(
            f"source {tuple(source.shape)} and target {tuple(target.shape)} must both be "
            "batched or both unbatched"
        )


class _Cloud(NamedTuple):
    """One side of a multi-scale stage: points, normals (or None), lengths (or None)."""

    points: Tensor
    normals: Tensor | None
    lengths: Tensor | None

    def downsampled(self, voxel: float | None, unbatched: bool) -> _Cloud:
        """The cloud on a grid of ``voxel`` (None: itself, full resolution)."""
        if voxel is None:
            return self
        grid = voxel_downsample(self.points, voxel, self.lengths, self.normals)
        # icp takes lengths only with batches; an unbatched grid is exactly full.
        return _Cloud(grid.points, grid.normals, None if unbatched else grid.lengths)

    def icp_options(self, role: str) -> dict[str, Tensor | None]:
        """Its normals and lengths as :func:`difficp.icp`'s ``{role}_normals`` / ``_lengths``."""
        return {f"{role}_normals": self.normals, f"{role}_lengths": self.lengths}

    def with_normals(self, needed: bool, k: int) -> _Cloud:
        """The cloud with normals estimated from ``k`` neighbours when ``needed`` and missing."""
        if not needed or self.normals is not None:
            return self
        normals = estimate_normals(self.points.detach(), k=k, lengths=self.lengths)
        return self._replace(normals=normals)


def _chain_results(results: list[ICPResult]) -> ICPResult:
    """The result of consecutive stages: the last one's, with iterations summed and the RMSE
    histories concatenated."""
    last = results[-1]
    histories = [r.rmse_history for r in results if r.rmse_history is not None]
    return ICPResult(
        transform=last.transform,
        fitness=last.fitness,
        inlier_rmse=last.inlier_rmse,
        iterations=sum((r.iterations for r in results[1:]), results[0].iterations),
        converged=last.converged,
        rmse_history=torch.cat(histories, dim=-1) if histories else None,
    )


def _stage_progress(progress: ProgressCallback, stage: int, stages: int, p: Progress) -> None:
    progress(replace(p, stage=stage, stages=stages))


__all__ = ["VoxelGrid", "multiscale_icp", "parse_scales", "voxel_downsample"]
