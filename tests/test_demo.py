"""The demo's label-noise summary, on hand-written logs."""

from __future__ import annotations

import json

import pytest

from gradsift.config import load_config
from gradsift.demo import DEMO_CONFIG, label_noise_shares


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
    assert config.model == "smollm2-135m" and config.budget_per_step < config.candidates_per_step
