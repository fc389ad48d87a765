"""The selection step, written once (DESIGN.md §5): capture → ``ĝ`` → select → ``.grad``.

``SelectionStep.run`` takes the collated micro-batches of the ``B`` candidates and

1. captures every per-sample gradient in factorized form (one forward + one backward);
2. computes the target gradient ``g_V`` on a fresh target batch every ``target_refresh`` calls
   (keeping the per-example factors for selectors that read them);
3. builds the ``SelectionContext`` from the optimizer's state and lets the selector choose
   indices and weights;
4. writes ``Σ_i w_i ∇ℓ_i`` (times ``grad_scale``) into ``.grad``: ``(w ⊙ D)ᵀ A`` per captured
   layer, a backward through the retained graph for any other trainable parameter.

Stepping the optimizer, clipping and logging stay with the caller: ``OnlineTrainer`` (a plain
loop) and ``GradSiftTrainer`` (inside ``transformers.Trainer``) both call this step and
nothing else of capture, target or selection.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradsift.capture import Capture, capture, resolve_modules
from gradsift.data import Example, collate
from gradsift.factors import FactorizedGrads
from gradsift.optim_state import read_optimizer_state
from gradsift.select import Selection, SelectionContext, Selector


@dataclass
class SelectionConfig:
    """The options of the selection step, shared by every entry point (``EngineConfig``,
    ``RunConfig``'s ``engine`` section, ``GradSiftConfig``): one set of defaults, validated
    here.

    Attributes:
        budget_per_step: k, at most this many candidates are trained on per step.
        target_batch_size: target examples per target gradient ``g_V``.
        target_refresh: draw a fresh target batch every this many steps.
        micro_batch_size: capture in chunks of this many examples (None: all at once).
        modules: module names to capture (None: every trainable module of a known kind).
    """

    budget_per_step: int = 4
    target_batch_size: int = 8
    target_refresh: int = 1
    micro_batch_size: int | None = None
    modules: list[str] | None = None

    def __post_init__(self) -> None:
        for name in ("budget_per_step", "target_batch_size", "target_refresh"):
            check_positive(name, getattr(self, name))
        if self.micro_batch_size is not None:
            check_positive("micro_batch_size", self.micro_batch_size)
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

    Attributes:
        candidates: the candidates' factorized gradients (``candidates.losses``: (B,) losses).
        selection: the selector's indices, weights, scores and diagnostics.
        weights: (B,) float32 weight of every candidate (0 outside the selection).
        timing: seconds spent in ``capture``, ``target``, ``selection`` and ``update``.
    """

    candidates: FactorizedGrads
    selection: Selection
    weights: torch.Tensor
    timing: dict[str, float]

    @property
    def train_loss(self) -> float:
        """``Σ_i w_i ℓ_i``, the loss the update descends."""
        return float((self.weights * self.candidates.losses.detach().float().cpu()).sum())


class SelectionStep:
    """Capture, target gradient, selection and the weighted gradient of one training step.

    Args:
        model: the model being trained (unwrapped: not a DDP/compiled wrapper).
        selector: a ``gradsift.select`` selector.
        target_examples: the examples target batches are drawn from.
        config: ``SelectionConfig`` (budget, target batch size and refresh, micro-batch size,
            captured modules).
        pad_token_id: padding id for collating target batches.
        seed: seeds the target draws (``seed``) and the selector's generator (``seed + 1``).
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
    ):
        if len(target_examples) == 0 and selector.needs_target:
            raise ValueError("the target set is empty: nothing to select towards")
        self.model, self.selector, self.config = model, selector, config
        self.target_examples = list(target_examples)
        self.pad_token_id = pad_token_id
        self.module_names, self.params, self.other_params = split_parameters(
            model, config.modules)
        self.target_generator = torch.Generator().manual_seed(seed)
        self.selector_generator = torch.Generator().manual_seed(seed + 1)
        self.calls = 0
        self.target_grad: dict[str, torch.Tensor] | None = None
        self.target_samples: FactorizedGrads | None = None  # per-example factors behind g_V
        self.target_batch: list[Example] = []  # the target examples behind g_V

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
        """
        self.model.train()
        timing: dict[str, float] = {}

        # 1. one forward+backward over all B candidates, in micro-batches, keeping factors.
        t0 = time.perf_counter()
        captures = [capture(self.model, b, modules=self.module_names,
                            retain_graph=bool(self.other_params)) for b in batches]
        candidates = FactorizedGrads.concat([c.grads for c in captures])
        timing["capture"] = time.perf_counter() - t0

        # 2. the target gradient g_V, refreshed every `target_refresh` calls.
        t0 = time.perf_counter()
        needs_target = self.selector.needs_target
        refresh = self.config.target_refresh
        if needs_target and (self.target_grad is None or self.calls % refresh == 0):
            self.target_grad = self._target_gradient()
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
        ))
        self.calls += 1
        timing["selection"] = time.perf_counter() - t0

        # 4. the weighted gradient, assembled from the same pass (no second forward).
        t0 = time.perf_counter()
        weights = torch.zeros(len(candidates))
        weights[selection.indices] = selection.weights.float().cpu()
        if len(selection.indices) > 0:
            set_weighted_gradients(captures, candidates, weights * grad_scale, self.params,
                                   self.other_params, accumulate=accumulate)
        del captures
        timing["update"] = time.perf_counter() - t0
        return StepResult(candidates, selection, weights, timing)

    def _target_gradient(self) -> dict[str, torch.Tensor]:
        n = min(self.config.target_batch_size, len(self.target_examples))
        picks = torch.randperm(len(self.target_examples), generator=self.target_generator)[:n]
        self.target_batch = [self.target_examples[i] for i in picks.tolist()]
        samples = FactorizedGrads.concat([
            capture(self.model, b, modules=self.module_names).grads
            for b in self.batches(self.target_batch)])
        # the per-example factors stay only for selectors that read them (noise of b)
        self.target_samples = samples if self.selector.needs_target_samples else None
        return samples.weighted_sum(torch.full((len(samples),), 1.0 / len(samples)))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Counters, generator states, the cached ``g_V`` and the selector's state."""
        return {
            "calls": self.calls,
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
        self.target_generator.set_state(state["target_generator"])
        self.selector_generator.set_state(state["selector_generator"])
        grad = state.get("target_grad")
        self.target_grad = None if grad is None else {
            n: t.to(self.device) for n, t in grad.items()}
        self.target_samples = None
        self.selector.load_state_dict(state.get("selector") or {})


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


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
