"""``GradSiftTrainer``: a ``transformers.Trainer`` that trains on a selected, weighted subset.

Only ``training_step`` is overridden (as TRL does): the train dataloader's batch is the
candidate batch (B = per-device batch size), gradsift captures per-sample factors on the
unwrapped model, selects at most ``budget_per_step`` candidates with weights, and writes
``Σ_i w_i ∇ℓ_i / gradient_accumulation_steps`` into ``.grad``. The Trainer's own loop then
clips, steps the optimizer and the scheduler, logs, calls callbacks and checkpoints as usual.

The loss is ``Σ_i w_i ℓ_i`` with ``ℓ_i`` each sample's mean token loss and ``Σ w_i = 1``: the
scale of a mean-loss step whatever the subset's token count, so the Trainer's
``num_items_in_batch`` (a token count for the whole batch) is not used.

The step itself is ``gradsift.step.SelectionStep``, the same one ``OnlineTrainer`` runs (so a
selector that reads only indices or losses, ``random`` or ``loss``, skips the per-sample
capture and trains on its k through one forward+backward over them), and
``selections.jsonl`` is written by ``gradsift.runlog`` in the same schema (steps numbered from
1, the optimizer step the selection belongs to), so ``gradsift report`` reads both.

The Trainer's checkpoints also get gradsift's state (``SelectionStep.state_dict()``: the
generators, the cached target gradient, counters) as ``gradsift_state.safetensors`` +
``gradsift_state.json``, and ``train(resume_from_checkpoint=...)`` restores it and drops the
selection-log records written after that checkpoint, so a resumed run selects exactly as an
uninterrupted one.

Under ``torchrun`` / ``accelerate launch`` (DDP) each rank's batch is its slice of the global
batch (``N × per_device_train_batch_size`` candidates) and the shared step makes one global
selection of ``budget_per_step`` over it (``gradsift.distributed``): the weighted gradient is
all-reduced once inside the step, on the unwrapped model, so DDP's own sync never runs and the
replicas stay identical. FSDP and DeepSpeed are refused at start (``NotImplementedError``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from gradsift import distributed as ddp
from gradsift.capture import forward_losses
from gradsift.data import Example, collate
from gradsift.distributed import DistributedConfig
from gradsift.jsonio import write_json
from gradsift.loss import trained_token_counts
from gradsift.runlog import (
    EVAL_LOSSES,
    METRICS,
    SELECTIONS,
    RunLog,
    eval_losses_record,
    selection_record,
)
from gradsift.select import Selector, get_selector
from gradsift.step import SelectionConfig, SelectionStep

ID_COLUMNS = ("id", "source")


def _as_example(row: Any, index: int, what: str = "target_dataset") -> Example:
    if isinstance(row, Example):
        return row
    if not hasattr(row, "get") or row.get("input_ids") is None:
        keys = sorted(row) if hasattr(row, "keys") else type(row).__name__
        raise ValueError(
            f"{what}[{index}] is not tokenized (keys: {keys}): give rows with 'input_ids' (and "
            "'labels'), tokenized by the same pipeline as the training data — or use "
            "GradSiftSFTTrainer, which tokenizes the target set with TRL's own pipeline")
    return Example(
        id=str(row.get("id", f"target:{index}")),
        source=str(row.get("source", "target")),
        input_ids=list(row["input_ids"]),
        labels=list(row.get("labels") if row.get("labels") is not None else row["input_ids"]),
    )


class KeepIds:
    """Wraps any data collator: the ``id``/``source`` columns gradsift keeps for its log are
    taken out before the user's collator sees the features and put back as lists, so
    ``DataCollatorForLanguageModeling``, ``DataCollatorForSeq2Seq`` or TRL's work unchanged."""

    def __init__(self, collator: Any):
        self.collator = collator

    def __call__(self, features: Sequence[Any]) -> dict[str, Any]:
        kept = {c: [f.get(c) if hasattr(f, "get") else None for f in features]
                for c in ID_COLUMNS}
        stripped = [{k: v for k, v in f.items() if k not in ID_COLUMNS} if hasattr(f, "items")
                    else f for f in features]
        batch = self.collator(stripped)
        for column, plural in (("id", "ids"), ("source", "sources")):
            if any(v is not None for v in kept[column]):
                batch[plural] = [str(v) if v is not None else "" for v in kept[column]]
        return batch


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


_DEFAULTS = SelectionConfig()


@dataclass
class GradSiftConfig(TrainingArguments):
    """``TrainingArguments`` plus gradsift's options, as TRL's ``SFTConfig`` extends them:
    ``HfArgumentParser`` and the usual ``--flags`` work (``--budget_per_step 4``,
    ``--selector_options '{"min_cosine": 0.1}'``). Validated at construction, naming the key.
    """

    selector: str = field(default="ftw", metadata={
        "help": "gradsift selection method (ftw, greats, cosine, random, ...)"})
    selector_options: dict | str | None = field(default=None, metadata={
        "help": "options of the selection method, a JSON object"})
    budget_per_step: int = field(default=_DEFAULTS.budget_per_step, metadata={
        "help": "k: at most this many of each per-device batch are trained on"})
    target_batch_size: int = field(default=_DEFAULTS.target_batch_size, metadata={
        "help": "target examples per target gradient"})
    target_refresh: int = field(default=_DEFAULTS.target_refresh, metadata={
        "help": "draw a fresh target batch every this many selections"})
    target_ema: float = field(default=_DEFAULTS.target_ema, metadata={
        "help": "average the target gradient over refreshes with this decay (0: off)"})
    target_with_candidates: bool = field(default=_DEFAULTS.target_with_candidates, metadata={
        "help": "a due target batch rides in the candidates' forward+backward (one pass "
                "fewer; meant for GPUs, where a small model's step is launch-bound)"})
    capture_modules: list[str] | None = field(default=None, metadata={
        "help": "module names to capture (default: every trainable module of a known kind)"})
    score_layers: int | None = field(default=None, metadata={
        "help": "truncated scoring: score with the top L transformer blocks (and the modules "
                "above them) only, then train on the k selected with a second forward+backward "
                "(default: score with every captured module)"})
    distributed: dict | str | None = field(default=None, metadata={
        "help": "under torchrun/accelerate: a JSON object with exchange (exact | sketch), "
                "scope (global | local) and sketch_dim"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.selector_options, str):
            try:
                self.selector_options = json.loads(self.selector_options)
            except json.JSONDecodeError as e:
                raise ValueError(f"selector_options must be a JSON object: {e}") from e
        if self.selector_options is not None and not isinstance(self.selector_options, dict):
            raise ValueError(f"selector_options must be a mapping, got {self.selector_options!r}")
        if isinstance(self.distributed, str):
            try:
                self.distributed = json.loads(self.distributed)
            except json.JSONDecodeError as e:
                raise ValueError(f"distributed must be a JSON object: {e}") from e
        self.distributed_config()
        self.selection_config()
        get_selector(self.selector, **(self.selector_options or {}))  # names bad options

    def distributed_config(self) -> DistributedConfig:
        """The ``distributed`` options (validated: a bad key or value raises naming it)."""
        if self.distributed is not None and not isinstance(self.distributed, dict):
            raise ValueError(f"distributed must be a mapping, got {self.distributed!r}")
        return DistributedConfig.from_dict(self.distributed)

    def selection_config(self) -> SelectionConfig:
        """The step's options (validated: a bad value raises naming its key)."""
        return SelectionConfig(budget_per_step=self.budget_per_step,
                               target_batch_size=self.target_batch_size,
                               target_refresh=self.target_refresh,
                               target_ema=self.target_ema,
                               target_with_candidates=self.target_with_candidates,
                               modules=self.capture_modules,
                               score_layers=self.score_layers)


GRADSIFT_KEYS = tuple(f.name for f in fields(GradSiftConfig)
                      if f.name not in {g.name for g in fields(TrainingArguments)})


class GradSiftTrainer(Trainer):
    """A ``Trainer`` whose every step trains on a gradsift-selected weighted subset.

    gradsift's options come from ``args`` when it is a ``GradSiftConfig``; the keyword
    arguments below, when given, take precedence (plain ``TrainingArguments`` work too).

    Args:
        *args, **kwargs: passed to ``transformers.Trainer``.
        target_dataset: target examples (rows with ``input_ids`` and ``labels``, or
            ``gradsift.data.Example``).
        selector: a selector name (``"ftw"``, ``"random"``, ...) or a ``Selector``.
        selector_options: options for ``get_selector``.
        budget_per_step: k, at most this many of each batch are trained on.
        target_batch_size: target examples per target gradient.
        target_refresh: draw a fresh target batch every this many selections.
        target_ema: average the target gradient over refreshes (``SelectionConfig``).
        target_with_candidates: the target batch rides in the candidates' pass
            (``SelectionConfig.target_with_candidates``; default: off).
        modules: module names to capture (default: every trainable module of a known kind).
        score_layers: truncated scoring with the top L blocks (``SelectionConfig.score_layers``;
            default: off).
        distributed: under a launcher, ``DistributedConfig`` or its keys (``exchange``,
            ``scope``, ``sketch_dim``).
    """

    def __init__(
        self,
        *args: Any,
        target_dataset: Sequence[Any],
        selector: str | Selector | None = None,
        selector_options: dict[str, Any] | None = None,
        budget_per_step: int | None = None,
        target_batch_size: int | None = None,
        target_refresh: int | None = None,
        target_ema: float | None = None,
        target_with_candidates: bool | None = None,
        modules: list[str] | None = None,
        score_layers: int | None = None,
        distributed: DistributedConfig | dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            engine = "FSDP" if self.is_fsdp_enabled else "DeepSpeed"
            raise NotImplementedError(
                f"GradSiftTrainer does not support {engine}: the selection needs every "
                "trainable parameter whole on every rank and writes "
                ".grad itself. Use DDP (torchrun / accelerate launch without FSDP or DeepSpeed)")
        if len(target_dataset) == 0:
            raise ValueError("target_dataset is empty: nothing to select towards")
        base = self.args if isinstance(self.args, GradSiftConfig) else None

        def option(given: Any, key: str, default: Any) -> Any:
            return given if given is not None else getattr(base, key, default)

        selector = option(selector, "selector", "ftw")
        self.selector = (
            get_selector(selector, **(option(selector_options, "selector_options", None) or {}))
            if isinstance(selector, str) else selector
        )
        # the config's step options (or the defaults), with the keyword arguments given on top
        given = {"budget_per_step": budget_per_step, "target_batch_size": target_batch_size,
                 "target_refresh": target_refresh, "target_ema": target_ema,
                 "target_with_candidates": target_with_candidates, "modules": modules,
                 "score_layers": score_layers}
        self.selection_config = replace(
            base.selection_config() if base is not None else SelectionConfig(),
            **{key: value for key, value in given.items() if value is not None})
        if not isinstance(distributed, DistributedConfig):
            distributed = DistributedConfig.from_dict(
                distributed if distributed is not None else getattr(base, "distributed", None))
        self.distributed = distributed
        self.target_examples = self.prepare_target(target_dataset)
        if not isinstance(self.data_collator, GradSiftCollator | KeepIds):
            self.data_collator = KeepIds(self.data_collator)
        self.counters = {"trained_samples": 0, "trained_tokens": 0, "wall_seconds": 0.0}
        self._step: SelectionStep | None = None  # built on the unwrapped model, first step
        self._restored: dict[str, Any] | None = None  # state waiting for the step
        self._stats: list[dict[str, float]] = []
        self._pending: list[tuple[dict, list[str], list[str]]] = []  # micro-batches held
        self._started = time.perf_counter()
        self._refuse_what_would_train_wrongly()
        self.runlog = RunLog(self.args.output_dir, enabled=self.args.should_save)
        self.selection_log = Path(self.args.output_dir) / SELECTIONS
        self.add_callback(_SaveGradSiftState(self))

    def _refuse_what_would_train_wrongly(self) -> None:
        """Options gradsift's per-sample losses would silently ignore stop here instead."""
        if self.args.label_smoothing_factor:
            raise ValueError(
                "GradSiftTrainer does not support label_smoothing_factor > 0 yet: gradsift's "
                "per-sample losses are plain token cross-entropy. Set label_smoothing_factor=0")
        own = {Trainer, GradSiftTrainer}
        try:
            from trl import SFTTrainer

            own.add(SFTTrainer)  # its compute_loss adds metrics; the loss is the same
        except ImportError:  # pragma: no cover - trl is optional
            pass
        custom = [c.__name__ for c in type(self).__mro__
                  if "compute_loss" in vars(c) and c not in own]
        if custom:
            raise TypeError(
                f"{custom[0]} overrides compute_loss, which GradSiftTrainer does not call: the "
                "selection computes each sample's loss itself (token cross-entropy over "
                "labels != -100). Put custom logic in the model's forward or in "
                "training_step, or use a plain Trainer")

    def prepare_target(self, target_dataset: Sequence[Any]) -> list[Example]:
        """The target rows as examples (tokenized rows; subclasses tokenize raw ones)."""
        return [_as_example(r, i) for i, r in enumerate(target_dataset)]

    def selection_step(self, model: nn.Module) -> SelectionStep:
        """The shared step, on the unwrapped model (built once: parameters do not change)."""
        if self._step is None:
            pad = getattr(self.processing_class, "pad_token_id", None) or 0
            self._step = SelectionStep(model, self.selector, self.target_examples,
                                       self.selection_config, pad_token_id=pad,
                                       seed=self.args.seed, distributed=self.distributed)
            self._step.max_grad_norm = self.args.max_grad_norm or None
            if self._restored is not None:
                self._step.load_state_dict(self._restored)
                self._restored = None
        return self._step

    def save_gradsift_state(self, folder: str | Path) -> None:
        """``SelectionStep.state_dict()`` next to a checkpoint (tensors as safetensors)."""
        folder = Path(folder)
        state = self._step.state_dict() if self._step is not None else self._restored
        if state is None:
            return
        tensors = {"target_generator": state["target_generator"],
                   "selector_generator": state["selector_generator"]}
        for name, g in (state["target_grad"] or {}).items():
            tensors[f"target_grad/{name}"] = g.contiguous()
        save_file(tensors, str(folder / STATE_TENSORS))
        (folder / STATE_JSON).write_text(json.dumps({
            "calls": state["calls"], "global_step": self.state.global_step,
            "selector": state["selector"], "counters": self.counters}))

    def load_gradsift_state(self, folder: str | Path) -> None:
        """Restore what ``save_gradsift_state`` wrote; drop log records after that step."""
        folder = Path(folder)
        if not (folder / STATE_JSON).is_file():
            raise FileNotFoundError(f"{folder / STATE_JSON} not found: was this checkpoint "
                                    "written by GradSiftTrainer?")
        info = json.loads((folder / STATE_JSON).read_text())
        tensors = load_file(str(folder / STATE_TENSORS))
        prefix = "target_grad/"
        grad = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        self._restored = {"calls": info["calls"], "selector": info["selector"],
                          "target_generator": tensors["target_generator"],
                          "selector_generator": tensors["selector_generator"],
                          "target_grad": grad or None}
        if self._step is not None:
            self._step.load_state_dict(self._restored)
            self._restored = None
        self.counters.update(info.get("counters", {}))
        self.runlog.drop_after(info["global_step"])

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any,
              **kwargs: Any) -> Any:
        """``Trainer.train``, restoring gradsift's state too when resuming."""
        folder = None
        if resume_from_checkpoint:
            folder = (get_last_checkpoint(self.args.output_dir)
                      if resume_from_checkpoint is True else resume_from_checkpoint)
            if folder is not None:
                self.load_gradsift_state(folder)
        if folder is None:  # a fresh run: the run folder's config and the step-0 target loss
            self._write_run_config()
            self.runlog.append(METRICS, {"step": 0, "trained_samples": 0, "trained_tokens": 0,
                                         "wall_seconds": 0.0,
                                         "target_loss": self._log_target_losses(0)})
        self._started = time.perf_counter()
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        self._write_summary()
        return output

    def target_loss(self, limit: int = 64) -> float:
        """Mean per-sample loss on (up to ``limit``) target examples, in eval mode."""
        losses = self.target_losses(limit)
        return sum(losses) / len(losses)

    @torch.no_grad()
    def target_losses(self, limit: int = 64) -> list[float]:
        """Each of the first ``limit`` target examples' own mean token loss, in eval mode."""
        model = self.accelerator.unwrap_model(self.model)
        examples = self.target_examples[:limit]
        was = model.training
        model.eval()
        pad = getattr(self.processing_class, "pad_token_id", None) or 0
        each: list[float] = []
        for i in range(0, len(examples), 16):
            batch = collate(examples[i : i + 16], pad)
            batch = {k: v.to(self.args.device) for k, v in batch.items() if torch.is_tensor(v)}
            each += forward_losses(model, batch).tolist()
        model.train(was)
        return each

    def _log_target_losses(self, step: int, limit: int = 64) -> float:
        """Evaluate, log each example's loss (``eval_losses.jsonl``) and return their mean."""
        each = self.target_losses(limit)
        ids = [e.id for e in self.target_examples[:limit]]
        self.runlog.append(EVAL_LOSSES, eval_losses_record(step, ids, each))
        return sum(each) / len(each)

    def _write_run_config(self) -> None:
        """``config.yaml`` in the run-folder format ``gradsift report`` reads."""
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model)
        cfg = self.selection_config
        config = {
            "model": str(getattr(getattr(model, "config", None), "_name_or_path", "") or
                         type(model).__name__),
            "method": self.selector.name, "seed": self.args.seed,
            "steps": self.args.max_steps, "lr": self.args.learning_rate,
            "engine": {"candidates_per_step": self.args.per_device_train_batch_size *
                       ddp.world_size(),
                       "budget_per_step": cfg.budget_per_step,
                       "target_batch_size": cfg.target_batch_size,
                       "target_refresh": cfg.target_refresh},
            "trainer": "transformers.Trainer (GradSiftTrainer)",
        }
        if cfg.score_layers is not None:
            config["engine"]["score_layers"] = cfg.score_layers
        if cfg.target_ema:
            config["engine"]["target_ema"] = cfg.target_ema
        if cfg.target_with_candidates:
            config["engine"]["target_with_candidates"] = True
        Path(self.args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(self.args.output_dir) / "config.yaml").write_text(
            yaml.safe_dump(config, sort_keys=False))

    def _write_summary(self) -> None:
        step = self.state.global_step
        loss = self._log_target_losses(step)
        self.runlog.append(METRICS, {"step": step, **self.counters, "target_loss": loss})
        if self.args.should_save:
            write_json(Path(self.args.output_dir) / "summary.json", {
                "final_target_loss": loss, **self.counters, "steps": step,
                "method": self.selector.name, "seed": self.args.seed, "stopped": "completed"})

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        # keep the sample-id columns alive so that the selection log can name samples
        self._signature_columns += [c for c in ID_COLUMNS if c not in self._signature_columns]

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """The shared selection step; its weighted gradient goes into ``.grad``.

        The budget is per optimizer step: with gradient accumulation the micro-batches of one
        optimizer step are held until its last one, and a single selection of at most
        ``budget_per_step`` spans all of them (B = per-device batch size x accumulation steps).
        """
        # eager modules, not a torch.compile wrapper: the capture hooks must fire
        step = self.selection_step(self.accelerator.unwrap_model(model, keep_torch_compile=False))
        inputs = self._prepare_inputs(inputs)
        batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "labels") if k in inputs}
        n = batch["input_ids"].shape[0]
        number = self.state.global_step + 1  # the optimizer step this selection feeds
        ids = inputs.get("ids") or inputs.get("id")
        offset = sum(len(p[1]) for p in self._pending)
        ids = ([str(i) for i in ids] if ids is not None
               else [f"step{number}:{offset + i}" for i in range(n)])
        sources = inputs.get("sources") or inputs.get("source")
        sources = [str(s) for s in sources] if sources is not None else ["train"] * n
        self._pending.append((batch, ids, sources))
        if not self.accelerator.sync_gradients:  # not the optimizer step's last micro-batch
            return torch.zeros((), device=self.args.device)
        pending, self._pending = self._pending, []
        batches = [p[0] for p in pending]
        ids, sources = [i for p in pending for i in p[1]], [s for p in pending for s in p[2]]
        tokens = torch.cat([trained_token_counts(b["labels"]).cpu() for b in batches])
        if ddp.is_distributed():  # this rank's batch is a slice: name the global candidates
            parts = ddp.gather_objects((ids, sources, tokens))
            ids, sources = [i for p in parts for i in p[0]], [s for p in parts for s in p[1]]
            tokens = torch.cat([p[2] for p in parts])
        scale = 1.0
        result = step.run(batches, self.optimizer, grad_scale=scale, accumulate=True)
        self._check_gradient(step, result)
        self.runlog.append(SELECTIONS, selection_record(number, ids, sources, result))
        chosen = result.selection.indices
        self.counters["trained_samples"] += len(chosen)
        self.counters["trained_tokens"] += int(tokens[chosen].sum())
        self.counters["wall_seconds"] = round(
            self.counters["wall_seconds"] + time.perf_counter() - self._started, 3)
        self._started = time.perf_counter()
        self.runlog.append(METRICS, {
            "step": number, **self.counters, "train_loss": result.train_loss,
            "candidate_loss": result.candidate_loss,
            "lr": self.optimizer.param_groups[0]["lr"]})
        rho = result.selection.diagnostics.get("rho")
        self._stats.append({"n_selected": float(len(result.selection.indices)),
                            "rho": float(rho) if rho is not None else float("nan")})
        return torch.tensor(result.train_loss * scale, device=self.args.device)

    @staticmethod
    def _check_gradient(step: SelectionStep, result: Any) -> None:
        """Selected samples with a finite, non-zero loss must give a non-zero gradient: all
        zeros means the capture saw nothing (e.g. a compiled or otherwise wrapped forward)."""
        chosen = result.selection.indices
        losses = result.candidates.losses.detach().cpu()[chosen]
        if len(chosen) == 0 or not bool(torch.isfinite(losses).all()) or not bool(
                (losses > 0).any()):
            return
        if all(p.grad is None or not bool(p.grad.any()) for p in step.params.values()):
            raise RuntimeError(
                "every per-sample gradient of this step is zero while the losses are not: "
                "gradsift's capture hooks did not see the forward pass (a compiled or wrapped "
                "model?). Train without torch_compile, or report the model class")

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
