"""Session 29 (designed in SCHEDULE.md): ftw − GREATS under a linear lr decay against the
constant lr on the same seeds.

    python docs/benchmarks/s29-2026-12-03/s29_schedule.py runs/quality-s29 runs/quality-s29-constant

The constant-lr partners of the label-noise settings are session 28's runs, committed in
``docs/benchmarks/s27-2026-12-02/raw``; verse's are in the second folder.
"""

import sys
from pathlib import Path

import numpy as np

from gradsift.bench import quality
from gradsift.bench.scenarios import SUITES
from gradsift.report.paired import crossed_interval, describe, describe_crossed, paired_comparison

STEADY = SUITES["steady"]  # the primary reads the same steps (20-24) under both schedules
S28_RAW = Path(__file__).parent.parent / "s27-2026-12-02" / "raw"


def _runs(folder: Path, scenario: str) -> dict[tuple[str, int], quality.RunResult]:
    return {(r.method, r.seed): r for r in quality.load_results(folder) if r.scenario == scenario}


def main(linear_dir: Path, constant_dir: Path) -> None:
    s28 = quality.load_results(S28_RAW)
    check = _runs(constant_dir, "label-noise").get(("ftw", 44))
    if check is not None:
        old = next(r for r in s28 if (r.scenario, r.method, r.seed) == ("label-noise", "ftw", 44))
        a, b = quality.primary(check, STEADY), quality.primary(old, STEADY)
        print(f"check: ftw label noise seed 44 at the constant lr: {a!r} here, {b!r} in "
              f"session 28 ({'the same' if a == b else 'DIFFERENT'})")
    for sc in ("label-noise", "label-noise-1of8", "verse"):
        lin = _runs(linear_dir, sc)
        con = ({(r.method, r.seed): r for r in s28 if r.scenario == sc}
               if sc != "verse" else _runs(constant_dir, sc))
        seeds = sorted(s for m, s in lin if m == "ftw" and ("greats", s) in lin)
        print(f"\n## {sc}: seeds {seeds} under the linear decay")
        if not seeds:
            continue
        prim = {(m, s): quality.primary(lin[m, s], STEADY) for m in ("ftw", "greats")
                for s in seeds}
        for m in ("ftw", "greats"):
            print(f"1. mean primary, {m}: {np.mean([prim[m, s] for s in seeds]):.4f}")
        gap = {s: prim["ftw", s] - prim["greats", s] for s in seeds}
        print("   per seed ftw − greats:", " ".join(f"{s}: {v:+.4f}" for s, v in gap.items()))
        if len(seeds) >= 2:
            print("1. ftw − greats over seeds:", describe(paired_comparison(
                {s: prim["ftw", s] for s in seeds}, {s: prim["greats", s] for s in seeds})))
            d = np.stack([quality.example_primary(lin["ftw", s], STEADY)
                          - quality.example_primary(lin["greats", s], STEADY) for s in seeds])
            print("1. over seeds and held-out examples:", describe_crossed(crossed_interval(d)))
        both = [s for s in seeds if ("ftw", s) in con and ("greats", s) in con]
        cprim = {(m, s): quality.primary(con[m, s], STEADY) for m in ("ftw", "greats")
                 for s in both}
        cgap = {s: cprim["ftw", s] - cprim["greats", s] for s in both}
        print("   constant lr, per seed ftw − greats:",
              " ".join(f"{s}: {v:+.4f}" for s, v in cgap.items()))
        delta = {s: gap[s] - cgap[s] for s in both}
        print("2. Δ = (ftw − greats)_linear − (ftw − greats)_constant, per seed:",
              " ".join(f"{s}: {v:+.4f}" for s, v in delta.items()))
        if len(both) >= 2:
            print("2. Δ:", describe(paired_comparison(delta, dict.fromkeys(both, 0.0))))
        for m in ("ftw", "greats"):
            own = {s: prim[m, s] - cprim[m, s] for s in both}
            if len(both) >= 2:
                print(f"3. {m}: linear − constant:", describe(paired_comparison(
                    {s: prim[m, s] for s in both}, {s: cprim[m, s] for s in both})))
            else:
                print(f"3. {m}: linear − constant:", own)
        if lin["ftw", seeds[0]].accuracy is not None:
            for m in ("ftw", "greats"):
                acc = [lin[m, s].accuracy for s in seeds]
                cacc = [con[m, s].accuracy for s in both]
                print(f"4. exact match, {m}: linear {np.mean(acc):.1%}, constant on the same "
                      f"seeds {np.mean(cacc):.1%}")
        steps = lin["ftw", seeds[0]].steps
        by_step = np.mean([np.subtract(lin["ftw", s].losses, lin["greats", s].losses)
                           for s in seeds], axis=0)
        print("5. ftw − greats by evaluation step, linear (not registered):",
              ", ".join(f"{t}: {v:+.3f}" for t, v in zip(steps, by_step, strict=True)))
        if both:
            cby = np.mean([np.subtract(con["ftw", s].losses, con["greats", s].losses)
                           for s in both], axis=0)
            print("5. the same at the constant lr, same seeds:",
                  ", ".join(f"{t}: {v:+.3f}" for t, v in zip(steps, cby, strict=True)))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
