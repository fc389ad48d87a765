"""Session 26 (NT32.md): ftw and GREATS with 32 target examples a step against 8.

Per setting, mean over seeds: `Δ = (ftw − greats)@32 − (ftw − greats)@8`, `ftw@32 − ftw@8` and
`greats@32 − greats@8` of the primary (mean held-out loss, steps 20-24), and the reading
NT32.md fixed. The runs at 8 are session 25's, on the same seeds and CPU kind.

    python docs/benchmarks/s26-2026-12-02/s26_nt32.py runs/quality-s26-nt32
"""

import sys
from pathlib import Path

import numpy as np

from gradsift.bench import quality
from gradsift.bench.scenarios import SUITES, read_result

S25 = Path(__file__).resolve().parent.parent / "s25-2026-12-02" / "raw"
SETTINGS = {"label-noise-1of8": (30, 31, 32), "label-noise": (36, 37, 38)}


def primary(root: Path, sc: str, m: str, s: int) -> float:
    res = read_result(root / sc / m / f"seed_{s}" / "result.json")
    return quality.primary(quality.RunResult(**res), SUITES["steady"])


def finished(root: Path, sc: str, seeds: tuple[int, ...]) -> list[int]:
    done = [s for s in seeds if all((root / sc / m / f"seed_{s}" / "result.json").exists()
                                    for m in ("ftw", "greats"))]
    if not done:
        print(f"## {sc}: no finished seeds")
    return done


def show(rows: tuple[tuple[str, np.ndarray], ...]) -> None:
    for label, x in rows:
        print(f"  {label} {x.mean():+.4f}  per seed " + " ".join(f"{v:+.4f}" for v in x))


def reading(deltas: dict[str, float]) -> None:
    if len(deltas) == len(SETTINGS):
        signs = {v < 0 for v in deltas.values()}
        print("\nreading: " + ("supported (Δ < 0 in both)" if signs == {True} else
                               "not supported (Δ >= 0 in both)" if signs == {False} else
                               "mixed"))


def main(root: Path) -> None:
    deltas = {}
    for sc, seeds in SETTINGS.items():
        if not (done := finished(root, sc, seeds)):
            continue
        p = {(m, n): np.array([primary(root if n == 32 else S25, sc, m, s) for s in done])
             for m in ("ftw", "greats") for n in (8, 32)}
        gap = {n: p["ftw", n] - p["greats", n] for n in (8, 32)}
        d = gap[32] - gap[8]
        deltas[sc] = d.mean()
        print(f"## {sc}: seeds {done}")
        show((("ftw − greats @8 ", gap[8]), ("ftw − greats @32", gap[32]),
              ("Δ               ", d),
              ("ftw@32 − ftw@8  ", p["ftw", 32] - p["ftw", 8]),
              ("greats@32 − @8  ", p["greats", 32] - p["greats", 8])))
    reading(deltas)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
