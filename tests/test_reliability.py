"""Runs that cannot be lost, clobbered or silently wrong: the command end to end on bad days
(issue 9). Each test names the defect it covers; RELIABILITY.md lists them all."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
from runfiles import one_thread, read_jsonl, selections, tiny_config, write_config, write_data

from gradsift import checkpoint as ckpt
from gradsift.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
__all__ = ["one_thread"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"))


def one_error_line(capsys) -> str:
    """The whole of stderr must be a single ``gradsift: error:`` line; returns it."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradsift: error: "), err
    return lines[0]


def test_resume_with_relative_data_paths_from_another_folder(tmp_path, monkeypatch, caplog):
    """Defect 1 (run): the saved config.yaml keeps working from any folder. Also 11: skipped
    target records are counted in summary.json."""
    write_data(tmp_path / "base" / "data")
    with open(tmp_path / "base" / "data" / "target.jsonl", "a") as f:
        f.write('{"prompt": 3}\n')  # a bad target record, skipped and counted
    write_config(tmp_path / "base" / "base.yaml",
                 tiny_config(stream="data/stream.jsonl", target="data/target.jsonl", steps=2,
                             skip_bad_records=True))
    monkeypatch.chdir(tmp_path)
    assert main(["--quiet", "run", "--config", "base/base.yaml", "--out", "runs/x"]) == 0
    first = selections(tmp_path / "runs" / "x")
    # as if killed before the step-2 checkpoint: resume from step 1, from another folder
    (tmp_path / "runs" / "x" / "summary.json").unlink()
    (tmp_path / "runs" / "x" / "checkpoints" / "step_000002" / "state.pt").unlink()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with caplog.at_level(logging.WARNING):
        assert main(["--quiet", "run", "--resume", "../runs/x"]) == 0
    assert "step_000002 is damaged" in caplog.text
    assert selections(tmp_path / "runs" / "x") == first
    summary = json.loads((tmp_path / "runs" / "x" / "summary.json").read_text())
    assert summary["skipped_target_records"] == {"bad_record": 1}
    assert summary["stopped"] == "completed"


def test_compare_restarts_anywhere_and_never_reuses_another_config(tmp_path, monkeypatch,
                                                                    capsys):
    """Defects 1 and 3 (compare), and 8: a run folder without a checkpoint starts again."""
    write_data(tmp_path / "base" / "data")
    config = write_config(tmp_path / "base" / "base.yaml",
                          tiny_config(stream="data/stream.jsonl", target="data/target.jsonl",
                                      steps=2))
    monkeypatch.chdir(tmp_path)
    argv = ["--quiet", "compare", "--config", "base/base.yaml", "--methods", "random,ftw",
            "--seeds", "0", "--out", "cmp"]
    assert main(argv) == 0
    random_run, ftw_run = (tmp_path / "cmp" / m / "seed_0" for m in ("random", "ftw"))
    first = selections(ftw_run)
    # ftw "was killed" before its first checkpoint; the compare restarts from another folder
    (ftw_run / "summary.json").unlink()
    for folder in (ftw_run / "checkpoints").iterdir():
        ckpt.shutil.rmtree(folder) if folder.is_dir() else folder.unlink()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    argv_abs = [*argv[:3], str(config), *argv[4:-1], str(tmp_path / "cmp")]
    random_log = (random_run / "selections.jsonl").stat().st_mtime_ns
    assert main(argv_abs) == 0
    assert selections(ftw_run) == first  # started again from step 0, each step logged once
    assert (random_run / "selections.jsonl").stat().st_mtime_ns == random_log  # reused
    capsys.readouterr()
    # the same compare with another lr must not report the old results
    assert main([*argv_abs, "--set", "lr=0.02"]) == 2
    line = one_error_line(capsys)
    assert "was made with another config" in line and "lr: 0.01 → 0.02" in line


def test_two_processes_cannot_write_into_one_run_folder(tmp_path, data, capsys):
    """Defect 2: a live process's lock refuses a second writer; a dead one's does not."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(out / '.gradsift.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode())\n"
         "print('locked', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        config = write_config(tmp_path / "c.yaml", tiny_config(data, steps=1))
        assert main(["--quiet", "run", "--config", str(config), "--out", str(out)]) == 2
        line = one_error_line(capsys)
        assert f"in use by another gradsift process (pid {holder.pid})" in line
        assert not (out / "config.yaml").exists()
    finally:
        holder.kill()  # kill -9: the kernel drops its lock
        holder.wait()
    assert main(["--quiet", "run", "--config", str(config), "--out", str(out)]) == 0
    assert [r["step"] for r in read_jsonl(out / "selections.jsonl")] == [1]


def test_out_never_writes_over_files_it_did_not_create(tmp_path, data, capsys):
    """Defect 6: a non-empty folder that is not a run is refused; the input config survives."""
    exp = tmp_path / "exp"
    exp.mkdir()
    text = "# my experiment\n" + "\n".join(
        f"{k}: {json.dumps(v)}" for k, v in tiny_config(data).items()) + "\n"
    (exp / "config.yaml").write_text(text)
    for argv in (["run", "--config", str(exp / "config.yaml"), "--out", str(exp)],
                 ["compare", "--config", str(exp / "config.yaml"), "--out", str(exp)]):
        assert main(["--quiet", *argv]) == 2
        assert "is not empty and is not a gradsift" in one_error_line(capsys)
    assert (exp / "config.yaml").read_text() == text
    assert sorted(p.name for p in exp.iterdir()) == ["config.yaml"]


def test_resume_of_a_run_without_a_checkpoint_starts_it_again(tmp_path, data, capsys, caplog):
    """Defect 8: --out says use --resume, and --resume works, from step 0 with a message."""
    config = write_config(tmp_path / "c.yaml", tiny_config(data, steps=2, checkpoint_every=0))
    out = tmp_path / "run"
    assert main(["--quiet", "run", "--config", str(config), "--out", str(out)]) == 0
    first = selections(out)
    (out / "summary.json").unlink()  # as if killed before it finished
    assert main(["--quiet", "run", "--config", str(config), "--out", str(out)]) == 2
    assert f"gradsift run --resume {out}" in one_error_line(capsys)
    with caplog.at_level(logging.WARNING):
        assert main(["--quiet", "run", "--resume", str(out)]) == 0
    assert "no checkpoint yet: starting it again from step 0" in caplog.text
    assert selections(out) == first
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [0, 1, 2]


def test_a_diverging_run_stops_with_a_clear_message(tmp_path, data, capsys):
    """Defect 9: lr 1000 with full fine-tuning used to go on selecting nothing, exit 0."""
    config = write_config(tmp_path / "c.yaml", tiny_config(
        data, lora=False, lr=1000, steps=10, max_consecutive_skips=2, keep_checkpoints=2,
        method="ftw"))
    out = tmp_path / "run"
    assert main(["--quiet", "run", "--config", str(config), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "gradsift: error: no update for 2 steps in a row" in err and "Traceback" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] == "diverged" and summary["steps"] < 10
    records = read_jsonl(out / "selections.jsonl")  # strict JSON throughout
    assert records[-1]["skip_reason"] and records[-2]["skip_reason"]
    read_jsonl(out / "metrics.jsonl")
    latest = ckpt.latest_checkpoint(out / "checkpoints")
    assert ckpt.verify_checkpoint(latest) is None


def test_bad_device_and_unknown_model_fail_fast_in_one_line(tmp_path, data, capsys):
    """Defect 10: device, model and data files are checked before any work; the unknown
    model never reaches for the hub."""
    config = write_config(tmp_path / "c.yaml", tiny_config(data))
    out = tmp_path / "run"
    assert main(["run", "--config", str(config), "--set", "device=cuda:7", "--out",
                 str(out)]) == 2
    assert "config key 'device': cuda:7 is not available" in one_error_line(capsys)
    start = time.perf_counter()
    assert main(["run", "--config", str(config), "--set", "model=no-such-org/no-such-model",
                 "--out", str(out)]) == 2
    assert time.perf_counter() - start < 5
    line = one_error_line(capsys)
    assert "config key 'model'" in line and "huggingface-cli download" in line
    assert main(["run", "--config", str(config), "--set", f"model={tmp_path}",
                 "--out", str(out)]) == 2
    assert "has no config.json" in one_error_line(capsys)
    assert main(["run", "--config", str(config), "--set", f"stream={tmp_path}/nope.jsonl",
                 "--out", str(out)]) == 2
    assert f"config key 'stream': {tmp_path}/nope.jsonl: no such file" in one_error_line(capsys)
    assert not out.exists()  # nothing was written


def test_read_only_out_is_one_line(tmp_path, data, capsys, monkeypatch):
    """Defect 10: a folder gradsift may not write to."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make mkdir fail as it would for a user
        real_mkdir = os.mkdir

        def mkdir(path, *args, **kwargs):
            if str(path).startswith(str(ro)):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)
    config = write_config(tmp_path / "c.yaml", tiny_config(data))
    try:
        assert main(["run", "--config", str(config), "--out", str(ro / "run")]) == 2
    finally:
        ro.chmod(0o755)
    line = one_error_line(capsys)
    assert "Permission denied" in line and "choose a writable --out" in line


def test_full_disk_is_one_line_and_the_run_resumes(tmp_path, data, capsys, monkeypatch):
    """Defect 10: ENOSPC inside a checkpoint write: one line, the last checkpoint intact."""
    config = write_config(tmp_path / "c.yaml", tiny_config(data))
    out = tmp_path / "run"
    real_save, calls = ckpt.save_file, []

    def save_file(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:  # step 2's weights (step 1 wrote weights and target gradient)
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    assert main(["--quiet", "run", "--config", str(config), "--out", str(out)]) == 2
    line = one_error_line(capsys)
    assert "No space left on device" in line and f"gradsift run --resume {out}" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_000001"]
    monkeypatch.undo()
    assert main(["--quiet", "run", "--resume", str(out)]) == 0
    assert [r["step"] for r in read_jsonl(out / "selections.jsonl")] == [1, 2, 3]


def test_an_empty_stream_is_an_error(tmp_path, data, capsys):
    """Defect 11: no usable example at all exits non-zero with a message."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    config = write_config(tmp_path / "c.yaml", tiny_config(data, stream=str(empty)))
    assert main(["--quiet", "run", "--config", str(config), "--out", str(tmp_path / "r")]) == 2
    assert "the stream has no usable example (skipped: {'blank_line': 1})" in one_error_line(
        capsys)


def test_a_shortened_log_is_reported_not_padded(tmp_path, data, capsys):
    """Defect 11: resume used to pad a log shorter than the checkpoint says with NUL bytes."""
    config = write_config(tmp_path / "c.yaml", tiny_config(data, steps=2))
    out = tmp_path / "run"
    assert main(["--quiet", "run", "--config", str(config), "--out", str(out)]) == 0
    log = out / "selections.jsonl"
    shortened = log.read_bytes()[:100]
    log.write_bytes(shortened)
    assert main(["--quiet", "run", "--resume", str(out)]) == 2
    line = one_error_line(capsys)
    assert "selections.jsonl has 100 bytes" in line and "log records were lost" in line
    assert log.read_bytes() == shortened


def test_sigterm_checkpoints_like_ctrl_c(tmp_path, data):
    """Defect 11: schedulers send SIGTERM; the run stops after a whole step and checkpoints."""
    config = write_config(tmp_path / "c.yaml", tiny_config(data, steps=40, checkpoint_every=0))
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradsift.cli", "--quiet", "run", "--config", str(config),
         "--out", str(out)], stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = out / "selections.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines())):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "gradsift run --resume" in stderr
    done = len(read_jsonl(log))
    assert 1 <= done < 40
    assert (out / "checkpoints" / "latest").read_text() == f"step_{done:06d}"
    assert ckpt.verify_checkpoint(out / "checkpoints" / f"step_{done:06d}") is None


def test_a_second_signal_aborts_at_once(monkeypatch, capsys):
    """The first SIGINT/SIGTERM asks to stop after the step; a second one aborts (exit 130)."""
    import gradsift.cli
    from gradsift.recipe import stop_between_steps

    with stop_between_steps() as requested:
        assert requested() is None
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert requested() == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored

    def aborted(args, parser):
        raise KeyboardInterrupt

    monkeypatch.setattr(gradsift.cli, "_dispatch", aborted)
    assert main(["report", "x"]) == 130
    assert "aborted without a checkpoint" in capsys.readouterr().err
