"""The next-step model against torch's own AdamW step, a grid search and hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import ListStream, make_examples, tiny_llama

from gradsift.optim_state import read_optimizer_state
from gradsift.select.next_step import NextStep, best_weights, shrink_weights


def _model_and_grads(n: int, seed: int = 0) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A two-parameter model and n explicit per-sample gradients (float64 numbers)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 2))
    per_sample = {name: torch.randn(n, *p.shape) * torch.exp(torch.randn(n).view(-1, *[1] *
                                                                        p.dim()))
                  for name, p in model.named_parameters()}
    return model, per_sample


def _warm(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


@pytest.mark.parametrize("steps,amsgrad,clip", [(0, False, None), (3, False, None),
                                                (2, True, None), (3, False, 0.5)])
def test_update_is_the_step_adamw_takes(steps: int, amsgrad: bool, clip: float | None) -> None:
    model, per_sample = _model_and_grads(3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.8, 0.95), eps=1e-6,
                            weight_decay=0.0, amsgrad=amsgrad)
    _warm(model, opt, steps, seed=1)
    w = torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64)
    state = read_optimizer_state(opt, model)
    predicted = NextStep(per_sample, state, max_grad_norm=clip).update(w)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.grad = torch.einsum("n,n...->...", w.float(), per_sample[name])
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    for name, p in model.named_parameters():
        taken = (p.detach() - before[name]).double()
        torch.testing.assert_close(predicted[name], taken, rtol=2e-4, atol=1e-7)


def test_best_weights_beat_a_grid_and_every_vertex() -> None:
    model, per_sample = _model_and_grads(2, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    _warm(model, opt, 2, seed=4)
    step = NextStep(per_sample, read_optimizer_state(opt, model))
    direction = {n: torch.randn(p.shape) + per_sample[n][0] for n, p in model.named_parameters()}
    w, value = best_weights(step, direction)
    grid = [float(step.decrease(torch.tensor([a, 1 - a], dtype=torch.float64), direction))
            for a in np.linspace(0, 1, 2001)]
    assert value >= max(grid) - 1e-6 * abs(max(grid))
    assert float(step.decrease(w, direction)) == pytest.approx(value)
    assert float(w.sum()) == pytest.approx(1.0) and bool((w >= 0).all())


def test_shrink_is_the_signal_to_noise_share_of_the_gain() -> None:
    model, per_sample = _model_and_grads(3, seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    _warm(model, opt, 1, seed=6)
    step = NextStep(per_sample, read_optimizer_state(opt, model))
    names = [n for n, _ in model.named_parameters()]
    targets = [{n: torch.randn(p.shape) + per_sample[n][1] for n, p in model.named_parameters()}
               for _ in range(5)]

    def dots(m: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([sum((t[n].double() * m[n].double()).sum() for n in names)
                            for t in targets])

    w_best = torch.tensor([0.7, 0.1, 0.2], dtype=torch.float64)
    w, s = shrink_weights(step, w_best, dots)
    # by hand: per-example decreases −⟨g_t, Δ(w)⟩ at w_best and at uniform
    uniform = torch.full((3,), 1 / 3, dtype=torch.float64)
    gains = np.array([float(step.decrease(w_best, t) - step.decrease(uniform, t))
                      for t in targets])
    mean, se2 = gains.mean(), gains.var(ddof=1) / len(gains)
    expect = mean**2 / (mean**2 + se2) if mean > 0 else 0.0
    assert s == pytest.approx(expect, rel=1e-6)
    np.testing.assert_allclose(w.numpy(), (uniform + expect * (w_best - uniform)).numpy(),
                               rtol=1e-6)


def _real_step_decrease(model: torch.nn.Module, opt: torch.optim.Optimizer,
                        grad: dict[str, torch.Tensor], direction: dict[str, torch.Tensor]
                        ) -> float:
    """−⟨ĝ, Δθ⟩ of a real AdamW step on copies of the model and optimizer."""
    import copy

    model2 = copy.deepcopy(model)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=opt.defaults["lr"], weight_decay=0.0)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    before = {n: p.detach().clone() for n, p in model2.named_parameters()}
    for n, p in model2.named_parameters():
        p.grad = grad[n].float().clone()
    opt2.step()
    return -sum(float((direction[n].double() * (p.detach() - before[n]).double()).sum())
                for n, p in model2.named_parameters())


def test_greedy_subset_takes_the_best_real_step_each_round() -> None:
    model, per_sample = _model_and_grads(6, seed=7)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.0)
    _warm(model, opt, 2, seed=8)
    direction = {n: torch.randn(p.shape) + per_sample[n][2] for n, p in model.named_parameters()}
    step = NextStep(per_sample, read_optimizer_state(opt, model))
    eligible = [0, 1, 2, 4, 5]
    chosen = step.greedy_subset(direction, eligible, 3)
    # brute force: each round, the real AdamW step on the uniform mean of chosen + j
    expect: list[int] = []
    for _ in range(3):
        gains = {j: _real_step_decrease(model, opt, {n: per_sample[n][expect + [j]].mean(0)
                                                     for n in per_sample}, direction)
                 for j in eligible if j not in expect}
        expect.append(max(gains, key=gains.get))
    assert chosen == expect


def test_other_optimizers_are_refused() -> None:
    model, per_sample = _model_and_grads(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="Adam's moments"):
        NextStep(per_sample, read_optimizer_state(opt, model))


@pytest.mark.parametrize("method,clip", [("ftw-next-step-weights", None),
                                         ("ftw-next-step", 0.05)])
def test_ftw_next_step_predicts_the_realized_target_decrease(tmp_path, method: str,
                                                            clip: float | None) -> None:
    """Through the engine: the logged prediction against the target batch's loss change."""
    from gradsift.capture import forward_losses
    from gradsift.engine import EngineConfig, OnlineTrainer
    from gradsift.select import get_selector

    model = tiny_llama(seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    config = EngineConfig(candidates_per_step=6, budget_per_step=3, target_batch_size=4,
                          eval_size=0, eval_every=0, checkpoint_every=0, max_grad_norm=clip)
    trainer = OnlineTrainer(model, opt, get_selector(method),
                            ListStream(make_examples(40, seed=1)), make_examples(8, seed=2),
                            config, tmp_path / "run", pad_token_id=0, seed=0)

    @torch.no_grad()
    def target_loss(params: dict[str, torch.Tensor]) -> float:
        current = {n: p.detach().clone() for n, p in trainer.params.items()}
        for n, p in trainer.params.items():
            p.copy_(params[n])
        (batch,) = trainer.selection.batches(trainer.target_batch, len(trainer.target_batch))
        model.eval()
        loss = float(forward_losses(model, batch).mean())
        model.train()
        for n, p in trainer.params.items():
            p.copy_(current[n])
        return loss

    checked = 0
    for _ in range(4):
        before = {n: p.detach().clone() for n, p in trainer.params.items()}
        record = trainer.step()
        diag = record["diagnostics"]
        if "predicted_decrease" not in diag:  # fewer than two selected: nothing to weigh
            continue
        after = {n: p.detach().clone() for n, p in trainer.params.items()}
        realized = target_loss(before) - target_loss(after)
        assert realized == pytest.approx(diag["predicted_decrease"], rel=0.05)
        assert sum(record["weights"]) == pytest.approx(1.0, abs=1e-5)
        checked += 1
    assert checked >= 2


def test_over_the_memory_limit_it_falls_back_to_ftw_and_says_so() -> None:
    """next_step_max_bytes=0: the subset and weights of plain ftw (greedy, shrink)."""
    from gradsift.capture import capture
    from gradsift.factors import FactorizedGrads
    from gradsift.select import SelectionContext, get_selector

    model = tiny_llama(seed=1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    from gradsift.data import collate

    batch = collate(make_examples(6, seed=3), pad_token_id=0)
    target = collate(make_examples(4, seed=4), pad_token_id=0)
    cands = capture(model, batch).grads
    samples = capture(model, target).grads
    target_grad = samples.weighted_sum(torch.full((4,), 0.25))
    for p in model.parameters():  # one real step, so Adam has state
        p.grad = torch.randn_like(p)
    opt.step()
    state = read_optimizer_state(opt, model, cands.param_names)

    def pick(name: str, **options: object):
        ctx = SelectionContext(cands, target_grad, state, 3, torch.Generator().manual_seed(0),
                               target_samples=samples)
        return get_selector(name, **options).select(ctx)

    assert isinstance(cands, FactorizedGrads)
    fallback = pick("ftw-next-step", next_step_max_bytes=0)
    plain = pick("ftw")
    assert fallback.indices.tolist() == plain.indices.tolist()
    torch.testing.assert_close(fallback.weights, plain.weights)
    assert "next_step_max_bytes" in fallback.diagnostics["note_next_step"]
    exact = pick("ftw-next-step")
    assert "note_next_step" not in exact.diagnostics
    assert "predicted_decrease" in exact.diagnostics
