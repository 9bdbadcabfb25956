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
from pathlib import Path

import numpy as np
import torch
from numba import njit, prange
from numba.core.dispatcher import Dispatcher
from torch import Tensor

from difficp import kdtree
from difficp.config import ICPConfig
from difficp.inputs import PointTarget, Problem
from difficp.kdtree import (
    STACK_DEPTH,
    KDForest,
    build_forest,
    parallel_unsafe_after_fork,
    set_threads,
    warm_two_nearest,
)
from difficp.loop import MIN_CORRESPONDENCES, source_radius
from difficp.metrics import METRICS
from difficp.solvers import FAR_FROM_ORIGIN, PROCRUSTES_NOISE
from difficp.strategies import compiled
from difficp.strategies.compiled import switch
from difficp.strategies.correspondences import CORRESPONDENCES, for_target
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
MOMENTS = 3  # Procrustes: w, w p (3), w q (3), w q p^T (9)
NORMAL_EQ = 3  # linearised: upper triangle of J^T W J (21), J^T W r (6)
SUM_WIDTH = 32


@njit(parallel=True, cache=True, error_model="numpy")
def fused_iteration(
    source: np.ndarray,
    source_normals: np.ndarray,
    source_counts: np.ndarray,
    rotation: np.ndarray,
    translation: np.ndarray,
    center: np.ndarray,
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
) -> None:
    """Correspond, weigh and accumulate every source point of every active pair.

    Args:
        source: ``(B, N, 3)``; pair ``b`` uses its first ``source_counts[b]`` points.
        source_normals: ``(B, N, 3)`` (any values when the config does not use them).
        rotation, translation: ``(B, 3, 3)``, ``(B, 3)`` the current transform.
        center: ``(B, 3)`` subtracted from both sides before the Procrustes moments or the
            normal equations are accumulated (conditioning, as in the reference solvers).
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
            code (KERNELS.code), uses source normals, uses target normals, uses covariances]``.
        sums: ``(B * tasks_per_pair, SUM_WIDTH)`` zeros; task rows get their sums.
        source_covariances, target_covariances: ``(B, N, 3, 3)`` and ``(P, 3, 3)`` in forest
            order (metric ``"gicp"``; any values when unused): the twins get the upper
            triangle of ``C = S_q + R S_p R^T``.
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
    uses_covariances = int_options[8] == 1
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
        R = rotation[b]
        t = translation[b]
        c = center[b]
        points = forest.points
        empty = forest.point_offset[b + 1] == forest.point_offset[b]
        stop = min((task % tasks + 1) * CHUNK, source_counts[b])
        for i in range((task % tasks) * CHUNK, stop):
            sx, sy, sz = source[b, i, 0], source[b, i, 1], source[b, i, 2]
            px = R[0, 0] * sx + R[0, 1] * sy + R[0, 2] * sz + t[0]
            py = R[1, 0] * sx + R[1, 1] * sy + R[1, 2] * sz + t[1]
            pz = R[2, 0] * sx + R[2, 1] * sy + R[2, 2] * sz + t[2]
            last = partner[b, i]
            dx = px - anchor[b, i, 0]
            dy = py - anchor[b, i, 1]
            dz = pz - anchor[b, i, 2]
            if last >= 0 and dx * dx + dy * dy + dz * dz < safe2[b, i]:
                # Moved less than half the gap between the nearest and second-nearest
                # distances since the last search: the nearest cannot have changed.
                best = last
                dx = points[last, 0] - px
                dy = points[last, 1] - py
                dz = points[last, 2] - pz
                best_d2 = dx * dx + dy * dy + dz * dz
            else:
                best, best_d2, second_d2 = -1, radius2, radius2
                if not empty:
                    best_d2, best, second_d2 = warm_two_nearest(
                        px, py, pz, last, radius2, forest, b, stack, stack_d2
                    )
                anchor[b, i, 0], anchor[b, i, 1], anchor[b, i, 2] = px, py, pz
                gap = 0.5 * (math.sqrt(second_d2) - math.sqrt(best_d2))
                safe2[b, i] = gap * gap if best >= 0 else 0.0
            partner[b, i] = best
            if best < 0:
                continue
            d = math.sqrt(best_d2)
            if d < max_distance:
                sums[task, INLIERS] += 1.0
                sums[task, INLIER_SQ] += best_d2

            # weights: distance rejection x linear weights x normal rejection x robust kernel
            w = 1.0
            if max_distance < np.inf:
                w = _keep(rejection, max_distance - d, rejection_t)
            if weight_distance == 1:
                w *= max(1.0 - d / max_distance, 0.0)
            qx, qy, qz = points[best, 0], points[best, 1], points[best, 2]
            mx = my = mz = nx = ny = nz = 0.0
            if uses_target_normals:
                nx = target_normals[best, 0]
                ny = target_normals[best, 1]
                nz = target_normals[best, 2]
            if uses_normals:
                ux, uy, uz = (
                    source_normals[b, i, 0],
                    source_normals[b, i, 1],
                    source_normals[b, i, 2],
                )
                mx = R[0, 0] * ux + R[0, 1] * uy + R[0, 2] * uz
                my = R[1, 0] * ux + R[1, 1] * uy + R[1, 2] * uz
                mz = R[2, 0] * ux + R[2, 1] * uy + R[2, 2] * uz
                cosine = mx * nx + my * ny + mz * nz
                if cos_min > -np.inf:
                    w *= _keep(rejection, cosine - cos_min, rejection_t)
                if weight_normal == 1:
                    w *= max(cosine, 0.0)
            # p and q centred on c (conditioning of the sums)
            ax, ay, az = px - c[0], py - c[1], pz - c[2]
            bx, by, bz = qx - c[0], qy - c[1], qz - c[2]
            c00 = c01 = c02 = c11 = c12 = c22 = 0.0
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
            r = d if procrustes == 1 else _metric_residual(metric, d, v)  # svd: point_to_point
            if kernel != _NO_KERNEL:
                w *= _robust_weight(kernel, abs(r), kernel_scale)
            if w < _TINY_WEIGHT:  # subnormal weights count as 0 (difficp.registration.weigh)
                continue
            sums[task, WEIGHTED] += 1.0

            if procrustes == 1:
                sums[task, MOMENTS] += w
                sums[task, MOMENTS + 1] += w * ax
                sums[task, MOMENTS + 2] += w * ay
                sums[task, MOMENTS + 3] += w * az
                sums[task, MOMENTS + 4] += w * bx
                sums[task, MOMENTS + 5] += w * by
                sums[task, MOMENTS + 6] += w * bz
                k = MOMENTS + 7
                for qv in (bx, by, bz):
                    for pv in (ax, ay, az):
                        sums[task, k] += w * qv * pv
                        k += 1
            else:
                _metric_accumulate(metric, sums, task, NORMAL_EQ, J, w, v)


def fused_supported(problem: Problem, config: ICPConfig) -> str | None:
    """None when the fast path computes this problem exactly, else the reason it cannot."""
    strategies = config.strategies
    correspondence = for_target(config.correspondence, problem.target)
    if correspondence.fused_reason is not None:
        return correspondence.fused_reason
    if problem.source.device.type != "cpu":
        return "the compiled path runs on the CPU"
    for strategy in (strategies.solver, strategies.metric, strategies.kernel, strategies.rejection):
        reason = getattr(strategy, "fused_reason", None)
        if reason is not None:
            return reason
    if config.weight_distance and config.max_distance is None:
        return "weight_distance without max_distance needs each pair's largest distance"
    if parallel_unsafe_after_fork():
        return "this is a forked process and its parent's OpenMP pool cannot run in it"
    return None


class FusedSteps:
    """Evaluates and solves the ICP iterations of one :class:`~difficp.inputs.Problem` through
    :func:`fused_iteration`, for :func:`difficp.loop.run_loop`. Works in float64.

    Holds the forest (built once) and every point's last partner between iterations.
    """

    dtype = torch.float64

    def __init__(self, problem: Problem, config: ICPConfig) -> None:
        reason = fused_supported(problem, config)
        if reason is not None:
            raise ValueError(f"the compiled ICP path cannot run this problem: {reason}")
        target = problem.target
        assert isinstance(target, PointTarget)
        self.procrustes = config.strategies.solver.compiled_sums == "moments"
        threads = torch.get_num_threads()
        set_threads(threads)
        # Starting numba's OpenMP pool resets the process's OpenMP thread count, which PyTorch
        # shares: keep the caller's torch.set_num_threads.
        torch.set_num_threads(threads)
        # Padded clouds keep their valid points first (prefix masks), so counts describe them.
        target_counts = target.mask.sum(1).cpu().numpy()
        self.forest: KDForest = build_forest(_numpy(target.points), target_counts)
        self.source = _numpy(problem.source)
        self.source_counts = problem.source_counts.cpu().numpy().astype(np.int64)
        B, N = self.source.shape[:2]
        self.source_normals = np.zeros((1, 1, 3))
        if config.needs_source_normals:
            assert problem.source_normals is not None
            self.source_normals = _numpy(problem.source_normals)
        self.target_normals = np.zeros((1, 3))
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
        self.source_mean = (self.source * (problem.source_mask.cpu().numpy()[..., None])).sum(
            1
        ) / np.maximum(self.source_counts, 1)[:, None]
        self.source_radius = source_radius(problem).double().numpy()
        self.partner = np.full((B, N), -1, dtype=np.int64)
        self.anchor = np.zeros((B, N, 3))
        self.safe2 = np.zeros((B, N))
        self.tasks = (N + CHUNK - 1) // CHUNK
        md = None if config.max_distance is None else _scalar(config.max_distance)
        hard_radius = md is not None and config.rejection == "hard"
        angle = config.max_normal_angle
        self.options = np.array(
            [
                md**2 if hard_radius else np.inf,
                np.inf if md is None else md,
                _scalar(config.rejection_temperature),
                -np.inf if angle is None else math.cos(math.radians(_scalar(angle))),
                _scalar(config.kernel_scale),
            ]
        )
        self.int_options = np.array(
            [
                METRICS.code(config.metric),
                int(self.procrustes),
                REJECTIONS.code(config.rejection),
                int(bool(config.weight_distance)),
                int(bool(config.weight_normal)),
                KERNELS.code(config.robust_kernel),
                int(config.needs_source_normals),
                int(config.needs_target_normals),
                int(config.needs_covariances),
            ],
            dtype=np.int64,
        )

    def evaluate(
        self, transform: Tensor, active: Tensor
    ) -> tuple[Tensor, Tensor, tuple[np.ndarray, np.ndarray]]:
        """Correspond and accumulate the ``active`` pairs at ``transform`` ``(B, 4, 4)``.

        Returns fitness ``(B,)``, inlier RMSE ``(B,)`` and the state :meth:`step` needs.
        """
        T = transform.numpy()
        B = T.shape[0]
        R = np.ascontiguousarray(T[:, :3, :3])
        t = np.ascontiguousarray(T[:, :3, 3])
        # Procrustes moments and normal equations about the moved source centroid stay
        # accurate for clouds far from the origin.
        center = np.einsum("bij,bj->bi", R, self.source_mean) + t
        sums = np.zeros((B * self.tasks, SUM_WIDTH))
        fused_iteration(
            self.source,
            self.source_normals,
            self.source_counts,
            R,
            t,
            center,
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
        )
        sums = sums.reshape(B, self.tasks, SUM_WIDTH).sum(1)
        count = sums[:, INLIERS]
        fitness = count / np.maximum(self.source_counts, 1)
        rmse = np.where(count > 0, np.sqrt(sums[:, INLIER_SQ] / np.maximum(count, 1)), 0.0)
        return torch.from_numpy(fitness), torch.from_numpy(rmse), (sums, center)

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
        _solve_updates(sums, center, radius, far, metric, procrustes, update)
        return torch.from_numpy(update), damping, enough


def _scalar(value: float | Tensor) -> float:
    """A config option as a float (tensors may require grad: the fast path gives no gradient)."""
    return float(value.detach()) if isinstance(value, Tensor) else float(value)


def _numpy(values: Tensor) -> np.ndarray:
    return np.ascontiguousarray(values.detach().cpu().double().numpy())


# The per-pair solves, compiled: the same mathematics as difficp.solvers / difficp.metrics
# (tests check they agree), without ~40 small PyTorch calls per iteration, which measured
# 0.5 ms - a third of a 10k-point iteration.

_TINY = np.finfo(np.float64).tiny
_EPS = np.finfo(np.float64).eps
_PROCRUSTES_NOISE = PROCRUSTES_NOISE


@njit(cache=True, error_model="numpy")
def _lu_solve_in_place(M: np.ndarray, rhs: np.ndarray, x: np.ndarray) -> float:
    """LU with partial pivoting of ``M`` (overwritten); solves into ``x`` unless ``rhs`` is
    empty. Returns the smallest absolute pivot (0: singular, ``x`` untouched)."""
    n = M.shape[0]
    smallest = np.inf
    for k in range(n):
        pivot = k
        for i in range(k + 1, n):
            if abs(M[i, k]) > abs(M[pivot, k]):
                pivot = i
        if M[pivot, k] == 0.0:
            return 0.0
        smallest = min(smallest, abs(M[pivot, k]))
        if pivot != k:
            for j in range(n):
                M[k, j], M[pivot, j] = M[pivot, j], M[k, j]
            if rhs.size:
                rhs[k], rhs[pivot] = rhs[pivot], rhs[k]
        for i in range(k + 1, n):
            f = M[i, k] / M[k, k]
            for j in range(k, n):
                M[i, j] -= f * M[k, j]
            if rhs.size:
                rhs[i] -= f * rhs[k]
    if rhs.size:
        for k in range(n - 1, -1, -1):
            acc = rhs[k]
            for j in range(k + 1, n):
                acc -= M[k, j] * x[j]
            x[k] = acc / M[k, k]
    return smallest


@njit(cache=True, error_model="numpy")
def _solve_regularized(A: np.ndarray, g: np.ndarray, x: np.ndarray) -> bool:
    """``x`` solving ``A x = -g`` regularised like :func:`difficp.solvers.regularize` (then
    :func:`difficp.solvers.solve_normal_equations`); False, and a zero ``x``, for an unusable
    or singular system."""
    n = A.shape[0]
    trace = 0.0
    for k in range(n):
        trace += A[k, k]
    x[:] = 0.0
    if not trace > _TINY:
        return False
    root = np.empty(n)
    for i in range(n):
        root[i] = math.sqrt(max(A[i, i], _TINY))
    scaled = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            scaled[i, j] = A[i, j] / (root[i] * root[j])
    deficient = _lu_solve_in_place(scaled.copy(), np.empty(0), x) < _EPS**0.75
    M = A.copy()
    half = n // 2
    rotation = 0.0
    for k in range(half):
        rotation += A[k, k]
    # eps x the mean diagonal of each block (rotation, translation): they differ in units
    for k in range(n):
        block = rotation / half if k < half else (trace - rotation) / (n - half)
        M[k, k] += max(_EPS * block, _TINY)
    if deficient:
        # unit eigenvalue for the null space of the Jacobi-scaled matrix: a zero step there
        values, vectors = np.linalg.eigh(scaled)
        for e in range(n):
            if values[e] <= math.sqrt(_EPS):
                for i in range(n):
                    for j in range(n):
                        M[i, j] += root[i] * vectors[i, e] * vectors[j, e] * root[j]
    return _lu_solve_in_place(M, -g.copy(), x) > 0.0


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


@njit(cache=True, error_model="numpy")
def _procrustes_update(
    moments: np.ndarray, center: np.ndarray, radius: float, out: np.ndarray
) -> None:
    """:func:`difficp.solvers.weighted_procrustes` from the 16 moments about ``center`` of a
    source cloud of RMS radius ``radius``."""
    w = max(moments[0], _TINY)
    p = moments[1:4] / w
    q = moments[4:7] / w
    H = moments[7:16].reshape(3, 3) / w - np.outer(q, p)
    U, s, Vt = np.linalg.svd(H)
    # Below the rounding error of H a singular value is noise: the same bound as
    # difficp.solvers.weighted_procrustes, with the source's radius for the spreads.
    offset = _norm3(q - p)
    noise = _PROCRUSTES_NOISE * _EPS * (_norm3(center + p) + offset + radius) * (offset + radius)
    if s[0] <= noise:  # coincident points: every rotation fits; the identity moves least
        R = np.eye(3)
    elif s[1] <= noise:  # collinear points: the smallest rotation taking v to u
        R = _rotation_between(Vt[0].copy(), U[:, 0].copy())
    else:
        if np.linalg.det(U @ Vt) < 0:  # a reflection: flip the least significant direction
            U[:, 2] = -U[:, 2]
        R = U @ Vt
    out[:3, :3] = R
    out[:3, 3] = (q + center) - R @ (p + center)


@njit(cache=True, error_model="numpy")
def _norm3(v: np.ndarray) -> float:
    return math.sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2])


@njit(cache=True, error_model="numpy")
def _small_rotation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    k = np.cross(a, b)
    K = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    c = max(a[0] * b[0] + a[1] * b[1] + a[2] * b[2], 0.0)
    return np.eye(3) + K + (K @ K) / (1.0 + c)


@njit(cache=True, error_model="numpy")
def _rotation_between(v: np.ndarray, u: np.ndarray) -> np.ndarray:
    """:func:`difficp.solvers.rotation_between` for unit vectors ``v``, ``u`` ``(3,)``."""
    if v[0] * u[0] + v[1] * u[1] + v[2] * u[2] >= 0:
        return _small_rotation(v, u)
    axis = np.cross(v, u)
    if _norm3(axis) <= _EPS:
        other = np.zeros(3)
        other[np.argmin(np.abs(v))] = 1.0
        axis = np.cross(v, other)
    axis = axis / _norm3(axis)
    half_turn = 2.0 * np.outer(axis, axis) - np.eye(3)
    # half_turn v is -v up to the rounding of the axis; the small rotation takes it to u
    return _small_rotation(half_turn @ v, u) @ half_turn


@njit(parallel=True, cache=True, error_model="numpy")
def _solve_updates(
    sums: np.ndarray,
    center: np.ndarray,
    radius: np.ndarray,
    far: np.ndarray,
    metric: int,
    procrustes: int,
    out: np.ndarray,
) -> None:
    """Every pair's ``(4, 4)`` update into ``out`` ``(B, 4, 4)`` from its sums (accumulated about
    ``center`` ``(B, 3)``; ``radius`` ``(B,)`` the source clouds' RMS radii; ``far`` ``(B,)``:
    see :func:`difficp.solvers.linearization_pivot`)."""
    for b in prange(sums.shape[0]):
        A = np.empty((6, 6))
        x = np.empty(6)
        out[b] = np.eye(4)
        if procrustes == 1:
            _procrustes_update(sums[b, MOMENTS : MOMENTS + 16], center[b], radius[b], out[b])
            continue
        k = NORMAL_EQ
        for i in range(6):
            for j in range(i, 6):
                A[i, j] = A[j, i] = sums[b, k]
                k += 1
        _solve_regularized(A, sums[b, NORMAL_EQ + 21 : NORMAL_EQ + 27], x)
        _centred_step_update(x, center[b], far[b], metric, out[b])


def _flush_stale_caches() -> None:
    """Drop this module's numba caches when a strategy module changed since they were written.

    numba keys a cached function on its own file only, but these kernels inline the compiled
    twins of :mod:`difficp.strategies` and :mod:`difficp.metrics` (and call :mod:`difficp.kdtree`):
    an edited or added twin would otherwise run the old cached code. A digest of those files,
    kept beside the cache, tells.
    """
    registries = (CORRESPONDENCES, REJECTIONS, KERNELS, METRICS, SOLVERS)
    modules = {sys.modules[type(s).__module__] for r in registries for s in r}
    files = sorted({m.__file__ for m in (*modules, kdtree, compiled) if m.__file__})
    digest = hashlib.sha256(b"".join(Path(f).read_bytes() for f in files)).hexdigest()
    try:
        stamp = Path(fused_iteration._cache._cache_path) / "fused.twins.sha256"
        if stamp.exists() and stamp.read_text() == digest:
            return
        for value in list(globals().values()):
            cache = getattr(value, "_cache", None)
            if isinstance(value, Dispatcher) and hasattr(cache, "flush"):
                cache.flush()
        stamp.write_text(digest)
    except (AttributeError, OSError):  # no cache (read-only install, other numba): compile
        pass


_flush_stale_caches()
