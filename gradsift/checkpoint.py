"""Checkpoints for exact resume: safetensors weights, weights-only torch state, JSON counters.

A checkpoint folder ``checkpoints/step_000123/`` holds

* ``trainable.safetensors`` — every trainable parameter;
* ``target_grad.safetensors`` — the cached target gradient (when one exists);
* ``state.pt`` — optimizer, scheduler and RNG states, loaded with ``weights_only=True``;
* ``state.json`` — step counters, stream position, selector state, log offsets.

It is written into a temporary folder and renamed, then ``checkpoints/latest`` is replaced
atomically, so a crash never leaves a half-written checkpoint that resume would pick.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"


def save_checkpoint(root: Path, trainer: Any) -> Path:
    """Write ``trainer``'s complete state under ``root/step_NNNNNN`` and point ``latest`` at it."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{trainer.state.step:06d}"
    final = root / name
    tmp = root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({n: p.detach().contiguous().cpu() for n, p in trainer.params.items()},
              str(tmp / "trainable.safetensors"))
    if trainer.target_grad is not None:
        save_file({n: t.contiguous().cpu() for n, t in trainer.target_grad.items()},
                  str(tmp / "target_grad.safetensors"))
    torch.save(
        {
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict() if trainer.scheduler else None,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python_rng": random.getstate(),
            "target_generator": trainer.target_generator.get_state(),
            "selector_generator": trainer.selector_generator.get_state(),
        },
        tmp / "state.pt",
    )
    (tmp / "state.json").write_text(json.dumps({
        "trainer": trainer.trainer_state(),
        "stream": trainer.stream.state_dict(),
        "selector": trainer.selector.state_dict(),
    }, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(name)
    os.replace(pointer, root / LATEST)
    return final


def latest_checkpoint(root: Path) -> Path:
    """The folder ``root/latest`` points at; a clear error when there is none."""
    pointer = root / LATEST
    if not pointer.exists():
        raise FileNotFoundError(f"no checkpoint to resume from: {pointer} does not exist")
    return root / pointer.read_text().strip()


def load_checkpoint(root: Path, trainer: Any, which: str | Path | None = None) -> Path:
    """Restore every piece written by ``save_checkpoint`` into ``trainer``."""
    folder = latest_checkpoint(root) if which is None else Path(which)
    weights = load_file(str(folder / "trainable.safetensors"))
    missing = set(trainer.params) - set(weights)
    if missing:
        raise KeyError(f"{folder}: checkpoint lacks trainable parameters {sorted(missing)[:5]}")
    with torch.no_grad():
        for n, p in trainer.params.items():
            p.copy_(weights[n].to(p.device, p.dtype))
    grad_file = folder / "target_grad.safetensors"
    trainer.target_grad = (
        {n: t.to(trainer.device) for n, t in load_file(str(grad_file)).items()}
        if grad_file.exists() else None
    )
    state = torch.load(folder / "state.pt", weights_only=True)
    trainer.optimizer.load_state_dict(state["optimizer"])
    if trainer.scheduler is not None and state["scheduler"] is not None:
        trainer.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate(_as_tuple(state["python_rng"]))
    trainer.target_generator.set_state(state["target_generator"])
    trainer.selector_generator.set_state(state["selector_generator"])
    info = json.loads((folder / "state.json").read_text())
    for key, value in info["trainer"].items():
        setattr(trainer.state, key, value)
    trainer.stream.load_state_dict(info["stream"])
    trainer.selector.load_state_dict(info["selector"])
    return folder


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x
