"""Projective vs nearest-neighbour ICP on one 640x480 depth pair, on the same points.

Redwood RGB-D frames 0 and 1 (uint16 PNG, millimetres): the source is every valid pixel of
frame 0 back-projected (~267k points), the target frame 1, given to projective ICP as its depth
map and to nearest-neighbour ICP as its back-projected points with the depth map's normals
(so neither side estimates normals inside the timing). point_to_plane/linear, ``max_distance``
5 cm, float64, exactly --iterations iterations (early stopping disabled), median of --repeats
calls each (the whole ``difficp.icp`` call: input checks, the KD forest of nearest, the
projective target's normals). The compiled fast path ("auto") for both; the PyTorch reference
path of projective (``search_backend="kdtree"``, what ran before it was compiled) once, for
comparison. One warm-up call of each first (numba compiles once per install).

    DIFFICP_DATA=../shared/data python benchmarks/depth.py        # --iterations 30 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import difficp
from difficp.datadir import require_data_dir
from difficp.geometry import depth_normals, depth_to_points
from difficp.io import read_depth, read_intrinsics


def load_pair(frames: tuple[int, int] = (0, 1)) -> dict:
    """The two Redwood depth maps (metres), intrinsics, and the back-projected points."""
    folder = require_data_dir() / "scans" / "redwood_rgbd"
    K = torch.as_tensor(read_intrinsics(folder / "camera_primesense.json"), dtype=torch.float64)
    depths = [
        torch.as_tensor(read_depth(folder / "depth" / f"{i:05d}.png", 1000.0), dtype=torch.float64)
        for i in frames
    ]
    source_map = depth_to_points(depths[0][None], K[None])[0]
    target_map = depth_to_points(depths[1][None], K[None])[0]
    target_valid = depths[1] > 0
    target_normals = depth_normals(target_map[None], target_valid[None])[0]
    keep = target_valid & (target_normals.abs().sum(-1) > 0)  # as projective ICP uses them
    return {
        "K": K,
        "source": source_map[depths[0] > 0],
        "target_depth": depths[1],
        "target_points": target_map[keep],
        "target_normals": target_normals[keep],
    }


def _time(call, repeats: int) -> tuple[float, difficp.ICPResult]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument(
        "--no-reference", action="store_true", help="skip the PyTorch reference path (slow)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    p = load_pair()
    options = {
        "metric": "point_to_plane",
        "max_distance": 0.05,
        "max_iterations": args.iterations,
        "relative_fitness": 0.0,
        "relative_rmse": 0.0,
    }

    def projective(backend: str = "auto") -> difficp.ICPResult:
        return difficp.icp(
            p["source"],
            p["target_depth"],
            correspondence="projective",
            intrinsics=p["K"],
            search_backend=backend,
            **options,
        )

    def nearest() -> difficp.ICPResult:
        return difficp.icp(
            p["source"], p["target_points"], target_normals=p["target_normals"], **options
        )

    projective(), nearest()  # warm-up: numba compiles once per install
    rows = []
    cases = [
        ("projective, compiled", projective, args.repeats),
        ("nearest, compiled", nearest, args.repeats),
    ]
    if not args.no_reference:
        cases.append(("projective, PyTorch reference path", lambda: projective("kdtree"), 1))
    for name, call, repeats in cases:
        seconds, result = _time(call, repeats)
        iterations = int(result.iterations)
        rows.append(
            {
                "case": name,
                "source_points": len(p["source"]),
                "target": "640x480 depth map" if "projective" in name else len(p["target_points"]),
                "seconds": seconds,
                "ms_per_iteration": 1000 * seconds / max(iterations, 1),
                "iterations": iterations,
                "fitness": float(result.fitness),
                "inlier_rmse": float(result.inlier_rmse),
                "repeats": repeats,
            }
        )
        r = rows[-1]
        print(
            f"{name:38s} {r['source_points']} pts  {1000 * seconds:8.0f} ms  "
            f"{r['ms_per_iteration']:7.1f} ms/it  fitness {r['fitness']:.4f}  "
            f"rmse {r['inlier_rmse']:.5f}  ({iterations} it, median of {repeats})",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
