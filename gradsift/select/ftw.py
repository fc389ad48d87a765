"""Filter-then-Weight on the alignment vector ``b`` and the interaction matrix ``K``.

Source: F. Wang et al., "Two-Stage Optimizer-Aware Online Data Selection for Large Language
Models", 2026, arXiv 2604.00001 (abstract); the derivation is ours, DESIGN.md §3–4.

For a subset ``S`` the best non-negative weights solve ``min_{w≥0} wᵀKw − 2bᵀw``, and at that
optimum ``ρ(S)² = bᵀw*`` with ``ρ = bᵀw / √(wᵀKw)``: choosing ``S`` is non-negative sparse
regression of ``ĝ`` on the candidates in the metric of ``K``. So:

1. **Filter**: drop candidates with a non-finite ``b_i`` or a non-finite entry in their row or
   column of ``K``, a non-positive ``K_ii``, ``b_i ≤ 0`` (never spend budget against the
   target) or a cosine ``b_i / √(K_ii ĝᵀPĝ)`` below ``min_cosine``. Then build at most ``k``
   by greedy forward selection: add the candidate with the largest gain ``r_j² / s_j`` in
   ``ρ²``, where ``r = b − K w`` is the residual alignment (only ``r_j > 0`` can help) and
   ``s_j`` the Schur complement of ``K_jj`` against the chosen set (its part not already
   spanned: near-duplicates of a chosen candidate have ``s_j ≈ 0`` and ``r_j ≈ 0``); refit the
   weights after each addition, dropping those that fall to zero. Stop early when no
   candidate adds a relative gain above ``tol``. A 1-swap local search polishes small problems
   (``n_eligible · k ≤ 1024`` by default).
   The top-``k``-by-``b`` subset is always evaluated too and the better one kept, so the
   result is never worse than ranking by alignment.
   With ``fill``, a subset smaller than ``k`` is topped up with the remaining eligible
   candidates by alignment: the budget is paid for either way.
   ``subset="uniform"`` instead scores a subset by ``ρ`` at the weights it will mostly be
   trained with, uniform ones: ``ρ_u(S) = Σ_S b / √(1ᵀ K_S 1)``, the cosine in Adam's metric
   between the mean gradient of ``S`` and ``ĝ``. It takes the best subset of
   ``min(k, n_eligible)`` (all of them scored when there are at most ``subsets.EXHAUSTIVE_MAX``,
   otherwise greedy forward selection polished by 1-swaps). Near-copies still add nothing
   (two copies have the ρ_u of one), but a candidate is never taken for a small NNLS weight
   that uniform training would then multiply.
   ``subset="residual"`` is the same forward selection with the gain ``r_j`` instead of
   ``r_j²/s_j`` (non-negative matching pursuit on unnormalized gradients): the next candidate
   is the one most aligned with what the chosen ones leave unexplained, so the first is the
   top-1 by ``b``, a near-copy of a chosen one has ``r_j ≈ 0``, and a larger gradient counts
   for more, as it does in an Adam step whose ``v`` is mostly history (``ρ`` is scale-free).
   No 1-swap polish and no comparison with the top-``k``, both on ``ρ``.
   ``subset="validated"`` chooses between the greedy subset and the top-``k`` by ``b`` by
   two-fold cross-validation over the target examples (``target_align``, ``B_ti``): each rule
   picks its subset and NNLS weights on one half (even / odd examples) and is scored by ``ρ``
   on the other; the greedy subset (on all of ``b``) is kept only when its held-out ``ρ``,
   summed over both folds, is higher, otherwise the top-``k``. Greedy's edge in ``ρ`` on the
   ``b`` it was fitted to is partly the target batch's noise (it fits a regression to it);
   held out, that part is gone, and near-copies still cost the top-``k`` its ``ρ``.
   ``subset="debiased"`` corrects that edge in closed form instead of by splitting: fitting
   ``b̂ = mean_t B_t`` on the active rows ``A`` adds ``N = tr(K_AA⁻¹ Σ_AA)`` to ``ρ̂²`` on
   average, ``Σ = cov_t(B_t)/n_t`` the noise of ``b̂``; so ``ρ̂² − N`` is unbiased for the
   ``ρ²`` of the target's expectation and ``(ρ̂² − N)/ρ̂`` estimates the ``ρ`` the fitted
   weights reach on it. Greedy forward selection on that score (compared with the top-``k``
   on it too) stops where the target batch stops carrying signal; ``fill`` tops up by ``b``,
   so with no signal left the subset is the top-``k``
   (``gradsift.select.target_noise.debiased_subset``).
2. **Weight**: NNLS on the subset (``scipy.optimize.nnls`` on a Cholesky factor of
   ``K_S + ridge``), normalized to ``Σ w = 1`` (``nnls``); uniform (``uniform``); or
   ``shrink``: uniform moved towards NNLS only as far as the target batch supports it.
   With per-target-example alignments ``B_ti = ⟨g_i, P g_t⟩`` (``b = mean_t B_t``), the gain
   of NNLS over uniform is ``d_t = ρ_t(w_nnls) − ρ_t(w_unif)`` per target example; with
   ``d̄`` its mean and ``se`` its standard error, ``w = w_unif + s (w_nnls − w_unif)``,
   ``s = d̄² / (d̄² + se²)`` (0 when ``d̄ ≤ 0``): the signal-to-noise shrinkage of a mean.

Options the suite measured (none is a default; BENCHMARKS.md):

* ``temperature τ > 0`` (stochastic subsets): each greedy addition is drawn instead of taken,
  ``p_j ∝ exp((gain_j / max gain − 1)/τ)`` over the candidates with a positive gain; no 1-swap
  polish and no top-``k`` comparison, which would undo the draw.
* ``norm_clip c > 0`` (outlier gradients): every gradient is clipped to ``c`` times the median
  norm of the finite candidates in the metric, ``f_i = min(1, c·median_j √K_jj / √K_ii)``;
  the selection runs on ``f_i b_i`` and ``f_i f_j K_ij`` and the training weights are
  ``w_i f_i`` renormalized, so the update is the clipped gradients' weighted mean.
* ``weight_align`` (cross-fitting): the weight stage fits on another estimate of ``b`` (and
  ``target_align`` on other target examples) than the one that chose the subset.

Everything runs in float64 NumPy on the CPU: ``K`` is ``B×B`` and the solves are ``k×k``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gradsift.select.subsets import (
    best_uniform_subset,
    greedy_forward,
    greedy_subset,
    held_out_gain,
    nnls_fit,
    subset_rho,
    top_k,
)
from gradsift.select.target_noise import debiased_subset, shrink_to_uniform

SUBSETS = ("greedy", "topk", "uniform", "validated", "residual", "debiased")
# the subsets that read the per-target-example alignments (``target_align``)
PER_TARGET_SUBSETS = ("validated", "debiased")
WEIGHTINGS = ("nnls", "uniform", "shrink")


@dataclass
class FTWResult:
    """Filter-then-Weight output with the facts a log needs.

    Attributes:
        indices: (n,) int64 candidate indices, ascending.
        weights: (n,) float32, > 0, sum to 1 (empty when nothing is selected).
        rho: ``bᵀw / √(wᵀKw)`` of the result (0.0 when empty).
        n_finite: candidates with finite ``b`` and ``K`` row/column and ``K_ii > 0``.
        n_positive: of those, with ``b_i > 0``.
        n_filtered: of those, passing the cosine threshold (eligible for budget).
        note: why fewer than ``k`` were selected ('' otherwise).
        shrink: the NNLS share ``s`` of the ``shrink`` weighting (None for other weightings).
        n_clipped: candidates whose gradient ``norm_clip`` scaled down.
        cosines: (B,) each candidate's ``b_i / √(K_ii ĝᵀPĝ)``, what ``min_cosine`` compares
            (NaN where undefined; None without ``target_sq_norm``).
        validation: ``subset="validated"``: greedy's held-out ``ρ`` minus the top-``k``'s,
            summed over the two folds (> 0: greedy kept); None otherwise, or without two
            target examples (then greedy, as ``subset="greedy"``).
    """

    indices: torch.Tensor
    weights: torch.Tensor
    rho: float
    n_finite: int
    n_positive: int
    n_filtered: int
    note: str = ""
    shrink: float | None = None
    n_clipped: int = 0
    cosines: np.ndarray | None = None
    validation: float | None = None




def _validate(align: torch.Tensor, gram: torch.Tensor, k: int) -> None:
    if align.dim() != 1:
        raise ValueError(f"align must be 1-D (B,), got shape {tuple(align.shape)}")
    n = align.shape[0]
    if tuple(gram.shape) != (n, n):
        raise ValueError(f"gram must be ({n}, {n}) to match align, got {tuple(gram.shape)}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")


def ftw_solve(
    align: torch.Tensor,
    gram: torch.Tensor,
    k: int,
    *,
    min_cosine: float = 0.0,
    target_sq_norm: float | None = None,
    subset: str = "greedy",
    weighting: str = "nnls",
    ridge: float = 1e-9,
    tol: float = 1e-6,
    swap_evals: int | None = None,
    fill: bool = False,
    target_align: torch.Tensor | None = None,
    weight_align: torch.Tensor | None = None,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    norm_clip: float = 0.0,
) -> FTWResult:
    """Filter-then-Weight with diagnostics; see ``filter_then_weight`` for the arguments."""
    _validate(align, gram, k)
    if target_align is not None and (
        target_align.dim() != 2 or target_align.shape[1] != align.shape[0]
    ):
        raise ValueError(f"target_align must be (n_target, {align.shape[0]}), got "
                         f"{tuple(target_align.shape)}")
    if weight_align is not None and tuple(weight_align.shape) != tuple(align.shape):
        raise ValueError(f"weight_align must be ({align.shape[0]},) like align, got "
                         f"{tuple(weight_align.shape)}")
    if temperature < 0.0 or (temperature > 0.0 and subset != "greedy"):
        raise ValueError(f"temperature must be >= 0 and needs subset='greedy', got "
                         f"{temperature} with subset={subset!r}")
    if not norm_clip >= 0.0:
        raise ValueError(f"norm_clip must be >= 0 (0: off), got {norm_clip}")
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if min_cosine > 0.0 and target_sq_norm is None:
        raise ValueError("min_cosine > 0 needs target_sq_norm (ĝᵀPĝ) to form the cosine")

    b_all = align.detach().to("cpu", torch.float64).numpy()
    k_all = gram.detach().to("cpu", torch.float64).numpy()
    finite = np.isfinite(b_all) & np.isfinite(k_all).all(axis=0) & np.isfinite(k_all).all(axis=1)
    finite &= np.where(finite, np.diag(k_all), 0.0) > 0.0
    b_w_all = b_all if weight_align is None else (
        weight_align.detach().to("cpu", torch.float64).numpy())
    per_target_all = None if target_align is None else (
        target_align.detach().to("cpu", torch.float64).numpy())
    clip = np.ones_like(b_all)
    if norm_clip > 0.0 and finite.any():
        norms = np.sqrt(np.where(finite, np.diag(k_all), 1.0))
        clip[finite] = np.minimum(1.0, norm_clip * np.median(norms[finite]) / norms[finite])
        b_all, b_w_all = b_all * clip, b_w_all * clip
        k_all = k_all * np.outer(clip, clip)
        if per_target_all is not None:
            per_target_all = per_target_all * clip[None, :]
    positive = finite & (b_all > 0.0)
    eligible = positive.copy()
    cos = None
    if target_sq_norm is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            cos = b_all / np.sqrt(np.diag(k_all) * target_sq_norm)
        cos[~finite] = np.nan
    if min_cosine > 0.0:
        assert cos is not None
        eligible &= np.where(positive, cos, 0.0) >= min_cosine
    pos = np.flatnonzero(eligible)
    b = b_all[pos]
    b_w = b_w_all[pos]
    kmat = k_all[np.ix_(pos, pos)]
    kmat = 0.5 * (kmat + kmat.T)

    validation = None
    if k == 0 or pos.size == 0:
        chosen: list[int] = []
    else:
        top = top_k(b, k)
        options = []
        chosen = []
        if subset == "validated" and per_target_all is not None:
            validation = held_out_gain(per_target_all[:, pos], kmat, k, ridge, tol,
                                        swap_evals)
        if subset == "uniform":  # scored at uniform weights: no NNLS refit drops one
            chosen = sorted(best_uniform_subset(b, kmat, k))
        elif subset == "debiased":  # scored net of the target batch's noise, not on ρ̂
            if per_target_all is None or per_target_all.shape[0] < 2:
                raise ValueError("subset 'debiased' needs target_align with >= 2 target "
                                 "examples (the noise of b)")
            chosen = sorted(debiased_subset(b, kmat, per_target_all[:, pos], k, ridge, tol))
        elif subset == "topk" or (validation is not None and not validation > 0.0):
            options.append(top)
        elif subset == "residual":  # its own order: comparing on ρ would undo it
            options.append(greedy_forward(b, kmat, k, ridge, tol, residual=True))
        elif temperature > 0.0:  # a draw: polishing or comparing would undo it
            options.append(greedy_forward(b, kmat, k, ridge, tol, temperature, generator))
        else:
            options += [greedy_subset(b, kmat, k, ridge, tol, swap_evals), top]
        best_f = -1.0
        for cand in options:
            new, w = nnls_fit(b, kmat, cand, ridge)
            f = subset_rho(b, kmat, np.asarray(new, dtype=np.int64), w) if new else 0.0
            if f > best_f * (1.0 + 1e-12):
                chosen, best_f = new, f

    # the weight stage: NNLS on the subset (a refit in another order may zero a weight)
    shrink = None
    if weighting == "nnls":
        chosen, w = nnls_fit(b_w, kmat, sorted(chosen), ridge)
        w = w / w.sum() if chosen else w
    else:
        if fill and len(chosen) < k:
            rest = [int(j) for j in np.argsort(-b, kind="stable") if int(j) not in chosen]
            chosen = chosen + rest[: k - len(chosen)]
        chosen = sorted(chosen)
        w = np.full(len(chosen), 1.0 / max(1, len(chosen)))
        if weighting == "shrink" and len(chosen) > 1:
            per_target = None if per_target_all is None else per_target_all[:, pos]
            w, shrink = shrink_to_uniform(b_w, kmat, chosen, ridge, per_target)
    idx = np.asarray(chosen, dtype=np.int64)
    rho = subset_rho(b, kmat, idx, w) if chosen else 0.0  # of the update: ρ is scale-free
    if chosen and norm_clip > 0.0:  # train on the clipped gradients: w_i f_i, renormalized
        w = w * clip[pos[idx]]
        w = w / w.sum()

    note = ""
    if len(chosen) < k:
        n_fin, n_pos, n_elig = int(finite.sum()), int(positive.sum()), int(eligible.sum())
        if n_elig == 0:
            if n_fin == 0:
                note = "no candidate has finite alignment and interactions"
            elif n_pos == 0:
                note = f"all {n_fin} finite candidates have alignment <= 0: none selected"
            else:
                note = (
                    f"none of {n_pos} positively aligned candidates reaches min_cosine={min_cosine}"
                )
        elif n_elig < k:
            note = f"only {n_elig} candidates pass the filter (finite, aligned > 0, cosine)"
            if len(chosen) < n_elig:
                note += f"; {len(chosen)} of them add to rho"
        else:
            note = f"only {len(chosen)} of {n_elig} eligible candidates add to rho (tol={tol})"
    return FTWResult(
        shrink=shrink,
        indices=torch.as_tensor(pos[idx] if chosen else np.zeros(0, dtype=np.int64)),
        weights=torch.as_tensor(w, dtype=torch.float32),
        rho=float(rho),
        n_finite=int(finite.sum()),
        n_positive=int(positive.sum()),
        n_filtered=int(eligible.sum()),
        note=note,
        n_clipped=int((clip < 1.0).sum()),
        cosines=cos,
        validation=validation,
    )


def filter_then_weight(
    align: torch.Tensor, gram: torch.Tensor, k: int, **options: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose at most ``k`` candidates and weights maximizing ``ρ = bᵀw / √(wᵀKw)``.

    Args:
        align: (B,) alignment ``b_i = ⟨g_i, P ĝ⟩``.
        gram: (B, B) interaction ``K`` (positive semi-definite).
        k: budget (at most ``k`` are selected; fewer when fewer are useful).
        **options: ``min_cosine`` (0.0; needs ``target_sq_norm`` = ``ĝᵀPĝ``), ``subset``
            (``"greedy"`` redundancy-aware, ``"topk"`` by ``b``, or ``"uniform"``,
            ``"validated"``, ``"residual"``: module docstring), ``weighting``
            (``"nnls"``, ``"uniform"`` or ``"shrink"``, which reads ``target_align``: the
            (n_target, B) per-target-example alignments; ``subset="validated"`` reads them
            too), ``fill`` (False: top a short subset
            up to ``k`` by alignment), ``ridge`` (1e-9, relative), ``tol`` (1e-6,
            relative gain in ``ρ²`` to keep adding), ``swap_evals`` (NNLS fits spent on 1-swap
            polishing; default ``None``: 200 when ``n_eligible · k ≤ 1024``, else 0),
            ``weight_align`` (the ``b`` the weight stage fits on; default ``align``),
            ``temperature`` (0.0; > 0 draws the greedy additions with ``generator``) and
            ``norm_clip`` (0.0; > 0 clips the gradients at that multiple of the median norm).

    Returns:
        ``(indices, weights)``: int64 distinct ascending indices (CPU, possibly empty) and
        float32 weights, positive and summing to 1.
    """
    res = ftw_solve(align, gram, k, **options)  # type: ignore[arg-type]
    return res.indices, res.weights


def alignment_ratio(
    align: torch.Tensor, gram: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
) -> float:
    """``ρ = b_Sᵀw / √(wᵀ K_SS w)`` of a selection (0.0 when empty or ``wᵀKw = 0``)."""
    if indices.numel() == 0:
        return 0.0
    idx = indices.to(align.device).long()
    b = align[idx].double()
    w = weights.to(align.device).double()
    kss = gram[idx][:, idx].double()
    den = float(w @ kss @ w)
    if not den > 0.0:
        return 0.0
    return float(b @ w) / den**0.5
