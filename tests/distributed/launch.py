"""Start N ranks of ``ddp_worker.py`` the way ``torchrun`` does (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT`` on a free port), wait with a timeout, and leave no process
behind: when one rank fails or the time is up, the others are killed."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

WORKER = Path(__file__).with_name("ddp_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, out: Path, world: int, *options: str,
           timeout: float = 60.0) -> list[int]:
    """Run ``world`` ranks (one plain process when ``world`` is 0); their exit codes.

    Ranks that make no progress for ``timeout`` seconds are killed and started once more on
    a fresh port (a rendezvous that never completes on a busy machine is not a result).

    Raises:
        TimeoutError: the ranks did not finish in ``timeout`` seconds, twice (all were killed).
    """
    return _launch(scenario, out, world, [str(out), *options], timeout)


def launch_runs(scenario: str, root: Path, world: int, runs: dict[str, tuple[str, ...]],
                timeout: float = 120.0) -> list[int]:
    """``launch`` with several runs in one launch (``ddp_worker.py``'s ``++``): run ``name``
    writes into ``root/name``; the ranks' logs go to ``root``."""
    argv: list[str] = []
    for name, options in runs.items():
        argv += [*(["++"] if argv else []), str(root / name), *options]
    return _launch(scenario, root, world, argv, timeout)


def _launch(scenario: str, out: Path, world: int, argv: list[str],
            timeout: float) -> list[int]:
    for attempt in (1, 2):
        out.mkdir(parents=True, exist_ok=True)
        try:
            return run_ranks([sys.executable, str(WORKER), scenario, *argv], world, out,
                             timeout=timeout, what=scenario)
        except TimeoutError:
            shutil.rmtree(out, ignore_errors=True)  # what the stalled attempt wrote goes too
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def run_ranks(argv: list[str], world: int, logs_dir: Path, cwd: Path | None = None,
              timeout: float = 60.0, what: str = "ranks") -> list[int]:
    """Start ``argv`` as ``world`` ranks with torchrun's environment on a free port (one plain
    process when ``world`` is 0), logs in ``logs_dir/rank<r>.log``; their exit codes. A rank
    that fails stops the wait (the others would wait forever in a collective); every process
    left is killed on the way out.

    Raises:
        TimeoutError: the ranks did not finish in ``timeout`` seconds.
    """
    port = free_port()
    procs: list[subprocess.Popen] = []
    env_base = {k: v for k, v in os.environ.items()
                if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    # the loopback interface for gloo: resolving the host name can pick one ranks cannot reach
    env_base.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", GLOO_SOCKET_IFNAME="lo")
    try:
        for r in range(max(world, 1)):
            env = dict(env_base)
            if world:
                env.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            log = open(logs_dir / f"rank{r}.log", "w")  # noqa: SIM115 - closed with the process
            procs.append(subprocess.Popen(argv, env=env, cwd=cwd, stdout=log,
                                          stderr=subprocess.STDOUT))
            log.close()
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: ranks still running after {timeout} s")
            time.sleep(0.1)
        return [p.poll() if p.poll() is not None else -9 for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait(timeout=30)


def logs(out: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(out.glob("*.log")))
