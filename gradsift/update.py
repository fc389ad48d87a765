"""The update: ``Σ_i w_i ∇ℓ_i`` of the selected candidates into ``.grad``.

Two routes give the same gradient. From the factors the capture kept (``set_weighted_gradients``:
``(w ⊙ D)ᵀ A`` per captured layer, a backward through the retained graph for any other
trainable parameter), or by one more forward+backward of ``Σ_i w_i ℓ_i`` over the chosen rows
only (``train_on_rows``: selectors that read no gradients, truncated scoring, ``second_pass``).
Under a launcher each rank writes its share and ``all_reduce_gradients`` sums them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gradsift import distributed as ddp
from gradsift.capture import Capture, forward_losses, resolve_modules
from gradsift.factors import FactorizedGrads


def split_parameters(
    model: nn.Module, modules: list[str] | None
) -> tuple[list[str], dict[str, nn.Parameter], list[nn.Parameter]]:
    """Captured module names, every trainable parameter by name, and the trainable parameters
    outside the factors (updated through the retained graph)."""
    names = resolve_modules(model, modules)
    captured = {f"{m}.{a}" for m in names for a in ("weight", "bias")}
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return names, params, [p for n, p in params.items() if n not in captured]


def set_weighted_gradients(
    captures: Sequence[Capture],
    candidates: FactorizedGrads,
    weights: torch.Tensor,
    params: dict[str, nn.Parameter],
    other_params: Sequence[nn.Parameter],
    accumulate: bool = False,
) -> None:
    """Put ``Σ_i w_i ∇ℓ_i`` into ``.grad``: ``(w ⊙ D)ᵀ A`` for captured layers, and a
    backward of ``Σ_i w_i ℓ_i`` through the retained graph for ``other_params``.

    With ``accumulate`` the result is added to existing ``.grad`` (gradient accumulation).
    """
    for name, g in candidates.weighted_sum(weights).items():
        p = params[name]
        g = g.to(p.dtype)
        p.grad = g if (p.grad is None or not accumulate) else p.grad + g
    if other_params:
        if not accumulate:
            for p in other_params:
                p.grad = None
        offset = 0
        for c in captures:
            w = weights[offset : offset + len(c.losses)].to(c.losses.device)
            offset += len(c.losses)
            torch.autograd.backward((w * c.losses).sum(), inputs=list(other_params))


def chosen_rows(batch: dict[str, Any], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The ``rows`` of a collated batch (``input_ids``, ``attention_mask``, ``labels``), without
    the trailing columns that are padding in every one of them (right padding: nothing
    before them attends to them, and they carry no loss)."""
    sub = {k: batch[k][rows] for k in ("input_ids", "attention_mask", "labels")
           if batch.get(k) is not None}
    mask = sub.get("attention_mask")
    if mask is not None and mask.shape[1] > 0:
        used = mask.bool().any(0).nonzero()
        width = int(used[-1]) + 1 if used.numel() else 1
        sub = {k: v[:, :width] for k, v in sub.items()}
    return sub


def train_on_rows(model: nn.Module, params: Sequence[nn.Parameter],
                  batches: Sequence[dict[str, Any]], weights: torch.Tensor,
                  chosen: torch.Tensor) -> torch.Tensor:
    """Backward of ``Σ_i w_i ℓ_i`` over the ``chosen`` rows of ``batches`` (rows in order),
    accumulated into the ``params``' ``.grad``; returns the (n,) losses, NaN outside the
    chosen rows."""
    params = list(params)
    out = torch.full((len(weights),), math.nan)
    offset = 0
    for batch in batches:
        n = int(batch["input_ids"].shape[0])
        rows = chosen[offset : offset + n].nonzero().squeeze(1)
        if rows.numel() > 0:
            sub = chosen_rows(batch, rows.to(batch["input_ids"].device))
            losses = forward_losses(model, sub)
            w = weights[offset + rows].to(losses.device, losses.dtype)
            torch.autograd.backward((w * losses).sum(), inputs=params)
            out[offset + rows] = losses.detach().float().cpu()
        offset += n
    return out


def all_reduce_gradients(params: dict[str, nn.Parameter],
                         saved: dict[str, torch.Tensor | None]) -> int:
    """Sum every parameter's ``.grad`` over the ranks (zeros where a rank has none), then add
    back the ``.grad`` each held before the step (``saved``, accumulation); returns the bytes
    sent."""
    grads = []
    for p in params.values():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    ddp.all_reduce_sum_(grads)
    for n, p in params.items():
        if saved.get(n) is not None:
            p.grad = saved[n] + p.grad
    return 4 * sum(g.numel() for g in grads)
