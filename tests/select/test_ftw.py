"""filter_then_weight: quality against exhaustive search, redundancy, filtering, weights."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.optimize
import torch

from gradsift.select import alignment_ratio, filter_then_weight, ftw_solve


def _instance(seed: int, kind: str, b: int = 12, d: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """b = G t, K = G Gᵀ from explicit random vectors G (B × d)."""
    rng = np.random.default_rng(seed)
    t = rng.standard_normal(d)
    if kind == "gaussian":
        g = rng.standard_normal((b, d)) + 0.3 * t
    elif kind == "clusters":  # groups of near-duplicates
        centers = rng.standard_normal((4, d)) + 0.5 * t
        g = centers[rng.integers(0, 4, b)] + 0.05 * rng.standard_normal((b, d))
    else:  # norms spread over e^±3
        g = (rng.standard_normal((b, d)) + 0.3 * t) * np.exp(rng.uniform(-3, 3, (b, 1)))
    return g @ t, g @ g.T


def _rho(b: np.ndarray, k: np.ndarray, idx, w) -> float:
    idx = np.asarray(idx, dtype=int)
    w = np.asarray(w, dtype=float)
    return float(b[idx] @ w / math.sqrt(w @ k[np.ix_(idx, idx)] @ w))


def _nnls_rho(b: np.ndarray, k: np.ndarray, subset: tuple[int, ...]) -> float:
    """Best ρ on a subset: NNLS through an eigen-factor of K_S (independent of the library)."""
    ks = k[np.ix_(subset, subset)]
    lam, vec = np.linalg.eigh(ks)
    keep = lam > 1e-12 * lam.max()
    a = np.sqrt(lam[keep])[:, None] * vec[:, keep].T  # AᵀA = K_S
    y = (vec[:, keep].T @ b[list(subset)]) / np.sqrt(lam[keep])  # Aᵀy = b_S
    w, _ = scipy.optimize.nnls(a, y)
    if w.sum() <= 0:
        return 0.0
    return _rho(b, k, subset, w)


def _exhaustive(b: np.ndarray, k: np.ndarray, budget: int) -> float:
    return max(
        _nnls_rho(b, k, s)
        for r in range(1, budget + 1)
        for s in itertools.combinations(range(len(b)), r)
    )


def _check_selection(idx: torch.Tensor, w: torch.Tensor, budget: int) -> None:
    assert idx.dtype == torch.long and w.dtype == torch.float32
    assert idx.numel() == w.numel() <= budget
    assert len(set(idx.tolist())) == idx.numel()
    if idx.numel():
        assert bool((w > 0).all())
        assert float(w.sum()) == pytest.approx(1.0, abs=1e-6)


def test_quality_against_exhaustive_search() -> None:
    ratios = []
    for seed in range(45):
        kind = ("gaussian", "clusters", "mixed")[seed % 3]
        b, k = _instance(seed, kind)
        idx, w = filter_then_weight(torch.tensor(b), torch.tensor(k), 3)
        _check_selection(idx, w, 3)
        rho = _rho(b, k, idx.numpy(), w.numpy())
        top = np.argsort(-b)[:3]
        rho_top = _rho(b, k, top, np.full(3, 1 / 3))
        assert rho >= rho_top - 1e-9 * abs(rho_top), (seed, kind, rho, rho_top)
        ratios.append(rho / _exhaustive(b, k, 3))
    assert float(np.mean(ratios)) >= 0.98, ratios
    assert max(ratios) <= 1 + 1e-6


def test_exact_duplicates_take_budget_once() -> None:
    e = np.eye(6)
    target = e[0] + e[1] + e[2]
    # three copies of the best candidate (ρ² = 1 each, 1 together), one distinct good one
    # (ρ² = 0.8) and one distinct weak one (ρ² = 0.09/4.09)
    g = np.stack(
        [2 * e[0], 2 * e[0], 2 * e[0] + 1e-3 * e[5], e[1] + 0.5 * e[4], 0.3 * e[2] + 2 * e[3]]
    )
    b, k = torch.tensor(g @ target), torch.tensor(g @ g.T)
    idx, w = filter_then_weight(b, k, 2)
    _check_selection(idx, w, 2)
    chosen = set(idx.tolist())
    assert len(chosen & {0, 1, 2}) == 1 and 3 in chosen  # top-k by b would take two copies
    # with budget 4: still one copy, plus the weak distinct one; a second copy adds nothing,
    # so fewer than k are selected
    res = ftw_solve(b, k, 4)
    idx4, w4 = res.indices, res.weights
    assert len(set(idx4.tolist()) & {0, 1, 2}) == 1 and {3, 4} <= set(idx4.tolist())
    assert idx4.numel() == 3 and "add to rho" in res.note
    assert alignment_ratio(b, k, idx4, w4) > alignment_ratio(b, k, idx, w)


def test_all_negative_alignment_selects_nothing_and_says_so() -> None:
    b, k = _instance(0, "gaussian")
    res = ftw_solve(-torch.tensor(np.abs(b)), torch.tensor(k), 3)
    assert res.indices.numel() == 0 and res.weights.numel() == 0
    assert res.rho == 0.0 and res.n_filtered == 0
    assert "alignment <= 0" in res.note


def test_never_spends_budget_on_non_positive_alignment() -> None:
    rng = np.random.default_rng(5)
    g = rng.standard_normal((10, 20))
    t = rng.standard_normal(20)
    b = g @ t
    b[np.argsort(-b)[2:]] = -np.abs(b[np.argsort(-b)[2:]])  # only two positive
    b[np.argsort(-b)[2]] = 0.0
    res = ftw_solve(torch.tensor(b), torch.tensor(g @ g.T), 5)
    assert set(res.indices.tolist()) <= set(np.flatnonzero(b > 0).tolist())
    assert res.n_positive == 2 and "only 2" in res.note


def test_non_finite_candidates_are_excluded() -> None:
    b, k = _instance(1, "gaussian")
    best = int(np.argmax(b))
    b_t, k_t = torch.tensor(b), torch.tensor(k)
    b_t[best] = float("nan")
    second = int(np.argsort(-b)[1])
    k_t[second, 4 if second != 4 else 5] = float("inf")
    res = ftw_solve(b_t, k_t, 3)
    _check_selection(res.indices, res.weights, 3)
    assert best not in res.indices.tolist() and second not in res.indices.tolist()
    assert res.indices.numel() > 0 and math.isfinite(res.rho)
    # an inf in a column excludes the row's partner too
    partner = 4 if second != 4 else 5
    assert partner not in res.indices.tolist() and res.n_finite == 12 - 3


def test_nnls_weights_maximize_rho_on_the_subset() -> None:
    b, k = _instance(7, "mixed")
    idx, w = filter_then_weight(torch.tensor(b), torch.tensor(k), 4)
    rho = _rho(b, k, idx.numpy(), w.numpy())
    rng = np.random.default_rng(0)
    for _ in range(300):
        other = rng.dirichlet(np.ones(idx.numel()))
        assert _rho(b, k, idx.numpy(), other) <= rho + 1e-9
    assert rho == pytest.approx(_nnls_rho(b, k, tuple(idx.tolist())), rel=1e-6)


def test_uniform_weighting_and_topk_subset() -> None:
    b, k = _instance(3, "clusters")
    bt, kt = torch.tensor(b), torch.tensor(k)
    idx, w = filter_then_weight(bt, kt, 3, weighting="uniform")
    assert torch.allclose(w, torch.full_like(w, 1 / idx.numel()))
    idx_top, _ = filter_then_weight(bt, kt, 3, subset="topk")
    positive_top = [i for i in np.argsort(-b)[:3] if b[i] > 0]
    assert set(idx_top.tolist()) <= set(positive_top)


def test_min_cosine_filter() -> None:
    e = np.eye(4)
    target = e[0]
    g = np.stack([e[0], 10 * (0.1 * e[0] + e[1]), e[0] + e[2]])  # cosines 1, ~0.1, ~0.71
    b, k = torch.tensor(g @ target), torch.tensor(g @ g.T)
    res = ftw_solve(b, k, 3, min_cosine=0.5, target_sq_norm=1.0)
    assert 1 not in res.indices.tolist() and res.n_filtered == 2
    with pytest.raises(ValueError, match="target_sq_norm"):
        ftw_solve(b, k, 3, min_cosine=0.5)


def test_budget_zero_and_argument_checks() -> None:
    b, k = _instance(2, "gaussian")
    idx, w = filter_then_weight(torch.tensor(b), torch.tensor(k), 0)
    assert idx.numel() == 0 and w.numel() == 0
    with pytest.raises(ValueError, match="gram"):
        filter_then_weight(torch.tensor(b), torch.tensor(k[:5, :5]), 2)
    with pytest.raises(ValueError, match="subset"):
        filter_then_weight(torch.tensor(b), torch.tensor(k), 2, subset="nope")
    with pytest.raises(TypeError):
        filter_then_weight(torch.tensor(b), torch.tensor(k), 2, bogus=1)


def test_alignment_ratio_by_hand() -> None:
    b = torch.tensor([1.0, 2.0, -1.0])
    k = torch.tensor([[2.0, 0.5, 0.0], [0.5, 3.0, 0.1], [0.0, 0.1, 1.0]])
    idx, w = torch.tensor([0, 1]), torch.tensor([0.25, 0.75])
    expected = (0.25 + 1.5) / math.sqrt(0.25**2 * 2 + 2 * 0.25 * 0.75 * 0.5 + 0.75**2 * 3)
    assert alignment_ratio(b, k, idx, w) == pytest.approx(expected)
    assert alignment_ratio(b, k, torch.tensor([], dtype=torch.long), torch.tensor([])) == 0.0


def test_large_instance_is_valid_and_beats_topk() -> None:
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(256, generator=gen)
    g = torch.randn(256, 256, generator=gen) + 0.2 * t
    g[128:] = g[:128] + 0.01 * torch.randn(128, 256, generator=gen)  # every row has a twin
    b, k = g @ t, g @ g.T
    idx, w = filter_then_weight(b, k, 64)
    _check_selection(idx, w, 64)
    top = torch.topk(b, 64).indices
    assert alignment_ratio(b, k, idx, w) > alignment_ratio(b, k, top, torch.full((64,), 1 / 64))
    twins = set((idx % 128).tolist())
    assert len(twins) >= 0.9 * idx.numel()  # near-duplicates rarely both take budget


def _mean_cosine(g: np.ndarray, t: np.ndarray, subset) -> float:
    """Cosine between the mean of the subset's gradient vectors and the target, directly."""
    mean = g[list(subset)].mean(axis=0)
    return float(mean @ t / np.linalg.norm(mean))


@pytest.mark.parametrize("n,budget", [(8, 2), (12, 4), (20, 5)])  # 20 choose 5 > 4096: greedy
def test_uniform_subset_maximizes_the_mean_gradients_cosine(n: int, budget: int) -> None:
    for seed in range(3):
        rng = np.random.default_rng(seed)
        t = rng.standard_normal(30)
        g = (rng.standard_normal((n, 30)) + 0.4 * t) * np.exp(rng.uniform(-1, 1, (n, 1)))
        g[1] = g[0] * 1.01  # a near-copy: two copies have the cosine of one
        res = ftw_solve(torch.tensor(g @ t), torch.tensor(g @ g.T), budget,
                        subset="uniform", weighting="uniform")
        idx = res.indices.tolist()
        eligible = [i for i in range(n) if g[i] @ t > 0]
        assert len(idx) == min(budget, len(eligible)) and set(idx) <= set(eligible)
        assert torch.allclose(res.weights, torch.full((len(idx),), 1.0 / len(idx)))
        got = _mean_cosine(g, t, idx)
        assert res.rho == pytest.approx(got, rel=1e-9)
        best = max(_mean_cosine(g, t, s) for s in itertools.combinations(eligible, len(idx)))
        if math.comb(len(eligible), budget) <= 4096:
            assert got == pytest.approx(best, rel=1e-12)
        else:  # greedy + 1-swaps: no single swap improves it, and it beats top-k by b
            for i, j in itertools.product(idx, set(eligible) - set(idx)):
                assert _mean_cosine(g, t, [x if x != i else j for x in idx]) <= got + 1e-12
            top = sorted(eligible, key=lambda i: -(g[i] @ t))[:budget]
            assert got >= _mean_cosine(g, t, top) - 1e-12
            assert got >= 0.9 * best


def _nnls_vec(g: np.ndarray, t: np.ndarray, idx: list[int]) -> tuple[list[int], float]:
    """NNLS of the target on the explicit vectors ``g[idx]``: the support and ``ρ² = bᵀw``."""
    if not idx:
        return [], 0.0
    w, _ = scipy.optimize.nnls(g[idx].T, t)
    keep = [i for i, wi in zip(idx, w, strict=True) if wi > 1e-12 * w.max()]
    return keep, float((g[idx] @ t) @ w)


def _gains(g: np.ndarray, t: np.ndarray, chosen: list[int], banned: set[int]) -> np.ndarray:
    """The greedy's gain ``r_j²/s_j`` after ``chosen`` (NNLS weights), from explicit vectors:
    the residual of the target's projection and each candidate's part orthogonal to the chosen."""
    if chosen:
        gs = g[chosen]
        w, _ = scipy.optimize.nnls(gs.T, t)
        q, _ = np.linalg.qr(gs.T)
        resid_t, orth = t - gs.T @ w, g - (g @ q) @ q.T
    else:
        resid_t, orth = t, g
    r = g @ resid_t
    out = np.where(r > 0, r * r / np.maximum((orth * orth).sum(axis=1), 1e-300), 0.0)
    out[chosen + sorted(banned)] = 0.0
    f, f_scale = _nnls_vec(g, t, chosen)[1], float(np.max((g @ t) ** 2 / (g * g).sum(1)))
    return np.where(out > 1e-6 * max(f, f_scale), out, 0.0)


def _law(gain: np.ndarray, tau: float) -> np.ndarray:
    if not (gain > 0).any():
        return np.zeros_like(gain)
    z = np.where(gain > 0, (gain / gain.max() - 1.0) / tau, -np.inf)
    p = np.exp(z - z.max())
    return p / p.sum()


def _draw_outcomes(g: np.ndarray, t: np.ndarray, k: int, tau: float) -> dict[tuple, float]:
    """The law of the drawn subset by enumerating every path of draws: a draw is added, a
    refit that zeroes a weight drops (and bans) that candidate, a refit that does not raise
    ``ρ²`` bans the drawn one; stop at ``k`` or when no gain is left."""
    out: dict[tuple, float] = {}

    def walk(chosen: list[int], banned: set[int], prob: float) -> None:
        law = _law(_gains(g, t, chosen, banned), tau) if len(chosen) < k else None
        if law is None or not law.any():
            key = tuple(sorted(chosen))
            out[key] = out.get(key, 0.0) + prob
            return
        f = _nnls_vec(g, t, chosen)[1]
        for j in np.flatnonzero(law):
            new, f_new = _nnls_vec(g, t, chosen + [int(j)])
            dropped = set(chosen + [int(j)]) - set(new)
            if f_new <= f:
                walk(chosen, banned | dropped | {int(j)}, prob * law[j])
            else:
                walk(new, banned | dropped, prob * law[j])

    walk([], set(), 1.0)
    return out


def test_temperature_draws_follow_the_stated_law() -> None:
    """``temperature``: each addition is drawn with ``p ∝ exp((gain/max − 1)/τ)``; the
    frequencies of the chosen subsets match the law of every path of draws, enumerated on
    explicit vectors (on this batch a refit drops a candidate on some paths); τ → 0 takes the
    best gain."""
    rng = np.random.default_rng(3)
    t = rng.standard_normal(12)
    g = rng.standard_normal((6, 12)) + 0.6 * t
    g[5] = -g[5] if g[5] @ t > 0 else g[5]  # one candidate against the target: never drawn
    b, k = torch.tensor(g @ t), torch.tensor(g @ g.T)
    tau, n = 0.5, 3000
    gen = torch.Generator().manual_seed(0)
    for budget in (1, 2):
        law = _draw_outcomes(g, t, budget, tau)
        assert sum(law.values()) == pytest.approx(1.0)
        assert not any(5 in key for key in law)
        seen: dict[tuple, int] = {}
        for _ in range(n):
            res = ftw_solve(b, k, budget, weighting="uniform", temperature=tau, generator=gen)
            key = tuple(res.indices.tolist())
            seen[key] = seen.get(key, 0) + 1
        assert set(seen) <= set(law)
        for key, prob in law.items():
            assert abs(seen.get(key, 0) / n - prob) <= 4 * (prob * (1 - prob) / n) ** 0.5 + 1e-3
    best = int(np.argmax(_gains(g, t, [], set())))
    cold = ftw_solve(b, k, 1, temperature=1e-9, generator=gen)
    assert cold.indices.tolist() == [best]
    with pytest.raises(ValueError, match="temperature"):
        ftw_solve(b, k, 2, subset="topk", temperature=0.5)


def test_norm_clip_trains_on_the_clipped_gradients() -> None:
    """``norm_clip=c``: each gradient clipped to ``c`` × the median norm, by hand. Taking every
    aligned candidate with uniform weights, the weights are ``f_i/Σf`` and ρ is the cosine of
    the clipped mean with the target; the unclipped update is pulled towards the outlier."""
    rng = np.random.default_rng(5)
    t = rng.standard_normal(20)
    g = rng.standard_normal((7, 20)) + 0.5 * t
    g = np.where((g @ t)[:, None] > 0, g, -g)  # all aligned
    g[0] = 60.0 * (rng.standard_normal(20) + 0.1 * t)  # a huge gradient, barely aligned
    if g[0] @ t < 0:
        g[0] = -g[0]
    norms = np.linalg.norm(g, axis=1)
    f = np.minimum(1.0, 2.0 * np.median(norms) / norms)
    assert f[0] < 0.1 and (f < 1).sum() >= 1
    b, k = torch.tensor(g @ t), torch.tensor(g @ g.T)
    res = ftw_solve(b, k, 7, weighting="uniform", fill=True, norm_clip=2.0)
    assert res.indices.tolist() == list(range(7)) and res.n_clipped == int((f < 1).sum())
    np.testing.assert_allclose(res.weights.numpy(), f / f.sum(), rtol=1e-6)
    update = (res.weights.double().numpy()[:, None] * g).sum(axis=0)
    cos = float(update @ t / np.linalg.norm(update) / np.linalg.norm(t))
    assert res.rho == pytest.approx(cos * np.linalg.norm(t), rel=1e-6)  # ρ = ‖t‖ cos here
    plain = ftw_solve(b, k, 7, weighting="uniform", fill=True)
    raw = g.mean(axis=0)
    assert cos > float(raw @ t / np.linalg.norm(raw) / np.linalg.norm(t)) + 0.1
    assert plain.n_clipped == 0
    with pytest.raises(ValueError, match="norm_clip"):
        ftw_solve(b, k, 2, norm_clip=-1.0)


def _held_out_single(bt: np.ndarray, k: np.ndarray) -> tuple[float, int]:
    """subset='validated' at k=1, by hand: a single candidate's ρ is ``b_i/√K_ii``, so greedy
    takes the largest of those (among b_i > 0) and top-1 the largest ``b_i``; each is chosen
    on one half of the target examples and scored on the other. Returns the summed held-out
    gain and the candidate the rule must pick on all of ``b``."""
    norms = np.sqrt(np.diag(k))
    b = bt.mean(axis=0)
    eligible = b > 0
    halves = (bt[0::2].mean(axis=0), bt[1::2].mean(axis=0))
    gain = 0.0
    for fit, test in (halves, halves[::-1]):
        ok = eligible & (fit > 0)
        if not ok.any():  # no candidate aligned on this half: neither rule picks one
            continue
        greedy = int(np.argmax(np.where(ok, fit / norms, -np.inf)))
        top = int(np.argmax(np.where(eligible, fit, -np.inf)))
        gain += test[greedy] / norms[greedy] - test[top] / norms[top]
    pick = np.argmax(np.where(eligible, b / norms, -np.inf)) if gain > 0 else np.argmax(
        np.where(eligible, b, -np.inf))
    return gain, int(pick)


def test_validated_subset_keeps_greedy_only_when_it_wins_on_held_out_targets() -> None:
    """Against the hand computation at k=1 on random instances (both outcomes occur)."""
    outcomes = set()
    for seed in range(40):
        rng = np.random.default_rng(seed)
        g = (rng.standard_normal((8, 5)) + 0.4) * np.exp(rng.uniform(-1, 1, (8, 1)))
        targets = rng.standard_normal((6, 5)) + 0.4  # 6 target examples
        bt = targets @ g.T  # (n_t, B): B_ti = ⟨g_i, t⟩
        k = g @ g.T
        gain, pick = _held_out_single(bt, k)
        res = ftw_solve(torch.tensor(bt.mean(axis=0)), torch.tensor(k), 1, subset="validated",
                        weighting="uniform", target_align=torch.tensor(bt))
        assert res.validation == pytest.approx(gain, rel=1e-9, abs=1e-12)
        assert res.indices.tolist() == [pick]
        outcomes.add(gain > 0)
    assert outcomes == {True, False}


def test_validated_subset_keeps_greedy_against_near_copies() -> None:
    """Three near-copies of the best-aligned record, which also points off the target, and a
    record that carries the target's other part: the top-3 by b takes the copies, greedy one
    copy and the complement, and held out (every target example has both parts) greedy
    wins."""
    rng = np.random.default_rng(0)
    e = np.eye(6)
    copies = [2.0 * (e[0] + 0.6 * e[2]) + 0.01 * rng.standard_normal(6) for _ in range(3)]
    g = np.stack(copies + [0.8 * e[1], 0.3 * e[3], 0.3 * e[4]])
    targets = np.stack([e[0] + e[1] + 0.1 * rng.standard_normal(6) for _ in range(8)])
    bt = targets @ g.T
    b, k = bt.mean(axis=0), g @ g.T
    assert set(np.argsort(-b)[:3]) == {0, 1, 2}  # the top-3 are the copies
    res = ftw_solve(torch.tensor(b), torch.tensor(k), 3, subset="validated",
                    weighting="uniform", target_align=torch.tensor(bt))
    assert res.validation is not None and res.validation > 0
    assert len(set(res.indices.tolist()) & {0, 1, 2}) == 1 and 3 in res.indices.tolist()
    # without target examples there is nothing to validate on: the greedy subset
    plain = ftw_solve(torch.tensor(b), torch.tensor(k), 3, subset="greedy", weighting="uniform")
    alone = ftw_solve(torch.tensor(b), torch.tensor(k), 3, subset="validated",
                      weighting="uniform")
    assert alone.validation is None and alone.indices.tolist() == plain.indices.tolist()


def _matching_pursuit(b: np.ndarray, k: np.ndarray, budget: int) -> list[int]:
    """Non-negative matching pursuit by hand: add the candidate with the largest residual
    alignment ``r = b − K w``, refit ``min_{w≥0} wᵀKw − 2bᵀw`` (scipy's NNLS on an
    eigen-factor of ``K_S``), drop and never retry a candidate whose weight falls to zero;
    stop when no ``r_j`` is positive."""
    chosen: list[int] = []
    banned: set[int] = set()
    w = np.zeros(0)
    while len(chosen) < budget:
        r = b - k[:, chosen] @ w
        r[chosen + sorted(banned)] = -np.inf
        j = int(np.argmax(r))
        if not r[j] > 1e-9 * b.max():
            break
        trial = chosen + [j]
        lam, vec = np.linalg.eigh(k[np.ix_(trial, trial)])
        a = (vec * np.sqrt(np.clip(lam, 0, None))).T  # aᵀa = K_S
        y = np.linalg.lstsq(a.T, b[trial], rcond=None)[0]  # aᵀ y = b_S
        w_trial, _ = scipy.optimize.nnls(a, y)
        kept = w_trial > 1e-9 * w_trial.max()
        banned |= {i for i, keep in zip(trial, kept, strict=True) if not keep}
        if kept[-1]:
            chosen, w = [i for i, keep in zip(trial, kept, strict=True) if keep], w_trial[kept]
    return chosen


@pytest.mark.parametrize("kind", ["gaussian", "clusters", "spread"])
def test_residual_subset_is_matching_pursuit(kind: str) -> None:
    """``subset='residual'`` picks what the hand-written matching pursuit picks (the order
    need not be kept, the set must), on instances with near-duplicates and spread norms."""
    for seed in range(10):
        b, k = _instance(seed, kind)
        res = ftw_solve(torch.tensor(b), torch.tensor(k), 4, subset="residual",
                        weighting="uniform", fill=False)
        expected = _matching_pursuit(b, k, 4)
        assert sorted(res.indices.tolist()) == sorted(expected)
