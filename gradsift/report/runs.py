"""Read run directories and compare directories written by the engine.

A run directory holds ``config.yaml``, ``metrics.jsonl``, ``selections.jsonl`` and
``summary.json``, and where the engine logged it ``eval_losses.jsonl``; a compare directory
holds one run directory per method and seed at ``DIR/<method>/seed_<seed>/``. Everything here
is plain file reading and validation: a missing file or a malformed line raises an error that
names the file (and the line).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gradsift.runlog import EVAL_LOSSES, RunLogError, read_records

logger = logging.getLogger(__name__)

RUN_FILES = ("config.yaml", "metrics.jsonl", "selections.jsonl", "summary.json")
PHASES = ("capture", "target", "selection", "update")
_SEED_DIR = re.compile(r"^seed_(-?\d+)$")


class RunDirError(ValueError):
    """A run directory cannot be read: a file is missing or malformed."""


class MissingRunFileError(RunDirError, FileNotFoundError):
    """A file every run directory must hold is missing; the message names it."""


@dataclass
class Run:
    """One training run, as logged.

    Attributes:
        path: the run directory.
        method: method name (the compare directory's ``<method>`` folder, else ``summary.json``).
        seed: the run's seed.
        config: the resolved ``config.yaml``.
        metrics: ``metrics.jsonl`` records, sorted by step.
        selections: ``selections.jsonl`` records, sorted by step.
        summary: ``summary.json``.
        eval_losses: ``eval_losses.jsonl`` records, sorted by step (empty for runs that have
            none): each held-out example's loss at each evaluation.
    """

    path: Path
    method: str
    seed: int
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    selections: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)
    eval_losses: list[dict[str, Any]] = field(default_factory=list)

    def eval_curve(self, x: str = "step", finite: bool = True) -> tuple[list[float], list[float]]:
        """``(x, target_loss)`` at the evaluation steps.

        Args:
            x: ``"step"`` or ``"trained_tokens"``.
            finite: drop NaN/inf losses (else keep them: a diverged run stays visible).
        """
        points = [(float(m[x]), float(m["target_loss"])) for m in self.metrics
                  if _finite(m.get(x)) and (_finite(m.get("target_loss")) if finite
                                            else isinstance(m.get("target_loss"), int | float))]
        return [p[0] for p in points], [p[1] for p in points]

    def setting(self, key: str) -> Any:
        """A config value, from the ``engine`` section or (older runs) the top level."""
        engine = self.config.get("engine")
        if isinstance(engine, dict) and key in engine:
            return engine[key]
        return self.config.get(key)

    @property
    def final_target_loss(self) -> float | None:
        """``summary.json``'s final target loss (NaN stays NaN: a diverged run is not hidden);
        when that is null, the last finite evaluated one (None if never evaluated)."""
        value = self.summary.get("final_target_loss")
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        _, losses = self.eval_curve()
        return losses[-1] if losses else None

    @property
    def steps(self) -> int:
        """Number of training steps (``summary.json``, else the largest logged step)."""
        if isinstance(self.summary.get("steps"), int):
            return self.summary["steps"]
        return max((int(m["step"]) for m in self.metrics), default=0)

    @property
    def final_example_losses(self) -> dict[str, float] | None:
        """Each held-out example's loss at the last evaluation, by id; None when the run has no
        ``eval_losses.jsonl`` record of that step."""
        steps, _ = self.eval_curve(finite=False)
        last = [r for r in self.eval_losses if steps and r["step"] == steps[-1]]
        return dict(zip(last[-1]["ids"], last[-1]["losses"], strict=True)) if last else None

    def last_metric(self, key: str) -> float | None:
        """The last logged value of a cumulative metric such as ``trained_tokens``."""
        for m in reversed(self.metrics):
            if _finite(m.get(key)):
                return float(m[key])
        return None


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """A log's records by step (``gradsift.runlog``, the schema every writer uses)."""
    try:
        return read_records(path)
    except RunLogError as err:
        raise RunDirError(str(err)) from err


def _check_selection(path: Path, rec: dict[str, Any]) -> None:
    """The aligned lists of a ``selections.jsonl`` record agree with each other."""
    where = f"{path} step {rec['step']}"
    for key in ("candidate_ids", "candidate_sources", "selected_ids", "weights"):
        if not isinstance(rec.get(key), list):
            raise RunDirError(f"{where}: '{key}' is missing or not a list")
    if len(rec["candidate_ids"]) != len(rec["candidate_sources"]):
        raise RunDirError(f"{where}: candidate_ids and candidate_sources differ in length")
    if len(rec["selected_ids"]) != len(rec["weights"]):
        raise RunDirError(f"{where}: selected_ids and weights differ in length")
    unknown = set(rec["selected_ids"]) - set(rec["candidate_ids"])
    if unknown:
        raise RunDirError(f"{where}: selected ids not among the candidates: {sorted(unknown)}")


def _check_eval_losses(path: Path, rec: dict[str, Any]) -> None:
    """An ``eval_losses.jsonl`` record holds one loss (a number, or null) per distinct id."""
    where = f"{path} step {rec['step']}"
    ids, losses = rec.get("ids"), rec.get("losses")
    if not isinstance(ids, list) or not isinstance(losses, list):
        raise RunDirError(f"{where}: 'ids' and 'losses' must both be lists")
    if len(ids) != len(losses) or len(set(map(str, ids))) != len(ids):
        raise RunDirError(f"{where}: {len(ids)} ids ({len(set(map(str, ids)))} distinct) for "
                          f"{len(losses)} losses")
    if not all(v is None or _finite(v) for v in losses):
        raise RunDirError(f"{where}: 'losses' holds a value that is not a number")


def load_run(
    run_dir: str | Path, method: str | None = None, seed: int | None = None,
    in_progress: bool = False,
) -> Run:
    """Read one run directory.

    Args:
        run_dir: the directory.
        method: the method name to record (default: ``summary.json``'s ``method``).
        seed: the seed to record (default: ``summary.json``'s ``seed``).
        in_progress: accept a run that is still going (no ``summary.json`` yet): its numbers
            then come from the logs written so far.

    Returns:
        The run.

    Raises:
        MissingRunFileError: a file of ``RUN_FILES`` is missing (the message names it).
        RunDirError: a file is malformed (the message names the file and line).
    """
    run_dir = Path(run_dir)
    for name in RUN_FILES:
        if in_progress and name == "summary.json":
            continue
        if not (run_dir / name).is_file():
            raise MissingRunFileError(f"run directory {run_dir} has no {name}")
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise RunDirError(f"{run_dir / 'config.yaml'}: not valid YAML ({err})") from err
    try:
        summary_file = run_dir / "summary.json"
        summary = (json.loads(summary_file.read_text(encoding="utf-8"))
                   if summary_file.is_file() else {})
    except json.JSONDecodeError as err:
        raise RunDirError(f"{run_dir / 'summary.json'}: not valid JSON ({err.msg})") from err
    selections = _read_jsonl(run_dir / "selections.jsonl")
    for rec in selections:
        _check_selection(run_dir / "selections.jsonl", rec)
    eval_losses = (_read_jsonl(run_dir / EVAL_LOSSES) if (run_dir / EVAL_LOSSES).is_file()
                   else [])
    for rec in eval_losses:
        _check_eval_losses(run_dir / EVAL_LOSSES, rec)
    return Run(
        path=run_dir,
        method=method if method is not None else str(summary.get("method",
                                                                 config.get("method", "?"))),
        seed=seed if seed is not None else int(summary.get("seed", config.get("seed", 0))),
        config=config,
        metrics=_read_jsonl(run_dir / "metrics.jsonl"),
        selections=selections,
        summary=summary,
        eval_losses=eval_losses,
    )


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` looks like a run directory (it holds a ``metrics.jsonl``)."""
    return (Path(path) / "metrics.jsonl").is_file()


def find_run_dirs(compare_dir: str | Path) -> list[tuple[str, int, Path]]:
    """``(method, seed, path)`` of every ``<method>/seed_<seed>/`` folder, sorted."""
    compare_dir = Path(compare_dir)
    found = []
    for method_dir in sorted(p for p in compare_dir.iterdir() if p.is_dir()):
        for seed_dir in method_dir.iterdir():
            match = _SEED_DIR.match(seed_dir.name)
            if seed_dir.is_dir() and match:
                found.append((method_dir.name, int(match.group(1)), seed_dir))
    return sorted(found, key=lambda t: (t[0], t[1]))


def is_compare_dir(path: str | Path) -> bool:
    """Whether ``path`` holds at least one ``<method>/seed_<seed>/`` folder."""
    return Path(path).is_dir() and bool(find_run_dirs(path))


def load_compare(compare_dir: str | Path, skip_incomplete: bool = False
                 ) -> tuple[dict[str, list[Run]], list[dict[str, str]]]:
    """Read every run of a compare directory, grouped by method (sorted), seeds ascending.

    Args:
        compare_dir: the compare directory.
        skip_incomplete: skip (and log) runs that cannot be read instead of raising.

    Returns:
        ``({method: [runs]}, skipped)`` where ``skipped`` lists ``{"path", "reason"}``.

    Raises:
        FileNotFoundError: ``compare_dir`` holds no ``<method>/seed_<seed>/`` folder.
        RunDirError: a run cannot be read and ``skip_incomplete`` is False.
    """
    found = find_run_dirs(compare_dir) if Path(compare_dir).is_dir() else []
    if not found:
        raise FileNotFoundError(f"{compare_dir} holds no <method>/seed_<seed>/ run directories")
    runs: dict[str, list[Run]] = {}
    skipped: list[dict[str, str]] = []
    for method, seed, path in found:
        try:
            run = load_run(path, method=method, seed=seed)
        except RunDirError as err:
            if not skip_incomplete:
                raise
            skipped.append({"path": str(path), "reason": str(err)})
            logger.warning("skipping incomplete run %s: %s", path, err)
            continue
        runs.setdefault(method, []).append(run)
    if skipped:
        logger.warning("skipped %d of %d runs in %s", len(skipped), len(found), compare_dir)
    if not runs:
        raise RunDirError(f"no readable run in {compare_dir} ({len(skipped)} skipped)")
    return runs, skipped
