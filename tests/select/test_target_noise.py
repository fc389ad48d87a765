"""denoised_alignment: the posterior and the lower bound of ``b`` recomputed by hand; the
debiased subset score checked for unbiasedness by simulation and on a case solved by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradsift.select.ftw import ftw_solve
from gradsift.select.ftw_selector import FTWConfig
from gradsift.select.subsets import greedy_subset
from gradsift.select.target_noise import (
    debiased_rho,
    debiased_subset,
    denoised_alignment,
    target_agreement,
    target_snr,
)


def test_denoised_alignment_by_hand() -> None:
    """Candidate 0 aligns with one target example only (mean 2.5, se 2.5), candidate 1 with all
    four (mean 2, se 0): the measured mean ranks 0 first, the posterior ranks 1 first. The
    shrinkage is of cosines ``b_i/n_i``: rescaling one candidate's gradient leaves its factor."""
    rows = [[10.0, 2.0, 1.0, 0.5, -1.0],
            [0.0, 2.0, 1.2, 0.7, -0.5],
            [0.0, 2.0, 0.8, 0.2, -1.5],
            [0.0, 2.0, 1.0, 0.6, -1.0]]
    norms = [4.0, 3.0, 1.5, 1.0, 2.0]
    bt = torch.tensor(rows, dtype=torch.float64)
    n_t, n = 4, 5
    mean = [sum(rows[t][i] for t in range(n_t)) / n_t for i in range(n)]
    se2 = [sum((rows[t][i] - mean[i]) ** 2 for t in range(n_t)) / (n_t - 1) / n_t
           for i in range(n)]
    cos2 = [mean[i] ** 2 / norms[i] ** 2 for i in range(n)]
    noise2 = [se2[i] / norms[i] ** 2 for i in range(n)]
    tau2 = sum(cos2) / n - sum(noise2) / n  # prior N(0, τ²) on the cosines, by moments
    assert tau2 > 0
    post = [mean[i] * tau2 / (tau2 + noise2[i]) for i in range(n)]
    b, factor = denoised_alignment(bt, "posterior", torch.tensor(norms))
    torch.testing.assert_close(b, torch.tensor(post, dtype=torch.float64))
    assert factor == pytest.approx(sum(tau2 / (tau2 + x) for x in noise2) / n)
    assert int(b.argmax()) == 1 and mean[0] > mean[1]
    assert [v > 0 for v in post] == [v > 0 for v in mean]  # the filter keeps the same ones
    # candidate 2's gradient scaled by 10 (its b_t and norm): its factor is unchanged
    scaled = bt.clone()
    scaled[:, 2] *= 10.0
    b10, _ = denoised_alignment(scaled, "posterior", torch.tensor(norms) * torch.tensor(
        [1.0, 1.0, 10.0, 1.0, 1.0]))
    torch.testing.assert_close(b10[2] / b[2], torch.tensor(10.0, dtype=torch.float64))
    plain, _ = denoised_alignment(bt, "mean")
    torch.testing.assert_close(plain, torch.tensor(mean, dtype=torch.float64))
    # no spread beyond the noise: the measured b is kept
    same = torch.tensor([[3.0, -3.0], [-3.0, 3.0]], dtype=torch.float64)
    torch.testing.assert_close(denoised_alignment(same, "posterior")[0], same.mean(0))
    with pytest.raises(ValueError, match="alignment must be one of"):
        denoised_alignment(bt, "median")


def test_lcb_alignment_by_hand() -> None:
    """``alignment=lcb``: ``b_i − sd_t(B_ti)/√n_t``, recomputed by hand; the noisy candidate 0
    (largest mean, one target example) falls below the steady candidate 1."""
    rows = [[9.0, 2.0, 0.5], [0.0, 2.2, 0.1], [0.0, 1.8, -0.4], [0.0, 2.0, 0.2]]
    n_t = len(rows)
    want, kept_pos = [], []
    for i in range(3):
        col = [r[i] for r in rows]
        mean = sum(col) / n_t
        sd = math.sqrt(sum((x - mean) ** 2 for x in col) / (n_t - 1))
        want.append(mean - sd / math.sqrt(n_t))
        kept_pos.append(mean > 0 and want[-1] > 0)
    b, kept = denoised_alignment(torch.tensor(rows, dtype=torch.float64), "lcb")
    torch.testing.assert_close(b, torch.tensor(want, dtype=torch.float64))
    assert int(b.argmax()) == 1 and rows[0][0] / n_t > sum(r[1] for r in rows) / n_t
    assert kept == pytest.approx(sum(kept_pos) / 3)  # all three means > 0, candidate 2's bound < 0


def test_debiased_rho_is_unbiased_where_the_plain_one_is_not() -> None:
    """Three candidates ``G`` (3, d), metric ``P = I``; each draw takes 8 target examples
    ``g_t = μ + ε_t`` and ``B_t = G g_t``. The true ``ρ²`` of all three is ``bᵀK⁻¹b`` with
    ``b = Gμ``. Over draws, ``ρ̂² = b̂ᵀK⁻¹b̂`` overshoots it by ``tr(K⁻¹ GΣGᵀ)/8``; the debiased
    ``ρ̂² − N`` (recovered from the returned score times ``ρ̂``) matches it within noise."""
    rng = np.random.default_rng(0)
    d, n_t, draws = 12, 8, 4000
    g = rng.normal(size=(3, d))
    mu = g.sum(axis=0) * 0.4 + rng.normal(size=d) * 0.3  # positively aligned with all three
    kmat = g @ g.T
    b_true = g @ mu
    rho2_true = float(b_true @ np.linalg.solve(kmat, b_true))
    plain, debiased = [], []
    for _ in range(draws):
        per_target = (mu + 1.5 * rng.normal(size=(n_t, d))) @ g.T  # (n_t, 3)
        b = per_target.mean(axis=0)
        centred = per_target - b
        noise = centred.T @ centred / (n_t - 1) / n_t
        score, kept = debiased_rho(b, kmat, noise, [0, 1, 2], ridge=0.0)
        if kept != [0, 1, 2]:  # NNLS dropped one: the identity is for the fixed subset
            continue
        rho2 = float(b @ np.linalg.solve(kmat, b))
        plain.append(rho2)
        debiased.append(score * np.sqrt(rho2))
    assert len(plain) > draws // 2
    se = np.std(debiased) / np.sqrt(len(debiased))
    assert abs(np.mean(debiased) - rho2_true) < 3.5 * se
    assert np.mean(plain) - rho2_true > 10 * np.std(plain) / np.sqrt(len(plain))


def test_debiased_subset_stops_where_one_target_example_carries_a_candidate() -> None:
    """Candidate 0 aligns with all 8 target examples; candidates 1-3 are orthogonal to it and
    to each other, and each aligns with one target example only (alignment ``a``, 0 with the
    other seven). By hand: ``b̂_j = a/8`` and ``var_t = a²/8``, so its noise ``a²/64`` equals
    ``b̂_j²``: adding it raises ``ρ̂²`` by exactly its noise, the debiased score by nothing,
    and lowers ``(ρ̂² − N)/ρ̂``. The plain greedy takes all four, the debiased one candidate 0."""
    kmat = np.eye(4)
    per_target = np.zeros((8, 4))
    per_target[:, 0] = [1.0, 1.2, 0.9, 1.1, 1.0, 0.8, 1.0, 1.0]
    per_target[1, 1], per_target[4, 2], per_target[6, 3] = 0.9, 1.1, 1.0
    b = per_target.mean(axis=0)
    assert sorted(greedy_subset(b, kmat, 4, 0.0, 1e-6, None)) == [0, 1, 2, 3]
    assert debiased_subset(b, kmat, per_target, 4, 0.0, 1e-6) == [0]
    # through ftw_solve: the one row, topped up to k by b with uniform weights (fill)
    res = ftw_solve(torch.tensor(b), torch.tensor(kmat), 2, subset="debiased",
                    weighting="uniform", fill=True, target_align=torch.tensor(per_target))
    assert res.indices.tolist() == [0, 2] and res.weights.tolist() == [0.5, 0.5]


def test_debiased_subset_needs_the_target_examples() -> None:
    with pytest.raises(ValueError, match="debiased"):
        ftw_solve(torch.ones(3), torch.eye(3), 2, subset="debiased")
    with pytest.raises(ValueError, match="crossfit"):
        FTWConfig(subset="debiased", crossfit=True)


def test_target_agreement_by_hand() -> None:
    """Two target examples pulling on different candidates: ``‖(½, ½)‖² / 1 = ½ = 1/n_t``;
    alike: 1; opposite: 0. A candidate with a non-finite alignment is left out."""
    assert target_agreement(torch.tensor([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(0.5)
    assert target_agreement(torch.tensor([[2.0, 1.0], [2.0, 1.0]])) == pytest.approx(1.0)
    assert target_agreement(torch.tensor([[1.0, 3.0], [-1.0, -3.0]])) == pytest.approx(0.0)
    rows = torch.tensor([[3.0, float("nan"), 1.0], [1.0, 2.0, 1.0]])
    assert target_agreement(rows) == pytest.approx((4.0 + 1.0) / ((10.0 + 2.0) / 2))


def test_target_snr_by_hand() -> None:
    """``(‖b‖² − tr Σ)/tr Σ`` worked out on small tables, and its identity with the agreement
    ``a``: ``SNR = a(n_t − 1)/(1 − a) − 1``."""
    # b = (0.5, 0.5), ‖b‖² = 0.5; var_t per column 0.5, tr Σ = (0.5 + 0.5)/2 = 0.5: SNR 0
    assert target_snr(torch.tensor([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(0.0)
    # b = (2, 1), ‖b‖² = 5; columns [1, 3] and [0, 2]: var 2 each, tr Σ = 4/2 = 2: (5 − 2)/2
    assert target_snr(torch.tensor([[1.0, 0.0], [3.0, 2.0]])) == pytest.approx(1.5)
    # a non-finite candidate is left out; examples that all pull alike: no noise, inf
    rows = torch.tensor([[1.0, 0.0, math.nan], [3.0, 2.0, 1.0]])
    assert target_snr(rows) == pytest.approx(1.5)
    assert target_snr(torch.tensor([[2.0, 1.0], [2.0, 1.0]])) == math.inf
    gen = np.random.default_rng(0)
    for n_t in (3, 8):
        bt = torch.as_tensor(gen.normal(0.3, 1.0, (n_t, 16)))
        a = target_agreement(bt)
        assert target_snr(bt) == pytest.approx(a * (n_t - 1) / (1 - a) - 1)
    with pytest.raises(ValueError, match=">= 2 target examples"):
        target_snr(torch.ones(1, 4))
