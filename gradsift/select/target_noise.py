"""What the per-target-example alignments ``B_ti = ⟨g_i, P g_t⟩`` say about the noise of
``b = mean_t B_t``, and the two places ftw uses it: the ``b`` its subset is chosen on
(``denoised_alignment``) and how far its weights move from uniform towards NNLS
(``shrink_to_uniform``). The math: ``gradsift.select.ftw``'s module docstring.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from gradsift.select.subsets import nnls_fit, top_k

# how b enters the subset choice: as measured, or corrected for the target batch's noise
ALIGNMENTS = ("mean", "posterior", "lcb")


def shrink_to_uniform(
    b: np.ndarray, kmat: np.ndarray, chosen: list[int], ridge: float,
    per_target: np.ndarray | None,
) -> tuple[np.ndarray, float]:
    """``w_unif + s (w_nnls − w_unif)`` with ``s = d̄²/(d̄² + se²)`` (module docstring).

    ``per_target`` is (n_t, n) alignments per target example; without two of them the gain
    of NNLS cannot be told from noise and ``s = 0``.
    """
    idx = np.asarray(chosen)
    n = len(chosen)
    w_u = np.full(n, 1.0 / n)
    w_n = np.zeros(n)
    kept, w_fit = nnls_fit(b, kmat, chosen, ridge)
    if not kept or per_target is None or per_target.shape[0] < 2:
        return w_u, 0.0
    w_n[[chosen.index(i) for i in kept]] = w_fit / w_fit.sum()
    k_ss = kmat[np.ix_(idx, idx)]
    den_n = float(w_n @ k_ss @ w_n)
    den_u = float(w_u @ k_ss @ w_u)
    if den_n <= 0.0 or den_u <= 0.0:
        return w_u, 0.0
    b_t = per_target[:, idx]  # (n_t, n)
    d = b_t @ w_n / np.sqrt(den_n) - b_t @ w_u / np.sqrt(den_u)
    mean, se2 = float(d.mean()), float(d.var(ddof=1)) / d.shape[0]
    s = mean * mean / (mean * mean + se2) if mean > 0.0 and mean * mean + se2 > 0 else 0.0
    w = w_u + s * (w_n - w_u)
    return w / w.sum(), s


def denoised_alignment(
    per_target: torch.Tensor, kind: str, norms: torch.Tensor | None = None
) -> tuple[torch.Tensor, float]:
    """The alignment the subset is chosen on, from ``B_ti``, (n_t, B) alignments per target
    example (``b = mean_t B_t``; ``se_i² = var_t(B_ti)/n_t`` is the noise of ``b_i``).

    * ``"mean"``: ``b`` as measured.
    * ``"posterior"``: the empirical-Bayes posterior mean of each candidate's cosine
      ``c_i = b_i/n_i`` (``n_i = √K_ii``, its norm in the metric; 1 without ``norms``) under a
      zero-mean normal prior fitted across the candidates, scaled back by ``n_i``:
      ``b_i f_i``, ``f_i = τ²/(τ² + se_i²/n_i²)``, ``τ² = max(mean_i c_i² − mean_i se_i²/n_i², 0)``.
      A candidate that aligns with one target example only is shrunk more than one that aligns
      with all of them (taking the largest of B noisy estimates favours the noisiest), and a
      candidate's gradient norm does not change its factor. Signs are kept, so the filter
      keeps the same candidates; with ``τ² = 0`` (no spread beyond the noise) ``b`` is kept.

    * ``"lcb"``: the lower confidence bound ``b_i − se_i`` (one standard error): a candidate
      must be aligned on the evidence, not on its mean alone, to pass the filter.

    Returns the alignment and a summary: the mean factor ``f_i`` (``posterior``), the share of
    candidates with ``b_i > 0`` whose bound stays above zero (``lcb``), 1.0 when ``b`` is kept.
    Non-finite entries stay non-finite (the filter drops them).
    """
    if kind not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {kind!r}")
    bt = per_target.detach().to(torch.float64)
    b = bt.mean(dim=0)
    if kind == "mean" or bt.shape[0] < 2:
        return b, 1.0
    if kind == "lcb":
        bound = b - (bt.var(dim=0, unbiased=True) / bt.shape[0]).sqrt()
        positive = b > 0.0
        kept = float((bound[positive] > 0.0).double().mean()) if bool(positive.any()) else 1.0
        return bound, kept
    n2 = torch.ones_like(b) if norms is None else norms.detach().to(b) ** 2
    cos2, noise2 = b**2 / n2, bt.var(dim=0, unbiased=True) / bt.shape[0] / n2
    ok = torch.isfinite(cos2) & torch.isfinite(noise2)
    if not bool(ok.any()):
        return b, 1.0
    tau2 = float(cos2[ok].mean() - noise2[ok].mean())
    if not tau2 > 0.0:
        return b, 1.0
    factor = tau2 / (tau2 + noise2)
    return b * factor, float(factor[ok].mean())


def _finite_columns(per_target: torch.Tensor) -> torch.Tensor:
    """``B_ti`` in float64, without the candidates (columns) any target example left non-finite."""
    bt = per_target.detach().to(torch.float64)
    return bt[:, torch.isfinite(bt).all(dim=0)]


def target_agreement(per_target: torch.Tensor) -> float:
    """``‖mean_t B_t‖² / mean_t ‖B_t‖²`` over the finite candidates: how alike the target
    examples pull on them. ``1/n_t`` for examples that agree on nothing (zero-mean), 1 when all
    pull alike; logged, so a run shows whether its target is one narrow task or a diverse one.
    """
    bt = _finite_columns(per_target)
    den = float((bt**2).sum(dim=1).mean())
    return float((bt.mean(dim=0) ** 2).sum()) / den if den > 0.0 else 0.0


def target_snr(per_target: torch.Tensor) -> float:
    """The signal-to-noise ratio of ``b = mean_t B_t`` over the finite candidates,
    ``(‖b‖² − tr Σ)/tr Σ`` with ``tr Σ = Σ_i var_t(B_ti)/n_t`` (unbiased variances).

    ``E‖b‖² = ‖β‖² + tr Σ`` for the target's expectation ``β``, so this is unbiased for
    ``‖β‖²/tr Σ`` up to the ratio: the target's own pull on the candidates against the noise
    its ``n_t`` examples leave in ``b``. About 0 where the examples agree on nothing, ``inf``
    where they all pull alike. With ``a = target_agreement``: ``SNR = a(n_t − 1)/(1 − a) − 1``.
    """
    bt = _finite_columns(per_target)
    n_t = bt.shape[0]
    if n_t < 2:
        raise ValueError(f"the target's signal-to-noise needs >= 2 target examples, got {n_t}")
    noise = float(bt.var(dim=0, unbiased=True).sum()) / n_t
    signal = float((bt.mean(dim=0) ** 2).sum()) - noise
    return signal / noise if noise > 0.0 else math.inf


def debiased_rho(
    b: np.ndarray, kmat: np.ndarray, noise: np.ndarray, idx: list[int], ridge: float
) -> tuple[float, list[int]]:
    """``(ρ̂² − N)/ρ̂`` of ``idx`` at its NNLS weights, and the rows kept with weight > 0.

    ``ρ̂² = b_Aᵀ K_AA⁻¹ b_A`` on the active rows ``A``; ``N = tr(K_AA⁻¹ Σ_AA)``, with ``Σ`` the
    covariance of ``b`` over target batches (``noise``), is what fitting the target batch's noise
    adds to it on average, so ``ρ̂² − N`` is unbiased for the ``ρ²`` of the target's expectation
    and ``(ρ̂² − N)/ρ̂`` estimates the ``ρ`` the fitted weights reach on it.
    """
    kept, w = nnls_fit(b, kmat, idx, ridge)
    if not kept:
        return 0.0, []
    rho2 = float(b[kept] @ w)
    if rho2 <= 0.0:
        return 0.0, []
    a = np.asarray(kept)
    k_aa = kmat[np.ix_(a, a)]
    k_aa = k_aa + ridge * float(np.trace(k_aa)) / a.size * np.eye(a.size)
    extra = float(np.trace(np.linalg.lstsq(k_aa, noise[np.ix_(a, a)], rcond=None)[0]))
    return (rho2 - extra) / np.sqrt(rho2), kept


def debiased_subset(
    b: np.ndarray, kmat: np.ndarray, per_target: np.ndarray, k: int, ridge: float, tol: float
) -> list[int]:
    """Greedy forward selection on ``debiased_rho``, compared with the top ``k`` by ``b``.

    ``per_target`` is (n_t, n), ``b = mean_t B_t``; ``Σ = cov_t(B_t)/n_t``. Each round adds the
    candidate whose NNLS refit has the largest debiased ``ρ``; it stops when none raises it by
    more than ``tol``. A candidate only the target batch's noise aligns adds less than the noise
    it fits, so the subset stops where the 8 target examples stop carrying signal (the caller
    fills it up by ``b``). Empty when no subset has a debiased ``ρ`` above 0.
    """
    n_t, n = per_target.shape
    if n_t < 2:
        raise ValueError(f"the debiased subset needs >= 2 target examples, got {n_t}")
    noise = np.atleast_2d(np.cov(per_target, rowvar=False)) / n_t
    chosen: list[int] = []
    score = 0.0
    while len(chosen) < k:
        best, best_set = score, None
        for j in range(n):
            if j in chosen or b[j] <= 0.0:
                continue
            s, kept = debiased_rho(b, kmat, noise, chosen + [j], ridge)
            if j in kept and s > best:
                best, best_set = s, kept
        if best_set is None or best <= score + tol * abs(score):
            break
        chosen, score = best_set, best
    top = [j for j in top_k(b, k) if b[j] > 0.0]
    return top if debiased_rho(b, kmat, noise, top, ridge)[0] > score else chosen
