"""``SelectionStep``: capture, target gradient, selection and the weighted gradient of one
training step (``gradsift.step``); under a launcher ``run`` hands over to
``gradsift.step.ranks``, for selectors that read no gradients to ``gradsift.step.no_grads``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gradsift import distributed as ddp
from gradsift.blocks import top_layers
from gradsift.capture import capture
from gradsift.data import Example, collate, join_batches, split_batch, to_device
from gradsift.distributed import DistributedConfig, Exchange
from gradsift.factors import FactorizedGrads
from gradsift.optim_state import read_optimizer_state
from gradsift.select import SelectionContext, Selector
from gradsift.step import no_grads, ranks
from gradsift.step.config import SelectionConfig
from gradsift.step.result import StepResult
from gradsift.update import set_weighted_gradients, split_parameters, train_on_rows


class SelectionStep:
    """Capture, target gradient, selection and the weighted gradient of one training step.

    Args:
        model: the model being trained (unwrapped: not a DDP/compiled wrapper).
        selector: a ``gradsift.select`` selector.
        target_examples: the examples target batches are drawn from.
        config: ``SelectionConfig`` (budget, target batch size and refresh, micro-batch size,
            captured modules).
        pad_token_id: padding id for collating target batches.
        seed: seeds the target draws (``seed``) and the selector's generator (``seed + 1``);
            the same on every rank.
        distributed: how ranks share the selection under a launcher (default: exact, global).
    """

    def __init__(
        self,
        model: nn.Module,
        selector: Selector,
        target_examples: Sequence[Example],
        config: SelectionConfig,
        *,
        pad_token_id: int = 0,
        seed: int = 0,
        distributed: DistributedConfig | None = None,
    ):
        if len(target_examples) == 0 and selector.needs_target:
            raise ValueError("the target set is empty: nothing to select towards")
        model = ddp.unwrap(model)  # capture on the module: DDP's hooks never fire
        ddp.check_supported(model)
        self.distributed = distributed or DistributedConfig()
        if ddp.is_distributed() and self.distributed.exchange == "sketch" and (
                self.distributed.scope == "global"):
            ddp.check_sketch_selector(selector)
        self.model, self.selector, self.config = model, selector, config
        self.target_examples = list(target_examples)
        self.pad_token_id = pad_token_id
        # truncated scoring: the top L blocks' modules, the capture's graph from block N−L
        self.top_layers = (top_layers(model, config.score_layers, config.modules)
                           if config.score_layers is not None else None)
        self.graph_start = self.top_layers.first_block if self.top_layers else None
        self.module_names, self.params, self.other_params = split_parameters(
            model, self.top_layers.names if self.top_layers else config.modules)
        self.target_generator = torch.Generator().manual_seed(seed)
        self.selector_generator = torch.Generator().manual_seed(seed + 1)
        self.calls = 0
        self.target_refreshes = 0  # target batches drawn (the EMA's bias correction)
        # the clipping the caller applies to the weighted gradient (the selection context
        # passes it on to selectors that model the optimizer step exactly)
        self.max_grad_norm: float | None = None
        self.target_grad: dict[str, torch.Tensor] | None = None
        self.target_samples: FactorizedGrads | None = None  # per-example factors behind g_V
        self.target_batch: list[Example] = []  # the target examples behind g_V
        self.target_local: FactorizedGrads | None = None  # this rank's share of them
        self.layout: FactorizedGrads | None = None  # empty factors: the captured layers
        # captured parameters in capture order: the layout ranks exchange
        self.captured_shapes = {n: self.params[n].shape for n in dict.fromkeys(
            f"{m}.{a}" for m in self.module_names for a in ("weight", "bias"))
            if n in self.params}
        self.exchange = Exchange(self.distributed, self.captured_shapes, seed=seed + 2)
        # True: after selecting, train on the chosen rows with a second forward+backward over
        # them instead of assembling Σ w_i g_i from the factors — the same update, the way
        # GREATS' reference code works; kept to measure against (gradsift.bench.step).
        # Always so with truncated scoring (the factors cover only the top of the model).
        self.second_pass = False
        # the Gram route of the candidates' factors (FactorizedGrads: auto, ghost or
        # materialize); kept to measure each against (gradsift.bench.step)
        self.route = "auto"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def batches(self, examples: Sequence[Example], size: int | None = None) -> list[dict]:
        """``examples`` collated into micro-batches of ``size`` on the model's device."""
        size = size or self.config.micro_batch_size or len(examples)
        return [to_device(collate(examples[i : i + size], self.pad_token_id), self.device)
                for i in range(0, len(examples), size)]

    def run(self, batches: Sequence[dict[str, Any]], optimizer: torch.optim.Optimizer, *,
            grad_scale: float = 1.0, accumulate: bool = False) -> StepResult:
        """One selection over the candidates in ``batches``; ``.grad`` holds the update after.

        Args:
            batches: collated micro-batches (``input_ids``, ``attention_mask``, ``labels``).
            optimizer: the optimizer whose state gives ``P`` (it is not stepped here).
            grad_scale: multiplies the weighted gradient (e.g. 1/accumulation steps).
            accumulate: add to existing ``.grad`` instead of replacing it.

        Under a launcher ``batches`` are this rank's slice (possibly none) of the global
        batch, and the result is global (``gradsift.step.ranks.run``).
        """
        if self.selector.needs != "grads":
            return no_grads.run_without_grads(self, batches, optimizer,
                                              grad_scale=grad_scale, accumulate=accumulate)
        if ddp.is_distributed():
            return ranks.run(self, batches, optimizer, grad_scale=grad_scale,
                             accumulate=accumulate)
        self.model.train()
        timing: dict[str, float] = {}

        # 1. one forward+backward over all B candidates, in micro-batches, keeping factors.
        t0 = time.perf_counter()
        second_pass = self.second_pass or self.graph_start is not None
        retain = bool(self.other_params) and not second_pass
        needs_target = self.selector.needs_target
        due = needs_target and (self.target_grad is None
                                or self.calls % self.config.target_refresh == 0)
        riding = (due and self.config.target_with_candidates and len(batches) == 1
                  and not retain)
        if riding:  # the target batch joins the candidates' pass (its rows after theirs)
            self._draw_target_batch()
            target_rows = to_device(collate(self.target_batch, self.pad_token_id),
                                    self.device)
            batches = [join_batches(batches[0], target_rows, self.pad_token_id)]
        captures = [capture(self.model, b, modules=self.module_names, route=self.route,
                            retain_graph=retain, graph_start=self.graph_start)
                    for b in batches]
        candidates = FactorizedGrads.concat([c.grads for c in captures])
        timing["capture"] = time.perf_counter() - t0

        # 2. the target gradient g_V, refreshed every `target_refresh` calls.
        t0 = time.perf_counter()
        if riding:
            n = len(candidates) - len(self.target_batch)
            target = candidates.select(slice(n, None))
            candidates = candidates.select(slice(0, n))
            batches = [split_batch(batches[0], n)]
            self.target_grad = self.refresh_target(self._target_from(target))
        elif due:
            self.target_grad = self.refresh_target()
        timing["target"] = time.perf_counter() - t0

        # 3. select: a pure function of gathered tensors and the optimizer's state.
        t0 = time.perf_counter()
        selection = self.selector.select(SelectionContext(
            candidates=candidates,
            target_grad=self.target_grad if needs_target else None,
            optimizer_state=read_optimizer_state(optimizer, self.model, candidates.param_names),
            k=self.config.budget_per_step,
            generator=self.selector_generator,
            target_samples=self.target_samples if needs_target else None,
            max_grad_norm=self.max_grad_norm,
        ))
        self.calls += 1
        timing["selection"] = time.perf_counter() - t0

        # 4. the weighted gradient, assembled from the same pass (no second forward).
        t0 = time.perf_counter()
        weights = torch.zeros(len(candidates))
        weights[selection.indices] = selection.weights.float().cpu()
        if len(selection.indices) > 0 and second_pass:
            captures = None  # the factors' activations go before the second pass
            if not accumulate:
                for p in self.params.values():
                    p.grad = None
            chosen = torch.zeros(len(weights), dtype=torch.bool)
            chosen[selection.indices] = True
            train_on_rows(self.model, self.params.values(), batches, weights * grad_scale,
                          chosen)
        elif len(selection.indices) > 0:
            set_weighted_gradients(captures, candidates, weights * grad_scale, self.params,
                                   self.other_params, accumulate=accumulate)
        del captures
        timing["update"] = time.perf_counter() - t0
        return StepResult(candidates, selection, weights, timing)

    def refresh_target(self, fresh: dict[str, torch.Tensor] | None = None
                        ) -> dict[str, torch.Tensor]:
        """A fresh ``g_V`` (``fresh``, or from a target pass of its own), blended into the
        earlier ones when ``target_ema`` is set: ``ĝ_n = a ĝ_{n−1} + (1−a) g_n`` with
        ``a = β(1−β^{n−1})/(1−β^n)``, the bias-corrected EMA (so ``ĝ_1 = g_1``)."""
        if fresh is None:
            fresh = self._target_gradient()
        beta = float(self.config.target_ema)
        self.target_refreshes += 1
        n = self.target_refreshes
        if beta == 0.0 or n == 1 or self.target_grad is None:
            return fresh
        keep = beta * (1.0 - beta ** (n - 1)) / (1.0 - beta**n)
        return {name: keep * self.target_grad[name] + (1.0 - keep) * g
                for name, g in fresh.items()}

    def _draw_target_batch(self) -> None:
        n = min(self.config.target_batch_size, len(self.target_examples))
        picks = torch.randperm(len(self.target_examples), generator=self.target_generator)[:n]
        # in length order (stable): ``_target_batches`` splits it there
        self.target_batch = sorted((self.target_examples[i] for i in picks.tolist()),
                                   key=lambda ex: len(ex.input_ids))

    def _target_gradient(self) -> dict[str, torch.Tensor]:
        self._draw_target_batch()
        if ddp.is_distributed():
            return ranks.target_gradient(self)
        return self._target_from(FactorizedGrads.concat([
            capture(self.model, b, modules=self.module_names, route=self.route,
                    graph_start=self.graph_start).grads
            for b in self._target_batches()]))

    def _target_batches(self) -> list[dict[str, Any]]:
        """The target batch collated by length: on a CPU, without a micro-batch size, the
        shorter and the longer half go in two passes when that pads at least a quarter fewer
        positions (target examples are short and uneven; a CPU pass costs its padded
        positions, a GPU pass its launches: one pass there). ``target_batch`` is in length
        order, so its rows match the factors'."""
        if (self.config.micro_batch_size is not None or len(self.target_batch) < 4
                or self.device.type != "cpu"):
            return self.batches(self.target_batch)
        lengths = [len(ex.input_ids) for ex in self.target_batch]
        half = len(lengths) // 2
        if lengths[half - 1] * half + lengths[-1] * (len(lengths) - half) \
                > 0.75 * lengths[-1] * len(lengths):
            return self.batches(self.target_batch)
        return self.batches(self.target_batch[:half]) + self.batches(self.target_batch[half:])

    def _target_from(self, samples: FactorizedGrads) -> dict[str, torch.Tensor]:
        """``g_V``, the mean of the target examples' gradients; their factors stay only for
        selectors that read them (the noise of ``b``)."""
        self.target_samples = samples if self.selector.needs_target_samples else None
        return samples.weighted_sum(torch.full((len(samples),), 1.0 / len(samples)))


    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Counters, generator states, the cached ``g_V`` and the selector's state."""
        return {
            "calls": self.calls,
            "target_refreshes": self.target_refreshes,
            "target_generator": self.target_generator.get_state(),
            "selector_generator": self.selector_generator.get_state(),
            "target_grad": None if self.target_grad is None else {
                n: t.detach().cpu() for n, t in self.target_grad.items()},
            "selector": self.selector.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` (the per-example target factors are not kept: with
        ``target_refresh > 1`` a resumed ``shrink`` weighting waits for the next refresh)."""
        self.calls = int(state["calls"])
        self.target_refreshes = int(state.get("target_refreshes", 0))
        self.target_generator.set_state(state["target_generator"])
        self.selector_generator.set_state(state["selector_generator"])
        grad = state.get("target_grad")
        self.target_grad = None if grad is None else {
            n: t.to(self.device) for n, t in grad.items()}
        self.target_samples = None
        self.selector.load_state_dict(state.get("selector") or {})
