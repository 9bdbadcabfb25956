"""Generalized-ICP (metric="gicp"): covariances, gradients, the compiled twin, ground truth,
Open3D parity and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import difficp
from difficp.geometry import invert_transform, rotation_angle_deg, se3_exp

from conftest import make_pair


def _errors(transform: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    E = invert_transform(truth.double()) @ transform.double()
    return float(rotation_angle_deg(E[..., :3, :3])), float(E[..., :3, 3].norm())


# ---------------------------------------------------------------------------------------------
# Covariances
# ---------------------------------------------------------------------------------------------


def test_estimated_covariances_are_plane_like_along_the_normal() -> None:
    # Points on the plane z = 0: the regularised covariance is diag(1, 1, 1e-3).
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=g, dtype=torch.float64)
    points = torch.cat([xy, torch.zeros(200, 1, dtype=torch.float64)], 1)
    cov = difficp.estimate_covariances(points)
    expected = torch.diag(torch.tensor([1.0, 1.0, 1e-3], dtype=torch.float64))
    torch.testing.assert_close(cov, expected.expand(200, 3, 3), atol=1e-12, rtol=0)


def test_estimated_covariances_of_a_padded_batch_match_each_cloud() -> None:
    p, q = make_pair(0, n=300)["source"], make_pair(1, n=200)["source"]
    padded = torch.zeros(2, len(p), 3, dtype=torch.float64)
    padded[0], padded[1, : len(q)] = p, q
    lengths = torch.tensor([len(p), len(q)])
    batched = difficp.estimate_covariances(padded, k=10, lengths=lengths)
    torch.testing.assert_close(batched[0], difficp.estimate_covariances(p, k=10))
    torch.testing.assert_close(batched[1, : len(q)], difficp.estimate_covariances(q, k=10))
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.equal(batched[1, len(q) :], eye.expand(len(p) - len(q), 3, 3))


def test_regularize_covariances_of_degenerate_neighbourhoods_is_positive_definite() -> None:
    # Collinear and coincident neighbourhoods: rank 1 and rank 0 raw covariances.
    line = torch.outer(torch.tensor([1.0, 2.0, 2.0]), torch.tensor([1.0, 2.0, 2.0]))
    raw = torch.stack([line, torch.zeros(3, 3)]).double()
    cov = difficp.regularize_covariances(raw)
    values = torch.linalg.eigvalsh(cov)
    torch.testing.assert_close(values, torch.tensor([[1e-3, 1, 1]] * 2).double())


# ---------------------------------------------------------------------------------------------
# Whole runs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["linear", "lm"])
def test_recovers_ground_truth_on_a_synthetic_pair(solver: str) -> None:
    # Independent samples of one surface with noise and 80% overlap: point-to-point is biased
    # by the sampling, GICP's plane-to-plane cost is not. Same bounds as the other metrics'
    # ground-truth tests (tests/test_ground_truth.py): 30x below the initial 10 deg / 0.1.
    p = make_pair(3, n=3000, angle=10, translation=0.1, noise=0.003, overlap=0.8)
    result = difficp.icp(
        p["source"], p["target"], metric="gicp", solver=solver, max_distance=0.1,
        max_iterations=60,
    )  # fmt: skip
    rot, trans = _errors(result.transform, p["transform"])
    assert rot < 0.3 and trans < 0.003, (rot, trans)
    assert bool(result.converged)


def test_given_covariances_are_used_instead_of_estimated_ones() -> None:
    p = make_pair(4, n=800)
    cs = difficp.estimate_covariances(p["source"], k=8)
    ct = difficp.estimate_covariances(p["target"], k=8)
    given = difficp.icp(
        p["source"], p["target"], metric="gicp", source_covariances=cs, target_covariances=ct
    )
    estimated = difficp.icp(p["source"], p["target"], metric="gicp", covariance_k=8)
    other_k = difficp.icp(p["source"], p["target"], metric="gicp", covariance_k=20)
    torch.testing.assert_close(given.transform, estimated.transform, atol=1e-12, rtol=0)
    assert not torch.allclose(given.transform, other_k.transform, atol=1e-12, rtol=0)


@pytest.mark.parametrize("max_distance", [None, 0.1])
@pytest.mark.parametrize("robust_kernel", [None, "cauchy"])
def test_compiled_path_matches_reference(max_distance: float | None, robust_kernel) -> None:
    # A padded batch of two pairs, float64: the fused kernel's twin against the PyTorch steps.
    a, b = make_pair(5, n=1500, noise=0.003, overlap=0.8), make_pair(6, n=1200, noise=0.003)
    n, m = max(len(a["source"]), len(b["source"])), max(len(a["target"]), len(b["target"]))
    src = torch.zeros(2, n, 3, dtype=torch.float64)
    tgt = torch.zeros(2, m, 3, dtype=torch.float64)
    for i, pair in enumerate((a, b)):
        src[i, : len(pair["source"])] = pair["source"]
        tgt[i, : len(pair["target"])] = pair["target"]
    lengths = {
        "source_lengths": torch.tensor([len(a["source"]), len(b["source"])]),
        "target_lengths": torch.tensor([len(a["target"]), len(b["target"])]),
    }
    options = {"metric": "gicp", "max_distance": max_distance, "robust_kernel": robust_kernel}
    options["kernel_scale"] = 3.0
    fast = difficp.icp(src, tgt, search_backend="compiled", **lengths, **options)
    ref = difficp.icp(src, tgt, search_backend="kdtree", **lengths, **options)
    torch.testing.assert_close(fast.transform, ref.transform, atol=1e-9, rtol=0)
    assert torch.equal(fast.fitness, ref.fitness)
    assert torch.equal(fast.iterations, ref.iterations)
    assert (fast.iterations >= 2).all()


def test_auto_runs_the_compiled_path_without_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    from difficp import fused

    used = []
    original = fused.FusedSteps.__init__

    def spy(self, *args, **kwargs):
        used.append(True)
        original(self, *args, **kwargs)

    monkeypatch.setattr(fused.FusedSteps, "__init__", spy)
    p = make_pair(7, n=500)
    difficp.icp(p["source"], p["target"], metric="gicp", differentiation="none")
    assert used == [True]


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


def _small(seed: int = 11, n: int = 14) -> dict:
    p = make_pair(seed, n=n, angle=8, translation=0.05, resample=False)
    # Covariances are constants of the problem (estimated ones are not differentiated), so
    # gradcheck's perturbed inputs must not re-estimate them.
    p["source_covariances"] = difficp.estimate_covariances(p["source"], k=6)
    p["target_covariances"] = difficp.estimate_covariances(p["target"], k=6)
    return p


@pytest.mark.parametrize(("solver", "soft_k"), [("linear", None), ("lm", 5)])
def test_gradcheck_soft_correspondences(solver: str, soft_k: int | None) -> None:
    p = _small()
    source = p["source"].clone().requires_grad_(True)
    target = p["target"].clone().requires_grad_(True)
    twist = torch.tensor([0.01, -0.02, 0.015, 0.01, 0.0, -0.01], dtype=torch.float64)
    twist.requires_grad_(True)
    temperature = torch.tensor(0.02, dtype=torch.float64, requires_grad=True)

    def fn(src, tgt, xi, temp):
        result = difficp.icp(
            src,
            tgt,
            init=se3_exp(xi),
            metric="gicp",
            solver=solver,
            correspondence="soft",
            soft_k=soft_k,
            temperature=temp,
            max_iterations=3,
            relative_fitness=0.0,
            relative_rmse=0.0,
            lm_steps=1,
            source_covariances=p["source_covariances"],
            target_covariances=p["target_covariances"],
        )
        return result.transform[:3, :]

    assert torch.autograd.gradcheck(
        fn, (source, target, twist, temperature), eps=1e-6, atol=1e-5, rtol=1e-4
    )


def test_implicit_gradient_matches_unrolled_at_convergence() -> None:
    p = _small(n=40)
    grads = {}
    for mode in ("unroll", "implicit"):
        target = p["target"].clone().requires_grad_(True)
        result = difficp.icp(
            p["source"],
            target,
            metric="gicp",
            correspondence="soft",
            temperature=0.01,
            max_iterations=200,
            relative_fitness=0.0,
            relative_rmse=1e-15,
            differentiation=mode,
            source_covariances=p["source_covariances"],
            target_covariances=p["target_covariances"],
        )
        weights = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(3, 4)
        (result.transform[:3] * weights).sum().backward()
        grads[mode] = target.grad
    assert grads["unroll"].abs().max() > 1e-3
    torch.testing.assert_close(grads["implicit"], grads["unroll"], atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Open3D parity
# ---------------------------------------------------------------------------------------------


def _open3d_gicp(src, tgt, cs, ct, init, max_distance, iterations):
    o3d = pytest.importorskip("open3d")
    reg = o3d.pipelines.registration
    clouds = []
    for points, cov in ((src, cs), (tgt, ct)):
        cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points))
        cloud.covariances = o3d.utility.Matrix3dVector(cov)
        clouds.append(cloud)
    criteria = reg.ICPConvergenceCriteria(1e-10, 1e-10, iterations)
    estimation = reg.TransformationEstimationForGeneralizedICP()
    return reg.registration_generalized_icp(*clouds, max_distance, init, estimation, criteria)


def _parity(src, tgt, init: np.ndarray, max_distance: float) -> tuple[float, float]:
    # Both sides get the same covariances (Open3D uses given ones as they are), so the two
    # compute the same iterations: the transforms agree to rounding (measured ~1e-15 on the
    # 3DMatch pair; we allow 1e-6 for summation order over ~60 iterations).
    cs, ct = difficp.estimate_covariances(src), difficp.estimate_covariances(tgt)
    ref = _open3d_gicp(src.numpy(), tgt.numpy(), cs.numpy(), ct.numpy(), init, max_distance, 60)
    ours = difficp.icp(
        src, tgt, init=torch.from_numpy(init), metric="gicp", max_distance=max_distance,
        max_iterations=60, relative_fitness=1e-10, relative_rmse=1e-10, differentiation="none",
    )  # fmt: skip
    diff = float(np.abs(ours.transform.numpy() - ref.transformation).max())
    return diff, abs(float(ours.fitness) - ref.fitness)


def test_parity_with_open3d_on_a_synthetic_pair() -> None:
    p = make_pair(8, n=2000, angle=10, translation=0.1, noise=0.005, overlap=0.8)
    init = se3_exp(torch.tensor([0.02, -0.01, 0.03, 0.01, 0.02, 0.0], dtype=torch.float64))
    diff, fitness = _parity(p["source"], p["target"], init.numpy(), 0.1)
    assert diff < 1e-6 and fitness < 1e-9, (diff, fitness)


def test_parity_with_open3d_on_3dmatch_fragments(data_dir) -> None:
    o3d = pytest.importorskip("open3d")
    folder = data_dir / "scans" / "open3d_3dmatch_pair"
    clouds = [
        torch.from_numpy(np.asarray(o3d.io.read_point_cloud(str(folder / name)).points))
        for name in ("feature_cloud_bin_0.pcd", "feature_cloud_bin_1.pcd")
    ]
    init = se3_exp(torch.tensor([0.03, -0.02, 0.04, 0.02, -0.03, 0.01], dtype=torch.float64))
    diff, fitness = _parity(*clouds, init.numpy(), 0.07)
    assert diff < 1e-6 and fitness < 1e-9, (diff, fitness)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_covariance_k_below_three_is_refused() -> None:
    with pytest.raises(ValueError, match="covariance_k must be an int >= 3"):
        difficp.ICPConfig(metric="gicp", covariance_k=2)
    with pytest.raises(ValueError, match="k \\(covariance_k\\) must be an int >= 3"):
        difficp.estimate_covariances(torch.rand(10, 3), k=2)


def test_degenerate_given_covariances_are_refused_with_the_fix() -> None:
    p = make_pair(9, n=100)
    cov = difficp.estimate_covariances(p["source"])
    cov[5] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"source_covariances has 1 degenerate.*regularize"):
        difficp.icp(p["source"], p["target"], metric="gicp", source_covariances=cov)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda c: c[:, :2], "must have shape"),
        (lambda c: c[:-1], "must have shape"),
        (lambda c: c + torch.tensor([[0.0, 1, 0], [0, 0, 0], [0, 0, 0]]).double(), "symmetric"),
        (lambda c: c * float("nan"), "NaN"),
    ],
)
def test_malformed_given_covariances_are_refused(change, match: str) -> None:
    p = make_pair(9, n=100)
    cov = change(difficp.estimate_covariances(p["target"]))
    with pytest.raises(ValueError, match=f"target_covariances.*{match}|{match}.*target_cov"):
        difficp.icp(p["source"], p["target"], metric="gicp", target_covariances=cov)


def test_covariances_for_another_metric_or_a_depth_map_are_refused() -> None:
    p = make_pair(9, n=100)
    cov = difficp.estimate_covariances(p["source"])
    with pytest.raises(ValueError, match="only used by metric='gicp'"):
        difficp.icp(p["source"], p["target"], source_covariances=cov)
    with pytest.raises(ValueError, match="depth-map target"):
        difficp.ICPConfig(metric="gicp", correspondence="projective")
