"""The update: ``Σ_i w_i ∇ℓ_i`` into ``.grad``, from the factors and from a pass over the chosen
rows, against an independent computation (one ordinary backward of the weighted mean loss over
the chosen examples alone, collated afresh)."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from reference import make_examples, tiny_llama

from gradsift.capture import capture
from gradsift.data import collate
from gradsift.factors import FactorizedGrads
from gradsift.loss import per_sample_loss
from gradsift.update import chosen_rows, set_weighted_gradients, train_on_rows


def plain_weighted_grads(model, examples, weights) -> dict[str, torch.Tensor]:
    """Reference: one ordinary backward of Σ_i w_i ℓ_i on the selected examples only."""
    model.zero_grad(set_to_none=True)
    batch = collate(examples, pad_token_id=0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    (weights * per_sample_loss(logits, batch["labels"])).sum().backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_weighted_update_from_factors_equals_plain_backward(kind):
    model = tiny_llama(tie=False)
    if kind == "lora":
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        model = get_peft_model(model, cfg)
    model.eval()
    examples = make_examples(6)
    selected, w = [0, 3, 4], torch.tensor([0.5, 0.2, 0.3])
    weights = torch.zeros(6)
    weights[selected] = w
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and m.weight.requires_grad]
    captured = {f"{m}.{a}" for m in names for a in ("weight", "bias")}
    others = [p for n, p in params.items() if n not in captured]
    if kind == "full":
        assert others, "embeddings and norms must take the retained-graph path"
    batches = [collate(examples[:4], 0), collate(examples[4:], 0)]  # two micro-batches
    captures = [capture(model, b, modules=names, retain_graph=bool(others)) for b in batches]
    candidates = FactorizedGrads.concat([c.grads for c in captures])
    set_weighted_gradients(captures, candidates, weights, params, others)
    got = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad(set_to_none=True)
    ref = plain_weighted_grads(model, [examples[i] for i in selected], w)
    assert set(ref) == set(got)
    for n in ref:
        scale = ref[n].abs().max().clamp(min=1e-12)
        assert (got[n] - ref[n]).abs().max() / scale <= 1e-5, n


def test_chosen_rows_drop_only_columns_padded_in_every_chosen_row():
    batch = collate(make_examples(5, seed=8), 0)
    lengths = batch["attention_mask"].sum(1)
    rows = torch.tensor([0, 3])
    sub = chosen_rows(batch, rows)
    width = int(lengths[rows].max())
    assert sub["input_ids"].shape == (2, width)
    assert torch.equal(sub["labels"], batch["labels"][rows, :width])
    assert bool(sub["attention_mask"][:, -1].any())


def test_a_pass_over_the_chosen_rows_gives_the_plain_backward_and_their_losses():
    model = tiny_llama(tie=False)
    model.eval()
    examples = make_examples(7, seed=3)
    selected, w = [1, 2, 6], torch.tensor([0.2, 0.5, 0.3])
    weights = torch.zeros(7)
    weights[selected] = w
    chosen = weights != 0
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    batches = [collate(examples[:4], 0), collate(examples[4:], 0)]
    losses = train_on_rows(model, params.values(), batches, weights, chosen)
    got = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    ref = plain_weighted_grads(model, [examples[i] for i in selected], w)
    assert set(ref) == set(got)
    for n in ref:
        scale = ref[n].abs().max().clamp(min=1e-12)
        assert (got[n] - ref[n]).abs().max() / scale <= 1e-5, n
    batch = collate([examples[i] for i in selected], 0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected = per_sample_loss(logits, batch["labels"])
    assert torch.allclose(losses[selected], expected, rtol=1e-5)
    assert all(math.isnan(float(losses[i])) for i in range(7) if i not in selected)
