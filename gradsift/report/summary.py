"""Per-method numbers over seeds, and the markdown table that shows them.

Definitions (per run, then aggregated over a method's seeds):

- **final target loss**: ``summary.json``'s ``final_target_loss`` (the last evaluated loss when
  that is null). Reported as mean and sample standard deviation (``ddof=1``; null with one seed).
- **AUC**: the area under the target-loss curve by the trapezoid rule over the evaluation steps,
  divided by the step span ``s_last − s_first``:
  ``AUC = Σ_j (s_{j+1} − s_j)(L_j + L_{j+1}) / 2 / (s_last − s_first)``. It is a mean target
  loss over training (same units as the loss; lower is better, and it rewards getting there
  early). With a single evaluation it is that loss; a NaN evaluation (divergence) makes it NaN.
- **steps to random's final loss**: the threshold is the mean over seeds of the ``random``
  method's final target loss; per seed, the first evaluation step whose target loss is ``<=``
  it (null if never, or if there are no ``random`` runs). Reported as the mean over the seeds
  that reached it, with how many did.
- **trained tokens**, **wall seconds**: means over seeds of the last cumulative values.
- **paired**: the method with the lowest mean final target loss against each other method, on
  the seeds both ran (a seed gives every method the same stream order, initialisation and target
  draws): per metric (final target loss, AUC) the mean difference with its 95 % t-interval, the
  sign count and test, and the seeds needed for 80 % power (``gradsift.report.paired``). For
  the final loss, where every run logged each held-out example's loss (``eval_losses.jsonl``),
  also ``over_examples``: the interval over seeds *and* held-out examples (crossed random
  effects, ``crossed_interval``); the t-interval over seeds speaks only for the examples held
  out.
- **seconds per step**: per phase (capture, target, selection, update) the mean over steps of
  ``selections.jsonl``'s ``timing``, then the mean over seeds; ``wall_seconds_per_step`` is
  wall seconds / steps (includes evaluation and logging).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from gradsift.report.paired import (
    crossed_interval,
    describe,
    describe_crossed,
    paired_comparison,
)
from gradsift.report.runs import PHASES, Run, load_compare

RANDOM = "random"


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _std(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.std(vals, ddof=1)) if len(vals) >= 2 else None


def trapezoid_auc(steps: list[float], losses: list[float]) -> float | None:
    """Mean loss over training: trapezoid area under ``losses(steps)`` / ``(steps[-1] − steps[0])``.

    Args:
        steps: evaluation steps, ascending.
        losses: target loss at each of them.

    Returns:
        The normalized area; the loss itself with one point; None with none.
    """
    if not steps:
        return None
    if len(steps) == 1 or steps[-1] == steps[0]:
        return float(losses[-1])
    x, y = np.asarray(steps, dtype=float), np.asarray(losses, dtype=float)
    area = float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))
    return area / float(x[-1] - x[0])


def steps_to_reach(run: Run, threshold: float | None) -> int | None:
    """First evaluation step with target loss ``<= threshold`` (None if never or no threshold)."""
    if threshold is None:
        return None
    for step, loss in zip(*run.eval_curve(), strict=True):
        if loss <= threshold:
            return int(step)
    return None


def seconds_per_step(run: Run) -> dict[str, float]:
    """Mean seconds per step of each phase, from ``selections.jsonl``'s ``timing``."""
    out = {}
    for phase in PHASES:
        values = [float((s.get("timing") or {}).get(phase) or 0.0) for s in run.selections]
        out[phase] = float(np.mean(values)) if values else 0.0
    return out


def summarize_runs(runs: dict[str, list[Run]]) -> dict[str, dict[str, Any]]:
    """The per-method summary (see the module docstring for every definition).

    Args:
        runs: ``{method: [runs over seeds]}``.

    Returns:
        ``{method: {...}}`` in the order of ``runs``.
    """
    random_final = _mean([r.final_target_loss for r in runs.get(RANDOM, [])])
    methods: dict[str, dict[str, Any]] = {}
    for method, method_runs in runs.items():
        finals = [r.final_target_loss for r in method_runs]
        aucs = [trapezoid_auc(*r.eval_curve(finite=False)) for r in method_runs]
        reach = {str(r.seed): steps_to_reach(r, random_final) for r in method_runs}
        reached = [s for s in reach.values() if s is not None]
        timings = [seconds_per_step(r) for r in method_runs]
        split = {p: float(np.mean([t[p] for t in timings])) for p in PHASES}
        walls = [r.last_metric("wall_seconds") if r.summary.get("wall_seconds") is None
                 else float(r.summary["wall_seconds"]) for r in method_runs]
        methods[method] = {
            "seeds": [r.seed for r in method_runs],
            "n_seeds": len(method_runs),
            "final_target_loss": {"mean": _mean(finals), "std": _std(finals)},
            "auc_target_loss": {"mean": _mean(aucs), "std": _std(aucs)},
            "steps_to_random_final": {
                "mean": _mean(reached),
                "reached": len(reached),
                "n": len(method_runs),
                "per_seed": reach,
            },
            "trained_tokens_mean": _mean([r.last_metric("trained_tokens") for r in method_runs]),
            "trained_samples_mean": _mean([r.last_metric("trained_samples")
                                           for r in method_runs]),
            "steps_mean": _mean([r.steps for r in method_runs]),
            "wall_seconds_mean": _mean(walls),
            "wall_seconds_per_step": _mean([w / r.steps if w is not None and r.steps else None
                                            for w, r in zip(walls, method_runs, strict=True)]),
            "seconds_per_step": {**split, "total": float(sum(split.values()))},
        }
    return methods


def paired_against_best(runs: dict[str, list[Run]],
                        methods: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The best method (lowest mean final target loss in ``methods``, the output of
    :func:`summarize_runs`) minus each other method, per seed, for the final target loss and
    the AUC: ``{"best", "other", "metric", **comparison}`` for every pair with at least two
    common finite seeds."""
    ranked = ranked_methods({"methods": methods})
    if len(ranked) < 2:
        return []
    best = ranked[0]
    metrics = {"final_target_loss": lambda r: r.final_target_loss,
               "auc_target_loss": lambda r: trapezoid_auc(*r.eval_curve(finite=False))}
    out = []
    for other in ranked[1:]:
        for metric, value in metrics.items():
            per_seed = {name: {r.seed: value(r) for r in runs[name] if value(r) is not None}
                        for name in (best, other)}
            pair = paired_comparison(per_seed[best], per_seed[other])
            if pair is None:
                continue
            if metric == "final_target_loss":
                crossed = final_over_examples(runs[best], runs[other])
                if crossed is not None:
                    pair["over_examples"] = crossed
            out.append({"best": best, "other": other, "metric": metric, **pair})
    return out


def final_over_examples(mine: list[Run], other: list[Run]) -> dict[str, Any] | None:
    """``mine − other`` in each held-out example's final loss, over the seeds both ran and the
    examples (``crossed_interval``): the interval also carries which examples were held out.
    None unless every such seed logged every example's final loss, finite, on the same ids."""
    finals = [{r.seed: r.final_example_losses for r in runs} for runs in (mine, other)]
    seeds = sorted(set(finals[0]) & set(finals[1]))
    if len(seeds) < 2:
        return None
    ids = list(finals[0][seeds[0]] or {})
    rows = []
    for seed in seeds:
        a, b = finals[0][seed], finals[1][seed]
        if a is None or b is None or list(a) != ids or list(b) != ids:
            return None
        if any(a[i] is None or b[i] is None for i in ids):  # a diverged evaluation
            return None
        rows.append([a[i] - b[i] for i in ids])
    if len(ids) < 2 or not np.isfinite(rows).all():
        return None
    return crossed_interval(rows)


def summarize_compare(compare_dir: str | Path, skip_incomplete: bool = False) -> dict[str, Any]:
    """Summarize a compare directory and write it to ``DIR/summary.json``.

    Args:
        compare_dir: holds ``<method>/seed_<seed>/`` run directories.
        skip_incomplete: skip (count and log) runs with a missing or malformed file instead of
            raising.

    Returns:
        ``{"compare_dir", "random_final_target_loss", "definitions", "methods", "skipped"}``;
        ``methods`` maps each method to the numbers defined in this module's docstring.

    Raises:
        MissingRunFileError: a run lacks a file (named in the message), unless skipped.
    """
    runs, skipped = load_compare(compare_dir, skip_incomplete)
    summary = summary_from_runs(runs, compare_dir, skipped)
    write_summary(summary, compare_dir)
    return summary


def write_summary(summary: dict[str, Any], compare_dir: str | Path) -> Path:
    """Write ``summary`` to ``DIR/summary.json`` and return the path."""
    from gradsift.jsonio import json_safe, write_text_atomic

    out = Path(compare_dir) / "summary.json"  # strict JSON: NaN/inf become null
    return write_text_atomic(out, json.dumps(json_safe(summary), indent=2,
                                             allow_nan=False) + "\n")


def summary_from_runs(runs: dict[str, list[Run]], compare_dir: str | Path,
                      skipped: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """The summary dict of :func:`summarize_compare` from runs already loaded (writes nothing)."""
    methods = summarize_runs(runs)
    return {
        "compare_dir": str(compare_dir),
        "random_final_target_loss": _mean([r.final_target_loss for r in runs.get(RANDOM, [])]),
        "definitions": {
            "auc_target_loss": "trapezoid area under target loss vs step over the evaluation "
                               "steps, divided by the step span: a mean target loss",
            "steps_to_random_final": "first evaluation step with target loss <= the mean over "
                                     "seeds of random's final target loss; mean over seeds "
                                     "that reached it",
            "std": "sample standard deviation over seeds (ddof=1); null with one seed",
            "paired": "the best method (lowest mean final target loss) minus each other, per "
                      "seed both ran: mean, 95 % t-interval, seeds lower / higher, sign test, "
                      "and the seeds a paired t-test needs for 80 % power at that mean; "
                      "over_examples (final loss): the interval over seeds and held-out "
                      "examples (crossed random effects)",
        },
        "methods": methods,
        "paired": paired_against_best(runs, methods),
        "skipped": skipped or [],
    }


def fmt_number(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec``, or an en dash for None."""
    return "–" if value is None else format(value, spec)


def ranked_methods(summary: dict[str, Any]) -> list[str]:
    """Method names by mean final target loss, best first (methods without one last)."""
    methods = summary["methods"]

    def key(name: str) -> tuple[float, str]:
        mean = methods[name]["final_target_loss"]["mean"]
        return (mean if mean is not None and np.isfinite(mean) else float("inf"), name)

    return sorted(methods, key=key)


def markdown_table(summary: dict[str, Any]) -> str:
    """The summary as a markdown table, methods ordered by mean final target loss.

    Args:
        summary: as returned by :func:`summarize_compare`.

    Returns:
        The table (no trailing newline), with a footnote line on skipped runs if any.
    """
    header = ("| method | seeds | final target loss | AUC (mean loss) | steps to random's final "
              "| trained tokens | s/step (wall) |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|"]
    methods = summary["methods"]
    for name in ranked_methods(summary):
        m = methods[name]
        final, auc, reach = m["final_target_loss"], m["auc_target_loss"], m["steps_to_random_final"]
        final_s = fmt_number(final["mean"], ".4f") + ("" if final["std"] is None
                                                else f" ± {final['std']:.4f}")
        reach_s = f"{fmt_number(reach['mean'], '.1f')} ({reach['reached']}/{reach['n']})"
        tokens = m["trained_tokens_mean"]
        lines.append(
            f"| {name} | {m['n_seeds']} | {final_s} | {fmt_number(auc['mean'], '.4f')} | {reach_s} "
            f"| {fmt_number(tokens, ',.0f')} | {fmt_number(m['wall_seconds_per_step'], '.3f')} |")
    for p in summary.get("paired", []):
        metric = "final" if p["metric"] == "final_target_loss" else "AUC"
        lines.append(f"\npaired {p['best']} − {p['other']} ({metric}): {describe(p)}")
        if p.get("over_examples"):
            lines.append(f"\npaired {p['best']} − {p['other']} ({metric}), over seeds and "
                         f"held-out examples: {describe_crossed(p['over_examples'])}")
    if summary.get("skipped"):
        lines.append(f"\n{len(summary['skipped'])} incomplete run(s) skipped.")
    return "\n".join(lines)
