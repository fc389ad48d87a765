"""The online training loop around the shared selection step (DESIGN.md §5).

Framework-free, plain PyTorch. Every step ``B`` candidates arrive from the stream;
``gradsift.step.SelectionStep`` captures their per-sample factors, selects at most ``k`` with
weights and puts ``Σ_i w_i g_i`` into ``.grad`` (from the factors: no second forward; a
selector that reads only indices or losses skips the capture and trains on its k with one
forward+backward over them, ``gradsift.step.no_grads``); this
loop clips, steps the optimizer and the scheduler, counts, evaluates the held-out target loss,
logs through ``gradsift.runlog`` and checkpoints through ``state_dict()``.

Under ``torchrun``/``accelerate launch`` (DDP, one process group initialized before the
trainer is built) every rank runs this same loop: each reads the same global batch of ``B``
from its own copy of the stream (so the stream position is one number, identical everywhere,
and a rank-0 checkpoint resumes every rank), captures only its contiguous slice
(``gradsift.distributed.rank_slice``) and takes part in one global selection
(``SelectionStep.run``). Every rank steps its optimizer on the same all-reduced gradient, so
the replicas stay identical; rank 0 alone writes logs and checkpoints.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from gradsift.capture import forward_losses
from gradsift.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from gradsift.data import Example
from gradsift.distributed import DistributedConfig, is_main_process, rank_slice, world_size
from gradsift.loss import trained_token_counts
from gradsift.runlog import (
    EVAL_LOSSES,
    LOGS,
    METRICS,
    SELECTIONS,
    RunLog,
    drop_records_after,
    eval_losses_record,
    selection_record,
)
from gradsift.select import Selector
from gradsift.step import SelectionConfig, SelectionStep, check_positive

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The run stopped: non-finite parameters, or too many steps in a row without an update."""


class CandidateStream(Protocol):
    """What the engine needs from a stream: the next n examples, and a resumable position."""

    def next_batch(self, n: int) -> list[Example]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class EngineConfig(SelectionConfig):
    """Knobs of the online loop: the selection step's (``SelectionConfig``: budget, target
    batch size and refresh, micro-batch size, captured modules) plus the loop's own.
    ``RunConfig`` holds one as its ``engine:`` section; one set of defaults, validated here.

    Attributes:
        candidates_per_step: B, candidates that arrive each step.
        eval_size: held-out target examples for the target-loss metric (never drawn for g_V).
        eval_every: evaluate the held-out target loss every this many steps (0: never).
        checkpoint_every: checkpoint every this many steps (0: only when asked).
        max_grad_norm: clip the update's gradient norm (None: no clipping).
        keep_checkpoints: keep this many newest checkpoints.
        max_consecutive_skips: stop (``TrainingDiverged``) after this many steps in a row
            without an update — nothing selected, or a non-finite loss or gradient (0: never).
    """

    candidates_per_step: int = 16
    eval_size: int = 16
    eval_every: int = 5
    checkpoint_every: int = 10
    max_grad_norm: float | None = 1.0
    keep_checkpoints: int = 3
    max_consecutive_skips: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("candidates_per_step", "keep_checkpoints"):
            check_positive(name, getattr(self, name))
        for name in ("eval_size", "eval_every", "checkpoint_every", "max_consecutive_skips"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 (None: no clipping), "
                             f"got {self.max_grad_norm}")
        if self.budget_per_step > self.candidates_per_step:
            raise ValueError(f"budget_per_step ({self.budget_per_step}) must not exceed "
                             f"candidates_per_step ({self.candidates_per_step})")


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
        seed: seeds the target draws and the selector's generator.
        total_steps: the run's last step, always evaluated (None: unknown).
        distributed: how ranks share one selection under a launcher (``exchange``,
            ``scope``, ``sketch_dim``; default exact, global). Ignored in one process.
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
        seed: int = 0,
        total_steps: int | None = None,
        distributed: DistributedConfig | None = None,
    ):
        if len(target) == 0:
            raise ValueError("the target set is empty: nothing to select towards")
        if config.candidates_per_step < world_size():
            raise ValueError(f"candidates_per_step ({config.candidates_per_step}) is less than "
                             f"the {world_size()} ranks: give every rank at least one candidate")
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.stream, self.config, self.total_steps = stream, config, total_steps
        self.eval_set = list(target[: config.eval_size])
        target_pool = list(target[config.eval_size :]) or list(target)
        if len(target) <= config.eval_size:
            logger.warning(
                "target set has %d examples, not more than eval_size=%d: target batches are "
                "drawn from the held-out examples too", len(target), config.eval_size)
        self.selection = SelectionStep(model, selector, target_pool, config,
                                       pad_token_id=pad_token_id, seed=seed,
                                       distributed=distributed)
        self.selection.max_grad_norm = config.max_grad_norm
        self.model = self.selection.model  # the module inside a DDP wrapper
        self.run_dir = Path(run_dir)
        self.runlog = RunLog(self.run_dir, enabled=is_main_process())
        self.state = TrainerState()
        self.last_metrics: dict[str, Any] = {}
        self.last_skip_reason: str | None = None  # why the last step made no update
        self._params_nonfinite = False
        self._checkpoint_step: int | None = None  # the step of the checkpoint on disk
        self._start = time.perf_counter()

    # the step's pieces, by their usual names
    selector = property(lambda self: self.selection.selector)
    params = property(lambda self: self.selection.params)
    module_names = property(lambda self: self.selection.module_names)
    other_params = property(lambda self: self.selection.other_params)
    target_pool = property(lambda self: self.selection.target_examples)
    target_grad = property(lambda self: self.selection.target_grad)
    target_batch = property(lambda self: self.selection.target_batch)
    device = property(lambda self: self.selection.device)
    pad_token_id = property(lambda self: self.selection.pad_token_id)

    # ------------------------------------------------------------------ the step
    def step(self) -> dict[str, Any] | None:
        """One online step; returns its selection record, or None when the stream is done."""
        cfg = self.config
        examples = self.stream.next_batch(cfg.candidates_per_step)
        if not examples:
            return None
        # every rank read the same global batch; it captures only its own slice of it
        mine = examples[rank_slice(len(examples))]
        # capture → g_V → select → Σ w_i g_i in .grad: the shared step (one global selection)
        result = self.selection.run(self.selection.batches(mine) if mine else [],
                                    self.optimizer)
        indices = result.selection.indices

        t0 = time.perf_counter()
        skip = None
        if len(indices) > 0:
            params = list(self.params.values())
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
            if torch.isfinite(norm):
                self.optimizer.step()
                if self.scheduler is not None:
                    self.scheduler.step()
                self.state.trained_samples += len(indices)
                self.state.trained_tokens += int(sum(
                    _n_label_tokens(examples[i]) for i in indices.tolist()))
                # one host sync for all parameters, not one per parameter
                self._params_nonfinite = not bool(torch.stack(
                    [torch.isfinite(p).all() for p in params]).all())
            else:  # like AMP's GradScaler: a non-finite loss or gradient makes no update
                bad_loss = not torch.isfinite(result.candidates.losses[indices]).all()
                skip = "non-finite loss" if bad_loss else "non-finite gradient"
            self.optimizer.zero_grad(set_to_none=True)
        else:
            skip = f"no candidate selected ({result.selection.diagnostics.get('note', '')})"
        self._count_skip(skip)
        result.timing["update"] += time.perf_counter() - t0

        self.state.step += 1
        record = selection_record(self.state.step, [e.id for e in examples],
                                  [e.source for e in examples], result, skip)
        self._append(SELECTIONS, record)
        self._after_step(result.train_loss, result.candidate_loss)
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
    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean per-sample loss on the held-out target examples (eval mode)."""
        return self.evaluate_examples()[0]

    @property
    def held_out(self) -> list[Example]:
        """The examples ``evaluate`` scores: the held-out set (the target pool without one)."""
        return self.eval_set or self.target_pool

    def evaluate_examples(self) -> tuple[float, list[float]]:
        """The held-out mean loss (``evaluate``) and each held-out example's own mean token
        loss, in the held-out set's order: what an analysis over examples needs."""
        examples = self.held_out
        was_training = self.model.training
        self.model.eval()
        total, each = 0.0, []
        with torch.no_grad():  # no graph kept for a loss nobody differentiates
            for batch in self.selection.batches(examples, self.config.micro_batch_size or 16):
                losses = forward_losses(self.model, batch)
                total += float(losses.sum())
                each += losses.tolist()
        self.model.train(was_training)
        return total / len(examples), each

    def _evaluate_and_record(self) -> float:
        """Evaluate, and log each held-out example's loss (``eval_losses.jsonl``)."""
        loss, each = self.evaluate_examples()
        self.state.last_target_loss, self.state.last_eval_step = loss, self.state.step
        self._append(EVAL_LOSSES, eval_losses_record(self.state.step,
                                                     [e.id for e in self.held_out], each))
        return loss

    def log_initial_eval(self) -> float:
        """Record the held-out target loss before the first step (step 0)."""
        loss = self._evaluate_and_record()
        self._append(METRICS, {"step": 0, "trained_samples": 0, "trained_tokens": 0,
                               "wall_seconds": 0.0, "target_loss": loss})
        return loss

    def log_final_eval(self) -> float:
        """Evaluate after the last step when the schedule did not (e.g. the stream ended)."""
        loss = self._evaluate_and_record()
        self._append(METRICS, {**self.last_metrics, "target_loss": loss})
        return loss

    @property
    def last_target_loss(self) -> float:
        return self.state.last_target_loss

    @property
    def last_eval_step(self) -> int:
        return self.state.last_eval_step

    def _after_step(self, train_loss: float, candidate_loss: float) -> None:
        cfg, st = self.config, self.state
        st.wall_seconds += time.perf_counter() - self._start
        self._start = time.perf_counter()
        metrics: dict[str, Any] = {
            "step": st.step,
            "trained_samples": st.trained_samples,
            "trained_tokens": st.trained_tokens,
            "train_loss": train_loss,
            "candidate_loss": candidate_loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "wall_seconds": round(st.wall_seconds, 3),
        }
        if (cfg.eval_every and st.step % cfg.eval_every == 0) or st.step == self.total_steps:
            metrics["target_loss"] = self._evaluate_and_record()
        self.last_metrics = metrics
        self._append(METRICS, metrics)
        diverging = "non-finite" in (self.last_skip_reason or "")
        if cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0 and not diverging:
            self.save_checkpoint()

    def _append(self, name: str, record: dict) -> None:
        self.runlog.append(name, record)  # strict JSON: NaN/inf become null

    # ------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything exact resume needs, in the four parts a checkpoint stores:
        ``params`` and ``target_grad`` (tensors), ``torch`` (optimizer, scheduler, generator
        and RNG states) and ``info`` (JSON: counters, stream position, selector state)."""
        step = self.selection.state_dict()
        return {
            "params": {n: p.detach().contiguous().cpu() for n, p in self.params.items()},
            "target_grad": step["target_grad"],
            "torch": {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "python_rng": random.getstate(),
                "target_generator": step["target_generator"],
                "selector_generator": step["selector_generator"],
            },
            "info": {"trainer": asdict(self.state), "stream": self.stream.state_dict(),
                     "selector": step["selector"], "selection_calls": step["calls"]},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``.

        Raises:
            CheckpointError: the state lacks some of this model's trainable parameters.
        """
        missing = set(self.params) - set(state["params"])
        if missing:
            raise CheckpointError(
                f"the checkpoint lacks trainable parameters {sorted(missing)[:5]}: was it "
                "written with another model or LoRA config?")
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(state["params"][n].to(p.device, p.dtype))
        t, info = state["torch"], state["info"]
        self.optimizer.load_state_dict(t["optimizer"])
        if self.scheduler is not None and t["scheduler"] is not None:
            self.scheduler.load_state_dict(t["scheduler"])
        torch.set_rng_state(t["torch_rng"])
        if t["cuda_rng"]:
            torch.cuda.set_rng_state_all(t["cuda_rng"])
        random.setstate(_as_tuple(t["python_rng"]))
        for key, value in info["trainer"].items():
            setattr(self.state, key, value)
        self.stream.load_state_dict(info["stream"])
        self.selection.load_state_dict({
            "calls": info.get("selection_calls", self.state.step),
            "target_generator": t["target_generator"],
            "selector_generator": t["selector_generator"],
            "target_grad": state["target_grad"], "selector": info["selector"]})

    def save_checkpoint(self) -> Path | None:
        """Write a complete, verified checkpoint for exact resume (once per step; never of
        non-finite parameters: then None, and the last good checkpoint stays)."""
        if self._checkpoint_step == self.state.step:
            return self.run_dir / "checkpoints" / f"step_{self.state.step:06d}"
        if not all(bool(torch.isfinite(p).all()) for p in self.params.values()):
            logger.warning("step %d: parameters are not finite; no checkpoint written",
                           self.state.step)
            return None
        if not is_main_process():  # the replicas are identical: rank 0 writes for all
            self._checkpoint_step = self.state.step
            return None
        offsets = {}
        for name in LOGS:
            path = self.run_dir / name
            offsets[name] = path.stat().st_size if path.exists() else 0
            if path.exists():  # on disk before the checkpoint that counts on them
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        self.state.log_offsets = offsets
        folder = save_checkpoint(self.run_dir / "checkpoints", self.state.step,
                                 self.state_dict(), self.config.keep_checkpoints)
        self._checkpoint_step = self.state.step
        return folder

    def resume(self, checkpoint: str | Path | None = None) -> int:
        """Restore the newest intact (or given) checkpoint, truncating logs written after it.

        Raises:
            CheckpointError: no intact checkpoint, or a log is shorter than the checkpoint
                says (records were lost; nothing is padded or truncated then).
        """
        folder, state = load_checkpoint(self.run_dir / "checkpoints", checkpoint,
                                        restore=self.load_state_dict)
        if not is_main_process():  # every rank restores; rank 0 alone owns the logs
            self._start = time.perf_counter()
            self._checkpoint_step = self.state.step
            return self.state.step
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
        for name in set(LOGS) - set(self.state.log_offsets):  # a log newer than the checkpoint
            drop_records_after(self.run_dir / name, self.state.step)  # format: by its steps
        self._start = time.perf_counter()
        self._checkpoint_step = self.state.step
        return self.state.step


def _n_label_tokens(example: Example) -> int:
    return int(trained_token_counts(torch.tensor([example.labels])).item())


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x
