"""Truncated scoring (``SelectionConfig.score_layers``): score with the top L blocks, train on the
k selected with a second forward+backward.

Checked against independent computations: the captured modules by name (Llama tied and untied,
GPT-2), the update in ``.grad`` against a plain ``.backward()`` of ``Σ w_i ℓ_i`` over the
selected rows from the model's full logits (every trainable parameter, the unscored lower
blocks and the embedding included), and the scores against a step whose modules are restricted
by hand to the same layers. No timing here (``gradsift.bench.step`` measures that).
"""

from __future__ import annotations

import copy

import pytest
import torch
from reference import make_examples, reference_losses, tiny_gpt2, tiny_llama

from gradsift.blocks import top_layers, transformer_blocks
from gradsift.capture import capture
from gradsift.config import ConfigError, load_config
from gradsift.data import collate
from gradsift.select import get_selector
from gradsift.step import SelectionConfig, SelectionStep

LLAMA_BLOCK = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
               "post_attention_layernorm"]
GPT2_BLOCK = ["ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"]


def _step(model, score_layers=None, modules=None, k=3):
    cfg = SelectionConfig(budget_per_step=k, micro_batch_size=4, target_batch_size=3,
                          modules=modules, score_layers=score_layers)
    return SelectionStep(model, get_selector("ftw"), make_examples(5, seed=9), cfg, seed=0)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("build,layers,expected", [
    (lambda: tiny_llama(tie=True, layers=3), 1,
     [f"model.layers.2.{m}" for m in LLAMA_BLOCK] + ["model.norm"]),  # tied head left out
    (lambda: tiny_llama(tie=False, layers=3), 2,
     [f"model.layers.{i}.{m}" for i in (1, 2) for m in LLAMA_BLOCK] + ["model.norm", "lm_head"]),
    (tiny_gpt2, 1, [f"transformer.h.1.{m}" for m in GPT2_BLOCK] + ["transformer.ln_f"]),
])
def test_the_captured_modules_are_the_top_blocks_and_above(build, layers, expected):
    model = build()
    step = _step(model, score_layers=layers)
    assert step.module_names == expected
    blocks = transformer_blocks(model)[1]
    assert step.graph_start == blocks[len(blocks) - layers]
    # every other trainable parameter is outside the factors, and trained by the second pass
    captured = {n for n in step.params if n.rsplit(".", 1)[0] in expected}
    assert {id(p) for p in step.other_params} == {
        id(p) for n, p in step.params.items() if n not in captured}
    # the capture itself returns exactly these modules' factors
    batch = step.batches(make_examples(4, seed=1))[0]
    grads = capture(model, batch, modules=step.module_names, graph_start=step.graph_start).grads
    assert [layer.module_name for layer in grads.layers] == expected


def test_modules_restrict_the_scored_set_and_bad_values_are_named():
    model = tiny_llama(tie=False, layers=3)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.q_proj", "lm_head"]
    assert top_layers(model, 1, names).names == names[1:]
    with pytest.raises(ValueError, match="none of modules"):
        top_layers(model, 1, names[:1])
    with pytest.raises(ValueError, match="has 3 transformer blocks"):
        top_layers(model, 4)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="score_layers must be an integer >= 1"):
            SelectionConfig(score_layers=bad)


def test_the_backward_stops_below_the_scored_blocks():
    """Nothing below block N−L is recorded: no backward reaches block 0 or the embedding."""
    model = tiny_llama(tie=True, layers=3)
    step = _step(model, score_layers=2)
    reached = []

    def watch(name):  # the backward reaches a module when it reaches the module's output
        def hook(module, args, out):
            out = out[0] if isinstance(out, tuple) else out
            if out.requires_grad:
                out.register_hook(lambda g: reached.append(name))
        return hook

    model.model.layers[0].register_forward_hook(watch("block 0"))
    model.model.embed_tokens.register_forward_hook(watch("embedding"))
    batch = step.batches(make_examples(4, seed=1))[0]
    capture(model, batch, modules=step.module_names, graph_start=step.graph_start)
    assert reached == [] and torch.is_grad_enabled()
    capture(model, batch)  # the full capture does reach block 0 (the embedding's D is handed
    assert reached == ["block 0"]  # over by its tap: nothing below the tap needs to run)


@pytest.mark.parametrize("build", [lambda: tiny_llama(seed=3, tie=True, layers=3), tiny_gpt2])
def test_the_update_is_a_plain_backward_of_the_weighted_loss_over_the_selected(build):
    """Two steps (AdamW state after the first): ``.grad`` of every trainable parameter equals
    ``.backward()`` of ``Σ_i w_i ℓ_i`` over the selected rows, computed independently."""
    model = build()
    ref = copy.deepcopy(model)
    step = _step(model, score_layers=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for seed in (4, 5):
        examples = make_examples(7, seed=seed)
        result = step.run(step.batches(examples), opt, grad_scale=0.5)
        chosen = result.selection.indices.tolist()
        assert 1 <= len(chosen) <= 3
        grads = _grads(model)
        assert all(grads[n].abs().sum() > 0 for n in grads if ".0." in n or "embed" in n
                   or "wte" in n)  # the unscored bottom is trained too
        ref.load_state_dict(model.state_dict())
        ref.train()
        ref.zero_grad(set_to_none=True)
        losses = reference_losses(ref, collate([examples[i] for i in chosen], 0))
        w = result.weights[chosen]
        (0.5 * (w * losses).sum()).backward()
        for name, p in ref.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)
        assert result.train_loss == pytest.approx(float((w * losses.detach()).sum()), rel=1e-5)
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("build", [lambda: tiny_llama(seed=4, tie=False, layers=3), tiny_gpt2])
def test_the_scores_are_those_of_the_modules_restricted_by_hand(build):
    """The same selection as capturing the top layers' modules named by hand (with the update
    from a second pass): the optimizer state read is that of the scored parameters only."""
    steps, models, opts = [], [], []
    for truncated in (True, False):
        model = build()
        hand = top_layers(model, 1).names
        step = _step(model, score_layers=1) if truncated else _step(model, modules=hand)
        step.second_pass = True
        steps.append(step)
        models.append(model)
        opts.append(torch.optim.AdamW(model.parameters(), lr=1e-2))
    for seed in (6, 7):
        examples = make_examples(8, seed=seed)
        (a, b) = [s.run(s.batches(examples), o) for s, o in zip(steps, opts, strict=True)]
        torch.testing.assert_close(a.selection.scores, b.selection.scores, rtol=1e-5, atol=1e-7)
        assert torch.equal(a.selection.indices, b.selection.indices)
        torch.testing.assert_close(a.weights, b.weights)
        assert a.candidates.param_names == b.candidates.param_names
        for (name, g), g2 in zip(_grads(models[0]).items(), _grads(models[1]).values(),
                                 strict=True):
            torch.testing.assert_close(g, g2, rtol=1e-5, atol=1e-7, msg=name)
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)


def test_score_layers_reaches_every_entry_point(tmp_path):
    assert load_config(None, ["engine.score_layers=2"]).engine.score_layers == 2
    assert load_config(None, []).engine.score_layers is None
    with pytest.raises(ConfigError, match="engine.score_layers"):
        load_config(None, ["engine.score_layers=0"])
    from gradsift.integrations.transformers import GradSiftConfig

    args = GradSiftConfig(output_dir=str(tmp_path), score_layers=1, report_to="none")
    assert args.selection_config().score_layers == 1
    with pytest.raises(ValueError, match="score_layers"):
        GradSiftConfig(output_dir=str(tmp_path), score_layers=0, report_to="none")
