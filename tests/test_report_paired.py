"""gradsift.report.paired against closed forms, published sample sizes and simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

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


def test_crossed_interval_by_hand_on_two_seeds_and_two_examples() -> None:
    # D = [[1, 2], [3, 6]]: seed means 1.5, 4.5 (variance 4.5), example means 2, 4 (variance
    # 2), residuals ±0.5 (one degree of freedom: variance 1); the terms 4.5/2 − 1/4 = 2,
    # 2/2 − 1/4 = 0.75 and 1/4: Var = 3
    # Satterthwaite: Var² / Σ (c_i M_i)²/df_i with M = 4.5/2, 2/2, 1/4, each on 1 degree
    # of freedom: 9 / (2.25² + 1² + 0.25²)
    out = paired.crossed_interval([[1.0, 2.0], [3.0, 6.0]])
    assert out["df"] == pytest.approx(9 / 6.125)
    half = scipy.stats.t.ppf(0.975, 9 / 6.125) * math.sqrt(3.0)
    assert out["mean"] == 3.0
    assert (out["lo"], out["hi"]) == pytest.approx((3.0 - half, 3.0 + half))
    assert (out["seed_share"], out["example_share"]) == pytest.approx((2 / 3, 0.25))
    assert (out["var"], out["seed_term"], out["example_term"]) == pytest.approx((3, 2, 0.75))
    # [[0, 2], [2, 0]]: seed and example means all 1 (no spread), residuals ±1 (variance 4):
    # both terms cut at zero, Var = 4/4 = 1 on the residual's 1 degree of freedom (t 12.706),
    # none of it from seeds or examples
    out = paired.crossed_interval([[0.0, 2.0], [2.0, 0.0]])
    assert (out["lo"], out["hi"]) == pytest.approx((1 - 12.706204736, 1 + 12.706204736))
    assert (out["seed_share"], out["example_share"]) == (0.0, 0.0)
    with pytest.raises(ValueError, match=r"shape \(1, 3\)"):
        paired.crossed_interval([[1.0, 2.0, 3.0]])


def test_crossed_interval_covers_the_mean_of_a_crossed_random_effects_model() -> None:
    # D = μ + a_s + b_e + ε with known spreads: the interval's width follows the closed form
    # σ_a²/S + σ_b²/E + σ_ε²/(SE), and it covers μ about 95 % of the time
    rng = np.random.default_rng(0)
    n_s, n_e, sa, sb, se, mu = 12, 64, 0.05, 0.3, 0.2, 0.02
    truth = sa**2 / n_s + sb**2 / n_e + se**2 / (n_s * n_e)
    widths, covered, seeds_only = [], 0, 0
    reps = 2000
    for _ in range(reps):
        d = (mu + rng.normal(0, sa, (n_s, 1)) + rng.normal(0, sb, (1, n_e))
             + rng.normal(0, se, (n_s, n_e)))
        out = paired.crossed_interval(d)
        widths.append(out["var"])
        covered += out["lo"] <= mu <= out["hi"]
        _, lo, hi = paired.paired_interval(d.mean(axis=1))
        seeds_only += lo <= mu <= hi
    assert np.mean(widths) == pytest.approx(truth, rel=0.05)
    assert 0.93 <= covered / reps <= 0.97
    # the t-interval over seed means is about these examples: it misses μ far more often
    assert seeds_only / reps < 0.75


def test_crossed_interval_with_few_seeds_is_not_narrower_than_the_seeds_allow() -> None:
    # three seeds whose spread dominates: a normal quantile would cover μ about 80 % of the
    # time; the t at Satterthwaite's degrees of freedom (about 2 here) keeps it near 95 %
    rng = np.random.default_rng(1)
    n_s, n_e, sa, sb, se, mu = 3, 64, 0.3, 0.05, 0.1, 0.0
    covered = normal = 0
    reps = 2000
    for _ in range(reps):
        d = (mu + rng.normal(0, sa, (n_s, 1)) + rng.normal(0, sb, (1, n_e))
             + rng.normal(0, se, (n_s, n_e)))
        out = paired.crossed_interval(d)
        covered += out["lo"] <= mu <= out["hi"]
        normal += abs(out["mean"] - mu) <= 1.959963984540054 * math.sqrt(out["var"])
    assert 0.93 <= covered / reps <= 0.97
    assert normal / reps < 0.88
