"""Session 26 (POOL.md): ftw − GREATS with a target pool of 256 against the default 32.

Per setting, mean over seeds: `Δ = (ftw − greats)@pool256 − (ftw − greats)@pool32` of the
primary (mean held-out loss, steps 20-24), and the reading POOL.md fixed. The pool-32 runs are
session 25's, on the same seeds and CPU kind.

    python docs/benchmarks/s26-2026-12-02/s26_pool.py runs/quality-s26-pool256
"""

import sys
from pathlib import Path

import numpy as np
from s26_nt32 import S25, SETTINGS, finished, primary, reading, show  # the same pairs


def main(root: Path) -> None:
    deltas = {}
    for sc, seeds in SETTINGS.items():
        if not (done := finished(root, sc, seeds)):
            continue
        gap = {pool: np.array([primary(folder, sc, "ftw", s) - primary(folder, sc, "greats", s)
                               for s in done])
               for pool, folder in ((32, S25), (256, root))}
        d = gap[256] - gap[32]
        deltas[sc] = d.mean()
        print(f"## {sc}: seeds {done}")
        show((("ftw − greats, pool 32 ", gap[32]), ("ftw − greats, pool 256", gap[256]),
              ("Δ                     ", d)))
    reading(deltas)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
