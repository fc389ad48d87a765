"""The subset rules' building blocks against brute force: NNLS by enumerating supports."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from gradsift.select.subsets import greedy_forward, nnls_fit, subset_rho, top_k


def _nnls_by_supports(kmat: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, float]:
    """``min_{w≥0} wᵀKw − 2bᵀw``: the unconstrained optimum on every support, the best
    feasible one (the KKT point of a convex problem lies on one of them)."""
    n = b.size
    best_w, best_f = np.zeros(n), 0.0
    for r in range(1, n + 1):
        for sup in itertools.combinations(range(n), r):
            s = list(sup)
            w_s = np.linalg.solve(kmat[np.ix_(s, s)], b[s])
            if (w_s >= 0).all():
                w = np.zeros(n)
                w[s] = w_s
                f = w @ kmat @ w - 2 * b @ w
                if f < best_f:
                    best_w, best_f = w, f
    return best_w, best_f


@pytest.mark.parametrize("seed", range(5))
def test_nnls_fit_and_rho_match_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((6, 10))
    t = rng.standard_normal(10)
    b, kmat = g @ t, g @ g.T
    idx = list(range(6))
    kept, w = nnls_fit(b, kmat, idx, ridge=0.0)
    want, _ = _nnls_by_supports(kmat, b)
    assert kept == [i for i in idx if want[i] > 0]
    np.testing.assert_allclose(w, want[kept], rtol=1e-6, atol=1e-9)
    # at the optimum ρ² = bᵀw*, and ρ is the cosine of Σ w_i g_i with t times |t|
    rho = subset_rho(b, kmat, np.asarray(kept), w)
    assert rho**2 == pytest.approx(float(b[kept] @ w), rel=1e-6)
    u = w @ g[kept]
    assert rho == pytest.approx(u @ t / np.linalg.norm(u), rel=1e-9)


def test_top_k_is_stable_and_greedy_takes_one_of_two_copies() -> None:
    assert top_k(np.array([1.0, 3.0, 3.0, 2.0]), 2) == [1, 2]  # ties keep the first
    g = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.2, 0.2, 1.0]])
    t = np.array([1.0, 0.8, 0.1])
    chosen = greedy_forward(g @ t, g @ g.T, 3, ridge=1e-9, tol=1e-6)
    assert len({0, 1} & set(chosen)) == 1 and 2 in chosen
