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


def _alone(inputs: dict, b: int, n: list[int], m: list[int]) -> dict:
    return {
        "source": inputs["source"][b, : n[b]],
        "target": inputs["target"][b, : m[b]],
        "source_normals": inputs["source_normals"][b, : n[b]],
        "target_normals": inputs["target_normals"][b, : m[b]],
        "init": inputs["init"][b],
    }


def test_fuzz_fast_equals_reference_and_batched_equals_alone() -> None:
    failures = []
    worst = 0.0
    for seed in [*range(CASES), *FOUND_BY_LONGER_RUNS]:
        inputs, options, n, m = _case(seed)
        scale = 1 + max(
            float(inputs["target"].abs().max()), float(inputs["init"][:, :3, 3].abs().max())
        )
        fast = difficp.icp(**inputs, search_backend="compiled", **options)
        # The reference by KD-tree, and by brute force every fourth case (it is slower).
        backend = "brute_force" if seed % 4 == 0 else "kdtree"
        reference = difficp.icp(**inputs, search_backend=backend, **options)
        checks = [("fast vs " + backend, fast.transform, reference.transform)]
        # Batched vs alone on one path per case, alternating.
        path, batched = ("compiled", fast) if seed % 2 else (backend, reference)
        for b in range(len(n)):
            alone = difficp.icp(**_alone(inputs, b, n, m), search_backend=path, **options)
            checks.append((f"batched vs alone ({path})", batched.transform[b], alone.transform))
        for what, a, b_ in checks:
            error = float((a - b_).abs().max()) / scale
            worst = max(worst, error)
            if not error <= TOLERANCE:
                failures.append(f"seed {seed}: {what} differ by {error:.2e} x scale, {options}")
    assert not failures, "\n".join(failures[:10])
    print(f"worst relative difference {worst:.2e}")
