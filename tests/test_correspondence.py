"""Correspondence search: every fast path against a simple reference."""

from __future__ import annotations

import pytest
import torch

import difficp
from difficp.correspondence import (
    DepthTarget,
    NeighborIndex,
    PointTarget,
    nearest_correspondences,
    projective_correspondences,
    soft_correspondences,
)
from difficp.geometry import depth_normals, depth_to_points, points_to_pixels
from difficp.softmatch import dense_soft_match

from conftest import make_pair


def _reference_nearest(q: torch.Tensor, r: torch.Tensor, r_len: torch.Tensor) -> torch.Tensor:
    d = torch.cdist(q, r)
    mask = torch.arange(r.shape[1])[None, None, :] >= r_len[:, None, None]
    return d.masked_fill(mask, float("inf")).argmin(-1)


@pytest.mark.parametrize("backend", ["kdtree", "brute_force"])
def test_nearest_matches_exhaustive_search_on_padded_batch(backend: str) -> None:
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(3, 400, 3, generator=g, dtype=torch.float64)
    ref[1] *= 50  # very different scales across the batch must not leak between clouds
    lengths = torch.tensor([400, 250, 17])
    queries = torch.rand(3, 300, 3, generator=g, dtype=torch.float64)
    queries[1] *= 50
    index = NeighborIndex(ref, lengths, backend)
    got, found = index.query(queries, 1)
    expected = _reference_nearest(queries, ref, lengths)
    assert found.all()
    assert torch.equal(got[..., 0], expected)
    assert (got[..., 0] < lengths[:, None]).all()


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("max_distance", [None, 0.08])
def test_one_off_compiled_query_equals_the_repeated_one(k: int, max_distance: float | None) -> None:
    """``repeated=False`` (a plain search, no warm-start state) answers as ICP's repeated
    questions do, on padded clouds with masked-out queries."""
    g = torch.Generator().manual_seed(5)
    ref = torch.rand(3, 300, 3, generator=g, dtype=torch.float64)
    lengths = torch.tensor([300, 120, 31])
    queries = torch.rand(3, 200, 3, generator=g, dtype=torch.float64)
    query_mask = torch.rand(3, 200, generator=g) < 0.9
    for index in (NeighborIndex(ref, lengths, "compiled"), NeighborIndex(ref, lengths, "kdtree")):
        once = index.query(queries, k, query_mask, max_distance, repeated=False)
        again = index.query(queries, k, query_mask, max_distance)
        assert torch.equal(once[1], again[1])
        assert torch.equal(once[0], again[0])
        assert bool(once[1].any()) and bool((once[0] < lengths[:, None, None]).all())
        expected = _reference_nearest(queries, ref, lengths)
        assert torch.equal(once[0][..., 0][once[1][..., 0]], expected[once[1][..., 0]])


def test_knn_order_and_radius() -> None:
    g = torch.Generator().manual_seed(1)
    ref = torch.rand(1, 500, 3, generator=g, dtype=torch.float64)
    q = torch.rand(1, 50, 3, generator=g, dtype=torch.float64)
    for backend in ("kdtree", "brute_force"):
        idx, found = NeighborIndex(ref, backend=backend).query(q, 5, max_distance=0.1)
        d = (ref[0][idx[0]] - q[0][:, None]).norm(dim=-1)
        exact = torch.cdist(q[0], ref[0]).topk(5, largest=False).values
        assert torch.equal(found[0], exact < 0.1)
        assert torch.allclose(d[found[0]], exact[found[0]])


def test_soft_tends_to_nearest_as_temperature_goes_to_zero() -> None:
    p = make_pair(2, n=300, noise=0.01)
    src, tgt = p["source"][None], p["target"][None]
    mask_s = torch.ones(1, src.shape[1], dtype=torch.bool)
    mask_t = torch.ones(1, tgt.shape[1], dtype=torch.bool)
    target = PointTarget(tgt, p["target_normals"][None], mask_t, NeighborIndex(tgt))
    hard = nearest_correspondences(src, target, mask_s)
    errors = []
    for T in (1e-2, 1e-4, 1e-7):
        for k in (None, 8):
            soft = soft_correspondences(src, target, T, mask_s, k)
            errors.append((soft.points - hard.points).abs().max().item())
            if T == 1e-7:
                torch.testing.assert_close(soft.points, hard.points, atol=1e-9, rtol=0)
                torch.testing.assert_close(soft.normals, hard.normals, atol=1e-9, rtol=0)
    assert errors[0] > errors[2] > errors[4]  # decreasing with T (dense)


def test_soft_top_k_equals_dense_when_k_covers_all() -> None:
    p = make_pair(3, n=80)
    src, tgt = p["source"][None], p["target"][None]
    ms = torch.ones(1, 80, dtype=torch.bool)
    target = PointTarget(tgt, p["target_normals"][None], ms, NeighborIndex(tgt))
    dense = soft_correspondences(src, target, 0.05, ms)
    topk = soft_correspondences(src, target, 0.05, ms, 80)
    torch.testing.assert_close(dense.points, topk.points)
    torch.testing.assert_close(dense.normals, topk.normals)


def _plain_dense(source, target, normals, temperature, mask):
    d2 = ((source[:, :, None] - target[:, None]) ** 2).sum(-1)
    w = torch.softmax((-d2 / temperature).masked_fill(~mask[:, None], float("-inf")), -1)
    return w @ target, w @ normals


def test_chunked_dense_soft_match_equals_plain_autograd() -> None:
    g = torch.Generator().manual_seed(4)
    src = torch.rand(2, 37, 3, generator=g, dtype=torch.float64, requires_grad=True)
    tgt = torch.rand(2, 23, 3, generator=g, dtype=torch.float64, requires_grad=True)
    nrm = torch.rand(2, 23, 3, generator=g, dtype=torch.float64, requires_grad=True)
    temp = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 23, dtype=torch.bool)
    mask[1, 15:] = False
    # A tiny block forces many chunks: the recomputing backward must match plain autograd.
    ours = dense_soft_match(src, tgt, nrm, temp, mask, block=200)
    pts, raw = _plain_dense(src, tgt, nrm, temp, mask)
    torch.testing.assert_close(ours[0], pts)
    torch.testing.assert_close(ours[1], raw / raw.norm(dim=-1, keepdim=True))
    assert torch.autograd.gradcheck(
        lambda s, t, n, T: dense_soft_match(s, t, n, T, mask, block=200), (src, tgt, nrm, temp)
    )


def _plane_depth(H: int = 24, W: int = 32, z: float = 2.0):
    K = torch.tensor([[30.0, 0, 15.5], [0, 30.0, 11.5], [0, 0, 1]], dtype=torch.float64)
    depth = torch.full((1, H, W), z, dtype=torch.float64)
    depth[0, :3, :] = 0  # invalid rows
    return depth, K


def test_depth_back_projection_round_trip() -> None:
    depth, K = _plane_depth()
    pts = depth_to_points(depth, K)
    uv, z = points_to_pixels(pts.reshape(1, -1, 3), K)
    v, u = torch.meshgrid(torch.arange(24.0), torch.arange(32.0), indexing="ij")
    valid = depth.reshape(1, -1) > 0
    torch.testing.assert_close(uv[0, valid[0], 0], u.reshape(-1)[valid[0]].double())
    torch.testing.assert_close(uv[0, valid[0], 1], v.reshape(-1)[valid[0]].double())
    torch.testing.assert_close(z[valid], depth.reshape(1, -1)[valid])
    normals = depth_normals(pts)
    interior = normals[0, 5:-1, 1:-1]
    torch.testing.assert_close(
        interior, torch.tensor([0, 0, -1.0], dtype=torch.float64).expand_as(interior)
    )


def test_projective_correspondences_pick_the_pixel_and_reject_invalid() -> None:
    depth, K = _plane_depth()
    pts = depth_to_points(depth, K)
    target = DepthTarget(
        pts, depth_normals(pts), depth > 0, K[None], torch.eye(4, dtype=torch.float64)[None]
    )
    # Points just off the plane above pixels (u=10, v=12), (u=5, v=1: invalid row), behind camera, outside.
    src = torch.tensor(
        [
            [
                [(10 - 15.5) / 30 * 2.1, (12 - 11.5) / 30 * 2.1, 2.1],
                [(5 - 15.5) / 30 * 2, (1 - 11.5) / 30 * 2, 2.0],
                [0.0, 0.0, -1.0],
                [10.0, 0.0, 1.0],
            ]
        ],
        dtype=torch.float64,
    )
    corr = projective_correspondences(src, target, torch.ones(1, 4, dtype=torch.bool))
    assert corr.valid.tolist() == [[True, False, False, False]]
    torch.testing.assert_close(corr.points[0, 0], pts[0, 12, 10])
    torch.testing.assert_close(corr.distance[0, 0], (src[0, 0] - pts[0, 12, 10]).norm())


def test_projective_icp_aligns_a_depth_map_to_its_own_points() -> None:
    # A bumpy surface seen by a pinhole camera; the source is its back-projection moved by a
    # small known motion: projective point-to-plane ICP must undo it.
    H, W = 48, 64
    K = torch.tensor([[60.0, 0, 31.5], [0, 60.0, 23.5], [0, 0, 1]], dtype=torch.float64)
    v, u = torch.meshgrid(
        torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij"
    )
    depth = 2.0 + 0.15 * torch.sin(u / 6) * torch.cos(v / 5) + 0.002 * u
    pts = depth_to_points(depth, K).reshape(-1, 3)
    motion = difficp.make_transform(
        difficp.geometry.random_rotation(
            max_angle_deg=2, generator=torch.Generator().manual_seed(0), dtype=torch.float64
        ),
        torch.tensor([0.02, -0.01, 0.03], dtype=torch.float64),
    )
    source = difficp.transform_points(pts, difficp.invert_transform(motion))
    result = difficp.icp(
        source,
        depth,
        correspondence="projective",
        intrinsics=K,
        metric="point_to_plane",
        max_distance=0.2,
        max_iterations=50,
    )
    torch.testing.assert_close(result.transform, motion, atol=2e-3, rtol=0)
    assert float(result.fitness) > 0.9


def test_icp_with_forced_brute_force_search_equals_kdtree() -> None:
    # The GPU path (chunked brute force) forced on the CPU must give the same registration.
    p = make_pair(5, n=800, angle=10, translation=0.1, noise=0.003, overlap=0.8)
    runs = [
        difficp.icp(
            p["source"],
            p["target"],
            target_normals=p["target_normals"],
            metric="point_to_plane",
            max_distance=0.1,
            search_backend=backend,
        )
        for backend in ("kdtree", "brute_force")
    ]
    torch.testing.assert_close(runs[0].transform, runs[1].transform, atol=1e-10, rtol=0)
    assert int(runs[0].iterations) == int(runs[1].iterations)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    p = make_pair(6, n=2000, angle=10, translation=0.1)
    cpu = difficp.icp(p["source"], p["target"], max_distance=0.2)
    gpu = difficp.icp(p["source"].cuda(), p["target"].cuda(), max_distance=0.2)
    torch.testing.assert_close(gpu.transform.cpu(), cpu.transform, atol=1e-8, rtol=0)
    soft = difficp.icp(
        p["source"].cuda(), p["target"].cuda(), correspondence="soft", temperature=1e-4
    )
    assert torch.isfinite(soft.transform).all()
