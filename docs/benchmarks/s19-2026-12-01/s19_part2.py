"""Session 19, part 2 (PREREG.md): `ftw@subset=topk` on fresh seeds, registered.

Per setting, over the seeds where every method of the setting finished (at least 5 to count):
each method's mean primary (mean held-out target loss over the last 20 % of steps), AUC and,
at 1of8, exact match; the paired lines `topk − X` (mean, sd, 95 % t-interval, topk
lower / higher) of the primary and the AUC; the answers to the registered questions.

    python docs/benchmarks/s19-2026-12-01/s19_part2.py runs/quality-s19
"""

import sys
from pathlib import Path

import numpy as np

from gradsift.bench import quality
from gradsift.bench.scenarios import SUITES, read_result
from gradsift.report.paired import paired_interval

V = "ftw@subset=topk"
SETTINGS = {"label-noise-1of8": (V, "greats", "ftw"), "redundancy": (V, "ftw")}
MIN_SEEDS = 5


def metrics(path: Path) -> tuple[float, float, float]:
    """(primary, AUC, exact-match accuracy) of one finished run, by the suite's own code."""
    run = quality.RunResult(**read_result(path))
    accuracy = float("nan") if run.accuracy is None else float(run.accuracy)
    return quality.primary(run, SUITES["steady"]), quality.auc(run), accuracy


def line(d: np.ndarray) -> tuple[str, float, float]:
    mean, lo, hi = paired_interval(d)
    return (f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}] sd {d.std(ddof=1):.4f} "
            f"(topk lower {int((d < 0).sum())} / higher {int((d > 0).sum())})", lo, hi)


def main(out: Path) -> None:
    for setting, methods in SETTINGS.items():
        runs = {m: {int(p.parent.name.split("_")[1]): metrics(p)
                    for p in (out / setting / m).glob("seed_*/result.json")} for m in methods}
        seeds = sorted(set.intersection(*(set(r) for r in runs.values())))
        print(f"## {setting}: {len(seeds)} seeds {seeds}")
        if len(seeds) < MIN_SEEDS:
            print(f"  fewer than {MIN_SEEDS} seeds: not counted\n")
            continue
        for m in methods:
            rows = np.array([runs[m][s] for s in seeds])
            acc = ("" if np.isnan(rows[:, 2]).all()
                   else f"  exact match {100 * rows[:, 2].mean():.1f} %")
            print(f"  {m:22s} primary {rows[:, 0].mean():.4f}  AUC {rows[:, 1].mean():.4f}{acc}")
        highs = {}
        for other in methods[1:]:
            for i, name in ((0, "primary"), (1, "AUC")):
                d = np.array([runs[V][s][i] - runs[other][s][i] for s in seeds])
                text, lo, hi = line(d)
                print(f"  topk − {other:7s} {name:7s} {text}")
                if i == 0:
                    highs[other] = (lo, hi)
        means = {m: np.mean([runs[m][s][0] for s in seeds]) for m in methods}
        print(f"  lowest mean: {min(means, key=means.get)}")
        for other, (lo, hi) in highs.items():
            print(f"  topk − {other}: interval wholly above 0: {'yes' if lo > 0 else 'no'}; "
                  f"wholly below 0: {'yes' if hi < 0 else 'no'}")
        print()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
