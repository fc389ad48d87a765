"""Session 12 analysis (PREREG.md): fresh-seed paired differences, and redundancy's ftw − greats
pooled with seeds 0-19 from their summary statistics (n 20, mean −0.053, sd from the CI)."""

import json
import math
import sys

import numpy as np
from scipy import stats

d = json.load(open(sys.argv[1]))
for sc, s in d.items():
    ps = {m: v["per_seed"]["primary"] for m, v in s["methods"].items()}
    au = {m: v["per_seed"]["auc"] for m, v in s["methods"].items()}
    common = sorted(set.intersection(*(set(p) for p in ps.values())), key=int)
    print(f"{sc}: {len(common)} common seeds {common[0]}..{common[-1]}")
    for m in ps:
        print(
            f"  {m:9s} primary {np.mean([ps[m][c] for c in common]):.4f}  "
            f"auc {np.mean([au[m][c] for c in common]):.4f}"
        )
    for m in ps:
        if m == "ftw":
            continue
        for name, src in (("primary", ps), ("auc", au)):
            x = np.array([src["ftw"][c] - src[m][c] for c in common])
            n = len(x)
            mu = x.mean()
            sd = x.std(ddof=1)
            h = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
            print(
                f"  ftw − {m:8s} {name:7s} {mu:+.4f} [{mu - h:+.4f}, {mu + h:+.4f}] "
                f"({n}; {int((x < 0).sum())}/{int((x > 0).sum())})"
            )
        if sc == "redundancy" and m == "greats":
            x = np.array([ps["ftw"][c] - ps[m][c] for c in common])
            n1, m1 = 20, -0.053
            s1 = 0.0565 * math.sqrt(20) / stats.t.ppf(0.975, 19)
            n2, m2, s2 = len(x), x.mean(), x.std(ddof=1)
            n = n1 + n2
            mu = (n1 * m1 + n2 * m2) / n
            ss = (n1 - 1) * s1**2 + (n2 - 1) * s2**2 + n1 * (m1 - mu) ** 2 + n2 * (m2 - mu) ** 2
            sd = math.sqrt(ss / (n - 1))
            h = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
            print(
                f"  pooled with seeds 0-19 (sd {s1:.3f}): ftw − greats {mu:+.4f} "
                f"[{mu - h:+.4f}, {mu + h:+.4f}] ({n})"
            )
