"""Per-sample losses against a hand loop over tokens."""

from __future__ import annotations

import math

import torch

from gradsift.loss import loss_positions, per_sample_loss


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
