"""Session 29, amendments 1 and 2 of SCHEDULE.md: each option against ftw and GREATS on the
same seeds, under the linear decay and at the constant lr.

    python docs/benchmarks/s29-2026-12-03/s29_screen.py runs/quality-s29 runs/quality-s29-constant
"""

import sys
from pathlib import Path

import numpy as np

from gradsift.bench import quality
from gradsift.bench.scenarios import SUITES

STEADY = SUITES["steady"]
S28_RAW = Path(__file__).parent.parent / "s27-2026-12-02" / "raw"
OPTIONS = ("ftw@geometry=adam-next", "ftw-filter-only", "ftw-weight-only", "ftw-sgd")


def _primaries(*folders: Path) -> dict[tuple[str, str, int], float]:
    out = {}
    for folder in folders:  # later folders win: a rerun here over session 28's
        for r in quality.load_results(folder):
            out[r.scenario, r.method, r.seed] = quality.primary(r, STEADY)
    return out


def report(label: str, prim: dict[tuple[str, str, int], float], option: str) -> list[bool]:
    """Per scenario: option − ftw and option − greats per seed and on the mean; returns, per
    scenario with runs, (below ftw on the mean, below GREATS on the mean)."""
    verdicts = []
    for sc in ("label-noise", "label-noise-1of8", "verse"):
        seeds = sorted(s for (c, m, s) in prim if c == sc and m == option
                       and (sc, "ftw", s) in prim and (sc, "greats", s) in prim)
        if not seeds:
            continue
        rows = {ref: [prim[sc, option, s] - prim[sc, ref, s] for s in seeds]
                for ref in ("ftw", "greats")}
        means = {ref: float(np.mean(v)) for ref, v in rows.items()}
        mean = {m: np.mean([prim[sc, m, s] for s in seeds]) for m in (option, "ftw", "greats")}
        print(f"{label} {sc}, {option}, seeds {seeds}: mean {mean[option]:.4f} (ftw "
              f"{mean['ftw']:.4f}, greats {mean['greats']:.4f})")
        for ref, v in rows.items():
            lower = sum(x < 0 for x in v)
            print(f"   − {ref}: {means[ref]:+.4f} (" + " ".join(f"{x:+.4f}" for x in v)
                  + f"; lower on {lower} of {len(v)})")
        verdicts.append((means["ftw"] < 0, means["greats"] < 0))
    return verdicts


def main(linear_dir: Path, constant_dir: Path) -> None:
    linear = _primaries(linear_dir)
    constant = _primaries(S28_RAW, constant_dir)
    cells = []
    for option in OPTIONS:
        print(f"\n## {option}")
        lin = report("linear", linear, option)
        con = report("constant", constant, option)
        if option == OPTIONS[0]:
            cells = lin + con
    if cells:
        below_ftw = sum(a for a, _ in cells)
        below_greats = sum(b for _, b in cells)
        print(f"\nrule (amendment 2): {OPTIONS[0]} below ftw in {below_ftw} of {len(cells)} "
              f"cells (needs all 4), below GREATS in {below_greats} (needs 3): "
              + ("candidate" if len(cells) == 4 and below_ftw == 4 and below_greats >= 3
                 else "not a candidate"))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
