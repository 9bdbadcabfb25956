"""Register two real 3-D scans (the 3DMatch fragments of the data folder) with point-to-plane ICP.

Run: ``DIFFICP_DATA=path/to/data python examples/register_scans.py``. Without the data folder it
registers a synthetic pair instead, so the script always runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

import difficp


def load_pair() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """Source points, target points and target normals ``(N, 3)``, float64, and a description."""
    data = os.environ.get("DIFFICP_DATA")
    folder = Path(data, "scans", "open3d_3dmatch_pair") if data else None
    if folder is not None and folder.is_dir():
        source = difficp.io.read_point_cloud(folder / "feature_cloud_bin_0.pcd")
        target = difficp.io.read_point_cloud(folder / "feature_cloud_bin_1.pcd")
        src, _ = source.to_torch(torch.float64)
        tgt, tgt_normals = target.to_torch(torch.float64)
        return src, tgt, tgt_normals, "3DMatch fragments 0 -> 1"
    g = torch.Generator().manual_seed(0)
    tgt = torch.rand(3000, 3, generator=g, dtype=torch.float64)
    tgt[:, 2] = 0.2 * torch.sin(4 * tgt[:, 0]) * torch.cos(3 * tgt[:, 1])  # a wavy surface
    R = difficp.geometry.random_rotation(max_angle_deg=5, generator=g, dtype=torch.float64)
    src = (tgt - torch.tensor([0.03, -0.02, 0.01], dtype=torch.float64)) @ R  # moved copy
    return src, tgt, difficp.estimate_normals(tgt, k=16), "synthetic wavy surface"


def main() -> None:
    source, target, target_normals, what = load_pair()
    result = difficp.icp(
        source,
        target,
        target_normals=target_normals,
        metric="point_to_plane",
        max_distance=0.05,
        max_iterations=50,
    )
    print(f"{what}: {len(source)} -> {len(target)} points")
    print(f"fitness {result.fitness:.3f}, inlier RMSE {result.inlier_rmse:.4f}")
    print(f"iterations {int(result.iterations)}, converged {bool(result.converged)}")
    print("source -> target transform:")
    print(result.transform.numpy().round(4))
    assert result.fitness > 0.3


if __name__ == "__main__":
    main()
