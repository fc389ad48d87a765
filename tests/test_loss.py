"""Per-sample losses against a hand loop over tokens."""

from __future__ import annotations

import math

import torch

from gradsift.loss import (
    logit_rows_with_loss,
    loss_positions,
    per_sample_loss,
    per_sample_loss_at_rows,
)


def hand_loss(logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    out = []
    for i in range(labels.shape[0]):
        terms = []
        for t in range(labels.shape[1] - 1):
            target = int(labels[i, t + 1])
            if target != -100:
                row = logits[i, t].double()
                terms.append(float(torch.logsumexp(row, 0) - row[target]))
        out.append(sum(terms) / len(terms) if terms else 0.0)
    return out


def test_per_sample_loss_full_and_at_positions_match_a_hand_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :4] = -100  # a prompt
    labels[1, 5:] = -100  # padding
    labels[2] = -100  # nothing to learn
    labels[:, 1] = -100  # a position no sample learns from
    expected = hand_loss(logits, labels)
    full = per_sample_loss(logits, labels)
    positions = loss_positions(labels)
    assert 0 not in positions.tolist() and positions.numel() < 6
    kept = per_sample_loss(logits[:, positions], labels, positions)
    for got in (full, kept):
        assert [round(float(x), 5) for x in got] == [round(x, 5) for x in expected]
    assert expected[2] == 0.0 and not math.isnan(float(kept[2]))


def test_per_sample_loss_at_rows_matches_a_hand_loop():
    """Every sample's rows with loss, one after another (sample 2 has none)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :4] = -100
    labels[1, 5:] = -100
    labels[2] = -100
    rows = logit_rows_with_loss(labels, None)
    counts = rows.sum(dim=1)
    assert counts.tolist() == [3, 4, 0]
    got = per_sample_loss_at_rows(logits[rows], labels[:, 1:][rows[:, :-1]], counts)
    assert [round(float(x), 5) for x in got] == [round(x, 5) for x in hand_loss(logits, labels)]


def test_forward_losses_with_the_head_at_rows_equal_the_models_own_loss():
    """The head run on the rows with loss only (one (1, N, V) sequence) gives every sample the
    loss transformers computes for it alone, tied or untied head, Llama or GPT-2."""
    from reference import padded_batch, tiny_gpt2, tiny_llama

    from gradsift.capture import forward_losses

    batch = padded_batch(5, 12)
    for model in (tiny_llama(tie=True), tiny_llama(tie=False), tiny_gpt2()):
        seen: list = []
        with torch.no_grad():
            got = forward_losses(model, batch, seen)
            plain = forward_losses(model, batch, head_at_rows=False)
        n_rows = int((batch["labels"][:, 1:] != -100).sum())
        assert seen[0].shape[:2] == (1, n_rows) and seen[2] is not None
        for i in range(5):
            labels = batch["labels"][i : i + 1]
            if (labels[:, 1:] == -100).all():
                assert float(got[i]) == 0.0
                continue
            with torch.no_grad():
                own = model(input_ids=batch["input_ids"][i : i + 1],
                            attention_mask=batch["attention_mask"][i : i + 1],
                            labels=labels).loss
            assert abs(float(got[i]) - float(own)) <= 1e-5
            assert abs(float(plain[i]) - float(own)) <= 1e-5
