"""Session 24 (AGREEMENT.md): ftw's logged target agreement per `steady` setting, beside the
registered `topk − ftw` (sessions 19-22, BENCHMARKS.md), and the check that logging it changed
no selection (primaries equal to this session's screen runs of ftw).

    python docs/benchmarks/s24-2026-12-02/s24_agreement.py runs/quality-s24d runs/quality-s24
"""

import json
import sys
from pathlib import Path

import numpy as np

from gradsift.bench import quality
from gradsift.bench.scenarios import SUITES, read_result

# registered topk − ftw on the primary (BENCHMARKS.md, "The top-k subset in every steady setting")
TOPK_MINUS_FTW = {"label-noise": -0.019, "label-noise-1of8": -0.010,
                  "unseen-definition": -0.007, "redundancy": +0.006, "code": +0.007,
                  "verse": +0.017, "unseen-aphorism": +0.031}
SEEDS = (30, 31)


def primary(path: Path) -> float:
    return quality.primary(quality.RunResult(**read_result(path)), SUITES["steady"])


def main(root: Path, screen: Path) -> None:
    for sc in ("label-noise", "verse", "code"):
        for s in SEEDS:
            a, b = (r / sc / "ftw" / f"seed_{s}" / "result.json" for r in (root, screen))
            if a.exists() and b.exists():
                print(f"check {sc} seed {s}: {primary(a):.6f} vs screen {primary(b):.6f}")
    print("\nsetting | topk − ftw (registered) | agreement: mean | first third | last third | "
          "per seed")
    rows = []
    for sc, diff in sorted(TOPK_MINUS_FTW.items(), key=lambda x: x[1]):
        per_seed = []
        for s in SEEDS:
            f = root / sc / "ftw" / f"seed_{s}" / "selections.jsonl"
            if f.exists():
                per_seed.append([json.loads(line)["diagnostics"]["target_agreement"]
                                 for line in f.read_text().splitlines()])
        if not per_seed:
            print(f"{sc} | {diff:+.3f} | no runs")
            continue
        a = np.array(per_seed)
        third = a.shape[1] // 3
        rows.append((diff, a.mean()))
        print(f"{sc} | {diff:+.3f} | {a.mean():.3f} | {a[:, :third].mean():.3f} | "
              f"{a[:, -third:].mean():.3f} | " + " ".join(f"{x:.3f}" for x in a.mean(axis=1)))
    if len(rows) > 2:
        d, m = (np.argsort(np.argsort(x)) for x in np.array(rows).T)  # ranks
        print(f"\nrank correlation (Spearman) of agreement with topk − ftw over {len(rows)} "
              f"settings: {np.corrcoef(d, m)[0, 1]:+.2f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
