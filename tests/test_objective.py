"""objective: b and K against brute-force per-sample autograd (tiny Llama, real AdamW)."""

from __future__ import annotations

import pytest
import torch
from reference import reference_losses, tiny_llama

from gradsift.capture import per_sample_grads
from gradsift.objective import alignment, interaction, target_direction, target_sq_norm
from gradsift.optim_state import read_optimizer_state


def _batch(b: int, t: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (b, t), generator=gen)
    labels = ids.clone()
    labels[:, :2] = -100  # a prompt without loss
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(tie=False).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.85, 0.99), eps=1e-6)
    for seed in (10, 11):  # two real steps: state with non-trivial m and v
        opt.zero_grad()
        reference_losses(model, _batch(4, 8, seed)).mean().backward()
        opt.step()
    opt.zero_grad()

    cand_batch = _batch(5, 8, 1)
    cands = per_sample_grads(model, cand_batch)
    names = cands.param_names
    params = dict(model.named_parameters())

    target_batch = _batch(3, 8, 2)
    target_loss = reference_losses(model, target_batch).mean()
    g_v = torch.autograd.grad(target_loss, [params[n] for n in names])
    target = dict(zip(names, g_v, strict=True))

    # brute force: one backward per sample, sample alone in its batch
    per_sample = []
    for i in range(5):
        single = {k: v[i : i + 1] for k, v in cand_batch.items()}
        g = torch.autograd.grad(reference_losses(model, single)[0], [params[n] for n in names])
        per_sample.append(dict(zip(names, g, strict=True)))
    state = read_optimizer_state(opt, model, names)
    return cands, target, per_sample, state, names


def _dot(x: dict, y: dict, names: list[str], weight: dict | None = None) -> float:
    return sum(
        float((x[n].double() * y[n].double() * (1 if weight is None else weight[n].double())).sum())
        for n in names
    )


@pytest.mark.parametrize("momentum_correction", [False, True])
def test_target_direction_formula(setup, momentum_correction: bool) -> None:
    _, target, _, state, names = setup
    g_hat = target_direction(target, state, momentum_correction)
    for n in names:
        if momentum_correction:
            expected = (target[n] - 0.85 * state.momentum[n]) / 0.15
        else:
            expected = target[n]
        torch.testing.assert_close(g_hat[n], expected)
    assert state.uninitialized == []


@pytest.mark.parametrize("momentum_correction", [False, True])
@pytest.mark.parametrize("curvature", ["adam", "identity"])
def test_b_and_k_match_brute_force(setup, curvature: str, momentum_correction: bool) -> None:
    cands, target, per_sample, state, names = setup
    p = state.preconditioner
    g_hat = target_direction(target, state, momentum_correction)
    b = alignment(cands, g_hat, p)
    k = interaction(cands, p, curvature=curvature)

    p_hat = {n: p[n] * g_hat[n] for n in names}  # P ĝ
    b_ref = torch.tensor([_dot(g, p_hat, names) for g in per_sample], dtype=torch.float64)
    pk = p if curvature == "adam" else {n: p[n] ** 2 for n in names}
    k_ref = torch.tensor(
        [[_dot(gi, gj, names, pk) for gj in per_sample] for gi in per_sample],
        dtype=torch.float64,
    )

    assert b.shape == (5,) and k.shape == (5, 5)
    scale_b, scale_k = b_ref.abs().max(), k_ref.abs().max()
    torch.testing.assert_close(b.double() / scale_b, b_ref / scale_b, rtol=0, atol=2e-5)
    torch.testing.assert_close(k.double() / scale_k, k_ref / scale_k, rtol=0, atol=2e-5)
    # Adam-metric K is a Gram matrix: symmetric, PSD
    assert torch.allclose(k, k.T, rtol=1e-5, atol=1e-6 * float(scale_k))
    assert float(torch.linalg.eigvalsh(k.double()).min()) > -1e-5 * float(scale_k)


def test_unpreconditioned_b_and_k(setup) -> None:
    cands, target, per_sample, _, names = setup
    b = alignment(cands, target, None)
    k = interaction(cands, None)
    b_ref = torch.tensor([_dot(g, target, names) for g in per_sample], dtype=torch.float64)
    k_ref = torch.tensor(
        [[_dot(gi, gj, names) for gj in per_sample] for gi in per_sample],
        dtype=torch.float64,
    )
    torch.testing.assert_close(b.double(), b_ref, rtol=1e-4, atol=1e-5 * float(b_ref.abs().max()))
    torch.testing.assert_close(k.double(), k_ref, rtol=1e-4, atol=1e-5 * float(k_ref.abs().max()))


def test_target_sq_norm_and_materialize_route(setup) -> None:
    cands, target, _, state, names = setup
    p = state.preconditioner
    expected = sum(float((target[n] ** 2 * p[n]).sum()) for n in names)
    assert target_sq_norm(target, p, names) == pytest.approx(expected, rel=1e-5)
    plain = sum(float((target[n] ** 2).sum()) for n in names)
    assert target_sq_norm(target, p, names, curvature="identity") == pytest.approx(plain, rel=1e-5)
    # b through dot_dense agrees with the materialized per-sample gradients
    mat = cands.materialize()
    b_mat = sum((mat[n] * (p[n] * target[n])).flatten(1).sum(1) for n in names)
    torch.testing.assert_close(alignment(cands, target, p), b_mat, rtol=1e-4, atol=1e-6)


def test_momentum_correction_without_momentum_is_plain(setup) -> None:
    _, target, _, state, _ = setup
    sgd_like = type(state)(state.preconditioner, None, state.beta1, state.lr)
    g_hat = target_direction(target, sgd_like, momentum_correction=True)
    for n, g in target.items():
        assert torch.equal(g_hat[n], g.float())


def test_bad_curvature() -> None:
    with pytest.raises(ValueError, match="curvature"):
        interaction(None, {}, curvature="newton")  # type: ignore[arg-type]
