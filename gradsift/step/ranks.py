"""The selection step on one rank of N (under ``torchrun`` / ``accelerate``).

Every rank captures its slice of the global batch; the ranks then share one selection
(``gradsift.distributed``): ``g_V`` and the weighted gradient are all-reduced, the candidates'
gradients exchanged (``exact`` or ``sketch``), and every rank selects the same indices and
weights over the global batch (``scope: global``), or ``k_r`` of its own (``scope: local``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from gradsift import distributed as ddp
from gradsift.capture import capture
from gradsift.factors import FactorizedGrads
from gradsift.optim_state import read_optimizer_state
from gradsift.select import Selection, SelectionContext
from gradsift.step.result import StepResult
from gradsift.update import all_reduce_gradients, set_weighted_gradients

if TYPE_CHECKING:
    from gradsift.step.selection_step import SelectionStep


def target_gradient(step: SelectionStep) -> dict[str, torch.Tensor]:
    """``g_V = Σ_r Σ_{t∈T_r} g_t / |T|``: every rank drew the same batch ``T`` (same
    generator) and captures its slice ``T_r``; one all-reduce sums the shares."""
    n = len(step.target_batch)
    mine = step.target_batch[ddp.rank_slice(n)]
    samples = FactorizedGrads.concat([
        capture(step.model, b, modules=step.module_names).grads
        for b in step.batches(mine)]) if mine else None
    grad = {name: torch.zeros(shape, device=step.device)
            for name, shape in step.captured_shapes.items()}
    if samples is not None:
        for name, g in samples.weighted_sum(torch.full((len(samples),), 1.0 / n)).items():
            grad[name] += g
    ddp.all_reduce_sum_(list(grad.values()))
    step.target_local = samples  # gathered by the step when the selector reads them
    step.target_samples = None
    return grad


def run(step: SelectionStep, batches: Sequence[dict[str, Any]],
        optimizer: torch.optim.Optimizer, *, grad_scale: float = 1.0,
        accumulate: bool = False) -> StepResult:
    """``SelectionStep.run`` on one rank of N, for a selector that reads gradients:
    ``batches`` hold this rank's slice of the global batch (ranks in order); indices,
    weights and losses of the result are global.

    Collectives, in order: the target all-reduce (on refresh), the exchange all-gather
    (``scope: global``; only the losses for selectors that read no gradients) or a
    losses/selection all-gather (``local``), rank 0's selection broadcast, the local
    sizes, and ONE all-reduce(SUM) of the weighted gradients. ``.grad`` is written on
    the unwrapped module and reduced here, so a DDP wrapper's own sync never runs.
    """
    if step.graph_start is not None:
        raise NotImplementedError("score_layers (truncated scoring) is not supported under "
                                  "a launcher yet: leave it unset (None) there")
    step.model.train()
    timing: dict[str, float] = {}
    cfg = step.distributed
    sent = 0

    # 1. this rank's candidates: one forward+backward, factors kept.
    t0 = time.perf_counter()
    captures = [capture(step.model, b, modules=step.module_names,
                        retain_graph=bool(step.other_params)) for b in batches]
    local = FactorizedGrads.concat([c.grads for c in captures]) if captures else None
    n_local = 0 if local is None else len(local)
    timing["capture"] = time.perf_counter() - t0

    # 2. g_V: every rank's share, all-reduced.
    t0 = time.perf_counter()
    needs_target = step.selector.needs_target
    if needs_target and (step.target_grad is None or
                         step.calls % step.config.target_refresh == 0):
        step.target_grad = step.refresh_target()
        sent += 4 * sum(math.prod(s) for s in step.captured_shapes.values())
    timing["target"] = time.perf_counter() - t0

    # 3. the exchange, then the same selection on every rank.
    t0 = time.perf_counter()
    names = list(step.captured_shapes)
    state = read_optimizer_state(optimizer, step.model, names)
    k = step.config.budget_per_step
    if cfg.scope == "global":
        target = step.target_grad if needs_target else None
        if cfg.exchange == "exact":
            everyone = step.exchange.gather_exact(local, step.device)
            sent += step.exchange.sent_bytes
            if needs_target and step.selector.needs_target_samples and (
                    step.target_samples is None):  # gathered once per target refresh
                step.target_samples = step.exchange.gather_exact(step.target_local,
                                                                 step.device)
                sent += step.exchange.sent_bytes
        else:
            if local is not None:  # the layers' shapes, kept for a rank left without data
                step.layout = FactorizedGrads(
                    [layer.select(torch.zeros(0, dtype=torch.long)) for layer in local.layers],
                    local.losses[:0])
            if step.layout is None:
                raise ValueError("exchange: sketch needs candidates on every rank at the "
                                 "first step: give each rank at least one candidate")
            shaped = local if local is not None else step.layout
            everyone = step.exchange.gather_sketch(shaped, state)
            sent += step.exchange.sent_bytes
            step.target_samples = None  # the noise of b is not sketched (shrink: uniform)
            target, state = step.exchange.geometry(shaped, target, state)
        selection = step.selector.select(SelectionContext(
            candidates=everyone, target_grad=target, optimizer_state=state, k=k,
            generator=step.selector_generator,
            target_samples=step.target_samples if needs_target else None,
            max_grad_norm=step.max_grad_norm))
        losses = everyone.losses
        # identical inputs give identical choices; broadcasting rank 0's makes it certain
        chosen = ddp.broadcast_object((selection.indices, selection.weights))
        selection.indices, selection.weights = chosen
    else:
        everyone, selection, losses = select_locally(step, local, state, k)
    step.calls += 1
    timing["selection"] = time.perf_counter() - t0

    # 4. this rank's share Σ_{i local} w_i g_i, then ONE all-reduce(SUM) of every gradient.
    t0 = time.perf_counter()
    weights = torch.zeros(len(losses))
    weights[selection.indices] = selection.weights.float().cpu()
    offsets = ddp.gather_objects(n_local)
    start = sum(offsets[: ddp.rank()])
    mine = slice(start, start + n_local)
    if len(selection.indices) > 0:
        saved = {n: p.grad for n, p in step.params.items()} if accumulate else {}
        for p in step.params.values():
            p.grad = None
        w_local = weights[mine] * grad_scale
        if local is not None and bool((w_local != 0).any()):
            set_weighted_gradients(captures, local, w_local, step.params, step.other_params)
        sent += all_reduce_gradients(step.params, saved)
    del captures
    timing["update"] = time.perf_counter() - t0
    selection.diagnostics["distributed"] = {
        "ranks": ddp.world_size(), "exchange": cfg.exchange, "scope": cfg.scope,
        "bytes_sent": sent}  # this rank's bytes in the step's collectives
    return StepResult(everyone, selection, weights, timing, local=mine,
                      exchanged_bytes=sent)


def select_locally(step: SelectionStep, local: FactorizedGrads | None, state: Any,
                   k: int) -> tuple[FactorizedGrads, Selection, torch.Tensor]:
    """``scope: local``: ``k_r`` (``k`` split over ranks) of this rank's own candidates;
    the selections are gathered (every rank's weights times 1/#ranks that selected)."""
    k_r = len(range(ddp.rank(), k, ddp.world_size()))
    needs_target = step.selector.needs_target
    if local is not None and k_r > 0:
        if needs_target and step.selector.needs_target_samples:
            step.target_samples = step.target_local
        sel = step.selector.select(SelectionContext(
            candidates=local, target_grad=step.target_grad if needs_target else None,
            optimizer_state=state, k=k_r, generator=step.selector_generator,
            target_samples=step.target_samples if needs_target else None,
            max_grad_norm=step.max_grad_norm))
        part = (sel.indices, sel.weights, sel.scores, local.losses.detach().float().cpu(),
                sel.diagnostics)
    else:
        n = 0 if local is None else len(local)
        losses = torch.zeros(0) if local is None else local.losses.detach().float().cpu()
        part = (torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(n), losses,
                {"rho": None})
    parts = ddp.gather_objects(part)
    active = sum(1 for p in parts if len(p[0]) > 0)
    indices, weights, offset = [], [], 0
    for idx, w, _, losses, _ in parts:
        indices.append(idx + offset)
        weights.append(w / max(active, 1))
        offset += len(losses)
    rhos = [p[4].get("rho") for p in parts if p[4].get("rho") is not None]
    diagnostics = {**parts[0][4], "scope": "local",
                   "rho": sum(rhos) / len(rhos) if rhos else None,
                   "rho_per_rank": [p[4].get("rho") for p in parts]}
    selection = Selection(torch.cat(indices), torch.cat(weights),
                          torch.cat([p[2] for p in parts]), diagnostics)
    losses = torch.cat([p[3] for p in parts])
    return FactorizedGrads([], losses), selection, losses

