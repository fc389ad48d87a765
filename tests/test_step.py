"""The selection step's cheap path: selectors that read only indices or losses.

``random`` (indices), ``loss`` (losses) and ``full`` (indices) skip the per-sample capture and
train on their k through one forward+backward over the k. The update must be the one the
gradient path writes from the factors, and the one a plain training step on the chosen rows
gives (independent computation: the model's full logits, a fresh collate of the chosen
examples, ``.backward()`` of their mean loss, the same clipping and AdamW).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from reference import make_examples, reference_losses, tiny_llama

from gradsift.data import collate
from gradsift.select import get_selector
from gradsift.select.baselines import LossSelector, RandomSelector
from gradsift.step import SelectionConfig, SelectionStep


class GradsRandom(RandomSelector):
    """``random`` forced through the gradient path (capture over B, update from factors)."""

    needs = "grads"


class GradsLoss(LossSelector):
    needs = "grads"


def _step(model, selector, k=3, micro=3, seed=0):
    cfg = SelectionConfig(budget_per_step=k, micro_batch_size=micro)
    return SelectionStep(model, selector, make_examples(4, seed=9), cfg, seed=seed)


def _grads(model):
    return {n: None if p.grad is None else p.grad.clone()
            for n, p in model.named_parameters() if p.requires_grad}


def test_what_each_selector_reads():
    needs = {n: get_selector(n).needs for n in ("random", "loss", "full", "greats", "ftw")}
    assert needs == {"random": "indices", "loss": "losses", "full": "indices",
                     "greats": "grads", "ftw": "grads"}
    assert not RandomSelector.needs_grads and GradsRandom.needs_grads

    class Legacy(RandomSelector):  # written before `needs`: losses are the safe reading
        needs_grads = False

    assert Legacy.needs == "losses"
    with pytest.raises(ValueError, match="needs must be one of"):
        type("Bad", (RandomSelector,), {"needs": "everything"})


@pytest.mark.parametrize("cheap,dear", [(RandomSelector, GradsRandom),
                                        (LossSelector, GradsLoss)])
@pytest.mark.parametrize("accumulate", [False, True])
def test_the_cheap_path_writes_the_gradient_paths_update(cheap, dear, accumulate):
    """Full fine-tuning of a tied Llama (embedding, norms, head): same indices, same .grad."""
    examples = make_examples(7, seed=3)
    grads, results = [], []
    for selector_class in (cheap, dear):
        model = tiny_llama(seed=1, tie=True)
        step = _step(model, selector_class())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for p in model.parameters():
            p.grad = torch.ones_like(p)  # what accumulate adds to (or replace overwrites)
        results.append(step.run(step.batches(examples), opt, grad_scale=0.5,
                                accumulate=accumulate))
        grads.append(_grads(model))
    cheap_result, dear_result = results
    assert torch.equal(cheap_result.selection.indices, dear_result.selection.indices)
    assert torch.equal(cheap_result.weights, dear_result.weights)
    assert set(cheap_result.timing) == set(dear_result.timing) == {
        "capture", "target", "selection", "update"}
    for name, g in grads[1].items():
        torch.testing.assert_close(grads[0][name], g, rtol=1e-4, atol=1e-6, msg=name)
    assert cheap_result.train_loss == pytest.approx(dear_result.train_loss, rel=1e-5)
    chosen = cheap_result.selection.indices
    torch.testing.assert_close(cheap_result.candidates.losses[chosen],
                               dear_result.candidates.losses[chosen], rtol=1e-5, atol=1e-6)
    unknown = torch.isnan(cheap_result.candidates.losses)
    if cheap is RandomSelector:  # indices only: the unchosen candidates were never run
        assert unknown.sum() == 7 - len(chosen) and not unknown[chosen].any()
    else:
        assert not unknown.any()


@pytest.mark.parametrize("method", ["random", "loss", "full"])
def test_two_cheap_steps_equal_plain_training_on_the_chosen_rows(method):
    """Two steps (AdamW state after the first), clipping at 1.0: the clipped gradients and the
    parameters match a plain forward/backward of the chosen examples' mean loss to float
    tolerance. (AdamW's ``eps`` is 1e-3 here: with 1e-8 a gradient entry within float noise of
    0 moves by up to ``lr`` either way, on either side.)"""
    examples = [make_examples(7, seed=s) for s in (4, 5)]
    model = tiny_llama(seed=2, tie=True)
    ref = copy.deepcopy(model)
    step = _step(model, get_selector(method))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-3)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-3)
    for batch in examples:
        result = step.run(step.batches(batch), opt)
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
        grads = _grads(model)
        opt.step()
        opt.zero_grad(set_to_none=True)

        chosen = result.selection.indices.tolist()
        assert len(chosen) == (7 if method == "full" else 3)
        ref.train()
        rows = collate([batch[i] for i in chosen], 0)
        losses = reference_losses(ref, rows)
        losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 1.0)
        for name, g in _grads(ref).items():
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-7,
                                       msg=lambda m, name=name: f"{name}: {m}")
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        torch.testing.assert_close(result.candidates.losses[chosen], losses.detach(),
                                   rtol=1e-5, atol=1e-6)
        assert result.train_loss == pytest.approx(float(losses.detach().mean()), rel=1e-5)
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_loss_ranks_by_the_losses_of_all_b():
    examples = make_examples(7, seed=6)
    model = tiny_llama(seed=3)
    with torch.no_grad():
        expected = reference_losses(model.train(), collate(examples, 0))
    step = _step(model, get_selector("loss"), k=2)
    result = step.run(step.batches(examples), torch.optim.AdamW(model.parameters()))
    torch.testing.assert_close(result.candidates.losses, expected, rtol=1e-5, atol=1e-6)
    assert set(result.selection.indices.tolist()) == set(torch.topk(expected, 2).indices.tolist())
    assert result.candidate_loss == pytest.approx(float(expected.mean()), rel=1e-5)


def test_random_reports_the_mean_loss_of_what_it_ran():
    examples = make_examples(7, seed=7)
    model = tiny_llama(seed=3)
    step = _step(model, get_selector("random"), k=2)
    result = step.run(step.batches(examples), torch.optim.AdamW(model.parameters()))
    chosen = result.selection.indices
    assert result.candidate_loss == pytest.approx(
        float(result.candidates.losses[chosen].mean()), rel=1e-6)
    assert math.isfinite(result.train_loss)


@pytest.mark.parametrize("method", ["ftw", "greats"])
def test_a_second_pass_over_the_chosen_rows_writes_the_factors_update(method):
    """``second_pass`` (the two-pass route the benchmark measures): same selection, and the
    forward+backward over the chosen rows gives the gradient assembled from the factors."""
    examples = make_examples(7, seed=11)
    grads, results = [], []
    for second_pass in (False, True):
        model = tiny_llama(seed=4, tie=True)
        step = _step(model, get_selector(method), seed=2)
        step.second_pass = second_pass
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        results.append(step.run(step.batches(examples), opt))
        grads.append(_grads(model))
    assert torch.equal(results[0].selection.indices, results[1].selection.indices)
    torch.testing.assert_close(results[0].weights, results[1].weights)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_target_ema_is_the_bias_corrected_average_of_the_target_batches():
    """``target_ema=β``: after n refreshes g_V = Σ_j β^{n−j}(1−β) g_j / (1−β^n), each g_j the
    mean gradient of that refresh's target batch by a plain ``.backward()`` (the model does not
    move: no optimizer step). Resume keeps the count the bias correction needs."""
    beta = 0.7
    model = tiny_llama(seed=2)
    targets = make_examples(10, seed=5)
    cfg = SelectionConfig(budget_per_step=2, target_batch_size=3, target_ema=beta)
    step = SelectionStep(model, get_selector("ftw"), targets, cfg, seed=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    candidates = make_examples(5, seed=6)
    names = list(step.captured_shapes)
    batch_grads = []
    for call in range(3):
        if call == 2:  # a resumed step continues the same average
            state = step.state_dict()
            step = SelectionStep(model, get_selector("ftw"), targets, cfg, seed=4)
            step.load_state_dict(state)
        step.run(step.batches(candidates), opt)
        model.zero_grad()
        reference_losses(model, collate(step.target_batch, 0)).mean().backward()
        batch_grads.append({n: dict(model.named_parameters())[n].grad.clone() for n in names})
    n = len(batch_grads)
    for name in names:
        want = sum(beta ** (n - j) * (1 - beta) * g[name]
                   for j, g in enumerate(batch_grads, 1)) / (1 - beta**n)
        assert torch.allclose(step.target_grad[name], want, rtol=1e-4, atol=1e-7), name
    assert not torch.allclose(step.target_grad[names[0]], batch_grads[-1][names[0]])
    with pytest.raises(ValueError, match="target_ema must be a number in \\[0, 1\\)"):
        SelectionConfig(target_ema=1.0)


@pytest.mark.parametrize("second_pass", [False, True])
def test_the_target_rides_in_the_candidates_pass(monkeypatch, second_pass):
    """``target_with_candidates``: one capture per step (B + n rows) instead of two; g_V is
    still the mean gradient of the target batch by a plain ``.backward()``, the candidates'
    losses their own, and selection and update those of the separate target pass."""
    import gradsift.step.selection_step

    calls = []
    real_capture = gradsift.step.selection_step.capture
    monkeypatch.setattr(gradsift.step.selection_step, "capture",
                        lambda *a, **k: calls.append(a[1]["input_ids"].shape) or
                        real_capture(*a, **k))
    targets = make_examples(10, seed=5)
    targets[0].input_ids += [7] * 9  # wider than every candidate: the join pads them
    targets[0].labels += [7] * 9
    runs = {}
    for ride in (False, True):
        model = tiny_llama(seed=2)
        cfg = SelectionConfig(budget_per_step=2, target_batch_size=4,
                              target_with_candidates=ride)
        step = SelectionStep(model, get_selector("ftw"), targets, cfg, seed=4)
        step.second_pass = second_pass
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        names = list(step.captured_shapes)
        calls.clear()
        picked = []
        for call in range(3):
            candidates = make_examples(5, seed=6 + call)
            result = step.run(step.batches(candidates), opt)
            update = {n: p.grad.clone() for n, p in model.named_parameters() if n in names}
            picked.append((result.selection.indices.tolist(), result.weights.clone(), update))
            ref = reference_losses(model, collate(candidates, 0))
            assert torch.allclose(result.candidates.losses, ref, rtol=1e-5, atol=1e-6)
            model.zero_grad()
            reference_losses(model, collate(step.target_batch, 0)).mean().backward()
            for n in names:
                want = dict(model.named_parameters())[n].grad
                assert torch.allclose(step.target_grad[n], want, rtol=1e-4, atol=1e-6), n
            for n, g in update.items():
                dict(model.named_parameters())[n].grad = g
            opt.step()
            opt.zero_grad()
        runs[ride] = picked
        assert len(calls) == (3 if ride else 6)  # one capture a step, or two
        if ride:
            assert all(shape[0] == 5 + 4 for shape in calls)
    # the first call starts from the same state: the same update; later calls drift apart by
    # float order (two target passes or one joined pass), which Adam's normalized steps amplify
    (i0, w0, u0), (i1, w1, u1) = runs[False][0], runs[True][0]
    assert i0 == i1 and torch.allclose(w0, w1, atol=1e-6)
    for n in u0:
        assert torch.allclose(u0[n], u1[n], rtol=1e-4, atol=1e-6), n
    for (i0, w0, _), (i1, w1, _) in zip(runs[False][1:], runs[True][1:], strict=True):
        assert i0 == i1 and torch.allclose(w0, w1, atol=1e-4)


def test_uneven_target_examples_are_captured_in_two_passes_by_length():
    """The target batch in length order; the shorter and the longer half in two passes when
    that pads at least a quarter fewer positions (8 x 30 = 240 positions against 4 x 5 + 4 x 30
    = 140 here), one pass otherwise; g_V is the plain ``.backward()`` mean either way."""
    from gradsift.data import Example

    def examples(lengths, seed):
        g = torch.Generator().manual_seed(seed)
        return [Example(id=f"t{seed}-{i}", source="t", input_ids=ids, labels=[-100] + ids[1:])
                for i, n in enumerate(lengths)
                for ids in [torch.randint(0, 64, (n,), generator=g).tolist()]]

    for lengths, passes in (([5, 30] * 4, 2), ([20] * 8, 1), ([18, 20, 22, 24] * 2, 1)):
        model = tiny_llama(seed=2)
        step = SelectionStep(model, get_selector("ftw"), examples(lengths, 1),
                             SelectionConfig(budget_per_step=2, target_batch_size=8), seed=4)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        step.run(step.batches(make_examples(5, seed=6)), opt)
        assert [len(ex.input_ids) for ex in step.target_batch] == sorted(lengths)
        assert len(step._target_batches()) == passes
        model.zero_grad()
        reference_losses(model, collate(step.target_batch, 0)).mean().backward()
        for n, p in model.named_parameters():
            if n in step.target_grad:
                assert torch.allclose(step.target_grad[n], p.grad, rtol=1e-4, atol=1e-6), n
