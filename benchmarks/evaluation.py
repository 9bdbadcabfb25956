"""``difficp.evaluate_registration`` against Open3D's ``evaluate_registration`` plus
``get_information_matrix_from_point_clouds`` (what one call of ours returns takes two of Open3D's,
each with its own KD-tree and search).

Two cases, float64, Open3D's legacy point clouds, the runners interleaved, medians:

* ``3dmatch``: the 3DMatch fragment pair (3903 -> 3458 points), ``max_distance`` 5 cm, at a
  transform perturbed from the identity by 3 deg and 3 cm;
* ``modelnet batch``: 256 ModelNet10 pairs of 1024 points (``benchmarks/gradients.py``'s pairs)
  at ICP's result (near their true pose), ``max_distance`` 0.05: one batched call of ours against a loop of
  Open3D's calls.

Each row also checks that the two agree (largest difference of fitness, inlier RMSE and
information matrix). ``--threads T`` runs both on T threads (the script restarts itself with
``OMP_NUM_THREADS`` set, which Open3D reads when it loads).

    DIFFICP_DATA=../shared/data python benchmarks/evaluation.py --threads 1   # and --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import open3d as o3d
import torch

import difficp
from difficp.datadir import require_data_dir
from difficp.io import read_point_cloud

sys.path.insert(0, str(Path(__file__).parent))
from colored import perturbation, use_threads
from gradients import modelnet_batch

reg = o3d.pipelines.registration


def _legacy(points: np.ndarray) -> o3d.geometry.PointCloud:
    return o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points))


def _open3d(sources: list, targets: list, max_distance: float, transforms: np.ndarray) -> list:
    out = []
    for s, t, T in zip(sources, targets, transforms, strict=True):
        result = reg.evaluate_registration(s, t, max_distance, T)
        information = reg.get_information_matrix_from_point_clouds(s, t, max_distance, T)
        out.append((result.fitness, result.inlier_rmse, np.asarray(information)))
    return out


def _case(
    name: str, source: torch.Tensor, target: torch.Tensor, transform: torch.Tensor, d: float
) -> tuple[str, Callable[[], object], Callable[[], list], Callable[[object, list], float]]:
    """``source`` / ``target`` ``(B, N, 3)``, ``transform`` ``(B, 4, 4)``, float64."""
    sources = [_legacy(s.numpy()) for s in source]
    targets = [_legacy(t.numpy()) for t in target]
    transforms = transform.numpy()

    def ours() -> object:
        return difficp.evaluate_registration(source, target, d, transform)

    def theirs() -> list:
        return _open3d(sources, targets, d, transforms)

    def difference(mine: object, open3d: list) -> float:
        largest = 0.0
        for b, (fitness, rmse, information) in enumerate(open3d):
            largest = max(
                largest,
                abs(float(mine.fitness[b]) - fitness),
                abs(float(mine.inlier_rmse[b]) - rmse),
                float(np.abs(mine.information[b].numpy() - information).max()),
            )
        return largest

    return name, ours, theirs, difference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    use_threads(args.threads)

    folder = require_data_dir() / "scans" / "open3d_3dmatch_pair"
    clouds = [read_point_cloud(folder / f"feature_cloud_bin_{i}.pcd").points for i in (0, 1)]
    pair_transform = torch.from_numpy(perturbation(3.0, 0.03, 0))[None]
    source, target = modelnet_batch(256, "cpu")
    # evaluated where ICP ends (near each pair's true pose)
    registered = difficp.icp(source.double(), target.double(), max_distance=0.05).transform
    cases = [
        _case(
            "3dmatch pair, 3903 -> 3458",
            torch.from_numpy(clouds[0])[None],
            torch.from_numpy(clouds[1])[None],
            pair_transform,
            0.05,
        ),
        _case("modelnet batch, 256 x 1024", source.double(), target.double(), registered, 0.05),
    ]
    print(
        f"float64, threads {torch.get_num_threads()} (OMP_NUM_THREADS "
        f"{os.environ.get('OMP_NUM_THREADS')}), medians of {args.repeats} interleaved runs"
    )
    print("| case | difficp ms | Open3D ms (evaluate + information) | ratio | max abs difference |")
    print("|---|---|---|---|---|")
    for name, ours, theirs, difference in cases:
        ours(), theirs()  # warm-up: compiled search, caches
        times: dict[str, list[float]] = {"ours": [], "theirs": []}
        for repeat in range(args.repeats):
            order = (("ours", ours), ("theirs", theirs))
            for label, run in order if repeat % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                run()
                times[label].append(1e3 * (time.perf_counter() - start))
        mine, open3d = statistics.median(times["ours"]), statistics.median(times["theirs"])
        gap = difference(ours(), theirs())
        print(f"| {name} | {mine:.2f} | {open3d:.2f} | {mine / open3d:.2f} | {gap:.1e} |")


if __name__ == "__main__":
    main()
