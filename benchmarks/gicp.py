"""Generalized-ICP: difficp (metric="gicp", compiled path) against small_gicp and Open3D.

Real scans: the two 3DMatch fragments of ``$DIFFICP_DATA/scans/open3d_3dmatch_pair``.

* ``split`` (exact ground truth): fragment 0 split into two disjoint halves (alternate points,
  so two different samplings of one real surface, ~4 cm spacing); the source half is moved by
  a known transform (``--angle`` degrees about a random axis, ``--translation`` metres) and
  registered back onto the other half. Errors are against that transform.
* ``pair`` (no ground truth): fragment 0 onto fragment 1 from a perturbed identity. Reported:
  Open3D's fitness / inlier RMSE of each result at ``--max-distance``, and each result's
  rotation / translation difference to small_gicp's.

Every method gets the same points (no down-sampling) and its total time from NumPy arrays to
the transform: covariance estimation (k = 20 neighbours for all three; Open3D's own default path
estimates normals with 20 neighbours and turns them into the same (1e-3, 1, 1) covariances),
KD-trees and the registration. Repeats are interleaved (method A, B, C, A, B, C, ...) and
medians reported; each thread count runs in its own process with ``OMP_NUM_THREADS`` set
before anything is imported (Open3D's OpenMP pool reads it once). Defaults of each library's
stopping rule; max correspondence distance the same for all. ``difficp_step_rule`` is difficp
with small_gicp's stopping rule instead of Open3D's (stop once a step moves less than 1 mm and
0.1 degrees; ``translation_tolerance`` / ``rotation_tolerance``), the like-for-like timing.

    DIFFICP_DATA=/path/to/data python benchmarks/gicp.py --threads 1 2 --repeats 15
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _rotation(axis: np.ndarray, angle_deg: float) -> np.ndarray:
    k = axis / np.linalg.norm(axis)
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    a = np.deg2rad(angle_deg)
    return np.eye(3) + np.sin(a) * K + (1 - np.cos(a)) * K @ K


def _transform(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, t
    return T


def _errors(T: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    E = np.linalg.inv(truth) @ T
    cos = np.clip((np.trace(E[:3, :3]) - 1) / 2, -1, 1)
    return float(np.degrees(np.arccos(cos))), float(np.linalg.norm(E[:3, 3]))


def _cases(data: Path, angle: float, translation: float) -> dict:
    import open3d as o3d

    folder = data / "scans" / "open3d_3dmatch_pair"
    clouds = [
        np.asarray(o3d.io.read_point_cloud(str(folder / f"feature_cloud_bin_{i}.pcd")).points)
        for i in (0, 1)
    ]
    rng = np.random.default_rng(0)
    truth = _transform(_rotation(rng.normal(size=3), angle), translation * _unit(rng))
    half_a, half_b = clouds[0][0::2], clouds[0][1::2]
    # target = truth @ source: the source half is the target half's sampling moved by truth^-1
    inv = np.linalg.inv(truth)
    split_source = half_b @ inv[:3, :3].T + inv[:3, 3]
    init_pair = _transform(_rotation(rng.normal(size=3), angle), translation * _unit(rng))
    return {
        "split": (split_source, half_a, np.eye(4), truth),
        "pair": (clouds[0], clouds[1], init_pair, None),
    }


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


# small_gicp's default stopping rule (translation_epsilon, rotation_epsilon) as difficp options
SMALL_GICP_RULE = {
    "translation_tolerance": 1e-3,
    "rotation_tolerance": 0.1,  # degrees
    "relative_fitness": 0.0,
    "relative_rmse": 0.0,
}


def _difficp(source, target, init, max_distance, threads, **criteria):
    import torch

    import difficp

    result = difficp.icp(
        torch.from_numpy(source),
        torch.from_numpy(target),
        init=torch.from_numpy(init),
        metric="gicp",
        max_distance=max_distance,
        differentiation="none",
        **criteria,
    )
    return result.transform.numpy()


def _difficp_step_rule(source, target, init, max_distance, threads):
    return _difficp(source, target, init, max_distance, threads, **SMALL_GICP_RULE)


def _small_gicp(source, target, init, max_distance, threads):
    import small_gicp

    src, tgt = small_gicp.PointCloud(source), small_gicp.PointCloud(target)
    tree = small_gicp.KdTree(tgt, num_threads=threads)
    small_gicp.estimate_covariances(tgt, tree, num_neighbors=20, num_threads=threads)
    small_gicp.estimate_covariances(src, num_neighbors=20, num_threads=threads)
    result = small_gicp.align(
        tgt,
        src,
        tree,
        init_T_target_source=init,
        registration_type="GICP",
        max_correspondence_distance=max_distance,
        num_threads=threads,
    )
    return np.asarray(result.T_target_source)


def _open3d(source, target, init, max_distance, threads):
    import open3d as o3d

    reg = o3d.pipelines.registration
    src = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(source))
    tgt = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(target))
    result = reg.registration_generalized_icp(
        src, tgt, max_distance, init, reg.TransformationEstimationForGeneralizedICP()
    )
    return np.asarray(result.transformation)


METHODS = {
    "difficp": _difficp,
    "difficp_step_rule": _difficp_step_rule,
    "small_gicp": _small_gicp,
    "open3d": _open3d,
}


def _fitness(source, target, T, max_distance) -> tuple[float, float]:
    import open3d as o3d

    src = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(source))
    tgt = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(target))
    e = o3d.pipelines.registration.evaluate_registration(src, tgt, max_distance, T)
    return e.fitness, e.inlier_rmse


def _run_threads(args: argparse.Namespace) -> dict:
    """One thread count, in this process (OMP_NUM_THREADS already set by the parent)."""
    import torch

    torch.set_num_threads(args.one_threads)
    cases = _cases(Path(args.data_dir), args.angle, args.translation)
    out: dict = {}
    for case, (source, target, init, truth) in cases.items():
        for fn in METHODS.values():  # warm-up (numba's cached kernels load, pools start)
            fn(source, target, init, args.max_distance, args.one_threads)
        times: dict = {name: [] for name in METHODS}
        transforms: dict = {}
        for _ in range(args.repeats):
            for name, fn in METHODS.items():
                start = time.perf_counter()
                transforms[name] = fn(source, target, init, args.max_distance, args.one_threads)
                times[name].append(time.perf_counter() - start)
        rows = {}
        for name in METHODS:
            row = {"time_ms": 1e3 * float(np.median(times[name]))}
            T = transforms[name]
            reference = truth if truth is not None else transforms["small_gicp"]
            row["rot_deg"], row["trans_m"] = _errors(T, reference)
            row["fitness"], row["rmse"] = _fitness(source, target, T, args.max_distance)
            rows[name] = row
        out[case] = {"points": [len(source), len(target)], "methods": rows}
    return out


CONVERGED = {"relative_fitness": 0.0, "relative_rmse": 0.0, "max_iterations": 200}


def _fixed_points(args: argparse.Namespace) -> None:
    """Whether difficp and small_gicp minimise the same cost: difficp run to convergence (200
    iterations, no early stop), small_gicp started there, and the other way round. Equal
    transforms mean one optimum, and differences in the table are where each stopping rule
    left off."""
    for case, (source, target, init, truth) in _cases(
        Path(args.data_dir), args.angle, args.translation
    ).items():
        ours = _difficp(source, target, init, args.max_distance, 1, **CONVERGED)
        theirs_from_ours = _small_gicp(source, target, ours, args.max_distance, 1)
        theirs = _small_gicp(source, target, init, args.max_distance, 1)
        ours_from_theirs = _difficp(source, target, theirs, args.max_distance, 1, **CONVERGED)
        rows = {
            "difficp converged": ours,
            "small_gicp from difficp converged": theirs_from_ours,
            "difficp converged from small_gicp's result": ours_from_theirs,
        }
        reference = truth if truth is not None else theirs
        for name, T in rows.items():
            rot, trans = _errors(T, reference)
            print(f"| {case} | {name} | {rot:.5f} | {1e3 * trans:.3f} | "
                  f"{np.abs(T - ours).max():.1e} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("DIFFICP_DATA", "../shared/data"))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--max-distance", type=float, default=0.1)
    parser.add_argument("--angle", type=float, default=5.0)
    parser.add_argument("--translation", type=float, default=0.05)
    parser.add_argument("--one-threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_threads is not None:
        print(json.dumps(_run_threads(args)))
        return
    results = {}
    for threads in args.threads:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        command = [sys.executable, __file__, *sys.argv[1:], "--one-threads", str(threads)]
        done = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
        results[threads] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"Generalized-ICP, medians of {args.repeats} interleaved repeats (times include")
    print("covariance estimation); split: errors vs ground truth; pair: difference to small_gicp")
    header = "| case | threads | method | time (ms) | rot. err (deg) | transl. err (m) | fitness |"
    print(header)
    print("|---|---|---|---|---|---|---|")
    for threads, cases in results.items():
        for case, entry in cases.items():
            for name, row in entry["methods"].items():
                print(
                    f"| {case} {entry['points'][0]}->{entry['points'][1]} | {threads} | {name} | "
                    f"{row['time_ms']:.1f} | {row['rot_deg']:.4f} | {row['trans_m']:.5f} | "
                    f"{row['fitness']:.4f} |"
                )
    print()
    print("Fixed points (one thread; error vs the truth on split, vs small_gicp's result on pair):")
    print("| case | run | rot. err (deg) | transl. err (mm) | max abs dT vs difficp converged |")
    print("|---|---|---|---|---|")
    _fixed_points(args)


if __name__ == "__main__":
    main()
