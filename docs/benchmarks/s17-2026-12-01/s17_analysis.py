"""Session 17's analysis (PREREG.md): `steady` on the two targets the suite never used.

Per target (scenario ``unseen-definition``, ``unseen-aphorism``): each method's mean primary
(mean held-out target loss over the last 20 % of steps) over the seeds where ftw, greats,
cosine and random all finished; `ftw − X` paired over those seeds (mean, sd, 95 % t-interval,
ftw lower / higher); AUC paired the same way as a secondary; then bar 1 in both readings
(a: ftw's mean the lowest; b: no `ftw − X` interval wholly above 0) and bar 2 (`ftw − greats`
and `ftw − random` both wholly below 0). A target counts only with at least MIN_SEEDS seeds.

    python docs/benchmarks/s17-2026-12-01/s17_analysis.py runs/quality-s17-unseen
"""

import json
import sys
from pathlib import Path

import numpy as np
from scipy import stats

METHODS = ("ftw", "greats", "cosine", "random")
TARGETS = ("unseen-definition", "unseen-aphorism")
NAMES = ("primary", "AUC")
MIN_SEEDS = 5


def metrics(path: Path) -> tuple[float, float]:
    run = json.loads(path.read_text())
    steps, losses = np.array(run["steps"], float), np.array(run["losses"], float)
    auc = np.trapezoid(losses, steps) / (steps[-1] - steps[0])
    return float(losses[steps > 0.8 * steps[-1]].mean()), float(auc)


def interval(d: np.ndarray) -> tuple[float, float, float, float]:
    """Mean, sd and the 95 % t-interval of paired differences."""
    sd = d.std(ddof=1)
    half = stats.t.ppf(0.975, len(d) - 1) * sd / np.sqrt(len(d))
    return float(d.mean()), float(sd), float(d.mean() - half), float(d.mean() + half)


def show(d: np.ndarray) -> str:
    mean, sd, lo, hi = interval(d)
    return (f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}] sd {sd:.4f} "
            f"(ftw lower {int((d < 0).sum())} / higher {int((d > 0).sum())})")


def main(out: Path) -> None:
    for target in TARGETS:
        runs = {m: {int(p.parent.name.split("_")[1]): metrics(p)
                    for p in (out / target / m).glob("seed_*/result.json")}
                for m in METHODS}
        print(f"## {target}: seeds finished " + ", ".join(f"{m} {len(runs[m])}" for m in METHODS))
        every = sorted(set.intersection(*(set(runs[m]) for m in METHODS)))
        print(f"  seeds every method finished: {every}")
        if len(every) < MIN_SEEDS:
            print(f"  fewer than {MIN_SEEDS}: the target is not counted\n")
            continue
        means = {m: float(np.mean([runs[m][s][0] for s in every])) for m in METHODS}
        for m in METHODS:
            aucs = np.mean([runs[m][s][1] for s in every])
            print(f"    {m:8s} primary {means[m]:.4f}  AUC {aucs:.4f}")
        above, his = [], {}
        for other in METHODS[1:]:
            for i, name in enumerate(NAMES):
                d = np.array([runs["ftw"][s][i] - runs[other][s][i] for s in every])
                print(f"  ftw − {other:8s} {name:8s} {show(d)}")
            d = np.array([runs["ftw"][s][0] - runs[other][s][0] for s in every])
            _, _, lo, hi = interval(d)
            his[other] = hi
            if lo > 0:
                above.append(other)
        best = min(means, key=means.get)
        gap = means["ftw"] - min(v for m, v in means.items() if m != "ftw")
        verdict = "holds" if best == "ftw" else f"not met ({best} lowest)"
        print(f"  bar 1 (a, lowest mean): {verdict}; ftw − best other {gap:+.4f}")
        verdict = "holds" if not above else "not met: ftw − X above 0 for " + ", ".join(above)
        print(f"  bar 1 (b, ties allowed): {verdict}")
        verdict = "holds" if max(his["greats"], his["random"]) < 0 else "not met"
        print(f"  bar 2 (ftw − greats and ftw − random below 0): {verdict} (upper ends: greats "
              f"{his['greats']:+.4f}, random {his['random']:+.4f})\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
