"""Summaries, plots and HTML reports of gradsift runs.

- :func:`summarize_compare` — per-method numbers over seeds, written to ``DIR/summary.json``.
- :func:`markdown_table` — that summary as a markdown table (for stdout).
- :func:`write_report` — ``DIR/report.html`` for a compare directory (``DIR/<method>/seed_<s>/``).
- :func:`write_run_report` — ``RUN_DIR/report.html`` for a single run directory.
- :func:`report` — either of the two, by what ``path`` is.
- :mod:`gradsift.report.paired` — paired differences over seeds: interval, sign test, seeds
  needed for 80 % power.
"""

from __future__ import annotations

from pathlib import Path

from gradsift.report.html import write_report, write_run_report
from gradsift.report.runs import (
    MissingRunFileError,
    Run,
    RunDirError,
    is_compare_dir,
    is_run_dir,
    load_compare,
    load_run,
)
from gradsift.report.summary import markdown_table, summarize_compare


def report(path: str | Path, skip_incomplete: bool = False) -> Path:
    """Write the HTML report for a run directory or a compare directory, whichever ``path`` is.

    Args:
        path: a run directory (holds ``metrics.jsonl``) or a compare directory (holds
            ``<method>/seed_<seed>/`` run directories).
        skip_incomplete: compare directories only: skip (count and log) unreadable runs.

    Returns:
        The path of the written ``report.html``.

    Raises:
        FileNotFoundError: ``path`` is neither.
    """
    path = Path(path)
    if is_run_dir(path):
        return write_run_report(path)
    if is_compare_dir(path):
        return write_report(path, skip_incomplete=skip_incomplete)
    raise FileNotFoundError(
        f"{path} is neither a run directory (no metrics.jsonl) nor a compare directory "
        "(no <method>/seed_<seed>/ folders)")


__all__ = [
    "MissingRunFileError",
    "Run",
    "RunDirError",
    "is_compare_dir",
    "is_run_dir",
    "load_compare",
    "load_run",
    "markdown_table",
    "report",
    "summarize_compare",
    "write_report",
    "write_run_report",
]
