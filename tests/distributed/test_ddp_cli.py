"""`gradsift run` under a launcher: 2 ranks (torchrun's environment, gloo) give one log, one
config and one summary, with the selections of the same run in one process; resume works."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from launch import free_port
from runfiles import tiny_config, write_config, write_data


def _run(args: list[str], world: int, cwd: Path, timeout: float = 90.0) -> list[int]:
    """The command on ``world`` ranks; a launch that times out is tried once more."""
    codes = _run_once(args, world, cwd, timeout)
    if -9 not in codes:
        return codes
    if args[0] == "run" and "--out" in args:  # a fresh run: what the stalled attempt wrote goes
        shutil.rmtree(cwd / args[args.index("--out") + 1], ignore_errors=True)
    return _run_once(args, world, cwd, timeout)


def _run_once(args: list[str], world: int, cwd: Path, timeout: float) -> list[int]:
    port = free_port()
    base = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    base.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    procs = []
    try:
        for r in range(max(world, 1)):
            env = dict(base)
            if world:
                env.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            log = open(cwd / f"rank{r}.log", "w")  # noqa: SIM115 - closed with the process
            procs.append(subprocess.Popen([sys.executable, "-m", "gradsift.cli", "--quiet",
                                           *args], env=env, cwd=cwd, stdout=log,
                                          stderr=subprocess.STDOUT))
            log.close()
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        return [p.poll() if p.poll() is not None else -9 for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)


def _selections(run: Path) -> list[tuple]:
    rows = [json.loads(x) for x in (run / "selections.jsonl").read_text().splitlines()]
    return [(r["step"], r["candidate_ids"], r["selected_ids"],
             [round(w, 5) for w in r["weights"]]) for r in rows]


def test_gradsift_run_under_a_launcher(tmp_path):
    data = write_data(tmp_path / "data")
    config = write_config(tmp_path / "c.yaml", tiny_config(data, steps=3, checkpoint_every=1))
    assert _run(["run", "--config", str(config), "--out", "one"], 0, tmp_path) == [0]
    codes = _run(["run", "--config", str(config), "--out", "two"], 2, tmp_path)
    assert codes == [0, 0], (tmp_path / "rank1.log").read_text()[-2000:]
    one, two = tmp_path / "one", tmp_path / "two"
    assert _selections(two) == _selections(one)
    assert [r["step"] for r in map(json.loads, (two / "metrics.jsonl").read_text()
                                   .splitlines())] == [0, 1, 2, 3]
    assert json.loads((two / "summary.json").read_text())["trained_samples"] == 6
    # a resumed launcher run: the summary gone, the run continues from its last checkpoint
    (two / "summary.json").unlink()
    assert _run(["run", "--resume", "two"], 2, tmp_path) == [0, 0]
    assert _selections(two) == _selections(one)
