"""The compiled fast path (difficp.fused) computes what the PyTorch reference path computes.

Whole runs: ``search_backend="compiled"`` against ``"kdtree"`` (the reference steps) for every
option the fast path supports, on float64 input (same transforms to rounding, same fitness,
iterations and convergence) and float32 input. Pieces: the compiled per-pair solves against the
PyTorch functions they replace. Dispatch: what ``"compiled"`` refuses and when ``"auto"`` falls
back to the reference path (gradients).
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable

import hypothesis.strategies as st
import numpy as np
import pytest
import roma
import torch
from hypothesis import HealthCheck, given, settings

import difficp
from difficp import fused
from difficp.config import ICPConfig
from difficp.geometry import (
    depth_to_points,
    make_transform,
    points_to_pixels,
    random_rotation,
    transform_points,
    twist_to_transform,
)
from difficp.inputs import prepare_problem
from difficp.loop import compiled_small_rigid_step, small_rigid_step
from difficp.metrics import METRICS, Symmetric, get_metric
from difficp.solvers import (
    _step_to_transform,
    regularize,
    solve_normal_equations,
    weighted_procrustes,
)
from difficp.strategies.compiled import compile_twin as compile_twin_uncached
from difficp.strategies.correspondences import CORRESPONDENCES
from difficp.strategies.kernels import KERNELS
from difficp.strategies.rejection import REJECTIONS
from difficp.strategies.solvers import SOLVERS

from conftest import METRIC_SOLVER_COMBOS, make_pair

FUSED_COMBOS = [(metric, solver) for metric, solver in METRIC_SOLVER_COMBOS if solver != "lm"]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@functools.cache
def compile_twin(twin: Callable) -> Callable:
    """One compiled function per twin for the whole module: hypothesis runs each test body up to
    60 times, and compiling a twin costs ~1 s (it was ~10 CPU-minutes of the suite)."""
    return compile_twin_uncached(twin)


# Every registered robust kernel (None is the unweighted case the other tests run).
KERNEL_NAMES = [name for name in KERNELS.names if name is not None]


def test_fused_combos_are_the_supported_ones() -> None:
    assert FUSED_COMBOS == [
        ("point_to_point", "svd"),
        ("point_to_point", "linear"),
        ("point_to_plane", "linear"),
        ("symmetric", "linear"),
    ]


def _no_express(*args: object, **kwargs: object) -> None:
    return None


@pytest.fixture
def steps_used(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the step classes :func:`difficp.icp` ran, in call order (so a test can tell the
    fast path really ran instead of silently falling back). The express lane of single small
    pairs is off here, so that single pairs test :class:`~difficp.fused.FusedSteps` itself
    (``tests/test_express.py`` checks that the lane gives its results bit for bit)."""
    monkeypatch.setattr(importlib.import_module("difficp.express"), "express_icp", _no_express)
    module = importlib.import_module("difficp.registration")
    original = module.run_loop
    used: list[str] = []

    def spy(steps, init, config, *args, **kwargs):
        used.append(type(steps).__name__)
        return original(steps, init, config, *args, **kwargs)

    monkeypatch.setattr(module, "run_loop", spy)
    return used


def _pair(seed: int = 0, dtype: torch.dtype = torch.float64, **kwargs) -> dict:
    # 1500 points, 80% kept: 1200 source points, more than one CHUNK of the fused kernel.
    options = {
        "n": 1500,
        "angle": 10,
        "translation": 0.1,
        "noise": 0.003,
        "overlap": 0.8,
        "outliers": 0.05,
        **kwargs,
    }
    return make_pair(seed, dtype=dtype, **options)


def _run(p: dict, backend: str, **options) -> difficp.ICPResult:
    return difficp.icp(
        p["source"],
        p["target"],
        source_normals=p["source_normals"],
        target_normals=p["target_normals"],
        search_backend=backend,
        **options,
    )


def _assert_same(fast: difficp.ICPResult, ref: difficp.ICPResult) -> None:
    assert fast.transform.dtype == ref.transform.dtype
    torch.testing.assert_close(fast.transform, ref.transform, atol=1e-9, rtol=0)
    assert torch.equal(fast.fitness, ref.fitness)
    torch.testing.assert_close(fast.inlier_rmse, ref.inlier_rmse, atol=1e-9, rtol=0)
    assert torch.equal(fast.iterations, ref.iterations)
    assert torch.equal(fast.converged, ref.converged)
    if ref.rmse_history is None:
        assert fast.rmse_history is None
    else:
        assert fast.rmse_history is not None
        assert fast.rmse_history.shape == ref.rmse_history.shape
        torch.testing.assert_close(fast.rmse_history, ref.rmse_history, atol=1e-9, rtol=0)


def _compare(p: dict, steps_used: list[str], **options) -> difficp.ICPResult:
    fast = _run(p, "compiled", **options)
    ref = _run(p, "kdtree", **options)
    assert steps_used == ["FusedSteps", "ReferenceSteps"]
    _assert_same(fast, ref)
    # Not a trivial run: the pair moved and was registered.
    assert (fast.iterations >= 2).all()
    return fast


# ---------------------------------------------------------------------------------------------
# Whole runs, float64
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("metric", "solver"), FUSED_COMBOS)
@pytest.mark.parametrize("max_distance", [None, 0.1])
def test_every_metric_and_solver_matches_reference(
    steps_used: list[str], metric: str, solver: str, max_distance: float | None
) -> None:
    result = _compare(_pair(1), steps_used, metric=metric, solver=solver, max_distance=max_distance)
    assert float(result.fitness) > 0.5


def _paint(points: torch.Tensor) -> torch.Tensor:
    """A smooth RGB texture in [0.1, 0.9] of positions ``(..., 3)`` (metric "colored")."""
    phase = torch.tensor([0.0, 1.0, 2.0], dtype=points.dtype)
    x, y, z = points[..., :1], points[..., 1:2], points[..., 2:]
    return 0.5 + 0.4 * torch.sin(4 * x + 3 * y - 2 * z + phase)


@pytest.mark.parametrize("serial_points", [10**9, 0], ids=["serial-loop", "parallel-iterations"])
@pytest.mark.parametrize("metric", [m.name for m in METRICS if m.fused_reason is None])
def test_every_compiled_metric_matches_reference_on_a_padded_batch(
    monkeypatch: pytest.MonkeyPatch, steps_used: list[str], metric: str, serial_points: int
) -> None:
    # Every metric with compiled twins (the registry's, with the inputs it needs: GICP's
    # covariances, colored's colours) on a padded batch of two pairs, through the serial whole
    # loop and through the lock-step parallel iterations.
    monkeypatch.setattr(fused, "SERIAL_POINTS", serial_points)
    pairs = [_pair(11, n=900), _pair(12, n=700)]

    def stack(rows: list[torch.Tensor]) -> torch.Tensor:  # padded to the longest
        size = max(len(r) for r in rows)
        return torch.stack([torch.nn.functional.pad(r, (0, 0, 0, size - len(r))) for r in rows])

    def side(key: str) -> list[torch.Tensor]:
        return [q[key] for q in pairs]

    inputs = {
        "source_lengths": torch.tensor([len(r) for r in side("source")]),
        "target_lengths": torch.tensor([len(r) for r in side("target")]),
        "source_normals": stack(side("source_normals")),
        "target_normals": stack(side("target_normals")),
    }
    if METRICS[metric].needs_colors:
        # both sides painted on the surface as it was before the target was moved
        inputs["source_colors"] = stack([_paint(r) for r in side("source")])
        inputs["target_colors"] = stack(
            [_paint(transform_points(q["target"], q["transform"].inverse())) for q in pairs]
        )
    options = {"metric": metric, "max_distance": 0.1, "return_history": True}
    runs = [
        difficp.icp(stack(side("source")), stack(side("target")), search_backend=backend,
                    **inputs, **options)
        for backend in ("compiled", "kdtree")
    ]  # fmt: skip
    assert steps_used == ["FusedSteps", "ReferenceSteps"]
    _assert_same(*runs)
    assert (runs[0].iterations >= 2).all() and (runs[0].fitness > 0.5).all()


OPTION_CASES = {
    "hard-distance": {"max_distance": 0.05},
    "soft-distance": {"max_distance": 0.05, "rejection": "soft", "rejection_temperature": 0.01},
    "hard-angle": {"max_distance": 0.1, "max_normal_angle": 30.0},
    "soft-angle": {"max_normal_angle": 30.0, "rejection": "soft", "rejection_temperature": 0.1},
    "soft-distance-and-angle": {
        "max_distance": 0.05,
        "max_normal_angle": 45.0,
        "rejection": "soft",
        "rejection_temperature": 0.02,
    },
    "weight-distance": {"max_distance": 0.1, "weight_distance": True},
    "weight-distance-soft": {"max_distance": 0.1, "weight_distance": True, "rejection": "soft"},
    "weight-normal": {"weight_normal": True},
    "everything": {
        "max_distance": 0.1,
        "max_normal_angle": 60.0,
        "weight_distance": True,
        "weight_normal": True,
        "robust_kernel": "huber",
        "kernel_scale": 0.01,
    },
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
@pytest.mark.parametrize(
    ("metric", "solver"), [("point_to_point", "svd"), ("point_to_plane", "linear")]
)
def test_rejection_and_weighting_match_reference(
    steps_used: list[str], case: str, metric: str, solver: str
) -> None:
    _compare(_pair(2), steps_used, metric=metric, solver=solver, **OPTION_CASES[case])


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize(("metric", "solver"), FUSED_COMBOS)
def test_robust_kernels_match_reference(
    steps_used: list[str], kernel: str, metric: str, solver: str
) -> None:
    # No distance rejection: the kernel alone down-weights the outliers (and, for tukey, drops
    # the residuals beyond the scale).
    _compare(
        _pair(3, angle=5, translation=0.05, outliers=0.2),
        steps_used,
        metric=metric,
        solver=solver,
        robust_kernel=kernel,
        kernel_scale=0.05,
    )


def _pad(clouds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(c) for c in clouds)
    # Padding in among the points: a leak into the search or the sums would show.
    g = torch.Generator().manual_seed(n)
    out = (torch.rand(len(clouds), n, 3, generator=g, dtype=torch.float64) * 2.4 - 1.2).to(
        clouds[0].dtype
    )
    for i, c in enumerate(clouds):
        out[i, : len(c)] = c
    return out, torch.tensor([len(c) for c in clouds])


def _padded_batch(pairs: list[dict]) -> dict:
    src, src_len = _pad([p["source"] for p in pairs])
    tgt, tgt_len = _pad([p["target"] for p in pairs])
    return {
        "source": src,
        "target": tgt,
        "source_lengths": src_len,
        "target_lengths": tgt_len,
        "source_normals": _pad([p["source_normals"] for p in pairs])[0],
        "target_normals": _pad([p["target_normals"] for p in pairs])[0],
    }


@pytest.mark.parametrize(
    "options",
    [
        {"metric": "point_to_point", "max_distance": 0.1},
        {"metric": "point_to_plane", "max_distance": 0.1, "rejection": "soft"},
        {"metric": "symmetric", "max_normal_angle": 45.0, "robust_kernel": "cauchy"},
    ],
    ids=["p2p-svd", "p2plane-soft", "symmetric-angle-cauchy"],
)
def test_padded_batch_matches_reference(steps_used: list[str], options: dict) -> None:
    # Different sizes on both sides (some above, some below one CHUNK) and different inits.
    pairs = [_pair(10 + i, n=n) for i, n in enumerate([1500, 500, 1300])]
    batch = _padded_batch(pairs)
    g = torch.Generator().manual_seed(0)
    init = make_transform(
        random_rotation(3, max_angle_deg=3, generator=g, dtype=torch.float64),
        0.02 * torch.randn(3, 3, generator=g, dtype=torch.float64),
    )
    results = []
    for backend in ("compiled", "kdtree"):
        results.append(
            difficp.icp(
                batch["source"],
                batch["target"],
                init,
                batch["source_lengths"],
                batch["target_lengths"],
                batch["source_normals"],
                batch["target_normals"],
                search_backend=backend,
                max_iterations=40,
                **options,
            )
        )
    assert steps_used == ["FusedSteps", "ReferenceSteps"]
    _assert_same(*results)
    assert results[0].transform.shape == (3, 4, 4)
    assert (results[0].iterations >= 2).all()


@pytest.mark.parametrize(("metric", "solver"), FUSED_COMBOS)
def test_pair_losing_all_correspondences_next_to_a_normal_one(
    steps_used: list[str], metric: str, solver: str
) -> None:
    p = _pair(4)
    far = {key: torch.stack([v, v]) for key, v in p.items() if key != "transform"}
    far["target"][1] += 10.0  # nothing of pair 1 is within max_distance
    results = [
        difficp.icp(
            far["source"],
            far["target"],
            source_normals=far["source_normals"],
            target_normals=far["target_normals"],
            metric=metric,
            solver=solver,
            max_distance=0.1,
            search_backend=backend,
        )
        for backend in ("compiled", "kdtree")
    ]
    assert steps_used == ["FusedSteps", "ReferenceSteps"]
    _assert_same(*results)
    fast = results[0]
    assert float(fast.fitness[0]) > 0.5 and int(fast.iterations[0]) >= 2
    assert not bool(fast.converged[1]) and int(fast.iterations[1]) == 0
    assert float(fast.fitness[1]) == 0.0 and float(fast.inlier_rmse[1]) == 0.0
    assert torch.equal(fast.transform[1], torch.eye(4, dtype=torch.float64))


def test_single_pair_with_tiny_max_distance_has_no_correspondence(steps_used: list[str]) -> None:
    p = _pair(5)  # independent samples: no source point is within 1e-6 of a target point
    fast, ref = (_run(p, backend, max_distance=1e-6) for backend in ("compiled", "kdtree"))
    assert steps_used == ["FusedSteps", "ReferenceSteps"]
    _assert_same(fast, ref)
    assert float(fast.fitness) == 0.0 and int(fast.iterations) == 0
    assert torch.equal(fast.transform, torch.eye(4, dtype=torch.float64))


@pytest.mark.parametrize("solver", ["svd", "linear"])
@pytest.mark.parametrize("matched", [2, 3, 4, 5])
def test_pairs_with_few_correspondences_match_reference(
    steps_used: list[str], solver: str, matched: int
) -> None:
    # Only `matched` source points are within max_distance of the target: a pair needs 3
    # weighted correspondences to take a step (MIN_CORRESPONDENCES), on both paths.
    p = make_pair(20, n=600, angle=5, translation=0.05)
    g = torch.Generator().manual_seed(matched)
    near = p["target"][:matched] + 0.01 * torch.randn(matched, 3, generator=g, dtype=torch.float64)
    source = torch.cat([near, torch.full((3, 3), 5.0, dtype=torch.float64)])
    fast, ref = (
        difficp.icp(source, p["target"], max_distance=0.1, solver=solver, search_backend=backend)
        for backend in ("compiled", "kdtree")
    )
    assert steps_used == ["FusedSteps", "ReferenceSteps"]
    _assert_same(fast, ref)
    assert (int(fast.iterations) == 0) == (matched < 3)


def test_planar_scene_point_to_plane_matches_reference() -> None:
    # A plane under point_to_plane leaves three directions unconstrained; the regularisation
    # must keep rounding noise out of them (it once stepped 3.5 units sideways here), so both
    # paths take the same, near minimum-norm, steps.
    # Two samples of the unit square, the target tilted by 3 degrees and moved.
    g = torch.Generator().manual_seed(0)
    flat = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    source = torch.rand(1500, 3, generator=g, dtype=torch.float64) * flat
    target = torch.rand(1500, 3, generator=g, dtype=torch.float64) * flat
    T = make_transform(
        random_rotation(max_angle_deg=3, generator=g, dtype=torch.float64),
        torch.tensor([0.01, 0.02, 0.03], dtype=torch.float64),
    )
    target = target @ T[:3, :3].T + T[:3, 3]
    normals = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand(1500, 3) @ T[:3, :3].T
    fast, ref = (
        difficp.icp(
            source,
            target,
            target_normals=normals,
            metric="point_to_plane",
            max_distance=0.1,
            search_backend=backend,
        )
        for backend in ("compiled", "kdtree")
    )
    torch.testing.assert_close(fast.transform, ref.transform, atol=1e-6, rtol=0)


def test_early_stopping_and_history_match_reference(steps_used: list[str]) -> None:
    p = _pair(6)
    options = {"metric": "point_to_plane", "max_distance": 0.1, "max_iterations": 60}
    default = _compare(p, steps_used, return_history=True, **options)
    # The default criteria (relative_fitness = relative_rmse = 1e-6) stop before the cap ...
    assert bool(default.converged) and int(default.iterations) < 60
    assert default.rmse_history is not None
    assert default.rmse_history.shape == (int(default.iterations) + 1,)
    # ... and looser ones stop earlier, at the same iteration on both paths.
    steps_used.clear()
    loose = _compare(
        p, steps_used, relative_fitness=1e-2, relative_rmse=1e-3, return_history=True, **options
    )
    assert bool(loose.converged) and int(loose.iterations) < int(default.iterations)
    # Without return_history, no history on either path.
    steps_used.clear()
    assert _compare(p, steps_used, **options).rmse_history is None


@pytest.mark.parametrize("metric", ["point_to_point", "point_to_plane"])
def test_small_step_rule_stops_at_the_first_small_step_on_both_paths(
    steps_used: list[str], metric: str
) -> None:
    # small_gicp's rule alone (Open3D's criteria off: a change is never below 0).
    p = _pair(6)
    translation, rotation = 1e-3, math.radians(0.1)  # the option is in degrees
    options = {
        "metric": metric,
        "max_distance": 0.1,
        "max_iterations": 60,
        "relative_fitness": 0.0,
        "relative_rmse": 0.0,
    }
    rule = {"translation_tolerance": translation, "rotation_tolerance": 0.1}
    result = _compare(p, steps_used, **options, **rule)
    k = int(result.iterations)
    assert bool(result.converged) and k < 60
    # The step that stopped it was small and the one before was not: the transforms after k-1
    # and k-2 iterations (capped runs) give the last two updates.
    before = [
        _run(p, "kdtree", **{**options, "max_iterations": i}).transform for i in (k - 2, k - 1)
    ]
    steps_used.clear()
    last, previous = (
        result.transform @ torch.linalg.inv(before[1]),
        before[1] @ torch.linalg.inv(before[0]),
    )

    def small(update: torch.Tensor) -> bool:
        angle = math.acos(min(1.0, (float(update[:3, :3].trace()) - 1) / 2))
        return float(update[:3, 3].norm()) < translation and angle < rotation

    assert small(last) and not small(previous)
    # Either tolerance alone is checked alone; the rule stops earlier than Open3D's default.
    open3d = _run(p, "kdtree", metric=metric, max_distance=0.1, max_iterations=60)
    assert k < int(open3d.iterations)
    only_rotation = _run(p, "compiled", **options, rotation_tolerance=0.1)
    assert int(only_rotation.iterations) <= k


@given(
    log_angle=st.floats(-12.0, math.log10(math.pi)),
    log_shift=st.floats(-9.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
@SETTINGS
def test_small_rigid_step_twins_agree_and_read_the_angle_at_any_size(
    log_angle: float, log_shift: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    angle, shift = 10.0**log_angle, 10.0**log_shift
    axis = torch.nn.functional.normalize(torch.randn(3, generator=g, dtype=torch.float64), dim=0)
    direction = torch.nn.functional.normalize(
        torch.randn(3, generator=g, dtype=torch.float64), dim=0
    )
    update = make_transform(roma.rotvec_to_rotmat(angle * axis), shift * direction)[None]
    # bounds 1% either side of the step's own size: small only when both are above it
    for t_scale, r_scale in ((1.01, 1.01), (0.99, 1.01), (1.01, 0.99)):
        translation, rotation = t_scale * shift, r_scale * angle
        expected = t_scale > 1 and r_scale > 1
        torch_says = bool(small_rigid_step(update, torch.tensor([translation]), rotation)[0])
        compiled = compile_twin(compiled_small_rigid_step)
        compiled_says = bool(compiled(update[0].numpy(), translation, rotation))
        assert torch_says == compiled_says == expected


def test_small_step_tolerances_are_validated_and_refused_by_nonrigid_icp() -> None:
    with pytest.raises(ValueError, match="translation_tolerance must be >= 0"):
        difficp.ICPConfig(translation_tolerance=-1e-3)
    with pytest.raises(ValueError, match="rotation_tolerance"):
        difficp.ICPConfig(rotation_tolerance=float("nan"))
    points = torch.rand(50, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="non-rigid ICP"):
        difficp.nonrigid.nonrigid_icp(points, points, model="rigid", translation_tolerance=1e-3)


def test_max_iterations_cap_matches_reference(steps_used: list[str]) -> None:
    # Point-to-point crawls: 5 iterations stop it unconverged, on both paths.
    result = _compare(_pair(7), steps_used, max_iterations=5, return_history=True)
    assert int(result.iterations) == 5 and not bool(result.converged)


# ---------------------------------------------------------------------------------------------
# Whole runs, float32
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("metric", "solver"), FUSED_COMBOS)
def test_float32_input_matches_reference(steps_used: list[str], metric: str, solver: str) -> None:
    # The fast path works in float64 and returns float32; the reference runs in float32. They
    # differ by float32 rounding (measured ~1e-6 on the transform), far below 1e-4.
    p = _pair(8, dtype=torch.float32)
    fast = _run(p, "compiled", metric=metric, solver=solver, max_distance=0.1)
    ref = _run(p, "kdtree", metric=metric, solver=solver, max_distance=0.1)
    assert steps_used == ["FusedSteps", "ReferenceSteps"]
    assert fast.transform.dtype == ref.transform.dtype == torch.float32
    assert fast.fitness.dtype == fast.inlier_rmse.dtype == torch.float32
    torch.testing.assert_close(fast.transform, ref.transform, atol=1e-4, rtol=0)
    n = p["source"].shape[0]
    assert abs(float(fast.fitness) - float(ref.fitness)) <= 2 / n
    torch.testing.assert_close(fast.inlier_rmse, ref.inlier_rmse, atol=1e-5, rtol=0)
    assert bool(fast.converged) == bool(ref.converged)
    assert float(fast.fitness) > 0.5


# ---------------------------------------------------------------------------------------------
# The compiled per-pair solves against the PyTorch functions they replace
# ---------------------------------------------------------------------------------------------


def _normal_system(seed: int, rows: int, scale: float, skew: bool) -> tuple[np.ndarray, ...]:
    """``A = J^T W J``, ``g = J^T W r`` of ``rows`` random residual rows, and the rank of A."""
    rng = np.random.default_rng(seed)
    J = rng.normal(size=(rows, 6)) * scale
    if skew:  # very different column scales, as for points far from the origin
        J *= 10.0 ** rng.uniform(-3, 3, size=6)
    if rows and rng.random() < 0.3:  # duplicated rows
        J = J[rng.integers(0, rows, size=rows)]
    w = rng.uniform(0.1, 2, size=rows)
    r = rng.normal(size=rows)
    rank = np.linalg.matrix_rank(J * np.sqrt(w)[:, None]) if rows else 0
    return J.T @ (w[:, None] * J), J.T @ (w * r), rank


@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.one_of(st.just(0), st.integers(1, 5), st.integers(6, 40)),
    scale=st.sampled_from([1e-6, 1.0, 1e3]),
    skew=st.booleans(),
)
@SETTINGS
def test_solve_regularized_matches_solve_normal_equations(
    seed: int, rows: int, scale: float, skew: bool
) -> None:
    # rows 0: all-zero system; 1-5: rank-deficient; 6+: SPD (unless rows were duplicated).
    A, g, rank = _normal_system(seed, rows, scale, skew)
    x = np.full(6, np.nan)
    usable = bool(fused._solve_regularized(A, g, x))
    step, ref_usable = solve_normal_equations(torch.from_numpy(A)[None], torch.from_numpy(g)[None])
    ref, ref_usable = step[0].numpy(), bool(ref_usable[0])
    if not usable:
        assert (x == 0).all()
    if rows == 0:
        assert not usable and not ref_usable
        return
    A_reg = regularize(torch.from_numpy(A)[None])[0][0].numpy()
    if rank == 6 and np.linalg.cond(A) < 1e12:
        assert usable and ref_usable
    # Both solve the same regularised system (rank-deficient ones with the stronger jitter).
    if usable and ref_usable:
        size = np.linalg.norm(A_reg, 2) * (np.linalg.norm(x) + np.linalg.norm(ref))
        size += np.linalg.norm(g)
        assert np.linalg.norm(A_reg @ (x - ref)) <= 1e-10 * size
        assert np.linalg.norm(A_reg @ x + g) <= 1e-10 * size
    if np.linalg.cond(A_reg) < 1e6:
        np.testing.assert_allclose(x, ref, rtol=0, atol=1e-8 * np.linalg.norm(ref))


twists = st.lists(st.floats(-4.0, 4.0), min_size=6, max_size=6)


COMPILED_METRICS = [m.name for m in METRICS if getattr(m, "fused_reason", None) is None]


@pytest.mark.parametrize("metric", COMPILED_METRICS)
@given(twist=twists, scale=st.sampled_from([10.0, 1.0, 1e-3, 1e-9, 1e-13, 0.0]))
@SETTINGS
def test_compiled_step_to_transform_matches_metric(
    metric: str, twist: list[float], scale: float
) -> None:
    # scale 1e-13 and 0 take the symmetric metric's small-angle branch (|a| <= 1e-12).
    step = np.array(twist) * np.array([scale] * 3 + [1.0] * 3)
    out = np.eye(4)
    compile_twin(METRICS[metric].compiled_step_to_transform)(step, out)
    expected = METRICS[metric].step_to_transform(torch.from_numpy(step)[None])[0].numpy()
    # roma's rotation vector -> matrix is off by a few 1e-13 at angles ~1e-6 (Rodrigues is not).
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12 * (1 + np.abs(step).max()))


@pytest.mark.parametrize("metric", COMPILED_METRICS)
@given(seed=st.integers(0, 2**32 - 1))
@SETTINGS
def test_compiled_twins_match_metric_residuals_and_normal_equations(metric: str, seed: int) -> None:
    # One correspondence through the metric's twins against its residuals / jacobian on the
    # same points centred on c (as the solvers centre them), weighted by w.
    rng = np.random.default_rng(seed)
    p, q, c = rng.normal(size=(3, 3))
    m, n = (v / np.linalg.norm(v) for v in rng.normal(size=(2, 3)))
    w = float(rng.random())
    d = float(np.linalg.norm(p - q))
    # the combined covariance of metric "gicp": symmetric positive definite
    F = rng.normal(size=(3, 3))
    C = F @ F.T + 0.1 * np.eye(3)
    extras = C[np.triu_indices(3)]
    # the colour features of metric "colored" (s I_p; sqrt(lambda), s I_q, s d_q) in their place
    source_f, partner_f = rng.random(1), np.concatenate([rng.random(2), rng.normal(size=3)])
    if METRICS[metric].needs_colors:
        extras = np.concatenate([source_f, partner_f])
    v = tuple(float(x) for x in (*(p - q), *(p - c), *(q - c), *m, *n, *extras))
    r = compile_twin(METRICS[metric].compiled_residual)(d, v)
    sums, J = np.zeros((2, 40)), np.full(6, np.nan)
    compile_twin(METRICS[metric].compiled_accumulate)(sums, 1, 5, J, w, v)
    corr = difficp.Correspondences(
        torch.from_numpy(q - c)[None, None],
        torch.from_numpy(n)[None, None],
        torch.ones(1, 1, dtype=torch.bool),
        torch.tensor([[d]], dtype=torch.float64),
        torch.from_numpy(C)[None, None],
        torch.from_numpy(partner_f)[None, None],
        torch.from_numpy(source_f)[None, None],
    )
    source, normals = torch.from_numpy(p - c)[None, None], torch.from_numpy(m)[None, None]
    ref_r = METRICS[metric].residuals(source, normals, corr)[0, 0].numpy()
    ref_J = METRICS[metric].jacobian(source, normals, corr)[0, 0].numpy()
    A, g = w * ref_J.T @ ref_J, w * ref_J.T @ ref_r
    np.testing.assert_allclose(r, np.linalg.norm(ref_r) if len(ref_r) > 1 else ref_r[0], atol=1e-12)
    np.testing.assert_allclose(sums[1, 5:26], A[np.triu_indices(6)], rtol=0, atol=1e-12)
    np.testing.assert_allclose(sums[1, 26:32], g, rtol=0, atol=1e-12)
    assert not sums[0].any() and not sums[1, :5].any() and not sums[1, 32:].any()


@pytest.mark.parametrize("kernel", KERNELS.names)
@given(r=st.floats(0.0, 1e3), k=st.sampled_from([1e-3, 0.05, 1.0, 1e3]))
@SETTINGS
def test_compiled_kernel_weight_matches_torch(kernel: str | None, r: float, k: float) -> None:
    compiled = compile_twin(KERNELS[kernel].compiled_weight)(r, k)
    r64, k64 = (torch.tensor(v, dtype=torch.float64) for v in ([r], k))
    expected = KERNELS[kernel].weight(r64, k64)
    np.testing.assert_allclose(compiled, expected.item(), rtol=1e-15, atol=0)


@pytest.mark.parametrize("rejection", REJECTIONS.names)
@given(margin=st.floats(-1e3, 1e3), temperature=st.sampled_from([1e-3, 0.01, 1.0]))
@SETTINGS
def test_compiled_keep_matches_torch(rejection: str, margin: float, temperature: float) -> None:
    compiled = compile_twin(REJECTIONS[rejection].compiled_keep)(margin, temperature)
    expected = REJECTIONS[rejection].keep(torch.tensor([margin], dtype=torch.float64), temperature)
    np.testing.assert_allclose(compiled, expected.item(), rtol=1e-14, atol=1e-300)


def _config_using(registry: str, name: str | None) -> dict:
    """Options that select strategy ``name`` of ``registry`` (and what it requires)."""
    options: dict = {registry: name}
    if registry == "solver" and SOLVERS[name].metrics is not None:
        options["metric"] = SOLVERS[name].metrics[0]
    if registry == "rejection":
        options["max_distance"] = 0.1
    return options


@pytest.mark.parametrize(
    ("registry", "name"),
    [("correspondence", n) for n in CORRESPONDENCES.names]
    + [("rejection", n) for n in REJECTIONS.names]
    + [("robust_kernel", n) for n in KERNELS.names]
    + [("metric", n) for n in METRICS.names]
    + [("solver", n) for n in SOLVERS.names],
)
def test_every_strategy_has_a_compiled_twin_or_a_reason(registry: str, name: str | None) -> None:
    # A new strategy must either bring its compiled twin (the fused kernel dispatches to it by
    # registry code) or say, through fused_supported, why the compiled path refuses it.
    strategy = {
        "correspondence": CORRESPONDENCES,
        "rejection": REJECTIONS,
        "robust_kernel": KERNELS,
        "metric": METRICS,
        "solver": SOLVERS,
    }[registry][name]
    reason = getattr(strategy, "fused_reason", None)
    # A correspondence's twin is the search the fused kernel runs for it (nearest: the KD forest
    # of difficp.kdtree; projective: its pixel choice); the kernel has no slot for a new one, so
    # a new correspondence needs a fused_reason until the kernel gets its twin.
    correspondence_twins = {"nearest": [], "projective": ["compiled_pixel"]}
    if registry == "correspondence" and reason is None:
        assert name in correspondence_twins, (
            f"correspondence {name!r}: no compiled twin and no fused_reason"
        )
    twins = {
        "correspondence": correspondence_twins.get(name, []),
        "rejection": ["compiled_keep"],
        "robust_kernel": ["compiled_weight"],
        "metric": ["compiled_residual", "compiled_accumulate", "compiled_step_to_transform"],
        "solver": ["compiled_sums"],
    }[registry]
    if reason is not None:
        config = ICPConfig(**_config_using(registry, name))
        if name == "projective":
            K = torch.tensor([[5.0, 0, 4], [0, 5, 4], [0, 0, 1]], dtype=torch.float64)
            points = torch.rand(50, 3, dtype=torch.float64) * 0.1 + torch.tensor([0, 0, 1.0])
            depth = torch.ones(8, 8, dtype=torch.float64)
            problem = prepare_problem(points, depth, config, intrinsics=K)
        else:
            p = make_pair(0, n=50)
            colors = {}
            if config.needs_colors:  # metric "colored"
                g = torch.Generator().manual_seed(0)
                colors = {
                    f"{side}_colors": torch.rand(len(p[side]), 3, generator=g, dtype=torch.float64)
                    for side in ("source", "target")
                }
            problem = prepare_problem(
                p["source"], p["target"], config,
                source_normals=p["source_normals"], target_normals=p["target_normals"], **colors,
            )  # fmt: skip
        assert fused.fused_supported(problem, config) == reason
        return
    missing = [t for t in twins if getattr(strategy, t, None) is None]
    assert not missing, f"{registry} {name!r} has no {missing} and no fused_reason"
    if registry == "solver":
        assert strategy.compiled_sums in ("moments", "normal_equations")


def _moments(p: np.ndarray, q: np.ndarray, w: np.ndarray, c: np.ndarray) -> np.ndarray:
    """The 18 Procrustes moments of the fused kernel about ``c`` (two-pass): the weight, the
    weighted means of ``p - c`` and ``q - c``, their weighted co-moment and spreads."""
    a, b = p - c, q - c
    total = w.sum()
    ma, mb = w @ a / max(total, 1e-300), w @ b / max(total, 1e-300)
    co = np.einsum("n,ni,nj->ij", w, b - mb, a - ma).reshape(9)
    spreads = [w @ ((a - ma) ** 2).sum(1), w @ ((b - mb) ** 2).sum(1)]
    return np.concatenate([[total], ma, mb, co, spreads])


@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 40),
    tasks=st.integers(1, 5),
    dominant=st.booleans(),
)
@SETTINGS
def test_one_pass_moments_merged_over_tasks_equal_two_pass_moments(
    seed: int, n: int, tasks: int, dominant: bool
) -> None:
    # The kernel adds points one at a time into per-task rows, then merges the rows; the result
    # must be the two-pass moments, also when one partner carries nearly all the weight far
    # from the centre (the case raw sums w q p^T got wrong by 1e-5 of the scale: fuzz case 8642).
    rng = np.random.default_rng(seed)
    p, q = rng.normal(size=(n, 3)) * 50 + 200, rng.normal(size=(n, 3)) * 50 - 100
    w = rng.uniform(0, 1, size=n)
    w[rng.random(n) < 0.2] = 0.0
    if dominant:
        w *= 1e-9
        w[0] = 1.0
    task_of = rng.integers(0, tasks, size=n)
    rows = np.zeros((tasks, fused.SUM_WIDTH))
    for i in range(n):
        v = (0.0, 0.0, 0.0, *p[i], *q[i])
        fused._add_moments(rows, int(task_of[i]), float(w[i]), v)
    merged = np.empty((1, fused.SUM_WIDTH))
    fused._merge_task_sums(rows, tasks, 1, merged)
    got = merged[0, fused.MOMENTS : fused.MOMENTS + fused.MOMENT_WIDTH]
    want = _moments(p, q, w, np.zeros(3))
    scale = float(np.abs(want).max()) if w.sum() > 0 else 1.0
    np.testing.assert_allclose(got[:7], want[:7], rtol=1e-12, atol=1e-12 * scale)
    # The co-moment to 1e-12 of the spread it measures, not of the means' product (1e-22 of
    # that: raw sums were off by ~1e-16 of it).
    spread = float(w @ ((p - want[1:4]) ** 2).sum(1) + w @ ((q - want[4:7]) ** 2).sum(1))
    product = w.sum() * float(np.abs(p).max() * np.abs(q).max())
    np.testing.assert_allclose(got[7:16], want[7:16], rtol=0, atol=1e-12 * spread + 1e-22 * product)
    # The spreads (the Procrustes rounding bound's) likewise.
    np.testing.assert_allclose(got[16:], want[16:], rtol=0, atol=1e-12 * spread + 1e-22 * product)


def _assert_rotation(R: np.ndarray) -> None:
    np.testing.assert_allclose(R @ R.T, np.eye(3), rtol=0, atol=1e-12)
    assert abs(np.linalg.det(R) - 1) < 1e-12


def _unique_procrustes(H: np.ndarray, scale: float = 0.0) -> bool:
    """Whether the proper rotation maximising ``trace(R^T H)`` is unique and well conditioned
    (relative to ``H``'s rounding error, ~eps ``scale``): rank >= 2, and the smallest singular
    value distinct when it is flipped."""
    s = np.linalg.svd(H, compute_uv=False)
    tol = 1e-6 * max(s[0], scale)
    if s[0] == 0 or s[1] < tol:
        return False
    return bool(np.linalg.det(H) > 0 or s[1] - s[2] > tol)


@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 30),
    shape=st.sampled_from(["general", "reflected", "planar", "collinear", "single"]),
    zero_weights=st.booleans(),
)
@SETTINGS
def test_procrustes_update_matches_weighted_procrustes(
    seed: int, n: int, shape: str, zero_weights: bool
) -> None:
    rng = np.random.default_rng(seed)
    p = rng.normal(size=(n, 3)) + rng.normal(size=3) * 5
    if shape == "planar":
        p[:, 2] = 1.0
    elif shape == "collinear":
        p = p[:1] + rng.normal(size=(n, 1)) * rng.normal(size=3)
    elif shape == "single":
        p = np.repeat(p[:1], n, axis=0)
    R = roma.rotvec_to_rotmat(torch.from_numpy(rng.normal(size=3))).numpy()
    q = p @ R.T + rng.normal(size=3) + 0.05 * rng.normal(size=(n, 3))
    if shape == "reflected":  # the best orthogonal map is a reflection: det fix needed
        q = q * np.array([-1.0, 1.0, 1.0])
    w = rng.uniform(0.1, 2.0, size=n)
    if zero_weights and n > 1:
        w[rng.random(n) < 0.3] = 0.0
        w[0] = 1.0
    c = p.mean(0) + rng.normal(size=3)  # the kernel's centre: near, not at, the centroid
    out = np.eye(4)
    fused._procrustes_update(_moments(p, q, w, c), c, out)
    ref = weighted_procrustes(
        torch.from_numpy(p)[None], torch.from_numpy(q)[None], torch.from_numpy(w)[None]
    )[0].numpy()
    _assert_rotation(out[:3, :3])
    np.testing.assert_array_equal(out[3], [0, 0, 0, 1])

    def cost(T: np.ndarray) -> float:
        return float(w @ ((p @ T[:3, :3].T + T[:3, 3] - q) ** 2).sum(1))

    # Always as good a fit as the reference; the same transform where the fit is unique.
    scale = float(w @ (q**2).sum(1)) + float(w @ (p**2).sum(1))
    assert cost(out) <= cost(ref) + 1e-10 * scale
    pm, qm = w @ p / w.sum(), w @ q / w.sum()
    H = ((q - qm) * w[:, None]).T @ (p - pm) / w.sum()
    moment_scale = float(w @ ((p - c) ** 2).sum(1) + w @ ((q - c) ** 2).sum(1)) / w.sum()
    if _unique_procrustes(H, moment_scale):
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-8 * (1 + np.abs(ref).max()))


@given(
    seed=st.integers(0, 2**32 - 1),
    rank=st.integers(0, 3),
    reflect=st.booleans(),
)
@SETTINGS
def test_procrustes_update_on_raw_matrices_matches_special_procrustes(
    seed: int, rank: int, reflect: bool
) -> None:
    # Moments with zero means and cross-covariance M: the rotation is special_procrustes(M)
    # (what weighted_procrustes uses) and the translation c - R c.
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    V, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    s = np.sort(rng.uniform(0.1, 3.0, size=3))[::-1] * (np.arange(3) < rank)
    M = U @ np.diag(s) @ V.T
    if reflect != (np.linalg.det(M) < 0):
        M[:, 0] = -M[:, 0]
    c = rng.normal(size=3) * 3
    out = np.eye(4)
    # spreads 0.25 + 0.25: a unit spread in the rounding bound
    moments = np.concatenate([[1.0], np.zeros(6), M.reshape(9), [0.25, 0.25]])
    fused._procrustes_update(moments, c, out)
    R = roma.special_procrustes(torch.from_numpy(M)[None], method="svd")[0].numpy()
    _assert_rotation(out[:3, :3])
    np.testing.assert_allclose(out[:3, 3], c - out[:3, :3] @ c, rtol=0, atol=1e-12)
    # The objective trace(R^T M) is maximal for both; where its maximiser is unique, the same R.
    assert np.trace(out[:3, :3].T @ M) >= np.trace(R.T @ M) - 1e-12 * (1 + s.sum())
    if _unique_procrustes(M):
        np.testing.assert_allclose(out[:3, :3], R, rtol=0, atol=1e-9)


@given(seed=st.integers(0, 2**32 - 1), metric=st.sampled_from(COMPILED_METRICS))
@SETTINGS
def test_solve_updates_from_sums_matches_reference(seed: int, metric: str) -> None:
    # The per-pair sums as the kernel lays them out (upper triangle of A row by row, then g),
    # for a batch with an all-zero pair; each update must equal the reference solve + metric.
    rng = np.random.default_rng(seed)
    B = 3
    sums = np.zeros((B, fused.SUM_WIDTH))
    systems = [_normal_system(int(rng.integers(2**32)), rows, 1.0, False) for rows in (20, 0, 4)]
    for b, (A, g, _) in enumerate(systems):
        sums[b, fused.NORMAL_EQ : fused.NORMAL_EQ + 21] = A[np.triu_indices(6)]
        sums[b, fused.NORMAL_EQ + 21 : fused.NORMAL_EQ + 27] = g
    center = rng.normal(size=(B, 3))
    # The sums are centred on `center`; pair 0 rotates about the world origin (Open3D's step),
    # pair 1 (no system) and 2 about the center.
    far = np.array([False, True, True])
    out = np.full((B, 4, 4), np.nan)
    fused._solve_updates(sums, center, far, METRICS.code(metric), 0, out)
    A = torch.from_numpy(np.stack([s[0] for s in systems]))
    g = torch.from_numpy(np.stack([s[1] for s in systems]))
    step, usable = solve_normal_equations(A, g)
    assert usable[:2].tolist() == [True, False]
    expected = _step_to_transform(
        get_metric(metric), step, torch.from_numpy(center), torch.from_numpy(far)
    ).numpy()
    np.testing.assert_allclose(out[:2], expected[:2], rtol=0, atol=1e-10)
    # Pair 0 in world coordinates: the step of the uncentred system (same least squares).
    to_transform = Symmetric().step_to_transform if metric == "symmetric" else twist_to_transform
    k = 2.0 if metric == "symmetric" else 1.0
    world = step[0].clone()
    world[3:] -= k * torch.linalg.cross(world[:3], torch.from_numpy(center[0]))
    np.testing.assert_allclose(out[0], to_transform(world[None])[0].numpy(), rtol=0, atol=1e-10)
    np.testing.assert_array_equal(out[1], np.eye(4))
    # Pair 2 is rank-deficient: its step is rounding noise in the null space (see above).
    np.testing.assert_array_equal(out[2, 3], [0, 0, 0, 1])
    _assert_rotation(out[2, :3, :3])

    # Procrustes moments (point_to_point + svd) of random point sets, one pair per row.
    sums = np.zeros((B, fused.SUM_WIDTH))
    ps, qs, ws = rng.normal(size=(B, 50, 3)), rng.normal(size=(B, 50, 3)), rng.random((B, 50))
    qs = ps @ roma.rotvec_to_rotmat(torch.from_numpy(rng.normal(size=3))).numpy().T + 0.1 * qs
    for b in range(B):
        sums[b, fused.MOMENTS : fused.MOMENTS + fused.MOMENT_WIDTH] = _moments(
            ps[b], qs[b], ws[b], center[b]
        )
    fused._solve_updates(sums, center, far, 0, 1, out)
    expected = weighted_procrustes(*(torch.from_numpy(v) for v in (ps, qs, ws))).numpy()
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Dispatch: what "compiled" refuses, when "auto" falls back, and gradients
# ---------------------------------------------------------------------------------------------


def _small_pair() -> dict:
    # Target = moved (noisy) source: ICP reaches an exact fixed point in a few iterations.
    return make_pair(9, n=400, angle=5, translation=0.05, noise=0.002, resample=False)


@pytest.mark.parametrize(
    "options",
    [
        {"correspondence": "soft", "temperature": 1e-3, "soft_k": 8},
        {"correspondence": "soft", "temperature": 1e-3},
        {"solver": "lm"},
        {"metric": "point_to_plane", "solver": "lm"},
        {"weight_distance": True},  # without max_distance
    ],
    ids=["soft-k", "soft-dense", "lm", "p2plane-lm", "weight-distance-no-max"],
)
def test_compiled_refuses_what_it_does_not_compute(options: dict, steps_used: list[str]) -> None:
    p = _small_pair()
    with pytest.raises(ValueError, match="search_backend='compiled'"):
        _run(p, "compiled", **options)
    # "auto" runs the reference path instead, and gives the reference result.
    auto = _run(p, "auto", **options)
    ref = _run(p, "kdtree", **options)
    assert steps_used == ["ReferenceSteps", "ReferenceSteps"]
    torch.testing.assert_close(auto.transform, ref.transform, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# Projective correspondences to depth maps
# ---------------------------------------------------------------------------------------------

_K = torch.tensor([[70.0, 0, 39.5], [0, 70.0, 29.5], [0, 0, 1]], dtype=torch.float64)


def _depth_pair(seed: int = 0, batch: int | None = None) -> dict:
    """A wavy 60 x 80 depth map with a hole and an edge, and its points seen from a camera moved
    by a small random motion (so some fall outside the image or onto the hole)."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(
        torch.arange(60, dtype=torch.float64), torch.arange(80, dtype=torch.float64), indexing="ij"
    )
    depth = 1.5 + 0.2 * torch.sin(cols / 9.0 + seed) + 0.15 * torch.cos(rows / 7.0)
    depth[:6, :8] = 0.0  # invalid pixels (no depth, and no normal around them)
    depth[30:, 50:] += 0.3  # a step: partners across it are far
    points = depth_to_points(depth[None], _K[None])[0][depth > 0]
    twist = (torch.rand(6, generator=g, dtype=torch.float64) - 0.5) * 0.06
    source = transform_points(points, twist_to_transform(twist))
    source = source + 0.002 * torch.randn(source.shape, generator=g, dtype=torch.float64)
    normals = difficp.estimate_normals(source, k=8)
    if batch is None:
        return {"source": source, "depth": depth, "source_normals": normals}
    sources = [source[: len(source) - 500 * b] for b in range(batch)]  # padded batch
    lengths = torch.tensor([len(s) for s in sources])
    padded = torch.zeros(batch, len(source), 3, dtype=torch.float64)
    padded_normals = torch.zeros_like(padded)
    for b, s in enumerate(sources):
        padded[b, : len(s)] = s
        padded_normals[b, : len(s)] = normals[: len(s)]
    depths = torch.stack([depth * (1 + 0.01 * b) for b in range(batch)])
    return {"source": padded, "depth": depths, "source_lengths": lengths,
            "source_normals": padded_normals}  # fmt: skip


def _run_depth(p: dict, backend: str, **options) -> difficp.ICPResult:
    p = dict(p)
    source, depth = p.pop("source"), p.pop("depth")
    return difficp.icp(
        source, depth, correspondence="projective", intrinsics=_K, search_backend=backend,
        **p, **options,
    )  # fmt: skip


def _compare_depth(p: dict, steps_used: list[str], **options) -> difficp.ICPResult:
    fast = _run_depth(p, "compiled", **options)
    ref = _run_depth(p, "kdtree", **options)
    assert steps_used == ["FusedProjectiveSteps", "ReferenceSteps"]
    _assert_same(fast, ref)
    assert (fast.iterations >= 2).all()
    return fast


@pytest.mark.parametrize(("metric", "solver"), FUSED_COMBOS)
@pytest.mark.parametrize("max_distance", [None, 0.05])
def test_projective_matches_reference(
    steps_used: list[str], metric: str, solver: str, max_distance: float | None
) -> None:
    result = _compare_depth(_depth_pair(1), steps_used, metric=metric, solver=solver,
                            max_distance=max_distance)  # fmt: skip
    assert float(result.fitness) > 0.5


PROJECTIVE_CASES = {
    "soft-distance": {"max_distance": 0.03, "rejection": "soft", "rejection_temperature": 0.01},
    "hard-angle": {"max_distance": 0.1, "max_normal_angle": 20.0},
    "weights": {"max_distance": 0.1, "weight_distance": True, "weight_normal": True},
    "huber": {"metric": "point_to_plane", "robust_kernel": "huber", "kernel_scale": 0.005},
    "tukey-symmetric": {"metric": "symmetric", "robust_kernel": "tukey", "kernel_scale": 0.02},
}


@pytest.mark.parametrize("case", list(PROJECTIVE_CASES))
def test_projective_options_match_reference(steps_used: list[str], case: str) -> None:
    options = dict(PROJECTIVE_CASES[case])
    metric = options.get("metric", "point_to_plane")
    _compare_depth(_depth_pair(2), steps_used, **{"metric": metric, **options})


def test_projective_padded_batch_with_target_pose_matches_reference(steps_used: list[str]) -> None:
    p = _depth_pair(3, batch=2)
    pose = twist_to_transform(torch.tensor([0.1, -0.05, 0.02, 0.3, -0.2, 0.1], dtype=torch.float64))
    # The target camera elsewhere in the world: the source must be moved there too.
    p["source"] = transform_points(p["source"], pose)
    result = _compare_depth(p, steps_used, metric="point_to_plane", max_distance=0.05,
                            target_pose=pose, init=pose.expand(2, 4, 4).clone())  # fmt: skip
    assert result.transform.shape == (2, 4, 4)


def test_projective_auto_uses_the_fast_path_only_without_gradients(steps_used: list[str]) -> None:
    p = _depth_pair(4)
    plain = _run_depth(p, "auto", metric="point_to_plane")
    p["source"] = p["source"].clone().requires_grad_(True)
    with_grad = _run_depth(p, "auto", metric="point_to_plane")
    assert steps_used == ["FusedProjectiveSteps", "ReferenceSteps"]
    _assert_same(plain, with_grad.to(torch.float64))


def test_projective_implicit_gradient_with_fused_forward_matches_reference(
    steps_used: list[str],
) -> None:
    p = _depth_pair(5)
    weights = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    grads = {}
    for backend in ("auto", "kdtree"):
        source = p["source"].clone().requires_grad_(True)
        depth = p["depth"].clone().requires_grad_(True)
        result = difficp.icp(
            source, depth, correspondence="projective", intrinsics=_K, search_backend=backend,
            metric="point_to_plane", max_distance=0.05, differentiation="implicit",
            max_iterations=100, relative_fitness=1e-9, relative_rmse=1e-12,
        )  # fmt: skip
        assert bool(result.converged)
        loss = (result.transform[:3] * weights).sum()
        grads[backend] = torch.autograd.grad(loss, (source, depth))
    # The forward ran on the fast path, the implicit step on the reference.
    assert steps_used == ["FusedProjectiveSteps", "ReferenceSteps"]
    for fast, ref in zip(grads["auto"], grads["kdtree"], strict=True):
        assert torch.isfinite(fast).all() and float(fast.abs().sum()) > 0
        torch.testing.assert_close(fast, ref, atol=1e-7 * max(float(ref.abs().max()), 1.0), rtol=0)


@given(
    point=st.tuples(
        st.floats(-3, 3), st.floats(-3, 3), st.sampled_from([-1.0, 0.0, 1e-300, 0.5, 2.0])
    ),
    tie=st.booleans(),
)
@SETTINGS
def test_compiled_pixel_picks_the_reference_pixel(point: tuple, tie: bool) -> None:
    # The twin, plain and compiled, against the reference's pixel choice, ties included.
    x, y, z = point
    fx, fy, cx, cy, h, w = 10.0, 10.0, 3.5, 2.0, 6, 8
    if tie and z > 0:  # land exactly on a half pixel (torch.round: ties to even)
        x = (round((fx * x / z + cx) - 0.5) + 0.5 - cx) * z / fx
    K = torch.tensor([[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]], dtype=torch.float64)
    flat = torch.tensor([[[x, y, z]]], dtype=torch.float64)
    uv, depth = points_to_pixels(flat, K)
    col, row = torch.round(uv[0, 0, 0]), torch.round(uv[0, 0, 1])
    inside = bool(depth[0, 0] > 0) and 0 <= col <= w - 1 and 0 <= row <= h - 1
    expected = int(row) * w + int(col) if inside else -1
    twin = CORRESPONDENCES["projective"].compiled_pixel
    assert twin(x, y, z, fx, fy, cx, cy, h, w) == expected
    assert fused._pixel(x, y, z, fx, fy, cx, cy, h, w) == expected


@pytest.mark.parametrize("needs_grad", ["source", "target", "init", "max_distance"])
def test_compiled_refuses_unrolled_gradients(needs_grad: str) -> None:
    p = _small_pair()
    args = {
        "source": p["source"],
        "target": p["target"],
        "init": torch.eye(4, dtype=torch.float64),
        "max_distance": torch.tensor(0.1, dtype=torch.float64),
    }
    args[needs_grad] = args[needs_grad].clone().requires_grad_(True)
    with pytest.raises(ValueError, match=r"search_backend='compiled'.*gradient"):
        difficp.icp(
            args["source"],
            args["target"],
            args["init"],
            max_distance=args["max_distance"],
            search_backend="compiled",
        )
    # Without the gradient (or with differentiation="none") the same call runs.
    difficp.icp(
        args["source"],
        args["target"],
        args["init"],
        max_distance=args["max_distance"],
        differentiation="none",
        search_backend="compiled",
    )


def test_compiled_with_differentiation_none_ignores_requires_grad(steps_used: list[str]) -> None:
    p = _small_pair()
    source = p["source"].clone().requires_grad_(True)
    fast = difficp.icp(source, p["target"], differentiation="none", search_backend="compiled")
    ref = difficp.icp(p["source"], p["target"], search_backend="kdtree")
    assert steps_used == ["FusedSteps", "ReferenceSteps"]
    assert not fast.transform.requires_grad
    _assert_same(fast, ref)


@pytest.mark.parametrize(("metric", "solver"), FUSED_COMBOS)
def test_auto_uses_the_fast_path_only_without_gradients(
    steps_used: list[str], metric: str, solver: str
) -> None:
    p = _small_pair()
    options = {"metric": metric, "solver": solver, "max_distance": 0.1, "max_iterations": 20}
    weights = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    plain = _run(p, "auto", **options)
    assert steps_used == ["FusedSteps"]
    grads = {}
    for backend in ("auto", "kdtree"):
        source = p["source"].clone().requires_grad_(True)
        result = difficp.icp(
            source,
            p["target"],
            source_normals=p["source_normals"],
            target_normals=p["target_normals"],
            search_backend=backend,
            **options,
        )
        loss = (result.transform[:3] * weights).sum()
        (grads[backend],) = torch.autograd.grad(loss, source)
        _assert_same(plain, result.to(torch.float64))  # same forward either way
    # With a gradient needed, "auto" fell back to the reference path: the same gradient.
    assert steps_used == ["FusedSteps", "ReferenceSteps", "ReferenceSteps"]
    assert grads["auto"] is not None and grads["auto"].abs().sum() > 0
    torch.testing.assert_close(grads["auto"], grads["kdtree"], atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "options",
    [
        {"metric": "point_to_point", "solver": "svd", "max_distance": 0.1},
        {"metric": "point_to_plane", "max_distance": 0.1, "rejection": "soft"},
        {"metric": "symmetric", "max_normal_angle": 45.0, "robust_kernel": "huber"},
    ],
    ids=["p2p-svd", "p2plane-soft", "symmetric-angle-huber"],
)
@pytest.mark.parametrize("backend", ["auto", "compiled"])
def test_implicit_gradient_with_fused_forward_matches_reference(
    steps_used: list[str], options: dict, backend: str
) -> None:
    p = _small_pair()
    weights = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    grads = {}
    for name in (backend, "kdtree"):
        source = p["source"].clone().requires_grad_(True)
        target = p["target"].clone().requires_grad_(True)
        temperature = torch.tensor(0.02, dtype=torch.float64, requires_grad=True)
        result = difficp.icp(
            source,
            target,
            source_normals=p["source_normals"],
            target_normals=p["target_normals"],
            search_backend=name,
            differentiation="implicit",
            rejection_temperature=temperature,
            max_iterations=100,
            relative_fitness=1e-9,
            relative_rmse=1e-12,
            **options,
        )
        assert bool(result.converged)
        loss = (result.transform[:3] * weights).sum()
        grads[name] = torch.autograd.grad(loss, (source, target, temperature), allow_unused=True)
    # The forward ran on the fast path, the implicit step on the reference.
    assert steps_used == ["FusedSteps", "ReferenceSteps"]
    for fast, ref in zip(grads[backend], grads["kdtree"], strict=True):
        if ref is None:
            assert fast is None
            continue
        assert fast is not None and torch.isfinite(fast).all()
        scale = float(ref.abs().max())
        torch.testing.assert_close(fast, ref, atol=1e-7 * max(scale, 1.0), rtol=0)
    assert float(grads[backend][0].abs().sum()) > 0


def test_fast_path_keeps_the_callers_torch_thread_count() -> None:
    # Starting numba's OpenMP pool once reset PyTorch's (shared) OpenMP thread count to all
    # cores, silently undoing torch.set_num_threads(1) on a shared machine.
    before = torch.get_num_threads()
    p = _pair(3)
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            difficp.icp(p["source"], p["target"], max_distance=0.1, search_backend="compiled")
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


_FORKED_WORKERS = """
import torch, difficp
from torch.utils.data import DataLoader, Dataset

class Pairs(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        source = torch.rand(2000, 3, generator=g)
        return difficp.icp(source, source + 0.01, max_distance=0.1).transform[:3, 3]

source = torch.rand(2000, 3)
difficp.icp(source, source + 0.01, max_distance=0.1, search_backend="compiled")
loader = DataLoader(Pairs(), batch_size=1, num_workers=2, multiprocessing_context="fork")
print(torch.cat(list(loader)).tolist())
"""


def test_forked_workers_fall_back_to_the_pytorch_path() -> None:
    # numba's GNU OpenMP pool, once started in a parent, kills a forked child that runs
    # parallel code: DataLoader workers died. They must take the PyTorch path instead.
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _FORKED_WORKERS],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    translations = torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]))
    assert translations.shape == (4, 3)
    torch.testing.assert_close(translations, torch.full((4, 3), 0.01), atol=1e-5, rtol=0)
