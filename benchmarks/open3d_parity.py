"""Accuracy against Open3D and ground truth on the real 3DMatch pair.

Runs difficp and Open3D's ``registration_icp`` from the same perturbed init (5 deg, 5 cm) in
float64 with tight criteria and prints the largest transform difference, fitness / RMSE
differences (against ``evaluate_registration`` at our transform) and both run times (median).

    DIFFICP_DATA=../shared/data python benchmarks/open3d_parity.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import open3d as o3d
import roma
import torch

import difficp
from difficp.datadir import require_data_dir

reg = o3d.pipelines.registration


def perturbation(angle_deg: float, translation: float, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    axis = torch.randn(3, generator=g, dtype=torch.float64)
    direction = torch.randn(3, generator=g, dtype=torch.float64)
    R = roma.rotvec_to_rotmat(axis / axis.norm() * np.deg2rad(angle_deg))
    return difficp.make_transform(R, direction / direction.norm() * translation).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--seeds", type=int, default=3, help="number of random initial perturbations"
    )
    args = parser.parse_args()
    folder = (
        require_data_dir(args.data_dir, needs="the 3DMatch pair") / "scans" / "open3d_3dmatch_pair"
    )
    source = o3d.io.read_point_cloud(str(folder / "feature_cloud_bin_0.pcd"))
    target = o3d.io.read_point_cloud(str(folder / "feature_cloud_bin_1.pcd"))
    src = torch.from_numpy(np.asarray(source.points))
    tgt = torch.from_numpy(np.asarray(target.points))
    tgt_n = torch.from_numpy(np.asarray(target.normals))
    max_distance = 0.05
    criteria = reg.ICPConvergenceCriteria(
        relative_fitness=1e-10, relative_rmse=1e-10, max_iteration=100
    )
    estimators = {
        "point_to_point": reg.TransformationEstimationPointToPoint(),
        "point_to_plane": reg.TransformationEstimationPointToPlane(),
    }
    print(f"3DMatch pair: {len(src)} -> {len(tgt)} points, max_distance {max_distance}, float64")
    print(
        "| metric | seed | max abs dT | d fitness | d inlier RMSE | iterations | ours ms | Open3D ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for metric, estimator in estimators.items():
        for seed in range(args.seeds):
            init = perturbation(5.0, 0.05, seed)
            t_ours, t_o3d = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                ref = reg.registration_icp(source, target, max_distance, init, estimator, criteria)
                t1 = time.perf_counter()
                ours = difficp.icp(
                    src,
                    tgt,
                    init=torch.from_numpy(init),
                    target_normals=tgt_n,
                    metric=metric,
                    max_distance=max_distance,
                    max_iterations=100,
                    relative_fitness=1e-10,
                    relative_rmse=1e-10,
                    differentiation="none",
                )
                t2 = time.perf_counter()
                t_o3d.append(t1 - t0)
                t_ours.append(t2 - t1)
            T = ours.transform.numpy()
            ev = reg.evaluate_registration(source, target, max_distance, T)
            print(
                f"| {metric} | {seed} | {np.abs(T - ref.transformation).max():.1e} "
                f"| {abs(float(ours.fitness) - ev.fitness):.1e} "
                f"| {abs(float(ours.inlier_rmse) - ev.inlier_rmse):.1e} | {int(ours.iterations)} "
                f"| {1e3 * statistics.median(t_ours):.0f} | {1e3 * statistics.median(t_o3d):.0f} |"
            )


if __name__ == "__main__":
    main()
