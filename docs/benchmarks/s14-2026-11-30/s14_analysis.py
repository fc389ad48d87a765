"""Session 14's analysis (PREREG.md): per scenario and seed group, each method's mean primary
(mean held-out target loss over the last 20 % of steps) and the paired differences
ftw − greats and ftw − cosine (mean, sd, 95 % t-interval, ftw lower / higher) over the seeds
where all three finished; the AUC (trapezoid mean of the held-out curve) paired the same way
as the secondary.

    python docs/benchmarks/s14-2026-11-30/s14_analysis.py runs/quality-s13
"""

import json
import sys
from pathlib import Path

import numpy as np
from scipy import stats

METHODS = ("ftw", "greats", "cosine")
GROUPS = {"redundancy": {"seeds 0-19 (decision)": range(20), "seeds 10-19 (replication)":
                         range(10, 20), "seeds 0-9 (session 13)": range(10)},
          "code": {"all finished seeds": range(100)}}


def metrics(path: Path) -> tuple[float, float]:
    run = json.loads(path.read_text())
    steps, losses = np.array(run["steps"], float), np.array(run["losses"], float)
    auc = np.trapezoid(losses, steps) / (steps[-1] - steps[0])
    return float(losses[steps > 0.8 * steps[-1]].mean()), float(auc)


def paired(d: np.ndarray) -> str:
    sd = d.std(ddof=1)
    half = stats.t.ppf(0.975, len(d) - 1) * sd / np.sqrt(len(d))
    return (f"{d.mean():+.4f} [{d.mean() - half:+.4f}, {d.mean() + half:+.4f}] sd {sd:.4f} "
            f"(ftw lower {int((d < 0).sum())} / higher {int((d > 0).sum())})")


def main(out: Path) -> None:
    for scenario, groups in GROUPS.items():
        runs = {m: {int(p.parent.name.split("_")[1]): metrics(p)
                    for p in (out / scenario / m).glob("seed_*/result.json")} for m in METHODS}
        done = set.intersection(*(set(r) for r in runs.values()))
        for group, wanted in groups.items():
            seeds = sorted(done & set(wanted))
            if len(seeds) < 2:
                continue
            print(f"## {scenario}, {group}: {len(seeds)} seeds {seeds}")
            for m in METHODS:
                print(f"  {m:7s} primary {np.mean([runs[m][s][0] for s in seeds]):.4f}  "
                      f"AUC {np.mean([runs[m][s][1] for s in seeds]):.4f}")
            for other in METHODS[1:]:
                for i, name in ((0, "primary"), (1, "AUC")):
                    d = np.array([runs["ftw"][s][i] - runs[other][s][i] for s in seeds])
                    print(f"  ftw − {other:6s} {name:7s} {paired(d)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
