"""per_sample_grads against a loop of single-sample backward passes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from reference import (
    brute_force_grads,
    flatten,
    padded_batch,
    rel_err,
    tiny_gpt2,
    tiny_llama,
)
from torch import nn

import gradsift
from gradsift.loss import per_sample_loss

TOL = 1e-4


def check_against_brute_force(model, batch, grads, routes=("ghost", "materialize", "auto")):
    """materialize, gram and sq_norms (every route, with and without P), dot_dense and
    weighted_sum of ``grads`` against a loop of single-sample backward passes."""
    names = grads.param_names
    ref = brute_force_grads(model, batch, names)
    assert rel_err(flatten(grads.materialize(), names), ref) <= TOL
    ref_gram = ref @ ref.T
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(1)
    precond = {n: torch.rand(params[n].shape, generator=gen) + 0.1 for n in names}
    p_flat = torch.cat([precond[n].flatten() for n in names])
    for route in routes:
        g = gradsift.FactorizedGrads(grads.layers, grads.losses, route=route)
        assert rel_err(g.gram(), ref_gram) <= TOL, route
        assert rel_err(g.sq_norms(), ref_gram.diagonal()) <= TOL, route
        assert rel_err(g.gram(precondition=precond), (ref * p_flat) @ ref.T) <= TOL, route
        assert rel_err(g.sq_norms(precondition=precond), (ref * p_flat * ref).sum(1)) <= TOL
    dense_flat = torch.randn(ref.shape[1], generator=gen)
    dense, offset = {}, 0
    for n in names:
        size = params[n].numel()
        dense[n] = dense_flat[offset : offset + size].view_as(params[n])
        offset += size
    assert rel_err(grads.dot_dense(dense), ref @ dense_flat) <= TOL
    for route in routes:
        g = gradsift.FactorizedGrads(grads.layers, grads.losses, route=route)
        for p, p_ref in ((None, 1.0), (precond, p_flat)):
            kmat, dots = g.gram_and_dot(dense, precondition=p)
            assert rel_err(kmat, (ref * p_ref) @ ref.T) <= TOL, route
            assert rel_err(dots, ref @ dense_flat) <= TOL, route
            out = g.products(dense, p, other=g, other_precondition=precond)
            assert rel_err(out.gram, (ref * p_ref) @ ref.T) <= TOL, route
            assert rel_err(out.dots, ref @ dense_flat) <= TOL, route
            assert rel_err(out.cross, (ref * p_flat) @ ref.T) <= TOL, route
    w = torch.rand(len(grads), generator=gen)
    summed = grads.weighted_sum(w)
    assert rel_err(torch.cat([summed[n].flatten() for n in names]), w @ ref) <= TOL
    return ref


def test_llama_padding_and_masked_prompt():
    model = tiny_llama()
    batch = padded_batch(5, 12)
    grads = gradsift.per_sample_grads(model, batch)
    ref = check_against_brute_force(model, batch, grads)
    # the sample whose labels are all -100: zero loss, zero gradient, no NaN
    assert grads.losses[1] == 0
    assert ref[1].abs().max() == 0
    assert torch.all(grads.sq_norms()[1] == 0)
    assert not torch.isnan(grads.gram()).any()
    # losses agree with the model's own loss for a sample with labels
    out = model(input_ids=batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1],
                labels=batch["labels"][:1])
    assert torch.allclose(grads.losses[0], out.loss, atol=1e-5)


def test_tied_head_is_one_parameter_and_untied_head_its_own():
    tied_model = tiny_llama(tie=True)
    tied = gradsift.per_sample_grads(tied_model, padded_batch(2, 6))
    assert "lm_head.weight" not in tied.param_names  # the same tensor as the embedding
    assert "model.embed_tokens.weight" in tied.param_names
    uses = [u.module_name for u in tied.layers if u.weight_name == "model.embed_tokens.weight"]
    assert uses == ["model.embed_tokens", "lm_head"]
    untied_model = tiny_llama(tie=False)
    batch = padded_batch(3, 6)
    untied = gradsift.per_sample_grads(untied_model, batch)
    assert "lm_head.weight" in untied.param_names
    check_against_brute_force(untied_model, batch, untied, routes=("auto",))


def test_gpt2_conv1d_with_bias():
    """GPT-2: Conv1D and LayerNorm biases, position embeddings (ids shared by the batch),
    and a head tied to the token embedding."""
    model = tiny_gpt2()
    batch = padded_batch(4, 10)
    grads = gradsift.per_sample_grads(model, batch)
    assert "transformer.h.0.attn.c_attn.bias" in grads.param_names
    assert set(grads.param_names) == {n for n, _ in model.named_parameters()}
    mat = grads.materialize()
    params = dict(model.named_parameters())
    for n in grads.param_names:
        assert mat[n].shape[1:] == params[n].shape
    check_against_brute_force(model, batch, grads)


def test_peft_lora_default_modules_are_exactly_lora_weights():
    base = tiny_llama(tie=False)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     lora_dropout=0.0)
    model = get_peft_model(base, cfg).eval()
    batch = padded_batch(4, 9)
    grads = gradsift.per_sample_grads(model, batch)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(grads.param_names) == sorted(trainable)
    assert all("lora_" in n for n in grads.param_names)
    check_against_brute_force(model, batch, grads)


def test_peft_lora_on_the_head_keeps_its_rows_per_token():
    """A LoRA inside the output head: the head runs at every position (its adapters' rows are
    per token) and only its rows with loss are kept as D arrives; exact against brute force."""
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], lora_dropout=0.0)
    model = get_peft_model(tiny_llama(tie=False), cfg).eval()
    batch = padded_batch(4, 9)
    seen: list = []
    gradsift.capture.forward_losses(model, batch, seen, head_at_rows=False)
    assert seen[2] is None and seen[0].shape[0] == 4
    grads = gradsift.per_sample_grads(model, batch)
    assert any("lm_head.lora_A" in n for n in grads.param_names)
    check_against_brute_force(model, batch, grads)


def test_long_sequence_routes_agree():
    model = tiny_llama(layers=1)
    batch = padded_batch(3, 320)
    grads = gradsift.per_sample_grads(model, batch)
    ghost = gradsift.FactorizedGrads(grads.layers, grads.losses, route="ghost").gram()
    mat = gradsift.FactorizedGrads(grads.layers, grads.losses, route="materialize").gram()
    assert rel_err(ghost, mat) <= TOL
    ref = brute_force_grads(model, batch, grads.param_names)
    assert rel_err(grads.gram(), ref @ ref.T) <= TOL
    # at this length the cost model prefers materializing every layer
    assert gradsift.factors.choose_route(3, 320, 3, 320, 32, 48) == "materialize"


def test_long_records_keep_min_d_factor_rows_per_sample():
    """A bias-free linear layer with more tokens than ``r = min(d_in, d_out)`` is kept as ``r``
    factor rows per sample (formed during the backward), an embedding as one row per distinct
    id, with the same per-sample gradients; a layer with a trainable bias keeps its tokens.
    (``test_layer_reference_harness`` covers both with a padding row, modules called twice
    and a tied head.)"""
    model = tiny_llama(tie=True)  # hidden 32, MLP 48, k/v 16, vocabulary 64
    batch = padded_batch(3, 40)
    grads = gradsift.per_sample_grads(model, batch)
    linear = [u for u in grads.layers if isinstance(u, gradsift.factors.LayerFactors)]
    assert {u.module_name for u in linear} >= {"lm_head", "model.layers.0.mlp.down_proj"}
    for u in linear:
        assert u.inputs.shape[1] == min(u.d_in, u.d_out) < 40, u.module_name
    embedding = [u for u in grads.layers if u.module_name == "model.embed_tokens"]
    distinct = max(len(torch.unique(row)) for row in batch["input_ids"])
    assert embedding[0].ids.shape[1] == distinct < 40  # one row per distinct id
    check_against_brute_force(model, batch, grads)
    short_batch = padded_batch(3, 12)
    short = gradsift.per_sample_grads(model, short_batch)  # 12 tokens < 16: as is
    assert all(u.inputs.shape[1] == 12 for u in short.layers
               if isinstance(u, gradsift.factors.LayerFactors) and u.module_name != "lm_head")
    # the head keeps each sample's rows with loss (the most of any sample)
    with_loss = int((short_batch["labels"][:, 1:] != -100).sum(dim=1).max())
    (head,) = [u for u in short.layers if getattr(u, "module_name", "") == "lm_head"]
    assert head.inputs.shape[1] == with_loss < 12
    check_against_brute_force(model, short_batch, short)
    lora = get_peft_model(tiny_llama(tie=False), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], lora_dropout=0.0)).eval()
    grads = gradsift.per_sample_grads(lora, batch)
    assert all(u.inputs.shape[1] == 4 for u in grads.layers)  # the LoRA rank
    check_against_brute_force(lora, batch, grads, routes=("auto",))
    gpt2 = gradsift.per_sample_grads(tiny_gpt2(), padded_batch(2, 40))  # Conv1D with bias
    assert {u.inputs.shape[1] for u in gpt2.layers
            if isinstance(u, gradsift.factors.LayerFactors) and u.bias_name} == {40}


def test_cross_batch_gram_and_precondition():
    model = tiny_gpt2()
    batch_a, batch_b = padded_batch(4, 10, seed=0), padded_batch(3, 7, seed=5)
    ga = gradsift.per_sample_grads(model, batch_a)
    gb = gradsift.per_sample_grads(model, batch_b)
    names = ga.param_names
    ra = brute_force_grads(model, batch_a, names)
    rb = brute_force_grads(model, batch_b, names)
    for route in ("ghost", "materialize", "auto"):
        g = gradsift.FactorizedGrads(ga.layers, ga.losses, route=route)
        assert rel_err(g.gram(gb), ra @ rb.T) <= TOL, route
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(3)
    precond = {n: torch.rand(params[n].shape, generator=gen) + 0.1 for n in names}
    p_flat = torch.cat([precond[n].flatten() for n in names])
    assert rel_err(ga.gram(gb, precondition=precond), (ra * p_flat) @ rb.T) <= TOL
    assert rel_err(ga.gram(precondition=precond), (ra * p_flat) @ ra.T) <= TOL
    assert rel_err(ga.sq_norms(precondition=precond), (ra * p_flat * ra).sum(1)) <= TOL


def test_weighted_sum_equals_weighted_brute_force():
    model = tiny_gpt2()
    batch = padded_batch(4, 8)
    grads = gradsift.per_sample_grads(model, batch)
    w = torch.tensor([0.5, 0.0, 0.2, 0.3])
    ref = w @ brute_force_grads(model, batch, grads.param_names)
    got = grads.weighted_sum(w)
    flat = torch.cat([got[n].flatten() for n in grads.param_names])
    assert rel_err(flat, ref) <= TOL


def test_grad_untouched_and_no_hooks_left():
    model = tiny_llama()
    sentinel = {n: torch.full_like(p, 7.0) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = sentinel[n].clone() if "layers.0" in n else None
    gradsift.per_sample_grads(model, padded_batch(2, 6))
    for n, p in model.named_parameters():
        if "layers.0" in n:
            assert torch.equal(p.grad, sentinel[n])
        else:
            assert p.grad is None
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_no_hooks_left_after_exception_inside_model():
    model = tiny_llama()

    def boom(module, args, output):
        raise RuntimeError("boom inside the model")

    handle = model.model.layers[1].mlp.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        gradsift.per_sample_grads(model, padded_batch(2, 6))
    handle.remove()
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    gradsift.per_sample_grads(model, padded_batch(2, 6))  # usable again


def test_unknown_and_unsupported_module_names():
    model = tiny_llama()
    with pytest.raises(ValueError, match="q_proj"):
        gradsift.per_sample_grads(
            model, padded_batch(2, 6), modules=["model.layers.0.self_attn.q_prj"]
        )
    with pytest.raises(ValueError, match="unsupported"):
        gradsift.per_sample_grads(model, padded_batch(2, 6), modules=["model.layers.0.mlp"])
    with pytest.raises(ValueError, match="route"):
        gradsift.per_sample_grads(model, padded_batch(2, 6), route="fast")


def test_explicit_modules_subset():
    model = tiny_llama()
    batch = padded_batch(3, 6)
    names = ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj"]
    grads = gradsift.per_sample_grads(model, batch, modules=names)
    assert grads.param_names == [n + ".weight" for n in names]
    check_against_brute_force(model, batch, grads, routes=("auto",))


def test_bf16_model_accumulates_in_float32():
    model = tiny_llama()
    batch = padded_batch(3, 8)
    ref = gradsift.per_sample_grads(model, batch).gram()
    low = gradsift.per_sample_grads(model.to(torch.bfloat16), batch)
    gram = low.gram()
    assert gram.dtype == torch.float32 and low.losses.dtype == torch.float32
    assert rel_err(gram, ref) < 0.1  # bf16 forward noise, not accumulation error


def test_bf16_compact_rows_are_summed_in_float32():
    """The compact rows of a long record are the per-sample gradient itself: summed over the
    tokens in float32, they match a float64 sum of the same bf16 activations to float32
    precision (a bf16 sum over 200 tokens is off by about 1e-3)."""
    from gradsift.capture import _compact_embedding, _compact_linear

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 200, 24, generator=gen).to(torch.bfloat16)
    d = torch.randn(3, 200, 16, generator=gen).to(torch.bfloat16)
    exact = torch.einsum("bto,bti->boi", d.double(), a.double())  # D_iᵀ A_i per sample
    kept, eye = _compact_linear(a, d)
    assert kept.dtype == eye.dtype == torch.float32
    assert rel_err(kept.double(), exact) < 1e-5
    counts = [200, 120, 7]  # a head at its rows with loss: each sample's rows one after another
    rows_a = torch.cat([a[i, :c] for i, c in enumerate(counts)])
    rows_d = torch.cat([d[i, :c] for i, c in enumerate(counts)])
    kept, _ = _compact_linear(rows_a, rows_d, counts)
    for i, c in enumerate(counts):
        ref = d[i, :c].double().T @ a[i, :c].double()
        assert rel_err(kept[i].double(), ref) < 1e-5
    ids = torch.randint(0, 5, (3, 200), generator=gen)  # each id repeated ~40 times
    out_ids, out_d = _compact_embedding(ids, d)
    assert out_d.dtype == torch.float32
    for i in range(3):
        for j, tok in enumerate(out_ids[i].tolist()[: len(torch.unique(ids[i]))]):
            ref = d[i][ids[i] == tok].double().sum(0)
            assert rel_err(out_d[i, j].double(), ref) < 1e-5


class _SharedLinearLM(nn.Module):
    """Embedding (with a padding row) → norm → the same Linear applied twice → the same norm
    again → head, optionally tied to the embedding: every kind, modules called twice."""

    def __init__(self, vocab: int, width: int, bias: bool, norm: str = "layer",
                 tie: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=0)
        self.norm = nn.LayerNorm(width, bias=bias) if norm == "layer" else nn.RMSNorm(width)
        self.mix = nn.Linear(width, width, bias=bias)
        self.head = nn.Linear(width, vocab, bias=False)
        if tie:
            self.head.weight = self.embed.weight
        with torch.no_grad():
            for p in self.norm.parameters():
                p.uniform_(0.5, 1.5)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        h = self.norm(self.embed(input_ids))
        h = torch.tanh(self.mix(h))
        h = self.norm(self.mix(h) + h)
        return type("Out", (), {"logits": self.head(h)})()


@settings(max_examples=60, deadline=None)
@given(
    batch_size=st.integers(1, 4),
    length=st.integers(2, 9),
    width=st.integers(1, 7),
    bias=st.booleans(),
    norm=st.sampled_from(["layer", "rms"]),
    tie=st.booleans(),
    route=st.sampled_from(["ghost", "materialize", "auto"]),
)
def test_layer_reference_harness(batch_size, length, width, bias, norm, tie, route):
    """Many shapes, every kind, modules called twice, a tied head, every route: against
    brute force."""
    assume(not (norm == "layer" and width == 1))  # x̂ = 0: every gradient is rounding noise
    torch.manual_seed(batch_size * 100 + length * 10 + width)
    model = _SharedLinearLM(11, width, bias, norm, tie)
    batch = padded_batch(batch_size, length, vocab=11, seed=length)
    grads = gradsift.per_sample_grads(model, batch, route=route)
    names = grads.param_names
    assert set(names) == {n for n, _ in model.named_parameters()}
    params = dict(model.named_parameters())
    rows = []
    for i in range(batch_size):
        logits = model(batch["input_ids"][i : i + 1]).logits
        loss = per_sample_loss(logits, batch["labels"][i : i + 1])[0]
        gs = torch.autograd.grad(loss, [params[n] for n in names])
        rows.append(torch.cat([g.flatten() for g in gs]))
    ref = torch.stack(rows)
    p = {n: torch.rand_like(params[n]) + 0.1 for n in names}
    p_flat = torch.cat([p[n].flatten() for n in names])
    assert rel_err(flatten(grads.materialize(), names), ref) <= TOL
    assert rel_err(grads.gram(), ref @ ref.T) <= TOL
    assert rel_err(grads.sq_norms(), (ref * ref).sum(1)) <= TOL
    assert rel_err(grads.gram(precondition=p), (ref * p_flat) @ ref.T) <= TOL
    assert rel_err(grads.sq_norms(precondition=p), (ref * p_flat * ref).sum(1)) <= TOL
    m = torch.randn_like(p_flat)  # a dot product can cancel: bound the error by Σ |g_k m_k|
    dense = dict(zip(names, m.split([params[n].numel() for n in names]), strict=True))
    dense = {n: v.view_as(params[n]) for n, v in dense.items()}
    assert (grads.dot_dense(dense) - ref @ m).abs().max() <= TOL * (ref.abs() @ m.abs()).max()


def test_blocked_inner_product_is_accurate_for_long_rows():
    """A materialized Gram over ~4M entries per sample stays near float64 accuracy."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(4, 2**22, generator=gen)
    h = torch.randn(3, 2**22, generator=gen)
    ref = g.double() @ h.double().T
    got = gradsift.factors.blocked_inner(g, h)
    assert float(((got.double() - ref).abs() / ref.abs().max()).max()) < 1e-5  # one GEMM: 2.5e-5
