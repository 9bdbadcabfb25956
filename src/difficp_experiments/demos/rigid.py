"""The rigid demo of ``difficp demo [rigid]``: a self-contained registration demo, no data needed.

It builds a procedural terrain (a height field of hills, hollows and ripples: no
symmetry, so the pose is well defined), scans it twice with overlapping circular footprints
(two independent samplings, as two real scans never hit the same points), adds Gaussian noise
and outliers, moves the second scan by a known pose (20 degrees about a random axis and a
translation of 10% of the size) and registers it back with point-to-plane ICP, coarse to fine.
It prints the rotation and translation errors against the truth and the fitness / RMSE before
and after, and writes ``DIR/demo.png`` (before/after) and ``DIR/metrics.json``.

The command line is :mod:`difficp_experiments.commands.demo`; the non-rigid demo lives in
:mod:`difficp_experiments.demos.nonrigid`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from difficp._atomic import atomic_write_text

# --------------------------------------------------------------------------------------------
# The scene
# --------------------------------------------------------------------------------------------

# Gaussian hills (negative: hollows) of the terrain over [-1, 1]^2: (x, y, height, width).
# Fixed, so every seed scans the same landscape; their sizes and spacing give ICP features at
# several scales, which is what makes the pose observable from partial views.
_HILLS = (
    (-0.50, -0.40, 0.35, 0.30),
    (0.35, 0.45, 0.30, 0.25),
    (0.55, -0.45, -0.20, 0.25),
    (-0.35, 0.50, 0.18, 0.20),
    (0.00, 0.00, 0.22, 0.35),
    (-0.80, 0.05, -0.15, 0.20),
    (0.80, 0.10, 0.20, 0.18),
)


def terrain_height(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Height ``z`` of the procedural terrain at ``(x, y)`` (any matching shapes)."""
    z = 0.05 * np.sin(3 * x + 1) * np.cos(2.5 * y)  # low ripples everywhere
    for cx, cy, height, width in _HILLS:
        z = z + height * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * width**2))
    return z


def sample_terrain(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points uniform over the terrain's ``[-1, 1]^2`` footprint and their unit normals
    (upwards, ``(-dz/dx, -dz/dy, 1)`` normalised, by central differences), both ``(n, 3)``."""
    x, y = rng.uniform(-1.0, 1.0, size=(2, n))
    h = 1e-5
    dzdx = (terrain_height(x + h, y) - terrain_height(x - h, y)) / (2 * h)
    dzdy = (terrain_height(x, y + h) - terrain_height(x, y - h)) / (2 * h)
    normals = np.stack([-dzdx, -dzdy, np.ones(n)], axis=1)
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    return np.stack([x, y, terrain_height(x, y)], axis=1), normals


def scan(
    points: np.ndarray,
    centre: np.ndarray,
    radius: float,
    noise: float,
    outlier_fraction: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """A partial noisy view ``(M, 3)``: the points within ``radius`` of ``centre`` ``(2,)`` in
    x-y (a scanner's footprint), Gaussian noise of std ``noise`` on each axis, and
    ``outlier_fraction`` x M extra points uniform in the view's bounding box grown by 15%."""
    inside = np.linalg.norm(points[:, :2] - centre, axis=1) < radius
    view = points[inside] + rng.normal(scale=noise, size=(int(inside.sum()), 3))
    n_out = round(outlier_fraction * len(view))
    lo, hi = view.min(0), view.max(0)
    pad = 0.15 * (hi - lo)
    outliers = rng.uniform(lo - pad, hi + pad, size=(n_out, 3))
    out = np.concatenate([view, outliers])
    return out[rng.permutation(len(out))]


def _rotation(axis: np.ndarray, angle_deg: float) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    axis = axis / np.linalg.norm(axis)
    return Rotation.from_rotvec(axis * math.radians(angle_deg)).as_matrix()


def _apply(T: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ T[:3, :3].T + T[:3, 3]


def evaluate(
    source: np.ndarray, target: np.ndarray, T: np.ndarray, threshold: float
) -> tuple[float, float]:
    """Open3D's ``evaluate_registration``: (fitness, inlier RMSE) of ``source`` moved by ``T``.

    fitness = share of source points whose nearest target is within ``threshold``; the RMSE is
    over those inliers (0 when there are none).
    """
    from scipy.spatial import cKDTree

    d, _ = cKDTree(target).query(_apply(T, source), k=1, distance_upper_bound=threshold)
    inliers = np.isfinite(d)
    if not inliers.any():
        return 0.0, 0.0
    return float(inliers.mean()), float(np.sqrt(np.mean(d[inliers] ** 2)))


# --------------------------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------------------------


#: Coarse-to-fine rejection thresholds, as shares of the size: a wide first pass captures the
#: initial misalignment; each narrower pass stops the non-overlapping rims and the outliers from
#: biasing the estimate (a single wide threshold leaves degrees of error on partial scans).
SCHEDULE = (0.08, 0.04, 0.02, 0.01)


def run_rigid_demo(
    out_dir: str | Path = "difficp_demo",
    seed: int = 0,
    metric: str = "point_to_plane",
    n_points: int = 20000,
    angle_deg: float = 20.0,
    translation_fraction: float = 0.1,
    noise_fraction: float = 0.005,
    outlier_fraction: float = 0.02,
    overlap_shift: float = 0.3,
    max_iterations: int = 60,
    register_points: int | None = 5000,
    plot: bool = True,
    verbose: bool = True,
) -> dict[str, Any]:
    """Make two partial noisy scans with a known pose, register them, report and plot.

    Args:
        out_dir: where ``demo.png`` and ``metrics.json`` go (created).
        seed: seeds the sampling, noise, outliers, footprints and the pose.
        metric: ICP metric; normals are estimated from the noisy scans, as in a real pipeline.
        n_points: surface samples per scan over the whole ``[-1, 1]^2`` terrain (a scan's
            footprint keeps about 55% of them).
        angle_deg, translation_fraction: true relative pose (rotation angle about a random axis
            through the centre; translation length as a share of the size = bounding-box
            diagonal of the terrain).
        noise_fraction: Gaussian noise std (per axis) as a share of the size.
        outlier_fraction: uniform outliers added to each scan, as a share of its points.
        overlap_shift: the footprints (radius 0.85) are centred at +-overlap_shift in a random
            direction: larger means less overlap.
        max_iterations: ICP iteration cap of each stage of :data:`SCHEDULE`.
        register_points: random source points used by ICP (None = all); the evaluation always
            uses all of them.
        plot: write ``demo.png``.
        verbose: print the report.
    Returns:
        The metrics written to ``metrics.json``: rotation_error_deg, translation_error (and
        relative to the size), fitness / rmse before, after and at the true pose, iterations,
        timings, and ``transform`` / ``true_transform`` (source -> target, 4x4 nested lists).
    """
    import torch

    # The clouds are small (thousands of points), so every torch op is short, and intra-op
    # threads only add synchronisation: on a busy machine they made each op ~50x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _rigid_demo(
            Path(out_dir), seed, metric, n_points, angle_deg, translation_fraction,
            noise_fraction, outlier_fraction, overlap_shift, max_iterations, register_points,
            plot, verbose,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def _rigid_demo(
    out_dir: Path, seed: int, metric: str, n_points: int, angle_deg: float,
    translation_fraction: float, noise_fraction: float, outlier_fraction: float,
    overlap_shift: float, max_iterations: int, register_points: int | None, plot: bool,
    verbose: bool,
) -> dict[str, Any]:  # fmt: skip
    """The body of :func:`run_rigid_demo` (same arguments)."""
    import torch

    import difficp
    from difficp.normals import estimate_normals

    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)

    # Two independent samplings of the terrain, scanned through two overlapping footprints.
    pts_a, _ = sample_terrain(n_points, rng)
    pts_b, _ = sample_terrain(n_points, rng)
    size = float(np.linalg.norm(pts_a.max(0) - pts_a.min(0)))
    noise = noise_fraction * size
    phi = rng.uniform(0.0, 2 * math.pi)
    offset = overlap_shift * np.array([math.cos(phi), math.sin(phi)])
    target = scan(pts_a, offset, 0.85, noise, outlier_fraction, rng)
    view_b = scan(pts_b, -offset, 0.85, noise, outlier_fraction, rng)

    # True pose T (source -> target): rotation about a random axis through the terrain's centre
    # and a translation of translation_fraction * size in a random direction. The source is the
    # second scan seen from a frame moved by T^-1, so that T brings it back.
    R = _rotation(rng.normal(size=3), angle_deg)
    direction = rng.normal(size=3)
    t = translation_fraction * size * direction / np.linalg.norm(direction)
    T_true = np.eye(4)
    T_true[:3, :3], T_true[:3, 3] = R, t
    source = (view_b - t) @ R  # row form of R^T (p - t), the inverse of p -> R p + t
    camera = np.array([0.0, 0.0, 3.0])  # both scanners look down on the terrain
    camera_source = (camera - t) @ R

    dtype = torch.float64
    src_all = torch.as_tensor(source, dtype=dtype)
    tgt = torch.as_tensor(target, dtype=dtype)
    t0 = time.perf_counter()
    # Normals from the noisy scans (k = 20 neighbours), oriented towards each scanner.
    src_n_all = estimate_normals(
        src_all, k=20, viewpoint=torch.as_tensor(camera_source, dtype=dtype)
    )
    tgt_n = estimate_normals(tgt, k=20, viewpoint=torch.as_tensor(camera, dtype=dtype))
    keep = torch.arange(len(source))
    if register_points is not None and register_points < len(source):
        keep = torch.as_tensor(rng.choice(len(source), size=register_points, replace=False))
    src, src_n = src_all[keep], src_n_all[keep]

    config = difficp.ICPConfig(
        correspondence="nearest",
        metric=metric,
        max_distance=SCHEDULE[0] * size,
        max_iterations=max_iterations,
        differentiation="none",
    )

    def register(stage: difficp.ICPConfig, count: int | None = None, init: Any = None) -> Any:
        """ICP of the first ``count`` points (None: all) with the normals ``stage`` reads."""
        return difficp.icp(
            src[:count],
            tgt[:count],
            init=init,
            source_normals=src_n[:count] if stage.needs_source_normals else None,
            target_normals=tgt_n[:count] if stage.needs_target_normals else None,
            config=stage,
        )

    # The first fast-path call in a fresh environment compiles it (cached on disk afterwards):
    # run one tiny registration first so that the ICP time below is the registration's own.
    t_compile = time.perf_counter()
    register(config.replace(max_iterations=1), 64)
    warmup_seconds = time.perf_counter() - t_compile
    t0 += warmup_seconds  # normals before, registration after: neither includes the warm-up
    transform = torch.eye(4, dtype=dtype)
    iterations = 0
    converged = False
    for share in SCHEDULE:
        res = register(config.replace(max_distance=share * size), init=transform)
        transform = res.transform.detach().reshape(-1, 4, 4)[0]
        iterations += int(res.iterations.reshape(-1)[0])
        converged = bool(res.converged.reshape(-1)[0])
    icp_seconds = time.perf_counter() - t0
    T_est = transform.double().numpy()

    R_err = T_est[:3, :3].T @ R
    rot_err = math.degrees(math.acos(float(np.clip((np.trace(R_err) - 1) / 2, -1.0, 1.0))))
    trans_err = float(np.linalg.norm(T_est[:3, 3] - t))
    eval_threshold = 0.02 * size
    fit_before, rmse_before = evaluate(source, target, np.eye(4), eval_threshold)
    fit_after, rmse_after = evaluate(source, target, T_est, eval_threshold)
    fit_true, rmse_true = evaluate(source, target, T_true, eval_threshold)

    metrics: dict[str, Any] = {
        "seed": seed,
        "metric": metric,
        "source_points": len(source),
        "target_points": len(target),
        "registered_source_points": len(keep),
        "size": size,
        "noise_std": noise,
        "outlier_fraction": outlier_fraction,
        "true_rotation_deg": angle_deg,
        "true_translation": float(np.linalg.norm(t)),
        "rotation_error_deg": rot_err,
        "translation_error": trans_err,
        "translation_error_relative": trans_err / size,
        "max_distance_schedule": [share * size for share in SCHEDULE],
        "evaluation_threshold": eval_threshold,
        "fitness_before": fit_before,
        "rmse_before": rmse_before,
        "fitness_after": fit_after,
        "rmse_after": rmse_after,
        "fitness_true_pose": fit_true,
        "rmse_true_pose": rmse_true,
        "iterations": iterations,
        "converged": converged,
        "icp_seconds": icp_seconds,
        "warmup_seconds": warmup_seconds,
        "transform": T_est.tolist(),
        "true_transform": T_true.tolist(),
    }
    if plot:
        _plot(out_dir / "demo.png", source, target, T_est, metrics)
    metrics["total_seconds"] = time.perf_counter() - start
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    if verbose:
        print(_report(metrics, out_dir, plot))
    return metrics


def _report(m: dict[str, Any], out_dir: Path, plot: bool) -> str:
    schedule = ", ".join(f"{d:.3f}" for d in m["max_distance_schedule"])
    lines = [
        f"difficp rigid demo (seed {m['seed']}): two partial scans of a procedural terrain, "
        f"size {m['size']:.2f}, noise std {m['noise_std']:.4f}, "
        f"{100 * m['outlier_fraction']:.0f}% outliers",
        f"  source {m['source_points']} points ({m['registered_source_points']} used), target "
        f"{m['target_points']} points",
        f"  true pose: {m['true_rotation_deg']:.1f} deg rotation, "
        f"{m['true_translation']:.3f} translation",
        f"  ICP ({m['metric']}, nearest, max_distance {schedule}): {m['iterations']} iterations "
        f"in {m['icp_seconds']:.2f} s (normals included), converged: "
        f"{str(m['converged']).lower()}",
        f"  rotation error:    {m['rotation_error_deg']:.3f} deg",
        f"  translation error: {m['translation_error']:.4f} "
        f"({100 * m['translation_error_relative']:.2f}% of size)",
        f"  fitness @ {m['evaluation_threshold']:.3f}: before {m['fitness_before']:.3f}, "
        f"after {m['fitness_after']:.3f} (true pose {m['fitness_true_pose']:.3f})",
        f"  inlier RMSE:       before {m['rmse_before']:.4f}, after {m['rmse_after']:.4f} "
        f"(true pose {m['rmse_true_pose']:.4f})",
    ]
    if m["warmup_seconds"] > 1.0:
        lines.insert(
            4,
            f"  (one-time compile of the fast path: {m['warmup_seconds']:.0f} s, cached for "
            "later runs and not counted above)",
        )
    written = ["metrics.json"] + (["demo.png"] if plot else [])
    lines.append(f"  wrote {', '.join(str(out_dir / w) for w in written)}")
    return "\n".join(lines)


_COLOURS = {"target": "#1f77b4", "source": "#e8590c"}


def _plot(
    path: Path, source: np.ndarray, target: np.ndarray, T: np.ndarray, m: dict[str, Any]
) -> None:
    """Before/after figure: top row 3-D views, bottom row a thin vertical slice (side view)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    after_all = _apply(T, source)
    show = 3500  # points per cloud in the 3-D views: enough to read the shape, light to render

    def pick(n: int) -> np.ndarray:
        return rng.choice(n, size=min(show, n), replace=False)

    ti, si = pick(len(target)), pick(len(source))
    stages = [
        ("before", source, m["fitness_before"], m["rmse_before"]),
        ("after ICP", after_all, m["fitness_after"], m["rmse_after"]),
    ]
    everything = np.concatenate([target, source, after_all])
    # Limits from the bulk of the points (outliers would shrink the terrain), with a margin.
    lo = np.percentile(everything, 0.5, axis=0)
    hi = np.percentile(everything, 99.5, axis=0)
    lo, hi = lo - 0.03 * (hi - lo), hi + 0.03 * (hi - lo)

    from scipy.spatial import cKDTree

    tree = cKDTree(target)
    distance_to_target = {label: tree.query(cloud)[0] for label, cloud, _, _ in stages}
    far = 0.05 * m["size"]  # the colour scale saturates at 5% of the terrain's size

    fig = plt.figure(figsize=(13, 9), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=[1.2, 1])
    for c, (label, src, fit, rmse) in enumerate(stages):
        ax = fig.add_subplot(grid[0, c], projection="3d")
        # The target in light grey, the source coloured by each point's distance to the target
        # on one scale for both panels: misalignment reads at a glance as warm colours.
        dist = distance_to_target[label][si]
        ax.scatter(*target[ti].T, s=1.5, c="#c8c8c8", linewidths=0, depthshade=False)
        coloured = ax.scatter(
            *src[si].T,
            s=2.5,
            c=dist,
            cmap="inferno_r",
            vmin=0.0,
            vmax=far,
            linewidths=0,
            depthshade=False,
        )
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_zlim(lo[2], hi[2])
        # Heights exaggerated 2x so the hills read at a glance; no panes or ticks to clutter.
        aspect = (hi - lo) * np.array([1.0, 1.0, 2.0])
        ax.set_box_aspect(aspect / aspect.max(), zoom=1.45)
        ax.view_init(elev=25, azim=-62)
        ax.set_axis_off()
        ax.set_title(f"{label}: fitness {fit:.2f}, inlier RMSE {rmse:.4f}", fontsize=12)

        # Side view of a thin slab |y - y_mid| < 4% of the size: the terrain profiles of the
        # two scans lie on each other exactly when the pose is right.
        ax2 = fig.add_subplot(grid[1, c])
        y_mid = 0.5 * (lo[1] + hi[1])
        half = 0.04 * m["size"]
        for name, cloud in (("target", target), ("source", src)):
            slab = cloud[np.abs(cloud[:, 1] - y_mid) < half]
            ax2.scatter(slab[:, 0], slab[:, 2], s=3, c=_COLOURS[name], linewidths=0, label=name)
        ax2.set_xlim(lo[0], hi[0])
        ax2.set_ylim(lo[2] - 0.1 * (hi[2] - lo[2]), hi[2] + 0.1 * (hi[2] - lo[2]))
        ax2.set_aspect("equal")
        ax2.set_xlabel("x")
        ax2.set_ylabel("z")
        ax2.set_title(
            f"{label}: side view of the slice |y - {y_mid:.2f}| < {half:.2f}", fontsize=11
        )
    bar = fig.colorbar(coloured, ax=fig.axes[::2], shrink=0.5, location="right", extend="max")
    bar.set_label("source point's distance to the target (dark after ICP: outside the target scan)")
    handles = [
        plt.Line2D([], [], marker="o", ls="", color="#c8c8c8", label="target scan (3-D views)"),
        plt.Line2D([], [], marker="o", ls="", color=_COLOURS["target"], label="target scan"),
        plt.Line2D([], [], marker="o", ls="", color=_COLOURS["source"], label="source scan"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=12, frameon=False)
    fig.suptitle(
        f"difficp rigid demo: {m['metric']} ICP on two partial noisy scans "
        f"(true pose: {m['true_rotation_deg']:.0f} deg, translation {m['true_translation']:.2f})\n"
        f"error after ICP: rotation {m['rotation_error_deg']:.2f} deg, translation "
        f"{m['translation_error']:.4f} ({100 * m['translation_error_relative']:.2f}% of size)",
        fontsize=13,
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)
