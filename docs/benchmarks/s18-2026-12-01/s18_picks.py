"""Session 18, descriptive (not registered): which arithmetic rows each selector trains on.

From the logged selections (``selections.jsonl``) of every finished fresh run: per method, over
all steps, the share of picks that are arithmetic and wrong; how often an offered wrong answer
was picked against an offered right one (and their ratio); the mean loss of the arithmetic
rows picked against that of the arithmetic rows offered in the same batch (a rank in 0..1 of
the pick among the batch's arithmetic rows by loss, 1 = the highest); the largest weight.
At step 1, where every method chooses from the same state, candidates and target batch: how
often ftw's rows equal the other method's, and the mean loss of the rows only one of them took.

    python docs/benchmarks/s18-2026-12-01/s18_picks.py runs/quality-s18
"""

import json
import sys
from pathlib import Path

import numpy as np

SETTINGS = {"label-noise": ("ftw", "greats", "cosine"),
            "label-noise-1of8": ("ftw", "greats", "cosine"), "code": ("ftw", "cosine")}


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wrong_ids(data: Path) -> set[str]:
    return {r["id"] for r in records(data / "stream.jsonl") if r.get("wrong_answer")}


def rank_of(loss: float, offered: list[float]) -> float:
    """The pick's place among the offered rows by loss: 0 the lowest, 1 the highest."""
    if len(offered) < 2:
        return float("nan")
    return sum(x < loss for x in offered) / (len(offered) - 1)


def main(out: Path) -> None:
    for setting, methods in SETTINGS.items():
        if not (out / setting).exists():
            continue
        wrong = wrong_ids(out / setting / "data")
        logs = {m: {int(p.parent.name.split("_")[1]): records(p)
                    for p in (out / setting / m).glob("seed_*/selections.jsonl")
                    if (p.parent / "result.json").exists() and
                    int(p.parent.name.split("_")[1]) >= 10}
                for m in methods}
        print(f"## {setting}: fresh runs " + ", ".join(f"{m} {len(logs[m])}" for m in methods))
        for m in methods:
            picks = ranks = wrongs = arith = 0
            rank_sum, top_w = 0.0, []
            taken: dict[bool, list[bool]] = {True: [], False: []}  # offered arithmetic: wrong?
            shrink = []  # ftw's NNLS share s of the weights
            for log in logs[m].values():
                for r in log:
                    by_id = dict(zip(r["candidate_ids"], zip(r["candidate_sources"],
                                                             r["losses"], strict=True),
                                     strict=True))
                    offered = [loss for src, loss in by_id.values() if src == "arithmetic"]
                    chosen = set(r["selected_ids"])
                    for cid, (src, _) in by_id.items():
                        if src == "arithmetic":
                            taken[cid in wrong].append(cid in chosen)
                    for cid in r["selected_ids"]:
                        picks += 1
                        src, loss = by_id[cid]
                        if src == "arithmetic":
                            arith += 1
                            wrongs += cid in wrong
                            rank = rank_of(loss, offered)
                            if rank == rank:
                                rank_sum, ranks = rank_sum + rank, ranks + 1
                    if r["weights"]:
                        top_w.append(max(r["weights"]))
                    if r["diagnostics"].get("shrink") is not None:
                        shrink.append(r["diagnostics"]["shrink"])
            p_wrong, p_right = np.mean(taken[True]), np.mean(taken[False])
            print(f"  {m:7s} picks {picks}: arithmetic {arith / max(picks, 1):.0%}, wrong "
                  f"{wrongs} ({wrongs / max(arith, 1):.0%} of arithmetic); an offered wrong "
                  f"answer picked {p_wrong:.3f} (of {len(taken[True])}), a right one "
                  f"{p_right:.3f} (of {len(taken[False])}), ratio {p_wrong / p_right:.2f}; "
                  f"loss rank of an arithmetic pick among the batch's "
                  f"{rank_sum / max(ranks, 1):.2f}; largest weight {np.mean(top_w):.2f}"
                  + (f"; shrink s {np.mean(shrink):.2f}" if shrink else ""))
        for other in methods[1:]:
            same, only_ftw, only_other = 0, [], []
            seeds = sorted(set(logs["ftw"]) & set(logs[other]))
            for s in seeds:
                a, b = logs["ftw"][s][0], logs[other][s][0]
                assert a["candidate_ids"] == b["candidate_ids"], (setting, s)
                loss = dict(zip(a["candidate_ids"], a["losses"], strict=True))
                fa, fb = set(a["selected_ids"]), set(b["selected_ids"])
                same += fa == fb
                only_ftw += [loss[c] for c in fa - fb]
                only_other += [loss[c] for c in fb - fa]
            if seeds:
                mean_a, mean_b = (np.mean(x) if x else float("nan") for x in (only_ftw, only_other))
                print(f"  step 1, ftw vs {other}: same rows on {same} of {len(seeds)} seeds; "
                      f"rows only ftw took: {len(only_ftw)}, mean loss {mean_a:.2f}; only "
                      f"{other}: {len(only_other)}, {mean_b:.2f}")
        print()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
