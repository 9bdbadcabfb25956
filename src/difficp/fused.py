"""The compiled fast path of hard-nearest ICP: one fused kernel per iteration.

When nothing needs a gradient, the correspond -> weigh -> accumulate steps of an iteration are
one numba loop over the source points (parallel over pairs and chunks of points): move the
point, find its nearest target point (warm-started from last iteration's partner, see
:mod:`difficp.kdtree`), weigh it, and add its terms to per-pair sums - the normal equations
``sum w J^T J``, ``sum w J^T r`` (linearised metrics) or the weighted moments of Procrustes - plus
the inlier count and squared distances of Open3D's fitness / RMSE. No ``(B, N)`` intermediate is
ever formed, which is what makes ICP memory-bound in PyTorch. The tiny per-pair solves are
compiled too: the same mathematics as :mod:`difficp.solvers` and :mod:`difficp.metrics`.

It computes exactly what the reference path computes (same correspondences, weights, metric and
solver), in float64 throughout; tests check the two agree. The per-point mathematics of each
strategy (robust kernel, rejection, metric) is its compiled twin, defined beside the PyTorch
version in its own module; the kernel receives registry codes (``KERNELS.code(name)``) and
dispatches to the twins through generated switches.

numba caches this module's kernels by this file's timestamp only; :func:`_flush_stale_caches`
drops the cache when a module holding twins changes.
"""

from __future__ import annotations

import hashlib
import math
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import numba
import numpy as np
import torch
from numba import njit, prange
from numba.core.dispatcher import Dispatcher
from torch import Tensor

from difficp import kdtree
from difficp.compile_cache import compile_or_fall_back, kernels_cached
from difficp.config import ICPConfig
from difficp.correspondence import DepthTarget, compiled_threads_as_torch
from difficp.geometry import rotation_between_twin
from difficp.inputs import PointTarget, Problem
from difficp.kdtree import (
    STACK_DEPTH,
    KDForest,
    build_forest,
    note_pool_owner,
    on_calling_thread,
    parallel_unsafe_after_fork,
    warm_two_nearest,
)
from difficp.loop import (
    MIN_CORRESPONDENCES,
    LoopResult,
    Tolerances,
    compiled_small_rigid_step,
    rotation_bound,
)
from difficp.metrics import METRICS
from difficp.solvers import (
    FAR_FROM_ORIGIN,
    compiled_procrustes,
    compiled_solve_normal_equations,
)
from difficp.strategies import compiled
from difficp.strategies.compiled import compile_twin, switch
from difficp.strategies.correspondences import CORRESPONDENCES, Projective, for_target
from difficp.strategies.kernels import KERNELS
from difficp.strategies.rejection import REJECTIONS
from difficp.strategies.solvers import SOLVERS

# Weights below the smallest normal float64 are rejected (as difficp.registration.weigh does).
_TINY_WEIGHT = np.finfo(np.float64).tiny

# Source points per parallel task: enough work to amortise scheduling, small enough to balance.
CHUNK = 1024

# The strategies' compiled twins, dispatched by registry code (their registration order).
_robust_weight = switch([kernel.compiled_weight for kernel in KERNELS], 2)
_keep = switch([rejection.compiled_keep for rejection in REJECTIONS], 2)
_metric_residual = switch([getattr(m, "compiled_residual", None) for m in METRICS], 2)
_metric_accumulate = switch([getattr(m, "compiled_accumulate", None) for m in METRICS], 6)
_metric_step = switch([getattr(m, "compiled_step_to_transform", None) for m in METRICS], 2)
# Per metric code: how far its linearisation point moves under centring (see _centred_step_update).
_CENTRE_FACTOR = np.array([m.centre_factor for m in METRICS])
_NO_KERNEL = KERNELS.code(None)

# Layout of a task's sums (one row of ``sums``).
INLIERS, INLIER_SQ, WEIGHTED = 0, 1, 2
# Procrustes: sum w, mean p (3), mean q (3), sum w (q - mean q)(p - mean p)^T (9), and the
# spreads sum w |p - mean p|^2, sum w |q - mean q|^2 (the rounding bound of the rotation)
MOMENTS = 3
MOMENT_WIDTH = 18
NORMAL_EQ = 3  # linearised: upper triangle of J^T W J (21), J^T W r (6)
SUM_WIDTH = 32


class _Pose(NamedTuple):
    """The transform the kernels move the sources by, and where they centre the sums: made
    together for one evaluation (:meth:`FusedSteps._pose`, :func:`_evaluate_whole`), so the
    kernels take them as one argument.

    Attributes:
        rotation, translation: ``(B, 3, 3)``, ``(B, 3)`` the current transform.
        center: ``(B, 3)`` subtracted from both sides before the Procrustes moments or the
            normal equations are accumulated (conditioning, as in the reference solvers): the
            moved source centroids.
    """

    rotation: np.ndarray
    translation: np.ndarray
    center: np.ndarray


@njit(parallel=True, cache=True, error_model="numpy")
def fused_iteration(
    source: np.ndarray,
    source_normals: np.ndarray,
    source_counts: np.ndarray,
    pose: _Pose,
    partner: np.ndarray,
    anchor: np.ndarray,
    safe2: np.ndarray,
    target_normals: np.ndarray,
    forest: KDForest,
    active: np.ndarray,
    options: np.ndarray,
    int_options: np.ndarray,
    sums: np.ndarray,
    source_covariances: np.ndarray,
    target_covariances: np.ndarray,
    source_features: np.ndarray,
    target_features: np.ndarray,
) -> None:
    """Correspond, weigh and accumulate every source point of every active pair.

    Args:
        source: ``(B, N, 3)``; pair ``b`` uses its first ``source_counts[b]`` points.
        source_normals: ``(B, N, 3)`` (any values when the config does not use them).
        pose: the current transform and the centre of the sums (:class:`_Pose`).
        partner: ``(B, N)`` int64 forest row of each point's last partner (-1: none); updated.
        anchor, safe2: ``(B, N, 3)``, ``(B, N)`` where each point was at its last search and the
            squared distance it may move from there with the same nearest neighbour; updated.
        target_normals: ``(P, 3)`` in forest order (any values when unused).
        forest: the targets' :class:`~difficp.kdtree.KDForest`.
        active: ``(B,)`` bool, pairs to process (others keep their partners, sums stay 0).
        options: float64 ``[search radius^2, max_distance (stats / soft rejection / linear
            weight; inf = none), rejection temperature, cos(max_normal_angle) (-inf = none),
            kernel scale]``.
        int_options: int64 ``[metric code (METRICS.code), procrustes (1) or normal equations
            (0), rejection code (REJECTIONS.code), weight_distance, weight_normal, robust kernel
            code (KERNELS.code), uses source normals, uses target normals, uses covariances,
            uses colour features]``.
        sums: ``(B * tasks_per_pair, SUM_WIDTH)`` zeros; task rows get their sums (combine a
            pair's rows with :func:`_merge_task_sums`: Procrustes moments do not add).
        source_covariances, target_covariances: ``(B, N, 3, 3)`` and ``(P, 3, 3)`` in forest
            order (metric ``"gicp"``; any values when unused): the twins get the upper
            triangle of ``C = S_q + R S_p R^T``.
        source_features, target_features: ``(B, N)`` and ``(P, 5)`` in forest order, the colour
            terms of metric ``"colored"`` (:func:`difficp.colors.colored_features`; any values
            when unused): the twins get the source's ``s I_p`` and its partner's
            ``sqrt(lambda), s I_q, s d_q``.
    """
    radius2, max_distance, rejection_t, cos_min, kernel_scale = (
        options[0],
        options[1],
        options[2],
        options[3],
        options[4],
    )
    metric, procrustes, rejection, weight_distance, weight_normal, kernel = (
        int_options[0],
        int_options[1],
        int_options[2],
        int_options[3],
        int_options[4],
        int_options[5],
    )
    uses_normals, uses_target_normals = int_options[6] == 1, int_options[7] == 1
    uses_covariances, uses_features = int_options[8] == 1, int_options[9] == 1
    B, N = source.shape[0], source.shape[1]
    tasks = (N + CHUNK - 1) // CHUNK
    for task in prange(B * tasks):
        b = task // tasks
        if not active[b]:
            continue
        stack = np.empty(STACK_DEPTH, dtype=np.int64)
        stack_d2 = np.empty(STACK_DEPTH)
        J = np.empty(6)
        RS = np.empty((3, 3))  # R S_p scratch (gicp)
        R = pose.rotation[b]
        t = pose.translation[b]
        c = pose.center[b]
        points = forest.points
        empty = forest.point_offset[b + 1] == forest.point_offset[b]
        stop = min((task % tasks + 1) * CHUNK, source_counts[b])
        for i in range((task % tasks) * CHUNK, stop):
            px, py, pz = _rotate(R, source[b, i])
            px, py, pz = px + t[0], py + t[1], pz + t[2]
            best, best_d2 = _find_partner(
                px, py, pz, b, i, partner, anchor, safe2, radius2, forest, empty, stack, stack_d2
            )
            if best < 0:
                continue
            d = math.sqrt(best_d2)
            if d < max_distance:
                sums[task, INLIERS] += 1.0
                sums[task, INLIER_SQ] += best_d2

            # weights: distance rejection x linear weights x normal rejection x robust kernel
            w = _distance_weight(d, max_distance, rejection, rejection_t, weight_distance)
            qx, qy, qz = points[best, 0], points[best, 1], points[best, 2]
            mx = my = mz = nx = ny = nz = 0.0
            if uses_target_normals:
                nx, ny, nz = (
                    target_normals[best, 0],
                    target_normals[best, 1],
                    target_normals[best, 2],
                )
            if uses_normals:
                mx, my, mz = _rotate(R, source_normals[b, i])
                cosine = mx * nx + my * ny + mz * nz
                w = _normal_weight(w, cosine, cos_min, rejection, rejection_t, weight_normal)
            # p and q centred on c (conditioning of the sums)
            ax, ay, az = px - c[0], py - c[1], pz - c[2]
            bx, by, bz = qx - c[0], qy - c[1], qz - c[2]
            # the metric's six extra values: GICP's combined covariance, or colored's features
            c00 = c01 = c02 = c11 = c12 = c22 = 0.0
            if uses_features:
                c00 = source_features[b, i]
                c01, c02 = target_features[best, 0], target_features[best, 1]
                c11, c12 = target_features[best, 2], target_features[best, 3]
                c22 = target_features[best, 4]
            if uses_covariances:
                # C = S_q + R S_p R^T (difficp.registration.combined_covariances)
                S = source_covariances[b, i]
                Q = target_covariances[best]
                for u in range(3):
                    for k in range(3):
                        RS[u, k] = R[u, 0] * S[0, k] + R[u, 1] * S[1, k] + R[u, 2] * S[2, k]

                c00 = Q[0, 0] + RS[0, 0] * R[0, 0] + RS[0, 1] * R[0, 1] + RS[0, 2] * R[0, 2]
                c01 = Q[0, 1] + RS[0, 0] * R[1, 0] + RS[0, 1] * R[1, 1] + RS[0, 2] * R[1, 2]
                c02 = Q[0, 2] + RS[0, 0] * R[2, 0] + RS[0, 1] * R[2, 1] + RS[0, 2] * R[2, 2]
                c11 = Q[1, 1] + RS[1, 0] * R[1, 0] + RS[1, 1] * R[1, 1] + RS[1, 2] * R[1, 2]
                c12 = Q[1, 2] + RS[1, 0] * R[2, 0] + RS[1, 1] * R[2, 1] + RS[1, 2] * R[2, 2]
                c22 = Q[2, 2] + RS[2, 0] * R[2, 0] + RS[2, 1] * R[2, 1] + RS[2, 2] * R[2, 2]
            v = (
                px - qx, py - qy, pz - qz, ax, ay, az, bx, by, bz, mx, my, mz, nx, ny, nz,
                c00, c01, c02, c11, c12, c22,
            )  # fmt: skip
            _robust_accumulate(sums, task, J, w, d, v, metric, procrustes, kernel, kernel_scale)


@njit(inline="always", error_model="numpy")
def _rotate(
    R: np.ndarray, u: np.ndarray | tuple[float, float, float]
) -> tuple[float, float, float]:
    """``R u`` for ``R`` ``(3, 3)`` and ``u`` ``(3,)``, as three floats (registers)."""
    return (
        R[0, 0] * u[0] + R[0, 1] * u[1] + R[0, 2] * u[2],
        R[1, 0] * u[0] + R[1, 1] * u[1] + R[1, 2] * u[2],
        R[2, 0] * u[0] + R[2, 1] * u[1] + R[2, 2] * u[2],
    )


@njit(inline="always", error_model="numpy")
def _find_partner(
    px: float,
    py: float,
    pz: float,
    b: int,
    i: int,
    partner: np.ndarray,
    anchor: np.ndarray,
    safe2: np.ndarray,
    radius2: float,
    forest: KDForest,
    empty: bool,
    stack: np.ndarray,
    stack_d2: np.ndarray,
) -> tuple[int, float]:
    """Forest row and squared distance of the nearest target point of source point ``i`` of
    pair ``b``, moved to ``p`` (-1 and ``radius2``: none within the radius); updates its
    ``partner``, ``anchor`` and ``safe2`` (see :func:`fused_iteration`)."""
    points = forest.points
    last = partner[b, i]
    dx = px - anchor[b, i, 0]
    dy = py - anchor[b, i, 1]
    dz = pz - anchor[b, i, 2]
    if last >= 0 and dx * dx + dy * dy + dz * dz < safe2[b, i]:
        # Moved less than half the gap between the nearest and second-nearest
        # distances since the last search: the nearest cannot have changed.
        dx = points[last, 0] - px
        dy = points[last, 1] - py
        dz = points[last, 2] - pz
        return last, dx * dx + dy * dy + dz * dz
    best, best_d2, second_d2 = -1, radius2, radius2
    if not empty:
        best_d2, best, second_d2 = warm_two_nearest(
            px, py, pz, last, radius2, forest, b, stack, stack_d2
        )
    anchor[b, i, 0], anchor[b, i, 1], anchor[b, i, 2] = px, py, pz
    gap = 0.5 * (math.sqrt(second_d2) - math.sqrt(best_d2))
    safe2[b, i] = gap * gap if best >= 0 else 0.0
    partner[b, i] = best
    return best, best_d2


@njit(inline="always", error_model="numpy")
def _distance_weight(
    d: float, max_distance: float, rejection: int, temperature: float, linear: int
) -> float:
    """Distance rejection (the rejection strategy's twin) times ``1 - d / max_distance``."""
    w = 1.0
    if max_distance < np.inf:
        w = _keep(rejection, max_distance - d, temperature)
    if linear == 1:
        w *= max(1.0 - d / max_distance, 0.0)
    return w


@njit(inline="always", error_model="numpy")
def _normal_weight(
    w: float, cosine: float, cos_min: float, rejection: int, temperature: float, linear: int
) -> float:
    """``w`` times normal-angle rejection (``cos_min`` -inf: none) times ``max(cosine, 0)``
    (in this order: the reference path's rounding)."""
    if cos_min > -np.inf:
        w *= _keep(rejection, cosine - cos_min, temperature)
    if linear == 1:
        w *= max(cosine, 0.0)
    return w


@njit(inline="always", error_model="numpy")
def _robust_accumulate(
    sums: np.ndarray,
    task: int,
    J: np.ndarray,
    w: float,
    d: float,
    v: tuple,
    metric: int,
    procrustes: int,
    kernel: int,
    kernel_scale: float,
) -> None:
    """Scale the weight ``w`` of one correspondence (distance ``d``, values ``v`` as
    :func:`fused_iteration` lays them out) by the robust kernel of its residual and add it to
    task ``task``'s row of ``sums``: Procrustes moments, or the metric's normal equations
    (``J``: scratch ``(6,)``)."""
    r = d if procrustes == 1 else _metric_residual(metric, d, v)  # svd: point_to_point
    if kernel != _NO_KERNEL:
        w *= _robust_weight(kernel, abs(r), kernel_scale)
    if w < _TINY_WEIGHT:  # subnormal weights count as 0 (difficp.registration.weigh)
        return
    sums[task, WEIGHTED] += 1.0
    if procrustes == 1:
        _add_moments(sums, task, w, v)
    else:
        _metric_accumulate(metric, sums, task, NORMAL_EQ, J, w, v)


@njit(inline="always", error_model="numpy")
def _add_moments(sums: np.ndarray, task: int, w: float, v: tuple) -> None:
    """Adds ``a = v[3:6]``, ``b = v[6:9]`` with weight ``w`` to the task's Procrustes moments
    (see MOMENTS) by West's weighted update: the co-moment about the running weighted means.
    Raw sums ``w q p^T`` lost digits when one partner carried nearly all the weight (the centred
    moments are then a small difference of two large products)."""
    if w == 0.0:
        return
    total = sums[task, MOMENTS] + w
    share = w / total
    sums[task, MOMENTS] = total
    ax, ay, az = v[3:6]
    dpx = ax - sums[task, MOMENTS + 1]
    dpy = ay - sums[task, MOMENTS + 2]
    dpz = az - sums[task, MOMENTS + 3]
    sums[task, MOMENTS + 1] += share * dpx
    sums[task, MOMENTS + 2] += share * dpy
    sums[task, MOMENTS + 3] += share * dpz
    # a minus the new mean: (1 - share) times a minus the old one
    keep = w * (1.0 - share)
    sums[task, MOMENTS + 16] += keep * (dpx * dpx + dpy * dpy + dpz * dpz)
    dpx, dpy, dpz = keep * dpx, keep * dpy, keep * dpz
    k = MOMENTS + 7
    for i in range(3):
        dq = v[6 + i] - sums[task, MOMENTS + 4 + i]
        sums[task, MOMENTS + 4 + i] += share * dq
        sums[task, MOMENTS + 17] += keep * dq * dq
        sums[task, k] += dq * dpx
        sums[task, k + 1] += dq * dpy
        sums[task, k + 2] += dq * dpz
        k += 3


@njit(cache=True, error_model="numpy")
def _merge_task_sums(task_sums: np.ndarray, tasks: int, procrustes: int, out: np.ndarray) -> None:
    """Each pair's row of ``out`` ``(B, SUM_WIDTH)`` from its ``tasks`` rows of ``task_sums``,
    added in order; Procrustes moments merge by Chan's pairwise rule (weights add, means
    combine, co-moments add plus the spread between the two means)."""
    for b in range(out.shape[0]):
        out[b] = task_sums[b * tasks]
        for k in range(1, tasks):
            row = task_sums[b * tasks + k]
            if procrustes == 0:
                out[b] += row
                continue
            for j in range(MOMENTS):
                out[b, j] += row[j]
            end = MOMENTS + MOMENT_WIDTH
            _merge_moments(out[b, MOMENTS:end], row[MOMENTS:end])


@njit(inline="always", error_model="numpy")
def _merge_moments(into: np.ndarray, other: np.ndarray) -> None:
    """Chan et al.'s merge of two weighted moment sets (layout of MOMENTS) into ``into``."""
    w1, w2 = into[0], other[0]
    if w2 == 0.0:
        return
    if w1 == 0.0:
        into[:] = other
        return
    total = w1 + w2
    share = w2 / total
    spread = w1 * share  # w1 w2 / (w1 + w2)
    into[0] = total
    dp = other[1:4] - into[1:4]  # between the two means of p, and below of q
    dq2 = 0.0
    for i in range(3):
        dq = other[4 + i] - into[4 + i]
        dq2 += dq * dq
        for j in range(3):
            into[7 + 3 * i + j] += other[7 + 3 * i + j] + spread * dq * dp[j]
    into[16] += other[16] + spread * (dp[0] * dp[0] + dp[1] * dp[1] + dp[2] * dp[2])
    into[17] += other[17] + spread * dq2
    for i in range(1, 7):
        into[i] += share * (other[i] - into[i])


def fused_supported(problem: Problem, config: ICPConfig) -> str | None:
    """None when the fast path computes this problem exactly, else the reason it cannot."""
    correspondence = for_target(config.correspondence, problem.target)
    if correspondence.fused_reason is not None:
        return correspondence.fused_reason
    if problem.source.device.type != "cpu":
        return "the compiled path runs on the CPU"
    reason = config_fused_reason(config)
    if reason is not None:
        return reason
    if parallel_unsafe_after_fork():
        return "this is a forked process and its parent's OpenMP pool cannot run in it"
    return None


def config_fused_reason(config: ICPConfig) -> str | None:
    """None when the fast path computes these options (weighting, rejection, kernel, metric,
    solver) exactly, else the reason it cannot; whatever the inputs."""
    strategies = config.strategies
    for strategy in (strategies.solver, strategies.metric, strategies.kernel, strategies.rejection):
        reason = getattr(strategy, "fused_reason", None)
        if reason is not None:
            return reason
    if config.weight_distance and config.max_distance is None:
        return "weight_distance without max_distance needs each pair's largest distance"
    return None


class FusedSteps:
    """Evaluates and solves the ICP iterations of one :class:`~difficp.inputs.Problem` through
    :func:`fused_iteration`, for :func:`difficp.loop.run_loop`. Works in float64.

    Holds the forest (built once) and every point's last partner between iterations.
    """

    dtype = torch.float64

    def __init__(self, problem: Problem, config: ICPConfig) -> None:
        self._prepare_source(problem, config)
        target = problem.target
        assert isinstance(target, PointTarget)
        # Padded clouds keep their valid points first (prefix masks), so counts describe them.
        target_counts = target.mask.sum(1).cpu().numpy()
        B, N = self.source.shape[:2]
        # a small problem runs on the calling thread (see run_loop), its trees too
        self.serial = B * N <= SERIAL_POINTS
        # the target's forest, if the covariance estimate built it already (metric "gicp")
        shared = None if target.index is None else target.index.built_forest()
        self.forest: KDForest = (
            shared
            if shared is not None
            else build_forest(_numpy(target.points), target_counts, parallel=not self.serial)
        )
        self.target_normals: np.ndarray = np.zeros((1, 3))
        if target.normals is not None:
            normals = _numpy(target.normals)
            f = self.forest
            cloud = np.repeat(np.arange(B), np.diff(f.point_offset))
            self.target_normals = np.ascontiguousarray(normals[cloud, f.order])
        self.source_covariances = np.zeros((1, 1, 3, 3))
        self.target_covariances = np.zeros((1, 3, 3))
        if config.needs_covariances:
            assert problem.source_covariances is not None and target.covariances is not None
            self.source_covariances = _numpy(problem.source_covariances)
            f = self.forest
            cloud = np.repeat(np.arange(B), np.diff(f.point_offset))
            self.target_covariances = np.ascontiguousarray(
                _numpy(target.covariances)[cloud, f.order]
            )
        self.source_features = np.zeros((1, 1))
        self.target_features = np.zeros((1, 5))
        if config.needs_colors:
            assert problem.source_features is not None and target.features is not None
            self.source_features = _numpy(problem.source_features[..., 0])
            f = self.forest
            cloud = np.repeat(np.arange(B), np.diff(f.point_offset))
            self.target_features = np.ascontiguousarray(_numpy(target.features)[cloud, f.order])
        self.partner = np.full((B, N), -1, dtype=np.int64)
        self.anchor = np.zeros((B, N, 3))
        self.safe2 = np.zeros((B, N))

    def _prepare_source(self, problem: Problem, config: ICPConfig) -> None:
        """What every compiled kernel needs whatever the target: the check that it can run, the
        thread pool, the source as float64 arrays (points ``(B, N, 3)``, normals, counts
        ``(B,)``, centroid ``(B, 3)``, radius ``(B,)``), the task count and the options."""
        reason = fused_supported(problem, config)
        if reason is not None:
            raise ValueError(f"the compiled ICP path cannot run this problem: {reason}")
        self.procrustes = config.strategies.solver.compiled_sums == "moments"
        compiled_threads_as_torch()
        self.source = _numpy(problem.source)
        self.source_counts = problem.source_counts.cpu().numpy().astype(np.int64)
        self.source_normals = np.zeros((1, 1, 3))
        if config.needs_source_normals:
            assert problem.source_normals is not None
            self.source_normals = _numpy(problem.source_normals)
        self.source_mean = problem.source_centroid_np
        self.source_radius = problem.source_radius_np
        self.tasks = (self.source.shape[1] + CHUNK - 1) // CHUNK
        self.options, self.int_options = _kernel_options(config, self.procrustes)

    def _pose(self, transform: Tensor) -> tuple[_Pose, np.ndarray]:
        """``transform`` ``(B, 4, 4)`` as the kernels take it (centred on the moved source
        centroids) and zeroed per-task sums ``(B * tasks, SUM_WIDTH)``."""
        T = transform.numpy()
        R = np.ascontiguousarray(T[:, :3, :3])
        t = np.ascontiguousarray(T[:, :3, 3])
        # Procrustes moments and normal equations about the moved source centroid stay
        # accurate for clouds far from the origin.
        center = np.einsum("bij,bj->bi", R, self.source_mean) + t
        sums = np.zeros((T.shape[0] * self.tasks, SUM_WIDTH))
        return _Pose(R, t, center), sums

    def _reduce(
        self, sums: np.ndarray, center: np.ndarray
    ) -> tuple[Tensor, Tensor, tuple[np.ndarray, np.ndarray]]:
        """Fitness ``(B,)``, inlier RMSE ``(B,)`` and the state of :meth:`step` from the
        per-task ``sums`` of a kernel."""
        pair_sums = np.empty((center.shape[0], SUM_WIDTH))
        _merge_task_sums(sums, self.tasks, self.int_options[1], pair_sums)
        count = pair_sums[:, INLIERS]
        fitness = count / np.maximum(self.source_counts, 1)
        rmse = np.where(count > 0, np.sqrt(pair_sums[:, INLIER_SQ] / np.maximum(count, 1)), 0.0)
        return torch.from_numpy(fitness), torch.from_numpy(rmse), (pair_sums, center)

    def evaluate(
        self, transform: Tensor, active: Tensor
    ) -> tuple[Tensor, Tensor, tuple[np.ndarray, np.ndarray]]:
        """Correspond and accumulate the ``active`` pairs at ``transform`` ``(B, 4, 4)``.

        Returns fitness ``(B,)``, inlier RMSE ``(B,)`` and the state :meth:`step` needs.
        """
        pose, sums = self._pose(transform)
        fused_iteration(
            self.source,
            self.source_normals,
            self.source_counts,
            pose,
            self.partner,
            self.anchor,
            self.safe2,
            self.target_normals,
            self.forest,
            active.numpy(),
            self.options,
            self.int_options,
            sums,
            self.source_covariances,
            self.target_covariances,
            self.source_features,
            self.target_features,
        )
        return self._reduce(sums, pose.center)

    def run_loop(
        self, init: Tensor, config: ICPConfig, tolerances: Tolerances, min_iterations: int
    ) -> LoopResult | None:
        """:func:`difficp.loop.run_loop` (rigid) in one compiled call (:func:`_whole_loop`):
        a small problem on one thread, a larger one with its kernels on the thread pool (no
        Python between iterations either way). None (the lock-step iterations then run) above
        ``WHOLE_LOOP_POINTS``, or while the whole-loop kernel is not compiled yet for a
        problem that is not small."""
        B, N = self.source.shape[:2]
        if B * N > WHOLE_LOOP_POINTS:
            return None
        if not self.serial and not kernels_cached((_whole_loop,)):
            return None
        T = np.array(init.detach().cpu().numpy(), dtype=np.float64)  # a copy: written to
        if tolerances.rmse is None:
            tolerance = np.full(B, float(config.relative_rmse))
        else:
            tolerance = tolerances.rmse.detach().cpu().double().numpy()
        # an empty array turns the small-step rule off
        small_step = np.empty(0)
        if tolerances.step is not None:
            small_step = tolerances.step.detach().cpu().double().numpy()
        fitness, rmse = np.empty(B), np.empty(B)
        iterations = np.empty(B, dtype=np.int64)
        converged = np.empty(B, dtype=np.bool_)
        history = np.empty((B, config.max_iterations + 1))
        problem = _WholeLoopProblem(
            self.source,
            self.source_normals,
            self.source_counts,
            self.source_mean,
            self.source_radius,
            self.partner,
            self.anchor,
            self.safe2,
            self.target_normals,
            self.forest,
            self.options,
            self.int_options,
            self.tasks,
            self.source_covariances,
            self.target_covariances,
            self.source_features,
            self.target_features,
        )
        with on_calling_thread() if self.serial else nullcontext():
            filled = _whole_loop(
                T,
                problem,
                tolerance,
                float(config.relative_fitness),
                small_step,
                rotation_bound(config),
                int(min_iterations),
                fitness,
                rmse,
                iterations,
                converged,
                history,
            )
        return LoopResult(
            value=torch.from_numpy(T),
            fitness=torch.from_numpy(fitness),
            inlier_rmse=torch.from_numpy(rmse),
            iterations=torch.from_numpy(iterations),
            converged=torch.from_numpy(converged),
            rmse_history=torch.from_numpy(history[:, :filled]) if config.return_history else None,
            damping=torch.full((B,), float(config.lm_damping), dtype=torch.float64),
        )

    def step(
        self, state: tuple[np.ndarray, np.ndarray], damping: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The ``(B, 4, 4)`` update, the (unchanged) damping and ``(B,)`` bool: the pair had
        enough weighted correspondences."""
        sums, center = state
        enough = torch.from_numpy(sums[:, WEIGHTED] >= MIN_CORRESPONDENCES)
        update = np.empty((sums.shape[0], 4, 4))
        # difficp.solvers.linearization_pivot, in NumPy (a few torch calls cost 40 us here)
        radius = self.source_radius
        far = np.sqrt((center * center).sum(1)) > FAR_FROM_ORIGIN * radius
        metric, procrustes = self.int_options[0], self.int_options[1]
        _solve_updates(sums, center, far, metric, procrustes, update)
        return torch.from_numpy(update), damping, enough


def _scalar(value: float | Tensor) -> float:
    """A config option as a float (tensors may require grad: the fast path gives no gradient)."""
    return float(value.detach()) if isinstance(value, Tensor) else float(value)


def _numpy(values: Tensor) -> np.ndarray:
    return np.ascontiguousarray(values.detach().cpu().double().numpy())


# The per-pair solves, compiled: their twins stand beside the PyTorch functions they mirror in
# difficp.solvers (tests check they agree), and save ~40 small PyTorch calls per iteration,
# which measured 0.5 ms - a third of a 10k-point iteration.

_procrustes_update = compile_twin(compiled_procrustes)
_solve_regularized = compile_twin(compiled_solve_normal_equations)
_small_rigid_step = compile_twin(compiled_small_rigid_step)


@njit(cache=True, error_model="numpy")
def _centred_step_update(
    step: np.ndarray, center: np.ndarray, far: bool, metric: int, out: np.ndarray
) -> None:
    """:func:`difficp.solvers._step_to_transform`: the update of a step solved in coordinates
    centred on ``center``, about the world origin, or about ``center`` when ``far``."""
    if not far:
        # the same step in world coordinates: translation v - k (omega x c)
        k = _CENTRE_FACTOR[metric]
        o = step[:3]
        step[3] -= k * (o[1] * center[2] - o[2] * center[1])
        step[4] -= k * (o[2] * center[0] - o[0] * center[2])
        step[5] -= k * (o[0] * center[1] - o[1] * center[0])
    _metric_step(metric, step, out)
    if far:
        for i in range(3):
            out[i, 3] += center[i] - (
                out[i, 0] * center[0] + out[i, 1] * center[1] + out[i, 2] * center[2]
            )


@njit(parallel=True, cache=True, error_model="numpy")
def _solve_updates(
    sums: np.ndarray,
    center: np.ndarray,
    far: np.ndarray,
    metric: int,
    procrustes: int,
    out: np.ndarray,
) -> None:
    """Every pair's ``(4, 4)`` update into ``out`` ``(B, 4, 4)`` from its sums (accumulated about
    ``center`` ``(B, 3)``; ``far`` ``(B,)``: see :func:`difficp.solvers.linearization_pivot`)."""
    for b in prange(sums.shape[0]):
        A = np.empty((6, 6))
        x = np.empty(6)
        out[b] = np.eye(4)
        if procrustes == 1:
            _procrustes_update(sums[b, MOMENTS : MOMENTS + MOMENT_WIDTH], center[b], out[b])
            continue
        k = NORMAL_EQ
        for i in range(6):
            for j in range(i, 6):
                A[i, j] = A[j, i] = sums[b, k]
                k += 1
        _solve_regularized(A, sums[b, NORMAL_EQ + 21 : NORMAL_EQ + 27], x)
        _centred_step_update(x, center[b], far[b], metric, out[b])


# ----------------------------------------------------------------------------------------------
# The whole loop in one compiled call
# ----------------------------------------------------------------------------------------------

# Every rigid point-cloud problem runs its whole loop in one compiled function (no PyTorch
# between iterations: ~25 small calls, 0.3 ms each iteration; measured 30% of a batch of 64
# pairs of 100 points at one thread), unless a progress callback asks to hear from every
# iteration. Up to this many source points in all (B * N) it runs on the calling thread: no
# thread pool to wake (waking it for every kernel cost 20-40 ms per call for 100 points on 2
# busy cores); larger problems run its kernels on the pool. Its kernels are the parallel ones
# (run with one thread when small), not serial twins compiled without ``parallel``: those paid
# NumPy-array reference counting (atomic increments) for every point, 300-400 ns per point
# against 30 in the parallel kernels' outlined loop bodies.
SERIAL_POINTS = 4096
# Above this many source points the lock-step iterations run instead: one compiled call cannot
# be interrupted (Ctrl-C waits for its end), and an iteration then takes tens of milliseconds,
# against ~0.3 ms of PyTorch between lock-step iterations.
WHOLE_LOOP_POINTS = 1 << 18


class _WholeLoopProblem(NamedTuple):
    """The arrays of a :class:`FusedSteps` that :func:`_whole_loop` runs on (those of
    :func:`fused_iteration`, plus the centroids and radii of the sources): one argument instead
    of fifteen. ``partner``, ``anchor`` and ``safe2`` are updated in place."""

    source: np.ndarray
    source_normals: np.ndarray
    source_counts: np.ndarray
    source_mean: np.ndarray
    source_radius: np.ndarray
    partner: np.ndarray
    anchor: np.ndarray
    safe2: np.ndarray
    target_normals: np.ndarray
    forest: KDForest
    options: np.ndarray
    int_options: np.ndarray
    tasks: int
    source_covariances: np.ndarray
    target_covariances: np.ndarray
    source_features: np.ndarray
    target_features: np.ndarray


@njit(cache=True, error_model="numpy")
def _evaluate_whole(
    T: np.ndarray,
    active: np.ndarray,
    p: _WholeLoopProblem,
    fitness: np.ndarray,
    rmse: np.ndarray,
    sums: np.ndarray,
    center: np.ndarray,
) -> None:
    """:meth:`FusedSteps.evaluate` at ``T`` ``(B, 4, 4)``: fitness and RMSE ``(B,)``, the pairs'
    ``sums`` ``(B, SUM_WIDTH)`` and their ``center`` ``(B, 3)``, written into the arguments."""
    B = T.shape[0]
    R = np.ascontiguousarray(T[:, :3, :3])
    t = np.ascontiguousarray(T[:, :3, 3])
    mean, tasks = p.source_mean, p.tasks
    for b in range(B):
        for i in range(3):
            center[b, i] = (
                R[b, i, 0] * mean[b, 0]
                + R[b, i, 1] * mean[b, 1]
                + R[b, i, 2] * mean[b, 2]
                + t[b, i]
            )
    task_sums = np.zeros((B * tasks, SUM_WIDTH))
    fused_iteration(
        p.source,
        p.source_normals,
        p.source_counts,
        _Pose(R, t, center),
        p.partner,
        p.anchor,
        p.safe2,
        p.target_normals,
        p.forest,
        active,
        p.options,
        p.int_options,
        task_sums,
        p.source_covariances,
        p.target_covariances,
        p.source_features,
        p.target_features,
    )
    _merge_task_sums(task_sums, tasks, p.int_options[1], sums)
    for b in range(B):
        count = sums[b, INLIERS]
        fitness[b] = count / max(p.source_counts[b], 1)
        rmse[b] = math.sqrt(sums[b, INLIER_SQ] / max(count, 1.0)) if count > 0 else 0.0


@njit(cache=True, error_model="numpy")
def _orthonormalized_product(update: np.ndarray, T: np.ndarray, out: np.ndarray) -> None:
    """:func:`difficp.loop.compose_rigid` of one pair: ``update @ T`` ``(4, 4)`` with its
    rotation pulled back onto SO(3) by one Newton-Schulz step, into ``out``."""
    P = np.zeros((4, 4))
    for i in range(4):
        for j in range(4):
            for k in range(4):
                P[i, j] += update[i, k] * T[k, j]
    G = np.empty((3, 3))  # 3 I - R^T R
    for i in range(3):
        for j in range(3):
            G[i, j] = (3.0 if i == j else 0.0) - (
                P[0, i] * P[0, j] + P[1, i] * P[1, j] + P[2, i] * P[2, j]
            )
    for i in range(3):
        for j in range(3):
            out[i, j] = 0.5 * P[i, 0] * G[0, j] + 0.5 * P[i, 1] * G[1, j] + 0.5 * P[i, 2] * G[2, j]
        out[i, 3] = P[i, 3]
        out[3, i] = 0.0
    out[3, 3] = 1.0


@njit(cache=True, error_model="numpy")
def _whole_loop(
    T: np.ndarray,
    p: _WholeLoopProblem,
    tolerance: np.ndarray,
    relative_fitness: float,
    step_translation: np.ndarray,
    step_rotation: float,
    min_iterations: int,
    fitness: np.ndarray,
    rmse: np.ndarray,
    iterations: np.ndarray,
    converged: np.ndarray,
    history: np.ndarray,
) -> int:
    """:func:`difficp.loop.run_loop` over the :class:`FusedSteps` of a problem, in one call
    (its kernels on the calling thread's numba thread count): the same lock-step iterations,
    stopping rule and outputs. ``T`` ``(B, 4, 4)`` (the initial transforms) becomes the result;
    ``step_translation`` ``(B,)`` and ``step_rotation`` are the small-step rule's bounds (an
    empty array: no such rule); ``fitness``, ``rmse`` ``(B,)``, ``iterations`` ``(B,)`` int64,
    ``converged`` ``(B,)`` bool and ``history`` ``(B, max_iterations + 1)`` are written. Returns
    the number of columns of ``history`` filled."""
    B = T.shape[0]
    active = np.ones(B, dtype=np.bool_)
    sums = np.zeros((B, SUM_WIDTH))
    center = np.empty((B, 3))
    new_fitness = np.empty(B)
    new_rmse = np.empty(B)
    update = np.empty((B, 4, 4))
    moved = np.empty((4, 4))
    far = np.empty(B, dtype=np.bool_)
    small = np.zeros(B, dtype=np.bool_)
    metric, procrustes = p.int_options[0], p.int_options[1]
    radius = p.source_radius
    _evaluate_whole(T, active, p, fitness, rmse, sums, center)
    history[:, 0] = rmse
    filled = 1
    iterations[:] = 0
    converged[:] = False
    for iteration in range(history.shape[1] - 1):
        for b in range(B):
            c = center[b]
            far[b] = math.sqrt(c[0] * c[0] + c[1] * c[1] + c[2] * c[2]) > (
                FAR_FROM_ORIGIN * radius[b]
            )
        _solve_updates(sums, center, far, metric, procrustes, update)
        any_active = False
        for b in range(B):
            # too few weighted correspondences: the pair stops with its last good transform
            active[b] = active[b] and sums[b, WEIGHTED] >= MIN_CORRESPONDENCES
            if active[b]:
                if step_translation.size:
                    small[b] = _small_rigid_step(update[b], step_translation[b], step_rotation)
                _orthonormalized_product(update[b], T[b], moved)
                T[b] = moved
                any_active = True
        if not any_active:
            break
        _evaluate_whole(T, active, p, new_fitness, new_rmse, sums, center)
        any_active = False
        for b in range(B):
            if active[b]:
                iterations[b] += 1
                done = (
                    abs(new_fitness[b] - fitness[b]) < relative_fitness
                    and abs(new_rmse[b] - rmse[b]) < tolerance[b]
                ) or small[b]
                done = done and iteration + 1 >= min_iterations
                fitness[b] = new_fitness[b]
                rmse[b] = new_rmse[b]
                converged[b] = converged[b] or done
                active[b] = not done
                any_active = any_active or active[b]
        history[:, filled] = rmse
        filled += 1
        if not any_active:
            break
    return filled


@njit(cache=True, error_model="numpy")
def _express_loop(
    source: np.ndarray,
    source_normals: np.ndarray,
    source_mean: np.ndarray,
    source_radius: np.ndarray,
    target: np.ndarray,
    target_normals: np.ndarray,
    T: np.ndarray,
    options: np.ndarray,
    int_options: np.ndarray,
    tolerance: np.ndarray,
    relative_fitness: float,
    step_translation: np.ndarray,
    step_rotation: float,
    fitness: np.ndarray,
    rmse: np.ndarray,
    iterations: np.ndarray,
    converged: np.ndarray,
    history: np.ndarray,
) -> int:
    """:func:`_whole_loop` of a small problem from its plain arrays, the targets' KD-trees built
    here: what :class:`FusedSteps` does in Python, for :mod:`difficp.express` (one compiled
    call, on the calling thread alone: small problems).

    ``source`` ``(B, N, 3)``, ``source_normals`` ``(B, N, 3)`` (``(1, 1, 3)`` when unused),
    ``source_mean`` ``(B, 3)`` and ``source_radius`` ``(B,)``, ``target`` ``(B, M, 3)`` and
    ``target_normals`` ``(B, M, 3)`` in the targets' own order (``(1, 1, 3)`` when unused), all
    float64; the rest as :func:`_whole_loop` (``min_iterations`` 0). Returns the columns of
    ``history`` filled. Its parallel kernels run on the caller's numba thread count: set it to 1
    (numba's thread count cannot be set in a cached function)."""
    B, N, M = source.shape[0], source.shape[1], target.shape[1]
    counts = np.full(B, M, dtype=np.int64)
    forest, capacity_offset = kdtree._new_forest(counts, kdtree.LEAF_SIZE)
    kdtree._build_forest(target, counts, capacity_offset, forest, kdtree.LEAF_SIZE)
    normals = np.zeros((1, 3))
    if target_normals.shape[0] == B and target_normals.shape[1] == M:
        # in tree order, as FusedSteps keeps them (tree b holds rows b * M to (b + 1) * M)
        normals = np.empty((B * M, 3))
        for row in range(B * M):
            normals[row] = target_normals[row // M, forest.order[row]]
    problem = _WholeLoopProblem(
        source,
        source_normals,
        np.full(B, N, dtype=np.int64),
        source_mean,
        source_radius,
        np.full((B, N), -1, dtype=np.int64),
        np.zeros((B, N, 3)),
        np.zeros((B, N)),
        normals,
        forest,
        options,
        int_options,
        (N + CHUNK - 1) // CHUNK,
        np.zeros((1, 1, 3, 3)),
        np.zeros((1, 3, 3)),
        np.zeros((1, 1)),
        np.zeros((1, 5)),
    )
    return _whole_loop(
        T,
        problem,
        tolerance,
        relative_fitness,
        step_translation,
        step_rotation,
        0,
        fitness,
        rmse,
        iterations,
        converged,
        history,
    )


def express_loop(*arrays: Any) -> int:
    """:func:`_express_loop` (its arguments, in its order) on the calling thread alone, as
    :class:`FusedSteps` runs small problems (:func:`~difficp.kdtree.on_calling_thread`, with
    less overhead: ~3 against ~5 us)."""
    note_pool_owner()
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        return _express_loop(*arrays)
    finally:
        numba.set_num_threads(threads)


def compiled_ready(small: bool, projective: bool = False, express: bool = False) -> bool:
    """Whether the kernels a problem needs (``small``: the whole loop on the calling thread,
    else the parallel iterations, which the whole loop of a larger problem compiles with it;
    ``projective``: the depth-map kernel; ``express``: :func:`_express_loop`) are compiled
    in this process or in numba's cache, so that running them costs no compilation (1-3 minutes
    on 2 cores). True when that cannot be told (other numba)."""
    kernels: tuple[Dispatcher, ...] = (
        (_whole_loop, kdtree._build_forest)
        if small
        else (fused_iteration, _solve_updates, kdtree._build_forest, kdtree._build_tree_parallel)
    )
    if projective:
        kernels = (projective_iteration, _solve_updates)
    if express:
        kernels = (_express_loop,)
    return kernels_cached(kernels)


def compile_now(problem: Problem) -> bool:
    """For ``search_backend="auto"``: whether to run the fast path now (its kernels are
    compiled, or ``DIFFICP_COMPILE=now`` compiles them here) or the PyTorch path for now (a
    background process compiles them meanwhile: a first call in a fresh environment then
    takes seconds, not the minutes of compiling; see :mod:`difficp.compile_cache`)."""
    B, N = problem.source.shape[:2]
    projective = isinstance(problem.target, DepthTarget)
    return compile_or_fall_back(
        compiled_ready(B * N <= SERIAL_POINTS and not projective, projective)
    )


def _flush_stale_caches() -> None:
    """Drop this module's numba caches when a strategy module changed since they were written.

    numba keys a cached function on its own file only, but these kernels inline the compiled
    twins of :mod:`difficp.strategies` and :mod:`difficp.metrics` (and call :mod:`difficp.kdtree`):
    an edited or added twin would otherwise run the old cached code. A digest of those files,
    kept beside the cache, tells.
    """
    registries = (CORRESPONDENCES, REJECTIONS, KERNELS, METRICS, SOLVERS)
    modules = {sys.modules[type(s).__module__] for r in registries for s in r}
    # ... and the per-pair solves' twins (difficp.solvers, difficp.geometry)
    twins = {sys.modules[f.__module__] for f in (compiled_procrustes, rotation_between_twin)}
    files = sorted({m.__file__ for m in (*modules, *twins, kdtree, compiled) if m.__file__})
    digest = hashlib.sha256(b"".join(Path(f).read_bytes() for f in files)).hexdigest()
    try:
        # numba's private cache handle: the AttributeError below covers a numba without it
        cache_dir = fused_iteration._cache._cache_path  # type: ignore[attr-defined]
        stamp = Path(cache_dir) / "fused.twins.sha256"
        if stamp.exists() and stamp.read_text() == digest:
            return
        for value in list(globals().values()):
            cache = getattr(value, "_cache", None)
            if isinstance(value, Dispatcher) and cache is not None and hasattr(cache, "flush"):
                cache.flush()
        stamp.write_text(digest)
    except (AttributeError, OSError):  # no cache (read-only install, other numba): compile
        pass


# ---------------------------------------------------------------------------------------------
# Projective correspondences to depth maps: the same fused iteration with the partner looked up
# by projection (Projective.compiled_pixel) instead of searched in a KD forest.
# ---------------------------------------------------------------------------------------------

_pixel = compile_twin(Projective.compiled_pixel)


@njit(inline="always", error_model="numpy")
def _weigh_and_accumulate(
    sums: np.ndarray,
    task: int,
    J: np.ndarray,
    d2: float,
    p: tuple[float, float, float],
    q: tuple[float, float, float],
    n: tuple[float, float, float],
    u: tuple[float, float, float],
    R: np.ndarray,
    c: np.ndarray,
    options: np.ndarray,
    int_options: np.ndarray,
) -> None:
    """Steps 3-5 of one correspondence (moved source point ``p``, partner ``q``, partner normal
    ``n`` and unrotated source normal ``u``, squared distance ``d2``) into row ``task`` of
    ``sums``: the inlier statistics, its weight and its Procrustes moments or normal equations.
    The same arithmetic as the body of :func:`fused_iteration` after its search, with the
    ``options`` / ``int_options`` layout documented there."""
    max_distance, rejection_t, cos_min, kernel_scale = (
        options[1],
        options[2],
        options[3],
        options[4],
    )
    metric, procrustes, rejection = int_options[0], int_options[1], int_options[2]
    weight_distance, weight_normal, kernel = int_options[3], int_options[4], int_options[5]
    px, py, pz = p
    qx, qy, qz = q
    d = math.sqrt(d2)
    if d < max_distance:
        sums[task, INLIERS] += 1.0
        sums[task, INLIER_SQ] += d2
    w = _distance_weight(d, max_distance, rejection, rejection_t, weight_distance)
    mx = my = mz = nx = ny = nz = 0.0
    if int_options[7] == 1:
        nx, ny, nz = n
    if int_options[6] == 1:
        mx, my, mz = _rotate(R, u)
        cosine = mx * nx + my * ny + mz * nz
        w = _normal_weight(w, cosine, cos_min, rejection, rejection_t, weight_normal)
    ax, ay, az = px - c[0], py - c[1], pz - c[2]
    bx, by, bz = qx - c[0], qy - c[1], qz - c[2]
    # The per-correspondence values as fused_iteration lays them out; the last six (GICP's
    # combined covariance, upper triangle) are the identity: projective targets carry none
    # (nor colour features: metric "colored" needs point-cloud targets).
    v = (px - qx, py - qy, pz - qz, ax, ay, az, bx, by, bz, mx, my, mz, nx, ny, nz,
         1.0, 0.0, 0.0, 1.0, 0.0, 1.0)  # fmt: skip
    _robust_accumulate(sums, task, J, w, d, v, metric, procrustes, kernel, kernel_scale)


@njit(parallel=True, cache=True, error_model="numpy")
def projective_iteration(
    source: np.ndarray,
    source_normals: np.ndarray,
    source_counts: np.ndarray,
    pose: _Pose,
    camera: np.ndarray,
    intrinsics: np.ndarray,
    shape: np.ndarray,
    target_points: np.ndarray,
    target_normals: np.ndarray,
    usable: np.ndarray,
    active: np.ndarray,
    options: np.ndarray,
    int_options: np.ndarray,
    sums: np.ndarray,
) -> None:
    """:func:`fused_iteration` for a depth-map target: each moved source point's partner is the
    target pixel it projects onto (:meth:`~difficp.strategies.correspondences.Projective
    .compiled_pixel`), as :func:`difficp.correspondence.projective_correspondences` finds it.

    Args:
        source, source_normals, source_counts, pose, active, options, int_options, sums: as
            for :func:`fused_iteration` (``options[0]``, the search radius,
            is unused: a projective partner is rejected by its weight, as on the PyTorch path).
        camera: ``(B, 4, 4)`` world-to-camera transforms of the target depth maps.
        intrinsics: ``(B, 4)`` ``fx, fy, cx, cy``.
        shape: int64 ``[H, W]`` of the depth maps.
        target_points, target_normals: ``(B, H * W, 3)`` back-projected target points and their
            normals in the world frame (row-major pixels).
        usable: ``(B, H * W)`` bool: pixels with depth (and a normal when the config needs one).
    """
    B, N = source.shape[0], source.shape[1]
    h, w = shape[0], shape[1]
    tasks = (N + CHUNK - 1) // CHUNK
    for task in prange(B * tasks):
        b = task // tasks
        if not active[b]:
            continue
        J = np.empty(6)
        R = pose.rotation[b]
        t = pose.translation[b]
        C = camera[b]
        fx, fy, cx, cy = intrinsics[b, 0], intrinsics[b, 1], intrinsics[b, 2], intrinsics[b, 3]
        stop = min((task % tasks + 1) * CHUNK, source_counts[b])
        for i in range((task % tasks) * CHUNK, stop):
            sx, sy, sz = source[b, i, 0], source[b, i, 1], source[b, i, 2]
            px = R[0, 0] * sx + R[0, 1] * sy + R[0, 2] * sz + t[0]
            py = R[1, 0] * sx + R[1, 1] * sy + R[1, 2] * sz + t[1]
            pz = R[2, 0] * sx + R[2, 1] * sy + R[2, 2] * sz + t[2]
            x = C[0, 0] * px + C[0, 1] * py + C[0, 2] * pz + C[0, 3]
            y = C[1, 0] * px + C[1, 1] * py + C[1, 2] * pz + C[1, 3]
            z = C[2, 0] * px + C[2, 1] * py + C[2, 2] * pz + C[2, 3]
            pixel = _pixel(x, y, z, fx, fy, cx, cy, h, w)
            if pixel < 0 or not usable[b, pixel]:
                continue
            qx = target_points[b, pixel, 0]
            qy = target_points[b, pixel, 1]
            qz = target_points[b, pixel, 2]
            dx, dy, dz = px - qx, py - qy, pz - qz
            n = (
                target_normals[b, pixel, 0],
                target_normals[b, pixel, 1],
                target_normals[b, pixel, 2],
            )
            u = (0.0, 0.0, 0.0)
            if int_options[6] == 1:
                u = (source_normals[b, i, 0], source_normals[b, i, 1], source_normals[b, i, 2])
            _weigh_and_accumulate(
                sums,
                task,
                J,
                dx * dx + dy * dy + dz * dz,
                (px, py, pz),
                (qx, qy, qz),
                n,
                u,
                R,
                pose.center[b],
                options,
                int_options,
            )


class FusedProjectiveSteps(FusedSteps):
    """:class:`FusedSteps` for a depth-map target (projective correspondences): the same
    evaluate / step protocol, with :func:`projective_iteration` as the kernel. Works in float64.
    """

    def __init__(self, problem: Problem, config: ICPConfig) -> None:
        self._prepare_source(problem, config)
        target = problem.target
        assert isinstance(target, DepthTarget)
        B, H, W, _ = target.points.shape
        self.shape = np.array([H, W], dtype=np.int64)
        self.target_points = _numpy(target.points).reshape(B, H * W, 3)
        self.target_normals = _numpy(target.normals).reshape(B, H * W, 3)
        usable = target.valid.reshape(B, H * W).cpu().numpy()
        if config.match_options.require_normals:  # as Projective.find
            usable = usable & (np.abs(self.target_normals).sum(-1) > 0)
        self.usable = np.ascontiguousarray(usable)
        self.camera = _numpy(target.world_to_camera)
        K = _numpy(target.intrinsics)
        self.intrinsics = np.ascontiguousarray(
            np.stack([K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2]], axis=1)
        )
        self.serial = False

    def run_loop(
        self, init: Tensor, config: ICPConfig, tolerances: Tolerances, min_iterations: int
    ) -> None:
        """None: the whole-loop kernel searches KD-trees, so a depth-map target runs the
        lock-step iterations of :func:`difficp.loop.run_loop`."""
        return None

    def evaluate(
        self, transform: Tensor, active: Tensor
    ) -> tuple[Tensor, Tensor, tuple[np.ndarray, np.ndarray]]:
        """As :meth:`FusedSteps.evaluate`, by projection."""
        pose, sums = self._pose(transform)
        projective_iteration(
            self.source,
            self.source_normals,
            self.source_counts,
            pose,
            self.camera,
            self.intrinsics,
            self.shape,
            self.target_points,
            self.target_normals,
            self.usable,
            active.numpy(),
            self.options,
            self.int_options,
            sums,
        )
        return self._reduce(sums, pose.center)


def _kernel_options(config: ICPConfig, procrustes: bool) -> tuple[np.ndarray, np.ndarray]:
    """The ``options`` / ``int_options`` arrays of the fused kernels (layout: see
    :func:`fused_iteration`; :func:`projective_iteration` reads the first eight integer options)."""
    md = None if config.max_distance is None else _scalar(config.max_distance)
    hard_radius = md is not None and config.strategies.rejection.bounds_search
    angle = config.max_normal_angle
    options = np.array(
        [
            md**2 if md is not None and hard_radius else np.inf,
            np.inf if md is None else md,
            _scalar(config.rejection_temperature),
            -np.inf if angle is None else math.cos(math.radians(_scalar(angle))),
            _scalar(config.kernel_scale),
        ]
    )
    int_options = np.array(
        [
            METRICS.code(config.metric),
            int(procrustes),
            REJECTIONS.code(config.rejection),
            int(bool(config.weight_distance)),
            int(bool(config.weight_normal)),
            KERNELS.code(config.robust_kernel),
            int(config.needs_source_normals),
            int(config.needs_target_normals),
            int(config.needs_covariances),
            int(config.needs_colors),
        ],
        dtype=np.int64,
    )
    return options, int_options


def fused_steps(problem: Problem, config: ICPConfig) -> FusedSteps:
    """The compiled steps for ``problem``: by projection for a depth-map target, else by
    nearest neighbour."""
    if isinstance(problem.target, DepthTarget):
        return FusedProjectiveSteps(problem, config)
    return FusedSteps(problem, config)


_flush_stale_caches()
