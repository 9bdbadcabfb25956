"""Statistics of the ModelNet benchmark: bootstrap intervals and paired McNemar tests.

The benchmark's pairs are a sample of the test set, so every summary (a median error, a success
rate) carries sampling noise. :func:`bootstrap_ci` gives a seeded percentile-bootstrap interval
(numpy only, reproducible); :func:`mcnemar` tests whether two methods run on the *same* pairs
differ in success, using only the discordant pairs (one succeeds, the other fails): the exact
two-sided binomial test when they are few, the continuity-corrected chi-square otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# Resamples of the bootstrap and its seed: fixed so that a table is reproducible to the digit.
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
# Below this many discordant pairs McNemar's chi-square approximation is poor: use the exact test.
EXACT_BELOW = 25


def _median(x: np.ndarray) -> np.ndarray:
    return np.median(x, axis=-1)


def _mean(x: np.ndarray) -> np.ndarray:
    return np.mean(x, axis=-1)


def bootstrap_ci(
    sample: np.ndarray,
    statistic: Callable[[np.ndarray], np.ndarray] = _median,
    level: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``statistic`` over ``sample``.

    Args:
        sample: ``(n,)`` values (booleans for a rate).
        statistic: maps ``(resamples, n)`` resampled rows to ``(resamples,)`` values along the
            last axis (default: the median).
        level: coverage of the interval.
        resamples: number of bootstrap resamples.
        seed: seed of ``numpy.random.default_rng``: the same inputs give the same interval.
    Returns:
        ``(low, high)``; ``(nan, nan)`` for an empty sample.
    """
    x = np.asarray(sample, dtype=np.float64).ravel()
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = np.empty(resamples)
    # In blocks, so that 2000 resamples of 908 pairs never hold more than ~8 MB at once.
    block = max(1, 1_000_000 // x.size)
    for a in range(0, resamples, block):
        b = min(resamples, a + block)
        values[a:b] = statistic(x[rng.integers(0, x.size, size=(b - a, x.size))])
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return float(low), float(high)


def median_ci(sample: np.ndarray, **kwargs) -> tuple[float, float]:
    """:func:`bootstrap_ci` of the median."""
    return bootstrap_ci(sample, _median, **kwargs)


def mean_ci(sample: np.ndarray, **kwargs) -> tuple[float, float]:
    """:func:`bootstrap_ci` of the mean of ``(n,)`` per-sample values."""
    return bootstrap_ci(sample, _mean, **kwargs)


def rate_ci(successes: np.ndarray, **kwargs) -> tuple[float, float]:
    """:func:`bootstrap_ci` of a success rate (mean of ``(n,)`` booleans)."""
    return mean_ci(np.asarray(successes, dtype=bool), **kwargs)


def mcnemar(success_a: np.ndarray, success_b: np.ndarray) -> dict:
    """Paired McNemar test of "A and B succeed equally often" on the same pairs.

    Args:
        success_a, success_b: ``(n,)`` booleans, pair ``i`` of both from the same input.
    Returns:
        ``pairs`` (n), ``a_only`` (A succeeds, B fails), ``b_only``, ``both``, ``neither``,
        ``test`` ("exact" binomial when ``a_only + b_only < EXACT_BELOW``, else "chi2" with
        continuity correction), ``statistic`` (the chi-square, or ``a_only`` for the exact
        test) and the two-sided ``p_value`` (1 when no pair is discordant).
    """
    from scipy import stats

    a = np.asarray(success_a, dtype=bool).ravel()
    b = np.asarray(success_b, dtype=bool).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in size: {a.size} vs {b.size}")
    a_only, b_only = int(np.sum(a & ~b)), int(np.sum(~a & b))
    out = {
        "pairs": int(a.size),
        "a_only": a_only,
        "b_only": b_only,
        "both": int(np.sum(a & b)),
        "neither": int(np.sum(~a & ~b)),
    }
    discordant = a_only + b_only
    if discordant == 0:
        return {**out, "test": "exact", "statistic": 0.0, "p_value": 1.0}
    if discordant < EXACT_BELOW:
        p = stats.binomtest(a_only, discordant, 0.5, alternative="two-sided").pvalue
        return {**out, "test": "exact", "statistic": float(a_only), "p_value": float(p)}
    chi2 = (abs(a_only - b_only) - 1.0) ** 2 / discordant
    p = stats.chi2.sf(chi2, df=1)
    return {**out, "test": "chi2", "statistic": float(chi2), "p_value": float(p)}


# The comparisons that the results text makes; each is tested where both methods were run.
COMPARISONS: tuple[tuple[str, str], ...] = (
    ("dcp_v1", "dcp_v1+icp"),
    ("icp", "dcp_v1+icp"),
    ("open3d_fgr", "dcp_v1+icp"),
    ("icp", "open3d_fgr"),
    ("pointnetlk", "pointnetlk+icp"),
    ("icp", "pointnetlk+icp"),
    ("dcp_v2", "dcp_v2+icp"),
    ("icp", "dcp_v2+icp"),
    ("dcp_v1+icp", "dcp_v2+icp"),
    ("dcp_v2+icp", "dcp_v2_e2e+icp"),
    ("dcp_v2", "dcp_v2_e2e"),
)


def method_statistics(rot_err: np.ndarray, trans_err: np.ndarray, success: np.ndarray) -> dict:
    """Bootstrap 95% intervals of one method's median errors and success rate.

    Args:
        rot_err: ``(n,)`` degrees; trans_err: ``(n,)``; success: ``(n,)`` booleans.
    """
    return {
        "rot_err_deg_median_ci": list(median_ci(rot_err)),
        "trans_err_median_ci": list(median_ci(trans_err)),
        "success_rate_ci": list(rate_ci(success)),
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "level": 0.95},
    }


def paired_tests(success: dict[str, np.ndarray]) -> list[dict]:
    """McNemar tests of :data:`COMPARISONS` among ``success`` (method -> ``(n_m,)`` booleans of
    its first ``n_m`` pairs), each on the pairs both methods cover."""
    tests = []
    for a, b in COMPARISONS:
        if a in success and b in success:
            n = min(len(success[a]), len(success[b]))
            tests.append({"a": a, "b": b, **mcnemar(success[a][:n], success[b][:n])})
    return tests
