"""Two ranks (gloo, CPU) of ``GradSiftTrainer`` inside ``transformers.Trainer`` (DDP via
accelerate) against one process with the whole batch: same selections, same parameters
(the runs: ``conftest.py``'s ``ddp_runs``)."""

from __future__ import annotations

import json

import pytest
import torch


def test_two_rank_trainer_selects_and_trains_like_one_process(ddp_runs):
    single, double = ddp_runs[0] / "trainer", ddp_runs[1] / "trainer"

    def records(out):
        lines = (out / "run" / "selections.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    one, two = records(single), records(double)
    assert len(one) == len(two) == 3
    for a, b in zip(one, two, strict=True):
        assert a["candidate_ids"] == b["candidate_ids"]  # the global batch, ranks in order
        assert a["selected_ids"] == b["selected_ids"]
        assert a["weights"] == pytest.approx(b["weights"], abs=1e-5)
    ref = torch.load(single / "rank0.pt", weights_only=False)["params"]
    r0, r1 = (torch.load(double / f"rank{r}.pt", weights_only=False)["params"] for r in (0, 1))
    for name, p in ref.items():
        assert (p - r0[name]).abs().max() <= 1e-5, name
        assert torch.equal(r0[name], r1[name]), name  # the replicas stay identical
