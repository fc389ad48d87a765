"""Fault injection: ``kill -9`` at random points of short runs — inside a step, a log append
(torn line), a checkpoint write (between its files, its fsyncs, its renames, its pruning) or
at a random time — then ``gradsift run --resume``. Every resumed run must log the same
``selected_ids`` and weights and end with the same summary as the uninterrupted run.

One driver process imports gradsift once and forks a child per run, so the test costs one
interpreter start. ``GRADSIFT_FAULT_SEED`` picks other kill points (default 0).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from runfiles import read_jsonl, selections, tiny_config, write_config, write_data

REPO = Path(__file__).resolve().parents[1]  # the children import this tree's gradsift

DRIVER = textwrap.dedent('''
    import json, os, random, shutil, signal, sys, time
    from pathlib import Path

    import gradsift.checkpoint as ck
    import gradsift.engine as eng
    import gradsift.models
    import gradsift.recipe
    import peft
    from gradsift.cli import main
    from transformers.models.llama import modeling_llama

    config, work, seed = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    # every child is forked from here: import and load the tokenizer once, not per run
    tokenizer = gradsift.models.load_tokenizer("tiny")
    gradsift.models.load_tokenizer = lambda *args, **kwargs: tokenizer
    rng = random.Random(seed)

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def counted(n, fn, when="before"):
        calls = [0]
        def wrapper(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n and when == "before":
                die()
            out = fn(*args, **kwargs)
            if calls[0] == n:
                die()
            return out
        return wrapper

    def torn(n, fn):
        calls = [0]
        def append(self, name, record):
            calls[0] += 1
            if calls[0] == n:  # half a line reaches the disk, then the process dies
                line = json.dumps(record)
                with open(self.run_dir / name, "a") as f:
                    f.write(line[: len(line) // 2])
                die()
            return fn(self, name, record)
        return append

    def install(kind, n):
        if kind == "step":
            eng.OnlineTrainer.step = counted(n, eng.OnlineTrainer.step)
        elif kind == "save_file":  # after writing one checkpoint file
            ck.save_file = counted(n, ck.save_file, when="after")
        elif kind == "fsync":  # between the files of a checkpoint and its manifest
            ck._fsync = counted(n, ck._fsync)
        elif kind == "replace":  # between a checkpoint's renames (and config/summary writes)
            os.replace = counted(n, os.replace)
        elif kind == "prune":  # while old checkpoints are being removed
            shutil.rmtree = counted(n, shutil.rmtree)
        elif kind == "append":
            eng.OnlineTrainer._append = torn(n, eng.OnlineTrainer._append)

    def child(argv, kind=None, n=0):
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                if kind:
                    install(kind, n)
                code = main(argv)
            finally:
                os._exit(code)
        return pid

    def wait(pid):
        _, status = os.waitpid(pid, 0)
        return "killed" if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)

    def run_argv(out):
        if (out / "config.yaml").exists():
            return ["--quiet", "run", "--resume", str(out)]
        return ["--quiet", "run", "--config", config, "--out", str(out)]

    results = {"reference": wait(child(run_argv(work / "reference")))}
    cases = [("step", rng.randint(1, 4)), ("save_file", rng.randint(1, 8)),
             ("fsync", rng.randint(1, 30)), ("replace", rng.randint(2, 12)),
             ("prune", rng.randint(1, 4)), ("append", rng.randint(1, 10)),
             ("timer", round(rng.uniform(0.2, 1.5), 2))]
    for kind, n in cases:
        out = work / f"{kind}-{n}"
        if kind == "timer":
            pid = child(run_argv(out))
            time.sleep(n)
            os.kill(pid, signal.SIGKILL)
            first = wait(pid)
        else:
            first = wait(child(run_argv(out), kind, n))
        results[out.name] = [first, wait(child(run_argv(out)))]
    print(json.dumps(results))
''')


@pytest.fixture(scope="module")
def fault_runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("faults")
    data = write_data(work / "data")
    config = write_config(work / "c.yaml", tiny_config(
        data, steps=4, checkpoint_every=1, keep_checkpoints=2, scheduler="linear",
        lora={"r": 2, "alpha": 4, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}))
    (work / "driver.py").write_text(DRIVER)
    proc = subprocess.run(
        [sys.executable, str(work / "driver.py"), str(config), str(work),
         os.environ.get("GRADSIFT_FAULT_SEED", "0")],
        capture_output=True, text=True, timeout=540,
        env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
             "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work, json.loads(proc.stdout.strip().splitlines()[-1])


def _summary(run: Path) -> dict:
    s = json.loads((run / "summary.json").read_text())
    return {k: s[k] for k in ("final_target_loss", "trained_samples", "trained_tokens", "steps",
                              "skipped_updates", "stopped")}


def test_kill_9_anywhere_then_resume_gives_the_uninterrupted_run(fault_runs):
    work, results = fault_runs
    assert results.pop("reference") == 0
    reference = work / "reference"
    expected = selections(reference)
    assert [step for step, _, _ in expected] == [1, 2, 3, 4]
    killed = 0
    for name, (first, resumed) in results.items():
        run = work / name
        assert resumed == 0, f"{name}: resume exited {resumed}"
        killed += first == "killed"
        got = selections(run)
        assert [(s, ids) for s, ids, _ in got] == [(s, ids) for s, ids, _ in expected], name
        for (_, _, w), (_, _, w_ref) in zip(got, expected, strict=True):
            assert w == pytest.approx(w_ref, abs=1e-6), name
        assert _summary(run) == pytest.approx(_summary(reference), abs=1e-6), name
        metrics = read_jsonl(run / "metrics.jsonl")
        assert [m["step"] for m in metrics] == [0, 1, 2, 3, 4], name
        assert [m.get("target_loss") for m in metrics] == pytest.approx(
            [m.get("target_loss") for m in read_jsonl(reference / "metrics.jsonl")], abs=1e-6)
        assert not list((run / "checkpoints").glob(".tmp-*")), name
    assert killed >= len(results) - 1, results  # the timer may fire after a fast run ended
