"""The selection step for selectors that read no gradients (``Selector.needs``:
``indices`` or ``losses``): nothing is captured, the update is one ordinary
forward+backward over the chosen rows."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from gradsift import distributed as ddp
from gradsift.capture import forward_losses
from gradsift.factors import FactorizedGrads
from gradsift.optim_state import read_optimizer_state
from gradsift.select import SelectionContext
from gradsift.step.ranks import select_locally
from gradsift.step.result import StepResult
from gradsift.update import all_reduce_gradients, train_on_rows

if TYPE_CHECKING:
    from gradsift.step.selection_step import SelectionStep


def run_without_grads(step: SelectionStep, batches: Sequence[dict[str, Any]],
                      optimizer: torch.optim.Optimizer, *, grad_scale: float = 1.0,
                      accumulate: bool = False) -> StepResult:
    """``run`` for a selector that reads only indices or losses (``Selector.needs``).

    No per-sample gradient is captured: ``losses`` runs one no-grad forward over the B,
    ``indices`` none; the selector chooses, and ``.grad`` gets ``Σ_i w_i ∇ℓ_i`` from one
    ordinary forward+backward over the chosen rows only (each micro-batch's chosen rows,
    trailing all-pad columns dropped) — the same update as ``set_weighted_gradients``
    writes from the factors. Losses the step never computed are NaN in the result.
    Under a launcher every rank does this on its slice; the losses (or only the counts)
    are gathered, rank 0's selection broadcast, and the gradients all-reduced once.
    """
    step.model.train()
    timing: dict[str, float] = {}
    distributed = ddp.is_distributed()
    sent = 0

    # 1. what the selector reads: the losses (no graph) or nothing but the count.
    t0 = time.perf_counter()
    n_local = sum(int(b["input_ids"].shape[0]) for b in batches)
    if step.selector.needs == "losses" and batches:
        with torch.no_grad():
            local = torch.cat([forward_losses(step.model, b).float() for b in batches])
    else:
        local = torch.full((n_local,), math.nan, device=step.device)
    timing["capture"] = time.perf_counter() - t0
    timing["target"] = 0.0

    # 2. select (the same choice on every rank).
    t0 = time.perf_counter()
    state = read_optimizer_state(optimizer, step.model, [])
    k = step.config.budget_per_step
    if distributed and step.distributed.scope == "local":
        _, selection, losses = select_locally(
            step, FactorizedGrads([], local) if n_local else None, state, k)
    else:
        losses = ddp.all_gather_rows(local)
        sent += 4 * n_local if distributed else 0
        selection = step.selector.select(SelectionContext(
            candidates=FactorizedGrads([], losses), target_grad=None, optimizer_state=state,
            k=k, generator=step.selector_generator))
        if distributed:
            chosen = ddp.broadcast_object((selection.indices, selection.weights))
            selection.indices, selection.weights = chosen
    losses = losses.detach().float().cpu()
    step.calls += 1
    timing["selection"] = time.perf_counter() - t0

    # 3. one forward+backward over this rank's chosen rows, weighted: Σ_i w_i ∇ℓ_i.
    t0 = time.perf_counter()
    weights = torch.zeros(len(losses))
    weights[selection.indices] = selection.weights.float().cpu()
    chosen_mask = torch.zeros(len(losses), dtype=torch.bool)
    chosen_mask[selection.indices] = True
    start = sum(ddp.gather_objects(n_local)[: ddp.rank()]) if distributed else 0
    mine = slice(start, start + n_local)
    if len(selection.indices) > 0:
        saved = {n: p.grad for n, p in step.params.items()} if (
            accumulate and distributed) else {}
        if distributed or not accumulate:
            for p in step.params.values():
                p.grad = None
        trained = train_on_rows(step.model, step.params.values(), batches,
                                weights[mine] * grad_scale, chosen_mask[mine])
        for name in step.captured_shapes:  # as from the factors: zeros, never None
            if step.params[name].grad is None:
                step.params[name].grad = torch.zeros_like(step.params[name])
        if distributed:
            sent += all_reduce_gradients(step.params, saved)
        if step.selector.needs == "indices":  # the chosen rows' losses, now known
            if distributed:
                trained = ddp.all_gather_rows(trained.to(step.device)).cpu()
                sent += 4 * n_local
                losses = trained
            else:
                losses[mine] = trained
    timing["update"] = time.perf_counter() - t0
    if distributed:
        selection.diagnostics["distributed"] = {
            "ranks": ddp.world_size(), "exchange": "losses", "scope": step.distributed.scope,
            "bytes_sent": sent}
    return StepResult(FactorizedGrads([], losses), selection, weights, timing,
                      local=mine if distributed else None, exchanged_bytes=sent)
