"""Descriptive, after the fact (not registered): can a gradient-alignment selector tell a
wrong arithmetic answer from a right one? For every candidate ftw scored in session 13's
`steady` label-noise runs, its logged cosine with the target gradient in Adam's metric,
b_i / sqrt(K_ii ĝᵀPĝ), split by correct / wrong answer (the stream's `wrong_answer` flag), per
phase of the run; P(correct > wrong) is the probability that a random correct record's cosine
exceeds a random wrong one's (0.5: indistinguishable).

    python docs/benchmarks/s14-2026-11-30/s14_wrong_answers.py runs/quality-s13
"""

import json
import sys
from pathlib import Path

import numpy as np

PHASES = ((1, 4), (5, 12), (13, 24), (1, 24))


def main(out: Path) -> None:
    folder = out / "label-noise"
    wrong = {}
    for path in (folder / "data").glob("stream*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            wrong[record["id"]] = bool(record.get("wrong_answer"))
    states = [json.loads(line) for path in sorted((folder / "ftw").glob("seed_*/selections.jsonl"))
              for line in path.read_text().splitlines()]
    print(f"{len(states)} states of ftw, {len({s['step'] for s in states})} steps")
    for lo, hi in PHASES:
        right, bad, other = [], [], []
        for state in states:
            if not lo <= state["step"] <= hi:
                continue
            for i, source, cos in zip(state["candidate_ids"], state["candidate_sources"],
                                      state["diagnostics"]["cosines"], strict=True):
                if cos is not None:
                    (other if source != "arithmetic" else bad if wrong[i] else right).append(cos)
        a, b = np.array(right), np.array(bad)
        print(f"steps {lo:2d}-{hi:2d}: cosine correct {a.mean():.3f} (n {a.size}), wrong "
              f"{b.mean():.3f} (n {b.size}), code and verse {np.mean(other):.3f} (n {len(other)}); "
              f"P(correct > wrong) {(a[:, None] > b[None, :]).mean():.3f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
