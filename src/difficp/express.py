"""The express lane of :func:`difficp.icp`: one small, plain pair straight to the compiled loop.

A lone call on a small pair used to spend most of its time outside the compiled loop: ~0.45 ms of
input checks, batching, tensors and set-up around ~0.07 ms of compiled work at 100 points. Here a
pair that needs none of the general path's machinery goes from its arrays to one compiled call
(:func:`difficp.fused.small_pair_loop`, which also builds the target's KD-tree) and back.

It takes only what it computes exactly as the general path does (the same kernels on the same
float64 arrays, the same stopping tolerances; tests compare the two bit for bit): a single pair of
CPU float32/float64 tensors or arrays ``(N, 3)`` / ``(M, 3)`` (or batches of one, ``(1, N, 3)``,
whose results keep their batch) with fewer than
:data:`difficp.inputs.SPATIAL_ORDER_MIN_POINTS` source points, hard-nearest correspondences and
options the compiled path supports, no gradient asked for, normals exactly when the options read
them, and inputs that pass every check without a warning. Anything else, including every input
the general path would refuse or warn about, returns None and takes the general path, which
says what is wrong: errors and warnings live there alone.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from difficp import fused
from difficp.compile_cache import compile_or_fall_back
from difficp.config import TENSOR_OPTIONS, ICPConfig
from difficp.fused import _kernel_options, config_fused_reason
from difficp.inputs import (
    OVERFLOW_MARGIN,
    SPATIAL_ORDER_MIN_POINTS,
    ZERO_NORMAL,
    masked_moments,
)
from difficp.kdtree import parallel_unsafe_after_fork
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


def _single(array: np.ndarray | None, ndim: int) -> tuple[np.ndarray, bool] | None:
    """``array`` of ``ndim`` dimensions, or of ``ndim + 1`` with a leading batch of one (then
    dropped), and whether it had that batch; None for any other shape."""
    if array is None:
        return None
    if array.ndim == ndim + 1 and array.shape[0] == 1:
        return array[0], True
    return (array, False) if array.ndim == ndim else None


def _points(value: object, grad: bool) -> tuple[np.ndarray, bool] | None:
    """A non-empty ``(K, 3)`` cloud (given as such or as ``(1, K, 3)``: the flag) that passes
    the general path's coordinate check, else None."""
    single = _single(_array(value, grad), 2)
    if single is None:
        return None
    points = single[0]
    if points.shape[1] != 3 or points.shape[0] == 0:
        return None
    largest = float(np.abs(points).max())  # NaN when any coordinate is NaN
    if not largest <= _COORDINATE_LIMIT[points.dtype]:
        return None
    return single


def _normals(
    value: object, shape: tuple[int, ...], dtype: np.dtype, grad: bool, batched: bool
) -> np.ndarray | None:
    """``(1, K, 3)`` normals of a cloud ``shape`` ``(K, 3)`` (``batched``: it came as
    ``(1, K, 3)``, and its normals must too), cast to ``dtype`` then float64 as the general path
    casts them, or None when the general path should judge them (shape, NaN, zero normals)."""
    single = _single(_array(value, grad), 2)
    if single is None or single[0].shape != shape or (batched and not single[1]):
        return None
    cast = np.ascontiguousarray(single[0].astype(dtype, copy=False), dtype=np.float64)
    lengths = np.sqrt((cast * cast).sum(1))
    # NaN fails too; the margin leaves borderline lengths to the general path's own check
    if not float(lengths.min()) >= 2 * ZERO_NORMAL or not np.isfinite(lengths).all():
        return None
    return cast[None]


def _init(value: object, dtype: np.dtype, grad: bool) -> np.ndarray | None:
    """``(1, 4, 4)`` float64 init as the general path casts it, or None when it is not an
    exactly rigid ``(4, 4)`` / ``(1, 4, 4)`` (the general path then projects it with a warning,
    or refuses it)."""
    if value is None:
        return np.eye(4)[None]
    single = _single(_array(value, grad), 2)
    if single is None or single[0].shape != (4, 4):
        return None
    given = single[0]
    T = given.astype(dtype, copy=False).astype(np.float64)
    if not np.isfinite(T).all():
        return None
    quiet = max(1e-6, 10 * float(np.finfo(given.dtype).eps))
    R = T[:3, :3]
    off = float(np.abs(R.T @ R - np.eye(3)).max())
    bottom = float(np.abs(T[3] - (0.0, 0.0, 0.0, 1.0)).max())
    if off > quiet or bottom > quiet or float(np.linalg.det(R)) <= 0:
        return None
    return T[None].copy()  # written to


def _config_options(config: ICPConfig) -> tuple[np.ndarray, np.ndarray, float] | None:
    """The kernel options of ``config`` and its small-step rotation bound, or None when the
    express lane cannot run it."""
    cached = _OPTIONS.get(id(config))
    if cached is not None and cached[0] is config:
        return cached[1:]
    strategies = config.strategies
    correspondence = strategies.correspondence
    if (
        correspondence.fused_reason is not None
        or correspondence.depth_target
        or config.differentiation == "implicit"
        or config.needs_covariances
        or config.needs_colors
        or config_fused_reason(config) is not None
    ):
        return None
    procrustes = strategies.solver.compiled_sums == "moments"
    options, int_options = _kernel_options(config, procrustes)
    entry = (config, options, int_options, rotation_bound(config))
    if not any(isinstance(getattr(config, name), Tensor) for name in TENSOR_OPTIONS):
        if len(_OPTIONS) >= _OPTIONS_KEPT:
            _OPTIONS.clear()
        _OPTIONS[id(config)] = entry
    return entry[1:]


def _options_ask_for_gradients(config: ICPConfig, grad: bool) -> bool:
    """Whether a tensor-valued option asks for a gradient (the general path then unrolls)."""
    return grad and any(
        isinstance(value, Tensor) and value.requires_grad
        for value in (getattr(config, name) for name in TENSOR_OPTIONS)
    )


def express_icp(
    source: object,
    target: object,
    init: object,
    source_normals: object,
    target_normals: object,
    config: ICPConfig,
    search_backend: str = "auto",
) -> ICPResult | None:
    """:func:`difficp.icp` of one small plain pair in one compiled call, or None when the pair
    needs the general path (see the module docstring). The result is the general path's, bit
    for bit. ``search_backend``: ``"auto"`` (while the kernel is not compiled, None: see
    :mod:`difficp.compile_cache`) or ``"compiled"`` (compiles it here if need be)."""
    # gradients recorded: differentiation="none" runs the general path under no_grad too
    grad = config.differentiation != "none" and torch.is_grad_enabled()
    source_single, target_single = _points(source, grad), _points(target, grad)
    if source_single is None or target_single is None:
        return None
    (src, batched), (tgt, target_batched) = source_single, target_single
    if src.shape[0] >= SPATIAL_ORDER_MIN_POINTS:
        return None
    chosen = _config_options(config)
    if chosen is None or _options_ask_for_gradients(config, grad):
        return None
    options, int_options, rotation = chosen
    dtype = np.promote_types(src.dtype, tgt.dtype)
    T = _init(init, dtype, grad)
    if T is None:
        return None
    # normals exactly when the options read them (others the general path checks and ignores)
    unused = np.zeros((1, 1, 3))
    s_normals, t_normals = unused, unused[0]
    if config.needs_source_normals:
        # the general path casts source normals to the source's dtype, then to the problem's
        given = _normals(source_normals, src.shape, src.dtype, grad, batched)
        if given is None:
            return None
        s_normals = given
    elif source_normals is not None:
        return None
    if config.needs_target_normals:
        given = _normals(target_normals, tgt.shape, dtype, grad, target_batched)
        if given is None:
            return None
        t_normals = given[0]
    elif target_normals is not None:
        return None
    if parallel_unsafe_after_fork():
        return None
    if search_backend != "compiled" and not compile_or_fall_back(
        fused.compiled_ready(small=True, express=True)
    ):
        return None
    # (the general path casts both clouds to their promoted dtype, then to float64: exact)
    source64 = np.ascontiguousarray(src, dtype=np.float64)[None]
    target64 = np.ascontiguousarray(tgt, dtype=np.float64)[None]
    N = source64.shape[1]
    mean, radius = masked_moments(source64, np.ones((1, N)), np.array([N]))
    if coarse_rmse_criterion(radius, config):
        return None  # the general path warns
    radius_t = torch.from_numpy(radius).to(torch.float32 if dtype == np.float32 else torch.float64)
    tolerance = rmse_criterion_for(radius_t, config).double().numpy()
    small_step = step_tolerance_for(radius_t, config)
    step = np.empty(0) if small_step is None else small_step.double().numpy()
    fitness, rmse = np.empty(1), np.empty(1)
    iterations = np.empty(1, dtype=np.int64)
    converged = np.empty(1, dtype=np.bool_)
    history = np.empty((1, config.max_iterations + 1))
    filled = fused.small_pair_loop(
        source64,
        s_normals,
        mean,
        radius,
        target64,
        t_normals,
        T,
        options,
        int_options,
        tolerance,
        float(config.relative_fitness),
        step,
        rotation,
        fitness,
        rmse,
        iterations,
        converged,
        history,
    )
    result_dtype = torch.float32 if dtype == np.float32 else torch.float64
    # the general path's result: its float64 tensors in the result dtype, the batch of one kept
    # when the source came batched
    scores = torch.from_numpy(np.stack((fitness, rmse))).to(result_dtype)
    result = ICPResult(
        torch.from_numpy(T).to(result_dtype),
        scores[0],
        scores[1],
        torch.from_numpy(iterations),
        torch.from_numpy(converged),
        torch.from_numpy(history[:, :filled]).to(result_dtype) if config.return_history else None,
    )
    return result if batched else result._squeeze()


__all__ = ["express_icp"]
