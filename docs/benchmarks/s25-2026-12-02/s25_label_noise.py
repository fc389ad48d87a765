"""Session 25's registered label-noise run (PREREG-label-noise.md): on fresh seeds 36-43,
`ftw − greats` and `ftw − cosine` over the seeds where all three finished; the pooled reading
is `s25_pooled.py`'s label-noise row.

    python docs/benchmarks/s25-2026-12-02/s25_label_noise.py runs/quality-s25
"""

import sys
from pathlib import Path

import numpy as np
import scipy.stats

from gradsift.bench import quality
from gradsift.bench.scenarios import SUITES, read_result

SEEDS = range(36, 44)
METHODS = ("ftw", "greats", "cosine")


def main(root: Path) -> None:
    done = [s for s in SEEDS if all((root / "label-noise" / m / f"seed_{s}" / "result.json")
                                    .exists() for m in METHODS)]
    p = {m: np.array([quality.primary(quality.RunResult(**read_result(
        root / "label-noise" / m / f"seed_{s}" / "result.json")), SUITES["steady"])
        for s in done]) for m in METHODS}
    print(f"seeds with all three finished: {done}")
    print("mean primary: " + ", ".join(f"{m} {p[m].mean():.4f}" for m in METHODS))
    for other in ("greats", "cosine"):
        d = p["ftw"] - p[other]
        h = scipy.stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
        print(f"ftw − {other}: {d.mean():+.4f} [{d.mean() - h:+.4f}, {d.mean() + h:+.4f}] "
              f"(ftw lower on {int((d < 0).sum())}, higher on {int((d > 0).sum())}); per seed "
              + " ".join(f"{x:+.3f}" for x in d))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
