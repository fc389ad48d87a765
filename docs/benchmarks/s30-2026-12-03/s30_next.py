"""Session 30 (designed in NEXT.md): ``geometry: adam-next`` against ftw's default geometry
and GREATS under the linear decay, fresh seeds 60-65, and the registered rule.

    python docs/benchmarks/s30-2026-12-03/s30_next.py runs/quality-s30

Session 29's screen (label noise, seeds 44-47, the same decay) is read from
``docs/benchmarks/s29-2026-12-03/raw`` and shown pooled, marked as such; it is not part of
the rule.
"""

import sys
from pathlib import Path

import numpy as np

from gradsift.bench import quality
from gradsift.bench.scenarios import SUITES
from gradsift.report.paired import crossed_interval, describe, describe_crossed, paired_comparison

STEADY = SUITES["steady"]  # the primary reads the same steps (20-24) under both schedules
NEXT = "ftw@geometry=adam-next"
PART_A = ("label-noise", "label-noise-1of8")
PART_B = ("verse", "redundancy", "code")
S29_RAW = Path(__file__).parent.parent / "s29-2026-12-03" / "raw" / "quality-s29"
S29_CONSTANT_CELLS = (+0.003, +0.000, +0.006)  # session 29's screen at the constant lr


def _runs(folder: Path, scenario: str) -> dict[tuple[str, int], quality.RunResult]:
    return {(r.method, r.seed): r for r in quality.load_results(folder) if r.scenario == scenario}


def _pair(runs: dict, a: str, b: str, seeds: list[int]) -> float:
    """Mean of ``a − b`` over ``seeds``, with the intervals printed."""
    pa = {s: quality.primary(runs[a, s], STEADY) for s in seeds}
    pb = {s: quality.primary(runs[b, s], STEADY) for s in seeds}
    per = " ".join(f"{s}: {pa[s] - pb[s]:+.4f}" for s in seeds)
    mean = float(np.mean([pa[s] - pb[s] for s in seeds]))
    print(f"   {a} − {b}: mean {mean:+.4f}; per seed {per}")
    if len(seeds) >= 2:
        print("     over seeds:", describe(paired_comparison(pa, pb)))
        d = np.stack([quality.example_primary(runs[a, s], STEADY)
                      - quality.example_primary(runs[b, s], STEADY) for s in seeds])
        print("     over seeds and held-out examples:", describe_crossed(crossed_interval(d)))
    return mean


def main(folder: Path) -> None:
    means: dict[str, float] = {}
    for sc in PART_A + PART_B:
        runs = _runs(folder, sc)
        methods = (NEXT, "ftw", "greats") if sc in PART_A else (NEXT, "ftw")
        seeds = sorted(s for m, s in runs if m == NEXT
                       and all((other, s) in runs for other in methods))
        print(f"\n## {sc}: seeds {seeds} (every method of the setting finished)")
        if not seeds:
            continue
        for m in methods:
            print(f"   mean primary, {m}: "
                  f"{np.mean([quality.primary(runs[m, s], STEADY) for s in seeds]):.4f}")
        means[sc] = _pair(runs, NEXT, "ftw", seeds)
        if sc in PART_A:
            _pair(runs, NEXT, "greats", seeds)
            _pair(runs, "ftw", "greats", seeds)
            for m in methods:
                acc = np.mean([runs[m, s].accuracy for s in seeds])
                print(f"   exact match, {m}: {acc:.1%}")
        if sc == "label-noise" and S29_RAW.is_dir():
            old = _runs(S29_RAW, sc)
            both = {**{(m, s): r for (m, s), r in old.items()}, **runs}
            pooled = sorted(s for m, s in both if m == NEXT and ("ftw", s) in both
                            and ("greats", s) in both)
            print(f"   pooled with session 29's screen (seeds {pooled}; not part of the rule):")
            _pair(both, NEXT, "ftw", pooled)
            _pair(both, NEXT, "greats", pooled)
    one = all(sc in means and means[sc] < 0 for sc in PART_A)
    two = all(sc in means and means[sc] <= 0.010 for sc in PART_B)
    three = all(c <= 0.010 for c in S29_CONSTANT_CELLS)
    print(f"\nrule: 1 (below ftw in both label-noise settings) {one}; 2 (no other setting above "
          f"+0.010) {two}; 3 (session 29's constant-lr cells) {three} -> "
          + ("adam-next becomes the default" if one and two and three else "no default moves"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
