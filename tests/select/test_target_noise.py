"""denoised_alignment: the posterior and the lower bound of ``b`` recomputed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from gradsift.select.target_noise import denoised_alignment


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
