"""Checkpoints for exact resume: safetensors weights, weights-only torch state, JSON counters,
and a manifest with a SHA-256 per file.

A checkpoint folder ``checkpoints/step_000123/`` holds

* ``trainable.safetensors`` — every trainable parameter;
* ``target_grad.safetensors`` — the cached target gradient (when one exists);
* ``state.pt`` — optimizer, scheduler and RNG states, loaded with ``weights_only=True``;
* ``state.json`` — step counters, stream position, selector state, log offsets;
* ``manifest.json`` — written last: the step and each file's size and SHA-256.

**Writing never removes the last good checkpoint before the new one is in place**: files go
into ``.tmp-step_N``, are fsynced, and the folder is renamed to ``step_N`` (an existing
``step_N`` is first renamed aside to ``.old-step_N``, which stays findable until the new one is
in place); then ``checkpoints/latest`` is replaced atomically, and only then are checkpoints
beyond the newest ``keep`` removed (renamed to ``.del-…`` first, so a half-deleted folder never
carries a checkpoint's name).

**Reading verifies before it trusts**: :func:`load_checkpoint` takes the newest checkpoint
whose manifest verifies (sizes and hashes), logs each damaged one it passes over (and moves
those newer than the one it resumes from aside, to ``.damaged-step_N``), reads every file into
memory and only then restores the trainer, so a damaged file never half-restores it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

LATEST = "latest"
MANIFEST = "manifest.json"
_NAME = re.compile(r"^(?:\.old-)?step_(\d+)$")


class CheckpointError(ValueError):
    """No usable checkpoint: every candidate is missing, damaged or does not fit the run."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk, so a power loss keeps what a rename says."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(folder: Path) -> None:
    """Rename ``folder`` to ``.del-<name>`` (one atomic step), then delete it."""
    doomed = folder.with_name(f".del-{folder.name.lstrip('.')}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def save_checkpoint(root: Path, step: int, state: dict[str, Any], keep: int = 3) -> Path:
    """Write a trainer's ``state_dict()`` under ``root/step_NNNNNN``, point ``latest`` at it and
    keep the newest ``keep`` checkpoints.

    ``state`` has four parts: ``params`` and ``target_grad`` (name → tensor, safetensors),
    ``torch`` (optimizer, scheduler, generator and RNG states: ``state.pt``, read back with
    ``weights_only=True``) and ``info`` (JSON: ``state.json``).

    Raises:
        OSError: the disk is full or read-only; the previous checkpoints are left intact.
    """
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    final, tmp = root / name, root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file({n: t.contiguous() for n, t in state["params"].items()},
                  str(tmp / "trainable.safetensors"))
        if state.get("target_grad") is not None:
            save_file({n: t.contiguous() for n, t in state["target_grad"].items()},
                      str(tmp / "target_grad.safetensors"))
        torch.save(state["torch"], tmp / "state.pt")
        (tmp / "state.json").write_text(json.dumps(state["info"], indent=1))
        files = sorted(p.name for p in tmp.iterdir())
        for f in files:
            _fsync(tmp / f)
        manifest = {"format": 1, "step": step,
                    "files": {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)}
                              for f in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync(tmp / MANIFEST)
        _fsync(tmp)
        if final.exists():  # the same step saved again: keep the old copy until the new is in
            old = root / f".old-{name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        pointer = root / f".{LATEST}.tmp"
        pointer.write_text(name)
        _fsync(pointer)
        os.replace(pointer, root / LATEST)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(root, keep, current=name)
    return final


def _prune(root: Path, keep: int, current: str) -> None:
    """Remove leftovers of interrupted writes and all but the newest ``keep`` checkpoints."""
    for leftover in root.glob(".old-step_*"):
        _remove(leftover)
    for leftover in (*root.glob(".tmp-step_*"), *root.glob(".del-*")):
        shutil.rmtree(leftover, ignore_errors=True)
    steps = sorted((p for p in root.glob("step_*") if _NAME.match(p.name)),
                   key=lambda p: int(_NAME.match(p.name).group(1)), reverse=True)
    for folder in steps[keep:]:
        if folder.name != current:
            _remove(folder)


def verify_checkpoint(folder: Path) -> str | None:
    """``None`` when every file listed in ``folder``'s manifest is there with its size and
    SHA-256; else what is wrong (``"state.pt: checksum mismatch"``)."""
    if not folder.is_dir():
        return "missing"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = {str(k): (int(v["bytes"]), str(v["sha256"])) for k, v in manifest["files"].items()}
        int(manifest["step"])
    except FileNotFoundError:
        return f"no {MANIFEST} (the write did not finish)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST} unreadable ({type(e).__name__})"
    for required in ("trainable.safetensors", "state.pt", "state.json"):
        if required not in files:
            return f"{MANIFEST} lists no {required}"
    for name, (size, digest) in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name}: missing"
        if path.stat().st_size != size:
            return f"{name}: {path.stat().st_size} bytes, expected {size} (truncated?)"
        if _sha256(path) != digest:
            return f"{name}: checksum mismatch (damaged)"
    return None


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under ``root``, newest step first (``.old-`` copies after theirs)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: (-int(_NAME.match(p.name).group(1)),
                                        p.name.startswith(".")))


def has_checkpoint(root: Path) -> bool:
    """Whether ``root`` holds any checkpoint folder (intact or not)."""
    return bool(list_checkpoints(root))


def latest_checkpoint(root: Path) -> Path:
    """The newest intact checkpoint (see :func:`load_checkpoint`); damaged ones are logged.

    Raises:
        CheckpointError: there is no checkpoint, or none is intact (each reason is listed).
    """
    return _choose(root)[0]


def _choose(root: Path) -> tuple[Path, list[tuple[Path, str]]]:
    candidates = list_checkpoints(root)
    if not candidates:
        raise CheckpointError(f"no checkpoint to resume from in {root}")
    pointer = root / LATEST
    named = pointer.read_text(errors="replace").strip() if pointer.is_file() else None
    damaged: list[tuple[Path, str]] = []
    for folder in candidates:
        problem = verify_checkpoint(folder)
        if problem is None:
            if named is not None and folder.name != named:
                logger.info("%s names %r; the newest intact checkpoint is %s",
                            pointer, named[:40], folder.name)
            return folder, damaged
        damaged.append((folder, problem))
        logger.warning("checkpoint %s is damaged: %s; trying an older one", folder, problem)
    reasons = "; ".join(f"{f.name}: {why}" for f, why in damaged)
    raise CheckpointError(
        f"no intact checkpoint in {root} ({reasons}). To start the run again from step 0, "
        f"move {root} away and resume")


def _read(folder: Path) -> dict[str, Any]:
    """Every file of a checkpoint, in memory, as the ``state`` ``save_checkpoint`` took."""
    grad_file = folder / "target_grad.safetensors"
    try:
        return {
            "params": load_file(str(folder / "trainable.safetensors")),
            "target_grad": load_file(str(grad_file)) if grad_file.exists() else None,
            "torch": torch.load(folder / "state.pt", weights_only=True),
            "info": json.loads((folder / "state.json").read_text()),
        }
    except Exception as e:  # safetensors, pickle and json each raise their own types
        raise CheckpointError(f"{folder}: cannot be read: {type(e).__name__}: {e}") from e


def load_checkpoint(root: Path, which: str | Path | None = None,
                    restore: Callable[[dict[str, Any]], None] | None = None
                    ) -> tuple[Path, dict[str, Any]]:
    """Read the state ``save_checkpoint`` wrote, verified.

    Without ``which``, the newest checkpoint that verifies is used; each damaged one passed
    over is logged and moved aside to ``.damaged-<name>`` (it holds a future the run will now
    write again) — after ``restore(state)`` took the state (the trainer's
    ``load_state_dict``, which raises ``CheckpointError`` when it does not fit).

    Returns:
        ``(folder, state)``.

    Raises:
        CheckpointError: no intact checkpoint (or ``which`` is damaged), or ``restore`` refused.
    """
    if which is not None:
        folder = Path(which)
        problem = verify_checkpoint(folder)
        if problem:
            raise CheckpointError(f"checkpoint {folder} is damaged: {problem}")
        damaged: list[tuple[Path, str]] = []
    else:
        folder, damaged = _choose(root)
    state = _read(folder)
    if restore is not None:
        try:
            restore(state)
        except CheckpointError as e:
            raise CheckpointError(f"{folder}: {e}") from e
    for bad, _ in damaged:
        aside = bad.with_name(f".damaged-{bad.name.lstrip('.')}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(bad, aside)
        logger.warning("resuming from %s; moved the damaged %s to %s", folder.name, bad.name,
                       aside)
    return folder, state
