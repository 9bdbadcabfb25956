"""Tests of non-rigid ICP: models, sparse autograd Jacobians, solver, loop, gradients, demo."""

from __future__ import annotations

import pytest
import torch

import difficp
from difficp.geometry import make_transform, random_rotation, transform_points
from difficp.nonrigid import (
    EmbeddedDeformationGraph,
    RigidModel,
    farthest_point_sampling,
    nonrigid_icp,
    rowwise_jacobian,
)
from difficp.solvers import block_normal_equations as normal_equations

torch.set_default_dtype(torch.float32)


def _blob(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """An irregular closed surface (a bumpy ellipsoid) with no symmetry, ``(n, 3)``."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(n, 3, generator=g, dtype=dtype)
    d = d / d.norm(dim=-1, keepdim=True)
    r = 1 + 0.2 * torch.sin(3 * d[:, 0]) * torch.cos(2 * d[:, 1]) + 0.1 * d[:, 2]
    return d * r[:, None] * torch.tensor([0.3, 0.2, 0.15], dtype=dtype)


def _rigid_pair(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    src = torch.stack([_blob(400, seed + b) for b in range(batch)])
    R = random_rotation(batch, max_angle_deg=20, generator=g, dtype=torch.float64)
    t = 0.03 * torch.randn(batch, 3, generator=g, dtype=torch.float64)
    T = make_transform(R, t)
    return src, transform_points(src, T), T


# ----- rigid as a model ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"metric": "point_to_point"},
        {"metric": "point_to_plane", "solver": "linear"},
        {"metric": "point_to_plane", "solver": "lm"},
    ],
)
def test_rigid_model_reproduces_rigid_icp(options: dict) -> None:
    src, tgt, T_true = _rigid_pair(2, 0)
    normals = difficp.estimate_normals(tgt, viewpoint=torch.zeros(3, dtype=tgt.dtype))
    kw = {"target_normals": normals, "max_iterations": 40, **options}
    ref = difficp.icp(src, tgt, **kw)
    res = nonrigid_icp(src, tgt, "rigid", **kw)
    assert res.transform is not None
    torch.testing.assert_close(res.transform, ref.transform, atol=1e-7, rtol=0)
    torch.testing.assert_close(res.transform, T_true, atol=1e-7, rtol=0)
    torch.testing.assert_close(res.fitness, ref.fitness)
    assert bool(res.converged.all())


def test_rigid_model_with_init_and_unbatched() -> None:
    src, tgt, T_true = _rigid_pair(1, 3)
    init = make_transform(torch.eye(3, dtype=torch.float64), T_true[0, :3, 3] * 0.5)
    res = nonrigid_icp(src[0], tgt[0], RigidModel(src[0], init=init))
    assert res.transform.shape == (4, 4) and res.params.shape == (6,)
    torch.testing.assert_close(res.transform, T_true[0], atol=1e-7, rtol=0)


# ----- Jacobians ----------------------------------------------------------------------------


def test_rowwise_jacobian_matches_autograd() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, dtype=torch.float64, generator=g)
    W = torch.randn(5, 3, dtype=torch.float64, generator=g)

    def fn(v: torch.Tensor) -> torch.Tensor:
        return torch.sin(v @ W) * v[..., :1]

    jac = rowwise_jacobian(fn, x)  # (4, 3, 5)
    for i in range(4):
        ref = torch.autograd.functional.jacobian(lambda r: fn(r[None])[0], x[i])
        torch.testing.assert_close(jac[i], ref)


def _dense_problem(model: EmbeddedDeformationGraph, params: torch.Tensor):
    """All residuals of the model (points as data + regularisers) as one dense vector function."""

    def residuals(p: torch.Tensor) -> torch.Tensor:
        parts = [model.deform(p[None]).reshape(-1)]
        parts += [b.residuals.reshape(-1) for b in model.regularizers(p[None], False)]
        return torch.cat(parts)

    return residuals


@pytest.mark.parametrize("rotation", ["affine", "rotvec"])
def test_graph_sparse_normal_equations_match_dense_autograd(rotation: str) -> None:
    src = _blob(60, 1)
    model = EmbeddedDeformationGraph(src, num_nodes=8, skin_k=3, graph_k=3, rotation=rotation)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(1, model.num_params, generator=g, dtype=src.dtype)
    params = model.initial_params() + 0.1 * noise
    values, index = model.point_jacobian(params)
    from difficp.nonrigid.model import ResidualBlock

    blocks = [ResidualBlock(model.deform(params), values, index), *model.regularizers(params)]
    H, grad, cost = normal_equations(blocks, model.num_params)
    fn = _dense_problem(model, params)
    r = fn(params[0])
    J = torch.autograd.functional.jacobian(fn, params[0])
    torch.testing.assert_close(H[0], J.T @ J)
    torch.testing.assert_close(grad[0], J.T @ r)
    torch.testing.assert_close(cost[0], (r**2).sum())


# ----- embedded deformation graph -----------------------------------------------------------


def test_farthest_point_sampling_spreads_and_respects_lengths() -> None:
    pts = torch.cat([torch.zeros(50, 3), torch.ones(1, 3) * 5, torch.full((10, 3), 100.0)])[None]
    idx = farthest_point_sampling(pts, 2, mask=torch.arange(61)[None] < 51)
    assert idx[0].tolist() == [0, 50]  # the far padding points are never picked
    idx = farthest_point_sampling(_blob(200, 0)[None], 16)
    assert len(set(idx[0].tolist())) == 16


def test_graph_identity_and_rigid_motion_are_free() -> None:
    src = _blob(300, 4)
    model = EmbeddedDeformationGraph(src, num_nodes=16, rot_weight=1.0, smooth_weight=10.0)
    p0 = model.initial_params()
    torch.testing.assert_close(model.deform(p0)[0], src)
    assert sum(float(b.cost()) for b in model.regularizers(p0, False)) < 1e-20
    # A rigid motion: A_j = R, t_j = R g_j + t - g_j, is exact with zero regulariser cost.
    gen = torch.Generator().manual_seed(0)
    R = random_rotation(max_angle_deg=60, generator=gen, dtype=src.dtype)
    t = torch.tensor([0.1, -0.2, 0.05], dtype=src.dtype)
    g = model.nodes[0]
    theta = torch.cat([R.reshape(1, 9).expand(16, 9), g @ R.T + t - g], -1).reshape(1, -1)
    torch.testing.assert_close(model.deform(theta)[0], src @ R.T + t)
    assert sum(float(b.cost()) for b in model.regularizers(theta, False)) < 1e-20
    # The nodes travel with the motion they carry.
    torch.testing.assert_close(model.deformed_nodes(p0), model.nodes)
    torch.testing.assert_close(model.deformed_nodes(theta)[0], g @ R.T + t)


def test_graph_weights_are_a_partition_of_unity() -> None:
    model = EmbeddedDeformationGraph(_blob(200, 5), num_nodes=12, skin_k=4)
    w = model.skin_weights[0]
    torch.testing.assert_close(w.sum(-1), torch.ones(200, dtype=w.dtype))
    assert bool((w >= 0).all()) and bool((w[:, 0] > 0).all())


def _bent(points: torch.Tensor, amount: float) -> torch.Tensor:
    """A smooth non-rigid deformation: bend about y growing with x, plus a bulge."""
    x, y, z = points.unbind(-1)
    ang = amount * x
    return torch.stack(
        [
            x * torch.cos(ang) - z * torch.sin(ang),
            y * (1 + 0.3 * amount * z),
            x * torch.sin(ang) + z * torch.cos(ang),
        ],
        -1,
    )


@pytest.mark.parametrize("solver", ["linear", "lm"])
def test_graph_fit_recovers_smooth_deformation(solver: str) -> None:
    src = _blob(500, 6)
    tgt = _bent(_blob(1000, 7), 1.5)
    true = _bent(src, 1.5)
    model = EmbeddedDeformationGraph(src, num_nodes=20, smooth_weight=1.0)
    res = nonrigid_icp(
        None, tgt, model, solver=solver, max_iterations=30, regularizer_schedule=[100, 30, 10, 3, 1]
    )
    dense = _bent(_blob(20000, 8), 1.5)  # the true deformed surface, densely

    def to_surface(p: torch.Tensor) -> float:
        return float(torch.cdist(p, dense).amin(-1).mean())

    assert to_surface(res.points) < to_surface(src) / 3, (to_surface(src), to_surface(res.points))
    # and the points went (roughly) where the deformation takes them, not just onto the surface
    assert (res.points - true).norm(dim=-1).mean() < (src - true).norm(dim=-1).mean()


def test_batched_equals_single() -> None:
    srcs = torch.stack([_blob(200, 8), _blob(200, 9)])
    tgts = torch.stack([_bent(_blob(300, 10), 1.0), _bent(_blob(300, 11), -1.0)])
    model = EmbeddedDeformationGraph(srcs, num_nodes=10)
    res = nonrigid_icp(None, tgts, model, max_iterations=5)
    for b in range(2):
        single = nonrigid_icp(
            None, tgts[b], EmbeddedDeformationGraph(srcs[b], num_nodes=10), max_iterations=5
        )
        torch.testing.assert_close(res.params[b], single.params, atol=1e-9, rtol=1e-7)
        assert int(res.iterations[b]) == int(single.iterations)


def test_padded_source_ignores_padding() -> None:
    src = _blob(150, 12)
    tgt = _bent(_blob(300, 13), 1.0)
    padded = torch.cat([src, torch.full((20, 3), 50.0, dtype=src.dtype)])[None]
    m_pad = EmbeddedDeformationGraph(padded, num_nodes=10, lengths=torch.tensor([150]))
    m = EmbeddedDeformationGraph(src[None], num_nodes=10)
    r_pad = nonrigid_icp(None, tgt[None], m_pad, max_iterations=4)
    r = nonrigid_icp(None, tgt[None], m, max_iterations=4)
    torch.testing.assert_close(r_pad.points[:, :150], r.points, atol=1e-9, rtol=1e-7)


def test_bad_inputs_raise() -> None:
    src = _blob(50, 0)
    with pytest.raises(ValueError, match="num_nodes"):
        EmbeddedDeformationGraph(src, num_nodes=100)
    with pytest.raises(ValueError, match="rotation"):
        EmbeddedDeformationGraph(src, num_nodes=8, rotation="quaternion")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="source"):
        nonrigid_icp(None, src, "graph")
    with pytest.raises(ValueError, match="source normals"):
        nonrigid_icp(
            src,
            src,
            "graph",
            model_options={"num_nodes": 8},
            metric="symmetric",
            target_normals=src,
        )
    with pytest.raises(ValueError, match="NaN"):
        nonrigid_icp(src, src * float("nan"), "rigid")


# ----- gradients ----------------------------------------------------------------------------


def _small_problem():
    src = _blob(40, 20)
    tgt = _bent(_blob(60, 21), 1.0) + 0.01
    return src, tgt


def test_gradcheck_unrolled_graph_fit() -> None:
    """Fitted parameters are differentiable in the target and the source (float64, unrolled)."""
    src, tgt = _small_problem()

    def fit(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        model = EmbeddedDeformationGraph(s, num_nodes=5, skin_k=3, graph_k=2, smooth_weight=1.0)
        res = nonrigid_icp(
            None,
            t,
            model,
            solver="lm",
            lm_steps=2,
            max_iterations=2,
            regularizer_schedule=[10.0, 1.0],
        )
        return res.params

    s = src.clone().requires_grad_(True)
    t = tgt.clone().requires_grad_(True)
    # fast_mode checks random projections u^T J v (a few evaluations instead of one per input)
    for seed in range(3):
        torch.manual_seed(seed)
        assert torch.autograd.gradcheck(fit, (s, t), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_gradcheck_rigid_model_point_to_plane() -> None:
    src, tgt, _ = _rigid_pair(1, 30)
    src, tgt = src[0, :60], tgt[0, :60]
    normals = difficp.estimate_normals(tgt, viewpoint=torch.zeros(3, dtype=tgt.dtype))

    def fit(t: torch.Tensor) -> torch.Tensor:
        return nonrigid_icp(
            src, t, "rigid", metric="point_to_plane", target_normals=normals, max_iterations=3
        ).params

    t = tgt.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fit, (t,), eps=1e-6, atol=1e-5, fast_mode=True)


def test_implicit_gradient_matches_unrolled_at_convergence() -> None:
    """On a zero-residual problem the Gauss-Newton implicit gradient is the exact one."""
    src, tgt, _ = _rigid_pair(1, 40)
    src, tgt = src[0, :80], tgt[0, :80]
    grads = {}
    for mode in ("unroll", "implicit"):
        t = tgt.clone().requires_grad_(True)
        res = nonrigid_icp(src, t, "rigid", max_iterations=30, differentiation=mode)
        (res.params * torch.arange(1.0, 7.0, dtype=t.dtype)).sum().backward()
        grads[mode] = t.grad
    torch.testing.assert_close(grads["implicit"], grads["unroll"], atol=1e-6, rtol=1e-4)


def test_differentiation_none_has_no_graph() -> None:
    src, tgt = _small_problem()
    t = tgt.clone().requires_grad_(True)
    res = nonrigid_icp(
        src,
        t,
        "graph",
        model_options={"num_nodes": 5, "graph_k": 2},
        max_iterations=2,
        differentiation="none",
    )
    assert not res.params.requires_grad


def test_nonrigid_refuses_the_rigid_svd_solver() -> None:
    src, tgt, _ = _rigid_pair(1, 3)
    with pytest.raises(ValueError, match=r"solver='svd'.*solver='linear'"):
        nonrigid_icp(src, tgt, "rigid", solver="svd")


def test_nonrigid_relative_criteria_scale_by_the_source_radius() -> None:
    src, tgt, _ = _rigid_pair(2, 5)
    kw = {"relative_fitness": 1.0, "max_iterations": 100}  # only the RMSE criterion decides
    rel = nonrigid_icp(src, tgt, "rigid", relative_rmse=1e-2, criteria_scale="relative", **kw)
    radius = (src - src.mean(1, keepdim=True)).square().sum(-1).mean(-1).sqrt()
    for b in range(2):
        tolerance = float(1e-2 * radius[b])
        absolute = nonrigid_icp(src[b], tgt[b], "rigid", relative_rmse=tolerance, **kw)
        assert rel.iterations[b] == absolute.iterations
