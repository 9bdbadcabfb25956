"""Generalized-ICP (metric="gicp"): covariances, gradients, the compiled twin, ground truth,
Open3D parity and bad input."""

from __future__ import annotations

from pathlib import Path

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings

import difficp
from difficp import compile_cache, fused, kdtree
from difficp import normals as normals_module
from difficp.correspondence import NeighborIndex
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


# The compiled covariances (difficp.kdtree.gicp_covariances) against the PyTorch path. They are
# compared where the normal is well defined: the two smallest eigenvalues of the neighbourhood
# apart (elsewhere the direction is free and either answer is right).


def _well_defined(points: torch.Tensor, k: int, lengths: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` bool: the two smallest eigenvalues of each k-neighbourhood's scatter differ by
    more than 1% of the largest (neighbours by brute force)."""
    B, N, _ = points.shape
    ok = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):
        n = int(lengths[b])
        p = points[b, :n].double()
        idx = torch.cdist(p, p).topk(min(k, n), largest=False).indices
        nb = p[idx] - p[idx].mean(1, keepdim=True)
        values = torch.linalg.eigvalsh(nb.transpose(1, 2) @ nb)
        ok[b, :n] = (values[:, 1] - values[:, 0]) > 1e-2 * values[:, 2]
    return ok


@st.composite
def covariance_batches(draw: st.DrawFn) -> dict:
    """A padded batch of noisy surface patches at several scales and offsets, and a k (some
    clouds smaller than it)."""
    B = draw(st.integers(1, 3))
    N = draw(st.integers(3, 300))
    lengths = draw(st.lists(st.integers(3, N), min_size=B, max_size=B))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    uv = torch.rand(B, N, 2, generator=g, dtype=torch.float64)
    height = 0.2 * torch.sin(4 * uv[..., :1]) * torch.cos(3 * uv[..., 1:])
    noise = 0.002 * torch.randn(B, N, 3, generator=g, dtype=torch.float64)
    pts = torch.cat([uv, height], -1) + noise
    pts = pts * draw(st.sampled_from([1e-3, 1.0, 1e3])) + draw(st.sampled_from([0.0, 50.0]))
    return {"points": pts, "lengths": torch.tensor(lengths), "k": draw(st.integers(3, 40))}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(covariance_batches())
def test_compiled_covariances_equal_the_pytorch_path(case: dict) -> None:
    pts, lengths = case["points"], case["lengths"]
    N = pts.shape[1]
    k = min(case["k"], int(lengths.min()))  # as estimate_covariances clips it
    fast = normals_module._compiled_covariances(pts, k, 1e-3, lengths, None)
    ref = normals_module._torch_covariances(pts, k, 1e-3, lengths, None)
    valid = torch.arange(N)[None] < lengths[:, None]
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.equal(fast[~valid], eye.expand(int((~valid).sum()), 3, 3))  # padding
    ok = _well_defined(pts, k, lengths)
    np.testing.assert_allclose(fast[ok].numpy(), ref[ok].numpy(), atol=1e-9, rtol=0)
    # everywhere valid: symmetric, eigenvalues (1e-3, 1, 1)
    assert torch.equal(fast, fast.transpose(-1, -2))
    values = torch.linalg.eigvalsh(fast[valid])
    np.testing.assert_allclose(values.numpy(), [[1e-3, 1.0, 1.0]] * int(valid.sum()), atol=1e-12)


def test_real_scan_covariances_equal_the_pytorch_path(data_dir) -> None:
    """A 3DMatch fragment (3903 points), k = 20, through estimate_covariances: the same
    covariances on both paths."""
    from difficp.io import read_point_cloud

    cloud = read_point_cloud(data_dir / "scans" / "open3d_3dmatch_pair" / "feature_cloud_bin_0.pcd")
    pts = torch.as_tensor(np.asarray(cloud.points), dtype=torch.float64)
    fast = difficp.estimate_covariances(pts)
    ref = normals_module._torch_covariances(pts[None], 20, 1e-3, None, None)[0]
    ok = _well_defined(pts[None], 20, torch.tensor([len(pts)]))[0]
    assert ok.float().mean() > 0.9
    np.testing.assert_allclose(fast[ok].numpy(), ref[ok].numpy(), atol=1e-9, rtol=0)


def test_float32_covariances_agree_with_the_pytorch_path() -> None:
    p = make_pair(2, n=1000)["source"].float()
    fast = difficp.estimate_covariances(p)
    ref = normals_module._torch_covariances(p[None], 20, 1e-3, None, None)[0]
    assert fast.dtype == torch.float32
    assert ((fast - ref).abs().amax((-1, -2)) < 1e-4).float().mean() > 0.99


def test_k_above_the_smallest_cloud_uses_its_size_for_every_cloud() -> None:
    """k is clipped to the smallest cloud of the batch (on both paths): here 5 for both."""
    g = torch.Generator().manual_seed(1)
    pts = torch.rand(2, 12, 3, generator=g, dtype=torch.float64)
    lengths = torch.tensor([12, 5])
    batched = difficp.estimate_covariances(pts, k=50, lengths=lengths)
    ref = normals_module._torch_covariances(pts, 5, 1e-3, lengths, None)
    torch.testing.assert_close(batched, ref, atol=1e-9, rtol=0)
    torch.testing.assert_close(batched[0], difficp.estimate_covariances(pts[0], k=5))
    with pytest.raises(ValueError, match="epsilon"):
        difficp.estimate_covariances(pts, epsilon=0.0)


def test_covariances_of_an_index_with_holes_come_back_in_the_cloud_order() -> None:
    """An index whose mask is not a prefix (its forest is compacted): each point still gets its
    own covariance (holes: the identity)."""
    p = make_pair(3, n=200)["source"]
    mask = torch.ones(1, len(p), dtype=torch.bool)
    mask[0, ::7] = False
    index = NeighborIndex(p[None], backend="compiled")
    index.mask, index.counts = mask, mask.sum(1)
    holes = normals_module._compiled_covariances(p[None], 10, 1e-3, None, index)[0]
    dense = difficp.estimate_covariances(p[mask[0]], k=10)
    torch.testing.assert_close(holes[mask[0]], dense, atol=1e-12, rtol=0)
    eye = torch.eye(3, dtype=p.dtype)
    assert torch.equal(holes[~mask[0]], eye.expand(int((~mask).sum()), 3, 3))


def test_covariance_path_choice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Compiled on the CPU; the PyTorch path for an index of another backend and, with
    DIFFICP_COMPILE=background, until the kernel is cached (a warmup starts in the background)."""
    calls: list[str] = []
    for name in ("_compiled_covariances", "_torch_covariances"):
        original = getattr(normals_module, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(normals_module, name, spy)
    p = make_pair(4, n=300)["source"]
    fast = difficp.estimate_covariances(p)
    difficp.estimate_covariances(p, index=NeighborIndex(p[None], backend="kdtree"))
    started: list[list[str]] = []

    class FakePopen:
        def __init__(self, command: list[str], **kwargs) -> None:
            started.append(command)

    monkeypatch.setattr(compile_cache, "kernels_cached", lambda kernels: False)
    monkeypatch.setattr(compile_cache.subprocess, "Popen", FakePopen)
    monkeypatch.setattr(compile_cache, "_background", None)
    monkeypatch.setattr(compile_cache, "lock_path", lambda: tmp_path / "compile.lock")
    monkeypatch.setenv("DIFFICP_COMPILE", "background")
    fallback = difficp.estimate_covariances(p)
    assert calls == ["_compiled_covariances", "_torch_covariances", "_torch_covariances"]
    assert len(started) == 1 and "difficp.commands.warmup" in started[0]
    ok = _well_defined(p[None], 20, torch.tensor([len(p)]))[0]
    torch.testing.assert_close(fast[ok], fallback[ok], atol=1e-9, rtol=0)


def test_icp_estimates_covariances_on_the_search_forest(monkeypatch: pytest.MonkeyPatch) -> None:
    """metric="gicp" builds two forests (source and target covariances) and searches the
    target's: no third one; the result is that of the PyTorch covariances."""
    built: list[int] = []
    original = kdtree.build_forest

    def spy(clouds, counts, parallel=True, **kwargs):
        built.append(int(np.sum(counts)))
        return original(clouds, counts, parallel, **kwargs)

    monkeypatch.setattr(kdtree, "build_forest", spy)
    monkeypatch.setattr(fused, "build_forest", spy)
    p = make_pair(5, n=1500, noise=0.003, overlap=0.8)
    src, tgt = p["source"], p["target"]
    result = difficp.icp(src, tgt, metric="gicp", max_distance=0.1, differentiation="none")
    assert sorted(built) == sorted([len(src), len(tgt)])
    cs = normals_module._torch_covariances(src[None], 20, 1e-3, None, None)[0]
    ct = normals_module._torch_covariances(tgt[None], 20, 1e-3, None, None)[0]
    ref = difficp.icp(
        src, tgt, metric="gicp", max_distance=0.1, differentiation="none",
        source_covariances=cs, target_covariances=ct,
    )  # fmt: skip
    torch.testing.assert_close(result.transform, ref.transform, atol=1e-9, rtol=0)
    assert torch.equal(result.iterations, ref.iterations)


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
