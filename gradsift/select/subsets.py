"""The subset rules of Filter-then-Weight, on the alignments ``b`` and interactions ``K``.

For a subset ``S`` the best non-negative weights solve ``min_{w≥0} wᵀKw − 2bᵀw`` (``nnls_fit``)
and then ``ρ(S)² = bᵀw*``, ``ρ = bᵀw/√(wᵀKw)`` (``subset_rho``). The rules that choose ``S``
(the math of each: ``gradsift.select.ftw``'s module docstring): greedy forward selection on the
gain ``r_j²/s_j`` or on ``r_j`` (``greedy_forward``), its 1-swap polish (``swap_search``,
``greedy_subset``), the top ``k`` by ``b`` (``top_k``), the best subset at uniform weights
(``best_uniform_subset``) and the two-fold held-out comparison of greedy and top-``k``
(``held_out_gain``). Indices are into ``b``; everything is float64 NumPy on the CPU.
"""

from __future__ import annotations

import itertools
from math import comb

import numpy as np
import scipy.linalg
import scipy.optimize
import torch

# the "uniform" subset: every subset of size k is scored when there are at most this many
EXHAUSTIVE_MAX = 4096
# 1-swap polishing: at most SWAP_EVALS NNLS fits, by default only when n_eligible * k is small.
SWAP_EVALS = 200
SWAP_AUTO_MAX = 1024


def solve_nnls(k_ss: np.ndarray, b_s: np.ndarray, ridge: float) -> np.ndarray:
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


def subset_rho(b: np.ndarray, kmat: np.ndarray, idx: np.ndarray, w: np.ndarray) -> float:
    if idx.size == 0:
        return 0.0
    num = float(b[idx] @ w)
    den = float(w @ kmat[np.ix_(idx, idx)] @ w)
    if den <= 0.0:
        return 0.0
    return num / np.sqrt(den)


def nnls_fit(
    b: np.ndarray, kmat: np.ndarray, idx: list[int], ridge: float
) -> tuple[list[int], np.ndarray]:
    """NNLS on ``idx``; returns the indices with positive weight and those weights."""
    if not idx:
        return [], np.zeros(0)
    arr = np.asarray(idx)
    w = solve_nnls(kmat[np.ix_(arr, arr)], b[arr], ridge)
    keep = w > 1e-12 * max(float(w.max(initial=0.0)), np.finfo(np.float64).tiny)
    return [i for i, kept in zip(idx, keep, strict=True) if kept], w[keep]


def greedy_forward(b: np.ndarray, kmat: np.ndarray, k: int, ridge: float, tol: float,
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
        new, w_new = nnls_fit(b, kmat, chosen + [j], ridge)
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


def uniform_rho(b: np.ndarray, kmat: np.ndarray, subsets: np.ndarray) -> np.ndarray:
    """``ρ_u(S) = Σ_S b / √(1ᵀ K_S 1)`` for each row of ``subsets`` (m, s) of indices."""
    num = b[subsets].sum(axis=1)
    den = kmat[subsets[:, :, None], subsets[:, None, :]].sum(axis=(1, 2))
    return num / np.sqrt(np.maximum(den, np.finfo(np.float64).tiny))


def best_uniform_subset(b: np.ndarray, kmat: np.ndarray, k: int, max_swaps: int = SWAP_EVALS
                  ) -> list[int]:
    """The subset of size ``min(k, n)`` with the largest ``ρ_u`` (module docstring)."""
    n = b.shape[0]
    k = min(k, n)
    if k == 0:
        return []
    if comb(n, k) <= EXHAUSTIVE_MAX:
        subsets = np.array(list(itertools.combinations(range(n), k)), dtype=np.int64)
        return [int(i) for i in subsets[int(np.argmax(uniform_rho(b, kmat, subsets)))]]
    chosen: list[int] = []
    for _ in range(k):  # greedy: the candidate whose addition gives the largest ρ_u
        rest = np.array([j for j in range(n) if j not in chosen], dtype=np.int64)
        trials = np.concatenate([np.tile(chosen, (rest.size, 1)).astype(np.int64),
                                 rest[:, None]], axis=1)
        chosen.append(int(rest[np.argmax(uniform_rho(b, kmat, trials))]))
    best = float(uniform_rho(b, kmat, np.array([chosen]))[0])
    for _ in range(max_swaps):  # best-improvement 1-swaps, each round scored at once
        rest = [j for j in range(n) if j not in chosen]
        trials = np.array([[x if x != i else j for x in chosen]
                           for i in chosen for j in rest], dtype=np.int64)
        scores = uniform_rho(b, kmat, trials)
        top = int(np.argmax(scores))
        if scores[top] <= best * (1.0 + 1e-12):
            break
        chosen, best = [int(x) for x in trials[top]], float(scores[top])
    return chosen


def swap_search(
    b: np.ndarray, kmat: np.ndarray, chosen: list[int], ridge: float, tol: float, max_evals: int
) -> list[int]:
    """First-improvement 1-swap local search on ``ρ²(S)`` within ``max_evals`` NNLS fits."""
    if not chosen:
        return chosen
    n = b.shape[0]
    chosen, w = nnls_fit(b, kmat, chosen, ridge)
    best = float(b[chosen] @ w) if chosen else 0.0
    evals = 0
    improved = True
    while improved and evals < max_evals:
        improved = False
        outside = [j for j in range(n) if j not in chosen]
        for i, j in itertools.product(list(chosen), outside):
            trial = [x for x in chosen if x != i] + [j]
            new, w_new = nnls_fit(b, kmat, trial, ridge)
            evals += 1
            f_new = float(b[new] @ w_new) if new else 0.0
            if f_new > best * (1.0 + tol):
                chosen, best, improved = new, f_new, True
                break
            if evals >= max_evals:
                break
    return chosen


def greedy_subset(b: np.ndarray, kmat: np.ndarray, k: int, ridge: float, tol: float,
                   swap_evals: int | None) -> list[int]:
    """The greedy ``ρ`` subset, 1-swap polished (``swap_evals`` None: small problems only)."""
    greedy = greedy_forward(b, kmat, k, ridge, tol)
    if swap_evals is None:  # auto: polish small problems only (cost ~ n k fits)
        swap_evals = SWAP_EVALS if b.shape[0] * k <= SWAP_AUTO_MAX else 0
    return swap_search(b, kmat, greedy, ridge, tol, swap_evals) if swap_evals > 0 else greedy


def top_k(b: np.ndarray, k: int) -> list[int]:
    return [int(j) for j in np.argsort(-b, kind="stable")[:k]]


def held_out_gain(per_target: np.ndarray, kmat: np.ndarray, k: int, ridge: float, tol: float,
                   swap_evals: int | None) -> float | None:
    """``Σ_folds ρ_test(greedy_fit) − ρ_test(top_fit)``: each rule's subset and NNLS weights
    from one half of the target examples, ``ρ`` on the other (module docstring)."""
    if per_target.shape[0] < 2:
        return None
    halves = (per_target[0::2].mean(axis=0), per_target[1::2].mean(axis=0))
    gain = 0.0
    for fit, test in (halves, halves[::-1]):
        for sign, rule in ((1.0, greedy_subset(fit, kmat, k, ridge, tol, swap_evals)),
                           (-1.0, top_k(fit, k))):
            idx, w = nnls_fit(fit, kmat, rule, ridge)
            gain += sign * (subset_rho(test, kmat, np.asarray(idx), w) if idx else 0.0)
    return gain
