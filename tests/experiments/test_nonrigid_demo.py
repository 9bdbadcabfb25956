"""The non-rigid demo end to end: the done-criterion (error falls at least tenfold) and outputs."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from difficp_experiments.demos.nonrigid import (
    bend,
    make_limb_scene,
    run_nonrigid_demo,
    surface_error,
)


def test_demo_error_falls_tenfold_and_writes_outputs(tmp_path: Path) -> None:
    metrics = run_nonrigid_demo(tmp_path, seed=1)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["error_before"] == metrics["error_before"]
    assert metrics["error_before"] > 0.01  # the deformation is large (> 1 cm mean)
    assert metrics["error_after"] * 10 <= metrics["error_before"], metrics
    assert metrics["error_vertex_after"] < metrics["error_vertex_before"]
    assert (tmp_path / "nonrigid_before_after.png").stat().st_size > 10_000


def test_scene_error_measure_is_exact_on_the_true_surface() -> None:
    scene = make_limb_scene(seed=0, n_source=300, n_target=500)
    # the true deformed source lies on the true surface: error ~ 0 (sub-0.1 mm)
    assert surface_error(scene.true_source, scene) < 1e-4
    # pushing it 5 mm along the true normals gives 5 mm
    from scipy.spatial import cKDTree

    _, idx = cKDTree(scene.surface.numpy()).query(scene.true_source.numpy())
    pushed = scene.true_source + 0.005 * scene.surface_normals[torch.from_numpy(idx)]
    assert abs(surface_error(pushed, scene) - 0.005) < 2e-4
    # the bend keeps the section z = 0 in place and is an isometry of the axis
    mid = torch.tensor([[0.03, -0.02, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(bend(mid, bend_deg=120.0, twist_deg=30.0, length=0.5), mid)
    axis = torch.stack([torch.zeros(50), torch.zeros(50), torch.linspace(-0.25, 0.25, 50)], -1)
    bent = bend(axis.double(), bend_deg=120.0, twist_deg=30.0, length=0.5)
    arc = (bent[1:] - bent[:-1]).norm(dim=-1).sum()
    assert abs(float(arc) - 0.5) < 1e-3
