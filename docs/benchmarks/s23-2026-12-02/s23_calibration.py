"""Would a second-order subset rule point the right way? Read from the calibration logs of
sessions 20-22's registered runs (exploratory; no new runs).

Each step's log holds the target batch's realized decrease, the first-order prediction
``pred = ĝᵀΔθ`` of the update actually taken and ``quad = ½ ΔθᵀP⁻¹Δθ``. Fitting
``realized ≈ α·pred − c·quad`` per (setting, method) estimates the curvature ``c`` a rule
``η bᵀw − ½η² c wᵀKw`` would penalize with, and ``c·quad/pred`` the share of the
predicted gain that penalty takes at the step taken. Summed over a run, the target batches'
realized decreases (each measured on the batch the step was chosen on) set beside the
held-out decrease over the run (first minus last evaluation) show how much of the chosen
gain carries to examples the selection never saw.

    python docs/benchmarks/s23-2026-12-02/s23_calibration.py docs/benchmarks/s20-2026-12-01/raw-s22
"""
import collections
import glob
import json
import sys

import numpy as np

root = sys.argv[1]
steps = collections.defaultdict(list)
runs = collections.defaultdict(dict)
for f in sorted(glob.glob(f"{root}/*/*/seed_*/result.json")):
    r = json.load(open(f))
    cal = [c for c in r["calibration"] if c]
    steps[(r["scenario"], r["method"])] += [(c["realized"], c["pred"], c["quad"]) for c in cal]
    runs[(r["scenario"], r["seed"])][r["method"]] = (
        sum(c["pred"] for c in cal), sum(c["realized"] for c in cal),
        r["losses"][0] - r["losses"][-1])

print("setting | method | steps | realized/pred | corr | alpha | c | median c*quad/pred")
for (sc, m), v in sorted(steps.items()):
    real, pred, quad = np.array(v).T
    (alpha, c), *_ = np.linalg.lstsq(np.stack([pred, -quad], 1), real, rcond=None)
    share = np.median(c * quad / pred)
    print(f"{sc} | {m} | {len(real)} | {real.sum() / pred.sum():.3f} | "
          f"{np.corrcoef(real, pred)[0, 1]:.3f} | {alpha:.3f} | {c:.1f} | {share:+.3f}")

print("\nsetting | seeds | ftw: summed realized decrease (target batches) | held-out decrease"
      " | topk - ftw: summed predicted | summed realized | held-out decrease (mean over seeds)")
paired = collections.defaultdict(list)
for (sc, _seed), m in sorted(runs.items()):
    if "ftw" in m and "ftw@subset=topk" in m:
        paired[sc].append((*m["ftw"][1:], *np.subtract(m["ftw@subset=topk"], m["ftw"])))
for sc, d in sorted(paired.items()):
    fr, fh, dp, dr, dh = np.mean(d, axis=0)
    print(f"{sc} | {len(d)} | {fr:.3f} | {fh:.3f} | {dp:+.4f} | {dr:+.4f} | {dh:+.4f}")
