"""Session 18's analysis (PREREG.md, with amendment 1): fresh seeds of label-noise and 1of8.

Per setting: the reproducibility check (label-noise ftw seed 0 against session 16's record);
then over the fresh seeds where ftw, greats and cosine all finished, and pooled with the
recorded seeds 0-9 (session 16's summary), each method's mean primary (mean held-out target
loss over the last 20 % of steps) and the paired `ftw − X` lines (mean, sd, 95 % t-interval,
ftw lower / higher). Amendment 1 (the check failed across two CPUs): bar 1 as written (ftw's
mean the lowest) and with ties allowed (no `ftw − X` interval wholly above 0) are judged on the
fresh seeds alone; the pooled lines are descriptive. The ±0.025 band, the AUC and exact-match
accuracy are descriptive.

    python docs/benchmarks/s18-2026-12-01/s18_analysis.py runs/quality-s18
"""

import json
import sys
from pathlib import Path

import numpy as np

from gradsift.report.paired import paired_interval

METHODS = ("ftw", "greats", "cosine")
SETTINGS = ("label-noise", "label-noise-1of8", "code")
# amendment 2: code against cosine only, seeds 0-9 recorded by session 14 (same summary)
COMPARED = {"code": ("ftw", "cosine")}
RECORDED = Path(__file__).parent.parent / "s16-2026-11-30" / "quality-s16-summary.json"
FRESH = range(10, 20)
MIN_SEEDS = 5
BAND = 0.025


def metrics(path: Path) -> tuple[float, float, float]:
    """(primary, AUC, exact-match accuracy) of one finished run."""
    run = json.loads(path.read_text())
    steps, losses = np.array(run["steps"], float), np.array(run["losses"], float)
    auc = np.trapezoid(losses, steps) / (steps[-1] - steps[0])
    accuracy = float("nan") if run["accuracy"] is None else float(run["accuracy"])  # code: none
    return float(losses[steps > 0.8 * steps[-1]].mean()), float(auc), accuracy


def interval(d: np.ndarray) -> tuple[float, float, float, float]:
    """Mean, sd and the 95 % t-interval of paired differences (the suite's own)."""
    mean, lo, hi = paired_interval(d)
    return mean, float(d.std(ddof=1)), lo, hi


def show(d: np.ndarray) -> str:
    mean, sd, lo, hi = interval(d)
    return (f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}] sd {sd:.4f} "
            f"(ftw lower {int((d < 0).sum())} / higher {int((d > 0).sum())})")


def table(label: str, runs: dict[str, dict[int, tuple]], seeds: list[int]
          ) -> tuple[dict[str, float], dict[str, tuple]]:
    """Print means and paired lines over ``seeds`` (the methods of ``runs``, ftw first);
    return the means and the primary intervals."""
    methods = tuple(runs)
    print(f"  {label}: {len(seeds)} seeds {seeds}")
    means = {m: float(np.mean([runs[m][s][0] for s in seeds])) for m in methods}
    for m in methods:
        extra = ""
        if all(len(runs[m][s]) > 1 for s in seeds):
            extra = (f"  AUC {np.mean([runs[m][s][1] for s in seeds]):.4f}"
                     f"  exact match {100 * np.mean([runs[m][s][2] for s in seeds]):.1f} %")
        print(f"    {m:8s} primary {means[m]:.4f}{extra}")
    intervals = {}
    for other in methods[1:]:
        d = np.array([runs["ftw"][s][0] - runs[other][s][0] for s in seeds])
        intervals[other] = interval(d)
        print(f"    ftw − {other:8s} primary {show(d)}")
        if all(len(runs[m][s]) > 1 for m in ("ftw", other) for s in seeds):
            d = np.array([runs["ftw"][s][1] - runs[other][s][1] for s in seeds])
            print(f"    ftw − {other:8s} AUC     {show(d)}")
    return means, intervals


def main(out: Path) -> None:
    recorded = json.loads(RECORDED.read_text())
    for setting in SETTINGS:
        compared = COMPARED.get(setting, METHODS)
        old = {m: {int(s): (v,) for s, v in
                   recorded[setting]["methods"][m]["per_seed"]["primary"].items()}
               for m in compared}
        runs = {m: {int(p.parent.name.split("_")[1]): metrics(p)
                    for p in (out / setting / m).glob("seed_*/result.json")}
                for m in compared}
        print(f"## {setting}")
        if setting == "label-noise" and 0 in runs["ftw"]:
            now, then = runs["ftw"][0][0], old["ftw"][0][0]
            print(f"  reproducibility check: ftw seed 0 now {now:.6f}, recorded {then:.6f}: "
                  + ("equal" if abs(now - then) <= 1e-6 else "different (amendment 1)"))
        fresh = sorted(s for s in FRESH if all(s in runs[m] for m in compared))
        if len(fresh) < MIN_SEEDS:
            print(f"  fewer than {MIN_SEEDS} fresh seeds: the setting is not counted\n")
            continue
        means, intervals = table("fresh seeds alone (the decision, amendment 1)", runs, fresh)
        best = min(means, key=means.get)
        print("  bar 1 as written (fresh seeds): "
              + ("holds" if best == "ftw" else f"not met ({best} lowest)"))
        above = [x for x, (_, _, lo, _) in intervals.items() if lo > 0]
        print("  bar 1, ties allowed (fresh seeds): "
              + ("holds" if not above else "not met: above 0 for " + ", ".join(above)))
        other = min((m for m in compared if m != "ftw"), key=means.get)
        _, _, lo, hi = intervals[other]
        inside = -BAND <= lo and hi <= BAND
        print(f"  descriptive: ftw − {other} (the lowest other) [{lo:+.4f}, {hi:+.4f}] "
              f"{'within' if inside else 'not within'} ±{BAND}")
        merged = {m: {**old[m], **{s: runs[m][s] for s in fresh}} for m in compared}
        seeds = sorted(set.intersection(*(set(merged[m]) for m in compared)))
        pooled, _ = table("pooled with the recorded seeds 0-9 (descriptive, across two CPUs)",
                          merged, seeds)
        print(f"  pooled: lowest mean {min(pooled, key=pooled.get)}\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
