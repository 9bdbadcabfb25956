"""The optional anny body example: mesh helpers always, the fit only when ``anny`` is installed."""

from __future__ import annotations

import pytest
import torch

from difficp_experiments.demos.anny_fit import render_depth, vertex_normals


def _square(z: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A 1 m square at depth ``z`` facing a camera at the origin looking along +z."""
    v = torch.tensor(
        [[-0.5, -0.5, z], [0.5, -0.5, z], [0.5, 0.5, z], [-0.5, 0.5, z]], dtype=torch.float64
    )
    f = torch.tensor([[0, 2, 1], [0, 3, 2]])
    return v, f


def test_vertex_normals_of_a_flat_square() -> None:
    v, f = _square(2.0)
    n = vertex_normals(v[None], f)[0]
    torch.testing.assert_close(n.abs(), torch.tensor([[0.0, 0, 1]] * 4, dtype=torch.float64))
    assert torch.allclose(n, n[:1].expand(4, 3))  # consistently oriented


def test_render_depth_z_buffers_the_nearest_surface() -> None:
    near, f = _square(2.0)
    far, _ = _square(3.0)
    verts = torch.cat([far, near])
    faces = torch.cat([f, f + 4])
    K = torch.tensor([[50.0, 0, 32], [0, 50.0, 32], [0, 0, 1]], dtype=torch.float64)
    depth = render_depth(
        verts,
        faces,
        K,
        torch.eye(4, dtype=torch.float64),
        (64, 64),
        samples=50_000,
        generator=torch.Generator().manual_seed(0),
    )
    seen = depth[depth > 0]
    # the near square covers +-12.5 px around the centre: every covered pixel is at 2 m
    assert seen.numel() > 400
    torch.testing.assert_close(seen, torch.full_like(seen, 2.0))
    assert depth[32, 32] == 2.0 and depth[0, 0] == 0


@pytest.mark.slow
def test_anny_fit_reduces_vertex_error() -> None:
    pytest.importorskip("anny")
    from difficp_experiments.demos.anny_fit import run_anny_fit

    m = run_anny_fit(None, seed=0, iterations=6)
    assert m["vertex_error_after"] * 2.5 < m["vertex_error_before"], m
