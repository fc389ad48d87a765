"""The online training step: capture, target gradient, select, weighted update (DESIGN.md §5).

Framework-free, plain PyTorch. Every step B candidates arrive from the stream; one forward
and one backward over them (in micro-batches when B does not fit at once) give the per-sample
factors; a selector picks at most k with weights; the update ``Σ_i w_i g_i`` is assembled
from the same factors (``(w ⊙ D)ᵀ A`` per linear layer) — no second forward. Parameters that
are not linear-like (embeddings, norms) get theirs from a backward of ``Σ_i w_i ℓ_i`` through
the graph kept from the candidate pass.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from gradsift.capture import Capture, capture, forward_losses, resolve_modules
from gradsift.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from gradsift.data import Example, collate
from gradsift.factors import FactorizedGrads
from gradsift.jsonio import dumps_line
from gradsift.loss import trained_token_counts
from gradsift.optim_state import read_optimizer_state
from gradsift.select import Selection, SelectionContext, Selector

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The run stopped: non-finite parameters, or too many steps in a row without an update."""


class CandidateStream(Protocol):
    """What the engine needs from a stream: the next n examples, and a resumable position."""

    def next_batch(self, n: int) -> list[Example]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class EngineConfig:
    """Knobs of the online step.

    Attributes:
        candidates_per_step: B, candidates that arrive each step.
        budget_per_step: k, at most this many are trained on.
        micro_batch_size: capture in chunks of this many candidates (None: all B at once).
        target_batch_size: target examples per target gradient.
        target_refresh: draw a fresh target batch every this many steps.
        eval_size: held-out target examples for the target-loss metric (never drawn for g_V).
        eval_every: evaluate the held-out target loss every this many steps (0: never).
        checkpoint_every: checkpoint every this many steps (0: only when asked).
        max_grad_norm: clip the update's gradient norm (None: no clipping).
        modules: module names to capture (None: every trainable linear-like module).
        total_steps: the run's last step, always evaluated (None: unknown).
        seed: seeds the target draws and the selector's generator.
        keep_checkpoints: keep this many newest checkpoints.
        max_consecutive_skips: stop (``TrainingDiverged``) after this many steps in a row
            without an update — nothing selected, or a non-finite loss or gradient (0: never).
    """

    candidates_per_step: int = 16
    budget_per_step: int = 4
    micro_batch_size: int | None = None
    target_batch_size: int = 8
    target_refresh: int = 1
    eval_size: int = 16
    eval_every: int = 10
    checkpoint_every: int = 0
    max_grad_norm: float | None = None
    modules: list[str] | None = None
    total_steps: int | None = None
    seed: int = 0
    keep_checkpoints: int = 3
    max_consecutive_skips: int = 5

    def __post_init__(self) -> None:
        for name in ("candidates_per_step", "budget_per_step", "target_batch_size",
                     "target_refresh", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_size", "eval_every", "checkpoint_every", "max_consecutive_skips"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 (None: no clipping), "
                             f"got {self.max_grad_norm}")


@dataclass
class TrainerState:
    """Counters that a checkpoint restores."""

    step: int = 0
    trained_samples: int = 0
    trained_tokens: int = 0
    wall_seconds: float = 0.0
    skipped_updates: int = 0
    consecutive_skips: int = 0
    last_target_loss: float = float("nan")
    last_eval_step: int = -1
    log_offsets: dict[str, int] = field(default_factory=dict)


class OnlineTrainer:
    """Online fine-tuning with per-step data selection.

    Args:
        model: a causal LM (transformers or peft) in the training dtype and device.
        optimizer: a torch optimizer over the model's trainable parameters (AdamW expected).
        selector: a ``gradsift.select`` selector (``get_selector("ftw")``).
        stream: the candidate stream.
        target: target-set examples; the first ``eval_size`` are held out for evaluation.
        config: ``EngineConfig``.
        run_dir: where ``selections.jsonl``, ``metrics.jsonl`` and ``checkpoints/`` go.
        scheduler: an optional LR scheduler stepped after every update.
        pad_token_id: padding id for collation.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        selector: Selector,
        stream: CandidateStream,
        target: Sequence[Example],
        config: EngineConfig,
        run_dir: str | Path,
        scheduler: Any | None = None,
        pad_token_id: int = 0,
    ):
        if len(target) == 0:
            raise ValueError("the target set is empty: nothing to select towards")
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.selector, self.stream, self.config = selector, stream, config
        self.pad_token_id = pad_token_id
        self.device = next(model.parameters()).device
        self.eval_set = list(target[: config.eval_size])
        self.target_pool = list(target[config.eval_size :]) or list(target)
        if len(target) <= config.eval_size:
            logger.warning(
                "target set has %d examples, not more than eval_size=%d: target batches are "
                "drawn from the held-out examples too", len(target), config.eval_size)
        self.module_names, self.params, self.other_params = split_parameters(model, config.modules)
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.state = TrainerState()
        self.target_generator = torch.Generator().manual_seed(config.seed)
        self.selector_generator = torch.Generator().manual_seed(config.seed + 1)
        self.target_grad: dict[str, torch.Tensor] | None = None
        self.target_samples: FactorizedGrads | None = None  # per-example factors behind g_V
        self.target_batch: list[Example] = []  # the target examples behind g_V
        self.last_metrics: dict[str, Any] = {}
        self.last_skip_reason: str | None = None  # why the last step made no update
        self._params_nonfinite = False
        self._checkpoint_step: int | None = None  # the step of the checkpoint on disk
        self._start = time.perf_counter()

    # ------------------------------------------------------------------ the step
    def step(self) -> dict[str, Any] | None:
        """One online step; returns its selection record, or None when the stream is done."""
        cfg = self.config
        examples = self.stream.next_batch(cfg.candidates_per_step)
        if not examples:
            return None
        self.model.train()
        timing: dict[str, float] = {}

        # 1. one forward+backward over all B candidates, in micro-batches, keeping factors.
        t0 = time.perf_counter()
        captures = self._capture(examples, retain_graph=bool(self.other_params))
        candidates = FactorizedGrads.concat([c.grads for c in captures])
        timing["capture"] = time.perf_counter() - t0

        # 2. the target gradient g_V, refreshed every `target_refresh` steps.
        t0 = time.perf_counter()
        if self.selector.needs_target and (
            self.target_grad is None or self.state.step % cfg.target_refresh == 0
        ):
            self.target_grad = self._target_gradient()
        timing["target"] = time.perf_counter() - t0

        # 3. select: a pure function of gathered tensors and the optimizer's state.
        t0 = time.perf_counter()
        ctx = SelectionContext(
            candidates=candidates,
            target_grad=self.target_grad if self.selector.needs_target else None,
            optimizer_state=read_optimizer_state(self.optimizer, self.model,
                                                 candidates.param_names),
            k=cfg.budget_per_step,
            generator=self.selector_generator,
            target_samples=self.target_samples if self.selector.needs_target else None,
        )
        selection = self.selector.select(ctx)
        timing["selection"] = time.perf_counter() - t0

        # 4. the weighted update, assembled from the same pass.
        t0 = time.perf_counter()
        weights = torch.zeros(len(examples))
        weights[selection.indices] = selection.weights.float().cpu()
        skip = None
        if len(selection.indices) > 0:
            set_weighted_gradients(captures, candidates, weights, self.params, self.other_params)
            norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()),
                                                  cfg.max_grad_norm or float("inf"))
            if torch.isfinite(norm):
                self.optimizer.step()
                if self.scheduler is not None:
                    self.scheduler.step()
                self.state.trained_samples += len(selection.indices)
                self.state.trained_tokens += int(sum(
                    _n_label_tokens(examples[i]) for i in selection.indices.tolist()))
                self._params_nonfinite = not all(
                    bool(torch.isfinite(p).all()) for p in self.params.values())
            else:  # like AMP's GradScaler: a non-finite loss or gradient makes no update
                bad_loss = not torch.isfinite(candidates.losses[selection.indices]).all()
                skip = "non-finite loss" if bad_loss else "non-finite gradient"
            self.optimizer.zero_grad(set_to_none=True)
        else:
            skip = f"no candidate selected ({selection.diagnostics.get('note', '')})"
        self._count_skip(skip)
        del captures
        timing["update"] = time.perf_counter() - t0

        self.state.step += 1
        record = self._selection_record(examples, candidates, selection, timing)
        self._append("selections.jsonl", record)
        self._after_step(candidates, weights)
        self._check_progress()
        return record

    # ------------------------------------------------------------ divergence
    def _count_skip(self, reason: str | None) -> None:
        self.last_skip_reason = reason
        if reason is None:
            self.state.consecutive_skips = 0
            return
        self.state.skipped_updates += 1
        self.state.consecutive_skips += 1
        logger.info("step %d: no update: %s", self.state.step, reason)

    def _check_progress(self) -> None:
        """Raise ``TrainingDiverged`` on non-finite parameters, or after
        ``max_consecutive_skips`` steps in a row without an update."""
        st, limit = self.state, self.config.max_consecutive_skips
        kept = (f"the last checkpoint is step {self._checkpoint_step}"
                if self._checkpoint_step is not None else "no checkpoint was written")
        if self._params_nonfinite:
            raise TrainingDiverged(
                f"step {st.step}: the parameters became non-finite (NaN/inf) after the update; "
                f"{kept}. Lower lr or max_grad_norm, or use dtype float32 or bfloat16")
        if limit and st.consecutive_skips >= limit:
            advice = ("Lower lr or max_grad_norm, or use dtype float32 or bfloat16"
                      if "non-finite" in (self.last_skip_reason or "") else
                      "If the run is diverging, lower lr or max_grad_norm; if the method "
                      "filters out everything, loosen its options or raise "
                      "max_consecutive_skips (0: never stop)")
            raise TrainingDiverged(
                f"no update for {st.consecutive_skips} steps in a row (steps "
                f"{st.step - st.consecutive_skips + 1}-{st.step}, last: {self.last_skip_reason}); "
                f"{kept}. {advice}")

    # ---------------------------------------------------------------- pieces
    def _batches(self, examples: Sequence[Example], size: int | None = None) -> list[dict]:
        size = size or self.config.micro_batch_size or len(examples)
        return [
            self._to_device(collate(examples[start : start + size], self.pad_token_id))
            for start in range(0, len(examples), size)
        ]

    def _capture(self, examples: Sequence[Example], retain_graph: bool) -> list[Capture]:
        return capture_batches(self.model, self._batches(examples), self.module_names,
                               retain_graph)

    def _target_gradient(self) -> dict[str, torch.Tensor]:
        n = min(self.config.target_batch_size, len(self.target_pool))
        picks = torch.randperm(len(self.target_pool), generator=self.target_generator)[:n]
        batch = [self.target_pool[i] for i in picks.tolist()]
        self.target_batch = batch
        samples = FactorizedGrads.concat([c.grads for c in capture_batches(
            self.model, self._batches(batch), self.module_names, False)])
        # the per-example factors stay only for selectors that read them (noise of b)
        self.target_samples = samples if self.selector.needs_target_samples else None
        return samples.weighted_sum(torch.full((len(samples),), 1.0 / len(samples)))

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean per-sample loss on the held-out target examples (eval mode)."""
        examples = self.eval_set or self.target_pool
        was_training = self.model.training
        self.model.eval()
        total = 0.0
        for batch in self._batches(examples, self.config.micro_batch_size or 16):
            total += float(forward_losses(self.model, batch).sum())
        self.model.train(was_training)
        return total / len(examples)

    def _evaluate_and_record(self) -> float:
        loss = self.evaluate()
        self.state.last_target_loss, self.state.last_eval_step = loss, self.state.step
        return loss

    def log_initial_eval(self) -> float:
        """Record the held-out target loss before the first step (step 0)."""
        loss = self._evaluate_and_record()
        self._append("metrics.jsonl", {"step": 0, "trained_samples": 0, "trained_tokens": 0,
                                       "wall_seconds": 0.0, "target_loss": loss})
        return loss

    def log_final_eval(self) -> float:
        """Evaluate after the last step when the schedule did not (e.g. the stream ended)."""
        loss = self._evaluate_and_record()
        self._append("metrics.jsonl", {**self.last_metrics, "target_loss": loss})
        return loss

    @property
    def last_target_loss(self) -> float:
        return self.state.last_target_loss

    @property
    def last_eval_step(self) -> int:
        return self.state.last_eval_step

    def _after_step(self, candidates: FactorizedGrads, weights: torch.Tensor) -> None:
        cfg, st = self.config, self.state
        st.wall_seconds += time.perf_counter() - self._start
        self._start = time.perf_counter()
        metrics: dict[str, Any] = {
            "step": st.step,
            "trained_samples": st.trained_samples,
            "trained_tokens": st.trained_tokens,
            "train_loss": float((weights * candidates.losses.cpu()).sum()),
            "candidate_loss": float(candidates.losses.mean()),
            "lr": self.optimizer.param_groups[0]["lr"],
            "wall_seconds": round(st.wall_seconds, 3),
        }
        if (cfg.eval_every and st.step % cfg.eval_every == 0) or st.step == cfg.total_steps:
            metrics["target_loss"] = self._evaluate_and_record()
        self.last_metrics = metrics
        self._append("metrics.jsonl", metrics)
        diverging = "non-finite" in (self.last_skip_reason or "")
        if cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0 and not diverging:
            self.save_checkpoint()

    def _selection_record(self, examples, candidates, selection: Selection, timing) -> dict:
        ids = [e.id for e in examples]
        sel = selection.indices.tolist()
        return {
            "step": self.state.step,
            "candidate_ids": ids,
            "candidate_sources": [e.source for e in examples],
            "selected_ids": [ids[i] for i in sel],
            "weights": [round(float(w), 8) for w in selection.weights],
            "scores": [_json_float(s) for s in selection.scores.tolist()],
            "losses": [round(float(v), 6) for v in candidates.losses.tolist()],
            "rho": _json_float(selection.diagnostics.get("rho")),
            "timing": {k: round(v, 6) for k, v in timing.items()},
            "diagnostics": {k: v for k, v in selection.diagnostics.items() if k != "rho"},
            "skip_reason": self.last_skip_reason,
        }

    def _append(self, name: str, record: dict) -> None:
        with open(self.run_dir / name, "a", encoding="utf-8") as f:
            f.write(dumps_line(record))  # strict JSON: NaN/inf become null

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    # ------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path | None:
        """Write a complete, verified checkpoint for exact resume (once per step; never of
        non-finite parameters: then None, and the last good checkpoint stays)."""
        if self._checkpoint_step == self.state.step:
            return self.run_dir / "checkpoints" / f"step_{self.state.step:06d}"
        if not all(bool(torch.isfinite(p).all()) for p in self.params.values()):
            logger.warning("step %d: parameters are not finite; no checkpoint written",
                           self.state.step)
            return None
        offsets = {}
        for name in ("selections.jsonl", "metrics.jsonl"):
            path = self.run_dir / name
            offsets[name] = path.stat().st_size if path.exists() else 0
            if path.exists():  # on disk before the checkpoint that counts on them
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        self.state.log_offsets = offsets
        folder = save_checkpoint(self.run_dir / "checkpoints", self, self.config.keep_checkpoints)
        self._checkpoint_step = self.state.step
        return folder

    def resume(self, checkpoint: str | Path | None = None) -> int:
        """Restore the newest intact (or given) checkpoint, truncating logs written after it.

        Raises:
            CheckpointError: no intact checkpoint, or a log is shorter than the checkpoint
                says (records were lost; nothing is padded or truncated then).
        """
        folder = load_checkpoint(self.run_dir / "checkpoints", self, checkpoint)
        sizes = {name: (self.run_dir / name).stat().st_size if (self.run_dir / name).exists()
                 else 0 for name in self.state.log_offsets}
        short = [f"{name} has {sizes[name]} bytes, {size} when {folder.name} was written"
                 for name, size in self.state.log_offsets.items() if sizes[name] < size]
        if short:
            raise CheckpointError(f"{self.run_dir}: {'; '.join(short)}: log records were lost. "
                                  "Restore the logs, or start a new run")
        for name, size in self.state.log_offsets.items():
            path = self.run_dir / name
            if path.exists():
                with open(path, "r+b") as f:
                    f.truncate(size)
        self._start = time.perf_counter()
        self._checkpoint_step = self.state.step
        return self.state.step

    def trainer_state(self) -> dict[str, Any]:
        return asdict(self.state)


def split_parameters(
    model: nn.Module, modules: list[str] | None
) -> tuple[list[str], dict[str, nn.Parameter], list[nn.Parameter]]:
    """Captured module names, every trainable parameter by name, and the trainable parameters
    outside the factors (updated through the retained graph)."""
    names = resolve_modules(model, modules)
    captured = {f"{m}.{a}" for m in names for a in ("weight", "bias")}
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return names, params, [p for n, p in params.items() if n not in captured]


def capture_batches(
    model: nn.Module, batches: Sequence[dict[str, Any]], modules: list[str], retain_graph: bool
) -> list[Capture]:
    """One capture (forward + backward with factors) per micro-batch."""
    return [capture(model, b, modules=modules, retain_graph=retain_graph) for b in batches]


def target_gradient(
    model: nn.Module, batches: Sequence[dict[str, Any]], modules: list[str]
) -> dict[str, torch.Tensor]:
    """``g_V = (1/n) Σ_j ∇ℓ_j`` over the target examples, for the captured parameters."""
    grads = FactorizedGrads.concat([c.grads for c in capture_batches(model, batches, modules,
                                                                     False)])
    return grads.weighted_sum(torch.full((len(grads),), 1.0 / len(grads)))


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


def _n_label_tokens(example: Example) -> int:
    return int(trained_token_counts(torch.tensor([example.labels])).item())


def _json_float(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if x != x or x in (float("inf"), float("-inf")) else round(x, 8)
