"""Session 26's screen (SCREEN.md): the target gradient averaged over steps, `target_ema: 0.5`.

Per setting: the primary (mean held-out target loss, steps 20-24) of `ftw@target_ema=0.5`
paired with `ftw` on the same seed and CPU kind (session 24's committed runs for label noise,
session 25's for the others), the rule SCREEN.md fixed, and (reported, not used to choose)
`ema − greats` and `greats@ema − greats` on label-noise-1of8, and the held-out loss difference
at steps 4, 8, 16, 24. The reproducibility check (ftw rerun on 1of8 seed 30) is printed first,
the follow-up on code, redundancy and definitions (descriptive) last.

    python docs/benchmarks/s26-2026-12-02/s26_screen.py runs/quality-s26
"""

import sys
from pathlib import Path

import numpy as np

from gradsift.bench import quality
from gradsift.bench.scenarios import SUITES, read_result

HERE = Path(__file__).resolve().parent
S24 = HERE.parent / "s24-2026-12-02" / "raw"
S25 = HERE.parent / "s25-2026-12-02" / "raw"
SETTINGS = ("label-noise", "label-noise-1of8", "verse", "unseen-aphorism")
NARROW = ("label-noise", "label-noise-1of8")
V, GV = "ftw@target_ema=0.5", "greats@target_ema=0.5"
SEEDS = (30, 31, 32)
# the follow-up (SCREEN.md, descriptive): setting -> (ftw's committed runs, seeds)
REST = {"code": (S24, (30, 31, 32)),
        "redundancy": (S24.parent / "raw-agreement", (30, 31)),
        "unseen-definition": (S24.parent / "raw-agreement", (30, 31))}


def result(root: Path, sc: str, m: str, s: int) -> Path:
    return root / sc / m / f"seed_{s}" / "result.json"


def baseline(sc: str, m: str, s: int) -> Path:
    return result(S24 if (sc, m) == ("label-noise", "ftw") else S25, sc, m, s)


def primary(path: Path) -> float:
    return quality.primary(quality.RunResult(**read_result(path)), SUITES["steady"])


def per_seed(pairs: list[tuple[Path, Path]]) -> np.ndarray:
    return np.array([primary(a) - primary(b) for a, b in pairs])


def show(label: str, d: np.ndarray) -> None:
    print(f"  {label} {d.mean():+.4f}  per seed " + " ".join(f"{x:+.4f}" for x in d))


def main(root: Path) -> None:
    check = result(root, "label-noise-1of8", "ftw", 30)
    if check.exists():
        diff = primary(check) - primary(baseline("label-noise-1of8", "ftw", 30))
        print(f"reproducibility: ftw 1of8 seed 30 here − session 25: {diff:+.2e} "
              f"({'within' if abs(diff) <= 1e-6 else 'ABOVE'} 1e-6)")
    means = {}
    for sc in SETTINGS:
        seeds = [s for s in SEEDS if result(root, sc, V, s).exists()]
        if not seeds:
            print(f"## {sc}: no finished seeds")
            continue
        d = per_seed([(result(root, sc, V, s), baseline(sc, "ftw", s)) for s in seeds])
        means[sc] = d.mean()
        print(f"## {sc}: seeds {seeds}")
        show("ema − ftw", d)
        if sc == "label-noise-1of8":
            show("ema − greats", per_seed([(result(root, sc, V, s), baseline(sc, "greats", s))
                                           for s in seeds]))
            g = [s for s in SEEDS if result(root, sc, GV, s).exists()]
            if g:
                show(f"greats@ema − greats (seeds {g})", per_seed(
                    [(result(root, sc, GV, s), baseline(sc, "greats", s)) for s in g]))
        curves = np.mean([np.array(read_result(result(root, sc, V, s))["losses"])
                          - np.array(read_result(baseline(sc, "ftw", s))["losses"])
                          for s in seeds], axis=0)
        steps = read_result(result(root, sc, V, seeds[0]))["steps"]
        print("  held-out ema − ftw by step " + " ".join(
            f"{st}:{c:+.3f}" for st, c in zip(steps, curves, strict=True) if st in (4, 8, 16, 24)))
    if len(means) == len(SETTINGS):
        vals = np.array(list(means.values()))
        narrow = all(means[sc] < 0 for sc in NARROW)
        go = narrow and vals.mean() < 0 and vals.max() <= 0.010
        print(f"\nrule: both label-noise means < 0: {narrow}; mean of four {vals.mean():+.4f} "
              f"< 0; max {vals.max():+.4f} <= +0.010: "
              f"{'registered run follows' if go else 'stop'}")


def follow_up(root: Path) -> None:
    print("\nfollow-up (descriptive):")
    for sc, (ftw_root, seeds) in REST.items():
        done = [s for s in seeds if result(root, sc, V, s).exists()]
        if done:
            print(f"## {sc}: seeds {done}")
            show("ema − ftw", per_seed([(result(root, sc, V, s), result(ftw_root, sc, "ftw", s))
                                        for s in done]))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    follow_up(Path(sys.argv[1]))
