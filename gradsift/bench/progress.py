"""How long the runs left take: each at the mean time of the finished runs most like it."""

from __future__ import annotations

from collections.abc import Sequence


def estimate_seconds(jobs: Sequence[tuple[str, str]],
                     known: dict[tuple[str, str], list[float]]) -> float | None:
    """Time of the (scenario, method) ``jobs``: each at the mean time of the finished runs of
    its scenario and method, else of its scenario, else of all; None when none has finished."""
    if not known:
        return None
    every = [t for times in known.values() for t in times]
    total = 0.0
    for scenario, method in jobs:
        times = known.get((scenario, method)) or [
            t for (sc, _), ts in known.items() if sc == scenario for t in ts] or every
        total += sum(times) / len(times)
    return total


def about(jobs: Sequence[tuple[str, str]], known: dict[tuple[str, str], list[float]],
           word: str = "at the times of the runs finished here") -> str:
    """``, about 1 h 05 min <word>`` for ``jobs``, or nothing when no run has finished."""
    seconds = estimate_seconds(jobs, known)
    return "" if seconds is None or not jobs else f", about {duration(seconds)} {word}"


def runs_to_do(jobs: Sequence[tuple[str, str]],
               known: dict[tuple[str, str], list[float]]) -> str:
    """``3 runs to do, about 12 min at the times of the runs finished here``."""
    return f"{len(jobs)} run{'s' * (len(jobs) != 1)} to do{about(jobs, known)}"


def duration(seconds: float) -> str:
    """``3 h 05 min``, ``7 min``, ``45 s``."""
    minutes = round(seconds / 60)
    if seconds < 90:
        return f"{round(seconds)} s"
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"
