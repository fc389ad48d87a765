"""The run log, one schema for every entry point: ``selections.jsonl`` and ``metrics.jsonl``.

``OnlineTrainer`` and ``GradSiftTrainer`` write the same records through :class:`RunLog`, and
``gradsift report`` reads them back with :func:`read_records`. Steps are numbered from 1 (the
record of the first update is step 1; step 0 is the evaluation before training). Numbers are
strict JSON: NaN/±inf are written as ``null`` and the record names the keys in
``"nonfinite"`` (``gradsift.jsonio``).

A ``selections.jsonl`` record::

    {"step", "candidate_ids", "candidate_sources", "selected_ids", "weights", "scores",
     "losses", "rho", "timing", "diagnostics", "skip_reason"}

A ``metrics.jsonl`` record: ``step``, ``trained_samples``, ``trained_tokens``, ``train_loss``,
``candidate_loss``, ``lr``, ``wall_seconds`` and, at evaluation steps, ``target_loss``.

An ``eval_losses.jsonl`` record, one per evaluation: ``step``, ``ids`` (the held-out examples,
in order) and ``losses`` (each one's mean token loss; their mean is ``target_loss``), so that
two runs can be compared example by example (``gradsift.report``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradsift.jsonio import dumps_line, read_jsonl

SELECTIONS = "selections.jsonl"
METRICS = "metrics.jsonl"
EVAL_LOSSES = "eval_losses.jsonl"
LOGS = (SELECTIONS, METRICS, EVAL_LOSSES)


class RunLogError(ValueError):
    """A log file is malformed; the message names the file and the line."""


def _round(x: Any, digits: int) -> float | None:
    """Rounded; NaN/inf stay (the writer turns them into null and names the key)."""
    if x is None:
        return None
    x = float(x)
    return round(x, digits) if math.isfinite(x) else x


def selection_record(step: int, ids: Sequence[str], sources: Sequence[str], result: Any,
                     skip_reason: str | None = None) -> dict[str, Any]:
    """The ``selections.jsonl`` record of one step from a ``gradsift.step.StepResult``."""
    selection = result.selection
    chosen = selection.indices.tolist()
    return {
        "step": step,
        "candidate_ids": list(ids),
        "candidate_sources": list(sources),
        "selected_ids": [ids[i] for i in chosen],
        "weights": [round(float(w), 8) for w in selection.weights],
        "scores": [_round(s, 8) for s in selection.scores.tolist()],
        "losses": [_round(v, 6) for v in result.candidates.losses.tolist()],
        "rho": _round(selection.diagnostics.get("rho"), 8),
        "timing": {k: round(v, 6) for k, v in result.timing.items()},
        "diagnostics": {k: v for k, v in selection.diagnostics.items() if k != "rho"},
        "skip_reason": skip_reason,
    }


def eval_losses_record(step: int, ids: Sequence[str], losses: Sequence[float]) -> dict[str, Any]:
    """The ``eval_losses.jsonl`` record of one evaluation: each held-out example's loss."""
    if len(ids) != len(losses):
        raise ValueError(f"{len(ids)} held-out ids for {len(losses)} losses")
    return {"step": step, "ids": list(ids), "losses": [_round(v, 6) for v in losses]}


class RunLog:
    """Appends records to the logs of one run folder.

    Args:
        folder: the run folder (created if needed).
        enabled: False on processes that must not write (non-zero ranks).
    """

    def __init__(self, folder: str | Path, enabled: bool = True):
        self.folder = Path(folder)
        self.enabled = enabled
        self.reporters: Any = None  # gradsift.reporting.Reporters, see attach()
        if enabled:
            self.folder.mkdir(parents=True, exist_ok=True)

    def attach(self, reporters: Any) -> None:
        """Forward every record written from now on to ``reporters``
        (``gradsift.reporting.Reporters``: tensorboard, wandb, ...), which :meth:`close` closes."""
        self.close()
        self.reporters = reporters

    def append(self, name: str, record: dict[str, Any]) -> None:
        """One strict-JSON line at the end of ``folder/name`` (and its scalars to the
        attached reporters)."""
        if self.enabled:
            with open(self.folder / name, "a", encoding="utf-8") as f:
                f.write(dumps_line(record))
            if self.reporters is not None:
                self.reporters.record(name, record)

    def close(self) -> None:
        """Close the attached reporters (flushing their files); the log files need nothing."""
        if self.reporters is not None:
            reporters, self.reporters = self.reporters, None
            reporters.close()

    def drop_after(self, step: int) -> None:
        """Remove the records of steps after ``step`` (resume from that step's checkpoint)."""
        if not self.enabled:
            return
        for name in LOGS:
            drop_records_after(self.folder / name, step)


def drop_records_after(path: Path, step: int) -> None:
    """Rewrite the log ``path`` (if it exists) without its records of steps after ``step``."""
    if path.is_file():
        kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a log file, sorted by step.

    Raises:
        RunLogError: a line is not a JSON object with a ``step`` (names file and line).
    """
    path = Path(path)
    return sorted(read_jsonl(path, RunLogError, require="step"), key=lambda r: r["step"])
