"""``GradSiftTrainer``: a ``transformers.Trainer`` that trains on a selected, weighted subset.

Only ``training_step`` is overridden (as TRL does): the train dataloader's batch is the
candidate batch (B = per-device batch size), gradsift captures per-sample factors on the
unwrapped model, selects at most ``budget_per_step`` candidates with weights, and writes
``Σ_i w_i ∇ℓ_i / gradient_accumulation_steps`` into ``.grad``. The Trainer's own loop then
clips, steps the optimizer and the scheduler, logs, calls callbacks and checkpoints as usual.

The loss is ``Σ_i w_i ℓ_i`` with ``ℓ_i`` each sample's mean token loss and ``Σ w_i = 1``: the
scale of a mean-loss step whatever the subset's token count, so the Trainer's
``num_items_in_batch`` (a token count for the whole batch) is not used.

The Trainer's checkpoints also get gradsift's state (selector generator, cached target
gradient, counters) as ``gradsift_state.safetensors`` + ``gradsift_state.json``, and
``train(resume_from_checkpoint=...)`` restores it and drops the selection-log records written
after that checkpoint, so a resumed run selects exactly as an uninterrupted one.

Limitations: ``.grad`` is written directly, so DDP/FSDP gradient synchronisation is not
performed here (single-process training only for now); DeepSpeed is not supported.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from gradsift.data import Example, collate
from gradsift.engine import (
    capture_batches,
    set_weighted_gradients,
    split_parameters,
    target_gradient,
)
from gradsift.factors import FactorizedGrads
from gradsift.optim_state import read_optimizer_state
from gradsift.select import SelectionContext, Selector, get_selector

ID_COLUMNS = ("id", "source")


def _as_example(row: Any, index: int) -> Example:
    if isinstance(row, Example):
        return row
    return Example(
        id=str(row.get("id", f"target:{index}")),
        source=str(row.get("source", "target")),
        input_ids=list(row["input_ids"]),
        labels=list(row.get("labels", row["input_ids"])),
    )


class GradSiftCollator:
    """Right-pads ``input_ids``/``labels`` and keeps the ``id``/``source`` columns as lists."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: Sequence[Any]) -> dict[str, Any]:
        return collate([_as_example(f, i) for i, f in enumerate(features)], self.pad_token_id)


STATE_JSON = "gradsift_state.json"
STATE_TENSORS = "gradsift_state.safetensors"


class _SaveGradSiftState(TrainerCallback):
    """Writes the trainer's gradsift state into each checkpoint folder the Trainer saves."""

    def __init__(self, trainer: GradSiftTrainer):
        self.trainer = trainer

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if args.should_save:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if folder.is_dir():
                self.trainer.save_gradsift_state(folder)


class GradSiftTrainer(Trainer):
    """A ``Trainer`` whose every step trains on a gradsift-selected weighted subset.

    Args:
        *args, **kwargs: passed to ``transformers.Trainer``.
        target_dataset: target examples (rows with ``input_ids`` and ``labels``, or
            ``gradsift.data.Example``).
        selector: a selector name (``"ftw"``, ``"random"``, ...) or a ``Selector``.
        selector_options: options for ``get_selector``.
        budget_per_step: k, at most this many of each batch are trained on.
        target_batch_size: target examples per target gradient.
        target_refresh: draw a fresh target batch every this many selections.
        modules: module names to capture (default: every trainable linear-like module).
    """

    def __init__(
        self,
        *args: Any,
        target_dataset: Sequence[Any],
        selector: str | Selector = "ftw",
        selector_options: dict[str, Any] | None = None,
        budget_per_step: int = 4,
        target_batch_size: int = 8,
        target_refresh: int = 1,
        modules: list[str] | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        if len(target_dataset) == 0:
            raise ValueError("target_dataset is empty: nothing to select towards")
        self.selector = (
            get_selector(selector, **(selector_options or {})) if isinstance(selector, str)
            else selector
        )
        self.target_examples = [_as_example(r, i) for i, r in enumerate(target_dataset)]
        self.budget_per_step = budget_per_step
        self.target_batch_size = target_batch_size
        self.target_refresh = target_refresh
        self.gradsift_modules = modules
        self._target_grad: dict[str, torch.Tensor] | None = None
        self._selections = 0
        self._generator = torch.Generator().manual_seed(self.args.seed)
        self._stats: list[dict[str, float]] = []
        self._split: tuple | None = None
        self.selection_log = Path(self.args.output_dir) / "selections.jsonl"
        self.add_callback(_SaveGradSiftState(self))

    def save_gradsift_state(self, folder: str | Path) -> None:
        """Selector generator, cached target gradient and counters, next to a checkpoint."""
        folder = Path(folder)
        tensors = {"generator": self._generator.get_state()}
        for name, g in (self._target_grad or {}).items():
            tensors[f"target_grad/{name}"] = g.detach().contiguous().cpu()
        save_file(tensors, str(folder / STATE_TENSORS))
        (folder / STATE_JSON).write_text(json.dumps({
            "selections": self._selections, "global_step": self.state.global_step,
            "selector": self.selector.state_dict()}))

    def load_gradsift_state(self, folder: str | Path) -> None:
        """Restore what ``save_gradsift_state`` wrote; drop log records after that step."""
        folder = Path(folder)
        if not (folder / STATE_JSON).is_file():
            raise FileNotFoundError(f"{folder / STATE_JSON} not found: was this checkpoint "
                                    "written by GradSiftTrainer?")
        info = json.loads((folder / STATE_JSON).read_text())
        tensors = load_file(str(folder / STATE_TENSORS))
        self._generator.set_state(tensors.pop("generator"))
        prefix = "target_grad/"
        self._target_grad = {k[len(prefix):]: v.to(self.args.device)
                             for k, v in tensors.items() if k.startswith(prefix)} or None
        self._selections = info["selections"]
        self.selector.load_state_dict(info["selector"])
        if self.selection_log.is_file():
            kept = [line for line in self.selection_log.read_text().splitlines()
                    if json.loads(line)["step"] < info["global_step"]]
            self.selection_log.write_text("".join(line + "\n" for line in kept))

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any,
              **kwargs: Any) -> Any:
        """``Trainer.train``, restoring gradsift's state too when resuming."""
        if resume_from_checkpoint:
            folder = (get_last_checkpoint(self.args.output_dir)
                      if resume_from_checkpoint is True else resume_from_checkpoint)
            if folder is not None:
                self.load_gradsift_state(folder)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        # keep the sample-id columns alive so that the selection log can name samples
        self._signature_columns += [c for c in ID_COLUMNS if c not in self._signature_columns]

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Capture → target gradient → select → write the weighted gradient into ``.grad``."""
        model.train()
        unwrapped = self.accelerator.unwrap_model(model)
        inputs = self._prepare_inputs(inputs)
        ids = inputs.get("ids") or inputs.get("id")
        batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "labels") if k in inputs}
        n = batch["input_ids"].shape[0]
        ids = [str(i) for i in ids] if ids is not None else [
            f"step{self.state.global_step}:{i}" for i in range(n)]
        if self._split is None:  # the model's parameters do not change between steps
            self._split = split_parameters(unwrapped, self.gradsift_modules)
        names, params, others = self._split
        timing: dict[str, float] = {}

        t0 = time.perf_counter()
        captures = capture_batches(unwrapped, [batch], names, retain_graph=bool(others))
        candidates = captures[0].grads
        timing["capture"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        if self.selector.needs_target and (
            self._target_grad is None or self._selections % self.target_refresh == 0
        ):
            self._target_grad = self._compute_target_grad(unwrapped, names)
        timing["target"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        selection = self.selector.select(SelectionContext(
            candidates=candidates,
            target_grad=self._target_grad if self.selector.needs_target else None,
            optimizer_state=read_optimizer_state(self.optimizer, unwrapped,
                                                 candidates.param_names),
            k=self.budget_per_step,
            generator=self._generator,
        ))
        timing["selection"] = time.perf_counter() - t0
        self._selections += 1

        t0 = time.perf_counter()
        weights = torch.zeros(n)
        weights[selection.indices] = selection.weights.float().cpu()
        scale = 1.0 / self.args.gradient_accumulation_steps
        if len(selection.indices) > 0:
            set_weighted_gradients(captures, candidates, weights * scale, params, others,
                                   accumulate=True)
        timing["update"] = time.perf_counter() - t0
        self._log_selection(ids, candidates, selection, timing)
        loss = (weights * candidates.losses.cpu()).sum()
        return loss.detach().to(self.args.device) * scale

    def _compute_target_grad(self, model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
        k = min(self.target_batch_size, len(self.target_examples))
        picks = torch.randperm(len(self.target_examples), generator=self._generator)[:k]
        pad = getattr(self.processing_class, "pad_token_id", None) or 0
        batch = collate([self.target_examples[i] for i in picks.tolist()], pad)
        batch = {k_: v.to(self.args.device) for k_, v in batch.items() if torch.is_tensor(v)}
        return target_gradient(model, [batch], names)

    def _log_selection(self, ids, candidates: FactorizedGrads, selection, timing) -> None:
        sel = selection.indices.tolist()
        record = {
            "step": self.state.global_step,
            "candidate_ids": ids,
            "selected_ids": [ids[i] for i in sel],
            "weights": [float(w) for w in selection.weights],
            "scores": [None if s != s else float(s) for s in selection.scores.tolist()],
            "losses": [float(v) for v in candidates.losses.tolist()],
            "rho": selection.diagnostics.get("rho"),
            "timing": timing,
        }
        if self.args.should_save:
            self.selection_log.parent.mkdir(parents=True, exist_ok=True)
            with open(self.selection_log, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        rho = selection.diagnostics.get("rho")
        self._stats.append({"n_selected": float(len(sel)),
                            "rho": float(rho) if rho is not None else float("nan")})

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds the mean selected count and ρ since the last log to the Trainer's logs."""
        if self._stats and "loss" in logs:
            logs["gradsift/n_selected"] = sum(s["n_selected"] for s in self._stats) / len(
                self._stats)
            rhos = [s["rho"] for s in self._stats if s["rho"] == s["rho"]]
            if rhos:
                logs["gradsift/rho"] = sum(rhos) / len(rhos)
            self._stats = []
        super().log(logs, *args, **kwargs)
