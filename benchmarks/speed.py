"""Speed and memory of difficp against Open3D, measured in one process, interleaved.

Cases (float32, CPU unless --device, exactly --iterations ICP iterations on both sides with
early stopping disabled, median of --repeats runs):

* single pair, hard nearest + max_distance, point_to_point/svd and point_to_plane/linear, on
  real RGB-D scans (Redwood frames 0 and 1 back-projected, ~10k, ~40k and ~100k points); ours
  is the default ("auto": the compiled fast path), and the note gives the PyTorch reference
  path (``search_backend="kdtree"``) for comparison;
* a batch of 256 ModelNet10 pairs of 1024 points in one call vs Open3D looping over them, and
  vs small_gicp looping over them (its own KD-tree per pair, point-to-point ICP) at 1 and 2
  threads: ours both at exactly 30 iterations and with the default stopping rule, small_gicp
  with its own stopping rule (it cannot be made to run a fixed count);
* PCA normals, k = 30, on a real scan (Redwood frame 0: all 267k points and a 40k voxel
  down-sampling) vs ``small_gicp.estimate_normals`` (tree build included on both sides) at 1
  and 2 threads;
* soft correspondences at scale (100k x 100k with soft_k, dense at 50k): peak RSS of one
  iteration forward + backward, each in a fresh subprocess;
* implicit vs unrolled gradients for 10 / 30 / 100 iterations: forward, backward, peak RSS.

    DIFFICP_DATA=../shared/data python benchmarks/speed.py            # everything
    DIFFICP_DATA=../shared/data python benchmarks/speed.py --only pairs
    DIFFICP_DATA=../shared/data python benchmarks/speed.py --only batch --only normals
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import difficp
from difficp.datadir import require_data_dir
from difficp.geometry import make_transform, random_rotation


def _o3d():
    import open3d as o3d

    return o3d


def _peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM: unlike ru_maxrss, reset by exec, so a
    child does not inherit its parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def redwood_pair(
    data_dir: Path, points: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Two consecutive Redwood RGB-D frames as clouds of about ``points`` points with normals,
    the source already moved by the logged relative pose's inverse perturbed by 2 deg / 2 cm."""
    o3d = _o3d()
    folder = data_dir / "scans" / "redwood_rgbd"
    intr = json.loads((folder / "camera_primesense.json").read_text())
    K = np.array(intr["intrinsic_matrix"]).reshape(3, 3).T if "intrinsic_matrix" in intr else None
    intrinsic = o3d.camera.PinholeCameraIntrinsic(640, 480, 525.0, 525.0, 319.5, 239.5)
    if K is not None:
        intrinsic = o3d.camera.PinholeCameraIntrinsic(640, 480, K[0, 0], K[1, 1], K[0, 2], K[1, 2])
    depth_files = (
        sorted((folder / "depth").glob("*.png"))
        if (folder / "depth").is_dir()
        else sorted(folder.glob("*depth*.png"))
    )
    clouds = []
    for f in depth_files[:2]:
        depth = o3d.io.read_image(str(f))
        pc = o3d.geometry.PointCloud.create_from_depth_image(
            depth, intrinsic, depth_scale=1000.0, depth_trunc=4.0
        )
        clouds.append(pc)
    out = []
    for pc in clouds:
        n_all = len(pc.points)
        if points < n_all:
            # voxel size that keeps about `points` points (bisection on the voxel size)
            lo, hi = 1e-4, 0.2
            for _ in range(25):
                mid = (lo + hi) / 2
                if len(pc.voxel_down_sample(mid).points) > points:
                    lo = mid
                else:
                    hi = mid
            pc = pc.voxel_down_sample(lo)
        pc.estimate_normals(o3d.geometry.KDTreeSearchParamHybrid(radius=0.05, max_nn=30))
        pc.orient_normals_towards_camera_location(np.zeros(3))
        out.append(pc)
    return (
        np.asarray(out[0].points),
        np.asarray(out[0].normals),
        np.asarray(out[1].points),
        np.asarray(out[1].normals),
    )


def modelnet_batch(
    data_dir: Path, batch: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    import h5py

    with h5py.File(data_dir / "modelnet10" / "modelnet10_poisson1024_test.h5", "r") as f:
        pts = torch.from_numpy(np.asarray(f["data"][:batch], dtype=np.float32))
    pts = pts - pts.mean(1, keepdim=True)
    pts = pts / pts.norm(dim=-1).amax(1)[:, None, None]
    g = torch.Generator().manual_seed(seed)
    R = random_rotation(batch, max_angle_deg=15, generator=g)
    t = (torch.rand(batch, 3, generator=g) - 0.5) * 0.1
    T = make_transform(R, t)
    tgt = pts @ R.transpose(1, 2) + t[:, None]
    return pts, tgt, T


# ----------------------------------------------------------------------------------------------
# Timed cases
# ----------------------------------------------------------------------------------------------


def _interleaved(ours, theirs, repeats: int) -> tuple[float, float]:
    ours(), theirs()  # warm-up (KD-tree code paths, allocator)
    t_ours, t_theirs = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ours()
        t1 = time.perf_counter()
        theirs()
        t2 = time.perf_counter()
        t_ours.append(t1 - t0)
        t_theirs.append(t2 - t1)
    return statistics.median(t_ours), statistics.median(t_theirs)


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_pairs(
    data_dir: Path, sizes: list[int], iterations: int, repeats: int, device: str
) -> list[dict]:
    o3d = _o3d()
    reg = o3d.pipelines.registration
    rows = []
    for size in sizes:
        sp, _, tp, tn = redwood_pair(data_dir, size)
        source = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(sp))
        target = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(tp))
        target.normals = o3d.utility.Vector3dVector(tn)
        S = torch.tensor(sp, dtype=torch.float32, device=device)
        T = torch.tensor(tp, dtype=torch.float32, device=device)
        TN = torch.tensor(tn, dtype=torch.float32, device=device)
        max_distance = 0.05
        criteria = reg.ICPConvergenceCriteria(
            relative_fitness=0.0, relative_rmse=0.0, max_iteration=iterations
        )
        for metric, estimator in (
            ("point_to_point", reg.TransformationEstimationPointToPoint()),
            ("point_to_plane", reg.TransformationEstimationPointToPlane()),
        ):
            ours = functools.partial(
                difficp.icp,
                S,
                T,
                target_normals=TN,
                metric=metric,
                max_distance=max_distance,
                max_iterations=iterations,
                relative_fitness=0.0,
                relative_rmse=0.0,
                differentiation="none",
            )
            theirs = functools.partial(
                reg.registration_icp, source, target, max_distance, np.eye(4), estimator, criteria
            )

            a, b = _interleaved(ours, theirs, repeats)
            res, ref = ours(), theirs()
            reference = _median_time(functools.partial(ours, search_backend="kdtree"), 3)
            rows.append(
                {
                    "case": f"pair {metric}",
                    "points": f"{len(sp)} / {len(tp)}",
                    "ours_ms": 1e3 * a,
                    "peer": "Open3D",
                    "peer_ms": 1e3 * b,
                    "ratio": a / b,
                    "note": f"fitness {float(res.fitness):.4f} vs {ref.fitness:.4f}; "
                    f"PyTorch reference path {1e3 * reference:.0f} ms",
                }
            )
            print(_row(rows[-1]), flush=True)
    return rows


def bench_batch(
    data_dir: Path, batch: int, iterations: int, repeats: int, device: str
) -> list[dict]:
    o3d = _o3d()
    reg = o3d.pipelines.registration
    src, tgt, _ = modelnet_batch(data_dir, batch)
    clouds = [
        (
            o3d.geometry.PointCloud(o3d.utility.Vector3dVector(s.double().numpy())),
            o3d.geometry.PointCloud(o3d.utility.Vector3dVector(t.double().numpy())),
        )
        for s, t in zip(src, tgt, strict=True)
    ]
    S, T = src.to(device), tgt.to(device)
    max_distance = 0.2
    criteria = reg.ICPConvergenceCriteria(
        relative_fitness=0.0, relative_rmse=0.0, max_iteration=iterations
    )
    est = reg.TransformationEstimationPointToPoint()

    def ours(search_backend: str = "auto"):
        return difficp.icp(
            S,
            T,
            search_backend=search_backend,
            max_distance=max_distance,
            max_iterations=iterations,
            relative_fitness=0.0,
            relative_rmse=0.0,
            differentiation="none",
        )

    def theirs():
        return [
            reg.registration_icp(s, t, max_distance, np.eye(4), est, criteria) for s, t in clouds
        ]

    a, b = _interleaved(ours, theirs, repeats)
    reference = _median_time(functools.partial(ours, search_backend="kdtree"), 3)
    row = {
        "case": f"batch of {batch} pairs, point_to_point",
        "points": "1024 / 1024",
        "ours_ms": 1e3 * a,
        "peer": "Open3D",
        "peer_ms": 1e3 * b,
        "ratio": a / b,
        "note": f"one batched call vs a loop; PyTorch reference path {1e3 * reference:.0f} ms",
    }
    print(_row(row), flush=True)
    return [row]


def _at_threads(threads: int):
    """Run with ``threads`` PyTorch (and so compiled-kernel) threads; restores the count."""
    import contextlib

    @contextlib.contextmanager
    def scope():
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    return scope()


def bench_batch_small_gicp(
    data_dir: Path, batch: int, iterations: int, repeats: int, threads: tuple[int, ...] = (1, 2)
) -> list[dict]:
    """One batched call vs small_gicp's point-to-point ICP looping over the pairs (a PointCloud
    and a KdTree per pair, as a user of small_gicp would do), interleaved, at each thread
    count."""
    import small_gicp

    src, tgt, truth = modelnet_batch(data_dir, batch)
    pairs = [(s.double().numpy(), t.double().numpy()) for s, t in zip(src, tgt, strict=True)]
    max_distance = 0.2
    rows = []
    for n in threads:

        def theirs(n: int = n) -> list:
            out = []
            for s, t in pairs:
                source, target = small_gicp.PointCloud(s), small_gicp.PointCloud(t)
                tree = small_gicp.KdTree(target, num_threads=n)
                out.append(
                    small_gicp.align(
                        target,
                        source,
                        tree,
                        registration_type="ICP",
                        max_correspondence_distance=max_distance,
                        num_threads=n,
                        max_iterations=iterations,
                    )
                )
            return out

        # ours: exactly `iterations` (no stopping), Open3D's rule (the default), small_gicp's
        # rule (a step below 1 mm and 0.1 degrees; 1e-3 of ModelNet's unit scale)
        no_stop = {"relative_fitness": 0.0, "relative_rmse": 0.0}
        rules = {
            f"ours exactly {iterations} iterations": no_stop,
            "both stop early (each its own rule)": {},
            "both on small_gicp's rule": {
                **no_stop,
                "translation_tolerance": 1e-3,
                "rotation_tolerance": 0.1,  # degrees
            },
        }
        for rule, stop in rules.items():
            ours = functools.partial(
                difficp.icp,
                src,
                tgt,
                max_distance=max_distance,
                max_iterations=iterations,
                differentiation="none",
                **stop,
            )
            with _at_threads(n):
                a, b = _interleaved(ours, theirs, repeats)
                res, ref = ours(), theirs()
            ours_err = (res.transform.double() - truth.double()).abs().amax((1, 2))
            their_err = np.array([np.abs(r.T_target_source - T.numpy()).max() for r, T in
                                  zip(ref, truth.double(), strict=True)])  # fmt: skip
            rows.append(
                {
                    "case": f"batch of {batch} pairs, point_to_point, {rule}",
                    "points": "1024 / 1024",
                    "threads": n,
                    "ours_ms": 1e3 * a,
                    "peer": "small_gicp",
                    "peer_ms": 1e3 * b,
                    "ratio": a / b,
                    "note": f"iterations: ours {res.iterations.double().mean():.1f}, "
                    # small_gicp reports its last iteration's 0-based index: steps = that + 1
                    f"small_gicp {np.mean([r.iterations + 1 for r in ref]):.1f} (mean); "
                    f"|T - truth| > 1e-3: ours {int((ours_err > 1e-3).sum())}, "
                    f"small_gicp {int((their_err > 1e-3).sum())}",
                }
            )
            print(_row(rows[-1]), flush=True)
    return rows


def redwood_scan(data_dir: Path) -> torch.Tensor:
    """Redwood RGB-D frame 0 back-projected: its ``(267129, 3)`` valid points, float32."""
    from difficp.geometry import depth_to_points
    from difficp.io import read_depth, read_intrinsics

    folder = data_dir / "scans" / "redwood_rgbd"
    depth = torch.from_numpy(read_depth(sorted((folder / "depth").glob("*.png"))[0]))
    K = torch.as_tensor(read_intrinsics(folder / "camera_primesense.json"), dtype=depth.dtype)
    points = depth_to_points(depth, K).reshape(-1, 3)
    return points[depth.reshape(-1) > 0].float().contiguous()


def _downsample_to(points: torch.Tensor, count: int) -> torch.Tensor:
    """``points`` voxel-down-sampled to about ``count`` points (bisection on the voxel size)."""
    lo, hi = 1e-4, 0.2
    for _ in range(25):
        mid = (lo + hi) / 2
        if int(difficp.voxel_downsample(points, mid).lengths) > count:
            lo = mid
        else:
            hi = mid
    grid = difficp.voxel_downsample(points, lo)
    return grid.points[: int(grid.lengths)].contiguous()


def bench_normals(
    data_dir: Path, k: int, repeats: int, threads: tuple[int, ...] = (1, 2)
) -> list[dict]:
    """difficp.estimate_normals vs small_gicp.estimate_normals (each building its own tree),
    interleaved, at each thread count."""
    import small_gicp

    from difficp import normals as normals_module

    full = redwood_scan(data_dir)
    rows = []
    for points in (_downsample_to(full, 40_000), full):
        array = points.double().numpy()

        def ours(points: torch.Tensor = points) -> torch.Tensor:
            return difficp.estimate_normals(points, k=k)

        t0 = time.perf_counter()
        vp = torch.zeros(1, 3, dtype=points.dtype)
        reference = normals_module._torch_normals(points[None], k, vp, None)[0]
        torch_ms = 1e3 * (time.perf_counter() - t0)
        for n in threads:

            def theirs(n: int = n, array: np.ndarray = array):
                cloud = small_gicp.PointCloud(array)
                small_gicp.estimate_normals(cloud, num_neighbors=k, num_threads=n)
                return cloud

            with _at_threads(n):
                a, b = _interleaved(ours, theirs, repeats)
                mine, peer = ours(), theirs().normals()[:, :3]
            agree = np.abs((mine.double().numpy() * peer).sum(1))
            same = float(((mine.double() * reference.double()).sum(1) > 1 - 1e-4).double().mean())
            rows.append(
                {
                    "case": f"normals, k={k} (Redwood frame 0)",
                    "points": f"{len(points)}",
                    "threads": n,
                    "ours_ms": 1e3 * a,
                    "peer": "small_gicp",
                    "peer_ms": 1e3 * b,
                    "ratio": a / b,
                    "note": f"|cos| to small_gicp's normals: median {np.median(agree):.6f}; "
                    f"equal to the PyTorch path (cos > 1 - 1e-4) at {100 * same:.2f}% of "
                    f"points, which takes {torch_ms:.0f} ms",
                }
            )
            print(_row(rows[-1]), flush=True)
    return rows


# ----------------------------------------------------------------------------------------------
# Memory cases (each in a fresh subprocess so peak RSS is its own)
# ----------------------------------------------------------------------------------------------


def _child_soft(points: int, soft_k: int | None, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    base = _peak_rss_mb()
    src = torch.rand(points, 3, generator=g, device="cpu").to(device).requires_grad_(True)
    tgt = src.detach() + 0.002 * torch.randn(points, 3, generator=g).to(device)
    temperature = torch.tensor(1e-4, device=device, requires_grad=True)
    t0 = time.perf_counter()
    res = difficp.icp(
        src,
        tgt,
        correspondence="soft",
        temperature=temperature,
        soft_k=soft_k,
        max_iterations=1,
        relative_fitness=0.0,
        relative_rmse=0.0,
    )
    t1 = time.perf_counter()
    res.transform.sum().backward()
    t2 = time.perf_counter()
    return {
        "forward_s": t1 - t0,
        "backward_s": t2 - t1,
        "peak_rss_mb": _peak_rss_mb(),
        "baseline_rss_mb": base,
        "transform": res.transform.detach().cpu().tolist(),
        "grad_finite": bool(torch.isfinite(src.grad).all()),
    }


def _child_implicit(mode: str, iterations: int, points: int, device: str) -> dict:
    g = torch.Generator().manual_seed(1)
    base = _peak_rss_mb()
    src = torch.rand(points, 3, generator=g).to(device)
    R = random_rotation(max_angle_deg=10, generator=g)
    tgt = src @ R.T.to(device) + 0.05
    src = src.requires_grad_(True)
    t0 = time.perf_counter()
    res = difficp.icp(
        src,
        tgt,
        correspondence="soft",
        temperature=1e-4,
        soft_k=8,
        metric="point_to_point",
        max_iterations=iterations,
        relative_fitness=0.0,
        relative_rmse=0.0,
        differentiation=mode,
    )
    t1 = time.perf_counter()
    res.transform.sum().backward()
    t2 = time.perf_counter()
    return {
        "forward_s": t1 - t0,
        "backward_s": t2 - t1,
        "peak_rss_mb": _peak_rss_mb(),
        "baseline_rss_mb": base,
    }


def _in_subprocess(kind: str, *args: object) -> dict:
    cmd = [sys.executable, __file__, "--child", str(torch.get_num_threads()), kind, *map(str, args)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench_soft(device: str) -> list[dict]:
    rows = []
    cases = [("soft_k=16", 100_000, 16), ("dense", 50_000, None)]
    for name, points, k in cases:
        r = _in_subprocess("soft", points, k if k is not None else "none", device)
        rows.append(
            {
                "case": f"soft {name}, 1 iteration fwd+bwd",
                "points": f"{points} / {points}",
                "ours_ms": 1e3 * (r["forward_s"] + r["backward_s"]),
                "peer_ms": None,
                "ratio": None,
                "peak_rss_mb": r["peak_rss_mb"],
                "note": f"forward {r['forward_s']:.1f} s, backward {r['backward_s']:.1f} s, baseline RSS {r['baseline_rss_mb']:.0f} MB, grad finite {r['grad_finite']}",
            }
        )
        print(_row(rows[-1]), flush=True)
    # Error of top-k against dense on the same problem (small enough for both).
    a = _in_subprocess("soft", 20_000, 16, device)
    b = _in_subprocess("soft", 20_000, "none", device)
    diff = float(np.abs(np.array(a["transform"]) - np.array(b["transform"])).max())
    rows.append(
        {
            "case": "soft_k=16 vs dense, 20k points",
            "points": "20000 / 20000",
            "ours_ms": None,
            "peer_ms": None,
            "ratio": None,
            "note": f"max abs transform difference {diff:.1e}",
        }
    )
    print(_row(rows[-1]), flush=True)
    return rows


def bench_implicit(device: str, points: int) -> list[dict]:
    rows = []
    for iterations in (10, 30, 100):
        for mode in ("unroll", "implicit"):
            r = _in_subprocess("implicit", mode, iterations, points, device)
            rows.append(
                {
                    "case": f"{mode}, {iterations} iterations (soft_k=8)",
                    "points": f"{points} / {points}",
                    "ours_ms": 1e3 * (r["forward_s"] + r["backward_s"]),
                    "peer_ms": None,
                    "ratio": None,
                    "peak_rss_mb": r["peak_rss_mb"],
                    "note": f"forward {1e3 * r['forward_s']:.0f} ms, backward {1e3 * r['backward_s']:.0f} ms, baseline RSS {r['baseline_rss_mb']:.0f} MB",
                }
            )
            print(_row(rows[-1]), flush=True)
    return rows


def _fmt(v: float | None, spec: str) -> str:
    return "" if v is None else format(v, spec)


def _row(r: dict) -> str:
    return (
        f"| {r['case']} | {r['points']} | {r.get('threads', '')} | {_fmt(r['ours_ms'], '.0f')} "
        f"| {r.get('peer', '')} | {_fmt(r['peer_ms'], '.0f')} "
        f"| {_fmt(r['ratio'], '.2f')} | {_fmt(r.get('peak_rss_mb'), '.0f')} | {r['note']} |"
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        torch.set_num_threads(int(sys.argv[2]))
        kind, args = sys.argv[3], sys.argv[4:]
        if kind == "soft":
            k = None if args[1] == "none" else int(args[1])
            print(json.dumps(_child_soft(int(args[0]), k, args[2])))
        else:
            print(json.dumps(_child_implicit(args[0], int(args[1]), int(args[2]), args[3])))
        return
    parser = argparse.ArgumentParser(description="difficp vs Open3D: speed and memory")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--only", choices=["pairs", "batch", "normals", "soft", "implicit"], action="append"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    only = set(args.only or ["pairs", "batch", "normals", "soft", "implicit"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    print(
        "| case | points (src / tgt) | threads | ours ms | peer | peer ms | ours/peer "
        "| peak RSS MB | note |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    rows: list[dict] = []
    if only & {"pairs", "batch", "normals"}:
        data_dir = require_data_dir(args.data_dir, needs="the scans and ModelNet10")
        if "pairs" in only:
            rows += bench_pairs(
                data_dir, [10_000, 40_000, 100_000], args.iterations, args.repeats, args.device
            )
        if "batch" in only:
            rows += bench_batch(data_dir, 256, args.iterations, args.repeats, args.device)
            rows += bench_batch_small_gicp(data_dir, 256, args.iterations, args.repeats)
        if "normals" in only:
            rows += bench_normals(data_dir, 30, args.repeats)
    if "soft" in only:
        rows += bench_soft(args.device)
    if "implicit" in only:
        rows += bench_implicit(args.device, 5000)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
