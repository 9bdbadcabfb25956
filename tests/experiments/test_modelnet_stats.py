"""The ModelNet benchmark's statistics (bootstrap, McNemar), calibration rows, partial coverage."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats as sps
from test_modelnet import tiny_root  # noqa: F401  (the fixture)

from difficp_experiments.modelnet import stats as S
from difficp_experiments.modelnet.metrics import isotropic_errors


def _paired(a_only: int, b_only: int, both: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    """Success vectors of two methods with the given 2x2 table, in a shuffled order."""
    a = np.array([1] * a_only + [0] * b_only + [1] * both + [0] * neither, dtype=bool)
    b = np.array([0] * a_only + [1] * b_only + [1] * both + [0] * neither, dtype=bool)
    order = np.random.default_rng(3).permutation(a.size)
    return a[order], b[order]


def test_mcnemar_exact_matches_the_binomial_test_on_a_hand_built_table():
    a, b = _paired(a_only=7, b_only=2, both=30, neither=5)
    res = S.mcnemar(a, b)
    assert (res["pairs"], res["a_only"], res["b_only"], res["both"], res["neither"]) == (
        44,
        7,
        2,
        30,
        5,
    )
    assert res["test"] == "exact"
    # two-sided: 2 * P(X >= 7), X ~ Bin(9, 1/2) = 2 * (36 + 9 + 1) / 512
    assert res["p_value"] == pytest.approx(92 / 512, rel=1e-12)
    assert res["p_value"] == pytest.approx(sps.binomtest(7, 9, 0.5).pvalue, rel=1e-12)
    assert S.mcnemar(b, a)["p_value"] == pytest.approx(res["p_value"])  # symmetric


def test_mcnemar_chi_square_with_continuity_correction_for_many_discordant_pairs():
    a, b = _paired(a_only=30, b_only=10, both=100, neither=20)
    res = S.mcnemar(a, b)
    assert res["test"] == "chi2"
    assert res["statistic"] == pytest.approx((20 - 1) ** 2 / 40)  # 9.025
    assert res["p_value"] == pytest.approx(sps.chi2.sf(9.025, 1), rel=1e-12)
    assert 0.002 < res["p_value"] < 0.003


def test_mcnemar_without_discordant_pairs_and_with_unequal_sizes():
    a, b = _paired(0, 0, 10, 3)
    assert S.mcnemar(a, b)["p_value"] == 1.0
    with pytest.raises(ValueError, match="differ in size"):
        S.mcnemar(a, b[:-1])


def test_bootstrap_median_interval_covers_the_true_median_and_is_reproducible():
    sample = np.random.default_rng(1).normal(3.0, 1.0, size=500)
    lo, hi = S.median_ci(sample)
    assert lo < 3.0 < hi and lo < np.median(sample) < hi
    # asymptotic standard error of the median: 1.2533 sigma / sqrt(n) = 0.056; width ~ 4 of them
    assert 0.12 < hi - lo < 0.35
    assert S.median_ci(sample) == (lo, hi)  # same seed, same interval
    assert S.median_ci(sample, seed=5) != (lo, hi)


def test_bootstrap_rate_interval_is_near_the_normal_approximation():
    successes = np.array([True] * 80 + [False] * 20)
    lo, hi = S.rate_ci(successes)
    half = 1.96 * np.sqrt(0.8 * 0.2 / 100)  # 0.078
    assert lo == pytest.approx(0.8 - half, abs=0.02) and hi == pytest.approx(0.8 + half, abs=0.02)
    assert S.rate_ci(np.ones(10, bool)) == (1.0, 1.0)
    assert all(np.isnan(S.median_ci(np.array([]))))


def test_paired_tests_run_only_the_listed_comparisons_on_common_pairs():
    a, b = _paired(7, 2, 30, 5)
    tests = S.paired_tests({"dcp_v1": b, "dcp_v1+icp": a[:40], "unrelated": a})
    assert [(t["a"], t["b"], t["pairs"]) for t in tests] == [("dcp_v1", "dcp_v1+icp", 40)]


def test_perturbed_truth_turns_the_rotation_by_exactly_the_angle():
    from difficp_experiments.modelnet.benchmark import perturbed_truth
    from difficp_experiments.modelnet.data import euler_xyz_to_matrix

    rng = np.random.default_rng(0)
    R_gt = np.stack([euler_xyz_to_matrix(a) for a in rng.uniform(0, 0.8, (6, 3))])
    t_gt = rng.uniform(-0.5, 0.5, (6, 3))
    index = np.arange(10, 16)
    for angle in (5.0, 10.0, 30.0):
        R, t = perturbed_truth(R_gt, t_gt, index, angle, seed=0)
        rot, trans = isotropic_errors(R, t, R_gt, t_gt)
        np.testing.assert_allclose(rot, angle, atol=1e-9)
        np.testing.assert_array_equal(trans, 0.0)
        np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-12)
    # pair i's axis depends on its index only, not on the batch it comes in
    R, _ = perturbed_truth(R_gt, t_gt, index, 10.0, seed=0)
    R2, _ = perturbed_truth(R_gt[3:], t_gt[3:], index[3:], 10.0, seed=0)
    np.testing.assert_array_equal(R[3:], R2)
    R3, _ = perturbed_truth(R_gt, t_gt, index, 10.0, seed=1)
    assert not np.allclose(R, R3)


def _bench(root, out, *extra: str) -> dict:
    from difficp.cli import main

    args = [
        "benchmark",
        "modelnet",
        "--data-dir",
        str(root),
        "--dataset",
        "modelnet40",
        "--batch-size",
        "2",
        "--out",
        str(out),
        *extra,
    ]
    assert main(args) == 0
    return json.loads((out / "results.json").read_text())


def test_calibration_rows_with_intervals_and_paired_tests(tiny_root, capsys):  # noqa: F811
    out = tiny_root / "out"
    res = _bench(
        tiny_root, out, "--methods", "icp,open3d_fgr,true_rot10,true_rot10+icp", "--limit", "4"
    )
    m = res["methods"]
    assert list(m) == ["icp", "open3d_fgr", "true_rot10", "true_rot10+icp"]
    assert m["true_rot10"]["rot_err_deg_median"] == pytest.approx(10.0)
    assert m["true_rot10"]["success_rate"] == 0.0
    assert m["true_rot10+icp"]["rot_err_deg_median"] < 0.1  # inside ICP's basin on these blobs
    assert list(res["statistics"]) == list(m)
    for name, row in m.items():
        assert row["pairs"] == 4
        lo, hi = res["statistics"][name]["success_rate_ci"]
        assert lo <= row["success_rate"] <= hi
        lo, hi = res["statistics"][name]["rot_err_deg_median_ci"]
        assert lo <= row["rot_err_deg_median"] <= hi
    (test,) = res["paired_tests"]
    assert (test["a"], test["b"], test["pairs"]) == ("icp", "open3d_fgr", 4)
    text = (out / "results.md").read_text()
    assert "| `true_rot10+icp` | 4 |" in text and "[95% CI]" in text and "McNemar" in text


def test_calibration_stands_for_four_angles_raw_and_refined():
    from difficp_experiments.modelnet.benchmark import CALIBRATION_METHODS, parse_methods

    names = parse_methods(CALIBRATION_METHODS)
    assert len(names) == 8 and names[:2] == ("true_rot5", "true_rot5+icp")
    assert parse_methods("true_rot2.5+icp") == ("true_rot2.5+icp",)
    with pytest.raises(ValueError, match="calibration rows"):
        parse_methods("true_rotx")


def test_a_run_stopped_early_tabulates_the_same_first_pairs_for_every_method(
    tiny_root,  # noqa: F811
    monkeypatch,
    capsys,
):
    from difficp_experiments.modelnet import benchmark

    monkeypatch.setattr(benchmark, "CACHE_CHUNK", 2)
    clock = iter(range(0, 10_000, 60))  # each look at the clock: one more minute
    monkeypatch.setattr(benchmark.time, "monotonic", lambda: float(next(clock)))
    out = tiny_root / "out"
    # 1.5 minutes: the first chunk (2 pairs) of every method, then stop
    res = _bench(
        tiny_root, out, "--methods", "icp,true_rot5+icp", "--limit", "6", "--max-minutes", "1.5"
    )
    assert res["pairs"] == 6
    # (true_rot5 is cached as the base of true_rot5+icp)
    assert {k: v["pairs"] for k, v in res["methods"].items()} == {
        "icp": 2,
        "true_rot5": 2,
        "true_rot5+icp": 2,
    }
    assert "the first 2 of 6 test pairs" in (out / "results.md").read_text()
    # 0 minutes: nothing computed, the cache tabulated
    again = _bench(tiny_root, out, "--methods", "icp", "--limit", "6", "--max-minutes", "0")
    assert again["methods"]["icp"]["pairs"] == 2 and "true_rot5+icp" in again["methods"]
    # icp continued to all 6 pairs, the others not: rows of different sizes say so
    mixed = _bench(tiny_root, out, "--methods", "icp", "--limit", "6")
    assert mixed["methods"]["icp"]["pairs"] == 6 and mixed["methods"]["true_rot5"]["pairs"] == 2
    assert "fewer cached for some methods" in (out / "results.md").read_text()
