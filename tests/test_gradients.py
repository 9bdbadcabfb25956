"""Gradients through ICP: gradcheck (float64) and finite differences on a larger pair."""

from __future__ import annotations

import itertools

import pytest
import torch

import difficp
from difficp.geometry import se3_exp

from conftest import METRIC_SOLVER_COMBOS as COMBOS
from conftest import make_pair

REJECTIONS = {
    "soft_distance": {"max_distance": 0.3, "rejection": "soft", "rejection_temperature": 0.05},
    "soft_normal": {"max_normal_angle": 60.0, "rejection": "soft", "rejection_temperature": 0.2},
}


def _small_pair(n: int = 12) -> dict:
    return make_pair(11, n=n, angle=8, translation=0.05, resample=False)


@pytest.mark.parametrize(
    ("combo", "rejection"), list(itertools.product(COMBOS, REJECTIONS)), ids=lambda v: str(v)
)
def test_gradcheck_source_init_temperature(combo: tuple[str, str], rejection: str) -> None:
    metric, solver = combo
    p = _small_pair()
    source = p["source"].clone().requires_grad_(True)
    twist = torch.tensor(
        [0.01, -0.02, 0.015, 0.01, 0.0, -0.01], dtype=torch.float64, requires_grad=True
    )
    temperature = torch.tensor(0.02, dtype=torch.float64, requires_grad=True)

    def fn(src: torch.Tensor, xi: torch.Tensor, temp: torch.Tensor) -> torch.Tensor:
        cfg = difficp.ICPConfig(
            correspondence="soft",
            temperature=temp,
            metric=metric,
            solver=solver,
            max_iterations=3,
            relative_fitness=0.0,
            relative_rmse=0.0,
            lm_steps=1,
            **REJECTIONS[rejection],
        )
        result = difficp.icp(
            src,
            p["target"],
            init=se3_exp(xi),
            source_normals=p["source_normals"],
            target_normals=p["target_normals"],
            config=cfg,
        )
        return result.transform[:3, :]

    assert torch.autograd.gradcheck(
        fn, (source, twist, temperature), eps=1e-6, atol=1e-5, rtol=1e-4
    )


def test_gradcheck_target_normals_and_thresholds() -> None:
    p = _small_pair()
    target = p["target"].clone().requires_grad_(True)
    normals = p["target_normals"].clone().requires_grad_(True)
    max_distance = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    angle = torch.tensor(60.0, dtype=torch.float64, requires_grad=True)

    def fn(tgt, tn, md, ang):
        cfg = difficp.ICPConfig(
            correspondence="soft",
            temperature=0.02,
            metric="symmetric",
            solver="linear",
            max_distance=md,
            max_normal_angle=ang,
            rejection="soft",
            rejection_temperature=0.1,
            max_iterations=3,
            relative_fitness=0.0,
            relative_rmse=0.0,
        )
        result = difficp.icp(
            p["source"], tgt, source_normals=p["source_normals"], target_normals=tn, config=cfg
        )
        return result.transform[:3, :]

    assert torch.autograd.gradcheck(
        fn, (target, normals, max_distance, angle), eps=1e-6, atol=1e-5, rtol=1e-4
    )


@pytest.mark.parametrize("metric", ["point_to_point", "point_to_plane"])
def test_finite_difference_spot_check_1000_points(metric: str) -> None:
    # A 1000-point pair: gradcheck would need 3000 evaluations, so check random directions.
    p = make_pair(12, n=1000, angle=10, translation=0.1, noise=0.002, resample=False)
    cfg = difficp.ICPConfig(
        correspondence="soft",
        temperature=1e-3,
        soft_k=16,
        metric=metric,
        max_distance=0.2,
        rejection="soft",
        rejection_temperature=0.02,
        max_iterations=5,
        relative_fitness=0.0,
        relative_rmse=0.0,
    )
    weights = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def loss(src: torch.Tensor) -> torch.Tensor:
        T = difficp.icp(src, p["target"], target_normals=p["target_normals"], config=cfg).transform
        return (T[:3] * weights).sum()

    source = p["source"].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(source), source)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        direction = torch.randn(source.shape, dtype=torch.float64, generator=g)
        h = 1e-6
        with torch.no_grad():
            numeric = (loss(p["source"] + h * direction) - loss(p["source"] - h * direction)) / (
                2 * h
            )
        analytic = (grad * direction).sum()
        assert torch.isclose(analytic, numeric, rtol=1e-4, atol=1e-7), (analytic, numeric)


def test_gradient_through_hard_nearest_reaches_target_points() -> None:
    # Hard correspondences: the choice is discrete but the chosen targets' coordinates carry
    # gradient; moving the whole target by d moves the solved translation by d.
    p = make_pair(13, n=200, angle=5, translation=0.05, resample=False)
    target = p["target"].clone().requires_grad_(True)
    result = difficp.icp(p["source"], target, max_iterations=50)
    result.transform[0, 3].backward()
    assert torch.isclose(target.grad[:, 0].sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-6)


def test_differentiation_none_builds_no_graph() -> None:
    p = _small_pair()
    src = p["source"].clone().requires_grad_(True)
    result = difficp.icp(src, p["target"], differentiation="none")
    assert not result.transform.requires_grad


@pytest.mark.parametrize(
    "options",
    [
        {"metric": "point_to_point", "solver": "svd"},
        {"metric": "point_to_plane", "solver": "linear", "max_distance": 0.3, "rejection": "soft"},
        {
            "metric": "symmetric",
            "solver": "lm",
            "max_normal_angle": 60.0,
            "rejection": "soft",
            "rejection_temperature": 0.2,
        },
    ],
    ids=["p2p-svd", "p2plane-linear-softdist", "sym-lm-softnormal"],
)
def test_implicit_gradient_matches_unrolled_at_convergence(options: dict) -> None:
    p = make_pair(14, n=30, angle=8, translation=0.05, resample=False)
    temperature = torch.tensor(0.01, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = {}
    for mode in ("unroll", "implicit"):
        src = p["source"].clone().requires_grad_(True)
        result = difficp.icp(
            src,
            p["target"],
            source_normals=p["source_normals"],
            target_normals=p["target_normals"],
            correspondence="soft",
            temperature=temperature,
            max_iterations=120,
            relative_fitness=0.0,
            relative_rmse=1e-15,
            differentiation=mode,
            **options,
        )
        loss = (result.transform[:3] * weights).sum()
        grads[mode] = torch.autograd.grad(loss, (src, temperature))
    for unrolled, implicit in zip(grads["unroll"], grads["implicit"], strict=True):
        rel = (unrolled - implicit).norm() / unrolled.norm()
        assert rel < 1e-3, rel
