"""Per-call time of ICP on small pairs: difficp against small_gicp and Open3D, in one process.

Each case registers the same pair (points on the faces of a unit cube, the source turned by 5
degrees and moved by 2 cm, 1 mm noise) with point-to-point ICP, max correspondence distance
0.1, at most 30 iterations, each library with its own stopping rule; every library builds its
own search tree inside the timed call. difficp also runs with small_gicp's rule (stop once a
step moves less than 1 mm and 0.1 degrees: ``translation_tolerance`` / ``rotation_tolerance``,
Open3D's criteria off), the like-for-like comparison; its error against the true motion is
printed beside each library's. The libraries are interleaved within each repeat and
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
import functools
import math
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

import difficp

MAX_DISTANCE = 0.1
MAX_ITERATIONS = 30
# small_gicp's default stopping rule (translation_epsilon, rotation_epsilon), as difficp options
SMALL_GICP_RULE = {
    "translation_tolerance": 1e-3,
    "rotation_tolerance": 0.1,  # degrees
    "relative_fitness": 0.0,
    "relative_rmse": 0.0,
}


def true_motion() -> np.ndarray:
    """``(4, 4)`` the motion :func:`cube_pair` applies (source into target)."""
    a = math.radians(5.0)
    T = np.eye(4)
    T[:3, :3] = [[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]]
    T[:3, 3] = [0.02, -0.01, 0.01]
    return T


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
    T = true_motion()
    target = cloud @ T[:3, :3].T + T[:3, 3] + rng.normal(0, 1e-3, cloud.shape)
    return cloud, target


# Each runner returns (iterations or -1 when the library does not report them, the transform).
Runner = Callable[[], tuple[int, np.ndarray]]


def _difficp(source: np.ndarray, target: np.ndarray, **criteria: float) -> Runner:
    s, t = torch.from_numpy(source), torch.from_numpy(target)

    def run() -> tuple[int, np.ndarray]:
        r = difficp.icp(s, t, max_distance=MAX_DISTANCE, max_iterations=MAX_ITERATIONS, **criteria)
        return int(r.iterations), r.transform.numpy()

    return run


def _small_gicp(source: np.ndarray, target: np.ndarray) -> Runner | None:
    try:
        import small_gicp
    except ImportError:
        return None

    def run() -> tuple[int, np.ndarray]:
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
        # small_gicp reports the 0-based index of its last iteration: steps taken = that + 1
        return int(r.iterations) + 1, np.asarray(r.T_target_source)

    return run


def _open3d(source: np.ndarray, target: np.ndarray) -> Runner | None:
    try:
        import open3d as o3d
    except ImportError:
        return None
    reg = o3d.pipelines.registration
    criteria = reg.ICPConvergenceCriteria(max_iteration=MAX_ITERATIONS)
    estimation = reg.TransformationEstimationPointToPoint()

    def run() -> tuple[int, np.ndarray]:
        s = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(source))
        t = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(target))
        r = reg.registration_icp(s, t, MAX_DISTANCE, np.eye(4), estimation, criteria)
        return -1, np.asarray(r.transformation)  # Open3D does not report its iterations

    return run


def _median_ms(runners: dict[str, Runner], repeats: int) -> dict[str, tuple]:
    """Per runner: (median ms, iterations, the last transform)."""
    for run in runners.values():  # warm up (caches, lazy imports)
        for _ in range(3):
            run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    last: dict[str, tuple[int, np.ndarray]] = {}
    order = list(runners.items())
    for repeat in range(repeats):
        # rotated every repeat: whoever runs first finds the caches the last one left
        for name, run in order[repeat % len(order) :] + order[: repeat % len(order)]:
            start = time.perf_counter()
            last[name] = run()
            times[name].append(time.perf_counter() - start)
    return {name: (1e3 * statistics.median(t), *last[name]) for name, t in times.items()}


def _error(T: np.ndarray) -> str:
    """Rotation (degrees) and translation (mm) of ``T`` from :func:`true_motion`."""
    D = np.linalg.inv(true_motion()) @ T
    angle = math.degrees(math.acos(min(1.0, (np.trace(D[:3, :3]) - 1) / 2)))
    return f"{angle:.3f}° {1e3 * np.linalg.norm(D[:3, 3]):.2f} mm"


# Where a call's time goes: (module, function) pairs timed by --phases. A lone small pair takes
# difficp.icp's express lane (difficp.express); nested functions (the source's moments and the
# compiled call inside the lane, the compiled loop inside its thread set-up) are part of their
# caller's time too.
PHASES = (
    ("difficp.registration", "resolve_config"),
    ("difficp.express", "express_icp"),
    ("difficp.express", "masked_moments"),
    ("difficp.fused", "express_loop"),
    ("difficp.fused", "_express_loop"),
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
    names = ("difficp", "difficp, small_gicp's rule", "small_gicp", "Open3D")
    print("| points | " + " | ".join(f"{n} ms (it)" for n in names) + " |")
    print("|---:|" + "---:|" * len(names))
    errors = []
    for points in args.points:
        source, target = cube_pair(points, seed=points)
        runners = {
            "difficp": _difficp(source, target),
            "difficp, small_gicp's rule": _difficp(source, target, **SMALL_GICP_RULE),
        }
        for name, make in (("small_gicp", _small_gicp), ("Open3D", _open3d)):
            run = make(source, target)
            if run is not None:
                runners[name] = run
        results = _median_ms(runners, args.repeats)
        cells = [
            "-"
            if n not in results
            else f"{results[n][0]:.3f}" + (f" ({results[n][1]})" if results[n][1] >= 0 else "")
            for n in names
        ]
        print(f"| {points} | " + " | ".join(cells) + " |")
        errors.append(f"| {points} | " + " | ".join(_error(results[n][2]) for n in results) + " |")
    print("\nerror from the true motion (rotation, translation):\n")
    print("| points | " + " | ".join(names) + " |")
    print("|---:|" + "---:|" * len(names))
    print("\n".join(errors))
    if args.batch:
        print(
            "\n| pairs of 100 points | difficp ms per pair (one call) | same, small_gicp's rule "
            "| small_gicp ms per pair |"
        )
        print("|---:|---:|---:|---:|")
        for pairs in (1, 8, 64):
            clouds = [cube_pair(100, seed=1000 + b) for b in range(pairs)]
            S = torch.from_numpy(np.stack([c[0] for c in clouds]))
            T = torch.from_numpy(np.stack([c[1] for c in clouds]))

            def batch(
                S: torch.Tensor = S, T: torch.Tensor = T, **criteria: float
            ) -> tuple[int, np.ndarray]:
                r = difficp.icp(
                    S, T, max_distance=MAX_DISTANCE, max_iterations=MAX_ITERATIONS, **criteria
                )
                return int(r.iterations.max()), r.transform.numpy()

            runners: dict[str, Runner] = {
                "difficp": batch,
                "rule": functools.partial(batch, **SMALL_GICP_RULE),
            }
            loop = [_small_gicp(s, t) for s, t in clouds]
            if loop[0] is not None:

                def looped(loop: list = loop) -> tuple[int, np.ndarray]:
                    outs = [run() for run in loop]
                    return max(o[0] for o in outs), outs[0][1]

                runners["small_gicp"] = looped
            results = _median_ms(runners, max(10, args.repeats // pairs))
            cells = [
                f"{results[n][0] / pairs:.3f}" if n in results else "-"
                for n in ("difficp", "rule", "small_gicp")
            ]
            print(f"| {pairs} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
