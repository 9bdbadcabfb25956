"""Colored ICP against Open3D's ``registration_colored_icp`` on the coloured 3DMatch pair.

Two cases, float64, ``max_distance`` 5 cm, Open3D's criteria (1e-6, 1e-6, 30 iterations), both
sides from the same inputs (points, normals and colours of the files) and the same init; both
times include the target's colour gradients (Open3D fits them inside the call, we inside
``difficp.icp``). Ours and Open3D's runs are interleaved; times are medians.

* ``pair``: fragment 0 -> fragment 1 from a perturbed init (3 deg, 3 cm); the true pose is not
  known, so we print the largest difference between our transform and Open3D's.
* ``split``: fragment 1 split at random into two halves (different points of the same coloured
  surface); the source half is moved by a known pose (5 deg, 5 cm), so the error against
  ground truth is exact. Open3D's point-to-plane ICP is shown for reference.

``--threads T`` runs both on T threads: torch's (and so the compiled kernels') and, through
``OMP_NUM_THREADS`` (the script restarts itself with it set), Open3D's. "fit ms" is our
colour-gradient fit alone (the target's forest, neighbours and 3 x 3 solves), part of "ours ms".

    DIFFICP_DATA=../shared/data python benchmarks/colored.py --threads 1   # --repeats 7 --seeds 3
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import open3d as o3d
import roma
import torch

import difficp
from difficp.colors import intensity, intensity_gradients
from difficp.correspondence import NeighborIndex
from difficp.datadir import require_data_dir
from difficp.io import read_point_cloud

reg = o3d.pipelines.registration
MAX_DISTANCE = 0.05


def use_threads(threads: int | None) -> None:
    """Run torch and Open3D on ``threads`` threads (None: their defaults). Open3D's OpenMP
    reads ``OMP_NUM_THREADS`` once, at import: the script restarts itself with it set."""
    if threads is None:
        return
    if os.environ.get("OMP_NUM_THREADS") != str(threads):
        os.environ["OMP_NUM_THREADS"] = str(threads)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    torch.set_num_threads(threads)


def perturbation(angle_deg: float, translation: float, seed: int) -> np.ndarray:
    """A rigid ``(4, 4)`` of the given rotation angle and translation length, random axes."""
    g = torch.Generator().manual_seed(seed)
    axis = torch.randn(3, generator=g, dtype=torch.float64)
    direction = torch.randn(3, generator=g, dtype=torch.float64)
    R = roma.rotvec_to_rotmat(axis / axis.norm() * math.radians(angle_deg))
    return difficp.make_transform(R, direction / direction.norm() * translation).numpy()


def legacy(points: np.ndarray, normals: np.ndarray, colors: np.ndarray) -> o3d.geometry.PointCloud:
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points))
    cloud.normals = o3d.utility.Vector3dVector(normals)
    cloud.colors = o3d.utility.Vector3dVector(colors)
    return cloud


def pose_error(T: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Rotation error (degrees) and translation error (mm) of ``T`` against ``truth``."""
    cos = (np.trace(T[:3, :3].T @ truth[:3, :3]) - 1) / 2
    angle = math.degrees(math.acos(float(np.clip(cos, -1, 1))))
    return angle, 1000 * float(np.linalg.norm(T[:3, 3] - truth[:3, 3]))


def timed(fn: Callable[[], object], times: list[float]) -> object:
    t0 = time.perf_counter()
    out = fn()
    times.append(1000 * (time.perf_counter() - t0))
    return out


def run_case(
    source: tuple[np.ndarray, ...], target: tuple[np.ndarray, ...], init: np.ndarray, repeats: int
) -> dict:
    """Ours and Open3D's colored ICP (and Open3D's point-to-plane), interleaved."""
    src_o3d, tgt_o3d = legacy(*source), legacy(*target)
    criteria = reg.ICPConvergenceCriteria(1e-6, 1e-6, 30)
    colored = reg.TransformationEstimationForColoredICP()
    plane = reg.TransformationEstimationPointToPlane()
    src, tgt = torch.from_numpy(source[0]), torch.from_numpy(target[0])
    kwargs = {
        "target_normals": torch.from_numpy(target[1]),
        "source_colors": torch.from_numpy(source[2]),
        "target_colors": torch.from_numpy(target[2]),
        "init": torch.from_numpy(init),
        "metric": "colored",
        "max_distance": MAX_DISTANCE,
        "differentiation": "none",
    }
    ms: dict[str, list[float]] = {"ours": [], "open3d": [], "plane": [], "fit": []}

    def fit() -> torch.Tensor:  # what difficp.icp does first: the target's colour gradients
        values = intensity(kwargs["target_colors"])[None]
        index = NeighborIndex(tgt[None])
        return intensity_gradients(
            tgt[None], kwargs["target_normals"][None], values, 30, 0.1, index=index
        )

    for _ in range(repeats):
        timed(fit, ms["fit"])
        ours = timed(lambda: difficp.icp(src, tgt, **kwargs), ms["ours"])
        ref = timed(
            lambda: reg.registration_colored_icp(
                src_o3d, tgt_o3d, MAX_DISTANCE, init, colored, criteria
            ),
            ms["open3d"],
        )
        p2l = timed(
            lambda: reg.registration_icp(src_o3d, tgt_o3d, MAX_DISTANCE, init, plane, criteria),
            ms["plane"],
        )
    return {
        "ours": ours.transform.numpy(),  # type: ignore[attr-defined]
        "open3d": ref.transformation,  # type: ignore[attr-defined]
        "plane": p2l.transformation,  # type: ignore[attr-defined]
        "fitness": (float(ours.fitness), ref.fitness),  # type: ignore[attr-defined]
        "iterations": int(ours.iterations),  # type: ignore[attr-defined]
        "ms": {k: statistics.median(v) for k, v in ms.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: its)")
    args = parser.parse_args()
    use_threads(args.threads)
    folder = require_data_dir(args.data_dir, needs="the 3DMatch pair") / "scans"
    folder = folder / "open3d_3dmatch_pair"
    clouds = [read_point_cloud(folder / f"feature_cloud_bin_{i}.pcd") for i in (0, 1)]
    frag = [(c.points, c.normals, c.colors) for c in clouds]
    print(
        f"3DMatch pair: {len(clouds[0])} / {len(clouds[1])} points, max_distance {MAX_DISTANCE}, "
        f"float64, threads {torch.get_num_threads()} (OMP_NUM_THREADS "
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}), median of {args.repeats}"
    )
    print(
        "| case | seed | iterations | max abs dT vs Open3D | fitness ours / Open3D | "
        "error ours (deg, mm) | error Open3D colored | error Open3D point-to-plane | "
        "ours ms (fit ms) | Open3D ms | ours / Open3D |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for seed in range(args.seeds):
        rows = []
        init = perturbation(3.0, 0.03, seed)
        rows.append(("pair 0→1", run_case(frag[0], frag[1], init, args.repeats), None))
        # Split fragment 1; the source half is seen from a frame moved by truth^-1.
        rng = np.random.default_rng(seed)
        half = rng.permutation(len(clouds[1])) < len(clouds[1]) // 2
        truth = perturbation(5.0, 0.05, 100 + seed)
        R, t = truth[:3, :3], truth[:3, 3]
        points, normals, colors = frag[1]
        moved = ((points[half] - t) @ R, normals[half] @ R, colors[half])
        rest = (points[~half], normals[~half], colors[~half])
        rows.append(("split halves", run_case(moved, rest, np.eye(4), args.repeats), truth))
        for name, r, gt in rows:
            diff = np.abs(r["ours"] - r["open3d"]).max()
            errors = ["", "", ""]
            if gt is not None:
                errors = [
                    "{:.4f}, {:.2f}".format(*pose_error(r[k], gt))
                    for k in ("ours", "open3d", "plane")
                ]
            ms = r["ms"]
            print(
                f"| {name} | {seed} | {r['iterations']} | {diff:.1e} | "
                f"{r['fitness'][0]:.4f} / {r['fitness'][1]:.4f} | {' | '.join(errors)} | "
                f"{ms['ours']:.1f} ({ms['fit']:.1f}) | {ms['open3d']:.1f} | "
                f"{ms['ours'] / ms['open3d']:.2f} |"
            )


if __name__ == "__main__":
    main()
