"""Paired comparisons of two methods over seeds: the statistics that say whether a difference
is real, and how many seeds would show it.

A seed fixes the stream order, the initialisation and the target draws for every method, so
per-seed differences ``d_s = x_s(a) − x_s(b)`` remove what the seed alone decides. On them:

- the mean and its 95 % t-interval, ``d̄ ± t_{0.975, n−1} · sd(d) / √n``;
- the sign test: how often ``a`` was lower, how often higher (ties left out), and the
  two-sided binomial probability of a split at least that uneven under a fair coin;
- the seeds a paired t-test needs to detect the observed mean at 80 % power (noncentral t),
  so that a comparison can be planned at a fixed size instead of extended until it "works";
- over seeds *and* evaluation examples (``crossed_interval``): the interval over seeds alone
  is about the fixed evaluation set; the crossed one also carries which examples were drawn.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def paired_interval(diffs: Sequence[float]) -> tuple[float, float, float]:
    """Mean and 95 % t-interval of paired differences over seeds (NaN bounds below 2)."""
    from scipy import stats

    d = np.asarray(diffs, dtype=np.float64)
    mean = float(d.mean())
    if d.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size))
    return mean, mean - half, mean + half


def crossed_interval(diffs: Any) -> dict[str, float]:
    """Mean and 95 % interval of paired differences ``D[s, e]`` over seeds ``s`` and
    evaluation examples ``e``, both drawn at random (crossed random effects,
    ``D = μ + a_s + b_e + ε``): ``Var(D̄) = σ_a²/S + σ_b²/E + σ_ε²/(SE)``. From the variances
    of the seed means ``V_s``, of the example means ``V_e`` and of the additive fit's residuals
    ``V_r``, the three terms are ``V_s/S − V_r/(SE)``, ``V_e/E − V_r/(SE)`` and ``V_r/(SE)``
    (their sum is unbiased), the first two cut at zero as the variances they estimate are.
    The interval is ``mean ± t·√Var``, ``t`` at Satterthwaite's degrees of freedom
    ``Var² / Σ_i (c_i M_i)²/df_i`` for ``Var = Σ_i c_i M_i`` (``M_i``: ``V_s/S``, ``V_e/E``,
    ``V_r/(SE)``): with few seeds and a large seed term it is as wide as the t-interval over
    seeds, not narrower.

    Returns mean, lo, hi, ``n_seeds``, ``n_examples``, ``var``, ``df``, the seed and example
    terms (``seed_term``, ``example_term``) and their shares of ``var``. Needs at least two
    seeds and two examples."""
    from scipy import stats

    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 2 or min(d.shape) < 2:
        raise ValueError(f"crossed_interval needs a (seeds, examples) array with at least two "
                         f"of each, got shape {d.shape}")
    n_s, n_e = d.shape
    mean = float(d.mean())
    rows, cols = d.mean(axis=1), d.mean(axis=0)
    resid = d - rows[:, None] - cols[None, :] + mean
    df_r = (n_s - 1) * (n_e - 1)
    noise = float((resid**2).sum() / df_r) / (n_s * n_e)
    seed_ms, example_ms = float(rows.var(ddof=1)) / n_s, float(cols.var(ddof=1)) / n_e
    seed_part, example_part = max(seed_ms - noise, 0.0), max(example_ms - noise, 0.0)
    var = seed_part + example_part + noise
    # Var = a·V_s/S + b·V_e/E + (1 − a − b)·V_r/(SE), a (b) 1 where the seed (example) term
    # was kept
    a, b = float(seed_part > 0), float(example_part > 0)
    denom = ((a * seed_ms) ** 2 / (n_s - 1) + (b * example_ms) ** 2 / (n_e - 1)
             + ((1 - a - b) * noise) ** 2 / df_r)
    dof = var**2 / denom if denom > 0 else math.inf
    half = float(stats.t.ppf(0.975, dof)) * math.sqrt(var) if var > 0 else 0.0
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n_seeds": n_s,
            "n_examples": n_e, "var": var, "df": dof, "seed_term": seed_part,
            "example_term": example_part,
            "seed_share": seed_part / var if var > 0 else math.nan,
            "example_share": example_part / var if var > 0 else math.nan}


def sign_test(better: int, worse: int) -> float:
    """Two-sided sign test of ``better`` against ``worse`` (ties left out): the probability
    of a split at least this uneven if either method were as likely to win."""
    from scipy import stats

    n = better + worse
    return float(stats.binomtest(better, n).pvalue) if n else 1.0


def seeds_for_power(mean: float, sd: float, power: float = 0.8, alpha: float = 0.05,
                    most: int = 1000) -> float:
    """The fewest seeds ``n`` at which a two-sided paired t-test at level ``alpha`` detects a
    true mean difference ``mean`` (per-seed sd ``sd``) with probability ``power``: the
    noncentral t, ``P(|T| > t_{1−α/2, n−1})`` with noncentrality ``√n · mean / sd``.
    ``inf`` when ``most`` seeds are not enough (or the difference is 0)."""
    from scipy import stats

    if not (math.isfinite(mean) and math.isfinite(sd)) or sd <= 0 or mean == 0:
        return math.inf
    effect = abs(mean) / sd
    # the z-test's n is a lower bound of the t-test's: start the search just below it
    start = (stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) ** 2 / effect**2
    if start > most:
        return math.inf
    for n in range(max(2, int(start) - 2), most + 1):
        crit = stats.t.ppf(1 - alpha / 2, n - 1)
        nc = math.sqrt(n) * effect
        reached = stats.nct.sf(crit, n - 1, nc) + stats.nct.cdf(-crit, n - 1, nc)
        if reached >= power:
            return float(n)
    return math.inf


def paired_comparison(a: Mapping[Any, float], b: Mapping[Any, float]) -> dict[str, Any] | None:
    """``a − b`` over the seeds both have (keys), with every number of the module docstring;
    None with fewer than two common seeds or a non-finite value among them."""
    common = sorted(set(a) & set(b), key=str)
    diffs = [float(a[s]) - float(b[s]) for s in common]
    if len(diffs) < 2 or not all(math.isfinite(d) for d in diffs):
        return None
    mean, lo, hi = paired_interval(diffs)
    lower, higher = sum(d < 0 for d in diffs), sum(d > 0 for d in diffs)
    return {"mean": mean, "lo": lo, "hi": hi, "n": len(diffs), "lower": lower,
            "higher": higher, "sign_p": sign_test(lower, higher),
            "seeds_for_80pct_power": seeds_for_power(mean, float(np.std(diffs, ddof=1)))}


def describe(p: Mapping[str, Any]) -> str:
    """One line: ``+0.0123 [95% CI …] over n seeds; lower on …, higher on … (sign test p …);
    seeds to detect this mean at 80 % power: …``."""
    return (f"{p['mean']:+.4f} [95% CI {p['lo']:+.4f}, {p['hi']:+.4f}] over {p['n']} seeds; "
            f"lower on {p['lower']}, higher on {p['higher']} (sign test p {p['sign_p']:.2g}); "
            f"seeds to detect this mean at 80 % power: {p['seeds_for_80pct_power']:g}")


def describe_crossed(c: Mapping[str, Any]) -> str:
    """One line for :func:`crossed_interval`: ``+0.0123 [95% CI …] (S seeds × E examples;
    the examples' share of the variance …)``."""
    share = c["example_share"]
    return (f"{c['mean']:+.4f} [95% CI {c['lo']:+.4f}, {c['hi']:+.4f}] ({c['n_seeds']} seeds × "
            f"{c['n_examples']} examples; the examples' share of the variance "
            f"{'–' if math.isnan(share) else f'{share:.0%}'})")
