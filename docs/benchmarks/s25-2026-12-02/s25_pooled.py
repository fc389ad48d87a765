"""Session 25 (descriptive): every `steady` run of ftw, GREATS, cosine and random any session
committed, pooled per setting, and issue 8's two bars read on all of them at once.

Per (setting, method, seed) the primary is taken from raw `result.json` files (sessions 25,
24, 22, in that order) and the sessions' committed summaries (sessions 13-20, `per_seed`); a
seed that two sessions ran must agree to 1e-4 (it is reported if not, and the first kept). Pairs are
within a seed, so within one session's machine. Nothing here was registered as one analysis:
it pools registered and exploratory runs alike and decides nothing.

    python docs/benchmarks/s25-2026-12-02/s25_pooled.py runs/quality-s25
"""

import json
import sys
from pathlib import Path

import numpy as np
import scipy.stats

from gradsift.bench import quality
from gradsift.bench.scenarios import SUITES, read_result

DOCS = Path("docs/benchmarks")
SUMMARIES = ["s13-2026-11-30/quality-s13", "s14-2026-11-30/quality-s14",
             "s15-2026-11-30/quality-s15", "s16-2026-11-30/quality-s16",
             "s17-2026-12-01/quality-s17", "s18-2026-12-01/quality-s18",
             "s19-2026-12-01/quality-s19", "s20-2026-12-01/quality-s20"]
# newest first: where a seed ran twice, this session's CPU kind is kept (it reproduced
# session 24's runs to the bit; session 22's differ by up to 3e-3, "clash" lines)
RAW = ["s25-2026-12-02/raw", "s24-2026-12-02/raw-agreement", "s24-2026-12-02/raw",
       "s20-2026-12-01/raw-s22"]
METHODS = ("ftw", "greats", "cosine", "random")
SETTINGS = ("label-noise", "label-noise-1of8", "redundancy", "code", "verse",
            "unseen-definition", "unseen-aphorism")


SOURCES: dict = {}  # (setting, method, seed) -> where the kept value came from


def collect(extra: Path | None) -> dict:
    table: dict = {}
    clashes = []

    def put(sc: str, m: str, seed: int, value: float, where: str) -> None:
        old = table.setdefault(sc, {}).setdefault(m, {}).get(seed)
        if old is None:
            table[sc][m][seed] = value
            SOURCES[sc, m, seed] = where
        elif abs(old - value) > 1e-4:
            clashes.append(f"{sc} {m} seed {seed}: {old:.5f} kept, {value:.5f} in {where}")

    roots = ([extra] if extra else []) + [DOCS / r for r in RAW]
    for root in roots:
        for f in sorted(root.glob("*/*/seed_*/result.json")):
            sc, m, seed = f.parts[-4], f.parts[-3], int(f.parts[-2].removeprefix("seed_"))
            if m in METHODS:
                r = quality.RunResult(**read_result(f))
                put(sc, m, seed, quality.primary(r, SUITES["steady"]), str(root))
    for name in SUMMARIES:
        for sc, v in json.loads((DOCS / f"{name}-summary.json").read_text()).items():
            for m, mv in v["methods"].items():
                if m in METHODS:
                    for seed, x in mv["per_seed"]["primary"].items():
                        put(sc, m, int(seed), x, name)
    for c in clashes:
        print("clash:", c)
    return table


def interval(d: np.ndarray) -> str:
    if len(d) < 2:
        return f"{d.mean():+.4f} (1 seed)"
    h = scipy.stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return (f"{d.mean():+.4f} [{d.mean() - h:+.4f}, {d.mean() + h:+.4f}] "
            f"({int((d < 0).sum())} / {int((d > 0).sum())})")


def main(extra: Path | None) -> None:
    table = collect(extra)
    print("setting | seeds (ftw) | mean primary per method on the seeds all four ran | "
          "ftw − greats | ftw − cosine | ftw − random")
    for sc in SETTINGS:
        runs = table.get(sc, {})
        ftw = runs.get("ftw", {})
        cells = []
        for m in ("greats", "cosine", "random"):
            common = sorted(set(ftw) & set(runs.get(m, {})))
            cells.append(interval(np.array([ftw[s] - runs[m][s] for s in common]))
                         + f" n={len(common)}" if common else "–")
            mixed = [s for s in common if SOURCES[sc, "ftw", s].split("/")[0]
                     != SOURCES[sc, m, s].split("/")[0]]
            if mixed:
                print(f"note: {sc} ftw − {m} pairs runs of two sessions' folders on seeds "
                      f"{mixed}")
        shared = sorted(set.intersection(*(set(runs.get(m, {})) for m in METHODS)))
        means = " ".join(f"{m} {np.mean([runs[m][s] for s in shared]):.4f}"
                         for m in METHODS) if shared else "–"
        print(f"{sc} | {len(ftw)} | {means} (n={len(shared)}) | " + " | ".join(cells))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
