"""Session 24's screen (SCREEN.md): ftw's subset scored net of the target batch's noise.

Per setting: the primary (mean held-out target loss, steps 20-24) of `ftw@subset=debiased`
paired with `ftw`, both this session's runs (SCREEN.md's amendment), and session 22's
`ftw@subset=topk` on seeds 30-32,
the paired differences, and (descriptive) the rows trained per step and the share of steps
whose rows equal ftw's and the top-`k`'s. First the reproduction check of session 22's ftw.

    python docs/benchmarks/s24-2026-12-02/s24_screen.py runs/quality-s24 SELECTIONS_S22
"""

import json
import sys
from pathlib import Path

import numpy as np

from gradsift.bench import quality
from gradsift.bench.scenarios import SUITES, read_result

S22 = Path("docs/benchmarks/s20-2026-12-01/raw-s22")
SETTINGS = ("label-noise", "verse", "code")
FTW, TOPK, V = "ftw", "ftw@subset=topk", "ftw@subset=debiased"
SEEDS = (30, 31, 32)


def primary(path: Path) -> float:
    return quality.primary(quality.RunResult(**read_result(path)), SUITES["steady"])


def rows(path: Path) -> list[frozenset]:
    return [frozenset(json.loads(line)["selected_ids"]) for line in path.read_text().splitlines()]


def main(root: Path, sel22: Path | None) -> None:
    again = root / "label-noise" / FTW / "seed_30" / "result.json"
    if again.exists():
        a, b = primary(again), primary(S22 / "label-noise" / FTW / "seed_30" / "result.json")
        print(f"reproduction: ftw label-noise seed 30 now {a:.6f}, session 22 {b:.6f}, "
              f"diff {a - b:+.2e}")
    means = {}
    for sc in SETTINGS:
        seeds = [s for s in SEEDS if all((root / sc / m / f"seed_{s}" / "result.json").exists()
                                         for m in (V, FTW))]
        if not seeds:
            print(f"## {sc}: no finished seeds")
            continue
        p = {m: np.array([primary(root / sc / m / f"seed_{s}" / "result.json") for s in seeds])
             for m in (V, FTW)}  # both from this checkout (SCREEN.md, amendment)
        p[TOPK] = np.array([primary(S22 / sc / TOPK / f"seed_{s}" / "result.json")
                            for s in seeds])  # session 22's checkout
        d_ftw, d_topk = p[V] - p[FTW], p[V] - p[TOPK]
        means[sc] = d_ftw.mean()
        print(f"## {sc}: seeds {seeds} primary V {p[V].mean():.4f} ftw {p[FTW].mean():.4f} "
              f"topk {p[TOPK].mean():.4f}")
        print(f"  V − ftw  {d_ftw.mean():+.4f}  per seed " + " ".join(f"{x:+.4f}" for x in d_ftw))
        print(f"  V − topk (s22) {d_topk.mean():+.4f}  per seed "
              + " ".join(f"{x:+.4f}" for x in d_topk))
        n_rows, same_ftw, same_top = [], [], []
        for s in seeds:
            mine = rows(root / sc / V / f"seed_{s}" / "selections.jsonl")
            n_rows += [len(r) for r in mine]
            if sel22 is not None:
                for ref_path, out in ((root / sc / FTW, same_ftw), (sel22 / sc / TOPK, same_top)):
                    ref = rows(ref_path / f"seed_{s}" / "selections.jsonl")
                    out += [a == b for a, b in zip(mine, ref, strict=True)]
        line = f"  rows/step {np.mean(n_rows):.2f}"
        if same_ftw:
            line += (f"  steps with ftw's rows {np.mean(same_ftw):.0%}, with topk's "
                     f"{np.mean(same_top):.0%} (paths part after the first difference)")
        print(line)
        # descriptive, as session 23: the realized decrease on the batches each step was
        # chosen on (summed) beside the held-out decrease over the run (first − last eval)
        gains = {}
        for m in (V, FTW):
            runs = [read_result(root / sc / m / f"seed_{s}" / "result.json") for s in seeds]
            gains[m] = np.array([(sum(c["realized"] for c in r["calibration"] if c),
                                  r["losses"][0] - r["losses"][-1]) for r in runs])
        tb, ho = gains[FTW].mean(axis=0)
        dtb, dho = (gains[V] - gains[FTW]).mean(axis=0)
        print(f"  ftw: target batches {tb:.3f}, held out {ho:.3f};  V − ftw: target batches "
              f"{dtb:+.3f}, held out {dho:+.3f}")
    if len(means) == len(SETTINGS):
        vals = np.array(list(means.values()))
        go = means["label-noise"] < 0 and vals.mean() < 0 and vals.max() <= 0.010
        print(f"\nrule: label-noise {means['label-noise']:+.4f} < 0, mean {vals.mean():+.4f} < 0,"
              f" max {vals.max():+.4f} <= +0.010: {'registered run follows' if go else 'stop'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
