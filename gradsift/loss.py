"""Per-sample causal-LM losses in the Hugging Face label convention."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def per_sample_loss(
    logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy per sample: ``ℓ_i = mean_t CE(logits[i,t], labels[i,t+1])``.

    Labels are shifted inside, exactly as ``model(..., labels=...)`` does; positions labelled
    ``-100`` carry no loss. A sample with no labelled position gets ``ℓ_i = 0`` (and so a zero
    gradient), never NaN. Computed in float32 whatever the logits' dtype.

    Args:
        logits: (B, T, V) model outputs, or (B, P, V) at ``positions`` only.
        labels: (B, T) token ids, ``-100`` where there is no loss.
        positions: (P,) the positions ``t`` whose logits were kept (see ``loss_positions``);
            their targets are ``labels[:, t + 1]``.

    Returns:
        (B,) float32 per-sample losses, differentiable w.r.t. ``logits``.
    """
    if positions is None:
        shift_logits = logits[:, :-1, :].float()
        shift_labels = labels[:, 1:].to(logits.device)
    else:
        shift_logits = logits.float()
        shift_labels = labels[:, positions.to(labels.device) + 1].to(logits.device)
    token_loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    counts = (shift_labels != IGNORE_INDEX).sum(dim=1)
    return token_loss.sum(dim=1) / counts.clamp(min=1)


def per_sample_loss_at_rows(logits: torch.Tensor, targets: torch.Tensor,
                            counts: torch.Tensor) -> torch.Tensor:
    """``per_sample_loss`` from the logits at the rows with loss only, every sample's rows one
    after another (sample i's: the next ``counts[i]``; see ``logit_rows_with_loss``).

    Args:
        logits: (N, V) logits, N = ``counts.sum()``.
        targets: (N,) the token each row predicts.
        counts: (B,) rows per sample; a sample without any gets ``ℓ_i = 0``.
    """
    token_loss = F.cross_entropy(logits.float(), targets.to(logits.device), reduction="none")
    counts = counts.to(logits.device)
    sample = torch.repeat_interleave(torch.arange(len(counts), device=logits.device), counts)
    sums = torch.zeros(len(counts), device=logits.device).index_add(0, sample, token_loss)
    return sums / counts.clamp(min=1)


def trained_token_counts(labels: torch.Tensor) -> torch.Tensor:
    """(B,) number of positions that carry loss in each sample (after the shift)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """(P,) positions ``t`` whose logits predict a labelled token in at least one sample.

    Only these logits enter the loss: computing the vocabulary projection and the softmax
    there alone skips prompts and padding (``logits_to_keep`` in transformers).
    """
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)


def logit_rows_with_loss(labels: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """(B, P) bool: which rows of the logits (all T positions, or ``positions``) carry loss.

    The gradient of ``per_sample_loss`` w.r.t. every other row is exactly zero (an ignored
    target, the last position, a sample without labels).
    """
    if positions is None:
        rows = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
        rows[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        return rows
    return labels[:, positions.to(labels.device) + 1] != IGNORE_INDEX
