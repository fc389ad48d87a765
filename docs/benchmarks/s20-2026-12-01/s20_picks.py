"""Session 20, descriptive: what the top-`k` subset trains on against ftw's greedy subset, in
the five settings of this session's folder. Per step: each pick's gradient norm in Adam's
metric relative to the median candidate's (`√K_ii ∝ b_i / cos_i`, both logged), whether it
comes from the target's source (and, in label noise, whether it is a wrong answer), averaged
over the picks of each third of the run; and the share of the `k` rows both methods picked
from the same candidates at the same step (the candidates are the same, the models are not).

    python docs/benchmarks/s20-2026-12-01/s20_picks.py runs/quality-s20
"""

import json
import sys
from pathlib import Path

import numpy as np

METHODS = ("ftw", "ftw@subset=topk")
TARGET_SOURCE = {"label-noise": "arithmetic", "code": "code", "verse": "verse",
                 "unseen-definition": "definition", "unseen-aphorism": "aphorism"}


def steps(path: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, path.open())}


def pick_rows(r: dict, source: str, wrong: dict[str, bool]) -> list[tuple[float, float, float]]:
    """(relative norm, from the target's source, wrong answer) of each pick of one step."""
    b = np.array(r["scores"], float)
    cos = np.array([np.nan if c is None else c for c in r["diagnostics"]["cosines"]])
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = b / cos
    ok = np.isfinite(norm) & (norm > 0)
    med = np.median(norm[ok])
    ids = r["candidate_ids"]
    out = []
    for x in r["selected_ids"]:
        i = ids.index(x)
        out.append((norm[i] / med, float(r["candidate_sources"][i] == source),
                    float(wrong.get(x, False))))
    return out


def main(folder: Path) -> None:
    for name, source in TARGET_SOURCE.items():
        sc = folder / name
        wrong = {}
        if (sc / "data" / "stream.jsonl").exists():
            wrong = {r["id"]: r.get("wrong_answer", False)
                     for r in map(json.loads, (sc / "data" / "stream.jsonl").open())}
        seeds = sorted(int(p.name.split("_")[1]) for p in (sc / METHODS[0]).glob("seed_*")
                       if (p / "result.json").exists()
                       and (sc / METHODS[1] / p.name / "result.json").exists())
        print(f"## {name} (target source {source}), seeds {seeds}")
        runs = {m: {s: steps(sc / m / f"seed_{s}" / "selections.jsonl") for s in seeds}
                for m in METHODS}
        for m in METHODS:
            thirds: dict[int, list] = {0: [], 1: [], 2: []}
            for s in seeds:
                last = max(runs[m][s])
                for t, r in runs[m][s].items():
                    thirds[min(2, 3 * (t - 1) // last)] += pick_rows(r, source, wrong)
            cells = []
            for vals in thirds.values():
                a = np.array(vals)
                cell = f"norm {a[:, 0].mean():.2f}, target source {100 * a[:, 1].mean():3.0f} %"
                if name == "label-noise":
                    cell += f", wrong {100 * a[:, 2].mean():2.0f} %"
                cells.append(cell)
            print(f"  {m:16s} " + " | ".join(cells))
        same = [len(set(runs[METHODS[0]][s][t]["selected_ids"])
                    & set(runs[METHODS[1]][s][t]["selected_ids"]))
                / max(1, len(runs[METHODS[1]][s][t]["selected_ids"]))
                for s in seeds for t in runs[METHODS[0]][s] if t in runs[METHODS[1]][s]]
        print(f"  rows in common at the same step: {100 * np.mean(same):.0f} %\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
