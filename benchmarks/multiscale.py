"""Multi-scale (coarse-to-fine) point-to-plane ICP on the real 3DMatch pair: difficp vs Open3D.

From random initial misalignments of growing size around a reference pose, runs
:func:`difficp.sampling.multiscale_icp` and the same pyramid in Open3D (per stage: voxel
down-sample both clouds, re-normalise the averaged normals or estimate them from the ``k``
nearest neighbours, ``registration_icp`` point-to-plane from the previous stage's result, as in
Open3D's multi-scale tutorial), plus single-scale ICP at the finest ``max_distance`` for both.
Prints a markdown table: success rate (rotation error < 1 degree and translation error < 2 cm
against the reference), median errors of the successful runs, median fitness and median time.

    DIFFICP_DATA=../shared/data python benchmarks/multiscale.py
    DIFFICP_DATA=../shared/data python benchmarks/multiscale.py --normals estimated
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import roma
import torch

from difficp.datadir import require_data_dir
from difficp.geometry import make_transform
from difficp.sampling import multiscale_icp, parse_scales

DEFAULT_SCALES = "0.1:0.3:30,0.05:0.1:30,none:0.02:30"
SUCCESS_DEG, SUCCESS_M = 1.0, 0.02


def perturbation(reference: np.ndarray, centre: np.ndarray, angle: float, shift: float, seed: int):
    """``reference`` composed with a rotation of exactly ``angle`` degrees about ``centre``
    (random axis) and a random shift of length ``shift``."""
    g = torch.Generator().manual_seed(seed)
    axis = torch.nn.functional.normalize(torch.randn(3, generator=g, dtype=torch.float64), dim=0)
    R = roma.rotvec_to_rotmat(axis * math.radians(angle))
    direction = torch.nn.functional.normalize(
        torch.randn(3, generator=g, dtype=torch.float64), dim=0
    )
    c = torch.from_numpy(centre)
    return reference @ make_transform(R, c - R @ c + shift * direction).numpy()


def pose_error(T: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Rotation (degrees) and translation (metres) of ``T`` relative to ``reference``."""
    delta = np.linalg.inv(reference) @ T
    cos = np.clip((np.trace(delta[:3, :3]) - 1) / 2, -1.0, 1.0)
    return math.degrees(math.acos(cos)), float(np.linalg.norm(delta[:3, 3]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument(
        "--scales", default=DEFAULT_SCALES, help="voxel:max_distance:iterations,..."
    )
    parser.add_argument("--normals", choices=("file", "estimated"), default="file")
    parser.add_argument("--normals-k", type=int, default=16)
    parser.add_argument("--angles", default="10,20,30,45,60", help="misalignment angles, degrees")
    parser.add_argument("--seeds", type=int, default=5, help="random misalignments per angle")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (median)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for both libraries")
    args = parser.parse_args()
    # Before Open3D is imported: its OpenMP pool reads this once.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    import open3d as o3d

    reg = o3d.pipelines.registration
    stages = parse_scales(args.scales)
    finest = stages[-1][1]
    folder = require_data_dir(args.data_dir, needs="the 3DMatch pair").joinpath(
        "scans", "open3d_3dmatch_pair"
    )
    source = o3d.io.read_point_cloud(str(folder / "feature_cloud_bin_0.pcd"))
    target = o3d.io.read_point_cloud(str(folder / "feature_cloud_bin_1.pcd"))
    src = torch.from_numpy(np.asarray(source.points).copy())
    tgt = torch.from_numpy(np.asarray(target.points).copy())
    use_file = args.normals == "file"
    tgt_n = torch.from_numpy(np.asarray(target.normals).copy()) if use_file else None
    if not use_file:
        source.normals = o3d.utility.Vector3dVector()
        target.normals = o3d.utility.Vector3dVector()
    point_to_plane = reg.TransformationEstimationPointToPlane()

    def o3d_level(cloud, voxel: float | None):
        down = cloud if voxel is None else cloud.voxel_down_sample(voxel)
        if use_file:
            # Open3D averages normals without re-normalising (voxel_downsample re-normalises);
            # at full resolution both use the file's normals as they are.
            if voxel is not None:
                down.normalize_normals()
        else:
            down.estimate_normals(o3d.geometry.KDTreeSearchParamKNN(args.normals_k))
        return down

    def open3d_multiscale(init: np.ndarray, levels) -> tuple[np.ndarray, float]:
        T, fitness = init, 0.0
        for voxel, distance, iterations in levels:
            s, t = o3d_level(source, voxel), o3d_level(target, voxel)
            criteria = reg.ICPConvergenceCriteria(max_iteration=iterations or 30)
            result = reg.registration_icp(s, t, distance, T, point_to_plane, criteria)
            T, fitness = result.transformation, result.fitness
        return T, fitness

    def difficp_multiscale(init: np.ndarray, levels) -> tuple[np.ndarray, float]:
        result = multiscale_icp(
            src,
            tgt,
            levels,
            init=torch.from_numpy(init),
            target_normals=tgt_n,
            metric="point_to_plane",
            differentiation="none",
            normals_k=args.normals_k,
        )
        return result.transform.numpy(), float(result.fitness)

    # Reference pose: the pair is roughly aligned; converge from identity with tight criteria.
    tight = reg.ICPConvergenceCriteria(1e-10, 1e-10, 200)
    full_s, full_t = o3d_level(source, None), o3d_level(target, None)
    reference = reg.registration_icp(full_s, full_t, 0.05, np.eye(4), point_to_plane, tight)
    reference = reg.registration_icp(
        full_s, full_t, finest, reference.transformation, point_to_plane, tight
    ).transformation
    centre = np.asarray(source.points).mean(0)

    single = [(None, finest, sum(s[2] or 30 for s in stages))]
    methods: dict[str, Callable] = {
        "difficp multi-scale": lambda init: difficp_multiscale(init, stages),
        "Open3D multi-scale": lambda init: open3d_multiscale(init, stages),
        "difficp single-scale": lambda init: difficp_multiscale(init, single),
        "Open3D single-scale": lambda init: open3d_multiscale(init, single),
    }
    difficp_multiscale(np.eye(4), stages)  # warm-up: the compiled kernels load once

    print(
        f"3DMatch pair: {len(src)} -> {len(tgt)} points; stages {args.scales} "
        f"(single-scale: max_distance {finest}, {single[0][2]} iterations); point-to-plane, "
        f"{args.normals} normals; float64; {args.threads} thread(s); {args.seeds} seeds per "
        f"angle; success = rotation < {SUCCESS_DEG} deg and translation < {SUCCESS_M * 100:.0f} "
        "cm vs the reference pose"
    )
    print()
    print(
        "| misalignment | method | success | median rot. err. (deg) | median transl. err. (mm) "
        "| median fitness | max abs(T - T_Open3D) | median time (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for angle in (float(a) for a in args.angles.split(",")):
        shift = angle / 100  # 10 degrees with 10 cm, 20 with 20 cm, ...
        transforms: dict[tuple[str, int], np.ndarray] = {}
        rows = []
        for name, run in methods.items():
            rot, trans, fits, times, ok = [], [], [], [], 0
            for seed in range(args.seeds):
                init = perturbation(reference, centre, angle, shift, seed)
                durations = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    T, fitness = run(init)
                    durations.append(time.perf_counter() - t0)
                transforms[name, seed] = T
                times.append(statistics.median(durations))
                r, t = pose_error(T, reference)
                fits.append(fitness)
                if r < SUCCESS_DEG and t < SUCCESS_M:
                    ok += 1
                    rot.append(r)
                    trans.append(t)
            med_r = f"{statistics.median(rot):.3f}" if rot else "-"
            med_t = f"{statistics.median(trans) * 1e3:.2f}" if trans else "-"
            rows.append((name, ok, med_r, med_t, statistics.median(fits), statistics.median(times)))
        for name, ok, med_r, med_t, fit, duration in rows:
            # The same pipeline in Open3D: how far apart the two results are (all seeds).
            other = name.replace("difficp", "Open3D")
            gap = "-"
            if other != name:
                diffs = [
                    np.abs(transforms[name, s] - transforms[other, s]).max()
                    for s in range(args.seeds)
                ]
                gap = f"{max(diffs):.1e}"
            print(
                f"| {angle:.0f} deg, {shift * 100:.0f} cm | {name} | {ok}/{args.seeds} | {med_r} "
                f"| {med_t} | {fit:.3f} | {gap} | {duration * 1e3:.1f} |"
            )


if __name__ == "__main__":
    main()
