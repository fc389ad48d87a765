"""Embeddings, norms and a tied head: each kind against a per-sample autograd loop, and full
fine-tuning covered by the factors alone (no parameter left to a second backward)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from reference import brute_force_grads, padded_batch, rel_err, tiny_llama
from test_capture import TOL, check_against_brute_force
from torch import nn

import gradsift
import gradsift.linear_factors
from gradsift.capture import forward_losses, resolve_modules
from gradsift.factors import FactorizedGrads
from gradsift.loss import per_sample_loss
from gradsift.update import split_parameters

TIE = pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@TIE
def test_every_trainable_parameter_against_brute_force(tie):
    """Full fine-tuning: every parameter is captured, and gram (every route, with and without
    P, against another batch too), sq_norms, dot_dense, weighted_sum and materialize are
    exact."""
    model = tiny_llama(tie=tie)
    batch = padded_batch(4, 8)
    grads = gradsift.per_sample_grads(model, batch)
    assert set(grads.param_names) == _trainable(model)
    assert {u.kind for u in grads.layers} == {"linear", "embedding", "norm"}
    ref = check_against_brute_force(model, batch, grads)

    other_batch = padded_batch(3, 6, seed=4)
    other = gradsift.per_sample_grads(model, other_batch)
    ref2 = brute_force_grads(model, other_batch, grads.param_names)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(2)
    p = {n: torch.rand(params[n].shape, generator=gen) + 0.1 for n in grads.param_names}
    p_flat = torch.cat([p[n].flatten() for n in grads.param_names])
    for route in ("ghost", "materialize", "auto"):
        g = FactorizedGrads(grads.layers, grads.losses, route=route)
        assert rel_err(g.gram(other), ref @ ref2.T) <= TOL, route
        assert rel_err(g.gram(other, precondition=p), (ref * p_flat) @ ref2.T) <= TOL, route


@TIE
@pytest.mark.parametrize("kind", ["embedding_and_head", "norms"])
def test_each_kind_alone_against_brute_force(tie, kind):
    model = tiny_llama(tie=tie)
    modules = {
        "embedding_and_head": ["model.embed_tokens", "lm_head"],
        "norms": [n for n, m in model.named_modules() if n.endswith("norm")],
    }[kind]
    batch = padded_batch(4, 7, seed=3)
    grads = gradsift.per_sample_grads(model, batch, modules=modules)
    expected = {n for n, p in model.named_parameters() if n.rsplit(".", 1)[0] in modules}
    assert set(grads.param_names) == expected
    check_against_brute_force(model, batch, grads)


@TIE
def test_full_fine_tuning_needs_no_second_backward(tie):
    """``weighted_sum(w)`` over two micro-batches equals autograd's gradient of ``Σ_i w_i ℓ_i``
    for every trainable parameter, and the engine finds nothing outside the factors."""
    model = tiny_llama(tie=tie)
    names, params, others = split_parameters(model, None)
    assert others == [] and set(params) == _trainable(model)
    assert names == resolve_modules(model, None)
    batches = [padded_batch(3, 9, seed=1), padded_batch(2, 6, seed=2)]
    grads = FactorizedGrads.concat([gradsift.per_sample_grads(model, b) for b in batches])
    assert set(grads.param_names) == set(params)
    w = torch.tensor([0.5, 0.0, 0.2, 0.1, 0.3])
    got = grads.weighted_sum(w)
    losses = torch.cat([forward_losses(model, b) for b in batches])
    ref = torch.autograd.grad((w * losses).sum(), list(params.values()))
    for (n, _), r in zip(params.items(), ref, strict=True):
        assert got[n].shape == r.shape, n
        assert rel_err(got[n], r) <= 1e-5, n


def test_select_keeps_every_kind():
    model = tiny_llama()
    grads = gradsift.per_sample_grads(model, padded_batch(5, 8))
    idx = torch.tensor([4, 0, 2])
    sub = grads.select(idx)
    assert torch.allclose(sub.gram(), grads.gram()[idx][:, idx], atol=1e-6, rtol=1e-5)
    assert torch.allclose(sub.sq_norms(), grads.sq_norms()[idx], atol=1e-6, rtol=1e-5)


def test_lora_captures_nothing_new():
    """With peft LoRA only the adapters train: embeddings, norms and the tied head stay out."""
    model = get_peft_model(tiny_llama(tie=True), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)).eval()
    grads = gradsift.per_sample_grads(model, padded_batch(3, 6))
    assert set(grads.param_names) == _trainable(model)
    assert all("lora_" in n for n in grads.param_names)
    assert {u.kind for u in grads.layers} == {"linear"}
    assert split_parameters(model, None)[2] == []


def test_a_tied_weight_is_named_through_all_its_modules_or_none():
    model = tiny_llama(tie=True)
    with pytest.raises(ValueError, match="shared with"):
        resolve_modules(model, ["lm_head"])
    with pytest.raises(ValueError, match="shared with"):
        resolve_modules(model, ["model.embed_tokens"])
    assert resolve_modules(model, ["lm_head", "model.embed_tokens"]) == [
        "lm_head", "model.embed_tokens"]


class _LlamaFormRMSNorm(nn.Module):
    """An RMSNorm written like Llama's (Qwen2, Mistral, ... copy it), under another name."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(width) + 0.5)
        self.variance_epsilon = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)


class _GemmaFormRMSNorm(_LlamaFormRMSNorm):
    """Gemma's form: ``(1 + w) ⊙ x̂``; the gradient w.r.t. w is still ``Σ_t δ ⊙ x̂``."""

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (h * (1.0 + self.weight.float())).type_as(x)


class _NotQuiteRMSNorm(_LlamaFormRMSNorm):
    """Named like an RMSNorm, but divides by the mean absolute value: must not be captured."""

    def forward(self, x):
        return self.weight * x / (x.abs().mean(-1, keepdim=True) + self.variance_epsilon)


class _NormLM(nn.Module):
    def __init__(self, norm: type, vocab: int = 13, width: int = 6):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.norm = norm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return type("Out", (), {"logits": self.head(self.norm(self.embed(input_ids)))})()


@pytest.mark.parametrize("norm", [_LlamaFormRMSNorm, _GemmaFormRMSNorm])
def test_rms_norm_classes_found_by_their_form(norm):
    torch.manual_seed(0)
    model = _NormLM(norm)
    batch = padded_batch(3, 7, vocab=13)
    grads = gradsift.per_sample_grads(model, batch)
    assert "norm.weight" in grads.param_names
    check_against_brute_force(model, batch, grads, routes=("auto",))


def test_a_module_not_of_the_rms_form_is_not_captured():
    model = _NormLM(_NotQuiteRMSNorm)
    assert "norm" not in resolve_modules(model, None)
    with pytest.raises(ValueError, match="unsupported"):
        resolve_modules(model, ["norm"])


def test_embedding_scaled_by_batch_frequency_is_not_captured():
    """``scale_grad_by_freq`` makes a sample's gradient depend on the others: left out."""
    model = _NormLM(nn.LayerNorm)
    model.embed.scale_grad_by_freq = True
    assert resolve_modules(model, None) == ["norm", "head"]


def test_bf16_norms_and_embeddings_close_to_float32():
    model = tiny_llama()
    batch = padded_batch(3, 8)
    modules = ["model.embed_tokens", "lm_head", "model.norm", "model.layers.0.input_layernorm"]
    ref = gradsift.per_sample_grads(model, batch, modules=modules).gram()
    low = gradsift.per_sample_grads(model.to(torch.bfloat16), batch, modules=modules)
    assert low.gram().dtype == torch.float32
    assert rel_err(low.gram(), ref) < 0.1  # bf16 forward noise, not accumulation error


def test_per_sample_loss_matches_reference_after_capture():
    """Capturing every kind leaves the model's forward unchanged (the GPT-2 position
    embedding's output is expanded over the batch inside the hook only)."""
    from reference import tiny_gpt2

    model = tiny_gpt2()
    batch = padded_batch(3, 7)
    grads = gradsift.per_sample_grads(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(grads.losses, per_sample_loss(logits, batch["labels"]), atol=1e-6)
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


@pytest.mark.parametrize("other_batch", [False, True])
def test_tied_gram_fused_and_by_cross_terms_agree(other_batch):
    """A shared weight's Gram two ways: materialized sums of the uses, or each use's Gram plus
    the cross terms ⟨g_i(emb), P ⊙ h_j(head)⟩ over the rows the embedding uses."""
    model = tiny_llama(tie=True)
    modules = ["model.embed_tokens", "lm_head"]
    grads = gradsift.per_sample_grads(model, padded_batch(4, 9), modules=modules)
    other = gradsift.per_sample_grads(model, padded_batch(3, 5, seed=6), modules=modules) \
        if other_batch else grads
    weight = model.model.embed_tokens.weight
    for p in (None, {"model.embed_tokens.weight": torch.rand_like(weight) + 0.1}):
        pairs = list(zip(grads.layers, other.layers, strict=True))
        fused = grads._shared_gram(pairs, p, other is grads, fused=True)
        crossed = grads._shared_gram(pairs, p, other is grads, fused=False)
        assert rel_err(crossed, fused) <= TOL


def test_small_blocks_give_the_same_results(monkeypatch):
    """Chunking over samples (a tiny BLOCK_FLOATS) changes nothing: Gram, P, dots, norms."""
    model = tiny_llama(tie=True)
    grads = gradsift.per_sample_grads(model, padded_batch(5, 8))
    other = gradsift.per_sample_grads(model, padded_batch(3, 6, seed=2))
    params = dict(model.named_parameters())
    p = {n: torch.rand_like(params[n]) + 0.1 for n in grads.param_names}
    m = {n: torch.randn_like(params[n]) for n in grads.param_names}

    def results():
        out = []
        for route in ("ghost", "materialize", "auto"):
            g = FactorizedGrads(grads.layers, grads.losses, route=route)
            out += [g.gram(), g.gram(precondition=p), g.gram(other, precondition=p),
                    *g.gram_and_dot(m, precondition=p), g.sq_norms(precondition=p)]
        return out

    whole = results()
    monkeypatch.setattr(gradsift.linear_factors, "BLOCK_FLOATS", 3000)
    for got, ref in zip(results(), whole, strict=True):
        assert rel_err(got, ref) <= 1e-5
