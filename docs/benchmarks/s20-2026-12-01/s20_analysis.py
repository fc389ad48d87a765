"""Session 20's analysis (PREREG.md): the top-`k` subset against ftw's greedy subset in every
`steady` setting, and the registered decision on ftw's default subset.

Per setting: each method's mean primary (mean held-out target loss over the last 20 % of
steps) and AUC over the seeds where both finished (at least MIN_SEEDS to count); the paired
line `topk − ftw` (mean, sd, 95 % t-interval, topk lower / higher). Five settings come from
this session's folder (seeds 30-35), label-noise-1of8 and redundancy from session 19's
registered runs (seeds 20-25 and 20-24). Then the decision: top-`k` becomes the default iff
every setting counts, no interval lies wholly above 0, and the mean over the seven settings of
the per-setting mean differences is at most 0.

    python docs/benchmarks/s20-2026-12-01/s20_analysis.py runs/quality-s20 runs/quality-s19

Session 21's amendment (PREREG.md): session 19's run folder was lost with session 20's
checkout, so the second argument may instead be session 19's committed summary, whose
`per_seed` holds the same primary and AUC per seed:

    python docs/benchmarks/s20-2026-12-01/s20_analysis.py runs/quality-s20 \
        docs/benchmarks/s19-2026-12-01/quality-s19-summary.json
"""

import json
import sys
from pathlib import Path

import numpy as np

from gradsift.bench import quality
from gradsift.bench.scenarios import SUITES, read_result
from gradsift.report.paired import paired_interval

V = "ftw@subset=topk"
METHODS = (V, "ftw")
NEW = ("label-noise", "code", "verse", "unseen-definition", "unseen-aphorism")
OLD = ("label-noise-1of8", "redundancy")
MIN_SEEDS = 5


def metrics(path: Path) -> tuple[float, float]:
    """(primary, AUC) of one finished run, by the suite's own code."""
    run = quality.RunResult(**read_result(path))
    return quality.primary(run, SUITES["steady"]), quality.auc(run)


def per_seed(folder: Path, name: str) -> dict[str, dict[int, tuple[float, float]]]:
    """method -> seed -> (primary, AUC): from run files, or from a summary's `per_seed`."""
    if folder.suffix == ".json":
        methods = json.loads(folder.read_text())[name]["methods"]
        return {m: {int(s): (v, methods[m]["per_seed"]["auc"][s])
                    for s, v in methods[m]["per_seed"]["primary"].items()} for m in METHODS}
    return {m: {int(p.parent.name.split("_")[1]): metrics(p)
                for p in (folder / name / m).glob("seed_*/result.json")} for m in METHODS}


def setting(folder: Path, name: str) -> float | None:
    """Print one setting's table; return its mean `topk − ftw`, or None when it does not count."""
    runs = per_seed(folder, name)
    seeds = sorted(set(runs[V]) & set(runs["ftw"]))
    print(f"## {name} ({folder.name}): {len(seeds)} seeds {seeds}")
    if len(seeds) < MIN_SEEDS:
        print(f"  fewer than {MIN_SEEDS} seeds: not counted\n")
        return None
    for m in METHODS:
        rows = np.array([runs[m][s] for s in seeds])
        print(f"  {m:16s} primary {rows[:, 0].mean():.4f}  AUC {rows[:, 1].mean():.4f}")
    result = None
    for i, label in ((0, "primary"), (1, "AUC")):
        d = np.array([runs[V][s][i] - runs["ftw"][s][i] for s in seeds])
        mean, lo, hi = paired_interval(d)
        print(f"  topk − ftw {label:7s} {mean:+.4f} [{lo:+.4f}, {hi:+.4f}] sd {d.std(ddof=1):.4f} "
              f"(topk lower {int((d < 0).sum())} / higher {int((d > 0).sum())})")
        if i == 0:
            result = (mean, lo)
            print(f"  wholly above 0: {'yes' if lo > 0 else 'no'}; "
                  f"wholly below 0: {'yes' if hi < 0 else 'no'}")
    print()
    return result


def main(new: Path, old: Path) -> None:
    found = {name: setting(new, name) for name in NEW}
    found |= {name: setting(old, name) for name in OLD}
    missing = [n for n, r in found.items() if r is None]
    if missing:
        print(f"decision: none (settings not counted: {', '.join(missing)}); default unchanged")
        return
    above = [n for n, (_, lo) in found.items() if lo > 0]
    overall = float(np.mean([m for m, _ in found.values()]))
    print(f"mean over the seven settings of the mean topk − ftw: {overall:+.4f}")
    print(f"settings with topk − ftw wholly above 0: {', '.join(above) or 'none'}")
    change = not above and overall <= 0
    print(f"decision: {'top-k becomes the default subset' if change else 'default unchanged'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
