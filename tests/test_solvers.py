"""Solvers: the LU solve's gradient, weighted Procrustes, and finite gradients on degenerate input."""

from __future__ import annotations

import pytest
import torch

from difficp.geometry import make_transform, random_rotation, transform_points
from difficp.solvers import lu_solve, weighted_procrustes


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
