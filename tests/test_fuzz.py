"""Seeded fuzz: the compiled fast path equals the PyTorch reference, and a padded batch equals
its pairs run alone, over random small problems with large random initial poses.

Tolerance: 1e-5 of the problem's coordinate scale (largest of the target's coordinates and the
init's translation). Both paths solve the same systems, and a batch the same per-pair systems,
but in a different summation order. Well-posed steps then agree to ~1e-13; ill-conditioned ones
(a few points with unrelated normals) amplify the rounding by their condition number.
Rank-deficient systems (every source point matched to one target point after a large offset)
have their null space regularised to a zero step (``difficp.solvers.regularize``); before that
they differed by 1e-4.
Before the fixes this test found errors of 1 to 30 units (pairs matching another pair's target,
an arbitrary rotation for coincident partners, subnormal weights counted on one path only).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import difficp
from difficp.geometry import make_transform, random_rotation

CASES = 300
# Cases beyond CASES that failed in longer runs of this fuzz, kept once fixed. 2350: a few source
# points on a few unrelated target planes after a large offset (point_to_plane, linear): a
# direction fixed ~10^5 times more weakly than the best, a Gauss-Newton step 1,700 times the
# cloud's size, and the two paths 1.8e-2 of the scale apart (difficp.solvers.rank_tolerance).
# 8642: soft rejection leaving one partner with nearly all the weight (point_to_point, svd): the
# fast path's raw one-pass moments w q p^T lost digits in H = E[q p^T] - E[q] E[p]^T, 1.2e-5 of
# the scale apart (now co-moments about running means, merged by Chan's rule: 1.7e-8).
FOUND_BY_LONGER_RUNS = (2350, 8642)
TOLERANCE = 1e-5
# Orders of the source points the exemption's probe tries (rounding by summation order).
ORDER_PROBES = 8
# The extended cases (every metric and weighting option; see _extended_case): in a longer run
# (cases 0-30,000) one was chaotic (below) and the worst other 9.3e-6 (case 27266, colored with
# soft rejection: its reference moves by 2.6e-5 under the exemption's 1e-12 probe).
EXTENDED_CASES = 300
EXTENDED_SEED_OFFSET = 10**6
# Cases that failed in longer runs and are chaotic, not bugs (see the test's exemption), per
# generator. Rigid 12033: one point-to-plane step of a 25-point pair far from a 17-point target
# with unrelated normals; the init probe moves the reference by 2.5e-4 (paths 2.8e-5 apart).
# Extended 10349: a 5-point pair far from its target, colored metric with colour gradients from
# 4 neighbours, Cauchy weights ~1e-5, Jacobi-scaled pivots ~2e-7: Gauss-Newton steps of ~240
# radians; the probe moves the reference by 2e-2 (paths 2.5e-2 apart).
# Rigid 109735 (session 12, cases 100,000-150,000): one pair of 6 source points 5-11 units from
# their partners, point-to-plane, Jacobi-scaled normal matrix with an eigenvalue of 1.8e-8 (LU
# pivot 1e-6, above the rank bound 1.5e-8): the weak direction's steps grow the inlier RMSE from
# ~10 to 5e5 in 3 iterations and are steered by rounding there; paths 4.3e-5 apart, the init
# probe moves the reference by 9e-6 but the order of the source points alone by up to 7e-5.
CHAOTIC_BY_LONGER_RUNS = (12033, 109735)
# Extended 149921 (cases 140,000-180,000): one 12-point pair, point-to-plane with Geman-McClure
# weights and normal weighting: paths 1.4e-5 apart, the reference alone moves by 2e-6 to 2.3e-5
# (median 9e-6) over twelve orders of its source points; three orders measured only 8e-6, hence
# ORDER_PROBES = 8.
EXTENDED_CHAOTIC_BY_LONGER_RUNS = (10349, 149921)
# Extended cases that failed in longer runs, kept once fixed. 55323: point_to_point / svd with
# soft rejection and Geman-McClure weights leaving nearly all the weight on two points: the
# cross-covariance's singular values (3.7e-8, 4.7e-13, 0) are a line to 1.3e-5, above the
# "collinear" bound; the fast path's rounding bound used the source's unweighted radius in place
# of the weighted spreads and called it collinear (minimal motion) where the reference solved
# the rotation: 0.26 of the scale apart (now the same bound from spread moments).
EXTENDED_FOUND_BY_LONGER_RUNS = (55323,)


def _case(seed: int) -> tuple[dict, dict, list[int], list[int]]:
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    B = int(rng.integers(1, 4))
    n = [int(rng.integers(5, 30)) for _ in range(B)]
    m = [int(rng.integers(5, 30)) for _ in range(B)]
    src = torch.zeros(B, max(n), 3, dtype=torch.float64)
    tgt = torch.zeros(B, max(m), 3, dtype=torch.float64)
    unit = torch.nn.functional.normalize
    src_n = unit(torch.randn(B, max(n), 3, generator=g, dtype=torch.float64), dim=-1)
    tgt_n = unit(torch.randn(B, max(m), 3, generator=g, dtype=torch.float64), dim=-1)
    for b in range(B):
        scale = 10 ** rng.uniform(-2, 2)
        s = torch.rand(n[b], 3, generator=g, dtype=torch.float64) * scale
        R = random_rotation(max_angle_deg=30, generator=g, dtype=torch.float64)
        t = torch.randn(3, generator=g, dtype=torch.float64) * 0.1 * scale
        picked = s[torch.randint(0, n[b], (m[b],), generator=g)]
        noise = 0.01 * scale * torch.randn(m[b], 3, generator=g, dtype=torch.float64)
        src[b, : n[b]] = s
        tgt[b, : m[b]] = picked @ R.T + t + noise
    # Large initial poses: any rotation, translations up to 100 units.
    init = make_transform(
        random_rotation(B, max_angle_deg=180, generator=g, dtype=torch.float64),
        torch.randn(B, 3, generator=g, dtype=torch.float64) * 10 ** rng.uniform(-1, 2),
    )
    metric = str(rng.choice(["point_to_point", "point_to_plane", "symmetric"]))
    solver = str(rng.choice(["svd", "linear"])) if metric == "point_to_point" else "linear"
    options: dict = {
        "metric": metric,
        "solver": solver,
        "max_iterations": int(rng.integers(1, 4)),
        "differentiation": "none",
    }
    kind = rng.random()
    if kind < 0.3:
        options["max_distance"] = float(rng.uniform(0.05, 2))
    elif kind < 0.5:
        options["max_distance"] = float(rng.uniform(0.05, 2))
        options["rejection"] = "soft"
        options["rejection_temperature"] = float(10 ** rng.uniform(-3, -1))
    if rng.random() < 0.3:
        options["robust_kernel"] = str(rng.choice(["huber", "cauchy", "tukey"]))
        options["kernel_scale"] = float(rng.uniform(0.1, 1))
    inputs = {
        "source": src,
        "target": tgt,
        "source_lengths": torch.tensor(n),
        "target_lengths": torch.tensor(m),
        "source_normals": src_n,
        "target_normals": tgt_n,
        "init": init,
    }
    return inputs, options, n, m


def _extended_case(seed: int) -> tuple[dict, dict, list[int], list[int]]:
    """:func:`_case`'s problem with the options it does not draw: every metric (``gicp`` with
    covariances from ``covariance_k`` neighbours, ``colored`` with random colours), distance and
    normal weighting, normal-angle rejection, relative criteria, the small-step rule and every
    robust kernel."""
    inputs, options, n, m = _case(seed)
    rng = np.random.default_rng(EXTENDED_SEED_OFFSET + seed)
    metric = str(rng.choice(["point_to_point", "point_to_plane", "symmetric", "gicp", "colored"]))
    options["metric"] = metric
    options["solver"] = (
        str(rng.choice(["svd", "linear"])) if metric == "point_to_point" else "linear"
    )
    options["max_iterations"] = int(rng.integers(1, 6))
    fewest = min(*n, *m)
    if metric == "gicp":
        options["covariance_k"] = int(rng.integers(3, fewest + 1))
    if metric == "colored":
        g = torch.Generator().manual_seed(seed)
        for side, count in (("source", max(n)), ("target", max(m))):
            inputs[f"{side}_colors"] = torch.rand(
                len(n), count, 3, generator=g, dtype=torch.float64
            )
        options["color_neighbors"] = int(rng.integers(3, fewest + 1))
        options["lambda_geometric"] = float(rng.uniform(0.5, 1.0))
    if "max_distance" in options and rng.random() < 0.4:
        options["weight_distance"] = True
    if rng.random() < 0.25:
        options["weight_normal"] = True
    if rng.random() < 0.25:
        options["max_normal_angle"] = float(rng.uniform(20, 170))
    if rng.random() < 0.3:
        options["criteria_scale"] = "relative"
    if rng.random() < 0.3:
        options["translation_tolerance"] = float(10 ** rng.uniform(-4, -1))
        options["rotation_tolerance"] = float(10 ** rng.uniform(-2, 0.5))
    if rng.random() < 0.3:
        options["robust_kernel"] = str(rng.choice(["huber", "cauchy", "tukey", "geman_mcclure"]))
        options["kernel_scale"] = float(rng.uniform(0.1, 1))
    return inputs, options, n, m


def _alone(inputs: dict, b: int, n: list[int], m: list[int]) -> dict:
    alone = {
        "source": inputs["source"][b, : n[b]],
        "target": inputs["target"][b, : m[b]],
        "source_normals": inputs["source_normals"][b, : n[b]],
        "target_normals": inputs["target_normals"][b, : m[b]],
        "init": inputs["init"][b],
    }
    for side, count in (("source", n[b]), ("target", m[b])):
        if f"{side}_colors" in inputs:
            alone[f"{side}_colors"] = inputs[f"{side}_colors"][b, :count]
    return alone


def _scale(inputs: dict) -> float:
    """The problem's coordinate scale: differences are measured relative to it."""
    return 1 + max(float(inputs["target"].abs().max()), float(inputs["init"][:, :3, 3].abs().max()))


def _reference_backend(seed: int) -> str:
    # The reference by KD-tree, and by brute force every fourth case (it is slower).
    return "brute_force" if seed % 4 == 0 else "kdtree"


def _differences(seed: int, inputs: dict, options: dict, n: list[int], m: list[int]) -> list:
    """``(what, relative difference)`` of one case: the fast path against the reference, and
    a batched pair against the same pair alone (on one path per case, alternating)."""
    scale = _scale(inputs)
    fast = difficp.icp(**inputs, search_backend="compiled", **options)
    backend = _reference_backend(seed)
    reference = difficp.icp(**inputs, search_backend=backend, **options)
    checks = [("fast vs " + backend, fast.transform, reference.transform)]
    path, batched = ("compiled", fast) if seed % 2 else (backend, reference)
    for b in range(len(n)):
        alone = difficp.icp(**_alone(inputs, b, n, m), search_backend=path, **options)
        checks.append((f"batched vs alone ({path})", batched.transform[b], alone.transform))
    return [(what, float((a - b_).abs().max()) / scale) for what, a, b_ in checks]


def _sensitivity(seed: int, inputs: dict, options: dict) -> float:
    """How far (relative to the scale) the reference itself moves when every initial
    translation moves by 1e-12 of the scale, or when each pair's source points come in another
    order (the same problem summed in another order, which is all the fast path changes): what
    rounding alone can do to this problem."""
    scale = _scale(inputs)
    backend = _reference_backend(seed)
    base = difficp.icp(**inputs, search_backend=backend, **options).transform
    probes = [_reordered_sources(inputs, order) for order in range(ORDER_PROBES)]
    for sign in (1.0, -1.0):
        init = inputs["init"].clone()
        init[:, :3, 3] += sign * 1e-12 * scale
        probes.append({**inputs, "init": init})
    moved = []
    for probe in probes:
        result = difficp.icp(**probe, search_backend=backend, **options)
        moved.append(float((result.transform - base).abs().max()) / scale)
    return max(moved)


def _reordered_sources(inputs: dict, seed: int) -> dict:
    """``inputs`` with each pair's real source points (and their normals, colours) in a random
    order (padding rows stay last)."""
    g = torch.Generator().manual_seed(seed)
    N = inputs["source"].shape[1]
    order = torch.arange(N).repeat(len(inputs["source_lengths"]), 1)
    for b, n in enumerate(inputs["source_lengths"].tolist()):
        order[b, :n] = torch.randperm(n, generator=g)
    out = dict(inputs)
    for key in ("source", "source_normals", "source_colors"):
        if key in inputs:
            out[key] = torch.gather(inputs[key], 1, order[..., None].expand_as(inputs[key]))
    return out


@pytest.mark.parametrize(
    ("make_case", "seeds"),
    [
        (_case, [*range(CASES), *FOUND_BY_LONGER_RUNS, *CHAOTIC_BY_LONGER_RUNS]),
        (
            _extended_case,
            [
                *range(EXTENDED_CASES),
                *EXTENDED_FOUND_BY_LONGER_RUNS,
                *EXTENDED_CHAOTIC_BY_LONGER_RUNS,
            ],
        ),
    ],
    ids=["rigid", "extended"],
)
def test_fuzz_fast_equals_reference_and_batched_equals_alone(make_case, seeds) -> None:
    failures, chaotic = [], []
    worst = 0.0
    for seed in seeds:
        inputs, options, n, m = make_case(seed)
        errors = _differences(seed, inputs, options, n, m)
        if max(error for _, error in errors) > TOLERANCE:
            # A chaotic problem (the reference itself moves by more than the tolerance when
            # the init moves by 1e-12) cannot be compared at the tolerance; it must be rare.
            sensitivity = _sensitivity(seed, inputs, options)
            if sensitivity > TOLERANCE:
                chaotic.append(seed)
                continue
        for what, error in errors:
            worst = max(worst, error)
            if not error <= TOLERANCE:
                failures.append(f"seed {seed}: {what} differ by {error:.2e} x scale, {options}")
    assert not failures, "\n".join(failures[:10])
    assert len(chaotic) <= len(seeds) // 100, f"chaotic cases {chaotic}"
    print(f"worst relative difference {worst:.2e}, chaotic cases {chaotic}")


def test_the_chaos_exemption_would_not_have_hidden_the_bugs_found_before() -> None:
    # The bugs this fuzz found were well-conditioned problems that the fast path got wrong:
    # their reference moves by ~1e-12 under the exemption's probe, far below the tolerance.
    for seed in FOUND_BY_LONGER_RUNS:
        inputs, options, _, _ = _case(seed)
        assert _sensitivity(seed, inputs, options) < 1e-9
    for seed in EXTENDED_FOUND_BY_LONGER_RUNS:
        inputs, options, _, _ = _extended_case(seed)
        assert _sensitivity(seed, inputs, options) < 1e-9
    for make_case, seeds in (
        (_case, CHAOTIC_BY_LONGER_RUNS),
        (_extended_case, EXTENDED_CHAOTIC_BY_LONGER_RUNS),
    ):
        for seed in seeds:
            inputs, options, _, _ = make_case(seed)
            assert _sensitivity(seed, inputs, options) > TOLERANCE
