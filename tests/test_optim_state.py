"""optim_state: P, m, β₁, η read from real torch optimizers, against hand computations."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from gradsift.optim_state import OptimizerState, adam_preconditioner, read_optimizer_state


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def _step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> dict[str, torch.Tensor]:
    """One optimizer step on a seeded batch; returns the gradients it used."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(7, 4, generator=gen)
    y = torch.randn(7, 3, generator=gen)
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    return grads


GROUP_OPTS = [  # first Linear, second Linear: different betas and eps
    {"betas": (0.8, 0.95), "eps": 1e-3, "lr": 0.01},
    {"betas": (0.9, 0.999), "eps": 1e-8, "lr": 0.002},
]


def _two_groups(model: nn.Module) -> list[dict]:
    return [
        {"params": list(model[0].parameters()), **GROUP_OPTS[0]},
        {"params": list(model[2].parameters()), **GROUP_OPTS[1]},
    ]


def _group_of(name: str) -> dict:
    return GROUP_OPTS[0] if name.startswith("0.") else GROUP_OPTS[1]


def _hand_adam(history: list[dict[str, torch.Tensor]], amsgrad: bool = False):
    """P, m from the recorded gradients: v_t = β₂ v + (1−β₂) g², v̂ = v/(1−β₂ᵗ)."""
    p_out, m_out = {}, {}
    for name in history[0]:
        opts = _group_of(name)
        b1, b2 = opts["betas"]
        m = torch.zeros_like(history[0][name])
        v = torch.zeros_like(m)
        vmax = torch.zeros_like(m)
        for g in (h[name] for h in history):
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            vmax = torch.maximum(vmax, v)
        t = len(history)
        v_hat = (vmax if amsgrad else v) / (1 - b2**t)
        p_out[name] = 1.0 / (v_hat.sqrt() + opts["eps"])
        m_out[name] = m
    return p_out, m_out


def test_before_any_step_ones_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    model = _model()
    opt = torch.optim.AdamW(_two_groups(model))
    with caplog.at_level(logging.INFO, logger="gradsift.optim_state"):
        state = read_optimizer_state(opt, model)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(state.uninitialized) == sorted(names)
    for n, p in model.named_parameters():
        assert torch.equal(state.preconditioner[n], torch.ones_like(p))
        assert torch.equal(state.momentum[n], torch.zeros_like(p))
    assert "no AdamW state yet" in caplog.text


@pytest.mark.parametrize("impl", ["plain", "foreach", "fused"])
@pytest.mark.parametrize("steps", [1, 2])
def test_adamw_matches_hand_computation(impl: str, steps: int) -> None:
    model = _model()
    kwargs = {"plain": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    try:
        opt = torch.optim.AdamW(_two_groups(model), weight_decay=0.1, **kwargs[impl])
        history = [_step(model, opt, seed) for seed in range(steps)]
    except RuntimeError as err:  # pragma: no cover - fused unsupported on this build
        pytest.skip(f"{impl} AdamW unavailable: {err}")
    p_hand, m_hand = _hand_adam(history)

    state = read_optimizer_state(opt, model)
    assert state.uninitialized == []
    assert state.optimizer == "AdamW"
    precond = adam_preconditioner(opt, model)
    for name in p_hand:
        torch.testing.assert_close(state.preconditioner[name], p_hand[name], rtol=1e-5, atol=0)
        torch.testing.assert_close(precond[name], p_hand[name], rtol=1e-5, atol=0)
        torch.testing.assert_close(state.momentum[name], m_hand[name], rtol=1e-5, atol=1e-9)
        assert state.beta1[name] == _group_of(name)["betas"][0]
        assert state.lr[name] == pytest.approx(_group_of(name)["lr"])


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_and_amsgrad(amsgrad: bool) -> None:
    model = _model()
    opt = torch.optim.Adam(_two_groups(model), amsgrad=amsgrad)
    history = [_step(model, opt, seed) for seed in (3, 4, 5)]
    p_hand, _ = _hand_adam(history, amsgrad=amsgrad)
    precond = adam_preconditioner(opt, model)
    for name in p_hand:
        torch.testing.assert_close(precond[name], p_hand[name], rtol=1e-5, atol=0)


def test_param_without_state_falls_back_to_ones() -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model[2].weight.requires_grad_(False)  # no gradient -> AdamW creates no state for it
    _step(model, opt, 0)
    state = read_optimizer_state(opt, model, ["0.weight", "2.weight"])
    assert state.uninitialized == ["2.weight"]
    assert torch.equal(state.preconditioner["2.weight"], torch.ones(3, 5))
    assert not torch.equal(state.preconditioner["0.weight"], torch.ones(5, 4))
    assert set(state.preconditioner) == {"0.weight", "2.weight"}


def test_sgd_gives_ones_and_no_momentum() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _step(model, opt, 0)
    state = read_optimizer_state(opt, model)
    assert state.momentum is None and state.uninitialized == []
    for n, p in model.named_parameters():
        assert torch.equal(state.preconditioner[n], torch.ones_like(p))
        assert state.lr[n] == 0.1 and state.beta1[n] == 0.0


def test_adafactor_rank1_preconditioner() -> None:
    from transformers.optimization import Adafactor

    model = _model()
    opt = Adafactor(model.parameters(), lr=1e-3, relative_step=False, scale_parameter=False)
    grads = _step(model, opt, 0)
    precond = adam_preconditioner(opt, model)
    eps1 = 1e-30  # Adafactor's default eps[0], added to g²; at step 1, β₂ₜ = 0
    for name, g in grads.items():
        sq = g * g + eps1
        if g.dim() == 2:
            row, col = sq.mean(dim=-1), sq.mean(dim=-2)
            expected = (row / row.mean()).rsqrt()[:, None] * col.rsqrt()[None, :]
        else:
            expected = sq.rsqrt()
        torch.testing.assert_close(precond[name], expected, rtol=1e-5, atol=0)
    state = read_optimizer_state(opt, model)
    assert state.momentum is None and state.lr["0.weight"] == pytest.approx(1e-3)


def test_unsupported_optimizer_names_its_class() -> None:
    model = _model()
    opt = torch.optim.RMSprop(model.parameters())
    with pytest.raises(NotImplementedError, match="RMSprop"):
        adam_preconditioner(opt, model)


def test_requested_names_are_checked() -> None:
    model = _model()
    opt = torch.optim.AdamW(model[0].parameters())
    with pytest.raises(KeyError, match="nope"):
        read_optimizer_state(opt, model, ["nope"])
    with pytest.raises(ValueError, match="2.weight"):
        read_optimizer_state(opt, model, ["2.weight"])
    state = read_optimizer_state(opt, model)
    assert isinstance(state, OptimizerState)
    assert set(state.preconditioner) == {"0.weight", "0.bias"}
    assert state.mean_lr() == pytest.approx(1e-3)


def test_a_registered_optimizer_kind_is_read(monkeypatch) -> None:
    """register_optimizer: RMSprop's P = 1/(√v + ε), checked against its own state by hand."""
    from gradsift import optim_state

    monkeypatch.setattr(optim_state, "_OPTIMIZERS", list(optim_state._OPTIMIZERS))

    @optim_state.register_optimizer("torch.optim.RMSprop", torch.optim.RMSprop)
    def _read(p, group, state):
        if "square_avg" not in state:
            return optim_state.ParamGeometry(None, None, 0.0, group["lr"])
        return optim_state.ParamGeometry(1.0 / (state["square_avg"].sqrt() + group["eps"]),
                                         None, 0.0, group["lr"])

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.RMSprop(model.parameters(), lr=0.01, alpha=0.9, eps=1e-3)
    first = read_optimizer_state(opt, model)
    assert sorted(first.uninitialized) == ["bias", "weight"]
    model(torch.randn(4, 3)).square().sum().backward()
    g = model.weight.grad.clone()
    opt.step()
    state = read_optimizer_state(opt, model, ["weight"])
    expected = 1.0 / ((0.1 * g * g).sqrt() + 1e-3)  # v = (1 − α) g² after one step
    torch.testing.assert_close(state.preconditioner["weight"], expected)
    assert state.momentum is None and state.lr["weight"] == 0.01
    with pytest.raises(ValueError, match="already registered"):
        optim_state.register_optimizer("torch.optim.RMSprop", torch.optim.RMSprop)(_read)

    @optim_state.register_optimizer("flipped RMSprop", lambda o: getattr(o, "flipped", False))
    def _negative(p, group, state):  # a broken reader: P < 0 is no metric
        return optim_state.ParamGeometry(-torch.ones_like(p), None, 0.0, group["lr"])

    optim_state._OPTIMIZERS.insert(0, optim_state._OPTIMIZERS.pop())  # it matches first
    opt.flipped = True
    with pytest.raises(ValueError, match="'flipped RMSprop'.*negative entries for 'weight'"):
        read_optimizer_state(opt, model, ["weight"])


def test_next_step_preconditioner_fills_fresh_coordinates_from_the_known_ones() -> None:
    """``v̂' = (β₂ v + (1−β₂) s²)/(1−β₂^(t+1))``; where it is 0 (no gradient yet, none in the
    stand-in ``s``) the tensor's mean ``v̂'`` over its other coordinates, in a tensor fresh
    throughout the mean over every tensor's known coordinates; ``P' = 1/(√v̂' + ε)``."""
    from gradsift.optim_state import next_step_preconditioner

    emb, head, expert = nn.Embedding(6, 3), nn.Linear(3, 2), nn.Linear(3, 2, bias=False)
    model = nn.ModuleDict({"emb": emb, "head": head, "expert": expert})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), eps=1e-6)
    head(emb(torch.tensor([0, 1]))).sum().backward()  # rows 0-1 only, the expert unused
    opt.step()
    opt.zero_grad()
    names = ["emb.weight", "head.weight", "expert.weight"]
    state = read_optimizer_state(opt, model, names)
    stand_in = {"emb.weight": torch.zeros(6, 3), "head.weight": torch.randn(2, 3),
                "expert.weight": torch.zeros(2, 3)}
    stand_in["emb.weight"][2] = torch.tensor([0.5, -1.0, 2.0])  # the target uses token 2
    assert state.moments is not None
    p, n_fresh = next_step_preconditioner(state.moments, stand_in, names)
    params = dict(model.named_parameters())
    # the unused expert has no state at all (AdamW skips a parameter without a gradient)
    raw = {n: opt.state[params[n]].get("exp_avg_sq", torch.zeros_like(params[n])) for n in names}
    v_hat = {n: (0.99 * raw[n] + 0.01 * stand_in[n] ** 2) / (1 - 0.99**2) for n in names}
    # tokens 3-5 (rows, 3 coordinates each) and the expert's 6 coordinates are fresh
    assert n_fresh == 3 * 3 + 6
    emb_known = v_hat["emb.weight"][:3]
    assert torch.all(emb_known > 0) and torch.all(v_hat["head.weight"] > 0)
    emb_fill = emb_known.mean()
    overall = (emb_known.sum() + v_hat["head.weight"].sum()) / (9 + 6)
    expected = {"emb.weight": torch.cat([emb_known, emb_fill.expand(3, 3)]),
                "head.weight": v_hat["head.weight"],
                "expert.weight": overall.expand(2, 3)}
    for n in names:
        torch.testing.assert_close(p[n], 1.0 / (expected[n].sqrt() + 1e-6))
    # nothing fresh: exactly the next step's denominator
    stand_in = {n: torch.ones_like(stand_in[n]) for n in names}
    before = {n: opt.state[params[n]]["exp_avg_sq"].clone() for n in names[:2]}
    p, n_fresh = next_step_preconditioner(state.moments, stand_in, names)
    assert n_fresh == 0
    for n in names:
        torch.testing.assert_close(p[n], 1.0 / state.moments[n].next_denominator(stand_in[n]))
    # P' is built in place, but never in the optimizer's state or the stand-in
    for n in names[:2]:
        assert torch.equal(opt.state[params[n]]["exp_avg_sq"], before[n])
    assert all(torch.equal(stand_in[n], torch.ones_like(stand_in[n])) for n in names)
