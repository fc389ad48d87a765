"""Every ```python block of README.md runs as written, in a fresh folder, and does what its
section says; each integration has its section and snippet."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

# integration → the heading of its README section
SECTIONS = {
    "library": "### The API: per-sample gradients, alignment, interactions, a selection",
    "online": "### `OnlineTrainer`: the online loop, framework-free",
    "transformers": "### 🤗 transformers: `GradSiftTrainer`",
    "trl": "### TRL: `GradSiftSFTTrainer`",
    "datasets": "### 🤗 datasets",
}


def python_blocks(text: str) -> list[tuple[str, int, str]]:
    """``(heading, line, code)`` of every ```python block, verbatim, under its nearest
    heading."""
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```$", text, flags=re.S | re.M):
        line = text.count("\n", 0, match.start()) + 2
        headings = re.findall(r"^#+ .*$", text[: match.start()], flags=re.M)
        blocks.append((headings[-1] if headings else "", line, match.group(1)))
    return blocks


BLOCKS = python_blocks(README)
NAMES = {heading: name for name, heading in SECTIONS.items()}


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_integration_has_its_section_and_one_snippet():
    headings = [heading for heading, _, _ in BLOCKS]
    for name, heading in SECTIONS.items():
        assert headings.count(heading) == 1, f"README: {name}: no single snippet under {heading}"
    assert set(headings) <= set(SECTIONS.values()), "a snippet outside the tested sections"


@pytest.mark.parametrize("heading,line,code", BLOCKS,
                         ids=[NAMES.get(h, f"line{n}") for h, n, _ in BLOCKS])
def test_snippet_runs_as_written(heading, line, code, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__main__"})  # noqa: S102
    out = capsys.readouterr().out.strip().splitlines()
    check = CHECKS[NAMES[heading]]
    check(tmp_path, out)


def check_library(folder: Path, out: list[str]) -> None:
    indices, weights = out[-1].split("] [")
    chosen = [int(i) for i in indices.strip("[]").split(",") if i.strip()]
    assert 1 <= len(chosen) <= 4 and all(0 <= i < 12 for i in chosen)
    assert abs(sum(float(w) for w in weights.strip("[]").split(",")) - 1) < 1e-5


def check_online(folder: Path, out: list[str]) -> None:
    logged = records(folder / "runs" / "online" / "selections.jsonl")
    assert [r["step"] for r in logged] == [1, 2, 3]
    assert out[:3] == [f"{r['step']} {r['selected_ids']} {r['weights']}" for r in logged]
    assert all(len(r["candidate_ids"]) == 8 and len(r["selected_ids"]) <= 2 for r in logged)
    assert out[3].startswith("held-out target loss: ")


def check_trainer(run: Path) -> None:
    logged = records(run / "selections.jsonl")
    assert [r["step"] for r in logged] == [1, 2, 3]
    assert all(len(r["candidate_ids"]) == 8 and 1 <= len(r["selected_ids"]) <= 2
               for r in logged)
    assert [m["step"] for m in records(run / "metrics.jsonl") if "train_loss" in m] == [1, 2, 3]


def check_datasets(folder: Path, out: list[str]) -> None:
    logged = records(folder / "runs" / "datasets" / "selections.jsonl")
    assert out[:3] == [str(r["selected_ids"]) for r in logged]
    state = json.loads(out[3].replace("'", '"'))
    assert state["index"] == 24 and "dataset" in state  # 3 steps × 8 rows, iterable's own state


CHECKS = {
    "library": check_library,
    "online": check_online,
    "transformers": lambda folder, out: check_trainer(folder / "runs" / "hf"),
    "trl": lambda folder, out: check_trainer(folder / "runs" / "sft"),
    "datasets": check_datasets,
}
