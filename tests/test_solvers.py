"""Solvers: the LU solve's gradient, weighted Procrustes, and finite gradients on degenerate input."""

from __future__ import annotations

import pytest
import torch

from difficp.correspondence import Correspondences
from difficp.geometry import make_transform, random_rotation, transform_points, unit_vectors
from difficp.metrics import METRICS, Symmetric
from difficp.solvers import (
    compiled_solve_normal_equations,
    damped_unit_vectors,
    gauss_newton_update,
    lu_solve,
    rank_tolerance,
    solve_normal_equations,
    weighted_procrustes,
)


def test_lu_solve_solves_and_gradchecks_for_non_symmetric_matrices() -> None:
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 6, 6, generator=g, dtype=torch.float64) + 6 * torch.eye(
        6, dtype=torch.float64
    )
    assert not torch.allclose(A, A.transpose(1, 2))
    b = torch.randn(4, 6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(A @ lu_solve(A, b)[..., None], b[..., None])
    assert torch.autograd.gradcheck(lu_solve, (A.requires_grad_(True), b.requires_grad_(True)))


def test_weighted_procrustes_recovers_transform_and_ignores_zero_weights() -> None:
    g = torch.Generator().manual_seed(1)
    p = torch.randn(2, 50, 3, generator=g, dtype=torch.float64)
    T = make_transform(
        random_rotation(2, generator=g, dtype=torch.float64),
        torch.randn(2, 3, generator=g, dtype=torch.float64),
    )
    q = transform_points(p, T)
    w = torch.rand(2, 50, generator=g, dtype=torch.float64)
    q[:, :10] += 5.0  # corrupted partners get weight 0
    w[:, :10] = 0
    torch.testing.assert_close(weighted_procrustes(p, q, w), T)


def _collinear_pair(scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Points on a line and their partners on another line, ``scale`` times the unit size."""
    t = torch.linspace(-1, 1, 12, dtype=torch.float64)[:, None]
    p = t * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64) * scale
    q = t * torch.tensor([-2.0, 1.0, 0.5], dtype=torch.float64) * scale + 0.3
    return p[None], q[None]


def test_collinear_procrustes_is_exactly_differentiable_at_ordinary_scales() -> None:
    p, q = _collinear_pair(1.0)
    w = torch.rand(1, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5
    T = weighted_procrustes(p, q, w)
    # Rank one: the rotation takes the source line's direction onto the target line's.
    d_p = (p[0, -1] - p[0, 0]) / (p[0, -1] - p[0, 0]).norm()
    d_q = (q[0, -1] - q[0, 0]) / (q[0, -1] - q[0, 0]).norm()
    torch.testing.assert_close(T[0, :3, :3] @ d_p, d_q)
    assert torch.autograd.gradcheck(
        lambda a, b: weighted_procrustes(a, b, w), (p.requires_grad_(), q.requires_grad_())
    )


def test_collinear_procrustes_gradient_is_bounded_when_the_cross_covariance_is_tiny() -> None:
    # Soft partners that all sit on one target point, apart from weights of ~1e-11, give a
    # rank-one cross-covariance of ~1e-12: the exact derivative of its direction is ~1e12.
    p, q = _collinear_pair(1.0)
    q = q.detach() * 1e-11
    p = p.requires_grad_()
    q = q.requires_grad_()
    T = weighted_procrustes(p, q, torch.ones(1, 12, dtype=torch.float64))
    (T * torch.arange(16, dtype=torch.float64).reshape(4, 4)).sum().backward()
    assert torch.isclose(T[0, :3, :3].det(), torch.ones((), dtype=torch.float64))
    # Damped: |H| / eps^2 instead of 1 / |H| per unit of H (~1e-11 / 1e-12 against ~1e11).
    assert p.grad is not None and q.grad is not None
    assert p.grad.abs().max() < 1e3 and q.grad.abs().max() < 1e3


@pytest.mark.parametrize("thickness", [1e-11, 1e-8])
def test_nearly_collinear_partners_take_the_minimal_motion_whatever_the_summation_order(
    thickness: float,
) -> None:
    # Partners on a line but for a sideways offset of `thickness` (soft partners between two
    # target points, the others weighing ~1e-11): the rotation about the line is fixed by that
    # offset alone, and rounding (eps / thickness ~ 1e-5) would move it with the summation
    # order. Below eps^(3/8) it is a line: the smallest rotation taking the line onto its image.
    g = torch.Generator().manual_seed(5)
    p = torch.rand(1, 18, 3, generator=g, dtype=torch.float64)
    t = torch.rand(1, 18, 1, generator=g, dtype=torch.float64)
    direction = torch.tensor([0.3, -0.5, 0.8], dtype=torch.float64)
    q = 0.2 + t * direction + thickness * torch.randn(1, 18, 3, generator=g, dtype=torch.float64)
    w = torch.ones(1, 18, dtype=torch.float64)
    alone = weighted_procrustes(p, q, w)
    # the same pair padded with zero-weight rows and batched beside another pair
    other = torch.rand(1, 25, 3, generator=g, dtype=torch.float64)
    pad = torch.zeros(1, 7, 3, dtype=torch.float64)
    P = torch.cat([torch.cat([p, pad], 1), other])
    Q = torch.cat([torch.cat([q, pad], 1), other + 0.1])
    W = torch.cat([torch.cat([w, torch.zeros(1, 7, dtype=torch.float64)], 1), torch.ones(1, 25)])
    batched = weighted_procrustes(P, Q, W)
    torch.testing.assert_close(batched[0], alone[0], atol=1e-12, rtol=0)
    # minimal motion: the source's principal direction (as H v) turned onto the partners' line
    # by a rotation about their common perpendicular
    R = alone[0, :3, :3]
    H = (q - q.mean(1)).transpose(1, 2) @ (p - p.mean(1)) / 18
    U, _, Vh = torch.linalg.svd(H[0])
    u, v = U[:, 0], Vh[0]
    # (to the line's thickness: u and v are the directions of H less its thin part)
    torch.testing.assert_close(R @ v, u, atol=1e-6, rtol=0)
    axis = torch.linalg.cross(v, u)
    torch.testing.assert_close(R @ axis, axis, atol=1e-6, rtol=0)


def test_damped_unit_vectors_are_exact_above_eps_and_bounded_below() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(damped_unit_vectors(x, 1e-6), x / x.norm(dim=-1, keepdim=True))
    assert torch.autograd.gradcheck(lambda v: damped_unit_vectors(v, 1e-9), (x.requires_grad_(),))
    tiny = (x.detach() * 1e-12).requires_grad_()
    (
        damped_unit_vectors(tiny, 1e-6) * torch.randn(5, 3, generator=g, dtype=torch.float64)
    ).sum().backward()
    assert tiny.grad is not None and tiny.grad.norm(dim=-1).max() <= 3 / (2 * 1e-6)


@pytest.mark.parametrize("case", ["collinear", "planar", "duplicated", "single_point"])
def test_procrustes_gradients_are_finite_on_degenerate_input(case: str) -> None:
    g = torch.Generator().manual_seed(2)
    n = 20
    if case == "collinear":
        p = torch.linspace(0, 1, n, dtype=torch.float64)[:, None] * torch.tensor(
            [1.0, 2.0, 3.0], dtype=torch.float64
        )
    elif case == "planar":
        p = torch.cat(
            [
                torch.rand(n, 2, generator=g, dtype=torch.float64),
                torch.zeros(n, 1, dtype=torch.float64),
            ],
            1,
        )
    elif case == "duplicated":
        p = torch.ones(n, 3, dtype=torch.float64)
    else:
        p = torch.rand(1, 3, generator=g, dtype=torch.float64).expand(n, 3).clone()
    q = p.clone() + 0.1
    p = p[None].requires_grad_(True)
    q = q[None].requires_grad_(True)
    w = torch.ones(1, n, dtype=torch.float64, requires_grad=True)
    T = weighted_procrustes(p, q, w)
    assert torch.isfinite(T).all()
    (T * torch.randn(T.shape, generator=g, dtype=torch.float64)).sum().backward()
    for grad in (p.grad, q.grad, w.grad):
        assert grad is not None and torch.isfinite(grad).all()
    # The translation is still right where it is determined (the point set maps to q).
    torch.testing.assert_close(
        transform_points(p.detach(), T.detach()), q.detach(), atol=1e-9, rtol=0
    )


def test_centred_step_reads_the_metric_centre_factor_not_its_name() -> None:
    """A metric registered under another name but linearised like the symmetric one (its
    ``centre_factor`` 2) must get the same update: the solver reads the attribute, so a new
    metric needs no solver edit (it used to test ``metric.name == "symmetric"``)."""

    class Renamed(Symmetric):
        name = "symmetric_under_another_name"

    g = torch.Generator().manual_seed(3)
    p = torch.randn(1, 40, 3, generator=g, dtype=torch.float64) + 3.0  # centre away from 0
    q = p + 0.05 * torch.randn(1, 40, 3, generator=g, dtype=torch.float64)
    n_p = unit_vectors(torch.randn(1, 40, 3, generator=g, dtype=torch.float64))
    n_q = unit_vectors(n_p + 0.1 * torch.randn(1, 40, 3, generator=g, dtype=torch.float64))
    corr = Correspondences(q, n_q, torch.ones(1, 40, dtype=torch.bool), (p - q).norm(dim=-1))
    w = torch.ones(1, 40, dtype=torch.float64)
    renamed = Renamed()
    assert renamed.name != "symmetric" and renamed.centre_factor == 2.0
    expected = gauss_newton_update(METRICS["symmetric"], p, n_p, corr, w)[0]
    torch.testing.assert_close(gauss_newton_update(renamed, p, n_p, corr, w)[0], expected)


@pytest.mark.parametrize("dependence", [1e-5, 3e-5])
def test_an_ill_conditioned_direction_takes_no_step_on_either_path(dependence: float) -> None:
    # Six Jacobian columns of which the last is the first to `dependence`: the Jacobi-scaled
    # normal matrix has a smallest eigenvalue ~dependence^2 / 3 (4e-11, 3e-10), above
    # eps^(3/4) = 1.8e-12 but below rank_tolerance (1.5e-8) in float64. Gauss-Newton would
    # step ~1 / dependence along it (fuzz case 2350: 1,700 times the cloud's size, and the
    # compiled and PyTorch summation orders 1.8e-2 of it apart); now it is a null direction.
    g = torch.Generator().manual_seed(0)
    J = torch.randn(40, 6, generator=g, dtype=torch.float64)
    J[:, 5] = J[:, 0] + dependence * torch.randn(40, generator=g, dtype=torch.float64)
    r = torch.randn(40, generator=g, dtype=torch.float64)
    A, b = J.T @ J, J.T @ r
    root = A.diagonal().sqrt()
    smallest = torch.linalg.eigvalsh(A / (root[:, None] * root[None, :]))[0]
    assert 10 * torch.finfo(A.dtype).eps ** 0.75 < smallest < rank_tolerance(2.0**-52) / 10
    step, usable = solve_normal_equations(A[None], b[None])
    assert bool(usable[0])
    weak = torch.linalg.eigh(A / (root[:, None] * root[None, :]))[1][:, 0] / root
    weak = weak / weak.norm()
    # Without the float64 bound the step along `weak` is ~1e4 here; with it, rounding only.
    assert float((step[0] @ weak).abs()) < 1e-6 * float(step[0].norm())
    assert float(step[0].norm()) < 10.0
    x = torch.full((6,), float("nan"), dtype=torch.float64).numpy()
    assert compiled_solve_normal_equations(A.numpy(), b.numpy(), x)
    torch.testing.assert_close(torch.from_numpy(x), step[0], rtol=0, atol=1e-10)


def test_rank_tolerance_is_the_rounding_bound_in_float32_and_stricter_in_float64() -> None:
    eps32, eps64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps
    assert rank_tolerance(eps32) == eps32**0.75
    assert eps64**0.75 < rank_tolerance(eps64) == eps64**0.5
