"""Session 26 (POOL.md): ftw − GREATS with a target pool of 256 against the default 32.

Per setting, mean over seeds: `Δ = (ftw − greats)@pool256 − (ftw − greats)@pool32` of the
primary (mean held-out loss, steps 20-24), and the reading POOL.md fixed. The pool-32 runs are
session 25's, on the same seeds and CPU kind.

    python docs/benchmarks/s26-2026-12-02/s26_pool.py runs/quality-s26-pool256
"""

import sys
from pathlib import Path

import numpy as np
from s26_nt32 import S25, SETTINGS, primary  # this folder: the same settings and pairs


def main(root: Path) -> None:
    deltas = {}
    for sc, seeds in SETTINGS.items():
        done = [s for s in seeds if all((root / sc / m / f"seed_{s}" / "result.json").exists()
                                        for m in ("ftw", "greats"))]
        if not done:
            print(f"## {sc}: no finished seeds")
            continue
        gap = {pool: np.array([primary(folder, sc, "ftw", s) - primary(folder, sc, "greats", s)
                               for s in done])
               for pool, folder in ((32, S25), (256, root))}
        d = gap[256] - gap[32]
        deltas[sc] = d.mean()
        print(f"## {sc}: seeds {done}")
        for label, x in (("ftw − greats, pool 32 ", gap[32]), ("ftw − greats, pool 256", gap[256]),
                         ("Δ                     ", d)):
            print(f"  {label} {x.mean():+.4f}  per seed " + " ".join(f"{v:+.4f}" for v in x))
    if len(deltas) == len(SETTINGS):
        signs = {v < 0 for v in deltas.values()}
        print("\nreading: " + ("supported (Δ < 0 in both)" if signs == {True} else
                               "not supported (Δ >= 0 in both)" if signs == {False} else
                               "mixed"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
