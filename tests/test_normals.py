"""estimate_normals: the compiled path (difficp.kdtree.pca_normals) against the PyTorch one.

Both take the k nearest neighbours of each point (itself included) in its own cloud, the
smallest-eigenvalue eigenvector of their scatter matrix, and flip it to face the viewpoint.
Normals are compared where they are well defined: where the two smallest eigenvalues are apart
(a tie or a near-tie in the neighbour search, or a nearly isotropic neighbourhood, leaves the
direction free).
"""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings

import difficp
from difficp import normals as normals_module

from conftest import wavy_surface

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _well_defined(points: torch.Tensor, k: int, lengths: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` bool: the two smallest eigenvalues of the k-neighbourhood scatter differ by
    more than 1% of the largest (checked by brute force)."""
    B, N, _ = points.shape
    ok = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):
        n = int(lengths[b])
        p = points[b, :n].double()
        kb = min(k, n)
        idx = torch.cdist(p, p).topk(kb, largest=False).indices
        nb = p[idx] - p[idx].mean(1, keepdim=True)
        values = torch.linalg.eigvalsh(nb.transpose(1, 2) @ nb)
        ok[b, :n] = (values[:, 1] - values[:, 0]) > 1e-2 * values[:, 2]
    return ok


@st.composite
def batches(draw: st.DrawFn) -> dict:
    """A padded batch of noisy surface patches (some clouds smaller than k), a k and viewpoints."""
    B = draw(st.integers(1, 3))
    N = draw(st.integers(3, 400))
    lengths = draw(st.lists(st.integers(3, N), min_size=B, max_size=B))
    k = draw(st.integers(3, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    uv = torch.rand(B, N, 2, generator=g, dtype=torch.float64)
    height = 0.2 * torch.sin(4 * uv[..., :1]) * torch.cos(3 * uv[..., 1:])
    pts = torch.cat([uv, height], -1) + 0.002 * torch.randn(
        B, N, 3, generator=g, dtype=torch.float64
    )
    pts = pts * draw(st.sampled_from([1e-3, 1.0, 1e3])) + draw(st.sampled_from([0.0, 50.0]))
    viewpoint = torch.randn(B, 3, generator=g, dtype=torch.float64) * 3
    return {"points": pts, "lengths": torch.tensor(lengths), "k": k, "viewpoint": viewpoint}


@SETTINGS
@given(batches())
def test_compiled_normals_equal_the_pytorch_path(case: dict) -> None:
    pts, lengths, k, vp = case["points"], case["lengths"], case["k"], case["viewpoint"]
    N = pts.shape[1]
    k = max(3, min(k, N))
    fast = normals_module._compiled_normals(pts, k, vp, lengths)
    ref = normals_module._torch_normals(pts, k, vp, lengths)
    valid = torch.arange(N)[None] < lengths[:, None]
    assert torch.equal(fast[~valid], torch.zeros_like(fast[~valid]))  # padding: zero normals
    assert torch.equal(ref[~valid], torch.zeros_like(ref[~valid]))
    ok = _well_defined(pts, k, lengths)
    np.testing.assert_allclose(fast[ok].numpy(), ref[ok].numpy(), atol=1e-9)
    # Unit length, facing the viewpoint, everywhere valid (also where the direction is free).
    np.testing.assert_allclose(fast[valid].norm(dim=-1).numpy(), 1.0, atol=1e-12)
    toward = ((vp[:, None] - pts) * fast).sum(-1)
    assert (toward[valid] >= 0).all()


def test_real_scan_normals_equal_the_pytorch_path(data_dir) -> None:
    """A 3DMatch fragment (3903 points), k = 30: the same normals on both paths."""
    from difficp.io import read_point_cloud

    cloud = read_point_cloud(data_dir / "scans" / "open3d_3dmatch_pair" / "feature_cloud_bin_0.pcd")
    pts = torch.as_tensor(np.asarray(cloud.points), dtype=torch.float64)[None]
    lengths = torch.tensor([pts.shape[1]])
    vp = torch.zeros(1, 3, dtype=torch.float64)
    fast = normals_module._compiled_normals(pts, 30, vp, lengths)
    ref = normals_module._torch_normals(pts, 30, vp, lengths)
    ok = _well_defined(pts, 30, lengths)
    assert ok.float().mean() > 0.9
    np.testing.assert_allclose(fast[ok].numpy(), ref[ok].numpy(), atol=1e-9)


def test_both_paths_take_the_same_neighbours_at_ties() -> None:
    """A depth image's cloud has many points whose k-th and (k+1)-th neighbours are equally far
    (a fifth of a Redwood frame's at k = 30); which of them a search takes depends on the tree.
    On integer pixels with integer depth steps every distance is exact and ties abound: both
    paths must still give the same normals (they search trees of the same leaf size)."""
    i, j = torch.meshgrid(torch.arange(40.0), torch.arange(40.0), indexing="ij")
    depth = torch.floor(6 * torch.sin(i / 9) + 4 * torch.cos(j / 7))  # steps of one unit
    pts = torch.stack([i, j, depth], -1).reshape(1, -1, 3).double()
    lengths = torch.tensor([pts.shape[1]])
    vp = torch.tensor([[20.0, 20.0, 100.0]], dtype=torch.float64)
    d = torch.cdist(pts[0], pts[0]).sort(1).values
    assert (d[:, 29] == d[:, 30]).float().mean() > 0.2  # ties at k = 30 are common here
    fast = normals_module._compiled_normals(pts, 30, vp, lengths)
    ref = normals_module._torch_normals(pts, 30, vp, lengths)
    np.testing.assert_allclose(fast.numpy(), ref.numpy(), atol=1e-9)


def test_float32_normals_agree_with_the_pytorch_path() -> None:
    pts, _ = wavy_surface(2000, torch.Generator().manual_seed(3), torch.float32)
    fast = difficp.estimate_normals(pts, k=20)
    ref = normals_module._torch_normals(pts[None], 20, torch.zeros(1, 3), None)[0]
    assert fast.dtype == torch.float32
    assert ((fast * ref).sum(-1) > 1 - 1e-5).float().mean() > 0.99


def test_estimate_normals_matches_the_surface() -> None:
    pts, truth = wavy_surface(3000, torch.Generator().manual_seed(0))
    normals = difficp.estimate_normals(pts, k=16, viewpoint=torch.zeros(3, dtype=pts.dtype))
    # The origin is inside the blob: normals face inwards, against the outward truth.
    assert ((normals * -truth).sum(-1) > 0.98).float().mean() > 0.97


def test_path_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled path runs on the CPU without gradients; points that require grad keep the
    PyTorch path (the rule of ICP's fast path)."""
    calls: list[str] = []
    for name in ("_compiled_normals", "_torch_normals"):
        original = getattr(normals_module, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(normals_module, name, spy)
    pts = torch.rand(200, 3, dtype=torch.float64)
    difficp.estimate_normals(pts)
    difficp.estimate_normals(pts.requires_grad_(True))
    with torch.no_grad():
        difficp.estimate_normals(pts)
    assert calls == ["_compiled_normals", "_torch_normals", "_compiled_normals"]


def test_clouds_smaller_than_k_use_all_their_points() -> None:
    """Lengths below k: every valid point is a neighbour (the PyTorch path used to fill the
    missing neighbours with the cloud's first point)."""
    g = torch.Generator().manual_seed(1)
    plane = torch.rand(2, 10, 3, generator=g, dtype=torch.float64)
    plane[..., 2] = 0.5
    lengths = torch.tensor([10, 5])
    vp = torch.tensor([[0.0, 0.0, 2.0]], dtype=torch.float64).expand(2, 3)
    for fn in (normals_module._compiled_normals, normals_module._torch_normals):
        n = fn(plane, 10, vp, lengths)
        np.testing.assert_allclose(n[1, :5].numpy(), [[0.0, 0.0, 1.0]] * 5, atol=1e-12)
        assert torch.equal(n[1, 5:], torch.zeros(5, 3, dtype=torch.float64))
