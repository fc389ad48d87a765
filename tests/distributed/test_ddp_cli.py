"""`gradsift run` under a launcher: 2 ranks (torchrun's environment, gloo) give one log, one
config, one summary and one TensorBoard writer, with the selections of the same run in one
process; resume works."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from launch import run_ranks
from runfiles import tiny_config, write_config, write_data

from gradsift.cli import main


def _run(args: list[str], world: int, cwd: Path, timeout: float = 90.0) -> list[int]:
    """The command on ``world`` ranks; a launch that stalls is tried once more."""
    argv = [sys.executable, "-m", "gradsift.cli", "--quiet", *args]
    try:
        return run_ranks(argv, world, cwd, cwd=cwd, timeout=timeout, what=args[0])
    except TimeoutError:
        if args[0] == "run" and "--out" in args:  # a fresh run: what the stall wrote goes
            shutil.rmtree(cwd / args[args.index("--out") + 1], ignore_errors=True)
        return run_ranks(argv, world, cwd, cwd=cwd, timeout=timeout, what=args[0])


def _selections(run: Path) -> list[tuple]:
    rows = [json.loads(x) for x in (run / "selections.jsonl").read_text().splitlines()]
    return [(r["step"], r["candidate_ids"], r["selected_ids"],
             [round(w, 5) for w in r["weights"]]) for r in rows]


def test_gradsift_run_under_a_launcher(tmp_path):
    data = write_data(tmp_path / "data")
    config = write_config(tmp_path / "c.yaml", tiny_config(data, steps=3, checkpoint_every=1,
                                                            report_to="tensorboard"))
    # the single-process reference runs in this process (a launch costs seconds of imports)
    assert main(["--quiet", "run", "--config", str(config), "--out", str(tmp_path / "one")]) == 0
    codes = _run(["run", "--config", str(config), "--out", "two"], 2, tmp_path)
    assert codes == [0, 0], (tmp_path / "rank1.log").read_text()[-2000:]
    one, two = tmp_path / "one", tmp_path / "two"
    assert _selections(two) == _selections(one)
    assert [r["step"] for r in map(json.loads, (two / "metrics.jsonl").read_text()
                                   .splitlines())] == [0, 1, 2, 3]
    assert json.loads((two / "summary.json").read_text())["trained_samples"] == 6
    assert len(list((two / "tensorboard").glob("events.*"))) == 1  # rank 0 reports, alone
    # a resumed launcher run: the summary gone, the run continues from its last checkpoint
    (two / "summary.json").unlink()
    assert _run(["run", "--resume", "two"], 2, tmp_path) == [0, 0]
    assert _selections(two) == _selections(one)
    assert len(list((two / "tensorboard").glob("events.*"))) == 2
