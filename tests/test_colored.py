"""Colored ICP (metric="colored"): Open3D parity on the coloured 3DMatch pair, the intensity
gradients, gradients through it, batching and the errors of bad colour input."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import difficp
from difficp import colors as colors_module
from difficp.colors import intensity, intensity_gradients
from difficp.correspondence import NeighborIndex
from difficp.geometry import invert_transform, se3_exp, transform_points

from conftest import make_pair


def _paint(points: torch.Tensor) -> torch.Tensor:
    """A smooth RGB texture in [0.1, 0.9] of surface coordinates ``(N, 3)``."""
    phase = torch.tensor([0.0, 1.0, 2.0], dtype=points.dtype)
    return 0.5 + 0.4 * torch.sin(4 * points[:, :1] + 3 * points[:, 1:2] - 2 * points[:, 2:] + phase)


def _colored_pair(seed: int = 3, n: int = 400, **kwargs) -> dict:
    p = make_pair(seed, n=n, **kwargs)
    p["source_colors"] = _paint(p["source"])
    # Target colours belong to its surface points before they were moved.
    p["target_colors"] = _paint(transform_points(p["target"], invert_transform(p["transform"])))
    return p


def _run(p: dict, **options) -> difficp.ICPResult:
    return difficp.icp(
        p["source"],
        p["target"],
        target_normals=p["target_normals"],
        source_colors=p["source_colors"],
        target_colors=p["target_colors"],
        metric="colored",
        **options,
    )


# ---------------------------------------------------------------------------------------------
# Open3D parity (float64, the coloured 3DMatch pair)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lambda_geometric", [0.968, 0.5])
@pytest.mark.parametrize("max_iterations", [1, 30])
def test_matches_open3d_colored_icp(data_dir, lambda_geometric: float, max_iterations: int) -> None:
    o3d = pytest.importorskip("open3d")
    reg = o3d.pipelines.registration
    folder = data_dir / "scans" / "open3d_3dmatch_pair"
    clouds = [difficp.io.read_point_cloud(folder / f"feature_cloud_bin_{i}.pcd") for i in (0, 1)]
    assert all(c.colors is not None and c.normals is not None for c in clouds)
    legacy = []
    for c in clouds:
        pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(c.points))
        pc.normals = o3d.utility.Vector3dVector(c.normals)
        pc.colors = o3d.utility.Vector3dVector(c.colors)
        legacy.append(pc)
    init = se3_exp(torch.tensor([0.02, -0.01, 0.015, 0.02, -0.01, 0.01], dtype=torch.float64))
    max_distance = 0.05
    expected = reg.registration_colored_icp(
        legacy[0],
        legacy[1],
        max_distance,
        init.numpy(),
        reg.TransformationEstimationForColoredICP(lambda_geometric=lambda_geometric),
        reg.ICPConvergenceCriteria(1e-6, 1e-6, max_iterations),
    )
    source, target = clouds
    result = difficp.icp(
        torch.from_numpy(source.points),
        torch.from_numpy(target.points),
        init=init,
        target_normals=torch.from_numpy(target.normals),
        source_colors=torch.from_numpy(source.colors),
        target_colors=torch.from_numpy(target.colors),
        metric="colored",
        lambda_geometric=lambda_geometric,
        max_distance=max_distance,
        max_iterations=max_iterations,
    )
    np.testing.assert_allclose(result.transform.numpy(), expected.transformation, atol=1e-6)
    assert abs(float(result.fitness) - expected.fitness) < 1e-9
    assert abs(float(result.inlier_rmse) - expected.inlier_rmse) < 1e-6
    # It moved: one iteration of colored ICP is not the identity step.
    assert np.abs(expected.transformation - init.numpy()).max() > 1e-3


# ---------------------------------------------------------------------------------------------
# Intensity gradients
# ---------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_gradient_of_a_linear_intensity_on_a_plane_is_its_tangential_part(seed: int) -> None:
    # On a plane, a linear intensity c . x is fitted exactly: the gradient is c's tangential part.
    g = torch.Generator().manual_seed(seed)
    normal = torch.nn.functional.normalize(torch.randn(3, generator=g, dtype=torch.float64), dim=0)
    basis = torch.linalg.svd(torch.eye(3, dtype=torch.float64) - normal[:, None] * normal)[0]
    uv = torch.rand(60, 2, generator=g, dtype=torch.float64)
    points = uv @ basis[:, :2].T + torch.randn(3, generator=g, dtype=torch.float64)
    c = torch.randn(3, generator=g, dtype=torch.float64)
    values = points @ c
    gradient = intensity_gradients(
        points[None], normal.expand(1, 60, 3), values[None], k=10, radius=None
    )[0]
    tangential = c - (c @ normal) * normal
    torch.testing.assert_close(gradient, tangential.expand(60, 3), atol=1e-9, rtol=0)


def test_points_with_fewer_than_four_neighbours_get_no_gradient() -> None:
    points = torch.tensor([[0.0, 0, 0], [0.1, 0, 0], [0, 0.1, 0], [5, 5, 0]], dtype=torch.float64)
    normals = torch.tensor([0.0, 0, 1]).double().expand(4, 3)
    values = torch.tensor([0.0, 1, 2, 3], dtype=torch.float64)
    # Within 0.5 each of the first three has 3 points (itself included): Open3D fits nothing.
    gradient = intensity_gradients(points[None], normals[None], values[None], 30, radius=0.5)
    assert torch.equal(gradient, torch.zeros(1, 4, 3, dtype=torch.float64))
    # Without the radius they have 4 and get a gradient in the plane.
    gradient = intensity_gradients(points[None], normals[None], values[None], 30)
    assert gradient[0, 0].abs().max() > 0 and gradient[0, :, 2].abs().max() < 1e-12


def test_intensity_is_the_mean_of_rgb() -> None:
    rgb = torch.tensor([[0.3, 0.6, 0.9]], dtype=torch.float64)
    torch.testing.assert_close(intensity(rgb), torch.tensor([0.6], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# Registration and gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["linear", "lm"])
def test_registers_a_coloured_pair(solver: str) -> None:
    p = _colored_pair(angle=8, translation=0.05, resample=False)
    result = _run(p, solver=solver, max_iterations=60)
    torch.testing.assert_close(result.transform, p["transform"], atol=1e-6, rtol=0)


def test_padded_batch_matches_single_pairs() -> None:
    a = _colored_pair(3, n=300, angle=6, translation=0.05)
    b = _colored_pair(4, n=250, angle=6, translation=0.05)
    singles = [_run(p, max_distance=0.2) for p in (a, b)]

    def stack(key: str, size: int) -> torch.Tensor:
        return torch.stack(
            [torch.nn.functional.pad(p[key], (0, 0, 0, size - len(p[key]))) for p in (a, b)]
        )

    n, m = max(len(a["source"]), len(b["source"])), max(len(a["target"]), len(b["target"]))
    batch = difficp.icp(
        stack("source", n),
        stack("target", m),
        source_lengths=torch.tensor([len(a["source"]), len(b["source"])]),
        target_lengths=torch.tensor([len(a["target"]), len(b["target"])]),
        target_normals=stack("target_normals", m),
        source_colors=stack("source_colors", n),
        target_colors=stack("target_colors", m),
        metric="colored",
        max_distance=0.2,
    )
    for i, single in enumerate(singles):
        torch.testing.assert_close(batch.transform[i], single.transform, atol=1e-10, rtol=0)
        assert int(batch.iterations[i]) == int(single.iterations)


def test_gradcheck_colours_and_source() -> None:
    p = _colored_pair(5, n=14, angle=8, translation=0.05, resample=False)
    source = p["source"].clone().requires_grad_(True)
    source_colors = p["source_colors"].clone().requires_grad_(True)
    target_colors = p["target_colors"].clone().requires_grad_(True)
    lam = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)

    def fn(src, sc, tc, lam_):
        result = difficp.icp(
            src,
            p["target"],
            target_normals=p["target_normals"],
            source_colors=sc,
            target_colors=tc,
            metric="colored",
            lambda_geometric=lam_,
            correspondence="soft",
            temperature=0.02,
            color_neighbors=6,
            max_iterations=3,
            relative_fitness=0.0,
            relative_rmse=0.0,
        )
        return result.transform[:3, :]

    assert torch.autograd.gradcheck(
        fn, (source, source_colors, target_colors, lam), eps=1e-6, atol=1e-5, rtol=1e-4
    )


def test_gradcheck_soft_k_and_target_points() -> None:
    p = _colored_pair(6, n=16, angle=6, translation=0.03, resample=False)
    target = p["target"].clone().requires_grad_(True)

    def fn(tgt):
        result = difficp.icp(
            p["source"],
            tgt,
            target_normals=p["target_normals"],
            source_colors=p["source_colors"],
            target_colors=p["target_colors"],
            metric="colored",
            lambda_geometric=0.7,
            correspondence="soft",
            soft_k=5,
            temperature=0.02,
            color_neighbors=6,
            max_iterations=2,
            relative_fitness=0.0,
            relative_rmse=0.0,
        )
        return result.transform[:3, :]

    assert torch.autograd.gradcheck(fn, (target,), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_implicit_gradient_matches_unrolled() -> None:
    p = _colored_pair(7, n=40, angle=6, translation=0.03, resample=False)
    weights = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = {}
    for mode in ("unroll", "implicit"):
        colors = p["source_colors"].clone().requires_grad_(True)
        src = p["source"].clone().requires_grad_(True)
        result = difficp.icp(
            src,
            p["target"],
            target_normals=p["target_normals"],
            source_colors=colors,
            target_colors=p["target_colors"],
            metric="colored",
            lambda_geometric=0.8,
            correspondence="soft",
            temperature=0.01,
            color_neighbors=8,
            max_iterations=120,
            relative_fitness=0.0,
            relative_rmse=1e-15,
            differentiation=mode,
        )
        loss = (result.transform[:3] * weights).sum()
        grads[mode] = torch.autograd.grad(loss, (src, colors))
    for unrolled, implicit in zip(grads["unroll"], grads["implicit"], strict=True):
        assert unrolled.abs().max() > 0
        rel = (unrolled - implicit).norm() / unrolled.norm()
        assert rel < 1e-3, rel


def test_module_takes_colours() -> None:
    p = _colored_pair(8, n=200, angle=5, translation=0.03, resample=False)
    module = difficp.ICP(metric="colored", max_iterations=60)
    result = module(
        p["source"],
        p["target"],
        target_normals=p["target_normals"],
        source_colors=p["source_colors"],
        target_colors=p["target_colors"],
    )
    torch.testing.assert_close(result.transform, p["transform"], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def _bad(p: dict, match: str, **changes) -> None:
    kwargs = {
        "target_normals": p["target_normals"],
        "source_colors": p["source_colors"],
        "target_colors": p["target_colors"],
        "metric": "colored",
        **changes,
    }
    with pytest.raises(ValueError, match=match):
        difficp.icp(p["source"], p["target"], **kwargs)


def test_bad_colour_input_is_refused_with_the_fix() -> None:
    p = _colored_pair(9, n=50)
    n = len(p["source"])
    _bad(p, "needs source_colors", source_colors=None)
    _bad(p, "needs source_colors and target_colors", source_colors=None, target_colors=None)
    _bad(p, "target_normals are required", target_normals=None)
    _bad(p, r"source_colors must be RGB shaped like its points", source_colors=torch.rand(n, 4))
    _bad(p, r"target_colors must be RGB shaped", target_colors=torch.rand(n + 7, 3))
    _bad(p, "colors / 255.0", source_colors=(p["source_colors"] * 255).to(torch.uint8))
    _bad(p, r"in \[0, 1\].*colors / 255.0", target_colors=p["target_colors"] * 255)
    nan = p["source_colors"].clone()
    nan[3, 1] = float("nan")
    _bad(p, "source_colors contains NaN", source_colors=nan)
    # Colours with a metric that does not read them are a mistake, not silently ignored.
    _bad(p, "only used by metric='colored'", metric="point_to_plane")
    _bad(p, "target_colors is only used", metric="point_to_plane", source_colors=None)


def test_bad_colour_options_are_refused() -> None:
    with pytest.raises(ValueError, match="lambda_geometric must be in"):
        difficp.ICPConfig(metric="colored", lambda_geometric=1.5)
    with pytest.raises(ValueError, match="color_radius"):
        difficp.ICPConfig(metric="colored", color_radius=-1.0)
    with pytest.raises(ValueError, match="color_neighbors"):
        difficp.ICPConfig(metric="colored", color_neighbors=0)
    with pytest.raises(ValueError, match="projective"):
        difficp.ICPConfig(metric="colored", correspondence="projective")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("voxel", [[], ["--voxel-size", "0.01"]])
def test_cli_reads_colours_from_the_files(tmp_path, capsys, voxel: list[str]) -> None:
    from difficp.cli import main
    from difficp.io import read_transform, write_point_cloud

    p = _colored_pair(10, n=600, angle=5, translation=0.03, resample=False)
    src, tgt, out = tmp_path / "s.ply", tmp_path / "t.pcd", tmp_path / "T.txt"
    write_point_cloud(src, p["source"], colors=p["source_colors"])
    write_point_cloud(tgt, p["target"], p["target_normals"], p["target_colors"], double=True)
    args = ["register", str(src), str(tgt), "--metric", "colored", "--max-distance", "0.2"]
    assert main([*args, "--dtype", "float64", "--out", str(out), *voxel]) == 0
    # 8-bit colours in the files: still close to the truth.
    np.testing.assert_allclose(read_transform(out), p["transform"].numpy(), atol=2e-3)
    capsys.readouterr()
    write_point_cloud(src, p["source"])  # no colours
    assert main(args) == 2
    assert "needs colours, and source" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Compiled fast path
# ---------------------------------------------------------------------------------------------


@st.composite
def gradient_batches(draw: st.DrawFn) -> dict:
    """A padded batch of noisy, textured surface patches with unit normals at several scales and
    offsets, a k (some clouds smaller than it) and a radius (or none)."""
    B = draw(st.integers(1, 3))
    N = draw(st.integers(4, 300))
    lengths = draw(st.lists(st.integers(1, N), min_size=B, max_size=B))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    uv = torch.rand(B, N, 2, generator=g, dtype=torch.float64)
    u, v = uv[..., 0], uv[..., 1]
    height = 0.2 * torch.sin(4 * u) * torch.cos(3 * v)
    slope = torch.stack([-0.8 * torch.cos(4 * u) * torch.cos(3 * v),
                         0.6 * torch.sin(4 * u) * torch.sin(3 * v), torch.ones_like(u)], -1)  # fmt: skip
    normals = torch.nn.functional.normalize(slope, dim=-1)
    points = torch.cat([uv, height[..., None]], -1)
    points = points + 0.002 * torch.randn(B, N, 3, generator=g, dtype=torch.float64)
    values = intensity(_paint(points.reshape(-1, 3))).reshape(B, N)
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    points = (points + draw(st.sampled_from([0.0, 50.0]))) * scale
    radius = draw(st.one_of(st.none(), st.floats(0.03, 0.5)))
    return {
        "points": points,
        "normals": normals,
        "values": values,
        "lengths": torch.tensor(lengths),
        "k": draw(st.integers(1, 40)),
        "radius": None if radius is None else radius * scale,
        "scale": scale,
    }


def _condition(case: dict) -> torch.Tensor:
    """``(B, N)`` condition number of each point's least-squares system (neighbours by brute
    force; inf for padding and where it has no 4 points). The fit mixes units (offsets squared
    in the plane, the unitless ``(K - 1)^2`` along the normal), so it is ill-conditioned for
    clouds at scales far from 1, where both paths are only as close as that allows."""
    pts, normals, lengths = case["points"], case["normals"], case["lengths"]
    B, N, _ = pts.shape
    out = torch.full((B, N), torch.inf, dtype=torch.float64)
    for b in range(B):
        n = int(lengths[b])
        k = min(case["k"], int(lengths.min()))
        p, nrm = pts[b, :n], normals[b, :n]
        d, idx = torch.cdist(p, p).topk(k, largest=False)
        found = d < (torch.inf if case["radius"] is None else case["radius"])
        offset = p[idx] - p[:, None]
        a = (offset - (offset * nrm[:, None]).sum(-1, keepdim=True) * nrm[:, None]) * found[
            ..., None
        ]
        count = (found.sum(1) - 1).double()
        A = a.transpose(1, 2) @ a + count[:, None, None] ** 2 * nrm[:, :, None] * nrm[:, None, :]
        values = torch.linalg.eigvalsh(A)
        cond = values[:, 2] / values[:, 0]
        out[b, :n] = torch.where((count >= 3) & (values[:, 0] > 0), cond, torch.inf)
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gradient_batches())
def test_compiled_gradients_equal_the_pytorch_path(case: dict) -> None:
    # The compiled fit (the default on the CPU without gradients) against the PyTorch one (an
    # index of the scipy backend keeps it): the same numbers to rounding where the system is
    # well conditioned, zero on both where it has too few points; padding zero.
    pts, lengths = case["points"], case["lengths"]
    args = (pts, case["normals"], case["values"], case["k"], case["radius"], lengths)
    fast = colors_module._compiled_gradients(*args, None)
    ref = intensity_gradients(*args, index=NeighborIndex(pts, lengths, "kdtree"))
    assert torch.isfinite(fast).all()
    cond = _condition(case)
    # gradients are in intensity per unit length: compared in units of the cloud's scale
    ok = cond < 1e6
    np.testing.assert_allclose(
        (fast[ok] * case["scale"]).numpy(), (ref[ok] * case["scale"]).numpy(), atol=1e-9, rtol=0
    )
    few = torch.isinf(cond)  # padding, fewer than 4 points (or a singular system)
    assert not fast[few].any() and not ref[few].any()


def test_real_scan_gradients_equal_the_pytorch_path(data_dir) -> None:
    """The 3DMatch target fragment (3458 points), Open3D's neighbourhoods for max_distance
    5 cm (30 within 10 cm): the same gradients on both paths."""
    cloud = difficp.io.read_point_cloud(
        data_dir / "scans" / "open3d_3dmatch_pair" / "feature_cloud_bin_1.pcd"
    )
    pts = torch.from_numpy(cloud.points)[None]
    normals = torch.from_numpy(cloud.normals)[None]
    values = intensity(torch.from_numpy(cloud.colors))[None]
    fast = colors_module._compiled_gradients(pts, normals, values, 30, 0.1, None, None)
    ref = intensity_gradients(
        pts, normals, values, 30, 0.1, index=NeighborIndex(pts, None, "kdtree")
    )
    assert (ref.abs().amax(-1) > 1e-3).float().mean() > 0.5  # most points fit a gradient
    np.testing.assert_allclose(fast.numpy(), ref.numpy(), atol=1e-9, rtol=0)


def test_gradient_path_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled on the CPU without gradients (on the index's forest, which the ICP search then
    reuses); PyTorch for inputs that require grad (the fit is then differentiable) and for an
    index of another backend."""
    calls: list[str] = []
    original = colors_module._compiled_gradients

    def spy(*args, **kwargs):
        calls.append("compiled")
        return original(*args, **kwargs)

    monkeypatch.setattr(colors_module, "_compiled_gradients", spy)
    p = _colored_pair(13, n=300)
    pts, normals = p["target"][None], p["target_normals"][None]
    values = intensity(p["target_colors"])[None]
    index = NeighborIndex(pts, None, "compiled")
    fast = intensity_gradients(pts, normals, values, 10, 0.3, index=index)
    assert calls == ["compiled"] and index.built_forest() is not None
    leaf = values.clone().requires_grad_(True)
    differentiable = intensity_gradients(pts, normals, leaf, 10, 0.3)
    assert calls == ["compiled"] and differentiable.requires_grad
    torch.testing.assert_close(differentiable.detach(), fast, atol=1e-9, rtol=0)
    with torch.no_grad():  # nothing to differentiate: compiled again
        intensity_gradients(pts, normals, leaf, 10, 0.3)
    assert calls == ["compiled", "compiled"]
    intensity_gradients(pts, normals, values, 10, 0.3, index=NeighborIndex(pts, None, "kdtree"))
    assert len(calls) == 2


def test_compiled_path_matches_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole fast path ("auto" without gradients: the compiled colour fit on the search
    forest, then the fused loop) against the PyTorch path ("kdtree"), on a padded batch."""
    used: list[str] = []
    registration = importlib.import_module("difficp.registration")
    original = registration.run_loop

    def spy(steps, *args, **kwargs):
        used.append(type(steps).__name__)
        return original(steps, *args, **kwargs)

    monkeypatch.setattr(registration, "run_loop", spy)
    pairs = [_colored_pair(14, n=500, noise=0.003), _colored_pair(15, n=400, noise=0.003)]

    def stack(key: str) -> torch.Tensor:
        size = max(len(q[key]) for q in pairs)
        return torch.stack(
            [torch.nn.functional.pad(q[key], (0, 0, 0, size - len(q[key]))) for q in pairs]
        )

    inputs = {
        "source_lengths": torch.tensor([len(q["source"]) for q in pairs]),
        "target_lengths": torch.tensor([len(q["target"]) for q in pairs]),
        **{key: stack(key) for key in ("target_normals", "source_colors", "target_colors")},
    }
    runs = [
        difficp.icp(stack("source"), stack("target"), metric="colored", max_distance=0.1,
                    differentiation="none", search_backend=backend, **inputs)
        for backend in ("auto", "kdtree")
    ]  # fmt: skip
    assert used == ["FusedSteps", "ReferenceSteps"]
    fast, ref = runs
    torch.testing.assert_close(fast.transform, ref.transform, atol=1e-9, rtol=0)
    assert torch.equal(fast.fitness, ref.fitness)
    assert torch.equal(fast.iterations, ref.iterations)
    assert (fast.iterations >= 2).all()
