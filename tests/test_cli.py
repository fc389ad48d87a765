"""The gradsift command end to end, with ``model: tiny`` on a small built stream."""

from __future__ import annotations

import base64
import json
import re

import pytest
import torch
import yaml
from runfiles import nest_engine

from gradsift.cli import main
from gradsift.config import load_config
from gradsift.sources import build_stream

SELECTION_FIELDS = {"step", "candidate_ids", "selected_ids", "weights", "scores", "losses",
                    "rho", "timing"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    build_stream("arithmetic", out, seed=0, n_stream=200, n_target=24,
                 sources=["code", "verse", "arithmetic"])
    return out


def write_config(path, data_dir, **extra):
    cfg = {"model": "tiny", "lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
           "stream": str(data_dir / "stream.jsonl"), "target": str(data_dir / "target.jsonl"),
           "candidates_per_step": 4, "budget_per_step": 2, "steps": 3, "lr": 0.01,
           "max_length": 48, "target_batch_size": 4, "eval_size": 4, "eval_every": 2,
           "checkpoint_every": 2, **extra}
    path.write_text(yaml.safe_dump(nest_engine(cfg)))
    return path


def read_jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_compare_smoke_writes_runs_summary_and_report(tmp_path, data_dir, capsys):
    config = write_config(tmp_path / "cfg.yaml", data_dir)
    out = tmp_path / "cmp"
    code = main(["compare", "--config", str(config), "--methods", "ftw,random,greats",
                 "--seeds", "0,1", "--out", str(out)])
    assert code == 0
    stdout = capsys.readouterr().out
    for method in ("ftw", "random", "greats"):
        assert method in stdout  # the markdown table
        for seed in (0, 1):
            run = out / method / f"seed_{seed}"
            for name in ("config.yaml", "metrics.jsonl", "selections.jsonl", "summary.json"):
                assert (run / name).is_file(), run / name
            assert (run / "checkpoints" / "latest").is_file()
            summary = json.loads((run / "summary.json").read_text())
            assert {"final_target_loss", "trained_samples", "trained_tokens", "steps",
                    "wall_seconds", "method", "seed"} <= set(summary)
            assert summary["method"] == method and summary["seed"] == seed
            assert summary["steps"] == 3
            records = read_jsonl(run / "selections.jsonl")
            assert len(records) == 3
            for r in records:
                assert SELECTION_FIELDS <= set(r)
                assert len(r["scores"]) == len(r["losses"]) == len(r["candidate_ids"]) == 4
                assert len(r["weights"]) == len(r["selected_ids"]) <= 2
                assert set(r["timing"]) == {"capture", "target", "selection", "update"}
            metrics = read_jsonl(run / "metrics.jsonl")
            assert metrics[0]["step"] == 0 and "target_loss" in metrics[0]
            assert metrics[-1]["step"] == 3 and "target_loss" in metrics[-1]
            assert summary["final_target_loss"] == pytest.approx(metrics[-1]["target_loss"])
            each = read_jsonl(run / "eval_losses.jsonl")  # every held-out example's loss
            assert [r["step"] for r in each] == [m["step"] for m in metrics
                                                 if "target_loss" in m]
            assert len(each[-1]["losses"]) == 4  # eval_size
            assert summary["trained_samples"] == sum(len(r["selected_ids"]) for r in records)
            resolved = yaml.safe_load((run / "config.yaml").read_text())
            assert resolved["method"] == method and resolved["seed"] == seed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"ftw", "random", "greats"}
    final_pairs = [p for p in summary["paired"] if p["metric"] == "final_target_loss"]
    assert len(final_pairs) == 2 and all(
        (p["over_examples"]["n_seeds"], p["over_examples"]["n_examples"]) == (2, 4)
        for p in final_pairs)
    html = (out / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) >= 4
    assert base64.b64decode(images[0])[:8] == b"\x89PNG\r\n\x1a\n"

    # report rebuilds from logs alone
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").is_file()


def test_run_and_resume_from_the_command_line(tmp_path, data_dir):
    config = write_config(tmp_path / "cfg.yaml", data_dir, steps=4)
    out = tmp_path / "run"
    assert main(["--quiet", "run", "--config", str(config), "--out", str(out)]) == 0
    first = json.loads((out / "summary.json").read_text())
    # pretend the run stopped after its step-2 checkpoint, then resume it to the end
    (out / "checkpoints" / "latest").write_text("step_000002")
    (out / "summary.json").unlink()
    assert main(["--quiet", "run", "--resume", str(out)]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["steps"] == 4
    assert again["final_target_loss"] == pytest.approx(first["final_target_loss"], abs=1e-6)
    assert [r["step"] for r in read_jsonl(out / "selections.jsonl")] == [1, 2, 3, 4]
    # a second fresh run into the same folder is refused
    assert main(["--quiet", "run", "--config", str(config), "--out", str(out)]) == 2


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("budget_per_stepp=3", "budget_per_stepp"),
        ("steps=three", "'steps' must be an integer"),
        ("lora.rank=4", "lora.rank"),
        ("method=nope", "nope"),
        ("lr=-1", "'lr' must be > 0"),
    ],
)
def test_config_errors_name_the_key(tmp_path, data_dir, capsys, override, message):
    config = write_config(tmp_path / "cfg.yaml", data_dir)
    code = main(["--quiet", "run", "--config", str(config), "--set", override,
                 "--out", str(tmp_path / "run")])
    assert code == 2
    assert message in capsys.readouterr().err


def test_unknown_key_in_file_is_named(tmp_path, data_dir, capsys):
    config = write_config(tmp_path / "cfg.yaml", data_dir, candidate_per_step=3)
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "candidate_per_step" in err and "candidates_per_step" in err


def test_data_build_command(tmp_path):
    out = tmp_path / "built"
    assert main(["data", "build", "--target", "verse", "--out", str(out), "--n-stream", "60",
                 "--n-target", "5", "--sources", "verse,arithmetic"]) == 0
    stream = read_jsonl(out / "stream.jsonl")
    assert len(stream) == 60 and {r["source"] for r in stream} == {"verse", "arithmetic"}
    assert len(read_jsonl(out / "target.jsonl")) == 5
    assert main(["data", "build", "--target", "verse", "--out", str(out),
                 "--sources", "verse,nope"]) == 2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_full_fine_tuning_updates_every_parameter_kind(tmp_path, data_dir, dtype):
    from safetensors.torch import load_file

    from gradsift.models import load_model_and_tokenizer

    config = write_config(tmp_path / "cfg.yaml", data_dir, lora=False, dtype=dtype, steps=2,
                          checkpoint_every=2, method="random")
    out = tmp_path / "full"
    assert main(["--quiet", "run", "--config", str(config), "--out", str(out)]) == 0
    trained = load_file(str(out / "checkpoints" / "step_000002" / "trainable.safetensors"))
    initial = dict(load_model_and_tokenizer("tiny")[0].named_parameters())
    assert set(trained) == set(initial)  # every parameter is trainable
    for name in ("model.embed_tokens.weight", "model.norm.weight",
                 "model.layers.0.self_attn.q_proj.weight"):
        assert trained[name].dtype == getattr(torch, dtype)
        assert not (trained[name].float() == initial[name].float()).all(), name


def test_method_options_flat_or_per_method():
    from gradsift.recipe import method_options

    flat = load_config(None, ["method=ftw", "method_options.min_cosine=0.2"])
    assert method_options(flat) == {"min_cosine": 0.2}
    per = load_config(None, ["method=random", "method_options.ftw.min_cosine=0.2"])
    assert method_options(per) == {}
    per_ftw = load_config(None, ["method=ftw", "method_options.ftw.min_cosine=0.2"])
    assert method_options(per_ftw) == {"min_cosine": 0.2}


def test_ctrl_c_stops_after_a_whole_step_with_a_checkpoint(tmp_path, data_dir):
    import os
    import signal
    import subprocess
    import sys
    import time

    config = write_config(tmp_path / "cfg.yaml", data_dir, steps=12, checkpoint_every=100)
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradsift.cli", "--quiet", "run", "--config", str(config),
         "--out", str(out)], stderr=subprocess.PIPE, text=True)
    log = out / "selections.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(read_jsonl(log)) >= 2):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "gradsift run --resume" in stderr
    done = len(read_jsonl(log))
    assert 2 <= done < 12
    assert (out / "checkpoints" / "latest").read_text() == f"step_{done:06d}"
    assert main(["--quiet", "run", "--resume", str(out)]) == 0
    assert [r["step"] for r in read_jsonl(log)] == list(range(1, 13))


def test_shipped_configs_list_copy_and_validate(tmp_path, data_dir, capsys):
    assert main(["config", "ls"]) == 0
    listed = capsys.readouterr().out
    assert {"lora.yaml", "full.yaml", "demo.yaml"} <= {line.split()[0]
                                                      for line in listed.splitlines()}
    for name in ("lora", "full"):
        dest = tmp_path / f"{name}.yaml"
        assert main(["config", "cp", name, str(dest)]) == 0
        # as shipped, the data files do not exist next to the copy: named, exit 2
        assert main(["config", "validate", str(dest)]) == 2
        assert "data file(s) not found" in capsys.readouterr().err
        assert main(["config", "validate", str(dest), "--set",
                     f"stream={data_dir / 'stream.jsonl'}", "--set",
                     f"target={data_dir / 'target.jsonl'}"]) == 0
        assert capsys.readouterr().out.startswith(f"ok: {dest}")
        config = load_config(dest)
        assert (config.lora is None) == (name == "full")
    assert main(["config", "cp", "lora", str(tmp_path / "lora.yaml")]) == 2  # never overwrites
    assert main(["config", "cp", "nope", str(tmp_path / "x.yaml")]) == 2
    bad = write_config(tmp_path / "bad.yaml", data_dir, method_options={"min_cosine": 7})
    assert main(["config", "validate", str(bad)]) == 2
    assert "min_cosine" in capsys.readouterr().err


def test_flags_after_the_subcommand(tmp_path, data_dir, capsys):
    config = write_config(tmp_path / "cfg.yaml", data_dir, steps=1)
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "r"), "--quiet"]) == 0
    assert capsys.readouterr().out == ""
