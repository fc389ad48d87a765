"""Every registered selector on a real SelectionContext: tiny Llama, real AdamW state."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.optimize
import torch
from reference import reference_losses, tiny_llama

from gradsift.capture import per_sample_grads
from gradsift.factors import FactorizedGrads
from gradsift.objective import alignment, interaction
from gradsift.optim_state import read_optimizer_state
from gradsift.select import (
    Selection,
    SelectionContext,
    Selector,
    alignment_ratio,
    available_selectors,
    filter_then_weight,
    ftw_solve,
    get_selector,
    register_selector,
)
from gradsift.select.baselines import RandomSelector

B = 8
FTW_NAMES = {"ftw", "ftw-nnls", "ftw-filter-only", "ftw-weight-only", "ftw-sgd", "ftw-next-step",
             "ftw-next-step-weights"}


def _batch(b: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (b, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # one padded sample
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture(scope="module")
def world():
    model = tiny_llama(tie=False).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    reference_losses(model, _batch(4, 99)).mean().backward()
    opt.step()
    opt.zero_grad()
    cands = per_sample_grads(model, _batch(B, 1))
    names = cands.param_names
    params = dict(model.named_parameters())
    target_loss = reference_losses(model, _batch(4, 2)).mean()
    g_v = torch.autograd.grad(target_loss, [params[n] for n in names])
    target = dict(zip(names, g_v, strict=True))
    state = read_optimizer_state(opt, model, names)
    return cands, target, state


def ftw_in_state_p(**options) -> Selector:
    """ftw scored in the optimizer state's ``P``, the geometry the hand computations of the
    tests below use (the default, ``adam-next``, has a test of its own)."""
    return get_selector("ftw", geometry="adam", **options)


def _ctx(world, k: int, seed: int = 0) -> SelectionContext:
    cands, target, state = world
    return SelectionContext(cands, target, state, k, torch.Generator().manual_seed(seed))


def test_registry_lists_every_method() -> None:
    expected = {"random", "loss", "gradnorm", "greats", "cosine", "opus", "full"} | FTW_NAMES
    assert set(available_selectors()) == expected


@pytest.mark.parametrize(
    "name", sorted({"random", "loss", "gradnorm", "greats", "cosine", "opus", "full"} | FTW_NAMES)
)
@pytest.mark.parametrize("k", [3, 20])
def test_every_selector_respects_the_budget(world, name: str, k: int) -> None:
    selector = get_selector(name)
    assert selector.name == name
    sel = selector.select(_ctx(world, k))
    assert isinstance(sel, Selection)
    n = sel.indices.numel()
    assert sel.indices.dtype == torch.long and sel.weights.dtype == torch.float32
    assert len(set(sel.indices.tolist())) == n == sel.weights.numel()
    assert all(0 <= i < B for i in sel.indices.tolist())
    if name == "full":
        assert n == B  # reference only: ignores the budget
    elif name in FTW_NAMES:
        assert n <= min(k, B)
    else:
        assert n == min(k, B)
    if n:
        assert bool((sel.weights > 0).all()) and float(sel.weights.sum()) == pytest.approx(1.0)
    assert sel.scores.shape == (B,) and sel.scores.dtype == torch.float32
    diag = sel.diagnostics
    for key in ("rho", "n_filtered", "n_selected", "seconds"):
        assert key in diag
    assert diag["n_selected"] == n
    if n < k:
        assert isinstance(diag.get("note"), str) and diag["note"]
    json.dumps(diag)
    assert selector.state_dict() == {}
    selector.load_state_dict(selector.state_dict())


def test_random_is_deterministic_given_the_generator(world) -> None:
    picks = [get_selector("random").select(_ctx(world, 4, seed=s)).indices for s in (5, 5, 6)]
    assert torch.equal(picks[0], picks[1])
    draws = {
        tuple(get_selector("random").select(_ctx(world, 4, seed=s)).indices.tolist())
        for s in range(8)
    }
    assert len(draws) > 1
    assert not RandomSelector.needs_grads and not RandomSelector.needs_target


def test_loss_and_gradnorm_rank_by_their_scores(world) -> None:
    cands, _, _ = world
    sel = get_selector("loss").select(_ctx(world, 3))
    assert set(sel.indices.tolist()) == set(torch.topk(cands.losses, 3).indices.tolist())
    mat = cands.materialize()
    norms = sum(g.flatten(1).pow(2).sum(1) for g in mat.values()).sqrt()
    sel = get_selector("gradnorm").select(_ctx(world, 3))
    assert set(sel.indices.tolist()) == set(torch.topk(norms, 3).indices.tolist())
    torch.testing.assert_close(sel.scores, norms, rtol=1e-4, atol=1e-6)


def test_cosine_is_less_cosine_from_materialized_grads(world) -> None:
    cands, target, state = world
    p = state.preconditioner
    mat = cands.materialize()
    pg = {n: mat[n] * p[n] for n in mat}  # P g_i
    dots = sum((pg[n] * target[n]).flatten(1).sum(1) for n in mat)
    norms = sum(pg[n].flatten(1).pow(2).sum(1) for n in mat).sqrt()
    t_norm = math.sqrt(sum(float(target[n].pow(2).sum()) for n in mat))
    cos = dots / (norms * t_norm)
    sel = get_selector("cosine").select(_ctx(world, 3))
    torch.testing.assert_close(sel.scores, cos, rtol=1e-4, atol=1e-6)
    assert set(sel.indices.tolist()) == set(torch.topk(cos, 3).indices.tolist())
    assert float(sel.scores.abs().max()) <= 1 + 1e-5


def test_greats_matches_a_plain_greedy(world) -> None:
    cands, target, state = world
    mat = cands.materialize()
    flat = torch.cat([mat[n].flatten(1) for n in cands.param_names], 1).double().numpy()
    tflat = torch.cat([target[n].flatten() for n in cands.param_names]).double().numpy()
    b, k = flat @ tflat, flat @ flat.T
    for eta in (None, 50.0):  # the optimizer's lr (≈ top-k by b), and a large one
        lr = state.mean_lr() if eta is None else eta
        chosen: list[int] = []
        for _ in range(4):
            score = lr * b - lr**2 * k[:, chosen].sum(1)
            score[chosen] = -np.inf
            chosen.append(int(np.argmax(score)))
        options = {} if eta is None else {"lr": eta}
        sel = get_selector("greats", **options).select(_ctx(world, 4))
        assert set(sel.indices.tolist()) == set(chosen)
        assert torch.allclose(sel.weights, torch.full((4,), 0.25))
        assert sel.diagnostics["rho_geometry"] == "sgd"


def test_ftw_selector_is_filter_then_weight_on_b_and_k(world) -> None:
    cands, target, state = world
    p = state.preconditioner
    for name, pre, kwargs in [
        ("ftw", p, {"weighting": "shrink", "fill": True}),
        ("ftw-nnls", p, {}),
        ("ftw-sgd", None, {"weighting": "shrink", "fill": True}),
        ("ftw-weight-only", p, {"subset": "topk", "weighting": "shrink", "fill": True}),
        ("ftw-filter-only", p, {"weighting": "uniform", "fill": True}),
    ]:
        b = alignment(cands, target, pre)
        kmat = interaction(cands, pre)
        idx, w = filter_then_weight(b, kmat, 3, **kwargs)
        # in the state's P (the default, adam-next, has its own test below)
        options = {} if name == "ftw-sgd" else {"geometry": "adam"}
        sel = get_selector(name, **options).select(_ctx(world, 3))
        assert torch.equal(sel.indices, idx), name
        torch.testing.assert_close(sel.weights, w)
        assert sel.diagnostics["rho"] == pytest.approx(alignment_ratio(b, kmat, idx, w), rel=1e-5)
        torch.testing.assert_close(sel.scores, b.float())


def test_ftw_logs_the_cosines_min_cosine_filters_on(world) -> None:
    cands, target, state = world
    p = state.preconditioner
    mat = cands.materialize()
    dots = sum((mat[n] * p[n] * target[n]).flatten(1).sum(1) for n in mat).double()
    sq = sum((mat[n] * p[n] * mat[n]).flatten(1).sum(1) for n in mat).double()
    t_sq = sum(float((target[n] * p[n] * target[n]).sum()) for n in mat)
    cos = (dots / (sq * t_sq).sqrt()).numpy()  # in Adam's metric ⟨x, P y⟩
    sel = ftw_in_state_p().select(_ctx(world, 3))
    np.testing.assert_allclose(sel.diagnostics["cosines"], cos, rtol=1e-4, atol=1e-6)
    positive = cos[cos > 0]
    assert positive.size >= 3
    top = np.sort(positive)[::-1]
    threshold = float(top[1] + top[2]) / 2  # between two cosines: no rounding tie
    passing = set(np.flatnonzero(cos >= threshold).tolist())
    cut = ftw_in_state_p(min_cosine=threshold).select(_ctx(world, 3))
    assert cut.diagnostics["n_filtered"] == len(passing)
    assert set(cut.indices.tolist()) <= passing  # fill tops up from the eligible only
    assert json.loads(json.dumps(cut.diagnostics)) == cut.diagnostics


def test_ftw_options_reach_the_objective(world) -> None:
    base = ftw_in_state_p().select(_ctx(world, 3))
    ident = ftw_in_state_p(curvature="identity", momentum_correction=True).select(
        _ctx(world, 3)
    )
    assert ident.diagnostics["curvature"] == "identity"
    assert not torch.equal(base.scores, ident.scores)  # momentum-corrected alignment differs


def test_ftw_with_no_aligned_candidate_selects_nothing_and_says_so(world) -> None:
    cands, target, state = world
    zero = {n: torch.zeros_like(g) for n, g in target.items()}  # b = 0 for every candidate
    ctx = SelectionContext(cands, zero, state, 3, torch.Generator())
    for name in sorted(FTW_NAMES):
        sel = get_selector(name).select(ctx)
        assert sel.indices.numel() == 0 and sel.weights.numel() == 0, name
        assert sel.diagnostics["rho"] == 0.0 and sel.diagnostics["n_filtered"] == 0
        assert "alignment <= 0" in sel.diagnostics["note"]


def test_non_finite_loss_ranks_last(world) -> None:
    cands, target, state = world
    losses = cands.losses.clone()
    top = int(torch.argmax(losses))
    losses[top] = float("nan")
    ctx = SelectionContext(
        FactorizedGrads(cands.layers, losses), target, state, B - 1, torch.Generator()
    )
    sel = get_selector("loss").select(ctx)
    assert top not in sel.indices.tolist() and sel.indices.numel() == B - 1
    assert sel.diagnostics["n_nonfinite"] == 1


def test_options_and_registry_errors() -> None:
    with pytest.raises(ValueError, match="available: .*ftw"):
        get_selector("nope")
    with pytest.raises(ValueError, match="'bogus'"):
        get_selector("ftw", bogus=1)
    with pytest.raises(ValueError, match="curvature"):
        get_selector("ftw", curvature="newton")
    with pytest.raises(ValueError, match="min_cosine"):
        get_selector("ftw", min_cosine=2.0)
    with pytest.raises(ValueError, match="geometry"):
        get_selector("ftw-sgd", geometry="adam")
    with pytest.raises(ValueError, match="lr"):
        get_selector("greats", lr=-1.0)
    with pytest.raises(ValueError, match="already registered"):
        register_selector("ftw", Selector)
    with pytest.raises(ValueError, match="stateless"):
        get_selector("loss").load_state_dict({"x": 1})


def test_target_required(world) -> None:
    cands, _, state = world
    ctx = SelectionContext(cands, None, state, 3, torch.Generator())
    with pytest.raises(ValueError, match="target"):
        get_selector("cosine").select(ctx)
    assert get_selector("loss").select(ctx).indices.numel() == 3


def _per_target_world(cand_seed: int, n_target: int, target_seed: int):
    """A tiny Llama after one AdamW step, B candidates' factors, and by brute force (one
    autograd call per target example) the per-example alignments ``B_ti = ⟨g_i, P g_t⟩``
    (float64, (n_target, B)) and their mean target gradient."""
    model = tiny_llama(tie=False).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    reference_losses(model, _batch(4, 99)).mean().backward()
    opt.step()
    opt.zero_grad()
    cands = per_sample_grads(model, _batch(B, cand_seed))
    names = cands.param_names
    params = dict(model.named_parameters())
    t_batch = _batch(n_target, target_seed)
    per_example = []
    for t in range(n_target):
        loss = reference_losses(model, {k: v[t : t + 1] for k, v in t_batch.items()})[0]
        per_example.append(dict(zip(names, torch.autograd.grad(
            loss, [params[n] for n in names]), strict=True)))
    target = {n: sum(e[n] for e in per_example) / n_target for n in names}
    state = read_optimizer_state(opt, model, names)
    p, g = state.preconditioner, cands.materialize()
    b_t = torch.tensor([[
        float(sum((g[n][i].double() * p[n].double() * e[n].double()).sum() for n in names))
        for i in range(B)] for e in per_example], dtype=torch.float64)
    return model, cands, state, target, b_t, t_batch


def test_ftw_shrink_weights_follow_the_per_target_evidence() -> None:
    """ftw's default weights: uniform + s (nnls − uniform), s = d̄²/(d̄² + se²), recomputed by
    hand from per-target-example gradients taken one at a time with autograd."""
    model, cands, state, target, b_t, t_batch = _per_target_world(1, 4, 2)
    b = b_t.mean(0)
    kmat = interaction(cands, state.preconditioner).double()

    sel_nnls = get_selector("ftw-nnls", geometry="adam").select(SelectionContext(
        cands, target, state, 3, torch.Generator().manual_seed(0)))
    ctx = SelectionContext(cands, target, state, 3, torch.Generator().manual_seed(0),
                           target_samples=per_sample_grads(model, t_batch))
    sel = ftw_in_state_p().select(ctx)
    pos = sel.indices.tolist()
    # the subset is FTW's (the nnls variant's), filled up to k by alignment
    assert len(pos) == 3 and set(sel_nnls.indices.tolist()) <= set(pos)
    w_u = torch.full((3,), 1.0 / 3, dtype=torch.float64)
    w_n = torch.zeros(3, dtype=torch.float64)
    for i, w in zip(sel_nnls.indices.tolist(), sel_nnls.weights.double(), strict=True):
        w_n[pos.index(i)] = w
    k_ss = kmat[pos][:, pos]
    d = (b_t[:, pos] @ w_n / (w_n @ k_ss @ w_n).sqrt()
         - b_t[:, pos] @ w_u / (w_u @ k_ss @ w_u).sqrt())
    mean, se2 = float(d.mean()), float(d.var()) / 4
    s = mean**2 / (mean**2 + se2) if mean > 0 else 0.0
    assert sel.diagnostics["shrink"] == pytest.approx(s, rel=1e-3, abs=1e-6)
    torch.testing.assert_close(sel.weights.double(), w_u + s * (w_n - w_u), rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(sel.scores.double(), b, rtol=1e-4, atol=1e-6)


def test_ftw_chooses_its_subset_on_the_posterior_alignment() -> None:
    """``alignment=posterior``: the subset is FTW's on ``b`` recomputed by hand from
    per-target-example gradients (autograd one example at a time), shrunk by its noise. On this
    batch the posterior changes the subset."""
    model, cands, state, target, b_t, t_batch = _per_target_world(5, 5, 4)
    b_t = b_t.numpy()
    mean, se2 = b_t.mean(0), b_t.var(0, ddof=1) / 5
    kmat = interaction(cands, state.preconditioner).double()
    n2 = np.diag(kmat.numpy())  # squared norms in Adam's metric: shrink the cosines
    tau2 = (mean**2 / n2).mean() - (se2 / n2).mean()
    assert tau2 > 0
    want = mean * tau2 / (tau2 + se2 / n2)
    ctx = SelectionContext(cands, target, state, 3, torch.Generator().manual_seed(0),
                           target_samples=per_sample_grads(model, t_batch))
    sel = ftw_in_state_p(alignment="posterior", weighting="uniform").select(ctx)
    expected, _ = filter_then_weight(torch.as_tensor(want), kmat, 3, weighting="uniform",
                                     fill=True)
    assert sel.indices.tolist() == expected.tolist()
    torch.testing.assert_close(sel.scores.double(), torch.as_tensor(mean), rtol=1e-4, atol=1e-6)
    assert get_selector("ftw", alignment="posterior").needs_target_samples
    plain = ftw_in_state_p(weighting="uniform").select(ctx)
    assert plain.indices.tolist() != sel.indices.tolist()


def test_opus_scores_are_preconditioned_alignments(world) -> None:
    """OPUS' utilities ⟨P g_i, g_V⟩, against materialized gradients."""
    cands, target, state = world
    p = state.preconditioner
    g = cands.materialize()
    u = torch.stack([
        sum((g[n][i].double() * p[n].double() * target[n].double()).sum()
            for n in cands.param_names) for i in range(len(cands))
    ])
    sel = get_selector("opus").select(_ctx(world, 2))
    torch.testing.assert_close(sel.scores.double(), u, rtol=1e-4, atol=1e-6)


def test_opus_draws_follow_the_boltzmann_distribution() -> None:
    """k=1: the empirical draw frequencies match softmax(z/τ) of the standardized utilities;
    k=2: the second draw's law, by brute force over the first."""
    from gradsift.select.baselines import boltzmann_draws

    u = torch.tensor([0.3, -1.0, 2.0, 0.5, 1.1], dtype=torch.float64)
    kmat = torch.eye(5, dtype=torch.float64) + 0.5
    z = (u - u.mean()) / u.std()
    expected = torch.softmax(z / 0.9, dim=0)
    gen = torch.Generator().manual_seed(0)
    n = 4000
    counts = torch.zeros(5, dtype=torch.float64)
    for _ in range(n):
        counts[boltzmann_draws(u, kmat, 1, 0.1, 0.9, gen)[0]] += 1
    tol = 4 * (expected * (1 - expected) / n).sqrt() + 1e-3  # 4 binomial standard errors
    assert torch.all((counts / n - expected).abs() <= tol), (counts / n, expected)
    # pairs: P({i, j}) = p1(i) p2(j | i) + p1(j) p2(i | j)
    def second(first: int) -> torch.Tensor:
        left = torch.ones(5, dtype=torch.bool)
        left[first] = False
        v = u - 0.1 * kmat[:, first]
        zz = (v[left] - v[left].mean()) / v[left].std()
        out = torch.zeros(5, dtype=torch.float64)
        out[left] = torch.softmax(zz / 0.9, dim=0)
        return out
    pair = {}
    for i in range(5):
        for j in range(5):
            if i != j:
                key = (min(i, j), max(i, j))
                pair[key] = pair.get(key, 0.0) + float(expected[i] * second(i)[j])
    seen: dict = {}
    for _ in range(n):
        key = tuple(boltzmann_draws(u, kmat, 2, 0.1, 0.9, gen)[0].tolist())
        seen[key] = seen.get(key, 0) + 1
    for key, prob in pair.items():
        assert abs(seen.get(key, 0) / n - prob) <= 4 * (prob * (1 - prob) / n) ** 0.5 + 1e-3


def test_opus_penalizes_a_duplicate_of_a_drawn_candidate(world) -> None:
    """With two identical candidates and a large η, the second copy's utility after the first
    is drawn is far below the rest: it is (almost) never drawn together with its twin."""
    cands, target, state = world
    twin = cands.select(torch.tensor([0, 0, 1, 2, 3, 4]))
    sel = get_selector("opus", lr=1e6)
    gen = torch.Generator().manual_seed(1)
    both = 0
    for _ in range(200):
        idx = sel.select(SelectionContext(twin, target, state, 2, gen)).indices.tolist()
        both += idx == [0, 1]
    assert both <= 2


def test_ftw_crossfit_chooses_on_one_half_and_weighs_on_the_other() -> None:
    """``crossfit``: the subset is FTW's on the mean alignment of the even target examples and
    the shrink weights are fitted on the odd ones, all recomputed by hand from per-example
    gradients (autograd one example at a time)."""
    model, cands, state, target, b_t, t_batch = _per_target_world(1, 6, 2)
    kmat = interaction(cands, state.preconditioner).double()
    ctx = SelectionContext(cands, target, state, 3, torch.Generator().manual_seed(0),
                           target_samples=per_sample_grads(model, t_batch))
    sel = ftw_in_state_p(crossfit=True).select(ctx)
    half_a, half_b = b_t[0::2], b_t[1::2]
    expected, _ = filter_then_weight(half_a.mean(0), kmat, 3, weighting="uniform", fill=True)
    pos = sel.indices.tolist()
    assert pos == expected.tolist() and len(pos) == 3
    # NNLS on the subset against the odd half's mean: min wᵀKw − 2 bᵀw, w ≥ 0
    k_ss = kmat[pos][:, pos].numpy()
    chol = np.linalg.cholesky(k_ss + 1e-9 * np.trace(k_ss) / 3 * np.eye(3))
    w_n, _ = scipy.optimize.nnls(chol.T, np.linalg.solve(chol, half_b.mean(0)[pos].numpy()))
    w_n = torch.as_tensor(w_n / w_n.sum())
    w_u = torch.full((3,), 1.0 / 3, dtype=torch.float64)
    k_t = torch.as_tensor(k_ss)
    d = (half_b[:, pos] @ w_n / (w_n @ k_t @ w_n).sqrt()
         - half_b[:, pos] @ w_u / (w_u @ k_t @ w_u).sqrt())
    mean, se2 = float(d.mean()), float(d.var()) / 3
    s = mean**2 / (mean**2 + se2) if mean > 0 else 0.0
    assert 0.0 < s < 1.0
    torch.testing.assert_close(sel.weights.double(), w_u + s * (w_n - w_u), rtol=1e-3, atol=1e-5)
    plain = ftw_in_state_p().select(ctx)
    assert (plain.indices.tolist(), plain.weights.tolist()) != (pos, sel.weights.tolist())
    few = SelectionContext(cands, target, state, 3, torch.Generator().manual_seed(0),
                           target_samples=per_sample_grads(model, {
                               n: v[:3] for n, v in t_batch.items()}))
    assert "4 target examples" in ftw_in_state_p(crossfit=True).select(few).diagnostics[
        "note_crossfit"]


def test_ftw_validated_subset_reads_the_per_example_alignments() -> None:
    """``subset='validated'``: the selector's held-out comparison runs on the per-target-example
    alignments recomputed by hand (autograd one example at a time), and its choice is logged."""
    model, cands, state, target, b_t, t_batch = _per_target_world(1, 6, 2)
    kmat = interaction(cands, state.preconditioner).double()
    ctx = SelectionContext(cands, target, state, 3, torch.Generator().manual_seed(0),
                           target_samples=per_sample_grads(model, t_batch))
    sel = ftw_in_state_p(subset="validated").select(ctx)
    expected = ftw_solve(b_t.mean(0), kmat, 3, subset="validated", weighting="shrink",
                         fill=True, target_align=b_t)
    assert sel.diagnostics["validation"] == pytest.approx(expected.validation, rel=1e-3,
                                                          abs=1e-6)
    assert sel.diagnostics["subset_used"] == ("greedy" if expected.validation > 0 else "topk")
    assert sel.indices.tolist() == expected.indices.tolist()
    with pytest.raises(ValueError, match="crossfit and subset 'validated'"):
        get_selector("ftw", subset="validated", crossfit=True)


def test_ftw_snr_subset_switches_on_the_target_batch_noise() -> None:
    """``subset='snr'``: the signal-to-noise of ``b``, recomputed by hand from per-target-example
    gradients taken one at a time with autograd, picks the top-``k`` where it is below 1 (four
    random target examples) and the greedy where the examples all pull alike (one repeated)."""
    model, cands, state, target, b_t, t_batch = _per_target_world(2, 4, 4)
    kmat = interaction(cands, state.preconditioner).double()
    n_t = b_t.shape[0]
    mean = [sum(float(b_t[t, i]) for t in range(n_t)) / n_t for i in range(B)]
    noise = sum(sum((float(b_t[t, i]) - mean[i]) ** 2 for t in range(n_t)) / (n_t - 1)
                for i in range(B)) / n_t
    snr = (sum(m * m for m in mean) - noise) / noise
    assert snr < 1.0

    def ctx(samples, direction) -> SelectionContext:
        return SelectionContext(cands, direction, state, 2, torch.Generator().manual_seed(0),
                                target_samples=per_sample_grads(model, samples))

    sel = ftw_in_state_p(subset="snr").select(ctx(t_batch, target))
    top = ftw_solve(b_t.mean(0), kmat, 2, subset="topk", weighting="shrink", fill=True,
                    target_align=b_t)
    greedy = ftw_in_state_p().select(ctx(t_batch, target))
    assert sel.indices.tolist() == top.indices.tolist() != greedy.indices.tolist()
    assert sel.diagnostics["target_snr"] == pytest.approx(snr, rel=1e-3, abs=1e-6)
    assert sel.diagnostics["subset_used"] == "topk"
    # one target example four times: no noise, the greedy subset (which differs from the top-k)
    one = {n: v[1:2].repeat(4, *([1] * (v.dim() - 1))) for n, v in t_batch.items()}
    direction = {n: g.mean(0) for n, g in per_sample_grads(model, one).materialize().items()}
    sel = ftw_in_state_p(subset="snr").select(ctx(one, direction))
    plain = ftw_in_state_p().select(ctx(one, direction))
    top = ftw_in_state_p(subset="topk").select(ctx(one, direction))
    assert sel.indices.tolist() == plain.indices.tolist() != top.indices.tolist()
    assert sel.diagnostics["subset_used"] == "greedy" and sel.diagnostics["target_snr"] is None
    with pytest.raises(ValueError, match="crossfit and subset 'snr'"):
        get_selector("ftw", subset="snr", crossfit=True)


def test_ftw_temperature_and_norm_clip_on_a_real_context(world) -> None:
    """``temperature`` draws with the context's generator (same seed, same subset; several
    subsets over seeds); ``norm_clip`` counts and scales the clipped candidates by hand."""
    picks = {seed: tuple(ftw_in_state_p(temperature=5.0).select(
        _ctx(world, 2, seed)).indices.tolist()) for seed in range(12)}
    again = ftw_in_state_p(temperature=5.0).select(_ctx(world, 2, 3)).indices.tolist()
    assert tuple(again) == picks[3] and len(set(picks.values())) > 1
    cands, target, state = world
    kmat = interaction(cands, state.preconditioner).double()
    b = alignment(cands, target, state.preconditioner).double()
    norms = kmat.diagonal().sqrt()
    mid = sorted(norms.tolist())[B // 2 - 1: B // 2 + 1]  # the median of an even count
    f = torch.clamp(0.8 * (mid[0] + mid[1]) / 2 / norms, max=1.0)
    sel = ftw_in_state_p(norm_clip=0.8, weighting="uniform").select(_ctx(world, B))
    assert sel.diagnostics["n_clipped"] == int((f < 1).sum()) >= 1
    idx = sel.indices.tolist()
    assert idx == [i for i in range(B) if b[i] > 0]  # every aligned one: k = B, filled
    torch.testing.assert_close(sel.weights.double(), f[idx] / f[idx].sum(), rtol=1e-5,
                               atol=1e-7)


@pytest.mark.parametrize("options,match", [
    ({"crossfit": True, "weighting": "uniform"}, "crossfit"),
    ({"crossfit": "yes"}, "crossfit"),
    ({"temperature": 0.5, "subset": "topk"}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"norm_clip": -2.0}, "norm_clip"),
    ({"norm_clip": 2.0, "weighting": "next-step"}, "norm_clip"),
])
def test_ftw_new_option_errors(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        get_selector("ftw", **options)


def test_ftw_adam_next_uses_the_preconditioner_of_the_step_about_to_be_taken() -> None:
    """LoRA starts with ``B = 0``, so ``A``'s first gradient is zero, Adam's ``v`` stays zero
    there and the state's ``P = 1/(√v̂ + ε)`` is ``1/ε``. ``adam-next`` scores on
    ``1/(√v̂' + ε)``, ``v' = β₂ v + (1−β₂) g_V²``: by hand from the optimizer's raw tensors,
    ``b`` and ``K`` from materialized per-sample gradients."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(tie=False), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)).train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values(), lr=1e-3, betas=(0.9, 0.99))
    reference_losses(model, _batch(4, 99)).mean().backward()
    opt.step()
    opt.zero_grad()
    cands = per_sample_grads(model, _batch(B, 1))
    names = cands.param_names
    target_loss = reference_losses(model, _batch(4, 2)).mean()
    target = dict(zip(names, torch.autograd.grad(target_loss, [params[n] for n in names]),
                      strict=True))
    state = read_optimizer_state(opt, model, names)
    a_names = [n for n in names if "lora_A" in n]
    assert a_names and all(torch.all(state.preconditioner[n] == 1e8) for n in a_names)
    p_next = {}
    for n in names:
        raw = opt.state[params[n]]  # step 1 taken: this is step 2's
        v = 0.99 * raw["exp_avg_sq"] + 0.01 * target[n] ** 2
        p_next[n] = 1.0 / ((v / (1 - 0.99**2)).sqrt() + 1e-8)
    # A's share of ⟨g_i, P ĝ⟩ over all candidates: nearly all of it under the state's P
    mat = cands.materialize()

    def a_share(p: dict[str, torch.Tensor]) -> float:
        part = {n: float((mat[n] * p[n] * target[n]).abs().sum()) for n in names}
        return sum(part[n] for n in a_names) / sum(part.values())
    assert a_share(state.preconditioner) > 0.9 and a_share(p_next) < 0.1
    flat = torch.cat([mat[n].flatten(1) for n in names], 1).double()
    pflat = torch.cat([p_next[n].flatten() for n in names]).double()
    tflat = torch.cat([target[n].flatten() for n in names]).double()
    b = flat @ (pflat * tflat)
    kmat = (flat * pflat) @ flat.T
    idx, w = filter_then_weight(b, kmat, 3, weighting="shrink", fill=True)
    ctx = SelectionContext(cands, target, state, 3, torch.Generator().manual_seed(0))
    sel = get_selector("ftw").select(ctx)  # the default geometry
    torch.testing.assert_close(sel.scores.double(), b, rtol=1e-4, atol=1e-8)
    assert torch.equal(sel.indices, idx)
    torch.testing.assert_close(sel.weights.double(), w.double(), rtol=1e-4, atol=1e-6)
    assert sel.diagnostics["geometry"] == "adam-next"
    # under the state's P the same candidates are scored on A's gradients alone (P = 1e8)
    old = ftw_in_state_p().select(ctx)
    assert not torch.allclose(old.scores.double(), b, rtol=1e-2)
    # an optimizer without Adam's moments: the state's P, and the log says so
    sgd_state = read_optimizer_state(torch.optim.SGD(params.values(), lr=1e-3), model, names)
    fallback = get_selector("ftw", geometry="adam-next").select(
        SelectionContext(cands, target, sgd_state, 3, torch.Generator().manual_seed(0)))
    assert fallback.diagnostics["geometry"] == "adam"


def test_ftw_adam_next_scales_fresh_embedding_rows_like_the_known_ones() -> None:
    """Full fine-tuning with untied embeddings: the rows of tokens neither the run nor the
    target batch has used have ``v = 0`` and ``ĝ = 0``, so ``1/(√v̂' + ε)`` would be ``1/ε``
    there. ``adam-next`` gives them the mean ``v̂'`` of the embedding's other rows: checked by
    hand from the optimizer's raw tensors and materialized gradients, the count of such
    coordinates from the token sets alone, and a candidate with one such token against its
    twin without it."""
    vocab, hidden = 256, 32
    model = tiny_llama(tie=False, vocab=vocab).train()
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(params.values(), lr=1e-3, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(3)

    def batch(ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    warm, target_ids = (torch.randint(0, 64, (8, 12), generator=gen) for _ in range(2))
    reference_losses(model, batch(warm)).mean().backward()
    opt.step()
    opt.zero_grad()
    cand_ids = torch.randint(0, 64, (6, 12), generator=gen)
    cand_ids[5] = cand_ids[4]
    cand_ids[5, 5] = 200  # the twin of candidate 4 with one token never used before
    cands = per_sample_grads(model, batch(cand_ids))
    names = cands.param_names
    target = dict(zip(names, torch.autograd.grad(
        reference_losses(model, batch(target_ids)).mean(), [params[n] for n in names]),
        strict=True))
    state = read_optimizer_state(opt, model, names)
    sel = get_selector("ftw").select(
        SelectionContext(cands, target, state, 2, torch.Generator().manual_seed(0)))
    # an embedding row gets a gradient where its token is an input to a scored position
    used = set(warm[:, :-1].flatten().tolist()) | set(target_ids[:, :-1].flatten().tolist())
    assert sel.diagnostics["n_fresh"] == (vocab - len(used)) * hidden
    p_next, p_eps = {}, {}
    for n in names:
        v = (0.99 * opt.state[params[n]]["exp_avg_sq"] + 0.01 * target[n] ** 2) / (1 - 0.99**2)
        p_eps[n] = 1.0 / (v.sqrt() + 1e-8)
        if n == "model.embed_tokens.weight":
            rows = sorted(used)
            v = v.clone()
            v[[t for t in range(vocab) if t not in used]] = v[rows].mean()
        else:
            assert torch.all(v > 0)
        p_next[n] = 1.0 / (v.sqrt() + 1e-8)
    mat = cands.materialize()
    flat = torch.cat([mat[n].flatten(1) for n in names], 1).double()
    tflat = torch.cat([target[n].flatten() for n in names]).double()

    def b_and_kdiag(p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        pflat = torch.cat([p[n].flatten() for n in names]).double()
        return flat @ (pflat * tflat), (flat * flat * pflat).sum(1)

    b, kdiag = b_and_kdiag(p_next)
    torch.testing.assert_close(sel.scores.double(), b, rtol=1e-4, atol=1e-8)
    # the twin's norm in the metric: close to candidate 4's here, ~1e4 times it at 1/ε
    assert 0.5 < float(kdiag[5] / kdiag[4]) < 2.0
    kdiag_eps = b_and_kdiag(p_eps)[1]
    assert float(kdiag_eps[5] / kdiag_eps[4]) > 1e3
