"""The selection step, written once (DESIGN.md §5): capture → ``ĝ`` → select → ``.grad``.

``SelectionStep.run`` takes the collated micro-batches of the ``B`` candidates and

1. captures every per-sample gradient in factorized form (one forward + one backward);
   a selector that reads less pays less (``Selector.needs``): ``indices`` (random) selects
   before any pass over the B, ``losses`` (loss) after a no-grad forward over them, and both
   then train on the chosen k with one ordinary forward+backward over the k only
   (``SelectionStep.run_without_grads``); with ``score_layers`` (truncated scoring) only the
   top blocks are captured, the backward stops below them (``gradsift.blocks``), and step 4
   is a forward+backward over the k selected (as with ``second_pass``);
2. computes the target gradient ``g_V`` on a fresh target batch every ``target_refresh`` calls
   (keeping the per-example factors for selectors that read them);
3. builds the ``SelectionContext`` from the optimizer's state and lets the selector choose
   indices and weights;
4. writes ``Σ_i w_i ∇ℓ_i`` (times ``grad_scale``) into ``.grad``: ``(w ⊙ D)ᵀ A`` per captured
   layer, a backward through the retained graph for any other trainable parameter.

Stepping the optimizer, clipping and logging stay with the caller: ``OnlineTrainer`` (a plain
loop) and ``GradSiftTrainer`` (inside ``transformers.Trainer``) both call this step and
nothing else of capture, target or selection.

Under a launcher (an initialized process group of N > 1 ranks) the same step runs on every
rank over that rank's slice of the candidates, and the ranks share one selection
(``gradsift.distributed``): ``g_V`` and the weighted gradient are all-reduced, the candidates'
gradients exchanged (``exact`` or ``sketch``), and every rank selects the same indices and
weights over the global batch. Without one, nothing changes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradsift import distributed as ddp
from gradsift.blocks import top_layers
from gradsift.capture import capture, forward_losses
from gradsift.data import Example, collate, join_batches, split_batch, to_device
from gradsift.distributed import DistributedConfig, Exchange
from gradsift.factors import FactorizedGrads
from gradsift.optim_state import read_optimizer_state
from gradsift.select import Selection, SelectionContext, Selector
from gradsift.update import (
    all_reduce_gradients,
    set_weighted_gradients,
    split_parameters,
    train_on_rows,
)


@dataclass
class SelectionConfig:
    """The options of the selection step, shared by every entry point (``EngineConfig``,
    ``RunConfig``'s ``engine`` section, ``GradSiftConfig``): one set of defaults, validated
    here.

    Attributes:
        budget_per_step: k, at most this many candidates are trained on per step.
        target_batch_size: target examples per target gradient ``g_V``.
        target_refresh: draw a fresh target batch every this many steps.
        target_ema: average ``g_V`` over refreshes, ``ĝ_n = Σ_j β^{n−j}(1−β) g_j / (1−β^n)``
            (a bias-corrected exponential moving average, β = ``target_ema``; 0: the latest
            batch only). A larger effective target batch for the price of one: less noise in
            ``b``, a slightly stale direction.
        micro_batch_size: capture in chunks of this many examples (None: all at once).
        modules: module names to capture (None: every trainable module of a known kind).
        score_layers: truncated scoring (None: off). Score with the per-sample gradients of
            the top ``L`` transformer blocks only, plus the trainable modules above them
            (final norm, an untied head; a head tied to the input embedding is left out, its
            gradient includes the embedding's use below every block), among ``modules`` when
            given (``gradsift.blocks.top_layers``). The capture records no graph below block
            N−L, so its backward stops there; the update is then a second forward+backward of
            ``Σ_i w_i ℓ_i`` over the k selected only, into every trainable parameter (the
            same loss and weights as the update from the factors). The selection objective
            (``b``, ``K``, ``g_V`` and the optimizer state ``P``, ``m`` it reads) then covers
            the scored parameters only: it selects on the top of the model. Not supported
            under a launcher yet.
        target_with_candidates: when a fresh target batch is due, it rides in the
            candidates' forward+backward: one capture of B + n rows, split after, instead of
            a capture of its own. The same ``g_V``, ``K``, ``b`` and cross Gram (each row's
            gradient does not depend on its neighbours); one pass fewer, at the price of
            padding the target examples to the candidates' width. For a launch-bound GPU, where
            a pass costs its number of operations, not its tokens; on a CPU the separate pass
            over the short target examples is cheaper. Used when the candidates are one
            micro-batch, no parameter needs the retained graph, and not under a launcher;
            otherwise the target has its own pass.
    """

    budget_per_step: int = 4
    target_batch_size: int = 8
    target_refresh: int = 1
    target_ema: float = 0.0
    micro_batch_size: int | None = None
    modules: list[str] | None = None
    score_layers: int | None = None
    target_with_candidates: bool = False

    def __post_init__(self) -> None:
        for name in ("budget_per_step", "target_batch_size", "target_refresh"):
            check_positive(name, getattr(self, name))
        for name in ("micro_batch_size", "score_layers"):
            if getattr(self, name) is not None:
                check_positive(name, getattr(self, name))
        if not isinstance(self.target_with_candidates, bool):
            raise ValueError(f"target_with_candidates must be true or false, got "
                             f"{self.target_with_candidates!r}")
        if isinstance(self.target_ema, bool) or not isinstance(self.target_ema, int | float) \
                or not 0.0 <= self.target_ema < 1.0:
            raise ValueError(f"target_ema must be a number in [0, 1), got {self.target_ema!r}")
        if self.modules is not None and (
            isinstance(self.modules, str) or not all(isinstance(m, str) for m in self.modules)
        ):
            raise ValueError(f"modules must be a list of module names, got {self.modules!r}")


def check_positive(name: str, value: object) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass
class StepResult:
    """What one selection step did.

    Under a launcher every field is global: ``candidates`` are the B gathered candidates
    (``scope: local``: their losses only) and ``indices`` count in the global batch, ranks in
    order.

    Attributes:
        candidates: the candidates' factorized gradients (``candidates.losses``: (B,) losses).
        selection: the selector's indices, weights, scores and diagnostics.
        weights: (B,) float32 weight of every candidate (0 outside the selection).
        timing: seconds spent in ``capture``, ``target``, ``selection`` and ``update``.
        local: this rank's slice of the global batch (``slice(0, B)`` in one process).
        exchanged_bytes: bytes this rank sent in the step's collectives (0 in one process).
    """

    candidates: FactorizedGrads
    selection: Selection
    weights: torch.Tensor
    timing: dict[str, float]
    local: slice | None = None
    exchanged_bytes: int = 0

    @property
    def train_loss(self) -> float:
        """``Σ_i w_i ℓ_i``, the loss the update descends (over the selected candidates: the
        others' losses may not have been computed)."""
        chosen = self.weights != 0
        losses = self.candidates.losses.detach().float().cpu()
        return float((self.weights[chosen] * losses[chosen]).sum())

    @property
    def candidate_loss(self) -> float:
        """Mean loss of the candidates whose loss was computed (every one, unless the selector
        reads only indices: then the selected ones, a uniform sample of the B for ``random``)."""
        losses = self.candidates.losses.detach().float().cpu()
        known = ~torch.isnan(losses)
        return float(losses[known].mean()) if bool(known.any()) else float("nan")


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
        self._target_local: FactorizedGrads | None = None  # this rank's share of them
        self._layout: FactorizedGrads | None = None  # empty factors: the captured layers
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
        batch, and the result is global (``run_distributed``).
        """
        if self.selector.needs != "grads":
            return self.run_without_grads(batches, optimizer, grad_scale=grad_scale,
                                          accumulate=accumulate)
        if ddp.is_distributed():
            return self.run_distributed(batches, optimizer, grad_scale=grad_scale,
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
            self.target_grad = self._refresh_target(self._target_from(target))
        elif due:
            self.target_grad = self._refresh_target()
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

    def _refresh_target(self, fresh: dict[str, torch.Tensor] | None = None
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
            return self._distributed_target_gradient()
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

    # ------------------------------------------------------------ under a launcher
    def _distributed_target_gradient(self) -> dict[str, torch.Tensor]:
        """``g_V = Σ_r Σ_{t∈T_r} g_t / |T|``: every rank drew the same batch ``T`` (same
        generator) and captures its slice ``T_r``; one all-reduce sums the shares."""
        n = len(self.target_batch)
        mine = self.target_batch[ddp.rank_slice(n)]
        samples = FactorizedGrads.concat([
            capture(self.model, b, modules=self.module_names).grads
            for b in self.batches(mine)]) if mine else None
        grad = {name: torch.zeros(shape, device=self.device)
                for name, shape in self.captured_shapes.items()}
        if samples is not None:
            for name, g in samples.weighted_sum(torch.full((len(samples),), 1.0 / n)).items():
                grad[name] += g
        ddp.all_reduce_sum_(list(grad.values()))
        self._target_local = samples  # gathered by the step when the selector reads them
        self.target_samples = None
        return grad

    def run_distributed(self, batches: Sequence[dict[str, Any]],
                        optimizer: torch.optim.Optimizer, *, grad_scale: float = 1.0,
                        accumulate: bool = False) -> StepResult:
        """``run`` on one rank of N: ``batches`` hold this rank's slice of the global batch
        (ranks in order); indices, weights and losses of the result are global.

        Collectives, in order: the target all-reduce (on refresh), the exchange all-gather
        (``scope: global``; only the losses for selectors that read no gradients) or a
        losses/selection all-gather (``local``), rank 0's selection broadcast, the local
        sizes, and ONE all-reduce(SUM) of the weighted gradients. ``.grad`` is written on
        the unwrapped module and reduced here, so a DDP wrapper's own sync never runs.
        """
        if self.selector.needs != "grads":
            return self.run_without_grads(batches, optimizer, grad_scale=grad_scale,
                                          accumulate=accumulate)
        if self.graph_start is not None:
            raise NotImplementedError("score_layers (truncated scoring) is not supported under "
                                      "a launcher yet: leave it unset (None) there")
        self.model.train()
        timing: dict[str, float] = {}
        cfg = self.distributed
        sent = 0

        # 1. this rank's candidates: one forward+backward, factors kept.
        t0 = time.perf_counter()
        captures = [capture(self.model, b, modules=self.module_names,
                            retain_graph=bool(self.other_params)) for b in batches]
        local = FactorizedGrads.concat([c.grads for c in captures]) if captures else None
        n_local = 0 if local is None else len(local)
        timing["capture"] = time.perf_counter() - t0

        # 2. g_V: every rank's share, all-reduced.
        t0 = time.perf_counter()
        needs_target = self.selector.needs_target
        if needs_target and (self.target_grad is None or
                             self.calls % self.config.target_refresh == 0):
            self.target_grad = self._refresh_target()
            sent += 4 * sum(math.prod(s) for s in self.captured_shapes.values())
        timing["target"] = time.perf_counter() - t0

        # 3. the exchange, then the same selection on every rank.
        t0 = time.perf_counter()
        names = list(self.captured_shapes)
        state = read_optimizer_state(optimizer, self.model, names)
        k = self.config.budget_per_step
        if cfg.scope == "global":
            target = self.target_grad if needs_target else None
            if cfg.exchange == "exact":
                everyone = self.exchange.gather_exact(local, self.device)
                sent += self.exchange.sent_bytes
                if needs_target and self.selector.needs_target_samples and (
                        self.target_samples is None):  # gathered once per target refresh
                    self.target_samples = self.exchange.gather_exact(self._target_local,
                                                                     self.device)
                    sent += self.exchange.sent_bytes
            else:
                if local is not None:  # the layers' shapes, kept for a rank left without data
                    self._layout = FactorizedGrads(
                        [layer.select(torch.zeros(0, dtype=torch.long)) for layer in local.layers],
                        local.losses[:0])
                if self._layout is None:
                    raise ValueError("exchange: sketch needs candidates on every rank at the "
                                     "first step: give each rank at least one candidate")
                shaped = local if local is not None else self._layout
                everyone = self.exchange.gather_sketch(shaped, state)
                sent += self.exchange.sent_bytes
                self.target_samples = None  # the noise of b is not sketched (shrink: uniform)
                target, state = self.exchange.geometry(shaped, target, state)
            selection = self.selector.select(SelectionContext(
                candidates=everyone, target_grad=target, optimizer_state=state, k=k,
                generator=self.selector_generator,
                target_samples=self.target_samples if needs_target else None,
                max_grad_norm=self.max_grad_norm))
            losses = everyone.losses
            # identical inputs give identical choices; broadcasting rank 0's makes it certain
            chosen = ddp.broadcast_object((selection.indices, selection.weights))
            selection.indices, selection.weights = chosen
        else:
            everyone, selection, losses = self._select_locally(local, state, k)
        self.calls += 1
        timing["selection"] = time.perf_counter() - t0

        # 4. this rank's share Σ_{i local} w_i g_i, then ONE all-reduce(SUM) of every gradient.
        t0 = time.perf_counter()
        weights = torch.zeros(len(losses))
        weights[selection.indices] = selection.weights.float().cpu()
        offsets = ddp.gather_objects(n_local)
        start = sum(offsets[: ddp.rank()])
        mine = slice(start, start + n_local)
        if len(selection.indices) > 0:
            saved = {n: p.grad for n, p in self.params.items()} if accumulate else {}
            for p in self.params.values():
                p.grad = None
            w_local = weights[mine] * grad_scale
            if local is not None and bool((w_local != 0).any()):
                set_weighted_gradients(captures, local, w_local, self.params, self.other_params)
            sent += all_reduce_gradients(self.params, saved)
        del captures
        timing["update"] = time.perf_counter() - t0
        selection.diagnostics["distributed"] = {
            "ranks": ddp.world_size(), "exchange": cfg.exchange, "scope": cfg.scope,
            "bytes_sent": sent}  # this rank's bytes in the step's collectives
        return StepResult(everyone, selection, weights, timing, local=mine,
                          exchanged_bytes=sent)

    # ------------------------------------------------ selectors that read no gradients
    def run_without_grads(self, batches: Sequence[dict[str, Any]],
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
        self.model.train()
        timing: dict[str, float] = {}
        distributed = ddp.is_distributed()
        sent = 0

        # 1. what the selector reads: the losses (no graph) or nothing but the count.
        t0 = time.perf_counter()
        n_local = sum(int(b["input_ids"].shape[0]) for b in batches)
        if self.selector.needs == "losses" and batches:
            with torch.no_grad():
                local = torch.cat([forward_losses(self.model, b).float() for b in batches])
        else:
            local = torch.full((n_local,), math.nan, device=self.device)
        timing["capture"] = time.perf_counter() - t0
        timing["target"] = 0.0

        # 2. select (the same choice on every rank).
        t0 = time.perf_counter()
        state = read_optimizer_state(optimizer, self.model, [])
        k = self.config.budget_per_step
        if distributed and self.distributed.scope == "local":
            _, selection, losses = self._select_locally(
                FactorizedGrads([], local) if n_local else None, state, k)
        else:
            losses = ddp.all_gather_rows(local)
            sent += 4 * n_local if distributed else 0
            selection = self.selector.select(SelectionContext(
                candidates=FactorizedGrads([], losses), target_grad=None, optimizer_state=state,
                k=k, generator=self.selector_generator))
            if distributed:
                chosen = ddp.broadcast_object((selection.indices, selection.weights))
                selection.indices, selection.weights = chosen
        losses = losses.detach().float().cpu()
        self.calls += 1
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
            saved = {n: p.grad for n, p in self.params.items()} if (
                accumulate and distributed) else {}
            if distributed or not accumulate:
                for p in self.params.values():
                    p.grad = None
            trained = train_on_rows(self.model, self.params.values(), batches,
                                    weights[mine] * grad_scale, chosen_mask[mine])
            for name in self.captured_shapes:  # as from the factors: zeros, never None
                if self.params[name].grad is None:
                    self.params[name].grad = torch.zeros_like(self.params[name])
            if distributed:
                sent += all_reduce_gradients(self.params, saved)
            if self.selector.needs == "indices":  # the chosen rows' losses, now known
                if distributed:
                    trained = ddp.all_gather_rows(trained.to(self.device)).cpu()
                    sent += 4 * n_local
                    losses = trained
                else:
                    losses[mine] = trained
        timing["update"] = time.perf_counter() - t0
        if distributed:
            selection.diagnostics["distributed"] = {
                "ranks": ddp.world_size(), "exchange": "losses", "scope": self.distributed.scope,
                "bytes_sent": sent}
        return StepResult(FactorizedGrads([], losses), selection, weights, timing,
                          local=mine if distributed else None, exchanged_bytes=sent)

    def _select_locally(self, local: FactorizedGrads | None, state: Any,
                        k: int) -> tuple[FactorizedGrads, Selection, torch.Tensor]:
        """``scope: local``: ``k_r`` (``k`` split over ranks) of this rank's own candidates;
        the selections are gathered (every rank's weights times 1/#ranks that selected)."""
        k_r = len(range(ddp.rank(), k, ddp.world_size()))
        needs_target = self.selector.needs_target
        if local is not None and k_r > 0:
            if needs_target and self.selector.needs_target_samples:
                self.target_samples = self._target_local
            sel = self.selector.select(SelectionContext(
                candidates=local, target_grad=self.target_grad if needs_target else None,
                optimizer_state=state, k=k_r, generator=self.selector_generator,
                target_samples=self.target_samples if needs_target else None,
                max_grad_norm=self.max_grad_norm))
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
