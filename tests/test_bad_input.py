"""Bad input fails early with a ValueError naming the argument; lost pairs never produce NaN."""

from __future__ import annotations

import pytest
import torch

import difficp

from conftest import make_pair


@pytest.fixture
def clouds() -> tuple[torch.Tensor, torch.Tensor]:
    p = make_pair(60, n=100, resample=False)
    return p["source"], p["target"]


def test_nan_source(clouds) -> None:
    s, t = clouds
    s = s.clone()
    s[3, 1] = float("nan")
    with pytest.raises(ValueError, match="source contains NaN"):
        difficp.icp(s, t)


def test_inf_target(clouds) -> None:
    s, t = clouds
    t = t.clone()
    t[0, 0] = float("inf")
    with pytest.raises(ValueError, match="target contains NaN or inf"):
        difficp.icp(s, t)


@pytest.mark.parametrize("shape", [(0, 3), (2, 0, 3)])
def test_empty_cloud(clouds, shape) -> None:
    with pytest.raises(ValueError, match="source is empty"):
        difficp.icp(torch.zeros(shape, dtype=torch.float64), clouds[1])


def test_zero_length_in_batch(clouds) -> None:
    s, t = clouds
    with pytest.raises(ValueError, match="source_lengths"):
        difficp.icp(
            s[None].repeat(2, 1, 1), t[None].repeat(2, 1, 1), source_lengths=torch.tensor([100, 0])
        )


@pytest.mark.parametrize("shape", [(100, 2), (100,), (1, 2, 100, 3)])
def test_wrong_point_shape(clouds, shape) -> None:
    with pytest.raises(ValueError, match=r"source must have shape \(N, 3\)"):
        difficp.icp(torch.zeros(shape, dtype=torch.float64), clouds[1])


def test_mismatched_batches(clouds) -> None:
    s, t = clouds
    with pytest.raises(ValueError, match="target has batch size 3 but source has 2"):
        difficp.icp(s[None].repeat(2, 1, 1), t[None].repeat(3, 1, 1))


def test_integer_points_rejected(clouds) -> None:
    with pytest.raises(ValueError, match="floating-point"):
        difficp.icp(torch.zeros(10, 3, dtype=torch.long), clouds[1])


def test_non_rigid_init(clouds) -> None:
    init = torch.eye(4, dtype=torch.float64)
    init[0, 0] = 2.0
    with pytest.raises(ValueError, match="init must be a rigid transform"):
        difficp.icp(*clouds, init=init)


def test_reflection_init(clouds) -> None:
    init = torch.diag(torch.tensor([1.0, 1.0, -1.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="init must be a rigid transform"):
        difficp.icp(*clouds, init=init)


@pytest.mark.parametrize(
    ("metric", "missing"), [("point_to_plane", "target_normals"), ("symmetric", "source_normals")]
)
def test_missing_normals(clouds, metric, missing) -> None:
    with pytest.raises(ValueError, match=f"{missing} are required.*estimate_normals"):
        difficp.icp(*clouds, metric=metric)


def test_svd_needs_point_to_point() -> None:
    with pytest.raises(ValueError, match="solver='svd' only solves metric='point_to_point'"):
        difficp.ICPConfig(metric="point_to_plane", solver="svd")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 0.0),
        ("max_distance", -1.0),
        ("max_normal_angle", 200.0),
        ("soft_k", 0),
        ("max_iterations", 0),
        ("metric", "point_to_line"),
        ("correspondence", "closest"),
    ],
)
def test_bad_config_values(field, value) -> None:
    with pytest.raises(ValueError, match=field):
        difficp.ICPConfig(**{field: value})


def test_bad_intrinsics() -> None:
    depth = torch.ones(8, 8, dtype=torch.float64)
    points = torch.rand(20, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="intrinsics must be a"):
        difficp.icp(points, depth, correspondence="projective", intrinsics=torch.eye(2))
    K = torch.tensor([[-5.0, 0, 4], [0, 5, 4], [0, 0, 1]], dtype=torch.float64)
    with pytest.raises(ValueError, match="positive focal lengths"):
        difficp.icp(points, depth, correspondence="projective", intrinsics=K)
    with pytest.raises(ValueError, match="needs intrinsics"):
        difficp.icp(points, depth, correspondence="projective")


def test_pair_losing_all_correspondences_keeps_last_transform(clouds) -> None:
    s, t = clouds
    far = t + 100.0  # nothing within max_distance
    src = torch.stack([s, s])
    tgt = torch.stack([t, far])
    result = difficp.icp(src, tgt, max_distance=0.1)
    assert bool(result.converged[0]) and not bool(result.converged[1])
    assert torch.equal(result.transform[1], torch.eye(4, dtype=torch.float64))
    assert torch.isfinite(result.transform).all()
    assert float(result.fitness[1]) == 0.0 and float(result.inlier_rmse[1]) == 0.0


def test_lost_pair_gradients_are_finite(clouds) -> None:
    s, t = clouds
    src = torch.stack([s, s]).requires_grad_(True)
    tgt = torch.stack([t, t + 100.0])
    result = difficp.icp(src, tgt, correspondence="soft", temperature=1e-3, max_distance=0.2)
    result.transform.sum().backward()
    assert torch.isfinite(src.grad).all()
    assert src.grad[0].abs().sum() > 0 and src.grad[1].abs().sum() == 0


@pytest.mark.parametrize("metric", ["point_to_plane", "symmetric", "point_to_point"])
def test_pair_with_a_few_collinear_correspondences_does_not_crash(clouds, metric) -> None:
    # Pair 1 keeps only three correspondences, all on a line: its normal equations are singular.
    s, t = clouds
    line = torch.zeros(100, 3, dtype=torch.float64)
    line[:, 0] = torch.linspace(0, 1, 100, dtype=torch.float64)
    far_line = line + 100.0
    far_line[:3] = line[:3] + 1e-3
    normals = torch.zeros(2, 100, 3, dtype=torch.float64)
    normals[..., 2] = 1.0
    src = torch.stack([s, line]).float()
    tgt = torch.stack([t, far_line]).float()
    result = difficp.icp(
        src, tgt, source_normals=normals.float(), target_normals=normals.float(), metric=metric,
        max_distance=0.05,
    )
    assert torch.isfinite(result.transform).all()
