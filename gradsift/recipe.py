"""The ``gradsift run`` recipe: preflight → setup → train → summary, each an explicit step
(torchtune style).

A run directory holds ``config.yaml`` (resolved, absolute data paths), ``tokenizer.json``
(the tokenizer's identity), ``metrics.jsonl``, ``selections.jsonl``, ``checkpoints/`` and, once
finished, ``summary.json``. ``resume_run`` continues a stopped run from its newest intact
checkpoint (or from step 0 when it has none) to the configured ``steps``, and refuses a
tokenizer other than the one the run started with (``model: tiny`` picks one by what is
installed). ``preflight`` checks the data files, the device and the model
before anything is loaded or written; a run holds its folder's lock while it writes. With
``report_to``, rank 0 forwards the run log's scalars to TensorBoard, wandb or trackio
(``gradsift.reporting``).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import random
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from gradsift import distributed as ddp
from gradsift.allocator import tune_cpu_allocator
from gradsift.checkpoint import has_checkpoint
from gradsift.config import (
    LOGGING_KEYS,
    ConfigError,
    RunConfig,
    config_differences,
    config_to_dict,
    load_config,
    save_config,
)
from gradsift.data import DataError, ExampleStream, read_examples
from gradsift.engine import OnlineTrainer, TrainingDiverged
from gradsift.hf_datasets import DatasetStream, dataset_examples, is_dataset_spec, split_spec
from gradsift.jsonio import write_json
from gradsift.models import (
    SMOLLM2_SPEC,
    TINY_SPEC,
    bundled_gguf,
    check_same_tokenizer,
    load_model_and_tokenizer,
    tokenizer_identity,
)
from gradsift.reporting import ReportToError, check_report_to, open_reporters
from gradsift.rundir import check_new_run_dir, is_run_dir, locked
from gradsift.select import available_selectors, get_selector

logger = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class Run:
    """What ``setup`` builds: the trainer and what the report needs to know."""

    config: RunConfig
    trainer: OnlineTrainer
    out_dir: Path
    skipped_target_records: dict[str, int] | None = None
    tokenizer: Any = None


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


def check_device(device: str) -> None:
    """Fail fast, naming the key, when ``device`` does not exist on this machine."""
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"config key 'device': {e}") from None
    if dev.type == "cpu":
        return
    backend = getattr(torch, dev.type, None)
    available = bool(backend and hasattr(backend, "is_available") and backend.is_available())
    count = backend.device_count() if available and hasattr(backend, "device_count") else 0
    if dev.type == "mps":
        available = torch.backends.mps.is_available()
        count = int(available)
    if not available or (dev.index or 0) >= count:
        raise ConfigError(
            f"config key 'device': {device} is not available on this machine "
            f"({count} {dev.type} device(s)); use device: cpu"
            + (f" or {dev.type}:0..{count - 1}" if count else ""))


def resolve_model(spec: str) -> str:
    """``spec`` as something that loads without the network: a bundled name, a local folder,
    or the folder of a hub id in the local Hugging Face cache.

    Raises:
        ConfigError: none of these (the message says how to get the model).
        ModuleNotFoundError: the bundled model's package is missing (with the pip command).
    """
    if spec == SMOLLM2_SPEC:
        bundled_gguf()  # the package that ships the model (and tokenizer) is installed
        return spec
    if spec == TINY_SPEC:  # built in memory; its tokenizer needs no package (models.py)
        return spec
    folder = Path(spec).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ConfigError(f"config key 'model': {folder} has no config.json: not a Hugging "
                              "Face model folder")
        return str(folder)
    hint = (f"config key 'model': {spec!r} is not {SMOLLM2_SPEC!r}, {TINY_SPEC!r}, a local model "
            "folder, or a hub id in the local Hugging Face cache")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec, "config.json")
    except ValueError:  # not a valid hub id
        raise ConfigError(hint) from None
    if not isinstance(cached, str):
        raise ConfigError(f"{hint}. gradsift never downloads: fetch it first "
                          f"(`huggingface-cli download {spec}`) or give a folder") from None
    return str(Path(cached).parent)


def preflight(config: RunConfig) -> str:
    """Check what a run needs before any work: data files, selector, device, the
    ``report_to`` packages, model.

    Returns:
        The model to load (see :func:`resolve_model`).

    Raises:
        ConfigError: the message names the key and says what to do.
    """
    for key in ("stream", "target"):
        path = getattr(config, key)
        if not path:
            raise ConfigError(f"config key {key!r} is required: a JSONL or Parquet file, a "
                              "saved dataset folder, or a json:/parquet:/csv: dataset spec")
        if is_dataset_spec(path):
            builder, files = split_spec(path)
            if builder is not None and not glob.glob(files):
                raise ConfigError(f"config key {key!r}: {files}: no such file")
        elif not Path(path).is_file():
            raise ConfigError(f"config key {key!r}: {path}: no such file")
    get_selector(config.method, **method_options(config))
    check_device(config.device)
    try:
        check_report_to(config.report_to or [])
    except ReportToError as e:
        raise ConfigError(str(e)) from None
    return resolve_model(config.model)


def attach_reporters(run: Run, start_step: int = 0) -> None:
    """On rank 0: send the run log's scalars to the ``report_to`` backends from
    ``start_step`` on (what this process logs next: 0 for a fresh or restarted run)."""
    if run.config.report_to and ddp.is_main_process():
        run.trainer.runlog.attach(open_reporters(run.config.report_to, run.out_dir,
                                                 config_to_dict(run.config), start_step))


def build_data(config: RunConfig, tokenizer: Any) -> tuple[Any, list, dict[str, int]]:
    """The candidate stream, the target examples and the target's skip counts: files through
    gradsift's reader, dataset specs and saved-dataset folders through 🤗 datasets."""
    skip = config.skip_bad_records
    if is_dataset_spec(config.stream):
        stream: Any = DatasetStream(config.stream, tokenizer, config.max_length, skip_bad=skip)
    else:
        stream = ExampleStream(config.stream, tokenizer, config.max_length, skip_bad=skip)
    if is_dataset_spec(config.target):
        target, skips = dataset_examples(config.target, tokenizer, config.max_length,
                                         skip_bad=skip, name=config.target)
    else:
        target, skips = read_examples(config.target, tokenizer, config.max_length,
                                      skip_bad=skip)
    return stream, target, skips


def build_model(config: RunConfig, model_path: str | None = None) -> tuple[torch.nn.Module, Any]:
    """The model (with LoRA adapters unless ``lora: false``) and its tokenizer."""
    model, tokenizer = load_model_and_tokenizer(
        model_path or config.model, dtype=DTYPES[config.dtype],
        trust_remote_code=config.trust_remote_code,
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
            raise ConfigError(f"config key 'lora.target_modules': {e}") from e
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return model.to(config.device), tokenizer


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int,
                    steps: int) -> Any:
    """transformers' ``name`` schedule (``constant``, ``linear``, ``cosine``): ``warmup_steps``
    linear warmup, then over the rest of ``steps``; stepped once per update."""
    from transformers import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps,
                         num_training_steps=steps)


def setup(config: RunConfig, out_dir: str | Path, model_path: str | None = None) -> Run:
    """Build model, optimizer, scheduler, stream, target set, selector and trainer."""
    out_dir = Path(out_dir)
    if config.device == "cpu" and config.cpu_allocator == "tuned":
        tune_cpu_allocator()
    seed_everything(config.seed)
    selector = get_selector(config.method, **method_options(config))  # fail fast on bad names
    model, tokenizer = build_model(config, model_path)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    stream, target, target_skips = build_data(config, tokenizer)
    trainer = OnlineTrainer(model, optimizer, selector, stream, target, config.engine, out_dir,
                            scheduler=build_scheduler(optimizer, config.scheduler,
                                                      config.warmup_steps, config.steps),
                            pad_token_id=tokenizer.pad_token_id, seed=config.seed,
                            total_steps=config.steps, distributed=config.distributed)
    return Run(config=config, trainer=trainer, out_dir=out_dir,
               skipped_target_records=target_skips, tokenizer=tokenizer)


def record_tokenizer(run: Run) -> None:
    """On rank 0: write the run's tokenizer identity (:func:`tokenizer_identity`) to
    ``tokenizer.json``, before the first checkpoint, for :func:`check_tokenizer`."""
    if ddp.is_main_process():
        write_json(run.out_dir / TOKENIZER_FILE, tokenizer_identity(run.tokenizer))


def check_tokenizer(run: Run) -> None:
    """Refuse to resume ``run`` with a tokenizer other than the one it was started with.

    Raises:
        TokenizerMismatch: the vocabularies differ (the message names both tokenizers).
    """
    path = run.out_dir / TOKENIZER_FILE
    if not path.is_file():  # started by a gradsift that did not record it
        logger.warning("%s has no %s: its tokenizer cannot be checked; recording the one "
                       "loaded now", run.out_dir, TOKENIZER_FILE)
        record_tokenizer(run)
        return
    check_same_tokenizer(json.loads(path.read_text()), run.tokenizer)


class Interrupted(Exception):
    """A run stopped by Ctrl-C or SIGTERM between two steps, after writing a checkpoint."""

    def __init__(self, out_dir: Path, step: int, signum: int = signal.SIGINT):
        super().__init__(f"interrupted after step {step}; checkpoint written. "
                         f"Continue with: gradsift run --resume {out_dir}")
        self.out_dir, self.step, self.signum = out_dir, step, signum


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def stop_between_steps() -> Iterator[Callable[[], int | None]]:
    """The first Ctrl-C or SIGTERM (what schedulers send) asks to stop after the current step;
    a second one aborts at once. Yields a function returning the signal received, if any."""
    requested: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return

    def handler(signum: int, frame: Any) -> None:
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)
        logger.warning("%s: finishing this step, then checkpointing (send it again to abort "
                       "without a checkpoint)", signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield lambda: requested[0] if requested else None
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def train(run: Run, quiet: bool = False, position: int = 0, desc: str | None = None) -> str:
    """Step until ``steps`` (or the end of the stream), with a progress bar.

    Returns:
        How the run ended: ``"completed"`` or ``"stream_ended"``.

    Raises:
        Interrupted: Ctrl-C or SIGTERM; the run stopped after a whole step and checkpointed.
        TrainingDiverged: non-finite parameters, or ``max_consecutive_skips`` steps in a row
            without an update (``summary.json`` says so; the last good checkpoint is kept).
        DataError: the stream has no usable example at all.
    """
    trainer, cfg = run.trainer, run.config
    stopped = "completed"
    bar = tqdm(total=cfg.steps, initial=trainer.state.step, disable=quiet, position=position,
               desc=desc or cfg.method, unit="step", leave=position == 0, dynamic_ncols=True)
    with stop_between_steps() as stop_requested:
        while trainer.state.step < cfg.steps:
            try:
                record = trainer.step()
            except TrainingDiverged:
                bar.close()
                write_summary(run, stopped="diverged")
                raise
            if record is None:
                if trainer.state.step == 0:
                    bar.close()
                    raise DataError(f"{cfg.stream}: the stream has no usable example "
                                    f"(skipped: {trainer.stream.skipped_counts() or 'none'})")
                logger.warning("the stream ended after %d steps (configured: %d)",
                               trainer.state.step, cfg.steps)
                stopped = "stream_ended"
                break
            bar.update(1)
            bar.set_postfix(
                loss=f"{trainer.last_metrics.get('train_loss', float('nan')):.3f}",
                target=f"{trainer.last_target_loss:.3f}",
                selected=len(record["selected_ids"]))
            if signum := ddp.agree_max(stop_requested() or 0):  # every rank stops together
                bar.close()
                trainer.save_checkpoint()
                raise Interrupted(run.out_dir, trainer.state.step, signum)
    bar.close()
    if trainer.last_eval_step != trainer.state.step:
        trainer.log_final_eval()
    return stopped


def write_summary(run: Run, stopped: str = "completed") -> dict[str, Any]:
    """``summary.json`` (strict JSON, written atomically): final target loss (after the last
    step), counts, time, method, seed, skipped records, and how the run ended."""
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
        "stopped": stopped,
        "skipped_records": run.trainer.stream.skipped_counts(),
        "skipped_target_records": run.skipped_target_records or {},
    }
    if ddp.is_main_process():
        write_json(run.out_dir / "summary.json", summary)
    return summary


def run_config(config: RunConfig, out_dir: str | Path, quiet: bool = False,
               position: int = 0, desc: str | None = None) -> dict[str, Any]:
    """A fresh run into ``out_dir``, which must be missing or empty.

    Raises:
        RunFolderError: ``out_dir`` holds a run (resume it) or files gradsift did not write.
        RunLockedError: another process writes into ``out_dir``.
    """
    out_dir = Path(out_dir)
    config = join_launcher(config)
    main = ddp.is_main_process()
    model_path = preflight(config)
    if main:
        check_new_run_dir(out_dir)
    with locked(out_dir) if main else nullcontext():
        if main:
            check_new_run_dir(out_dir)  # again, now that no other process can start one here
            save_config(config, out_dir / "config.yaml")
        ddp.barrier()
        run = setup(config, out_dir, model_path)
        record_tokenizer(run)
        attach_reporters(run)
        try:
            run.trainer.log_initial_eval()
            stopped = train(run, quiet=quiet or not main, position=position, desc=desc)
            return write_summary(run, stopped)
        finally:
            run.trainer.runlog.close()


def join_launcher(config: RunConfig) -> RunConfig:
    """Under ``torchrun``/``accelerate launch``: join the process group, and give each rank
    its own GPU (``device: cuda`` → ``cuda:LOCAL_RANK``). Without a launcher: unchanged."""
    if not ddp.init_from_env(config.device):
        return config
    if config.device == "cuda":
        config = dataclasses.replace(config, device=f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
    return config


def resume_run(out_dir: str | Path, quiet: bool = False, position: int = 0,
               desc: str | None = None) -> dict[str, Any]:
    """Continue the run in ``out_dir`` from its newest intact checkpoint to the configured
    steps; a run that never wrote a checkpoint starts again from step 0.

    Raises:
        RunFolderError: ``out_dir`` is not a gradsift run.
        CheckpointError: it has checkpoints, but none is intact (each reason is listed).
        TokenizerMismatch: the tokenizer loaded now is not the one the run started with.
    """
    out_dir = Path(out_dir)
    config_file = out_dir / "config.yaml"
    if not config_file.is_file() or not is_run_dir(out_dir):
        raise FileNotFoundError(f"{config_file} not found: is {out_dir} a gradsift run directory?")
    config = join_launcher(load_config(config_file))
    main = ddp.is_main_process()
    model_path = preflight(config)
    with locked(out_dir) if main else nullcontext():
        run = setup(config, out_dir, model_path)
        try:
            if has_checkpoint(out_dir / "checkpoints"):
                check_tokenizer(run)
                step = run.trainer.resume()  # every rank reads rank 0's checkpoint
                logger.info("resumed %s at step %d of %d", out_dir, step, config.steps)
                attach_reporters(run, start_step=step + 1)
            else:
                logger.warning("%s has no checkpoint yet: starting it again from step 0",
                               out_dir)
                ddp.barrier()
                if main:
                    for name in ("metrics.jsonl", "selections.jsonl", "summary.json"):
                        (out_dir / name).unlink(missing_ok=True)
                record_tokenizer(run)  # a fresh start: whichever tokenizer is loaded now
                attach_reporters(run, start_step=0)
                run.trainer.log_initial_eval()
            stopped = train(run, quiet=quiet or not main, position=position, desc=desc)
            return write_summary(run, stopped)
        finally:
            run.trainer.runlog.close()


def compare(config: RunConfig, methods: list[str], seeds: list[int], out: Path,
            quiet: bool = False) -> dict:
    """One run per method and seed under ``out/<method>/seed_<seed>``, then the report.

    Restartable: a finished run is reused and a stopped one resumed — but only when its
    stored config is the requested one, up to the keys that only choose where the run is
    logged (``LOGGING_KEYS``: ``report_to``); a resumed run logs to the requested ones.

    Raises:
        ConfigError: a run folder was made with another config (the differing keys are named).
        TrainingDiverged: after the report, when some runs diverged (the report includes them).
    """
    from gradsift.report import markdown_table, write_report
    from gradsift.rundir import check_compare_dir, locked

    for method in methods:
        preflight(dataclasses.replace(config, method=method))  # every method, before any run
    check_compare_dir(out)
    diverged: list[str] = []
    with locked(out):
        jobs = [(m, s) for m in methods for s in seeds]
        bar = tqdm(jobs, desc="runs", unit="run", disable=quiet, position=0, dynamic_ncols=True)
        for method, seed in bar:
            run_dir = out / method / f"seed_{seed}"
            bar.set_postfix(method=method, seed=seed)
            cfg = dataclasses.replace(config, method=method, seed=seed)
            try:
                if (run_dir / "config.yaml").is_file():
                    stored = _check_same_config(run_dir, cfg)
                    if (run_dir / "summary.json").exists():
                        continue  # finished earlier with this config: compare can be restarted
                    if config_differences(stored, cfg):  # only in LOGGING_KEYS: log as asked
                        with locked(run_dir):
                            save_config(_with_logging_keys(stored, cfg), run_dir / "config.yaml")
                    resume_run(run_dir, quiet=quiet, position=1, desc=f"{method} seed {seed}")
                else:
                    run_config(cfg, run_dir, quiet=quiet, position=1,
                               desc=f"{method} seed {seed}")
            except Interrupted as e:
                e.args = (f"interrupted in {run_dir} after step {e.step}; checkpoint written. "
                          "Run the same compare command again to continue.",)
                raise
            except TrainingDiverged as e:
                logger.error("%s diverged: %s", run_dir, e)
                diverged.append(f"{method} seed {seed}")
        report = write_report(out)  # also writes out/summary.json
    summary = json.loads((out / "summary.json").read_text())
    if not quiet:
        print(markdown_table(summary))
        print(f"\nreport: {report}")
    if diverged:
        raise TrainingDiverged(f"{len(diverged)} run(s) diverged ({', '.join(diverged)}); the "
                               f"report {report} includes them, and each run's summary.json "
                               "says how far it got")
    return summary


def _check_same_config(run_dir: Path, requested: RunConfig) -> RunConfig:
    """Refuse to reuse or resume ``run_dir`` when it was made with another config (keys that
    only choose where the run is logged do not count). Returns the stored config."""
    stored = load_config(run_dir / "config.yaml")
    diff = config_differences(stored, requested, ignore=LOGGING_KEYS)
    if diff:
        raise ConfigError(
            f"{run_dir} was made with another config ({'; '.join(diff[:5])}"
            f"{'; ...' if len(diff) > 5 else ''}): use a new --out, or the same config")
    return stored


def _with_logging_keys(stored: RunConfig, requested: RunConfig) -> RunConfig:
    """``stored`` with the ``LOGGING_KEYS`` of ``requested``."""
    return dataclasses.replace(stored, **{k: getattr(requested, k) for k in LOGGING_KEYS})
