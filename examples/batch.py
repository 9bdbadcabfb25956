"""Register a padded batch of pairs of different sizes in one call.

Each pair's result equals running it alone; ``source_lengths`` / ``target_lengths`` say how many
rows of each padded ``(B, N, 3)`` tensor are real points (the PyTorch3D convention).
"""

from __future__ import annotations

import os

import torch

import difficp


def main() -> None:
    quick = bool(os.environ.get("DIFFICP_EXAMPLE_QUICK"))
    g = torch.Generator().manual_seed(0)
    batch, max_points = (8, 500) if quick else (64, 2000)
    lengths = torch.randint(max_points // 2, max_points + 1, (batch,), generator=g)
    shapes = torch.rand(batch, max_points, 3, generator=g)
    shapes[..., 2] = torch.sin(3 * shapes[..., 0]) * torch.cos(2 * shapes[..., 1])
    R = difficp.geometry.random_rotation(batch, max_angle_deg=10, generator=g)
    t = 0.05 * torch.randn(batch, 1, 3, generator=g)
    source = shapes
    target = shapes @ R.transpose(1, 2) + t
    # padding rows are ignored: fill them with anything finite
    pad = torch.arange(max_points)[None, :] >= lengths[:, None]
    source[pad] = 0.0
    target[pad] = 0.0

    result = difficp.icp(
        source, target, source_lengths=lengths, target_lengths=lengths, max_distance=0.2
    )
    rotation_error = difficp.geometry.rotation_angle_deg(result.transform[:, :3, :3] @ R.mT)
    print(f"{batch} pairs of {int(lengths.min())}-{int(lengths.max())} points")
    print(
        f"rotation error: median {rotation_error.median():.2e} deg, max {rotation_error.max():.2e}"
    )
    print(f"converged: {int(result.converged.sum())}/{batch}")
    alone = difficp.icp(source[0, : lengths[0]], target[0, : lengths[0]], max_distance=0.2)
    gap = (alone.transform - result.transform[0]).abs().max()
    print(f"pair 0 batched vs alone: max |dT| = {gap:.1e}")
    assert gap < 1e-4


if __name__ == "__main__":
    main()
