"""Benchmarks of gradsift (run as scripts, e.g. ``python -m gradsift.bench.grads``)."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """gradsift's log at ERROR and warnings off while a benchmark runs; both restored after
    (benchmarks also run inside other programs, e.g. the tests)."""
    log = logging.getLogger("gradsift")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def emit(report: str, markdown_file: str | Path | None) -> None:
    """Print a benchmark's markdown report, and write it to ``markdown_file`` when given."""
    print(report)
    if markdown_file:
        Path(markdown_file).write_text(report)
