"""Score subset rules offline on bench.branch oracle tables (exploratory).

For each state: every k-subset's held-out loss after its uniform-weight step, b, K.
A rule maps (b, K) to a score per subset; reported: mean share of the oracle's gain over the
reference's 'before' loss, and the mean Spearman correlation of score with −loss over subsets.
"""

import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr


def rules(lams):
    def rho(b, K, s):
        w = np.zeros(len(b))
        w[list(s)] = 1 / len(s)
        q = w @ K @ w
        return (b @ w) / np.sqrt(q) if q > 0 else -np.inf

    def cos_sum(b, K, s):
        return sum(b[i] / np.sqrt(K[i, i]) for i in s)

    def b_sum(b, K, s):
        return sum(b[i] for i in s)

    out = {"rho (exhaustive)": rho, "top-2 by b_i/√K_ii (≈ cosine)": cos_sum, "sum of b": b_sum}
    for lam in lams:

        def util(b, K, s, lam=lam):
            w = np.zeros(len(b))
            w[list(s)] = 1 / len(s)
            return b @ w - lam * (w @ K @ w)

        out[f"bᵀw − {lam:g}·wᵀKw"] = util
    return out


files = [Path(f) for f in sys.argv[1:]]
states = []
for f in files:
    d = json.load(open(f))
    for row in d["steps"]:
        if "oracle_table" in row:
            states.append((f, row))
print(f"{len(states)} states from {len(files)} files")
# λ on the scale of b/K: median over states of mean(b)/mean(diag K)
scale = np.median(
    [
        np.mean(np.abs(r["oracle_table"]["alignment"]))
        / np.mean(np.diag(r["oracle_table"]["interaction"]))
        for _, r in states
    ]
)
lams = [scale * x for x in (0.25, 1, 4)]
R = rules(lams)
res = {name: {"share": [], "spearman": [], "gain": []} for name in R}
oracle_gain = []
res["ftw (its own weights)"] = {"share": [], "spearman": [], "gain": []}
res["ftw's rows at uniform weights"] = {"share": [], "spearman": [], "gain": []}
for _f, row in states:
    t = row["oracle_table"]
    b = np.array(t["alignment"])
    K = np.array(t["interaction"])
    subsets = [tuple(s) for s, _ in t["pairs"]]
    loss = np.array([l for _, l in t["pairs"]])
    before = row["before"]
    best = loss.min()
    gain = before - best
    oracle_gain.append(gain)
    for name, fn in R.items():
        sc = np.array([fn(b, K, s) for s in subsets])
        pick = int(np.argmax(sc))
        res[name]["share"].append((before - loss[pick]) / gain if gain > 0 else np.nan)
        res[name]["gain"].append(before - loss[pick])
        res[name]["spearman"].append(spearmanr(sc, -loss).statistic)
    ids = t["candidate_ids"]
    rows = tuple(sorted(ids.index(i) for i in row["selected"]["ftw"]))
    if len(rows) == len(subsets[0]):
        lu = dict(zip(subsets, loss, strict=True))[rows]
        res["ftw's rows at uniform weights"]["share"].append(
            (before - lu) / gain if gain > 0 else np.nan
        )
        res["ftw's rows at uniform weights"]["gain"].append(before - lu)
    res["ftw (its own weights)"]["gain"].append(before - row["after"]["ftw"])
    res["ftw (its own weights)"]["share"].append(
        (before - row["after"]["ftw"]) / gain if gain > 0 else np.nan
    )
print(f"λ scale (median |b|/K_ii): {scale:.3g}")
for name, v in res.items():
    sp = np.nanmean(v["spearman"]) if v["spearman"] else float("nan")
    tot = sum(v["gain"]) / sum(oracle_gain) if len(v["gain"]) == len(oracle_gain) else float("nan")
    print(
        f"{name:36s} total gain / oracle's {tot:.3f}   mean share per state "
        f"{np.nanmean(v['share']):.3f}   spearman(score, −loss) {sp:+.3f}"
    )
