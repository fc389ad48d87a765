"""Session 19's exploratory screen (SCREEN.md): each variant against GREATS, ftw and cosine at
label-noise-1of8, paired over the seeds where all finished (primary = mean held-out target
loss over the last 20 % of steps; 95 % t-interval; variant lower / higher).

    python docs/benchmarks/s19-2026-12-01/s19_screen.py runs/quality-s18 [seeds]
"""

import sys
from pathlib import Path

import numpy as np

from gradsift.bench import quality
from gradsift.bench.scenarios import SUITES, read_result
from gradsift.report.paired import paired_interval

BASE = ("greats", "ftw", "cosine")
VARIANTS = ("ftw@geometry=sgd", "ftw@subset=topk", "ftw@weighting=uniform", "ftw-next-step",
            "ftw@subset=validated", "ftw@subset=residual")


def primary(path: Path) -> float:
    """The suite's own primary metric of one finished run."""
    return quality.primary(quality.RunResult(**read_result(path)), SUITES["steady"])


def main(folder: Path, seeds: list[int]) -> None:
    redundancy(folder / "redundancy", seeds)
    sc = folder / "label-noise-1of8"
    runs = {m: {s: primary(sc / m / f"seed_{s}" / "result.json") for s in seeds
                if (sc / m / f"seed_{s}" / "result.json").is_file()}
            for m in BASE + VARIANTS}
    for v in VARIANTS:
        done = sorted(runs[v])
        if not done:
            print(f"{v}: no finished run")
            continue
        print(f"{v}: seeds {done}, mean {np.mean([runs[v][s] for s in done]):.4f}")
        for b in BASE:
            d = np.array([runs[v][s] - runs[b][s] for s in done])
            mean, lo, hi = paired_interval(d) if len(d) > 1 else (float(d[0]),) * 3
            print(f"  {v} − {b}: {mean:+.4f} [{lo:+.4f}, {hi:+.4f}] "
                  f"({int((d < 0).sum())} / {int((d > 0).sum())}); "
                  f"{b} mean {np.mean([runs[b][s] for s in done]):.4f}")


def redundancy(sc: Path, seeds: list[int]) -> None:
    """Amendments 3 and 5: the new subsets against ftw in redundancy, on this CPU."""
    variants = ("ftw@subset=validated", "ftw@subset=residual")
    runs = {m: {s: primary(sc / m / f"seed_{s}" / "result.json") for s in seeds
                if (sc / m / f"seed_{s}" / "result.json").is_file()}
            for m in ("ftw", *variants)}
    for v in variants:
        done = sorted(set(runs["ftw"]) & set(runs[v]))
        if not done:
            print(f"redundancy {v}: no paired run yet")
            continue
        d = np.array([runs[v][s] - runs["ftw"][s] for s in done])
        mean, lo, hi = paired_interval(d) if len(d) > 1 else (float(d[0]),) * 3
        print(f"redundancy, seeds {done}: {v} − ftw {mean:+.4f} [{lo:+.4f}, {hi:+.4f}] "
              f"({int((d < 0).sum())} / {int((d > 0).sum())}); ftw mean "
              f"{np.mean([runs['ftw'][s] for s in done]):.4f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), [int(s) for s in sys.argv[2].split(",")] if len(sys.argv) > 2
         else list(range(10, 15)))
