"""Multiway registration: every pair of five RGB-D frames registered in one batched ICP call,
weighed by :func:`difficp.evaluate_registration`'s information matrices, then made consistent by
Open3D's pose-graph optimisation (the pose graph is Open3D's; difficp does the pairwise work).

With ``DIFFICP_DATA`` set it uses the five Redwood frames of the data folder and compares the
camera poses with their ``trajectory.log`` (good to about 5 mm / 0.1 degree); without it, five
overlapping views of a synthetic wavy surface with known poses. Needs Open3D for the pose graph
(``pip install open3d``).
"""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path

import numpy as np
import torch

import difficp

VOXEL = 0.02  # metres (the Redwood frames) or surface units (the synthetic views)


def read_log(path: Path) -> list[np.ndarray]:
    """The 4x4 matrices of a Redwood ``.log`` trajectory (a line ``i j n``, then four rows)."""
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return [np.array(rows[k + 1 : k + 5], dtype=np.float64) for k in range(0, len(rows), 5)]


def load_frames() -> tuple[list[torch.Tensor], list[np.ndarray], str]:
    """Point clouds ``(N_i, 3)`` float64 in their own camera frames and their camera-to-world
    poses (``p_world = T p_camera``)."""
    data = os.environ.get("DIFFICP_DATA")
    folder = Path(data, "scans", "redwood_rgbd") if data else None
    if folder is not None and folder.is_dir():
        K = torch.from_numpy(difficp.io.read_intrinsics(folder / "camera_primesense.json"))
        clouds = []
        for depth_file in sorted((folder / "depth").glob("*.png")):
            depth = torch.from_numpy(difficp.io.read_depth(depth_file, 1000.0))
            depth[depth > 3.0] = 0.0  # far pixels are the noisiest
            points = difficp.depth_to_points(depth, K).reshape(-1, 3)
            clouds.append(points[points[:, 2] > 0])
        return clouds, read_log(folder / "trajectory.log"), "Redwood living room, 5 frames"
    g = torch.Generator().manual_seed(0)
    world = torch.rand(40000, 3, generator=g, dtype=torch.float64) * torch.tensor([2.0, 1.0, 0])
    world[:, 2] = 0.15 * torch.sin(5 * world[:, 0]) * torch.cos(4 * world[:, 1])
    clouds, poses = [], []
    for i in range(5):
        R = difficp.geometry.random_rotation(max_angle_deg=4, generator=g, dtype=torch.float64)
        T = difficp.make_transform(R, torch.tensor([0.2 * i, 0.0, 0.5], dtype=torch.float64))
        seen = world[(world[:, 0] > 0.2 * i) & (world[:, 0] < 0.2 * i + 1.0)]
        seen = seen + 0.002 * torch.randn(seen.shape, generator=g, dtype=torch.float64)
        clouds.append(difficp.transform_points(seen, difficp.invert_transform(T)))
        poses.append(T.numpy())
    return clouds, poses, "synthetic wavy surface, 5 views"


def padded(clouds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, N, 3)`` zero-padded and ``(B,)`` lengths."""
    lengths = torch.tensor([len(c) for c in clouds])
    out = torch.zeros(len(clouds), int(lengths.max()), 3, dtype=clouds[0].dtype)
    for b, cloud in enumerate(clouds):
        out[b, : len(cloud)] = cloud
    return out, lengths


def pairwise(
    clouds: list[torch.Tensor], normals: list[torch.Tensor], pairs: list[tuple[int, int]], init
) -> tuple[torch.Tensor, torch.Tensor]:
    """Transforms ``(P, 4, 4)`` taking cloud ``i`` into cloud ``j``'s frame for each pair
    ``(i, j)``, and their information matrices ``(P, 6, 6)``: two batched calls."""
    source, source_lengths = padded([clouds[i] for i, _ in pairs])
    target, target_lengths = padded([clouds[j] for _, j in pairs])
    target_normals, _ = padded([normals[j] for _, j in pairs])
    lengths = {"source_lengths": source_lengths, "target_lengths": target_lengths}
    result = difficp.icp(
        source,
        target,
        init=init,
        target_normals=target_normals,
        metric="point_to_plane",
        max_distance=3 * VOXEL,
        max_iterations=60,
        **lengths,
    )
    score = difficp.evaluate_registration(source, target, 3 * VOXEL, result.transform, **lengths)
    return result.transform, score.information


def pose_errors(poses: list[np.ndarray], truth: list[np.ndarray]) -> tuple[float, float]:
    """Largest rotation (degrees) and translation error of camera poses relative to frame 0."""
    worst_angle = worst_shift = 0.0
    for pose, true in zip(poses, truth, strict=True):
        expected = np.linalg.inv(truth[0]) @ true
        error = np.linalg.inv(expected) @ pose
        cosine = np.clip((np.trace(error[:3, :3]) - 1) / 2, -1.0, 1.0)
        worst_angle = max(worst_angle, math.degrees(math.acos(cosine)))
        worst_shift = max(worst_shift, float(np.linalg.norm(error[:3, 3])))
    return worst_angle, worst_shift


def main() -> None:
    try:
        import open3d as o3d
    except ImportError:
        raise SystemExit(
            "this example needs Open3D for the pose graph: pip install open3d"
        ) from None
    registration = o3d.pipelines.registration

    raw, truth, what = load_frames()
    points, lengths = padded(raw)
    grid = difficp.voxel_downsample(points, VOXEL, lengths)
    clouds = [grid.points[b, :n] for b, n in enumerate(grid.lengths.tolist())]
    normals = [difficp.estimate_normals(cloud, k=20) for cloud in clouds]

    # odometry first (neighbouring frames, from the identity), then every other pair from the
    # odometry's guess: the loop closures
    steps = [(i, i + 1) for i in range(len(clouds) - 1)]
    odometry, odometry_information = pairwise(clouds, normals, steps, None)
    chain = [np.eye(4)]  # world (frame 0) -> frame i
    for T in odometry.numpy():
        chain.append(T @ chain[-1])
    closures = [(i, j) for i, j in itertools.combinations(range(len(clouds)), 2) if j > i + 1]
    guesses = torch.from_numpy(np.stack([chain[j] @ np.linalg.inv(chain[i]) for i, j in closures]))
    loop, loop_information = pairwise(clouds, normals, closures, guesses)

    graph = registration.PoseGraph()
    for to_frame in chain:
        graph.nodes.append(registration.PoseGraphNode(np.linalg.inv(to_frame)))
    edges = [(steps, odometry, odometry_information, False)]
    edges.append((closures, loop, loop_information, True))
    for pairs, transforms, information, uncertain in edges:
        for (i, j), T, info in zip(pairs, transforms.numpy(), information.numpy(), strict=True):
            graph.edges.append(registration.PoseGraphEdge(i, j, T, info, uncertain=uncertain))
    option = registration.GlobalOptimizationOption(
        max_correspondence_distance=3 * VOXEL, edge_prune_threshold=0.25, reference_node=0
    )
    o3d.utility.set_verbosity_level(o3d.utility.VerbosityLevel.Error)
    registration.global_optimization(
        graph,
        registration.GlobalOptimizationLevenbergMarquardt(),
        registration.GlobalOptimizationConvergenceCriteria(),
        option,
    )

    print(f"{what}: {[len(c) for c in clouds]} points after {VOXEL} voxels")
    print(f"{len(steps)} odometry pairs, then {len(closures)} loop closures: one ICP call each")
    before = pose_errors([np.linalg.inv(to_frame) for to_frame in chain], truth)
    after = pose_errors([np.asarray(node.pose) for node in graph.nodes], truth)
    print(f"odometry alone:      worst {before[0]:.3f} deg, {1e3 * before[1]:.1f} mm")
    print(f"after the pose graph: worst {after[0]:.3f} deg, {1e3 * after[1]:.1f} mm")
    assert after[0] < 0.5 and after[1] < 0.02


if __name__ == "__main__":
    main()
