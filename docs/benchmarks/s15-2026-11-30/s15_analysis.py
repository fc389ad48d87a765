"""Session 15's analysis (PREREG.md): per scenario, each method's mean primary (mean held-out
target loss over the last 20 % of steps) over the seeds where every method finished, and the
paired differences ftw − greats, ftw − cosine, ftw − random (mean, sd, 95 % t-interval,
ftw lower / higher) over the seeds where both finished; the AUC (trapezoid mean of the
held-out curve) and, where measured, exact-match accuracy paired the same way as secondaries.

    python docs/benchmarks/s15-2026-11-30/s15_analysis.py runs/quality-s13
"""

import json
import sys
from pathlib import Path

import numpy as np
from scipy import stats

METHODS = ("ftw", "greats", "cosine", "random")
SCENARIOS = ("verse", "label-noise-1of8")
NAMES = ("primary", "AUC", "accuracy")


def metrics(path: Path) -> tuple[float, float, float]:
    run = json.loads(path.read_text())
    steps, losses = np.array(run["steps"], float), np.array(run["losses"], float)
    auc = np.trapezoid(losses, steps) / (steps[-1] - steps[0])
    accuracy = np.nan if run["accuracy"] is None else run["accuracy"]
    return float(losses[steps > 0.8 * steps[-1]].mean()), float(auc), float(accuracy)


def paired(d: np.ndarray) -> str:
    sd = d.std(ddof=1)
    half = stats.t.ppf(0.975, len(d) - 1) * sd / np.sqrt(len(d))
    return (f"{d.mean():+.4f} [{d.mean() - half:+.4f}, {d.mean() + half:+.4f}] sd {sd:.4f} "
            f"(ftw lower {int((d < 0).sum())} / higher {int((d > 0).sum())})")


def main(out: Path) -> None:
    for scenario in SCENARIOS:
        runs = {m: {int(p.parent.name.split("_")[1]): metrics(p)
                    for p in (out / scenario / m).glob("seed_*/result.json")} for m in METHODS}
        have = [m for m in METHODS if runs[m]]
        if "ftw" not in have:
            continue
        every = sorted(set.intersection(*(set(runs[m]) for m in have)))
        print(f"## {scenario}: seeds finished " + ", ".join(
            f"{m} {len(runs[m])}" for m in METHODS))
        if len(every) >= 2:
            print(f"  means over the {len(every)} seeds every method finished {every}:")
            for m in have:
                vals = np.array([runs[m][s] for s in every])
                print(f"  {m:7s} " + "  ".join(f"{n} {v:.4f}" for n, v in
                                                zip(NAMES, vals.mean(0), strict=True)
                                                if np.isfinite(v)))
        for other in have[1:]:
            seeds = sorted(set(runs["ftw"]) & set(runs[other]))
            if len(seeds) < 2:
                continue
            for i, name in enumerate(NAMES):
                d = np.array([runs["ftw"][s][i] - runs[other][s][i] for s in seeds])
                if np.isfinite(d).all():
                    print(f"  ftw − {other:6s} {name:8s} {paired(d)}  ({len(seeds)} seeds)")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
