"""FactorizedGrads.products (K, b and a cross Gram in one pass) against brute force."""

from __future__ import annotations

import pytest
import torch
from reference import brute_force_grads, padded_batch, rel_err, tiny_gpt2, tiny_llama
from test_capture import TOL, check_against_brute_force

import gradsift
import gradsift.products
from gradsift.factors import FactorizedGrads
from gradsift.linear_factors import identity_factor, is_identity, per_sample_products
from gradsift.objective import alignment, alignment_and_interaction, interaction


def _dicts(model, names, seed=1):
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    p = {n: torch.rand(params[n].shape, generator=gen) + 0.1 for n in names}
    m = {n: torch.randn(params[n].shape, generator=gen) for n in names}
    flat = [torch.cat([d[n].flatten() for n in names]) for d in (p, m)]
    return p, m, *flat


@pytest.mark.parametrize("model_kind", ["tied", "untied", "gpt2"])
@pytest.mark.parametrize("route", ["auto", "ghost", "materialize"])
def test_products_against_brute_force(model_kind, route):
    """K, b and the cross Gram with another batch (with and without P, Q, R) against the
    Grams of per-sample gradients from single-sample backward passes."""
    model = tiny_gpt2() if model_kind == "gpt2" else tiny_llama(tie=model_kind == "tied")
    batch, other_batch = padded_batch(5, 11), padded_batch(3, 7, seed=4)
    grads = gradsift.per_sample_grads(model, batch, route=route)
    other = gradsift.per_sample_grads(model, other_batch, route=route)
    names = grads.param_names
    ref, ref_o = brute_force_grads(model, batch, names), brute_force_grads(model, other_batch,
                                                                           names)
    p, m, p_flat, m_flat = _dicts(model, names)
    q = {n: t ** 2 for n, t in p.items()}
    for gram_p, gram_ref in ((None, 1.0), (p, p_flat), (q, p_flat ** 2)):
        for cross_p, cross_ref in ((None, 1.0), (p, p_flat)):
            out = grads.products(m, gram_p, other=other, other_precondition=cross_p)
            assert rel_err(out.gram, (ref * gram_ref) @ ref.T) <= TOL
            assert rel_err(out.dots, ref @ m_flat) <= TOL
            assert rel_err(out.cross, (ref * cross_ref) @ ref_o.T) <= TOL
    assert grads.products(m, p).cross is None


def test_products_of_compact_lora_layers_read_nothing_back(monkeypatch):
    """K, b and C of a LoRA capture (every adapter compact, one side I) read no tensor value
    back to the host: on a GPU each read is a sync, and one per layer dominated the step. The
    I is told by where it points; the result still equals brute force."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(tie=False), LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)).eval()
    batch, other_batch = padded_batch(4, 30), padded_batch(3, 20, seed=4)
    grads = gradsift.per_sample_grads(model, batch)
    other = gradsift.per_sample_grads(model, other_batch)
    assert all(is_identity(u.inputs) or is_identity(u.output_grads) for u in grads.layers)
    names = grads.param_names
    p, m, p_flat, m_flat = _dicts(model, names)
    reads = []

    def count(name):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, **kwargs):
            reads.append(name)
            return original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)

    for name in ("__bool__", "item", "tolist", "__int__", "__float__"):
        count(name)
    out = grads.products(m, p, other=other, other_precondition=p)
    monkeypatch.undo()
    assert reads == []
    ref, ref_o = brute_force_grads(model, batch, names), brute_force_grads(model, other_batch,
                                                                           names)
    assert rel_err(out.gram, (ref * p_flat) @ ref.T) <= TOL
    assert rel_err(out.dots, ref @ m_flat) <= TOL
    assert rel_err(out.cross, (ref * p_flat) @ ref_o.T) <= TOL


def test_head_keeps_only_its_rows_with_loss():
    """The head's factors hold each sample's rows with loss (padded with zero rows to the most
    of any sample); products, dot_dense and weighted_sum still equal brute force, also after
    joining captures of different widths."""
    model = tiny_llama(tie=True)
    batch = padded_batch(6, 12)
    grads = gradsift.per_sample_grads(model, batch)
    (head,) = [u for u in grads.layers if getattr(u, "module_name", "") == "lm_head"]
    counts = (batch["labels"][:, 1:] != -100).sum(dim=1)
    assert head.inputs.shape[1] == int(counts.max()) < 12
    for i, n in enumerate(counts.tolist()):  # the padding rows are zero in A and D
        assert (head.output_grads[i, n:] == 0).all() and (head.inputs[i, n:] == 0).all()
    check_against_brute_force(model, batch, grads)
    other = padded_batch(2, 7, seed=3)
    joined = FactorizedGrads.concat([grads.select(torch.tensor([0, 1])),
                                     gradsift.per_sample_grads(model, other)])
    ref = brute_force_grads(model, batch, grads.param_names)
    ref_other = brute_force_grads(model, other, grads.param_names)
    w = torch.rand(4)
    got = joined.weighted_sum(w)
    flat = torch.cat([got[n].flatten() for n in grads.param_names])
    assert rel_err(flat, w[:2] @ ref[:2] + w[2:] @ ref_other) <= 1e-4


@pytest.mark.parametrize("tie", [True, False])
def test_a_compact_head_is_exact_with_uneven_loss_rows(tie):
    """More loss rows than the head's d_in (32), a different count per sample (one without
    any): the head is kept
    as A' = I, D' = g_iᵀ from one GEMM per sample over its own rows, and K (with and without a
    preconditioner), b and the cross Gram still equal brute force."""
    model = tiny_llama(tie=tie)
    batch, other_batch = padded_batch(4, 48), padded_batch(3, 40, seed=5)
    counts = (batch["labels"][:, 1:] != -100).sum(dim=1)
    assert int(counts.max()) > 32 and 0 in counts.tolist() and len(set(counts.tolist())) == 4
    grads = gradsift.per_sample_grads(model, batch)
    other = gradsift.per_sample_grads(model, other_batch)
    (head,) = [u for u in grads.layers if getattr(u, "module_name", "") == "lm_head"]
    assert head.inputs.shape[1:] == (32, 32)
    assert torch.equal(head.inputs, torch.eye(32).expand(4, 32, 32))
    names = grads.param_names
    ref, ref_o = brute_force_grads(model, batch, names), brute_force_grads(model, other_batch,
                                                                           names)
    p, m, p_flat, m_flat = _dicts(model, names)
    for gram_p, gram_ref in ((None, 1.0), (p, p_flat)):
        out = grads.products(m, gram_p, other=other, other_precondition=gram_p)
        assert rel_err(out.gram, (ref * gram_ref) @ ref.T) <= TOL
        assert rel_err(out.dots, ref @ m_flat) <= TOL
        assert rel_err(out.cross, (ref * gram_ref) @ ref_o.T) <= TOL
    check_against_brute_force(model, batch, grads)


def test_products_with_an_identity_side_are_copies():
    """``per_sample_products`` with I on either side equals the explicit sum over tokens."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, generator=gen)
    eye = identity_factor(3, 5)
    loop = torch.stack([sum(torch.outer(x[i, t], eye[i, t]) for t in range(5))
                        for i in range(3)])
    assert torch.equal(per_sample_products(x, eye), loop)
    assert torch.equal(per_sample_products(eye, x), loop.transpose(1, 2))
    not_eye = eye.clone()
    not_eye[1, 2, 3] = 0.5
    assert not is_identity(not_eye) and is_identity(eye) and is_identity(eye[1:])
    assert not is_identity(torch.eye(5).expand(3, 5, 5))  # an I of its own is multiplied
    assert torch.equal(per_sample_products(x, torch.eye(5).expand(3, 5, 5)), loop)
    assert rel_err(per_sample_products(x, not_eye), torch.bmm(x.transpose(1, 2), not_eye)) < 1e-6


def test_small_row_blocks_change_nothing(monkeypatch):
    """Blocks of a few weight rows (a tiny INNER_BLOCK) give the same products."""
    model = tiny_llama(tie=True)
    grads = gradsift.per_sample_grads(model, padded_batch(5, 8))
    other = gradsift.per_sample_grads(model, padded_batch(3, 6, seed=2))
    p, m, *_ = _dicts(model, grads.param_names)
    whole = grads.products(m, p, other=other, other_precondition=p)
    monkeypatch.setattr(gradsift.products, "INNER_BLOCK", 100)
    small = grads.products(m, p, other=other, other_precondition=p)
    for x, y in ((small.gram, whole.gram), (small.dots, whole.dots), (small.cross, whole.cross)):
        assert rel_err(x, y) <= 1e-5


@pytest.mark.parametrize("curvature", ["adam", "identity"])
def test_alignment_and_interaction_match_the_separate_functions(curvature):
    model = tiny_llama(tie=True)
    grads = gradsift.per_sample_grads(model, padded_batch(5, 9))
    target = gradsift.per_sample_grads(model, padded_batch(3, 6, seed=3))
    p, g_hat, *_ = _dicts(model, grads.param_names, seed=2)
    for precondition in (None, p):
        b, kmat, cross = alignment_and_interaction(grads, g_hat, precondition, curvature, target)
        assert rel_err(b, alignment(grads, g_hat, precondition)) <= 1e-5
        assert rel_err(kmat, interaction(grads, precondition, curvature)) <= 1e-5
        assert rel_err(cross, grads.gram(target, precondition=precondition)) <= 1e-5
    assert alignment_and_interaction(grads, g_hat, p, curvature)[2] is None
