"""Per-call time of ICP on small pairs: difficp against small_gicp and Open3D, in one process.

Each case registers the same pair (points on the faces of a unit cube, the source turned by 5
degrees and moved by 2 cm, 1 mm noise) with point-to-point ICP, max correspondence distance
0.1, at most 30 iterations, each library with its own stopping rule; every library builds its
own search tree inside the timed call. The libraries are interleaved within each repeat and
the median is reported. ``--batch`` also times batches of 100-point pairs in one difficp call
(per pair) against a Python loop over small_gicp.

    python benchmarks/small_pairs.py                 # 100 and 1000 points, 300 repeats
    python benchmarks/small_pairs.py --threads 1 --batch
    python benchmarks/small_pairs.py --threads 1 --phases    # where a call's time goes

The fast path must be compiled first (``difficp warmup``), or difficp's first calls run its
PyTorch path while a background process compiles it.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

import difficp

MAX_DISTANCE = 0.1
MAX_ITERATIONS = 30


def cube_pair(points: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(points, 3)`` source and target float64 arrays: the target is the source turned."""
    rng = np.random.default_rng(seed)
    face = rng.integers(0, 6, size=points)
    uv = rng.uniform(-0.5, 0.5, size=(points, 2))
    cloud = np.empty((points, 3))
    axis, sign = face // 2, np.where(face % 2 == 0, -0.5, 0.5)
    for i in range(points):
        others = [d for d in range(3) if d != axis[i]]
        cloud[i, axis[i]] = sign[i]
        cloud[i, others] = uv[i]
    a = math.radians(5.0)
    R = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    target = cloud @ R.T + np.array([0.02, -0.01, 0.01]) + rng.normal(0, 1e-3, cloud.shape)
    return cloud, target


def _difficp(source: np.ndarray, target: np.ndarray) -> Callable[[], int]:
    s, t = torch.from_numpy(source), torch.from_numpy(target)

    def run() -> int:
        r = difficp.icp(s, t, max_distance=MAX_DISTANCE, max_iterations=MAX_ITERATIONS)
        return int(r.iterations)

    return run


def _small_gicp(source: np.ndarray, target: np.ndarray) -> Callable[[], int] | None:
    try:
        import small_gicp
    except ImportError:
        return None

    def run() -> int:
        tc, sc = small_gicp.PointCloud(target), small_gicp.PointCloud(source)
        tree = small_gicp.KdTree(tc)
        r = small_gicp.align(
            tc,
            sc,
            tree,
            registration_type="ICP",
            max_correspondence_distance=MAX_DISTANCE,
            max_iterations=MAX_ITERATIONS,
        )
        return int(r.iterations)

    return run


def _open3d(source: np.ndarray, target: np.ndarray) -> Callable[[], int] | None:
    try:
        import open3d as o3d
    except ImportError:
        return None
    reg = o3d.pipelines.registration
    criteria = reg.ICPConvergenceCriteria(max_iteration=MAX_ITERATIONS)
    estimation = reg.TransformationEstimationPointToPoint()

    def run() -> int:
        s = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(source))
        t = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(target))
        reg.registration_icp(s, t, MAX_DISTANCE, np.eye(4), estimation, criteria)
        return -1  # Open3D does not report its iterations

    return run


def _median_ms(runners: dict[str, Callable[[], int]], repeats: int) -> dict[str, tuple]:
    for run in runners.values():  # warm up (caches, lazy imports)
        for _ in range(3):
            run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    iterations: dict[str, int] = {}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            iterations[name] = run()
            times[name].append(time.perf_counter() - start)
    return {name: (1e3 * statistics.median(t), iterations[name]) for name, t in times.items()}


# Where a call's time goes: (module, function) pairs timed by --phases. Nested ones (the forest
# build inside the compiled path's set-up, the compiled loop inside run_loop) are part of their
# caller's time too.
PHASES = (
    ("difficp.registration", "resolve_config"),
    ("difficp.registration", "prepare_problem"),
    ("difficp.registration", "_choose_steps"),
    ("difficp.fused", "build_forest"),
    ("difficp.registration", "rmse_tolerance"),
    ("difficp.registration", "run_loop"),
    ("difficp.fused", "_whole_loop"),
)


def phases(points: int, calls: int) -> None:
    """Mean microseconds per call spent in each of :data:`PHASES` (wrapped by timers, which add
    ~1 us each) for one ``points``-point pair."""
    import importlib

    source, target = cube_pair(points, seed=points)
    run = _difficp(source, target)
    for _ in range(20):
        run()
    spent: dict[str, float] = {}
    for module_name, name in PHASES:
        module = importlib.import_module(module_name)
        inner = getattr(module, name)

        def timed(*a: object, inner: Callable = inner, key: str = name, **k: object) -> object:
            start = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                spent[key] = spent.get(key, 0.0) + time.perf_counter() - start

        # the fast path asks numba dispatchers whether they are compiled
        timed.signatures = getattr(inner, "signatures", None)  # type: ignore[attr-defined]
        setattr(module, name, timed)
    start = time.perf_counter()
    for _ in range(calls):
        run()
    total = time.perf_counter() - start
    print(
        f"\n{points} points, mean us per call over {calls} calls: total {1e6 * total / calls:.1f}"
    )
    for _, name in PHASES:
        print(f"  {name:16s} {1e6 * spent.get(name, 0.0) / calls:8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--threads", type=int, default=None, help="torch / numba threads")
    parser.add_argument("--batch", action="store_true", help="also batches of 100-point pairs")
    parser.add_argument(
        "--phases", action="store_true", help="only: where a difficp call's time goes (--points)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.phases:
        for points in args.points:
            phases(points, 10 * args.repeats)
        return
    print(f"torch threads: {torch.get_num_threads()}, repeats: {args.repeats}\n")
    print("| points | difficp ms (it) | small_gicp ms (it) | Open3D ms (it) |")
    print("|---:|---:|---:|---:|")
    for points in args.points:
        source, target = cube_pair(points, seed=points)
        runners = {"difficp": _difficp(source, target)}
        for name, make in (("small_gicp", _small_gicp), ("Open3D", _open3d)):
            run = make(source, target)
            if run is not None:
                runners[name] = run
        results = _median_ms(runners, args.repeats)
        cells = [
            "-"
            if n not in results
            else f"{results[n][0]:.3f}" + (f" ({results[n][1]})" if results[n][1] >= 0 else "")
            for n in ("difficp", "small_gicp", "Open3D")
        ]
        print(f"| {points} | " + " | ".join(cells) + " |")
    if args.batch:
        print("\n| pairs of 100 points | difficp ms per pair (one call) | small_gicp ms per pair |")
        print("|---:|---:|---:|")
        for pairs in (1, 8, 64):
            clouds = [cube_pair(100, seed=1000 + b) for b in range(pairs)]
            S = torch.from_numpy(np.stack([c[0] for c in clouds]))
            T = torch.from_numpy(np.stack([c[1] for c in clouds]))

            def batch(S: torch.Tensor = S, T: torch.Tensor = T) -> int:
                r = difficp.icp(S, T, max_distance=MAX_DISTANCE, max_iterations=MAX_ITERATIONS)
                return int(r.iterations.max())

            runners = {"difficp": batch}
            loop = [_small_gicp(s, t) for s, t in clouds]
            if loop[0] is not None:
                runners["small_gicp"] = lambda loop=loop: max(run() for run in loop)
            results = _median_ms(runners, max(10, args.repeats // pairs))
            cells = [
                f"{results[n][0] / pairs:.3f}" if n in results else "-"
                for n in ("difficp", "small_gicp")
            ]
            print(f"| {pairs} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
