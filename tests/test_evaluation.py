"""difficp.evaluate_registration: Open3D's evaluate_registration and information matrix,
batched and differentiable."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
import roma
import torch
from hypothesis import HealthCheck, given, settings

import difficp
from difficp.evaluation import information_from_partners
from difficp.geometry import make_transform, skew, transform_points

from conftest import make_pair

BACKENDS = ("auto", "kdtree", "compiled", "brute_force")


def _pair(seed: int = 0, n: int = 800, noise: float = 0.002) -> tuple[torch.Tensor, ...]:
    pair = make_pair(seed, n=n, angle=5.0, translation=0.05, noise=noise, overlap=0.8)
    return pair["source"], pair["target"], pair["transform"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_open3d(backend: str, seed: int) -> None:
    o3d = pytest.importorskip("open3d")
    source, target, T = _pair(seed)
    src = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(source.numpy()))
    tgt = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(target.numpy()))
    registration = o3d.pipelines.registration
    for transform, max_distance in ((T, 0.02), (T, 0.005), (torch.eye(4, dtype=T.dtype), 0.05)):
        theirs = registration.evaluate_registration(src, tgt, max_distance, transform.numpy())
        information = registration.get_information_matrix_from_point_clouds(
            src, tgt, max_distance, transform.numpy()
        )
        ours = difficp.evaluate_registration(
            source, target, max_distance, transform, search_backend=backend
        )
        assert 0 < theirs.fitness < 1  # partial overlap: some points have no partner
        assert float(ours.fitness) == pytest.approx(theirs.fitness, abs=1e-15)
        assert float(ours.inlier_rmse) == pytest.approx(theirs.inlier_rmse, rel=1e-12)
        kept = torch.nonzero(ours.correspondences >= 0)[:, 0]
        pairs = torch.stack([kept, ours.correspondences[kept]], 1).numpy()
        np.testing.assert_array_equal(pairs, np.asarray(theirs.correspondence_set))
        np.testing.assert_allclose(ours.information.numpy(), information, rtol=1e-12, atol=1e-9)


def test_information_is_the_sum_of_jacobian_products() -> None:
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 50, 3, generator=g, dtype=torch.float64)
    w = (torch.rand(2, 50, generator=g) < 0.7).to(torch.float64)
    J = torch.cat([-skew(q), torch.eye(3, dtype=q.dtype).expand(2, 50, 3, 3)], dim=-1)
    expected = (w[..., None, None] * J.transpose(-1, -2) @ J).sum(1)
    torch.testing.assert_close(information_from_partners(q, w), expected, rtol=1e-13, atol=1e-12)


def test_agrees_with_icps_own_final_statistics() -> None:
    source, target, _ = _pair(2)
    result = difficp.icp(source, target, max_distance=0.02)
    evaluation = difficp.evaluate_registration(source, target, 0.02, result.transform)
    assert float(evaluation.fitness) == float(result.fitness)
    assert float(evaluation.inlier_rmse) == pytest.approx(float(result.inlier_rmse), rel=1e-12)


def test_batch_with_lengths_equals_each_pair_alone() -> None:
    pairs = [_pair(seed, n=n) for seed, n in ((0, 600), (1, 400), (2, 900))]
    N = max(len(s) for s, _, _ in pairs)
    M = max(len(t) for _, t, _ in pairs)
    source = torch.zeros(3, N, 3, dtype=torch.float64)
    target = torch.full((3, M, 3), 1e3, dtype=torch.float64)  # padding far from everything
    for b, (s, t, _) in enumerate(pairs):
        source[b, : len(s)], target[b, : len(t)] = s, t
    transforms = torch.stack([T for _, _, T in pairs])
    batched = difficp.evaluate_registration(
        source,
        target,
        0.02,
        transforms,
        source_lengths=torch.tensor([len(s) for s, _, _ in pairs]),
        target_lengths=torch.tensor([len(t) for _, t, _ in pairs]),
    )
    for b, (s, t, T) in enumerate(pairs):
        alone = difficp.evaluate_registration(s, t, 0.02, T)
        assert float(batched.fitness[b]) == float(alone.fitness)
        assert float(batched.inlier_rmse[b]) == pytest.approx(float(alone.inlier_rmse), rel=1e-13)
        assert torch.equal(batched.correspondences[b, : len(s)], alone.correspondences)
        assert bool((batched.correspondences[b, len(s) :] == -1).all())
        torch.testing.assert_close(batched.information[b], alone.information)


def test_inlier_rmse_gradcheck_in_points_and_motion() -> None:
    source, target, T = _pair(4, n=60, noise=0.01)
    rotvec = roma.rotmat_to_rotvec(T[:3, :3]).requires_grad_(True)
    translation = T[:3, 3].clone().requires_grad_(True)
    src = source.clone().requires_grad_(True)
    tgt = target.clone().requires_grad_(True)

    def rmse(p, q, w, t):
        transform = make_transform(roma.rotvec_to_rotmat(w), t)
        return difficp.evaluate_registration(p, q, 0.05, transform).inlier_rmse

    assert 0 < float(rmse(source, target, rotvec, translation).detach()) < 0.05
    assert torch.autograd.gradcheck(rmse, (src, tgt, rotvec, translation))


def test_information_gradcheck_in_the_target() -> None:
    source, target, T = _pair(5, n=40, noise=0.01)
    tgt = target.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda q: difficp.evaluate_registration(source, q, 0.05, T).information, (tgt,)
    )


def test_no_inliers_and_a_perfect_fit_give_finite_gradients() -> None:
    source, target, T = _pair(6, n=200)
    far = source.clone().requires_grad_(True)
    none = difficp.evaluate_registration(far + 10.0, target, 0.02, T)
    assert float(none.fitness) == 0 and float(none.inlier_rmse.detach()) == 0
    assert bool((none.correspondences == -1).all()) and not none.information.any()
    none.inlier_rmse.backward()
    assert torch.equal(far.grad, torch.zeros_like(far))

    exact = source.clone().requires_grad_(True)
    perfect = difficp.evaluate_registration(exact, transform_points(source, T), 1e-3, T)
    assert float(perfect.fitness) == 1 and float(perfect.inlier_rmse.detach()) < 1e-12
    perfect.inlier_rmse.backward()
    assert bool(torch.isfinite(exact.grad).all())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    max_distance=st.floats(1e-3, 0.2),
    angle=st.floats(0.0, 30.0),
)
def test_properties(seed: int, max_distance: float, angle: float) -> None:
    """Moving the source by T and evaluating at the identity is the same evaluation; fitness is
    a fraction, every inlier is closer than max_distance, the information is symmetric PSD."""
    g = torch.Generator().manual_seed(seed)
    source = torch.rand(150, 3, generator=g, dtype=torch.float64)
    target = torch.rand(120, 3, generator=g, dtype=torch.float64)
    axis = torch.nn.functional.normalize(torch.randn(3, generator=g, dtype=torch.float64), dim=0)
    T = make_transform(
        roma.rotvec_to_rotmat(axis * np.deg2rad(angle)),
        0.05 * torch.randn(3, generator=g, dtype=torch.float64),
    )
    at_T = difficp.evaluate_registration(source, target, max_distance, T)
    moved = difficp.evaluate_registration(transform_points(source, T), target, max_distance)
    assert torch.equal(at_T.correspondences, moved.correspondences)
    torch.testing.assert_close(at_T.inlier_rmse, moved.inlier_rmse, rtol=1e-12, atol=1e-15)
    assert 0 <= float(at_T.fitness) <= 1
    assert float(at_T.fitness) == float((at_T.correspondences >= 0).double().mean())
    assert float(at_T.inlier_rmse) < max_distance
    kept = at_T.correspondences >= 0
    gap = (transform_points(source, T)[kept] - target[at_T.correspondences[kept]]).norm(dim=-1)
    assert bool((gap < max_distance).all())
    information = at_T.information
    torch.testing.assert_close(information, information.T, rtol=0, atol=1e-12)
    assert float(torch.linalg.eigvalsh(information).min()) > -1e-9 * max(
        1.0, float(information.abs().max())
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_distance": 0.0}, "max_distance"),
        ({"max_distance": -1.0}, "max_distance"),
        ({"max_distance": float("nan")}, "max_distance"),
        ({"transform": torch.diag(torch.tensor([2.0, 1, 1, 1]))}, "transform must be a rigid"),
        ({"transform": torch.eye(3)}, "transform must be a"),
        ({"search_backend": "octree"}, "search_backend"),
    ],
)
def test_bad_input_is_refused_by_name(kwargs: dict, message: str) -> None:
    source = torch.rand(30, 3)
    arguments = {"max_distance": 0.1, **kwargs}
    with pytest.raises(ValueError, match=message):
        difficp.evaluate_registration(source, source, **arguments)


def test_bad_clouds_are_refused() -> None:
    good = torch.rand(30, 3)
    with pytest.raises(ValueError, match="NaN"):
        difficp.evaluate_registration(torch.full((30, 3), float("nan")), good, 0.1)
    with pytest.raises(ValueError):
        difficp.evaluate_registration(torch.rand(30, 2), good, 0.1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    source, target, T = _pair(7)
    cpu = difficp.evaluate_registration(source, target, 0.02, T)
    gpu = difficp.evaluate_registration(source.cuda(), target.cuda(), 0.02, T.cuda())
    assert torch.equal(gpu.correspondences.cpu(), cpu.correspondences)
    torch.testing.assert_close(gpu.inlier_rmse.cpu(), cpu.inlier_rmse, rtol=1e-12, atol=0)
    torch.testing.assert_close(gpu.information.cpu(), cpu.information, rtol=1e-12, atol=1e-9)
