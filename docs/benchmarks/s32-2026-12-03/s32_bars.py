"""Session 32 (designed in ONE_IN_EIGHT.md and LABEL_NOISE.md): a label-noise setting at
ftw's default ``geometry: adam-next`` on this session's fresh seeds (1of8: 76-89; label noise:
90-93), then pooled with session 31's seeds 70-75.

    python docs/benchmarks/s32-2026-12-03/s32_bars.py runs/quality-s32 [--scenario label-noise]
    (or …/raw/quality-s32; the scenario's default: label-noise-1of8)
"""

import argparse
from pathlib import Path

import numpy as np

from gradsift.bench import quality
from gradsift.bench.scenarios import SUITES
from gradsift.report.paired import crossed_interval, describe, describe_crossed, paired_comparison

STEADY = SUITES["steady"]
S31 = Path(__file__).resolve().parents[1] / "s31-2026-12-03" / "raw" / "quality-s31"


def _runs(folder: Path, setting: str) -> dict:
    return {(r.method, r.seed): r for r in quality.load_results(folder) if r.scenario == setting}


def _read(runs: dict, title: str) -> None:
    print(f"\n## {title}")
    primary = {key: quality.primary(r, STEADY) for key, r in runs.items()}
    means, lower = {}, {}
    for method in ("ftw", "greats", "cosine"):
        seeds = sorted(s for m, s in runs if m == method)
        if seeds:
            means[method] = float(np.mean([primary[method, s] for s in seeds]))
            acc = np.mean([runs[method, s].accuracy for s in seeds])
            print(f"   {method}: mean primary {means[method]:.4f}, exact match {acc:.1%} "
                  f"(seeds {seeds[0]}-{seeds[-1]}, n={len(seeds)})")
    for other in ("greats", "cosine"):
        seeds = sorted(s for m, s in runs if m == "ftw" and (other, s) in runs)
        if len(seeds) < 2:
            continue
        pa = {s: primary["ftw", s] for s in seeds}
        pb = {s: primary[other, s] for s in seeds}
        print(f"   ftw − {other} over seeds: {describe(paired_comparison(pa, pb))}")
        print("     per seed: " + " ".join(f"{s}: {pa[s] - pb[s]:+.4f}" for s in seeds))
        d = np.stack([quality.example_primary(runs["ftw", s], STEADY)
                      - quality.example_primary(runs[other, s], STEADY) for s in seeds])
        print(f"     over seeds and held-out examples: {describe_crossed(crossed_interval(d))}")
        on = {m: float(np.mean([primary[m, s] for s in seeds])) for m in ("ftw", other)}
        print(f"     on these seeds: ftw {on['ftw']:.4f}, {other} {on[other]:.4f}")
        lower[other] = on["ftw"] < on[other]
    pairs = ", ".join(f"{m}: {v}" for m, v in lower.items())
    print(f"   bar 1 (ftw's mean lower than each method's on the seeds both ran): "
          f"{all(lower.values()) if lower else None} ({pairs})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--scenario", default="label-noise-1of8")
    args = parser.parse_args()
    setting = args.scenario
    mine = _runs(args.folder, setting)
    _read(mine, f"{setting}, this session's seeds")
    _read({**_runs(S31, setting), **mine},
          f"{setting} at adam-next, pooled with session 31's seeds 70-75")


if __name__ == "__main__":
    main()
