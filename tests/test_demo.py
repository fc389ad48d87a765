"""The demo: its label-noise summary on hand-written logs, its config, its restart."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from runfiles import one_thread, selections, write_data

import gradsift.sources
from gradsift.config import load_config
from gradsift.demo import DEMO_CONFIG, label_noise_shares, run_demo

__all__ = ["one_thread"]  # a fixture


def test_label_noise_shares_by_hand(tmp_path):
    stream = tmp_path / "stream.jsonl"
    rows = [{"id": "a1", "source": "arithmetic", "wrong_answer": True},
            {"id": "a2", "source": "arithmetic", "wrong_answer": False},
            {"id": "a3", "source": "arithmetic", "wrong_answer": False},
            {"id": "v1", "source": "verse"}]
    stream.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for method, selected in (("ftw", ["a2", "v1"]), ("random", ["a1", "a3"])):
        run = tmp_path / "cmp" / method / "seed_0"
        run.mkdir(parents=True)
        step = {"candidate_ids": ["a1", "a2", "a3", "v1"], "selected_ids": selected}
        (run / "selections.jsonl").write_text(json.dumps(step) + "\n")
    shares = label_noise_shares(tmp_path / "cmp", stream)
    assert shares["stream"] == pytest.approx(1 / 3)  # 2 runs x (1 wrong of 3 arithmetic)
    assert shares["selected"] == {"ftw": 0.0, "random": 0.5}


def test_demo_config_is_valid():
    config = load_config(DEMO_CONFIG)
    assert config.model == "smollm2-135m"
    assert config.engine.budget_per_step < config.engine.candidates_per_step


@pytest.mark.usefixtures("one_thread")
def test_demo_restarts_after_an_interruption(tmp_path, monkeypatch):
    """Issue 9, defect 1: the demo's runs resume from their saved config.yaml (relative --out)."""
    def small_build(target, out, **kwargs):
        write_data(Path(out))
        rows = [json.loads(x) for x in (Path(out) / "stream.jsonl").read_text().splitlines()]
        for i, row in enumerate(rows):
            row.update(id=f"s{i}", wrong_answer=i % 4 == 0)
        (Path(out) / "stream.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (Path(out) / "manifest.json").write_text("{}")

    monkeypatch.setattr(gradsift.sources, "build_stream", small_build)
    monkeypatch.chdir(tmp_path)
    overrides = ["model=tiny", "lora.r=2", "lora.target_modules=q_proj", "steps=2",
                 "engine.candidates_per_step=4", "max_length=32", "engine.target_batch_size=4",
                 "engine.eval_size=4", "engine.eval_every=2", "engine.checkpoint_every=1"]
    run_demo("runs/demo", overrides, quiet=True)
    greats = tmp_path / "runs" / "demo" / "greats" / "seed_0"
    first = selections(greats)
    (greats / "summary.json").unlink()  # Ctrl-C during greats' second step
    shutil.rmtree(greats / "checkpoints" / "step_000002")
    (greats / "checkpoints" / "latest").write_text("step_000001")
    summary = run_demo("runs/demo", overrides, quiet=True)
    assert selections(greats) == first
    assert set(summary["methods"]) == {"ftw", "random", "greats"}
