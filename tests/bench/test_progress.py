"""The time left: the mean of the finished runs alike, by hand."""

import pytest

from gradsift.bench.progress import duration, estimate_seconds


def test_time_left_is_the_mean_of_finished_runs_alike() -> None:
    known = {("a", "ftw"): [100.0, 200.0], ("a", "random"): [50.0], ("b", "ftw"): [300.0]}
    # same scenario and method; else same scenario (100, 200, 50); else every run
    jobs = [("a", "ftw"), ("a", "greats"), ("c", "ftw")]
    assert estimate_seconds(jobs, known) == pytest.approx(
        150 + 350 / 3 + 650 / 4)
    assert estimate_seconds(jobs, {}) is None
    assert [duration(s) for s in (45, 420, 3900, 11100)] == [
        "45 s", "7 min", "1 h 05 min", "3 h 05 min"]
