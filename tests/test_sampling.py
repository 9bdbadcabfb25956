"""Voxel down-sampling (parity with Open3D, batching, gradients) and multi-scale ICP."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

import difficp
from difficp.geometry import make_transform, random_rotation
from difficp.sampling import multiscale_icp, parse_scales, voxel_downsample

from conftest import make_pair

o3d = pytest.importorskip("open3d")

PAIR = ("scans", "open3d_3dmatch_pair")


def _sorted_rows(a: np.ndarray) -> np.ndarray:
    """Rows of ``a`` in lexicographic order (compare point sets up to order)."""
    return a[np.lexsort(a.T[::-1])]


def _open3d_downsample(points, normals, colors, voxel_size):
    cloud = o3d.geometry.PointCloud()
    cloud.points = o3d.utility.Vector3dVector(points)
    cloud.normals = o3d.utility.Vector3dVector(normals)
    cloud.colors = o3d.utility.Vector3dVector(colors)
    down = cloud.voxel_down_sample(voxel_size)
    return np.asarray(down.points), np.asarray(down.normals), np.asarray(down.colors)


def _assert_open3d_parity(points, normals, colors, voxel_size) -> None:
    ours = voxel_downsample(
        torch.from_numpy(points),
        voxel_size,
        normals=torch.from_numpy(normals),
        colors=torch.from_numpy(colors),
    )
    ref_p, ref_n, ref_c = _open3d_downsample(points, normals, colors, voxel_size)
    assert int(ours.lengths) == len(ref_p) == ours.points.shape[0]
    # Sort both by position and carry normals / colours along (9 columns per row).
    ref_unit = ref_n / np.linalg.norm(ref_n, axis=1, keepdims=True)  # Open3D does not normalise
    ref = _sorted_rows(np.hstack([ref_p, ref_unit, ref_c]))
    got = _sorted_rows(np.hstack([ours.points.numpy(), ours.normals.numpy(), ours.colors.numpy()]))
    np.testing.assert_allclose(got[:, :3], ref[:, :3], rtol=0, atol=1e-9)
    np.testing.assert_allclose(got[:, 3:6], ref[:, 3:6], rtol=0, atol=1e-9)
    np.testing.assert_allclose(got[:, 6:], ref[:, 6:], rtol=0, atol=1e-9)


@pytest.mark.parametrize("voxel_size", [0.05, 0.13, 0.4])
def test_open3d_parity_random_cloud(voxel_size: float) -> None:
    rng = np.random.default_rng(3)
    points = rng.normal(size=(3000, 3)) * [1.0, 0.5, 0.2] + [5.0, -2.0, 0.3]
    normals = rng.normal(size=(3000, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    colors = rng.random((3000, 3))
    _assert_open3d_parity(points, normals, colors, voxel_size)


@pytest.mark.parametrize("voxel_size", [0.02, 0.05, 0.1])
def test_open3d_parity_3dmatch_scan(data_dir, voxel_size: float) -> None:
    from difficp.io import read_point_cloud

    cloud = read_point_cloud(data_dir.joinpath(*PAIR, "feature_cloud_bin_0.pcd"))
    assert cloud.normals is not None and cloud.colors is not None
    _assert_open3d_parity(cloud.points, cloud.normals, cloud.colors, voxel_size)


def test_grid_is_anchored_at_each_clouds_minimum_minus_half_a_voxel() -> None:
    # Points at 0, 0.49, 0.51, 1.49 (voxel 1, min 0): Open3D's cells are [-0.5, 0.5), [0.5, 1.5),
    # so {0, 0.49} and {0.51, 1.49}; a grid anchored at the minimum would give {0, 0.49, 0.51}.
    x = torch.tensor([0.0, 0.49, 0.51, 1.49], dtype=torch.float64)
    points = torch.stack([x, torch.zeros(4), torch.zeros(4)], dim=1).double()
    grid = voxel_downsample(points + 7.25, 1.0)
    torch.testing.assert_close(
        grid.points[:, 0], torch.tensor([0.245, 1.0], dtype=torch.float64) + 7.25
    )


@settings(max_examples=15, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=4),
    voxel_size=st.sampled_from([0.1, 0.3, 0.7]),
    seed=st.integers(0, 2**16),
)
def test_batched_equals_each_cloud_alone(sizes: list[int], voxel_size: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    B, N = len(sizes), max(sizes) + 3
    # Padding rows hold garbage (far away, NaN): they must not enter any voxel or the bounds.
    points = torch.randn(B, N, 3, generator=g, dtype=torch.float64)
    normals = torch.nn.functional.normalize(
        torch.randn(B, N, 3, generator=g, dtype=torch.float64), dim=-1
    )
    colors = torch.rand(B, N, 2, generator=g, dtype=torch.float64)
    lengths = torch.tensor(sizes)
    for b, n in enumerate(sizes):
        points[b, n:] = float("nan") if b % 2 else 1e6
        normals[b, n:] = float("nan")
        colors[b, n:] = -5.0
    grid = voxel_downsample(points, voxel_size, lengths, normals, colors)
    assert grid.points.shape[:2] == (B, int(grid.lengths.max()) if B else 0)
    for b, n in enumerate(sizes):
        alone = voxel_downsample(
            points[b, :n], voxel_size, normals=normals[b, :n], colors=colors[b, :n]
        )
        m = int(alone.lengths)
        assert int(grid.lengths[b]) == m
        torch.testing.assert_close(grid.points[b, :m], alone.points, rtol=0, atol=1e-12)
        torch.testing.assert_close(grid.normals[b, :m], alone.normals, rtol=0, atol=1e-12)
        torch.testing.assert_close(grid.colors[b, :m], alone.colors, rtol=0, atol=1e-12)
        # Padding is zero, and every output normal is a unit vector.
        assert not grid.points[b, m:].any() and not grid.colors[b, m:].any()
        torch.testing.assert_close(
            grid.normals[b, :m].norm(dim=-1), torch.ones(m, dtype=torch.float64)
        )


def test_means_counts_and_colours_by_hand() -> None:
    points = torch.tensor(
        [[0.1, 0.1, 0.1], [0.3, 0.2, 0.1], [2.1, 0.1, 0.1], [0.2, 0.3, 0.4]], dtype=torch.float64
    )
    normals = torch.tensor(
        [[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 0, 0]], dtype=torch.float64
    )
    colors = torch.tensor([[0.0, 0.3], [0.6, 0.3], [1.0, 1.0], [0.3, 0.0]], dtype=torch.float64)
    grid = voxel_downsample(points, 1.0, normals=normals, colors=colors)
    assert int(grid.lengths) == 2
    torch.testing.assert_close(
        grid.points, torch.tensor([[0.2, 0.2, 0.2], [2.1, 0.1, 0.1]]).double()
    )
    torch.testing.assert_close(grid.colors, torch.tensor([[0.3, 0.2], [1.0, 1.0]]).double())
    expected = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64) / torch.tensor(
        [[math.sqrt(5)], [1.0]], dtype=torch.float64
    )
    torch.testing.assert_close(grid.normals, expected)


def test_cancelling_normals_give_zero_not_nan_and_dtype_is_kept() -> None:
    points = torch.tensor([[0.0, 0.0, 0.0], [0.1, 0.0, 0.0]])
    normals = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]])
    grid = voxel_downsample(points, 1.0, normals=normals)
    assert grid.points.dtype == torch.float32 and grid.normals.dtype == torch.float32
    assert torch.equal(grid.normals, torch.zeros(1, 3))


def test_empty_clouds_in_a_batch() -> None:
    points = torch.rand(3, 5, 3, dtype=torch.float64)
    grid = voxel_downsample(points, 0.5, lengths=torch.tensor([0, 5, 0]))
    assert grid.lengths[0] == 0 and grid.lengths[2] == 0 and grid.lengths[1] > 0
    all_empty = voxel_downsample(points, 0.5, lengths=torch.zeros(3, dtype=torch.long))
    assert all_empty.points.shape == (3, 0, 3)


def test_gradcheck_points_normals_colours_for_a_fixed_assignment() -> None:
    g = torch.Generator().manual_seed(0)
    # Points well inside their voxels (centres +- 0.3 of a 1.0 voxel): a 1e-6 step moves none
    # across a boundary, nor the grid (the minimum moves, but by far less than the margin).
    cells = torch.randint(0, 3, (20, 3), generator=g).double()
    points = cells + 0.5 + 0.6 * (torch.rand(20, 3, generator=g, dtype=torch.float64) - 0.5)
    points[0] = 0.5  # pin the grid origin to 0 (min bound 0.5, minus half a voxel)
    points = points.requires_grad_(True)
    normals = torch.randn(20, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    colors = torch.rand(20, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    batched = points.detach()[None].repeat(2, 1, 1).requires_grad_(True)
    lengths = torch.tensor([20, 13])

    def outputs(p, n, c):
        grid = voxel_downsample(p, 1.0, normals=n, colors=c)
        return grid.points, grid.normals, grid.colors

    assert torch.autograd.gradcheck(outputs, (points, normals, colors))
    assert torch.autograd.gradcheck(lambda p: voxel_downsample(p, 1.0, lengths).points, (batched,))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"voxel_size": 0.0}, "voxel_size"),
        ({"voxel_size": -1.0}, "voxel_size"),
        ({"voxel_size": float("nan")}, "voxel_size"),
        ({"voxel_size": float("inf")}, "voxel_size"),
        ({"voxel_size": torch.ones(2)}, "voxel_size"),
        ({"voxel_size": 1e-300}, "voxel_size"),
        ({"voxel_size": "abc"}, "voxel_size"),
        ({"points": torch.rand(10, 2)}, "points"),
        ({"points": torch.arange(30).reshape(10, 3)}, "points"),
        ({"points": torch.full((10, 3), float("nan"))}, "points"),
        ({"normals": torch.rand(9, 3)}, "normals"),
        ({"normals": torch.rand(10, 2)}, "normals"),
        ({"normals": torch.full((10, 3), float("inf"))}, "normals"),
        ({"colors": torch.rand(11, 3)}, "colors"),
        ({"colors": torch.full((10, 3), float("nan"))}, "colors"),
        ({"lengths": torch.tensor([10])}, "lengths"),
    ],
)
def test_bad_input_names_the_argument(kwargs: dict, match: str) -> None:
    args = {"points": torch.rand(10, 3), "voxel_size": 0.1, **kwargs}
    with pytest.raises(ValueError, match=match):
        voxel_downsample(**args)


@pytest.mark.parametrize(
    "lengths",
    [torch.tensor([3]), torch.tensor([3, 11]), torch.tensor([-1, 2]), torch.tensor([1.0, 2.0])],
)
def test_bad_lengths(lengths: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="lengths"):
        voxel_downsample(torch.rand(2, 10, 3), 0.1, lengths)


# ---------------------------------------------------------------------------------------------
# Multi-scale ICP
# ---------------------------------------------------------------------------------------------

STAGES = [(0.1, 0.3, 30), (0.05, 0.1, 30), (None, 0.02, 30)]


def _perturbed(reference: torch.Tensor, centre: torch.Tensor, seed: int) -> torch.Tensor:
    """``reference`` composed with a 20 degree rotation about ``centre`` and a 20 cm shift."""
    g = torch.Generator().manual_seed(seed)
    R = random_rotation(max_angle_deg=20.0, generator=g, dtype=torch.float64)
    shift = torch.nn.functional.normalize(torch.randn(3, generator=g, dtype=torch.float64), dim=0)
    return reference @ make_transform(R, centre - R @ centre + 0.2 * shift)


def test_multiscale_recovers_a_pose_single_scale_misses_on_3dmatch(data_dir) -> None:
    from difficp.io import read_point_cloud

    source = read_point_cloud(data_dir.joinpath(*PAIR, "feature_cloud_bin_0.pcd"))
    target = read_point_cloud(data_dir.joinpath(*PAIR, "feature_cloud_bin_1.pcd"))
    src, tgt = torch.from_numpy(source.points), torch.from_numpy(target.points)
    tgt_n = torch.from_numpy(target.normals)
    options = {"metric": "point_to_plane", "search_backend": "kdtree"}
    # Reference pose: converged from identity (the pair is roughly aligned), tight criteria.
    reference = difficp.icp(src, tgt, target_normals=tgt_n, max_distance=0.05, **options)
    reference = difficp.icp(
        src,
        tgt,
        init=reference.transform,
        target_normals=tgt_n,
        max_distance=0.02,
        max_iterations=100,
        relative_fitness=1e-10,
        relative_rmse=1e-10,
        **options,
    ).transform
    for seed in (0, 1):
        init = _perturbed(reference, src.mean(0), seed)
        single = difficp.icp(
            src,
            tgt,
            init=init,
            target_normals=tgt_n,
            max_distance=0.02,
            max_iterations=90,
            **options,
        )
        multi = multiscale_icp(src, tgt, STAGES, init=init, target_normals=tgt_n, **options)
        assert (single.transform - reference).abs().max() > 0.05
        assert (multi.transform - reference).abs().max() < 2e-3
        assert multi.fitness > 0.29  # the reference's fitness at 2 cm is 0.308
        # Estimating the target normals per stage instead reaches the same basin.
        estimated = multiscale_icp(src, tgt, STAGES, init=init, **options)
        assert (estimated.transform - reference).abs().max() < 0.03


def _synthetic(seed: int = 0, n: int = 300):
    pair = make_pair(seed, n=n, angle=25.0, translation=0.3, noise=0.005)
    return pair["source"], pair["target"], pair["target_normals"], pair["transform"]


SYNTHETIC_STAGES = [(0.3, 0.6, 20), (0.1, 0.2, 20), (None, 0.05, 20)]


def test_multiscale_on_a_synthetic_surface_and_result_fields() -> None:
    src, tgt, tgt_n, truth = _synthetic()
    single = difficp.icp(src, tgt, target_normals=tgt_n, metric="point_to_plane", max_distance=0.05)
    multi = multiscale_icp(
        src,
        tgt,
        SYNTHETIC_STAGES,
        target_normals=tgt_n,
        metric="point_to_plane",
        return_history=True,
    )
    assert (single.transform - truth).abs().max() > 0.05
    assert (multi.transform - truth).abs().max() < 0.01
    # Last stage at full resolution: fitness / RMSE are measured there, at the final transform.
    moved = src @ multi.transform[:3, :3].T + multi.transform[:3, 3]
    nearest = torch.cdist(moved, tgt).min(dim=1).values
    inliers = nearest < 0.05
    torch.testing.assert_close(multi.fitness, inliers.double().mean())
    torch.testing.assert_close(multi.inlier_rmse, nearest[inliers].square().mean().sqrt())
    assert multi.transform.shape == (4, 4) and multi.iterations.dim() == 0
    assert multi.iterations >= 3
    assert multi.rmse_history is not None
    assert multi.rmse_history.shape[-1] == int(multi.iterations) + len(SYNTHETIC_STAGES)


def test_multiscale_batched_equals_each_pair_alone() -> None:
    pairs = [_synthetic(seed, n) for seed, n in ((0, 300), (1, 220))]
    N = max(len(p[0]) for p in pairs)
    M = max(len(p[1]) for p in pairs)
    src = torch.zeros(2, N, 3, dtype=torch.float64)
    tgt = torch.zeros(2, M, 3, dtype=torch.float64)
    src_len = torch.tensor([len(p[0]) for p in pairs])
    tgt_len = torch.tensor([len(p[1]) for p in pairs])
    for b, (s, t, _, _) in enumerate(pairs):
        src[b, : len(s)], tgt[b, : len(t)] = s, t
    options = {"metric": "point_to_plane", "normals_k": 12}
    batched = multiscale_icp(
        src, tgt, SYNTHETIC_STAGES, source_lengths=src_len, target_lengths=tgt_len, **options
    )
    for b, (s, t, _, _) in enumerate(pairs):
        alone = multiscale_icp(s, t, SYNTHETIC_STAGES, **options)
        torch.testing.assert_close(batched.transform[b], alone.transform, rtol=0, atol=1e-9)
        assert int(batched.iterations[b]) == int(alone.iterations)


def test_gradient_flows_through_every_stage() -> None:
    src, tgt, tgt_n, _ = _synthetic(n=200)
    stages = [(0.3, 0.6, 10), (None, 0.1, 3)]
    options = {"target_normals": tgt_n, "metric": "point_to_plane", "search_backend": "kdtree"}
    weights = torch.linspace(-1, 1, 16, dtype=torch.float64).reshape(4, 4)

    def gradient(detach_between: bool) -> torch.Tensor:
        points = src.clone().requires_grad_(True)
        if detach_between:
            first = multiscale_icp(points, tgt, stages[:1], **options)
            result = multiscale_icp(
                points, tgt, stages[1:], init=first.transform.detach(), **options
            )
        else:
            result = multiscale_icp(points, tgt, stages, **options)
        (result.transform * weights).sum().backward()
        assert points.grad is not None
        return points.grad

    full = gradient(False)
    assert torch.isfinite(full).all() and full.abs().max() > 0
    # Cutting the first stage's transform out of the graph changes the gradient: it flowed there.
    last_only = gradient(True)
    assert (full - last_only).abs().max() > 1e-6 * full.abs().max()


def test_multiscale_bad_stages() -> None:
    src, tgt, _, _ = _synthetic(n=50)
    for stages, match in [
        ([], "non-empty"),
        ("0.1:0.2:3", "parse_scales"),
        ([(0.1, 0.2)], r"stages\[0\]"),
        ([(0.1, 0.2, 3), (0.0, 0.1, 3)], r"stages\[1\] voxel_size"),
        ([(0.1, -0.2, 3)], r"stages\[0\] max_distance"),
        ([(0.1, 0.2, 0)], r"stages\[0\] max_iterations"),
        ([(0.1, 0.2, 2.5)], r"stages\[0\] max_iterations"),
    ]:
        with pytest.raises(ValueError, match=match):
            multiscale_icp(src, tgt, stages)


def test_parse_scales() -> None:
    assert parse_scales("0.05:0.1:30,0.025:0.05:20,none:0.02:14") == [
        (0.05, 0.1, 30),
        (0.025, 0.05, 20),
        (None, 0.02, 14),
    ]
    assert parse_scales(" 1e-2 : 0.03 : 5 , NONE:none:none") == [
        (0.01, 0.03, 5),
        (None, None, None),
    ]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "non-empty"),
        ("0.1:0.2", "stage 1"),
        ("0.1:0.2:3,", "stage 2"),
        ("0.1:0.2:3:4", "stage 1"),
        ("a:0.2:3", "voxel_size"),
        ("0.1:-0.2:3", "max_distance"),
        ("0.1:0.2:0", "max_iterations"),
        ("0.1:0.2:2.5", "max_iterations"),
        ("0.1:inf:3", "max_distance"),
        ("nan:0.2:3", "voxel_size"),
    ],
)
def test_parse_scales_errors(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_scales(text)


def test_multiscale_estimates_the_normals_the_metric_needs_per_stage() -> None:
    # symmetric needs source and target normals; none are given, so each stage estimates them.
    src, tgt, _, truth = _synthetic()
    result = multiscale_icp(src, tgt, SYNTHETIC_STAGES, metric="symmetric", normals_k=10)
    assert (result.transform - truth).abs().max() < 0.02


def test_huge_grids_fall_back_to_row_unique() -> None:
    # 1e9 voxels per axis (Open3D allows < 2**31): a packed int64 key would overflow (1e27),
    # so rows are compared instead.
    g = torch.Generator().manual_seed(0)
    points = torch.rand(2, 50, 3, generator=g, dtype=torch.float64) * 1e6
    points[:, 25:] = points[:, :25] + 1e-4  # each a twin in the same 1e-3 voxel (mostly)
    grid = voxel_downsample(points, 1e-3, lengths=torch.tensor([50, 30]))
    for b, n in enumerate((50, 30)):
        alone = voxel_downsample(points[b, :n], 1e-3)
        ref, *_ = _open3d_downsample(
            points[b, :n].numpy(), np.zeros((n, 3)), np.zeros((n, 3)), 1e-3
        )
        assert int(grid.lengths[b]) == int(alone.lengths) == len(ref)
        m = len(ref)
        np.testing.assert_allclose(
            _sorted_rows(grid.points[b, :m].numpy()), _sorted_rows(ref), rtol=0, atol=1e-9
        )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    g = torch.Generator().manual_seed(1)
    points = torch.rand(2, 500, 3, generator=g, dtype=torch.float64)
    colors = torch.rand(2, 500, 3, generator=g, dtype=torch.float64)
    lengths = torch.tensor([500, 321])
    cpu = voxel_downsample(points, 0.1, lengths, colors=colors)
    gpu = voxel_downsample(points.cuda(), 0.1, lengths.cuda(), colors=colors.cuda())
    assert torch.equal(gpu.lengths.cpu(), cpu.lengths)
    torch.testing.assert_close(gpu.points.cpu(), cpu.points, rtol=0, atol=1e-12)
    torch.testing.assert_close(gpu.colors.cpu(), cpu.colors, rtol=0, atol=1e-12)
    src, tgt, tgt_n, _ = _synthetic()
    on_cpu = multiscale_icp(
        src, tgt, SYNTHETIC_STAGES, target_normals=tgt_n, metric="point_to_plane"
    )
    on_gpu = multiscale_icp(
        src.cuda(),
        tgt.cuda(),
        SYNTHETIC_STAGES,
        target_normals=tgt_n.cuda(),
        metric="point_to_plane",
    )
    torch.testing.assert_close(on_gpu.transform.cpu(), on_cpu.transform, rtol=0, atol=1e-8)
