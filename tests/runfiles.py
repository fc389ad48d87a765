"""Helpers for tests that run the command end to end: tiny data, tiny configs, strict logs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml


def write_data(folder: Path, n_stream: int = 40, n_target: int = 12) -> Path:
    """``stream.jsonl`` (prompt/response arithmetic and text) and ``target.jsonl`` in
    ``folder``; returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    stream = [{"prompt": f"What is {i} + {i % 7}?", "response": f" {i + i % 7}",
               "source": "arithmetic"} if i % 3 else {"text": f"Verse {i}: and it was good."}
              for i in range(n_stream)]
    target = [{"prompt": f"What is {i} + 2?", "response": f" {i + 2}"} for i in range(n_target)]
    for name, rows in (("stream.jsonl", stream), ("target.jsonl", target)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


ENGINE_KEYS = ("candidates_per_step", "budget_per_step", "micro_batch_size", "target_batch_size",
               "target_refresh", "eval_size", "eval_every", "checkpoint_every", "max_grad_norm",
               "keep_checkpoints", "max_consecutive_skips", "modules")


def nest_engine(cfg: dict[str, Any]) -> dict[str, Any]:
    """Move the online loop's keys of a flat config into its ``engine`` section."""
    out = {k: v for k, v in cfg.items() if k not in ENGINE_KEYS}
    engine = {**cfg.get("engine", {}), **{k: v for k, v in cfg.items() if k in ENGINE_KEYS}}
    if engine:
        out["engine"] = engine
    return out


def tiny_config(data: Path | None = None, **extra: Any) -> dict[str, Any]:
    """A config for the tiny random Llama: B=4, k=2, 3 steps, a checkpoint every step."""
    cfg: dict[str, Any] = {
        "model": "tiny", "lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
        "candidates_per_step": 4, "budget_per_step": 2, "steps": 3, "lr": 0.01,
        "max_length": 32, "target_batch_size": 4, "eval_size": 4, "eval_every": 2,
        "checkpoint_every": 1}
    if data is not None:
        cfg.update(stream=str(data / "stream.jsonl"), target=str(data / "target.jsonl"))
    cfg.update(extra)
    return nest_engine(cfg)


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(nest_engine(cfg)))
    return path


def _no_constants(name: str) -> Any:
    raise AssertionError(f"bare {name} in a log: not valid JSON")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every line of a log, parsed strictly (a NaN or Infinity token fails the test)."""
    return [json.loads(line, parse_constant=_no_constants)
            for line in path.read_text().splitlines()]


def selections(run: Path) -> list[tuple[int, list[str], list[float]]]:
    """``(step, selected_ids, weights)`` per logged step: what must survive any resume."""
    return [(r["step"], r["selected_ids"], r["weights"])
            for r in read_jsonl(run / "selections.jsonl")]


@pytest.fixture
def one_thread():
    """The tiny model runs several times faster on one thread when the cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
