"""The multi-process runs the distributed tests compare, made in two launches for the whole
session: one process (the references) and two ranks (gloo, CPU). Each run has its own folder
and starts from the same seed; a launch costs seconds of imports, a tiny run a fraction."""

from __future__ import annotations

from pathlib import Path

import pytest
from launch import launch_runs, logs

RUNS = {
    "lora": (),  # OnlineTrainer, exchange: exact, FTW (shrink weighting), 3 steps
    "sketch": ("exchange=sketch", "sketch_dim=64"),
    "local": ("scope=local", "sketch_dim=64"),
    "loss": ("method=loss", "sketch_dim=64"),
    # 17 records, B = 8: the third global batch has one record, rank 1 captures nothing
    "ragged": ("n_stream=17", "exchange=exact"),
    "random": ("method=random", "model=full", "n_stream=17"),
    "trainer": ("scenario=trainer",),  # GradSiftTrainer inside transformers.Trainer
}
ONE_PROCESS = ("lora", "ragged", "random", "trainer")  # the references the ranks match


@pytest.fixture(scope="session")
def ddp_runs(tmp_path_factory) -> tuple[Path, Path]:
    """``RUNS`` on two ranks and ``ONE_PROCESS`` in one process: the (one, two) roots."""
    root = tmp_path_factory.mktemp("ddp")
    one, two = root / "one", root / "two"
    assert launch_runs("online", one, 0, {n: RUNS[n] for n in ONE_PROCESS}) == [0], logs(one)
    assert launch_runs("online", two, 2, RUNS) == [0, 0], logs(two)
    return one, two
