"""Benchmarks of gradsift (run as scripts, e.g. ``python -m gradsift.bench.grads``)."""

from __future__ import annotations

from pathlib import Path


def emit(report: str, markdown_file: str | Path | None) -> None:
    """Print a benchmark's markdown report, and write it to ``markdown_file`` when given."""
    print(report)
    if markdown_file:
        Path(markdown_file).write_text(report)
