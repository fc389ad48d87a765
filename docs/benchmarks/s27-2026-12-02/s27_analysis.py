"""Session 27 (registered in PREREG.md): ftw − GREATS in label noise over seeds *and* held-out
examples, pooled with the earlier seeds, and where on the held-out questions the gap lies.

    python docs/benchmarks/s27-2026-12-02/s27_analysis.py runs/quality-s27
"""

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import scipy.stats

from gradsift.bench import quality
from gradsift.bench.scenarios import SUITES
from gradsift.report.paired import crossed_interval, describe, paired_comparison

STEADY = SUITES["steady"]
SETTINGS = ("label-noise-1of8", "label-noise")
HERE = Path(__file__).parent


def _pooled_module():
    spec = importlib.util.spec_from_file_location(
        "s25_pooled", HERE.parent / "s25-2026-12-02" / "s25_pooled.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def crossed_line(c: dict) -> str:
    """The registered normal interval, then (amendment 3) the t at Satterthwaite's df that
    ``crossed_interval`` gives since session 28."""
    half = 1.959963984540054 * np.sqrt(c["var"])
    return (f"{c['mean']:+.4f} [{c['mean'] - half:+.4f}, {c['mean'] + half:+.4f}] "
            f"(t, df {c['df']:.1f}: [{c['lo']:+.4f}, {c['hi']:+.4f}]) ({c['n_seeds']} seeds × "
            f"{c['n_examples']} examples; examples' share of the variance "
            f"{c['example_share']:.0%})")


def question_kind(prompt: str, answer: int) -> tuple[str, str]:
    m = re.search(r"What is (\d+) ([-+*]) (\d+)\?", prompt)
    op = {"+": "+", "-": "−", "*": "×"}[m.group(2)] if m else "?"
    return op, f"{len(str(abs(answer)))} digits{' (negative)' if answer < 0 else ''}"


def main(out: Path) -> None:
    results = quality.load_results(out)
    for sc in SETTINGS:
        runs = {(r.method, r.seed): r for r in results if r.scenario == sc}
        seeds = sorted(s for m, s in runs if m == "ftw" and ("greats", s) in runs)
        print(f"\n## {sc}: fresh seeds {seeds} (n={len(seeds)})")
        if len(seeds) < 2:
            continue
        ftw = {s: runs["ftw", s] for s in seeds}
        gr = {s: runs["greats", s] for s in seeds}
        prim = {m: {s: quality.primary(r, STEADY) for s, r in d.items()}
                for m, d in (("ftw", ftw), ("greats", gr))}
        print(f"mean primary: ftw {np.mean(list(prim['ftw'].values())):.4f}, "
              f"greats {np.mean(list(prim['greats'].values())):.4f}")
        print("1. ftw − greats over seeds:", describe(paired_comparison(prim["ftw"],
                                                                           prim["greats"])))
        d = np.stack([quality.example_primary(ftw[s], STEADY)
                      - quality.example_primary(gr[s], STEADY) for s in seeds])
        crossed = crossed_interval(d)
        print("1. ftw − greats over seeds and held-out examples:", crossed_line(crossed))
        # 3. pooled with every earlier steady seed (session 25's table and its sources)
        pooled = _pooled_module().collect(out)[sc]
        common = sorted(set(pooled["ftw"]) & set(pooled["greats"]))
        diffs = {s: pooled["ftw"][s] - pooled["greats"][s] for s in common}
        pooled_pair = paired_comparison(diffs, dict.fromkeys(common, 0.0))
        print(f"3. pooled ftw − greats, all {len(common)} seeds:", describe(pooled_pair))
        # not registered: the earlier seeds kept no example's loss; add the example term the
        # fresh seeds estimate (σ_b²/E: the same 64 examples, so the same term) to the pooled
        # seed variance
        sd = np.std(list(diffs.values()), ddof=1)
        half = scipy.stats.t.ppf(0.975, len(common) - 1) * np.sqrt(
            sd**2 / len(common) + crossed["example_term"])
        print(f"3'. pooled, with the fresh seeds' example term added (not registered): "
              f"{pooled_pair['mean']:+.4f} [{pooled_pair['mean'] - half:+.4f}, "
              f"{pooled_pair['mean'] + half:+.4f}]")
        # 4. where: the held-out questions by operation and by the answer's length
        target = [json.loads(x) for x in (out / sc / "data" / "target.jsonl").open()]
        held = target[: d.shape[1]]
        kinds = [question_kind(r["prompt"], int(r["correct_answer"])) for r in held]
        for i, label in ((0, "operation"), (1, "answer")):
            for k in sorted({kd[i] for kd in kinds}):
                cols = [j for j, kd in enumerate(kinds) if kd[i] == k]
                if len(cols) >= 2:
                    base = np.mean([quality.example_primary(gr[s], STEADY)[cols]
                                    for s in seeds])
                    print(f"4. {label} {k}: {len(cols)} examples, GREATS' loss {base:.3f}; "
                          f"ftw − greats {crossed_line(crossed_interval(d[:, cols]))}")
        # not registered: by how hard the question was for the base model (step 0's loss,
        # the same for both methods), in quarters
        base = np.array(ftw[seeds[0]].example_losses[0])
        cuts = np.quantile(base, [0.25, 0.5, 0.75])
        quarter = np.searchsorted(cuts, base, side="right")
        for q in range(4):
            cols = np.flatnonzero(quarter == q)
            print(f"4'. base-model loss quarter {q + 1} ({base[cols].min():.2f}-"
                  f"{base[cols].max():.2f}), {len(cols)} examples, GREATS' loss "
                  f"{np.mean([quality.example_primary(gr[s], STEADY)[cols] for s in seeds]):.3f}"
                  f"; ftw − greats {crossed_line(crossed_interval(d[:, cols]))} (not registered)")
        # not registered: when in the run the gap opens (mean over seeds at each evaluation)
        curve = np.array([np.subtract(ftw[s].losses, gr[s].losses) for s in seeds])
        print("5. ftw − greats by evaluation step (not registered): " + ", ".join(
            f"{st}: {m:+.3f}" for st, m in zip(ftw[seeds[0]].steps, curve.mean(axis=0),
                                               strict=True)))
        acc = [(s, ftw[s].correct, gr[s].correct) for s in seeds if ftw[s].correct]
        if acc:
            qs = [json.loads(x) for x in (out / sc / "data" / "accuracy.jsonl").open()]
            f_only = sum(a and not b for _, fa, ga in acc for a, b in zip(fa, ga, strict=True))
            g_only = sum(b and not a for _, fa, ga in acc for a, b in zip(fa, ga, strict=True))
            print(f"4. accuracy over {len(acc)} seeds × {len(qs)} questions: ftw "
                  f"{np.mean([np.mean(fa) for _, fa, _ in acc]):.1%}, GREATS "
                  f"{np.mean([np.mean(ga) for _, _, ga in acc]):.1%}; right for ftw only "
                  f"{f_only}, for GREATS only {g_only}")
            print("   accuracy ftw − greats over seeds and questions:", crossed_line(
                crossed_interval(np.array([np.array(fa, float) - np.array(ga, float)
                                           for _, fa, ga in acc]))))
            qk = [question_kind(r["prompt"], int(r["correct_answer"]))[0] for r in qs]
            for k in sorted(set(qk)):
                cols = [j for j, x in enumerate(qk) if x == k]
                fa = np.mean([[fa[j] for j in cols] for _, fa, _ in acc])
                ga = np.mean([[ga[j] for j in cols] for _, _, ga in acc])
                print(f"   operation {k}: {len(cols)} questions, ftw {fa:.1%}, GREATS {ga:.1%}")


def trained_mix(out: Path) -> None:
    """Not registered (descriptive): the share of each method's trained weight on arithmetic
    rows and on wrong answers, by third of the run (sessions 25-26 saw GREATS spend more of
    it off arithmetic late in label noise)."""
    print("\n## trained weight by third of the run (not registered, descriptive)")
    for sc in SETTINGS:
        for m in ("ftw", "greats"):
            acc = np.zeros((3, 3))  # thirds × (arithmetic, wrong, all)
            for f in sorted((out / sc / m).glob("seed_*/selections.jsonl")):
                seed = f.parent.name.removeprefix("seed_")
                stream = out / sc / "data" / f"stream_seed{seed}.jsonl"
                wrong = {r["id"]: r["wrong_answer"] for r in map(json.loads, stream.open())
                         if r.get("source") == "arithmetic"}
                for row in map(json.loads, f.open()):
                    third = min((row["step"] - 1) * 3 // STEADY.steps, 2)
                    for i, w in zip(row["selected_ids"], row["weights"], strict=True):
                        acc[third] += (w * (i in wrong), w * bool(wrong.get(i)), w)
            if acc[:, 2].sum():
                print(f"{sc} {m}: arithmetic " + " / ".join(
                    f"{a / t:.2f}" for a, _, t in acc) + "; wrong answers " + " / ".join(
                    f"{w / t:.3f}" for _, w, t in acc))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    trained_mix(Path(sys.argv[1]))
