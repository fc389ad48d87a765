"""Non-finite numbers in the online step: no update, strict JSON logs, a clear stop."""

from __future__ import annotations

import json
import math

import pytest
import torch
from reference import ListStream, make_examples, tiny_llama
from runfiles import read_jsonl

from gradsift.engine import EngineConfig, OnlineTrainer, TrainingDiverged
from gradsift.jsonio import dumps_line, json_safe, write_json
from gradsift.select import get_selector


def _trainer(tmp_path, method: str = "random", **config) -> OnlineTrainer:
    model = tiny_llama(tie=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cfg = EngineConfig(candidates_per_step=4, budget_per_step=2, target_batch_size=3,
                       eval_size=2, eval_every=1, checkpoint_every=1, max_grad_norm=None,
                       **config)
    return OnlineTrainer(model, optimizer, get_selector(method),
                         ListStream(make_examples(40, seed=1)), make_examples(8, seed=2), cfg,
                         tmp_path / "run")


def test_non_finite_losses_make_no_update_log_null_and_stop(tmp_path):
    """Defect 9: a NaN in the model → every loss NaN; no update, no checkpoint of it, logs in
    strict JSON with null and a reason, and a stop after max_consecutive_skips."""
    trainer = _trainer(tmp_path, max_consecutive_skips=3)
    trainer.step()  # one good step, checkpointed
    with torch.no_grad():
        trainer.model.model.norm.weight[0] = float("nan")
    before = {n: p.detach().clone() for n, p in trainer.params.items()}
    for _ in range(2):
        record = trainer.step()
        assert record["selected_ids"] and record["skip_reason"] == "non-finite loss"
    with pytest.raises(TrainingDiverged, match=r"no update for 3 steps in a row \(steps 2-4, "
                                               r"last: non-finite loss\); the last checkpoint "
                                               r"is step 1\. Lower lr"):
        trainer.step()
    for n, p in trainer.params.items():  # skipped updates leave the parameters alone
        assert torch.equal(p, before[n]) or torch.isnan(before[n]).any(), n
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "latest", "step_000001"]
    records = read_jsonl(tmp_path / "run" / "selections.jsonl")  # no bare NaN anywhere
    assert records[1]["losses"] == [None] * 4 and "losses" in records[1]["nonfinite"]
    assert records[0]["skip_reason"] is None
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert metrics[-1]["target_loss"] is None and "target_loss" in metrics[-1]["nonfinite"]
    assert trainer.state.skipped_updates == 3 and trainer.state.consecutive_skips == 3


def test_parameters_that_turn_non_finite_stop_at_once(tmp_path):
    trainer = _trainer(tmp_path)
    real_step, first = trainer.optimizer.step, next(iter(trainer.params.values()))

    def overflowing_step(*args, **kwargs):  # e.g. an AdamW update that overflows float16
        out = real_step(*args, **kwargs)
        with torch.no_grad():
            first.view(-1)[0] = float("inf")
        return out

    trainer.optimizer.step = overflowing_step
    with pytest.raises(TrainingDiverged, match="step 1: the parameters became non-finite"):
        trainer.step()
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert trainer.save_checkpoint() is None  # never a checkpoint of non-finite parameters


def test_json_safe_replaces_every_non_finite_number(tmp_path):
    record = {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -math.inf},
              "e": torch.tensor(float("nan")), "f": 2, "g": "NaN"}
    line = dumps_line(record)
    assert "NaN" not in line.replace('"NaN"', "") and "Infinity" not in line
    back = json.loads(line)
    assert back == {"a": None, "b": [1.0, None], "c": {"d": None}, "e": None, "f": 2,
                    "g": "NaN", "nonfinite": ["a", "b", "c", "e"]}
    assert json_safe([float("nan")]) == [None]
    write_json(tmp_path / "s.json", {"final_target_loss": float("nan")})
    assert json.loads((tmp_path / "s.json").read_text()) == {
        "final_target_loss": None, "nonfinite": ["final_target_loss"]}
