"""Two ranks (gloo, CPU) of ``OnlineTrainer`` against one process on the concatenated batch.

Each rank is a real process started like ``torchrun`` does (``launch.py``, a free port); a
failing rank takes the others down, and nothing is left running. The runs the tests compare
share two launches (``conftest.py``'s ``ddp_runs``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from launch import launch, logs


def _load(out: Path, rank: int = 0) -> dict:
    return torch.load(out / f"rank{rank}.pt", weights_only=False)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "run" / "selections.jsonl").read_text()
            .splitlines()]


@pytest.fixture(scope="module")
def lora_runs(ddp_runs) -> tuple[Path, Path]:
    one, two = ddp_runs
    return one / "lora", two / "lora"


def test_two_ranks_select_and_train_like_one_process(lora_runs):
    single, double = lora_runs
    one, r0, r1 = _load(single), _load(double, 0), _load(double, 1)
    assert len(one["records"]) == len(r0["records"]) == 3
    for a, b in zip(one["records"], r0["records"], strict=True):
        assert a["candidate_ids"] == b["candidate_ids"]
        assert a["selected_ids"] == b["selected_ids"]
        assert a["weights"] == pytest.approx(b["weights"], abs=1e-5)
        assert sum(b["weights"]) == pytest.approx(1.0, abs=1e-6)
    for name, p in one["params"].items():
        assert (p - r0["params"][name]).abs().max() <= 1e-5, name
        assert torch.equal(r0["params"][name], r1["params"][name]), name  # replicas identical
    # rank 0 alone wrote the log, naming the global candidates
    assert [r["selected_ids"] for r in _records(double)] == [
        r["selected_ids"] for r in one["records"]]


def test_ranks_read_disjoint_slices_whose_union_is_the_stream_prefix(lora_runs):
    _, double = lora_runs
    r0, r1 = _load(double, 0)["captured"], _load(double, 1)["captured"]
    seen = [i for a, b in zip(r0, r1, strict=True) for i in a + b]
    assert len(seen) == len(set(seen)) == 24  # 3 steps of B = 8, no duplicates
    assert seen == [f"ex1-{i}" for i in range(24)]  # the stream's prefix, in order
    assert all(len(a) == len(b) == 4 for a, b in zip(r0, r1, strict=True))


def test_a_killed_rank_leaves_nothing_behind_and_the_run_resumes(tmp_path, lora_runs):
    single, _ = lora_runs
    out = tmp_path / "killed"
    codes = launch("online", out, 2, "ckpt=1", "die_at=2", "die_rank=1")
    assert codes[1] == 3 and codes[0] != 0, logs(out)  # rank 0 was stopped, not left waiting
    assert launch("online", out, 2, "ckpt=1", "resume=1") == [0, 0], logs(out)
    steps = [r["step"] for r in _records(out)]
    assert steps == [1, 2, 3]  # no gap, no duplicate
    assert [r["selected_ids"] for r in _records(out)] == [
        r["selected_ids"] for r in _load(single)["records"]]


@pytest.mark.parametrize("mode", ["sketch", "local", "loss"])
def test_sketch_local_scope_and_loss_only_keep_the_replicas_identical(ddp_runs, mode):
    """``method=loss`` reads no gradients: only the losses are exchanged."""
    out = ddp_runs[1] / mode
    r0, r1 = _load(out, 0), _load(out, 1)
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name
    for record, first, second in zip(_records(out), r0["captured"], r1["captured"],
                                     strict=True):
        assert record["candidate_ids"] == first + second
        assert 0 < len(record["selected_ids"]) <= 3
        assert sum(record["weights"]) == pytest.approx(1.0, abs=1e-6)
        assert record["diagnostics"]["distributed"]["ranks"] == 2
        if mode == "loss":
            lora = sum(p.numel() for p in r0["params"].values())
            # 4 losses, then the one all-reduce of the gradients: no gradient is exchanged
            assert record["diagnostics"]["distributed"]["bytes_sent"] == 4 * 4 + 4 * lora
        if mode == "local":  # k = 3 split 2 + 1, each rank from its own slice
            assert len(set(record["selected_ids"]) & set(first)) <= 2
            assert len(set(record["selected_ids"]) & set(second)) <= 1


def test_a_short_last_batch_leaves_a_rank_without_candidates(ddp_runs):
    """17 records, B = 8: the third global batch has one record, rank 1 captures nothing
    (exchange: exact; sketch's replicas: the test above)."""
    out = ddp_runs[1] / "ragged"
    r0, r1 = _load(out, 0), _load(out, 1)
    assert r1["captured"][-1] == [] and r0["captured"][-1] == ["ex1-16"]
    assert _records(out)[-1]["candidate_ids"] == ["ex1-16"]
    assert len(_records(out)) == 3
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name
    one = _load(ddp_runs[0] / "ragged")
    assert [r["selected_ids"] for r in one["records"]] == [
        r["selected_ids"] for r in r0["records"]]
    for name, p in one["params"].items():
        assert (p - r0["params"][name]).abs().max() <= 1e-5, name


def test_selectors_without_gradients_train_on_their_k_like_one_process(ddp_runs):
    """``random`` reads only indices: no rank captures anything, each runs forward+backward
    over its own chosen rows, then one all-reduce (``loss`` takes the same path after a
    no-grad forward: its replicas are checked above). Full fine-tuning, and a last global
    batch of one record that leaves rank 1 without candidates."""
    one = _load(ddp_runs[0] / "random")
    r0, r1 = _load(ddp_runs[1] / "random", 0), _load(ddp_runs[1] / "random", 1)
    assert r1["captured"][-1] == []
    for a, b in zip(one["records"], r0["records"], strict=True):
        assert a["selected_ids"] == b["selected_ids"]
        assert a["weights"] == pytest.approx(b["weights"], abs=1e-6)
        assert len(a["losses"]) == len(b["losses"]) == len(a["candidate_ids"])
        torch.testing.assert_close(torch.tensor(a["losses"]), torch.tensor(b["losses"]),
                                   atol=1e-5, rtol=0, equal_nan=True)
        chosen = [a["candidate_ids"].index(i) for i in a["selected_ids"]]
        unknown = {i for i, v in enumerate(b["losses"]) if v != v}  # NaN: never computed
        assert chosen and not unknown & set(chosen)  # the trained rows' losses are known
        assert len(unknown) == len(a["candidate_ids"]) - len(chosen)
    for name, p in one["params"].items():
        assert (p - r0["params"][name]).abs().max() <= 1e-5, name
        assert torch.equal(r0["params"][name], r1["params"][name]), name
