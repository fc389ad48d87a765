"""gradsift.report.paired against closed forms, published sample sizes and simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradsift.report import paired


def test_paired_interval_is_the_t_interval() -> None:
    diffs = [-0.1, -0.3, 0.05, -0.2, -0.15]
    mean, lo, hi = paired.paired_interval(diffs)
    d = np.array(diffs)
    half = 2.7764451051977987 * d.std(ddof=1) / math.sqrt(5)  # t_{0.975, 4}
    assert mean == pytest.approx(d.mean())
    assert (lo, hi) == pytest.approx((d.mean() - half, d.mean() + half))


def test_seeds_for_power_match_the_published_paired_t_sample_sizes() -> None:
    # G*Power, matched pairs, two-sided α = 0.05, power 0.8: d_z 0.2 → 199, 0.5 → 34, 0.8 → 15,
    # 1.0 → 10
    assert paired.seeds_for_power(0.2, 1.0) == 199
    assert paired.seeds_for_power(0.5, 1.0) == 34
    assert paired.seeds_for_power(-0.08, 0.1) == 15  # the sign does not matter
    assert paired.seeds_for_power(0.3, 0.3) == 10
    assert math.isinf(paired.seeds_for_power(0.0, 1.0))
    assert math.isinf(paired.seeds_for_power(0.001, 1.0, most=50))


def test_seeds_for_power_reach_the_power_in_simulation() -> None:
    # brute force: at n seeds, the share of simulated paired t-tests that reject ≈ 0.8
    from scipy import stats

    n = paired.seeds_for_power(1.0, 1.0)  # 10; 9 seeds give about 0.76
    rng = np.random.default_rng(0)
    d = rng.normal(1.0, 1.0, size=(40000, int(n)))
    t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
    power = float(np.mean(np.abs(t) > stats.t.ppf(0.975, n - 1)))
    assert 0.79 <= power <= 0.82
    d = d[:, : int(n) - 1]  # one seed fewer: below the power
    t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n - 1))
    assert float(np.mean(np.abs(t) > stats.t.ppf(0.975, n - 2))) < 0.8


def test_sign_test_is_the_two_sided_binomial_tail() -> None:
    assert paired.sign_test(9, 1) == pytest.approx(2 * 11 / 2**10)  # P(≤1 or ≥9 of 10)
    assert paired.sign_test(0, 0) == 1.0


def test_paired_comparison_uses_the_common_seeds_only() -> None:
    a = {0: 1.0, 1: 2.0, 2: 3.0, 5: 9.0}
    b = {0: 1.5, 1: 1.5, 2: 3.5, 7: 0.0}
    p = paired.paired_comparison(a, b)
    d = np.array([-0.5, 0.5, -0.5])  # seeds 0, 1, 2
    half = 4.302652729911275 * d.std(ddof=1) / math.sqrt(3)  # t_{0.975, 2}
    assert p["n"] == 3 and (p["lower"], p["higher"]) == (2, 1)
    assert (p["mean"], p["lo"], p["hi"]) == pytest.approx((d.mean(), d.mean() - half,
                                                           d.mean() + half))
    assert paired.paired_comparison({0: 1.0}, {0: 2.0}) is None
    assert paired.paired_comparison({0: 1.0, 1: math.nan}, {0: 2.0, 1: 2.0}) is None
