"""Session 19, descriptive: what the top-`k` subset takes that ftw's greedy subset does not, at
label-noise-1of8 (the screen's seeds 10-14). Per step: each pick's gradient norm in Adam's
metric relative to the median candidate's (`√K_ii ∝ b_i / cos_i`, both logged), its loss
before the step, and whether it is a wrong answer; averaged over the steps of each third of
the run.

    python docs/benchmarks/s19-2026-12-01/s19_picks.py runs/quality-s18
"""

import json
import sys
from pathlib import Path

import numpy as np

METHODS = ("ftw", "ftw@subset=topk")
SEEDS = range(10, 15)


def main(folder: Path) -> None:
    sc = folder / "label-noise-1of8"
    wrong = {json.loads(line)["id"]: json.loads(line).get("wrong_answer", False)
             for line in (sc / "data" / "stream.jsonl").open()}
    for m in METHODS:
        rows: dict[int, list[tuple[float, float, float, float]]] = {0: [], 1: [], 2: []}
        for s in SEEDS:
            for line in (sc / m / f"seed_{s}" / "selections.jsonl").open():
                r = json.loads(line)
                b = np.array(r["scores"], float)
                cos = np.array([np.nan if c is None else c for c in r["diagnostics"]["cosines"]])
                with np.errstate(divide="ignore", invalid="ignore"):
                    norm = b / cos
                ok = np.isfinite(norm) & (norm > 0)
                med = np.median(norm[ok])
                ids = r["candidate_ids"]
                picks = [ids.index(x) for x in r["selected_ids"]]
                third = min(2, (r["step"] - 1) // 8)
                for i in picks:
                    rows[third].append((norm[i] / med, r["losses"][i],
                                        float(wrong.get(ids[i], False)),
                                        float(ids[i].startswith("arithmetic"))))
        for third, vals in rows.items():
            a = np.array(vals)
            print(f"{m:16s} steps {8 * third + 1:2d}-{8 * third + 8:2d}: relative norm "
                  f"{a[:, 0].mean():.2f} (median {np.median(a[:, 0]):.2f}), "
                  f"loss {a[:, 1].mean():.2f}, wrong answers {100 * a[:, 2].mean():.0f} %, "
                  f"arithmetic {100 * a[:, 3].mean():.0f} % of {len(a)} picks")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
