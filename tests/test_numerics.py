"""Numerical reliability: batched pairs stay apart, any coordinate scale or offset works,
rotations stay on SO(3), degenerate Procrustes moves least, and the stopping criteria know the
cloud's scale."""

from __future__ import annotations

import math
import warnings

import hypothesis.strategies as st
import numpy as np
import pytest
import roma
import torch
from hypothesis import HealthCheck, example, given, settings

import difficp
from difficp import fused
from difficp.geometry import (
    make_transform,
    random_rotation,
    rotation_angle_deg,
    rotation_between,
    rotation_between_twin,
)
from difficp.solvers import weighted_procrustes
from difficp.strategies.compiled import compile_twin

from conftest import make_pair, wavy_surface

compiled_rotation_between = compile_twin(rotation_between_twin)
SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# 1. Batched pairs never see each other's targets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["kdtree", "brute_force", "auto"])
@pytest.mark.parametrize(
    "options",
    [{}, {"correspondence": "soft", "soft_k": 4, "temperature": 1e-2}],
    ids=["nearest", "soft_k"],
)
def test_a_drifted_pair_does_not_match_another_pairs_target(backend: str, options: dict) -> None:
    # The reproducer: pair 1 starts 12 units off, where the shared KD-tree of the
    # batch used to put pair 0's cloud.
    g = torch.Generator().manual_seed(0)
    src = torch.rand(2, 100, 3, generator=g, dtype=torch.float64)
    tgt = src + 0.05
    init = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    init[1, 0, 3] = -12.0
    common = {"differentiation": "none", "max_iterations": 3, **options}
    batched = difficp.icp(src, tgt, init=init, search_backend=backend, **common)
    for b in range(2):
        alone = difficp.icp(src[b], tgt[b], init=init[b], search_backend=backend, **common)
        torch.testing.assert_close(batched.transform[b], alone.transform, rtol=0, atol=1e-10)


@given(
    seed=st.integers(0, 2**31 - 1),
    backend=st.sampled_from(["auto", "kdtree", "brute_force"]),
    differentiation=st.sampled_from(["none", "unroll", "implicit"]),
    offset=st.sampled_from([0.1, 10.0, 1000.0]),
    soft=st.booleans(),
)
# All soft partners of pair 1 fall on one target point in the first iteration: a rank-one
# cross-covariance of 1e-12, whose undamped derivative (1e11) magnified rounding differences.
@example(seed=6, backend="auto", differentiation="unroll", offset=0.1, soft=True)
# Soft partners of pair 1 between two target points (the others 1e-11): a cross-covariance with
# s1 / s0 ~ 2e-11, whose rotation about the line rounding moved by 5e-6 (now a line).
@example(seed=15477, backend="auto", differentiation="none", offset=0.1, soft=True)
@SETTINGS
def test_batched_equals_per_pair_for_any_backend_init_and_gradient_mode(
    seed: int, backend: str, differentiation: str, offset: float, soft: bool
) -> None:
    g = torch.Generator().manual_seed(seed)
    B, n = 3, 25
    lengths = torch.tensor([n, n - 7, n - 3])
    src = torch.rand(B, n, 3, generator=g, dtype=torch.float64)
    tgt = src @ random_rotation(max_angle_deg=20, generator=g, dtype=torch.float64).T + 0.05
    # Large random initial poses: any rotation, translations up to `offset`.
    init = make_transform(
        random_rotation(B, generator=g, dtype=torch.float64),
        (torch.rand(B, 3, generator=g, dtype=torch.float64) * 2 - 1) * offset,
    )
    options = {"max_iterations": 3, "differentiation": differentiation}
    if soft:
        options.update(correspondence="soft", soft_k=4, temperature=1e-2)
    source = src.clone().requires_grad_(differentiation != "none")
    batched = difficp.icp(
        source, tgt, init=init, source_lengths=lengths, target_lengths=lengths,
        search_backend=backend, **options,
    )  # fmt: skip
    for b in range(B):
        k = int(lengths[b])
        one = src[b, :k].clone().requires_grad_(differentiation != "none")
        alone = difficp.icp(one, tgt[b, :k], init=init[b], search_backend=backend, **options)
        scale = 1 + offset
        torch.testing.assert_close(
            batched.transform[b].detach(), alone.transform.detach(), rtol=0, atol=1e-9 * scale
        )
        if differentiation != "none":
            weights = torch.arange(16, dtype=torch.float64).reshape(4, 4)
            (grad_batched,) = torch.autograd.grad(
                (batched.transform[b] * weights).sum(), source, retain_graph=True
            )
            (grad_alone,) = torch.autograd.grad((alone.transform * weights).sum(), one)
            torch.testing.assert_close(grad_batched[b, :k], grad_alone, rtol=1e-6, atol=1e-8)
            assert (grad_batched[b, k:] == 0).all()


# ---------------------------------------------------------------------------------------------
# 2. Far from the origin, tiny and large coordinates
# ---------------------------------------------------------------------------------------------


def _rotated_about_centroid(offset: float, scale: float = 1.0, n: int = 300) -> dict:
    g = torch.Generator().manual_seed(0)
    points, normals = wavy_surface(n, g)
    R = roma.rotvec_to_rotmat(torch.tensor([0.01, 0.02, math.radians(3)], dtype=torch.float64))
    src = points * scale + offset
    c = src.mean(0)
    return {
        "source": src,
        "target": (src - c) @ R.T + c,
        "source_normals": normals,
        "target_normals": normals @ R.T,
        "rotation": R,
    }


def _rotation_error(result: difficp.ICPResult, R: torch.Tensor) -> float:
    return float(rotation_angle_deg(result.transform[:3, :3].double() @ R.T))


@pytest.mark.parametrize(
    ("metric", "solver"),
    [
        ("point_to_point", "svd"),
        ("point_to_point", "linear"),
        ("point_to_point", "lm"),
        ("point_to_plane", "linear"),
        ("point_to_plane", "lm"),
        ("symmetric", "linear"),
    ],
)
@pytest.mark.parametrize("backend", ["auto", "kdtree"])
@pytest.mark.parametrize("offset", [1e3, 1e6])
def test_clouds_far_from_the_origin_recover_the_rotation(
    metric: str, solver: str, backend: str, offset: float
) -> None:
    p = _rotated_about_centroid(offset)
    result = difficp.icp(
        p["source"], p["target"], source_normals=p["source_normals"],
        target_normals=p["target_normals"], metric=metric, solver=solver,
        search_backend=backend, differentiation="none", max_iterations=30,
    )  # fmt: skip
    assert _rotation_error(result, p["rotation"]) < 1e-6
    assert bool(result.converged)


@pytest.mark.parametrize(("scale", "offset"), [(1e-5, 0.0), (1e-5, 3e-5), (1.0, 1e3)])
@pytest.mark.parametrize(
    ("metric", "solver"),
    [("point_to_point", "svd"), ("point_to_point", "linear"), ("point_to_plane", "lm")],
)
@pytest.mark.parametrize("backend", ["kdtree", "brute_force"])
def test_float32_reference_path_recovers_the_rotation_at_any_scale(
    scale: float, offset: float, metric: str, solver: str, backend: str
) -> None:
    p = _rotated_about_centroid(offset, scale)
    f32 = {k: v.float() for k, v in p.items() if k != "rotation"}
    result = difficp.icp(
        f32["source"], f32["target"], source_normals=f32["source_normals"],
        target_normals=f32["target_normals"], metric=metric, solver=solver,
        search_backend=backend, differentiation="none", max_iterations=30,
        criteria_scale="relative",
    )  # fmt: skip
    # float32 coordinates at 1e3 are only good to ~6e-5 of a unit cloud (0.004 degrees).
    assert _rotation_error(result, p["rotation"]) < (0.01 if offset >= 1e3 else 1e-4)


def test_the_linearised_step_keeps_open3d_parity_near_the_origin() -> None:
    # Within FAR_FROM_ORIGIN radii the update is Open3D's (rotation about the world origin):
    # the centring of the normal equations changes rounding only.
    p = make_pair(4, n=400, angle=5, translation=0.05, noise=0.002)
    options = {"metric": "point_to_plane", "max_iterations": 1, "differentiation": "none"}
    result = difficp.icp(
        p["source"], p["target"], target_normals=p["target_normals"], search_backend="kdtree",
        **options,
    )  # fmt: skip
    # Open3D's step, written out: solve the uncentred system, compose Rz Ry Rx and t.
    from difficp.correspondence import NeighborIndex, PointTarget, nearest_correspondences
    from difficp.geometry import twist_to_transform
    from difficp.metrics import PointToPlane

    src, tgt = p["source"][None], p["target"][None]
    index = NeighborIndex(tgt, backend="kdtree")
    target_mask = torch.ones(1, len(tgt[0]), dtype=torch.bool)
    target = PointTarget(tgt, p["target_normals"][None], target_mask, index)
    corr = nearest_correspondences(src, target, torch.ones(1, len(src[0]), dtype=torch.bool))
    metric = PointToPlane()
    J = metric.jacobian(src, None, corr).reshape(-1, 6)
    r = metric.residuals(src, None, corr).reshape(-1)
    step = torch.linalg.solve(J.T @ J, -J.T @ r)
    expected = twist_to_transform(step[None])[0]
    torch.testing.assert_close(result.transform, expected, rtol=0, atol=1e-12)


def test_coordinates_that_overflow_when_squared_are_refused() -> None:
    src = torch.rand(50, 3, dtype=torch.float64) * 1e155
    with pytest.raises(ValueError, match=r"source has coordinates up to .*overflow.*rescale"):
        difficp.icp(src, src.clone())
    with pytest.raises(ValueError, match=r"target has coordinates up to .*overflow.*rescale"):
        difficp.icp(src / 1e150, src)
    with pytest.raises(ValueError, match="float64"):  # float32: the hint names the cure
        difficp.icp(torch.rand(50, 3) * 1e17, torch.rand(50, 3))


# ---------------------------------------------------------------------------------------------
# 3. The accumulated rotation stays on SO(3)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["kdtree", "auto"])
def test_a_thousand_float32_iterations_stay_on_so3(backend: str) -> None:
    p = make_pair(3, n=100, angle=10, translation=0.1, noise=0.01, overlap=0.8)
    result = difficp.icp(
        p["source"].float(), p["target"].float(), search_backend=backend,
        max_iterations=1000, relative_fitness=0.0, relative_rmse=0.0, differentiation="none",
    )  # fmt: skip
    assert int(result.iterations) == 1000
    R = result.transform[:3, :3].double()
    eye = torch.eye(3, dtype=torch.float64)
    assert float((R.T @ R - eye).abs().max()) < 1e-6  # was 1.5e-4
    assert abs(float(torch.linalg.det(R)) - 1) < 1e-6


def test_orthonormalize_keeps_gradients_and_float64_rotations() -> None:
    from difficp.geometry import orthonormalize

    g = torch.Generator().manual_seed(0)
    T = make_transform(
        random_rotation(4, generator=g, dtype=torch.float64),
        torch.randn(4, 3, generator=g, dtype=torch.float64),
    )
    torch.testing.assert_close(orthonormalize(T), T, rtol=0, atol=1e-15)
    noisy = (T + 1e-5 * torch.randn(4, 4, 4, generator=g, dtype=torch.float64)).requires_grad_()
    out = orthonormalize(noisy)
    R = out[:, :3, :3].detach()
    # the error (1e-5) squared: one step of the polar iteration
    assert float((R.transpose(1, 2) @ R - torch.eye(3, dtype=torch.float64)).abs().max()) < 1e-8
    assert torch.autograd.gradcheck(orthonormalize, (noisy,))


# ---------------------------------------------------------------------------------------------
# 5. Degenerate Procrustes: the rotation closest to the identity
# ---------------------------------------------------------------------------------------------


def _line(direction: list[float], n: int = 20, offset: float = 0.0) -> torch.Tensor:
    d = torch.tensor(direction, dtype=torch.float64)
    return torch.linspace(-1, 1, n, dtype=torch.float64)[:, None] * d + offset


def _moments(p: np.ndarray, q: np.ndarray, c: np.ndarray) -> np.ndarray:
    a, b = p - c, q - c
    ma, mb = a.mean(0), b.mean(0)
    spreads = [((a - ma) ** 2).sum(), ((b - mb) ** 2).sum()]
    return np.concatenate([[len(p)], ma, mb, ((b - mb).T @ (a - ma)).reshape(9), spreads])


@pytest.mark.parametrize("offset", [0.0, 1e4])
@pytest.mark.parametrize("turn", [0.0, 40.0, 179.0, 180.0])
def test_collinear_points_get_the_smallest_rotation_onto_the_line(
    offset: float, turn: float
) -> None:
    v = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    v = v / v.norm()
    # u: v turned by `turn` degrees about an axis perpendicular to it
    axis = torch.linalg.cross(v, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    axis = axis / axis.norm()
    u = roma.rotvec_to_rotmat(axis * math.radians(turn)) @ v
    p = _line(v.tolist(), offset=offset)
    q = _line(u.tolist(), offset=offset) + torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    w = torch.ones(1, len(p), dtype=torch.float64)
    for T in (
        weighted_procrustes(p[None], q[None], w)[0],
        _fused_procrustes(p.numpy(), q.numpy()),
    ):
        R = T[:3, :3]
        torch.testing.assert_close(R @ v, u, rtol=0, atol=1e-9)
        # every rotation about the line fits; the smallest one turns by the lines' angle
        assert abs(float(rotation_angle_deg(R)) - turn) < 1e-6
        torch.testing.assert_close(p @ R.T + T[:3, 3], q, rtol=0, atol=1e-8 * (1 + offset))


def _fused_procrustes(p: np.ndarray, q: np.ndarray) -> torch.Tensor:
    c = p.mean(0)
    out = np.eye(4)
    fused._procrustes_update(_moments(p, q, c), c, out)
    return torch.from_numpy(out)


@pytest.mark.parametrize("backend", ["auto", "kdtree"])
def test_coincident_points_and_partners_give_the_identity_rotation(backend: str) -> None:
    p = torch.full((20, 3), 0.3, dtype=torch.float64)
    q = p + torch.tensor([0.1, -0.2, 0.05], dtype=torch.float64)
    T = weighted_procrustes(p[None], q[None], torch.ones(1, 20, dtype=torch.float64))[0]
    torch.testing.assert_close(T[:3, :3], torch.eye(3, dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(_fused_procrustes(p.numpy(), q.numpy()), T, rtol=0, atol=1e-12)
    # Every source point far from a cloud matches the same target point: nothing to rotate by.
    src = torch.rand(30, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    init = torch.eye(4, dtype=torch.float64)
    init[:3, 3] = torch.tensor([40.0, -30.0, 20.0], dtype=torch.float64)
    result = difficp.icp(
        src, src + 0.01, init=init, search_backend=backend, max_iterations=1,
        differentiation="none",
    )  # fmt: skip
    assert float(rotation_angle_deg(result.transform[:3, :3])) < 1e-9


@given(seed=st.integers(0, 2**31 - 1))
@SETTINGS
def test_rotation_between_is_the_smallest_rotation(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    v = torch.nn.functional.normalize(torch.randn(8, 3, generator=g, dtype=torch.float64), dim=1)
    u = torch.nn.functional.normalize(torch.randn(8, 3, generator=g, dtype=torch.float64), dim=1)
    u[0] = -v[0]  # opposite
    u[1] = v[1]  # equal
    R = rotation_between(v, u)
    torch.testing.assert_close((R @ v[..., None])[..., 0], u, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        R.transpose(1, 2) @ R, torch.eye(3, dtype=torch.float64).expand(8, 3, 3), atol=1e-12,
        rtol=0,
    )  # fmt: skip
    angle = torch.arccos((v * u).sum(-1).clamp(-1, 1))
    torch.testing.assert_close(torch.deg2rad(rotation_angle_deg(R)), angle, rtol=0, atol=1e-6)
    for b in range(8):
        out = compiled_rotation_between(v[b].numpy().copy(), u[b].numpy().copy())
        np.testing.assert_allclose(out @ v[b].numpy(), u[b].numpy(), rtol=0, atol=1e-12)
        assert abs(float(rotation_angle_deg(torch.from_numpy(out))) - math.degrees(angle[b])) < 1e-5


# ---------------------------------------------------------------------------------------------
# 7. Stopping criteria at small scale
# ---------------------------------------------------------------------------------------------


def test_absolute_criteria_warn_once_for_tiny_clouds_and_relative_ones_work() -> None:
    p = _rotated_about_centroid(0.0, scale=1e-6)
    args = (p["source"], p["target"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        absolute = difficp.icp(*args, differentiation="none")
    coarse = [w for w in caught if "criteria_scale='relative'" in str(w.message)]
    assert len(coarse) == 1 and coarse[0].filename == __file__
    # Open3D's semantics by default: the RMSE changes by less than 1e-6 at once.
    assert int(absolute.iterations) == 1 and bool(absolute.converged)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        relative = difficp.icp(*args, differentiation="none", criteria_scale="relative")
    assert int(relative.iterations) > 1 and bool(relative.converged)
    assert _rotation_error(relative, p["rotation"]) < 1e-6
    # Unit-sized clouds do not warn with the default criteria.
    unit = _rotated_about_centroid(0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        difficp.icp(unit["source"], unit["target"], differentiation="none")


def test_criteria_scale_is_validated() -> None:
    with pytest.raises(ValueError, match="criteria_scale"):
        difficp.ICPConfig(criteria_scale="meters")  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", ["kdtree", "compiled"])
def test_symmetric_metric_orients_opposite_source_normals(backend: str) -> None:
    """Source normals exactly opposite the target's (a flipped scan) summed to 0 in the
    symmetric metric: no residual, no step, and ICP returned the identity as converged. Normals
    are lines, so the metric flips the source normal to agree with the target's."""
    xs = torch.linspace(-1, 1, 30, dtype=torch.float64)
    X, Y = torch.meshgrid(xs, xs, indexing="ij")
    x, y = X.flatten(), Y.flatten()
    target = torch.stack([x, y, 0.1 * torch.sin(3 * x) * torch.cos(2 * y)], -1)
    normals = torch.zeros_like(target)
    normals[:, 2] = 1.0
    offset = torch.tensor([0.0, 0.0, 0.05], dtype=torch.float64)
    result = difficp.icp(
        target - offset,
        target,
        source_normals=-normals,
        target_normals=normals,
        metric="symmetric",
        solver="linear",
        search_backend=backend,
    )
    assert bool(result.converged)
    torch.testing.assert_close(result.transform[:3, 3], offset, atol=1e-9, rtol=0)
