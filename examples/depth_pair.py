"""Register two depth images (Redwood RGB-D frames) by projective ICP.

The source frame becomes a point cloud; the target stays a depth image, and each source point is
matched to the target pixel it projects to. Run with ``DIFFICP_DATA`` set; without the data
folder the script renders a synthetic pair (a tilted plane with bumps) instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

import difficp


def load_pair() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """Source depth, target depth ``(H, W)`` and intrinsics ``(3, 3)``, float64."""
    data = os.environ.get("DIFFICP_DATA")
    folder = Path(data, "scans", "redwood_rgbd") if data else None
    if folder is not None and folder.is_dir():
        K = torch.from_numpy(difficp.io.read_intrinsics(folder / "camera_primesense.json"))
        src = torch.from_numpy(difficp.io.read_depth(folder / "depth" / "00000.png", 1000.0))
        tgt = torch.from_numpy(difficp.io.read_depth(folder / "depth" / "00002.png", 1000.0))
        return src, tgt, K, "Redwood frames 0 -> 2"
    H, W = 120, 160
    K = torch.tensor([[150.0, 0, 79.5], [0, 150.0, 59.5], [0, 0, 1]], dtype=torch.float64)
    v, u = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    bumps = 0.05 * torch.sin(u / 9.0) * torch.cos(v / 7.0)
    tgt = (2.0 + 0.004 * u + bumps).double()
    src = torch.roll(tgt, shifts=(2, 3), dims=(0, 1))  # the camera moved a little
    return src, tgt, K, "synthetic bumpy plane"


def main() -> None:
    source_depth, target_depth, K, what = load_pair()
    points = difficp.depth_to_points(source_depth, K).reshape(-1, 3)
    points = points[points[:, 2] > 0]
    step = max(1, len(points) // 20000)  # every few points is plenty for ICP
    points = points[::step]
    result = difficp.icp(
        points,
        target_depth,
        correspondence="projective",
        intrinsics=K,
        metric="point_to_plane",
        max_distance=0.1,
        max_iterations=30,
    )
    print(f"{what}: {len(points)} source points against a {tuple(target_depth.shape)} depth map")
    print(f"fitness {result.fitness:.3f}, inlier RMSE {result.inlier_rmse:.4f} m")
    print(f"iterations {int(result.iterations)}, converged {bool(result.converged)}")
    print("source camera -> target camera:")
    print(result.transform.numpy().round(4))
    assert result.fitness > 0.5


if __name__ == "__main__":
    main()
