"""The online step: weighted update from the candidate pass, micro-batching, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from reference import ListStream, make_examples, tiny_llama

from gradsift.config import load_config, save_config
from gradsift.engine import EngineConfig, OnlineTrainer
from gradsift.recipe import resume_run, run_config, setup


def _trainer(tmp_path: Path, method_opts: dict | None = None, micro: int | None = None,
             name: str = "run") -> OnlineTrainer:
    from gradsift.select import get_selector

    model = tiny_llama(tie=False)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                             lora_dropout=0.0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    config = EngineConfig(candidates_per_step=6, budget_per_step=2, micro_batch_size=micro,
                          target_batch_size=3, eval_size=2, eval_every=1, checkpoint_every=0,
                          max_grad_norm=None)
    return OnlineTrainer(model, optimizer, get_selector("ftw", **(method_opts or {})),
                         ListStream(make_examples(30, seed=1)), make_examples(8, seed=2),
                         config, tmp_path / name, seed=0)


def test_micro_batching_selects_and_updates_like_one_batch(tmp_path):
    one = _trainer(tmp_path, name="one")
    chunked = _trainer(tmp_path, micro=4, name="chunked")
    rec_one, rec_chunked = one.step(), chunked.step()
    assert rec_one["selected_ids"] == rec_chunked["selected_ids"]
    assert rec_one["weights"] == pytest.approx(rec_chunked["weights"], abs=1e-5)
    for (n, p), (_, q) in zip(one.params.items(), chunked.params.items(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), n


def test_held_out_losses_per_example_match_one_forward_each(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.step()
    mean, each = trainer.evaluate_examples()
    assert len(each) == len(trainer.eval_set) == 2
    trainer.model.eval()
    with torch.no_grad():  # each example alone: the model's own mean token cross-entropy
        hand = [float(trainer.model(input_ids=torch.tensor([e.input_ids]),
                                    labels=torch.tensor([e.labels])).loss)
                for e in trainer.eval_set]
    assert each == pytest.approx(hand, rel=1e-5)
    assert mean == pytest.approx(sum(hand) / 2, rel=1e-5) and mean == trainer.evaluate()


def test_every_candidate_filtered_means_no_update_and_the_run_goes_on(tmp_path):
    trainer = _trainer(tmp_path, method_opts={"min_cosine": 0.999})
    before = {n: p.detach().clone() for n, p in trainer.params.items()}
    for _ in range(2):
        record = trainer.step()
        assert record["selected_ids"] == [] and record["weights"] == []
        assert "note" in record["diagnostics"]
    assert trainer.state.skipped_updates == 2 and trainer.state.step == 2
    assert trainer.state.trained_samples == 0
    for n, p in trainer.params.items():
        assert torch.equal(p, before[n])
    lines = (tmp_path / "run" / "selections.jsonl").read_text().splitlines()
    assert len(lines) == 2


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def stream_files(tmp_path):
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    stream = [{"prompt": f"Say {words[i % 8]} {i}", "response": f"{words[(i * 3) % 8]} {i * 7}",
               "source": f"src{i % 3}"} for i in range(80)]
    target = [{"text": f"{words[i % 8]} and {words[(i + 1) % 8]} number {i}"} for i in range(12)]
    return _write_jsonl(tmp_path / "stream.jsonl", stream), _write_jsonl(
        tmp_path / "target.jsonl", target)


def _selection_rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r in rows:
        r.pop("timing")
        r["diagnostics"].pop("seconds", None)
    return rows


def test_exact_resume_matches_uninterrupted_run(tmp_path, stream_files):
    stream, target = stream_files
    overrides = [f"stream={stream}", f"target={target}", "model=tiny", "steps=6",
                 "engine.candidates_per_step=5", "engine.budget_per_step=2",
                 "engine.target_batch_size=4", "engine.eval_size=4", "engine.eval_every=2",
                 "engine.checkpoint_every=3", "max_length=32",
                 "lora.r=4", "lora.dropout=0.1", "lr=0.01", "scheduler=linear"]
    config = load_config(None, overrides)
    full = run_config(config, tmp_path / "full", quiet=True)

    # interrupted run: 3 steps (checkpoint at 3), one more step that is lost, then resume
    run = setup(config, tmp_path / "cut")
    (tmp_path / "cut" / "config.yaml").write_text((tmp_path / "full" / "config.yaml").read_text())
    run.trainer.log_initial_eval()
    for _ in range(4):
        run.trainer.step()
    del run
    resumed = resume_run(tmp_path / "cut", quiet=True)

    assert _selection_rows(tmp_path / "full" / "selections.jsonl") == _selection_rows(
        tmp_path / "cut" / "selections.jsonl")
    assert resumed["final_target_loss"] == pytest.approx(full["final_target_loss"], abs=1e-6)
    assert resumed["trained_tokens"] == full["trained_tokens"]
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "full" / "checkpoints" / "step_000006" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoints" / "step_000006" / "trainable.safetensors"))
    assert a.keys() == b.keys()
    for n in a:
        assert torch.allclose(a[n], b[n], atol=1e-6), n
    metrics = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(7))
    # each held-out example's loss at every evaluation, written once per step though step 4's
    # evaluation was written twice (before the cut and after the resume)
    full_each, cut_each = (_records(tmp_path / name / "eval_losses.jsonl")
                           for name in ("full", "cut"))
    assert [r["step"] for r in cut_each] == [r["step"] for r in full_each] == [0, 2, 4, 6]
    target_rows = [json.loads(x) for x in target.read_text().splitlines()][:4]
    for a, b in zip(full_each, cut_each, strict=True):
        assert a["ids"] == b["ids"] and len(a["ids"]) == len(target_rows) == 4
        assert a["losses"] == pytest.approx(b["losses"], abs=1e-5)
    evals = {m["step"]: m["target_loss"] for m in metrics if "target_loss" in m}
    for r in cut_each:  # the per-example losses average to the logged held-out loss
        assert sum(r["losses"]) / 4 == pytest.approx(evals[r["step"]], abs=1e-5)


def _records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_resume_from_a_checkpoint_older_than_the_per_example_log(tmp_path, stream_files,
                                                                 monkeypatch):
    """A checkpoint written before ``eval_losses.jsonl`` existed has no size for it: the
    resume keeps that log's records up to the checkpoint's step, by their step numbers."""
    import gradsift.engine

    stream, target = stream_files
    config = load_config(None, [f"stream={stream}", f"target={target}", "model=tiny",
                                "steps=4", "engine.candidates_per_step=4",
                                "engine.budget_per_step=2", "engine.target_batch_size=4",
                                "engine.eval_size=4", "engine.eval_every=1",
                                "engine.checkpoint_every=2", "max_length=32", "lora.r=2"])
    run = setup(config, tmp_path / "run")
    save_config(config, tmp_path / "run" / "config.yaml")
    monkeypatch.setattr(gradsift.engine, "LOGS", ("selections.jsonl", "metrics.jsonl"))
    run.trainer.log_initial_eval()
    for _ in range(3):
        run.trainer.step()
    del run
    monkeypatch.undo()
    offsets = json.loads((tmp_path / "run/checkpoints/step_000002/state.json").read_text())
    assert "eval_losses.jsonl" not in json.dumps(offsets)  # as an older version wrote it
    assert [r["step"] for r in _records(tmp_path / "run" / "eval_losses.jsonl")] == [0, 1, 2, 3]
    resume_run(tmp_path / "run", quiet=True)
    assert [r["step"] for r in _records(tmp_path / "run" / "eval_losses.jsonl")] == [
        0, 1, 2, 3, 4]
    assert [m["step"] for m in _records(tmp_path / "run" / "metrics.jsonl")] == [0, 1, 2, 3, 4]
