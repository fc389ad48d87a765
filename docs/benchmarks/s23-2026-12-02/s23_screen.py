"""Session 23's screen (SCREEN.md): top-`k` on a denoised alignment against ftw.

Per setting: each method's primary (mean held-out target loss, steps 20-24) on the seeds
where it and ftw finished, the paired `V − ftw` and `V − topk` per seed and on the mean, and
(descriptive) the rows trained per step, the share of steps whose rows equal ftw's, and the
share of picks from the target's own source.

    python docs/benchmarks/s23-2026-12-02/s23_screen.py runs/quality-s20
"""

import json
import sys
from pathlib import Path

import numpy as np

from gradsift.bench import quality
from gradsift.bench.scenarios import SUITES, read_result

SETTINGS = {"verse": "verse", "label-noise": "arithmetic"}
FTW, TOPK = "ftw", "ftw@subset=topk"
VARIANTS = ("ftw@subset=topk@alignment=lcb", "ftw@subset=topk@alignment=posterior")
SEEDS = (30, 31, 32)


def primary(path: Path) -> float:
    return quality.primary(quality.RunResult(**read_result(path)), SUITES["steady"])


def picks(path: Path) -> list[tuple[frozenset, list[str]]]:
    """Per step: the selected ids and their sources."""
    out = []
    for line in path.read_text().splitlines():
        s = json.loads(line)
        src = dict(zip(s["candidate_ids"], s["candidate_sources"], strict=True))
        out.append((frozenset(s["selected_ids"]), [src[i] for i in s["selected_ids"]]))
    return out


def main(root: Path) -> None:
    for sc, own in SETTINGS.items():
        print(f"## {sc}")
        runs = {m: {s: root / sc / m / f"seed_{s}" for s in SEEDS
                    if (root / sc / m / f"seed_{s}" / "result.json").exists()}
                for m in (FTW, TOPK, *VARIANTS)}
        mine = [src == own for s in runs[FTW] for _, srcs in picks(
            runs[FTW][s] / "selections.jsonl") for src in srcs]
        print(f"  ftw: seeds {sorted(runs[FTW])} picks from {own} {np.mean(mine):.0%}")
        for m in (TOPK, *VARIANTS):
            seeds = sorted(set(runs[m]) & set(runs[FTW]) & set(runs[TOPK]))
            if not seeds:
                print(f"  {m}: no finished seeds")
                continue
            p = {mm: np.array([primary(runs[mm][s] / "result.json") for s in seeds])
                 for mm in (m, FTW, TOPK)}
            d_ftw, d_topk = p[m] - p[FTW], p[m] - p[TOPK]
            rows, same, own_share = [], [], []
            for s in seeds:
                mine, ref = picks(runs[m][s] / "selections.jsonl"), picks(
                    runs[FTW][s] / "selections.jsonl")
                rows += [len(a) for a, _ in mine]
                same += [a == b for (a, _), (b, _) in zip(mine, ref, strict=True)]
                own_share += [src == own for _, srcs in mine for src in srcs]
            print(f"  {m}: seeds {seeds} primary {p[m].mean():.4f} (ftw {p[FTW].mean():.4f}, "
                  f"topk {p[TOPK].mean():.4f})")
            print(f"    V − ftw  {d_ftw.mean():+.4f}  per seed "
                  + " ".join(f"{x:+.4f}" for x in d_ftw))
            print(f"    V − topk {d_topk.mean():+.4f}  per seed "
                  + " ".join(f"{x:+.4f}" for x in d_topk))
            print(f"    rows/step {np.mean(rows):.2f}  steps with ftw's rows {np.mean(same):.0%}"
                  f"  picks from {own} {np.mean(own_share):.0%}")
        print()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
