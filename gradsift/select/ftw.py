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
   ``min(k, n_eligible)`` (all of them scored when there are at most ``EXHAUSTIVE_MAX``,
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

import itertools
from dataclasses import dataclass
from math import comb

import numpy as np
import scipy.linalg
import scipy.optimize
import torch

SUBSETS = ("greedy", "topk", "uniform", "validated", "residual")
WEIGHTINGS = ("nnls", "uniform", "shrink")
# how b enters the subset choice: as measured, or corrected for the target batch's noise
ALIGNMENTS = ("mean", "posterior", "lcb")
# the "uniform" subset: every subset of size k is scored when there are at most this many
EXHAUSTIVE_MAX = 4096
# 1-swap polishing: at most SWAP_EVALS NNLS fits, by default only when n_eligible * k is small.
SWAP_EVALS = 200
SWAP_AUTO_MAX = 1024


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


def _solve_nnls(k_ss: np.ndarray, b_s: np.ndarray, ridge: float) -> np.ndarray:
    """``argmin_{w≥0} wᵀ(K + λI)w − 2bᵀw`` via ``nnls(Lᵀ, L⁻¹b)`` with ``LLᵀ = K + λI``.

    The problem is convex: when the unconstrained solution ``(K + λI)⁻¹ b`` is positive it is
    the answer (the usual case while the greedy adds useful candidates), and NNLS is skipped.
    """
    n = b_s.shape[0]
    if n == 0:
        return np.zeros(0)
    scale = max(float(np.trace(k_ss)) / n, np.finfo(np.float64).tiny)
    lam = ridge * scale
    for _ in range(8):
        try:
            chol = np.linalg.cholesky(k_ss + lam * np.eye(n))
            break
        except np.linalg.LinAlgError:
            lam = max(lam * 100.0, 1e-12 * scale)
    else:  # pragma: no cover - K is a Gram matrix, a ridge always makes it definite
        raise np.linalg.LinAlgError("interaction matrix is not positive semi-definite")
    y = scipy.linalg.solve_triangular(chol, b_s, lower=True)
    w = scipy.linalg.solve_triangular(chol.T, y, lower=False)
    if np.all(w > 0.0):
        return w
    w, _ = scipy.optimize.nnls(chol.T, y, maxiter=50 * n)
    return w


def _rho(b: np.ndarray, kmat: np.ndarray, idx: np.ndarray, w: np.ndarray) -> float:
    if idx.size == 0:
        return 0.0
    num = float(b[idx] @ w)
    den = float(w @ kmat[np.ix_(idx, idx)] @ w)
    if den <= 0.0:
        return 0.0
    return num / np.sqrt(den)


def _fit(
    b: np.ndarray, kmat: np.ndarray, idx: list[int], ridge: float
) -> tuple[list[int], np.ndarray]:
    """NNLS on ``idx``; returns the indices with positive weight and those weights."""
    if not idx:
        return [], np.zeros(0)
    arr = np.asarray(idx)
    w = _solve_nnls(kmat[np.ix_(arr, arr)], b[arr], ridge)
    keep = w > 1e-12 * max(float(w.max(initial=0.0)), np.finfo(np.float64).tiny)
    return [i for i, kept in zip(idx, keep, strict=True) if kept], w[keep]


def _greedy(b: np.ndarray, kmat: np.ndarray, k: int, ridge: float, tol: float,
            temperature: float = 0.0, generator: torch.Generator | None = None,
            residual: bool = False) -> list[int]:
    """Greedy forward selection on the gain ``r_j²/s_j`` with NNLS refits (indices into b);
    with ``residual`` on ``r_j`` (stops when no ``r_j`` exceeds ``tol · max b``).

    With ``temperature > 0`` each addition is drawn with ``p_j ∝ exp((gain_j/max − 1)/τ)``
    among the positive gains (``generator`` is the only randomness).

    The Schur complements ``s`` are kept up to date by incremental (pivoted) Cholesky: adding
    ``j`` appends the row ``c = (K_j − c_jᵀ C)/√s_j`` to ``C = L⁻¹ K_S,:`` and ``s −= c²``:
    ``O(B |S|)`` per step, no solve.
    """
    n = b.shape[0]
    diag = np.diag(kmat).copy()
    lam = ridge * float(diag.mean())
    banned = np.zeros(n, dtype=bool)
    chosen: list[int] = []
    w = np.zeros(0)
    f = 0.0  # current ρ² = bᵀw
    f_scale = float(np.max(b**2 / diag))  # ρ² of the best single candidate
    c_rows = np.zeros((k, n))
    schur = diag + lam

    def append_row(j: int, m: int) -> None:
        c = (kmat[j] - c_rows[:m, j] @ c_rows[:m]) / np.sqrt(max(schur[j], 1e-300))
        c_rows[m] = c
        schur[:] -= c * c

    for _ in range(k + 2 * n + 1):  # each pass adds or bans one; dropped ones are banned
        m = len(chosen)
        if m >= k:
            break
        w_full = np.zeros(n)
        w_full[chosen] = w
        r = b - kmat @ w_full  # residual alignment b − K w
        if residual:
            gain = np.where((r > 0) & ~banned, r, 0.0)
        else:
            gain = np.where((r > 0) & ~banned, r * r / np.maximum(schur, 1e-9 * diag), 0.0)
        gain[chosen] = 0.0
        j = int(np.argmax(gain))
        if gain[j] <= (tol * float(b.max()) if residual else tol * max(f, f_scale)):
            break
        if temperature > 0.0:
            useful = gain > tol * max(f, f_scale)
            logits = np.where(useful, (gain / gain[j] - 1.0) / temperature, -np.inf)
            j = int(torch.multinomial(torch.softmax(torch.as_tensor(logits), 0), 1,
                                      generator=generator))
        new, w_new = _fit(b, kmat, chosen + [j], ridge)
        f_new = float(b[new] @ w_new) if new else 0.0
        for i in set(chosen + [j]) - set(new):
            banned[i] = True
        if f_new <= f:  # the refit did not help: keep the old set, never retry j
            banned[j] = True
            continue
        if new == chosen + [j]:
            append_row(j, m)
        else:  # some weights fell to zero: rebuild the factor of the new set
            schur[:] = diag + lam
            for pos, i in enumerate(new):
                append_row(i, pos)
        chosen, w, f = new, w_new, f_new
    return chosen


def _rho_uniform(b: np.ndarray, kmat: np.ndarray, subsets: np.ndarray) -> np.ndarray:
    """``ρ_u(S) = Σ_S b / √(1ᵀ K_S 1)`` for each row of ``subsets`` (m, s) of indices."""
    num = b[subsets].sum(axis=1)
    den = kmat[subsets[:, :, None], subsets[:, None, :]].sum(axis=(1, 2))
    return num / np.sqrt(np.maximum(den, np.finfo(np.float64).tiny))


def _best_uniform(b: np.ndarray, kmat: np.ndarray, k: int, max_swaps: int = SWAP_EVALS
                  ) -> list[int]:
    """The subset of size ``min(k, n)`` with the largest ``ρ_u`` (module docstring)."""
    n = b.shape[0]
    k = min(k, n)
    if k == 0:
        return []
    if comb(n, k) <= EXHAUSTIVE_MAX:
        subsets = np.array(list(itertools.combinations(range(n), k)), dtype=np.int64)
        return [int(i) for i in subsets[int(np.argmax(_rho_uniform(b, kmat, subsets)))]]
    chosen: list[int] = []
    for _ in range(k):  # greedy: the candidate whose addition gives the largest ρ_u
        rest = np.array([j for j in range(n) if j not in chosen], dtype=np.int64)
        trials = np.concatenate([np.tile(chosen, (rest.size, 1)).astype(np.int64),
                                 rest[:, None]], axis=1)
        chosen.append(int(rest[np.argmax(_rho_uniform(b, kmat, trials))]))
    best = float(_rho_uniform(b, kmat, np.array([chosen]))[0])
    for _ in range(max_swaps):  # best-improvement 1-swaps, each round scored at once
        rest = [j for j in range(n) if j not in chosen]
        trials = np.array([[x if x != i else j for x in chosen]
                           for i in chosen for j in rest], dtype=np.int64)
        scores = _rho_uniform(b, kmat, trials)
        top = int(np.argmax(scores))
        if scores[top] <= best * (1.0 + 1e-12):
            break
        chosen, best = [int(x) for x in trials[top]], float(scores[top])
    return chosen


def _swap_search(
    b: np.ndarray, kmat: np.ndarray, chosen: list[int], ridge: float, tol: float, max_evals: int
) -> list[int]:
    """First-improvement 1-swap local search on ``ρ²(S)`` within ``max_evals`` NNLS fits."""
    if not chosen:
        return chosen
    n = b.shape[0]
    chosen, w = _fit(b, kmat, chosen, ridge)
    best = float(b[chosen] @ w) if chosen else 0.0
    evals = 0
    improved = True
    while improved and evals < max_evals:
        improved = False
        outside = [j for j in range(n) if j not in chosen]
        for i, j in itertools.product(list(chosen), outside):
            trial = [x for x in chosen if x != i] + [j]
            new, w_new = _fit(b, kmat, trial, ridge)
            evals += 1
            f_new = float(b[new] @ w_new) if new else 0.0
            if f_new > best * (1.0 + tol):
                chosen, best, improved = new, f_new, True
                break
            if evals >= max_evals:
                break
    return chosen


def _greedy_subset(b: np.ndarray, kmat: np.ndarray, k: int, ridge: float, tol: float,
                   swap_evals: int | None) -> list[int]:
    """The greedy ``ρ`` subset, 1-swap polished (``swap_evals`` None: small problems only)."""
    greedy = _greedy(b, kmat, k, ridge, tol)
    if swap_evals is None:  # auto: polish small problems only (cost ~ n k fits)
        swap_evals = SWAP_EVALS if b.shape[0] * k <= SWAP_AUTO_MAX else 0
    return _swap_search(b, kmat, greedy, ridge, tol, swap_evals) if swap_evals > 0 else greedy


def _top(b: np.ndarray, k: int) -> list[int]:
    return [int(j) for j in np.argsort(-b, kind="stable")[:k]]


def _held_out_gain(per_target: np.ndarray, kmat: np.ndarray, k: int, ridge: float, tol: float,
                   swap_evals: int | None) -> float | None:
    """``Σ_folds ρ_test(greedy_fit) − ρ_test(top_fit)``: each rule's subset and NNLS weights
    from one half of the target examples, ``ρ`` on the other (module docstring)."""
    if per_target.shape[0] < 2:
        return None
    halves = (per_target[0::2].mean(axis=0), per_target[1::2].mean(axis=0))
    gain = 0.0
    for fit, test in (halves, halves[::-1]):
        for sign, rule in ((1.0, _greedy_subset(fit, kmat, k, ridge, tol, swap_evals)),
                           (-1.0, _top(fit, k))):
            idx, w = _fit(fit, kmat, rule, ridge)
            gain += sign * (_rho(test, kmat, np.asarray(idx), w) if idx else 0.0)
    return gain


def _shrink_to_uniform(
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
    kept, w_fit = _fit(b, kmat, chosen, ridge)
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
        top = _top(b, k)
        options = []
        chosen = []
        if subset == "validated" and per_target_all is not None:
            validation = _held_out_gain(per_target_all[:, pos], kmat, k, ridge, tol,
                                        swap_evals)
        if subset == "uniform":  # scored at uniform weights: no NNLS refit drops one
            chosen = sorted(_best_uniform(b, kmat, k))
        elif subset == "topk" or (validation is not None and not validation > 0.0):
            options.append(top)
        elif subset == "residual":  # its own order: comparing on ρ would undo it
            options.append(_greedy(b, kmat, k, ridge, tol, residual=True))
        elif temperature > 0.0:  # a draw: polishing or comparing would undo it
            options.append(_greedy(b, kmat, k, ridge, tol, temperature, generator))
        else:
            options += [_greedy_subset(b, kmat, k, ridge, tol, swap_evals), top]
        best_f = -1.0
        for cand in options:
            new, w = _fit(b, kmat, cand, ridge)
            f = _rho(b, kmat, np.asarray(new, dtype=np.int64), w) if new else 0.0
            if f > best_f * (1.0 + 1e-12):
                chosen, best_f = new, f

    # the weight stage: NNLS on the subset (a refit in another order may zero a weight)
    shrink = None
    if weighting == "nnls":
        chosen, w = _fit(b_w, kmat, sorted(chosen), ridge)
        w = w / w.sum() if chosen else w
    else:
        if fill and len(chosen) < k:
            rest = [int(j) for j in np.argsort(-b, kind="stable") if int(j) not in chosen]
            chosen = chosen + rest[: k - len(chosen)]
        chosen = sorted(chosen)
        w = np.full(len(chosen), 1.0 / max(1, len(chosen)))
        if weighting == "shrink" and len(chosen) > 1:
            per_target = None if per_target_all is None else per_target_all[:, pos]
            w, shrink = _shrink_to_uniform(b_w, kmat, chosen, ridge, per_target)
    idx = np.asarray(chosen, dtype=np.int64)
    rho = _rho(b, kmat, idx, w) if chosen else 0.0  # of the update: ρ is scale-free
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
