"""Reference helpers for tests: tiny randomly initialised models and brute-force gradients."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from gradsift.loss import per_sample_loss


def tiny_llama(
    seed: int = 0, tie: bool = True, layers: int = 2, vocab: int = 64
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    cfg.attn_pdrop = cfg.resid_pdrop = cfg.embd_pdrop = 0.0
    return GPT2LMHeadModel(cfg).eval()


def padded_batch(
    batch_size: int, length: int, vocab: int = 64, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Right-padded batch with prompt positions masked and one sample without any label."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, length), generator=g)
    mask = torch.ones(batch_size, length, dtype=torch.long)
    labels = ids.clone()
    for i in range(batch_size):
        n = length - (i * 3) % max(1, length // 2)  # varying true lengths
        mask[i, n:] = 0
        labels[i, n:] = -100
        labels[i, : 1 + i % 3] = -100  # prompt positions carry no loss
    labels[min(1, batch_size - 1)] = -100  # a sample with every label ignored
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def brute_force_grads(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], names: list[str]
) -> torch.Tensor:
    """(B, P) flattened per-sample gradients from one single-sample backward per sample."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(batch["input_ids"].shape[0]):
        out = model(
            input_ids=batch["input_ids"][i : i + 1],
            attention_mask=batch["attention_mask"][i : i + 1],
            use_cache=False,
        )
        loss = per_sample_loss(out.logits, batch["labels"][i : i + 1])[0]
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(params[n]) if g is None else g).flatten()
                    for n, g in zip(names, grads, strict=True)
                ]
            )
        )
    return torch.stack(rows)


def flatten(per_param: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """(B, P) from a name → (B, *shape) dict, in the order of ``names``."""
    return torch.cat([per_param[n].reshape(per_param[n].shape[0], -1) for n in names], dim=1)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def reference_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) per-sample losses from the model's full logits (no gradsift capture involved)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return per_sample_loss(logits, batch["labels"])


class ListStream:
    """An in-memory stream with the engine's interface (position = records consumed)."""

    def __init__(self, examples: list) -> None:
        self.examples, self.pos = examples, 0

    def next_batch(self, n: int) -> list:
        out = self.examples[self.pos : self.pos + n]
        self.pos += len(out)
        return out

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


def make_examples(n: int, seed: int = 0, vocab: int = 64) -> list:
    """``n`` random ``Example``s (5–11 tokens, the first 1–3 without loss), deterministic."""
    from gradsift.data import Example

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(5, 12, (1,), generator=g))
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        prompt = 1 + i % 3
        out.append(Example(id=f"ex{seed}-{i}", source=f"s{i % 2}", input_ids=ids,
                           labels=[-100] * prompt + ids[prompt:]))
    return out


def token_rows(n: int, seed: int, prefix: str) -> list[dict]:
    """``n`` tokenized dataset rows (``id``, ``source``, ``input_ids``, ``labels``)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(1, 64, (int(torch.randint(5, 10, (1,), generator=g)),),
                            generator=g).tolist()
        out.append({"id": f"{prefix}{i}", "source": prefix, "input_ids": ids,
                    "labels": [-100, -100] + ids[2:]})
    return out
