"""Every metric x solver recovers known transforms on synthetic pairs (partial overlap, noise,
outliers)."""

from __future__ import annotations

import pytest
import torch

import difficp
from difficp.geometry import invert_transform, rotation_angle_deg

from conftest import METRIC_SOLVER_COMBOS as COMBOS
from conftest import make_pair


def _errors(result: difficp.ICPResult, truth: torch.Tensor) -> tuple[float, float]:
    E = invert_transform(truth.double()) @ result.transform.double()
    return float(rotation_angle_deg(E[..., :3, :3])), float(E[..., :3, 3].norm())


@pytest.mark.parametrize(("metric", "solver"), COMBOS)
@pytest.mark.parametrize("seed", [0, 1])
def test_recovers_truth_with_noise_partial_overlap_and_outliers(
    metric: str, solver: str, seed: int
) -> None:
    # Target = moved source, 70% of each kept (different caps, 40% shared), sigma = 0.005 noise
    # on both (radius ~1), 10% uniform outliers. The pure noise error of a least-squares fit
    # over ~1000 inliers is ~ sigma / sqrt(N) ~ 2e-4 (0.01 deg); what dominates is the crop
    # boundary, where points of one cloud pair with the other's edge within max_distance
    # (measured worst case over 4 seeds: 0.12 deg, 0.0008). We allow 0.3 deg and 0.003:
    # 30x below the 10 deg / 0.1 initial error, and well above the boundary effect.
    p = make_pair(
        seed,
        n=3000,
        angle=10,
        translation=0.1,
        noise=0.005,
        overlap=0.7,
        outliers=0.1,
        resample=False,
    )
    result = difficp.icp(
        p["source"],
        p["target"],
        source_normals=p["source_normals"],
        target_normals=p["target_normals"],
        metric=metric,
        solver=solver,
        max_distance=0.05,
        max_iterations=100,
    )
    rot, trans = _errors(result, p["transform"])
    assert rot < 0.3, rot
    assert trans < 0.003, trans
    assert result.fitness > 0.5


@pytest.mark.parametrize(("metric", "solver"), COMBOS)
def test_recovers_truth_from_independent_samples(metric: str, solver: str) -> None:
    # Independent samples of one surface (spacing ~0.07): point-to-point is biased by the
    # sampling (it pulls points onto the other cloud's samples, ~0.5 deg here), the plane-based
    # metrics are not. Tolerances: 1.5 deg / 0.01 for point-to-point, 0.1 deg / 0.001 otherwise.
    p = make_pair(3, n=3000, angle=10, translation=0.1)
    result = difficp.icp(
        p["source"],
        p["target"],
        source_normals=p["source_normals"],
        target_normals=p["target_normals"],
        metric=metric,
        solver=solver,
        max_distance=0.2,
        max_iterations=100,
    )
    rot, trans = _errors(result, p["transform"])
    rot_tol, trans_tol = (1.5, 0.01) if metric == "point_to_point" else (0.1, 0.001)
    assert rot < rot_tol and trans < trans_tol, (rot, trans)
    assert bool(result.converged)


@pytest.mark.parametrize("kernel", ["huber", "cauchy", "geman_mcclure", "tukey"])
def test_robust_kernels_resist_outliers_without_rejection(kernel: str) -> None:
    # 30% gross outliers and no distance rejection: plain least squares is dragged off, a
    # robust kernel (scale ~ 3 x noise) is not.
    p = make_pair(5, n=2000, angle=5, translation=0.05, noise=0.002, outliers=0.3, resample=False)
    args = (p["source"], p["target"])
    kw = {"target_normals": p["target_normals"], "metric": "point_to_plane", "max_iterations": 60}
    plain = _errors(difficp.icp(*args, **kw), p["transform"])
    robust = _errors(
        difficp.icp(*args, robust_kernel=kernel, kernel_scale=0.01, **kw), p["transform"]
    )
    assert robust[0] < 0.2 and robust[1] < 0.005, robust
    assert robust[1] < plain[1]


def test_weighting_options_recover_truth() -> None:
    p = make_pair(6, n=2000, angle=10, translation=0.1, noise=0.003, overlap=0.8, resample=False)
    result = difficp.icp(
        p["source"],
        p["target"],
        source_normals=p["source_normals"],
        target_normals=p["target_normals"],
        metric="point_to_plane",
        max_distance=0.15,
        weight_distance=True,
        weight_normal=True,
        max_normal_angle=45.0,
        max_iterations=60,
    )
    rot, trans = _errors(result, p["transform"])
    assert rot < 0.2 and trans < 0.005, (rot, trans)


def test_float32_default_dtype_recovers_truth() -> None:
    p = make_pair(7, n=2000, angle=10, translation=0.1, resample=False, dtype=torch.float32)
    result = difficp.icp(p["source"], p["target"], max_distance=0.2)
    assert result.transform.dtype == torch.float32
    rot, trans = _errors(result, p["transform"])
    assert rot < 0.01 and trans < 1e-4, (rot, trans)
