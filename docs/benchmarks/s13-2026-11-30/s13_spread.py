"""Session 13's analysis (PREREG.md): per scenario, each method's mean primary and the paired
differences ftw − greats and ftw − cosine (mean, sd, 95 % t-interval, lower counts) over the
seeds where all three finished, with the sd set against `full`'s registered one; and
(amendment 2) ftw − ftw-filter-only over the seeds both finished.

    python docs/benchmarks/s13-2026-11-30/s13_spread.py runs/quality-s13
"""

import json
import sys
from pathlib import Path

import numpy as np
from scipy import stats

FULL_SD = {("redundancy", "greats"): 0.192, ("redundancy", "cosine"): 0.163,
           ("label-noise", "cosine"): 0.096}
METHODS = ("ftw", "greats", "cosine")
ABLATION = "ftw-filter-only"


def primary(path: Path) -> float:
    run = json.loads(path.read_text())
    steps, losses = np.array(run["steps"]), np.array(run["losses"])
    return float(losses[steps > 0.8 * steps[-1]].mean())


def main(out: Path) -> None:
    for folder in sorted(p for p in out.iterdir() if (p / "ftw").is_dir()):
        runs = {m: {int(p.parent.name.split("_")[1]): primary(p)
                    for p in (folder / m).glob("seed_*/result.json")} for m in METHODS}
        seeds = sorted(set.intersection(*(set(r) for r in runs.values())))
        print(f"## {folder.name}: {len(seeds)} seeds {seeds}")
        for m in METHODS:
            print(f"  {m:7s} mean primary {np.mean([runs[m][s] for s in seeds]):.4f}")
        runs[ABLATION] = {int(p.parent.name.split("_")[1]): primary(p)
                          for p in (folder / ABLATION).glob("seed_*/result.json")}
        for other in (*METHODS[1:], ABLATION):
            both = [s for s in sorted(runs["ftw"]) if s in runs[other]]
            if len(both) < 2:
                continue
            if other == ABLATION:
                print(f"  {other} mean primary {np.mean([runs[other][s] for s in both]):.4f} "
                      f"(ftw {np.mean([runs['ftw'][s] for s in both]):.4f}) on seeds {both}")
            d = np.array([runs["ftw"][s] - runs[other][s] for s in both])
            sd = d.std(ddof=1)
            half = stats.t.ppf(0.975, len(d) - 1) * sd / np.sqrt(len(d))
            full = FULL_SD.get((folder.name, other))
            print(f"  ftw − {other:6s} {d.mean():+.4f} [{d.mean() - half:+.4f}, "
                  f"{d.mean() + half:+.4f}] sd {sd:.4f} lower {int((d < 0).sum())}/{len(d)}"
                  + (f"; full's sd {full:.3f}, ratio {sd / full:.2f}" if full else ""))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
