"""Session 31 (designed in BARS.md): issue 8's bars at ftw's default ``geometry: adam-next``,
at the suite's constant lr, fresh seeds 70-75.

    python docs/benchmarks/s31-2026-12-03/s31_bars.py runs/quality-s31   (or …/raw/quality-s31)
"""

import sys
from pathlib import Path

import numpy as np

from gradsift.bench import quality
from gradsift.bench.scenarios import SUITES
from gradsift.report.paired import crossed_interval, describe, describe_crossed, paired_comparison

STEADY = SUITES["steady"]
SETTINGS = {"label-noise": ("ftw", "greats", "cosine"),
            "label-noise-1of8": ("ftw", "greats", "cosine"),
            "code": ("ftw", "cosine")}


def _pair(runs: dict, a: str, b: str, seeds: list[int]) -> tuple[float, float, float]:
    """``a − b`` over ``seeds``, printed; returns the mean and the 95 % interval over seeds."""
    pa = {s: quality.primary(runs[a, s], STEADY) for s in seeds}
    pb = {s: quality.primary(runs[b, s], STEADY) for s in seeds}
    per = " ".join(f"{s}: {pa[s] - pb[s]:+.4f}" for s in seeds)
    mean = float(np.mean([pa[s] - pb[s] for s in seeds]))
    print(f"   {a} − {b}: mean {mean:+.4f}; per seed {per}")
    lo = hi = mean
    if len(seeds) >= 2:
        comparison = paired_comparison(pa, pb)
        lo, hi = comparison["lo"], comparison["hi"]
        print("     over seeds:", describe(comparison))
        d = np.stack([quality.example_primary(runs[a, s], STEADY)
                      - quality.example_primary(runs[b, s], STEADY) for s in seeds])
        print("     over seeds and held-out examples:", describe_crossed(crossed_interval(d)))
    return mean, lo, hi


def main(folder: Path) -> None:
    results = quality.load_results(folder)
    for sc, methods in SETTINGS.items():
        runs = {(r.method, r.seed): r for r in results if r.scenario == sc}
        seeds = sorted({s for _, s in runs if all((m, s) in runs for m in methods)})
        print(f"\n## {sc}: seeds {seeds} (every method of the setting finished)")
        if not seeds:
            continue
        means = {m: float(np.mean([quality.primary(runs[m, s], STEADY) for s in seeds]))
                 for m in methods}
        for m in methods:
            print(f"   mean primary, {m}: {means[m]:.4f}")
        for other in methods[1:]:
            mean, lo, hi = _pair(runs, "ftw", other, seeds)
            if other == "greats" and len(seeds) >= 2:
                side = "below" if hi < 0 else "above" if lo > 0 else "spans"
                print(f"   bar 2 (ftw − greats interval over seeds excludes zero): "
                      f"{side != 'spans'} ({side} zero)")
        if runs["ftw", seeds[0]].accuracy is not None:
            for m in methods:
                print(f"   exact match, {m}: {np.mean([runs[m, s].accuracy for s in seeds]):.1%}")
        lowest = min(means, key=means.get)
        print(f"   bar 1 (ftw's mean the lowest of {', '.join(methods)}): {lowest == 'ftw'}"
              f" (lowest: {lowest})")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
