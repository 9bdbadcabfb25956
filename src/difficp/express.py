"""The express lane of :func:`difficp.icp`: a small, plain problem straight to the compiled loop.

A lone call on a small pair used to spend most of its time outside the compiled loop: ~0.45 ms of
input checks, batching, tensors and set-up around ~0.07 ms of compiled work at 100 points. Here a
problem that needs none of the general path's machinery goes from its arrays to one compiled
call (:func:`difficp.fused.express_loop`, which also builds the targets' KD-trees) and back.

It takes only what it computes exactly as the general path does (the same kernels on the same
float64 arrays, the same stopping tolerances; tests compare the two bit for bit): CPU
float32/float64 tensors or arrays, one pair ``(N, 3)`` / ``(M, 3)`` or a batch ``(B, N, 3)`` /
``(B or 1, M, 3)`` without lengths, small enough to run on the calling thread (``B * N`` at most
:data:`difficp.fused.SERIAL_POINTS`, ``N`` below :data:`difficp.inputs.SPATIAL_ORDER_MIN_POINTS`),
hard-nearest correspondences and options the compiled path supports, no gradient asked for,
normals where the options read them, and inputs that pass every check without a warning.
Anything else, including every input the general path would refuse or warn about, returns None
and takes the general path, which says what is wrong: errors and warnings live there alone.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from difficp.compile_cache import compile_or_fall_back
from difficp.config import TENSOR_OPTIONS, ICPConfig
from difficp.inputs import (
    OVERFLOW_MARGIN,
    SPATIAL_ORDER_MIN_POINTS,
    ZERO_NORMAL,
    masked_moments,
    rounding_tolerance,
)
from difficp.loop import (
    ICPResult,
    coarse_rmse_criterion,
    rmse_criterion_for,
    rotation_bound,
    step_tolerance_for,
)

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
# Coordinates above this (per dtype) overflow when squared: the general path refuses them.
_COORDINATE_LIMIT = {d: float(np.finfo(d).max) ** 0.5 / OVERFLOW_MARGIN for d in _FLOATS}

# The kernel options of each config without tensor-valued options (ICPConfig is frozen): a loop
# over small pairs with one config builds them once. Holds the config, so its id is not reused.
_OPTIONS: dict[int, tuple[ICPConfig, np.ndarray, np.ndarray, float]] = {}
_OPTIONS_KEPT = 64


def _array(value: object, grad: bool) -> np.ndarray | None:
    """``value`` as a NumPy array sharing its memory when it is a plain CPU float32 / float64
    tensor or array that asks for no gradient (``grad``: gradients are recorded), else None."""
    if isinstance(value, Tensor):
        if grad and value.requires_grad:
            return None
        try:
            value = value.detach().numpy()  # refuses GPU, sparse and negative-bit tensors
        except (RuntimeError, TypeError):
            return None
    if not isinstance(value, np.ndarray) or value.dtype not in _FLOATS:
        return None
    return value


def _float64(array: np.ndarray) -> np.ndarray:
    """``array`` as a C-contiguous, writable float64 array (a copy where it is not one: the
    kernels are compiled for those; a read-only array would compile another specialisation)."""
    out = np.ascontiguousarray(array, dtype=np.float64)
    return out if out.flags.writeable else out.copy()


def _batched(array: np.ndarray | None, ndim: int) -> tuple[np.ndarray, bool] | None:
    """``array`` with a leading batch dimension (given ``ndim + 1`` dimensions, or ``ndim``:
    then a batch of one is added) and whether it came without one; None for other shapes."""
    if array is None:
        return None
    if array.ndim == ndim:
        return array[None], True
    return (array, False) if array.ndim == ndim + 1 else None


def _points(value: object, grad: bool) -> tuple[np.ndarray, bool] | None:
    """Non-empty clouds ``(B, K, 3)`` (given as such, or one as ``(K, 3)``: the flag) that pass
    the general path's coordinate check, else None."""
    batched = _batched(_array(value, grad), 2)
    if batched is None:
        return None
    points = batched[0]
    if points.shape[2] != 3 or 0 in points.shape:
        return None
    largest = float(np.abs(points).max())  # NaN when any coordinate is NaN
    if not largest <= _COORDINATE_LIMIT[points.dtype]:
        return None
    return batched


def _shaped_normals(
    value: object, shape: tuple[int, ...], grad: bool, unbatched: bool
) -> np.ndarray | None:
    """Normals ``value`` of clouds ``shape`` ``(B, K, 3)`` as an array of that shape (the
    clouds ``unbatched``: they came as ``(K, 3)``, and so may their normals), or None."""
    normals = _array(value, grad)
    if normals is not None and unbatched and normals.ndim == 2:
        normals = normals[None]
    return normals if normals is not None and normals.shape == shape else None


def _normals(
    value: object, shape: tuple[int, ...], dtype: np.dtype, grad: bool, unbatched: bool
) -> np.ndarray | None:
    """Normals the options read (:func:`_shaped_normals`), cast to ``dtype`` then float64 as
    the general path casts them; None when the general path should judge them (shape, NaN,
    zero normals)."""
    normals = _shaped_normals(value, shape, grad, unbatched)
    if normals is None:
        return None
    cast = _float64(normals.astype(dtype, copy=False))
    lengths = np.sqrt((cast * cast).sum(2))
    # NaN fails too; the margin leaves borderline lengths to the general path's own check
    if not float(lengths.min()) >= 2 * ZERO_NORMAL or not np.isfinite(lengths).all():
        return None
    return cast


def _unused_normals_pass(
    value: object, shape: tuple[int, ...], grad: bool, unbatched: bool
) -> bool:
    """Whether normals the options do not read (``value``, None when not given) pass the
    general path's checks of them (shape, finite), which then ignores them."""
    if value is None:
        return True
    normals = _shaped_normals(value, shape, grad, unbatched)
    return normals is not None and bool(np.isfinite(normals).all())


def _init(value: object, batch: int, dtype: np.dtype, grad: bool) -> np.ndarray | None:
    """``(B, 4, 4)`` float64 inits as the general path casts them, or None when they are not
    exactly rigid ``(4, 4)`` / ``(1 or B, 4, 4)`` transforms (the general path then projects
    them with a warning, or refuses them)."""
    if value is None:
        return np.repeat(np.eye(4)[None], batch, axis=0)
    batched = _batched(_array(value, grad), 2)
    if batched is None or batched[0].shape[1:] != (4, 4) or len(batched[0]) not in (1, batch):
        return None
    given = batched[0]
    T = given.astype(dtype, copy=False).astype(np.float64)
    if not np.isfinite(T).all():
        return None
    quiet = rounding_tolerance(given.dtype)
    R = T[:, :3, :3]
    off = float(np.abs(R.transpose(0, 2, 1) @ R - np.eye(3)).max())
    bottom = float(np.abs(T[:, 3] - (0.0, 0.0, 0.0, 1.0)).max())
    if off > quiet or bottom > quiet or float(np.linalg.det(R).min()) <= 0:
        return None
    return np.array(np.broadcast_to(T, (batch, 4, 4)))  # a copy: written to


def _lane_may_run(config: ICPConfig, grad: bool) -> bool:
    """Whether the lane may run ``config`` at all, told without loading numba: hard
    correspondences to a cloud, unrolled or no gradients, no covariances or colours, and no
    tensor-valued option asking for a gradient (``grad``: gradients are recorded)."""
    correspondence = config.strategies.correspondence
    if (
        correspondence.fused_reason is not None
        or correspondence.depth_target
        or config.differentiation == "implicit"
        or config.needs_covariances
        or config.needs_colors
    ):
        return False
    return not grad or not any(
        isinstance(value, Tensor) and value.requires_grad
        for value in (getattr(config, name) for name in TENSOR_OPTIONS)
    )


def _config_options(config: ICPConfig) -> tuple[np.ndarray, np.ndarray, float] | None:
    """The kernel options of ``config`` (one :func:`_lane_may_run` allows) and its small-step
    rotation bound, or None when the compiled path cannot run it."""
    cached = _OPTIONS.get(id(config))
    if cached is not None and cached[0] is config:
        return cached[1:]
    # here: it loads numba, which calls the lane does not take must not
    from difficp.fused import _kernel_options, config_fused_reason

    if config_fused_reason(config) is not None:
        return None
    procrustes = config.strategies.solver.compiled_sums == "moments"
    options, int_options = _kernel_options(config, procrustes)
    entry = (config, options, int_options, rotation_bound(config))
    if not any(isinstance(getattr(config, name), Tensor) for name in TENSOR_OPTIONS):
        if len(_OPTIONS) >= _OPTIONS_KEPT:
            _OPTIONS.clear()
        _OPTIONS[id(config)] = entry
    return entry[1:]


def may_take(
    search_backend: str,
    source: object,
    progress: object,
    source_lengths: object,
    target_lengths: object,
) -> bool:
    """A cheap first look at the shape of a :func:`difficp.icp` call, before
    :func:`express_icp` judges its options and arrays: a small CPU problem (at most 4096 source
    points, the most :data:`difficp.fused.SERIAL_POINTS` allows by default; the lane reads the
    setting itself), no lengths, no progress callback."""
    if search_backend not in ("auto", "compiled") or progress is not None:
        return False
    if source_lengths is not None or target_lengths is not None:
        return False
    if isinstance(source, Tensor):
        if source.device.type != "cpu":
            return False
    elif not isinstance(source, np.ndarray):
        return False
    shape = source.shape
    return len(shape) in (2, 3) and math.prod(shape[:-1]) <= 4096


class _LaneCall(NamedTuple):
    """A problem the lane takes, as :func:`difficp.fused.express_loop` reads it: the clouds as
    given (``(B, N, 3)``, ``(1 or B, M, 3)``), normals where the options read them (else a
    placeholder), the ``(B, 4, 4)`` float64 inits and the kernel options (a tuple: cheap to
    make, and the lane exists to save microseconds)."""

    source: np.ndarray
    target: np.ndarray
    source_normals: np.ndarray
    target_normals: np.ndarray
    init: np.ndarray
    options: np.ndarray
    int_options: np.ndarray
    rotation: float
    dtype: np.dtype  # the clouds' promoted dtype: the result's
    unbatched: bool


def express_icp(
    source: object,
    target: object,
    init: object,
    source_normals: object,
    target_normals: object,
    config: ICPConfig,
    search_backend: str = "auto",
) -> ICPResult | None:
    """:func:`difficp.icp` of a small plain problem in one compiled call, or None when it needs
    the general path (see the module docstring). The result is the general path's, bit for
    bit. ``search_backend``: ``"auto"`` (while the kernel is not compiled, None: see
    :mod:`difficp.compile_cache`) or ``"compiled"`` (compiles it here if need be)."""
    # gradients recorded: differentiation="none" runs the general path under no_grad too
    grad = config.differentiation != "none" and torch.is_grad_enabled()
    if not _lane_may_run(config, grad):
        return None
    call = _lane_call(source, target, init, source_normals, target_normals, config, grad)
    if call is None:
        return None
    # numba (loaded by _lane_call): only for calls the lane may take
    from difficp import fused
    from difficp.kdtree import parallel_unsafe_after_fork

    if parallel_unsafe_after_fork():
        return None
    if search_backend != "compiled" and not compile_or_fall_back(
        fused.compiled_ready(small=True, express=True)
    ):
        return None
    return _run(call, config)


def _lane_call(
    source: object,
    target: object,
    init: object,
    source_normals: object,
    target_normals: object,
    config: ICPConfig,
    grad: bool,
) -> _LaneCall | None:
    """The inputs as the lane's compiled call reads them, or None when the general path must
    take them (``grad``: gradients are recorded)."""
    source_batched, target_batched = _points(source, grad), _points(target, grad)
    if source_batched is None or target_batched is None:
        return None
    (src, unbatched), (tgt, target_unbatched) = source_batched, target_batched
    from difficp import fused  # here: it loads numba, which calls the lane does not take must not

    B, N = src.shape[:2]
    # small problems only: as the general path, on the calling thread, the source unsorted
    if B * N > fused.SERIAL_POINTS or N >= SPATIAL_ORDER_MIN_POINTS or len(tgt) not in (1, B):
        return None
    chosen = _config_options(config)
    if chosen is None:
        return None
    options, int_options, rotation = chosen
    dtype = np.promote_types(src.dtype, tgt.dtype)
    T = _init(init, B, dtype, grad)
    if T is None:
        return None
    M = tgt.shape[1]
    # normals where the options read them (others, checked as the general path does, unused)
    s_normals, t_normals = np.zeros((1, 1, 3)), np.zeros((1, 1, 3))
    if config.needs_source_normals:
        # the general path casts source normals to the source's dtype, then to the problem's
        given = _normals(source_normals, src.shape, src.dtype, grad, unbatched)
        if given is None:
            return None
        s_normals = given
    elif not _unused_normals_pass(source_normals, src.shape, grad, unbatched):
        return None
    if config.needs_target_normals:
        given = _normals(target_normals, (B, M, 3), dtype, grad, target_unbatched)
        if given is None:
            return None
        t_normals = given
    elif not _unused_normals_pass(target_normals, (B, M, 3), grad, target_unbatched):
        return None
    return _LaneCall(
        src, tgt, s_normals, t_normals, T, options, int_options, rotation, dtype, unbatched
    )


def _run(call: _LaneCall, config: ICPConfig) -> ICPResult | None:
    """The compiled loop on ``call`` and its result as the general path's :class:`ICPResult`;
    None where the general path would warn (an RMSE criterion coarse for the cloud)."""
    from difficp import fused  # here: it loads numba, which calls the lane does not take must not

    B, N = call.source.shape[:2]
    M = call.target.shape[1]
    # (the general path casts both clouds to their promoted dtype, then to float64: exact; a
    # target of one cloud serves every pair)
    source64 = _float64(call.source)
    target = call.target if len(call.target) == B else np.broadcast_to(call.target, (B, M, 3))
    target64 = _float64(target)
    mean, radius = masked_moments(source64, np.ones((B, N)), np.full(B, N))
    if coarse_rmse_criterion(radius, config):
        return None  # the general path warns
    result_dtype = torch.float32 if call.dtype == np.float32 else torch.float64
    radius_t = torch.from_numpy(radius).to(result_dtype)
    tolerance = rmse_criterion_for(radius_t, config).double().numpy()
    small_step = step_tolerance_for(radius_t, config)
    step = np.empty(0) if small_step is None else small_step.double().numpy()
    fitness, rmse = np.empty(B), np.empty(B)
    iterations = np.empty(B, dtype=np.int64)
    converged = np.empty(B, dtype=np.bool_)
    history = np.empty((B, config.max_iterations + 1))
    T = call.init
    filled = fused.express_loop(
        source64,
        call.source_normals,
        mean,
        radius,
        target64,
        call.target_normals,
        T,
        call.options,
        call.int_options,
        tolerance,
        float(config.relative_fitness),
        step,
        call.rotation,
        fitness,
        rmse,
        iterations,
        converged,
        history,
    )
    # the general path's result: its float64 tensors in the result dtype (a single pair's
    # batch dropped)
    scores = torch.from_numpy(np.stack((fitness, rmse))).to(result_dtype)
    result = ICPResult(
        torch.from_numpy(T).to(result_dtype),
        scores[0],
        scores[1],
        torch.from_numpy(iterations),
        torch.from_numpy(converged),
        torch.from_numpy(history[:, :filled]).to(result_dtype) if config.return_history else None,
    )
    return result._squeeze() if call.unbatched else result


__all__ = ["express_icp", "may_take"]
