"""Session 25's screen (SCREEN.md): the top-`k` only where the target batch carries no signal.

Per setting: the primary (mean held-out target loss, steps 20-24) of `ftw@subset=snr` paired
with `ftw`, both this session's runs, the rule SCREEN.md fixed, and (reported, not used to
choose) `snr − greats` on label-noise-1of8, the share of steps on the top-`k` per third of the
run, the mean logged SNR, and the held-out loss difference at steps 4, 8, 16, 24.

    python docs/benchmarks/s25-2026-12-02/s25_screen.py runs/quality-s25
"""

import json
import sys
from pathlib import Path

import numpy as np

from gradsift.bench import quality
from gradsift.bench.scenarios import SUITES, read_result

SETTINGS = ("label-noise-1of8", "verse", "unseen-aphorism")
FTW, V, GREATS = "ftw", "ftw@subset=snr", "greats"
SEEDS = (30, 31, 32)


def primary(path: Path) -> float:
    return quality.primary(quality.RunResult(**read_result(path)), SUITES["steady"])


def run(root: Path, sc: str, m: str, s: int) -> Path:
    return root / sc / m / f"seed_{s}"


def main(root: Path) -> None:
    means = {}
    for sc in SETTINGS:
        seeds = [s for s in SEEDS
                 if all((run(root, sc, m, s) / "result.json").exists() for m in (V, FTW))]
        if not seeds:
            print(f"## {sc}: no finished seeds")
            continue
        p = {m: np.array([primary(run(root, sc, m, s) / "result.json") for s in seeds])
             for m in (V, FTW)}
        d = p[V] - p[FTW]
        means[sc] = d.mean()
        print(f"## {sc}: seeds {seeds} primary snr {p[V].mean():.4f} ftw {p[FTW].mean():.4f}")
        print(f"  snr − ftw {d.mean():+.4f}  per seed " + " ".join(f"{x:+.4f}" for x in d))
        g = [s for s in seeds if (run(root, sc, GREATS, s) / "result.json").exists()]
        if g:
            dg = [primary(run(root, sc, V, s) / "result.json")
                  - primary(run(root, sc, GREATS, s) / "result.json") for s in g]
            print(f"  snr − greats {np.mean(dg):+.4f} over seeds {g}  per seed "
                  + " ".join(f"{x:+.4f}" for x in dg))
        topk, snr = [], []
        for s in seeds:
            diag = [json.loads(line)["diagnostics"] for line in
                    (run(root, sc, V, s) / "selections.jsonl").read_text().splitlines()]
            topk.append([x["subset_used"] == "topk" for x in diag])
            snr += [x["target_snr"] for x in diag if x["target_snr"] is not None]
        thirds = [f"{np.mean(t):.0%}" for t in np.array_split(np.array(topk), 3, axis=1)]
        print(f"  steps on the top-k by third {' / '.join(thirds)}; median SNR "
              f"{np.median(snr):.2f}")
        curves = np.array([np.array(read_result(run(root, sc, V, s) / "result.json")["losses"])
                           - np.array(read_result(run(root, sc, FTW, s) / "result.json")["losses"])
                           for s in seeds]).mean(axis=0)
        steps = read_result(run(root, sc, V, seeds[0]) / "result.json")["steps"]
        print("  held-out snr − ftw by step " + " ".join(
            f"{st}:{c:+.3f}" for st, c in zip(steps, curves, strict=True) if st in (4, 8, 16, 24)))
    if len(means) == len(SETTINGS):
        vals = np.array(list(means.values()))
        lead = means["label-noise-1of8"]
        go = lead < 0 and vals.mean() < 0 and vals.max() <= 0.010
        print(f"\nrule: label-noise-1of8 {lead:+.4f} < 0, mean {vals.mean():+.4f} < 0, max "
              f"{vals.max():+.4f} <= +0.010: {'registered run follows' if go else 'stop'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
