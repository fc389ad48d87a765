"""The ``gradsift run`` recipe: setup → train → summary, each an explicit step (torchtune style).

A run directory holds ``config.yaml`` (resolved), ``metrics.jsonl``, ``selections.jsonl``,
``checkpoints/`` and, once finished, ``summary.json``. ``resume_run`` continues a stopped
run from its last checkpoint to the configured ``steps``.
"""

from __future__ import annotations

import json
import logging
import random
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from gradsift.config import RunConfig, load_config, save_config
from gradsift.data import ExampleStream, load_examples
from gradsift.engine import EngineConfig, OnlineTrainer
from gradsift.models import load_model_and_tokenizer
from gradsift.select import available_selectors, get_selector

logger = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Run:
    """What ``setup`` builds: the trainer and what the report needs to know."""

    config: RunConfig
    trainer: OnlineTrainer
    out_dir: Path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def method_options(config: RunConfig) -> dict[str, Any]:
    """The options for ``config.method``.

    ``method_options`` is either flat (``{min_cosine: 0.1}``, for the configured method) or
    keyed by method name (``{ftw: {min_cosine: 0.1}, greats: {...}}``), which lets one
    ``compare`` config give each method its own options.
    """
    options = config.method_options
    if options and all(name in available_selectors() for name in options):
        chosen = options.get(config.method) or {}
        if not isinstance(chosen, dict):
            raise ValueError(f"config key 'method_options.{config.method}' must be a mapping")
        return dict(chosen)
    return dict(options)


def build_model(config: RunConfig) -> tuple[torch.nn.Module, Any]:
    """The model (with LoRA adapters unless ``lora: false``) and its tokenizer."""
    model, tokenizer = load_model_and_tokenizer(
        config.model, dtype=DTYPES[config.dtype], trust_remote_code=config.trust_remote_code
    )
    if config.lora is not None:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha,
                          lora_dropout=config.lora.dropout,
                          target_modules=list(config.lora.target_modules), task_type="CAUSAL_LM")
        try:
            with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
                model = get_peft_model(model, lora)
        except ValueError as e:
            raise ValueError(f"config key 'lora.target_modules': {e}") from e
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return model.to(config.device), tokenizer


def build_scheduler(config: RunConfig, optimizer: torch.optim.Optimizer) -> Any:
    from transformers import get_scheduler

    return get_scheduler(config.scheduler, optimizer, num_warmup_steps=config.warmup_steps,
                         num_training_steps=config.steps)


def setup(config: RunConfig, out_dir: str | Path) -> Run:
    """Build model, optimizer, scheduler, stream, target set, selector and trainer."""
    out_dir = Path(out_dir)
    seed_everything(config.seed)
    selector = get_selector(config.method, **method_options(config))  # fail fast on bad names
    model, tokenizer = build_model(config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    stream = ExampleStream(config.stream, tokenizer, config.max_length,
                           skip_bad=config.skip_bad_records)
    target = load_examples(config.target, tokenizer, config.max_length,
                           skip_bad=config.skip_bad_records)
    engine_config = EngineConfig(
        candidates_per_step=config.candidates_per_step,
        budget_per_step=config.budget_per_step,
        micro_batch_size=config.micro_batch_size,
        target_batch_size=config.target_batch_size,
        target_refresh=config.target_refresh,
        eval_size=config.eval_size,
        eval_every=config.eval_every,
        checkpoint_every=config.checkpoint_every,
        max_grad_norm=config.max_grad_norm,
        total_steps=config.steps,
        seed=config.seed,
    )
    trainer = OnlineTrainer(model, optimizer, selector, stream, target, engine_config, out_dir,
                            scheduler=build_scheduler(config, optimizer),
                            pad_token_id=tokenizer.pad_token_id)
    return Run(config=config, trainer=trainer, out_dir=out_dir)


class Interrupted(Exception):
    """A run stopped by Ctrl-C between two steps, after writing a checkpoint."""

    def __init__(self, out_dir: Path, step: int):
        super().__init__(f"interrupted after step {step}; checkpoint written. "
                         f"Continue with: gradsift run --resume {out_dir}")
        self.out_dir, self.step = out_dir, step


@contextmanager
def stop_between_steps() -> Iterator[Callable[[], bool]]:
    """The first Ctrl-C asks to stop after the current step; a second one aborts at once."""
    requested: list[bool] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def handler(signum: int, frame: Any) -> None:
        if requested:
            raise KeyboardInterrupt
        requested.append(True)
        logger.warning("interrupt: finishing this step, then checkpointing "
                       "(press Ctrl-C again to abort without a checkpoint)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(requested)
    finally:
        signal.signal(signal.SIGINT, previous)


def train(run: Run, quiet: bool = False, position: int = 0, desc: str | None = None) -> None:
    """Step until ``steps`` (or the end of the stream), with a progress bar.

    Raises:
        Interrupted: Ctrl-C was pressed; the run stopped after a whole step and checkpointed.
    """
    trainer, cfg = run.trainer, run.config
    bar = tqdm(total=cfg.steps, initial=trainer.state.step, disable=quiet, position=position,
               desc=desc or cfg.method, unit="step", leave=position == 0, dynamic_ncols=True)
    with stop_between_steps() as stop_requested:
        while trainer.state.step < cfg.steps:
            record = trainer.step()
            if record is None:
                logger.warning("the stream ended after %d steps (configured: %d)",
                               trainer.state.step, cfg.steps)
                break
            bar.update(1)
            bar.set_postfix(
                loss=f"{trainer.last_metrics.get('train_loss', float('nan')):.3f}",
                target=f"{trainer.last_target_loss:.3f}",
                selected=len(record["selected_ids"]))
            if stop_requested():
                bar.close()
                trainer.save_checkpoint()
                raise Interrupted(run.out_dir, trainer.state.step)
    bar.close()
    if trainer.last_eval_step != trainer.state.step:
        trainer.log_final_eval()


def write_summary(run: Run) -> dict[str, Any]:
    """``summary.json``: final target loss (after the last step), counts, time, method, seed."""
    st = run.trainer.state
    summary = {
        "final_target_loss": run.trainer.last_target_loss,
        "trained_samples": st.trained_samples,
        "trained_tokens": st.trained_tokens,
        "steps": st.step,
        "skipped_updates": st.skipped_updates,
        "wall_seconds": round(st.wall_seconds, 3),
        "method": run.config.method,
        "seed": run.config.seed,
        "skipped_records": run.trainer.stream.skipped_counts(),
    }
    (run.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def run_config(config: RunConfig, out_dir: str | Path, quiet: bool = False,
               position: int = 0, desc: str | None = None) -> dict[str, Any]:
    """A fresh run into ``out_dir`` (which must not hold an earlier run)."""
    out_dir = Path(out_dir)
    if (out_dir / "selections.jsonl").exists() or (out_dir / "metrics.jsonl").exists():
        raise FileExistsError(
            f"{out_dir} already holds a run: use `gradsift run --resume {out_dir}` or a new --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, out_dir / "config.yaml")
    run = setup(config, out_dir)
    run.trainer.log_initial_eval()
    train(run, quiet=quiet, position=position, desc=desc)
    return write_summary(run)


def resume_run(out_dir: str | Path, quiet: bool = False) -> dict[str, Any]:
    """Continue the run in ``out_dir`` from its last checkpoint to the configured steps."""
    out_dir = Path(out_dir)
    config_file = out_dir / "config.yaml"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found: is {out_dir} a gradsift run directory?")
    config = load_config(config_file)
    run = setup(config, out_dir)
    step = run.trainer.resume()
    logger.info("resumed %s at step %d of %d", out_dir, step, config.steps)
    train(run, quiet=quiet)
    return write_summary(run)
