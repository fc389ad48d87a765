"""The report's figures, one function per figure; each returns a matplotlib ``Figure`` (or None).

Figures are built with ``matplotlib.figure.Figure`` directly (no ``pyplot``, no global backend
switch); ``Figure.savefig`` renders PNGs with Agg. Every function takes ``{method: [runs]}``
and a ``{method: colour}`` map from :func:`method_colors`, so a method has one colour in every
figure.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from gradsift.report.runs import PHASES, Run

RANDOM_COLOR = "#7f7f7f"
PHASE_COLORS = {"capture": "#4c72b0", "target": "#dd8452", "selection": "#55a868",
                "update": "#c44e52"}
_METHOD_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf",
                   "#8c564b", "#e377c2", "#bcbd22"]
_SOURCE_PALETTE = ["#8dd3c7", "#fdb462", "#bebada", "#fb8072", "#80b1d3", "#b3de69",
                   "#fccde5", "#ffffb3", "#bc80bd", "#ccebc5", "#ffed6f", "#d9d9d9"]


def method_colors(methods: list[str]) -> dict[str, str]:
    """One colour per method: grey for ``random``, a distinct hue for each other, in order."""
    others = [m for m in methods if m != "random"]
    colors = {m: _METHOD_PALETTE[i % len(_METHOD_PALETTE)] for i, m in enumerate(others)}
    if "random" in methods:
        colors["random"] = RANDOM_COLOR
    return colors


def _style(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=11, loc="left")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3, linewidth=0.6)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)


def _thousands(x: float, _pos: int) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:g}{suffix}"
    return f"{x:g}"


def _mean_band(curves: list[tuple[list[float], list[float]]]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Mean, min and max over seeds, each seed linearly interpolated onto the union of x's
    within the range that every seed covers."""
    curves = [(np.asarray(x), np.asarray(y)) for x, y in curves if len(x)]
    if not curves:
        return None
    lo, hi = max(x[0] for x, _ in curves), min(x[-1] for x, _ in curves)
    grid = np.unique(np.concatenate([x for x, _ in curves]))
    grid = grid[(grid >= lo) & (grid <= hi)]
    if grid.size == 0:
        return None
    ys = np.stack([np.interp(grid, x, y) for x, y in curves])
    return grid, ys.mean(0), ys.min(0), ys.max(0)


def plot_target_loss(runs: dict[str, list[Run]], colors: dict[str, str],
                     x: str = "step") -> Figure | None:
    """Held-out target loss vs ``x`` (``"step"`` or ``"trained_tokens"``): mean line over
    seeds, min–max band. None when no run was evaluated."""
    fig = Figure(figsize=(8, 4.6), layout="constrained")
    ax = fig.add_subplot()
    drawn = False
    for method, method_runs in runs.items():
        band = _mean_band([r.eval_curve(x) for r in method_runs])
        if band is None:
            continue
        grid, mean, lo, hi = band
        n = len(method_runs)
        ax.plot(grid, mean, color=colors[method], linewidth=2,
                marker="o" if x == "step" and grid.size <= 30 else None, markersize=3.5,
                label=f"{method} (n={n})")
        if n > 1:
            ax.fill_between(grid, lo, hi, color=colors[method], alpha=0.18, linewidth=0)
        drawn = True
    if not drawn:
        return None
    xlabel = "training step" if x == "step" else "trained tokens (cumulative)"
    _style(ax, f"Target loss vs {'steps' if x == 'step' else 'trained tokens'} "
               "(line: mean over seeds, band: min–max)", xlabel, "held-out target loss")
    if x == "trained_tokens":
        ax.xaxis.set_major_formatter(FuncFormatter(_thousands))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(frameon=False)
    return fig


def _source_counts(method_runs: list[Run], sources: list[str]
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(steps, selected counts, candidate counts)``, counts ``(n_steps, n_sources)`` summed
    over seeds."""
    steps = sorted({int(s["step"]) for r in method_runs for s in r.selections})
    row = {s: i for i, s in enumerate(steps)}
    col = {s: j for j, s in enumerate(sources)}
    selected = np.zeros((len(steps), len(sources)))
    candidates = np.zeros_like(selected)
    for run in method_runs:
        for rec in run.selections:
            i = row[int(rec["step"])]
            source_of = dict(zip(rec["candidate_ids"], rec["candidate_sources"], strict=True))
            for src in rec["candidate_sources"]:
                candidates[i, col[src]] += 1
            for sid in rec["selected_ids"]:
                selected[i, col[source_of[sid]]] += 1
    return np.asarray(steps), selected, candidates


def _rolling_share(counts: np.ndarray, window: int) -> np.ndarray:
    """Share of each column over a trailing window of rows (rows with no counts carry the last
    share forward)."""
    csum = np.cumsum(counts, axis=0)
    rolled = csum - np.vstack([np.zeros((window, counts.shape[1])), csum[:-window]])[
        : counts.shape[0]]
    total = rolled.sum(1, keepdims=True)
    share = np.full_like(rolled, np.nan)
    np.divide(rolled, total, out=share, where=total > 0)
    for i in range(1, share.shape[0]):
        if np.isnan(share[i]).all():
            share[i] = share[i - 1]
    return np.nan_to_num(share)


def plot_source_shares(runs: dict[str, list[Run]], colors: dict[str, str]) -> Figure | None:
    """Per method (one row each), the share of each source among selected samples over time
    (stacked, trailing rolling window, pooled over seeds; dashed lines: the same stack for the
    candidate stream), and beside it the whole-run shares: selected vs stream."""
    sources = sorted({src for rs in runs.values() for r in rs for s in r.selections
                      for src in s["candidate_sources"]})
    methods = [m for m, rs in runs.items() if any(r.selections for r in rs)]
    if not sources or not methods:
        return None
    src_colors = [_SOURCE_PALETTE[i % len(_SOURCE_PALETTE)] for i in range(len(sources))]
    fig = Figure(figsize=(10, 1.0 + 2.2 * len(methods)), layout="constrained")
    axes = fig.subplots(len(methods), 2, squeeze=False, sharey=True, width_ratios=[7, 1])
    window = 1
    for (ax, ax_bar), method in zip(axes, methods, strict=True):
        steps, selected, candidates = _source_counts(runs[method], sources)
        window = max(1, min(50, round(len(steps) / 6)))  # ~6 windows per run, smooth
        cand_cum = np.cumsum(_rolling_share(candidates, window), axis=1)
        ax.stackplot(steps, _rolling_share(selected, window).T, colors=src_colors,
                     labels=sources, linewidth=0)
        for j in range(len(sources) - 1):
            ax.plot(steps, cand_cum[:, j], color="black", linestyle="--", linewidth=1,
                    label="candidate stream" if j == 0 else None)
        ax.set_ylim(0, 1)
        ax.set_xlim(steps[0], steps[-1])
        ax.set_title(method, fontsize=10, loc="left", color=colors[method], fontweight="bold")
        ax.set_ylabel("share of selected")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:.0%}"))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        # whole run: selected vs stream, side by side
        for x, counts in ((0, selected.sum(0)), (1, candidates.sum(0))):
            shares = counts / counts.sum() if counts.sum() > 0 else counts
            bottoms = np.concatenate([[0.0], np.cumsum(shares)[:-1]])
            ax_bar.bar(x, shares, bottom=bottoms, color=src_colors, width=0.7)
        ax_bar.set_xticks([0, 1], ["selected", "stream"], fontsize=8)
        ax_bar.set_title("whole run", fontsize=9)
        ax_bar.spines[["top", "right"]].set_visible(False)
    axes[-1, 0].set_xlabel("training step")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles[::-1], labels[::-1], loc="outside right center", frameon=False,
               title="source")
    fig.suptitle(f"Source shares among selected samples (trailing {window}-step window, "
                 "pooled over seeds); dashed: candidate stream", fontsize=11, x=0.01,
                 ha="left")
    return fig


def plot_weights(runs: dict[str, list[Run]], colors: dict[str, str]) -> Figure | None:
    """Histogram of every selected sample's weight, and of how many are selected per step,
    per method; the dashed line marks uniform weights over a full budget (1/k). None when no
    run selected anything."""
    data = {m: ([w for r in rs for s in r.selections for w in s["weights"]],
                [len(s["selected_ids"]) for r in rs for s in r.selections])
            for m, rs in runs.items()}
    data = {m: d for m, d in data.items() if d[0]}
    if not data:
        return None
    budgets = {r.setting("budget_per_step") for m in data for r in runs[m]}
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_w, ax_n = fig.subplots(1, 2, width_ratios=[3, 2])
    top = max(max(w) for w, _ in data.values())
    bins = np.linspace(0.0, top * 1.02, 41)
    max_n = max(max(n) for _, n in data.values())
    n_bins = np.arange(-0.5, max_n + 1.5)
    for method, (weights, n_selected) in data.items():
        for ax, values, b in ((ax_w, weights, bins), (ax_n, n_selected, n_bins)):
            ax.hist(values, bins=b, color=colors[method], alpha=0.3)
            ax.hist(values, bins=b, color=colors[method], histtype="step", linewidth=1.5,
                    label=f"{method} ({len(values):,} {'weights' if ax is ax_w else 'steps'})")
    if len(budgets) == 1 and isinstance(k := budgets.pop(), int) and k > 0:
        ax_w.axvline(1.0 / k, color="black", linestyle="--", linewidth=1,
                     label=f"uniform 1/k (k={k})")
        ax_n.axvline(k, color="black", linestyle="--", linewidth=1, label=f"budget k={k}")
    _style(ax_w, "Weights of selected samples (each step's weights sum to 1)", "weight",
           "count")
    _style(ax_n, "Samples selected per step", "selected per step", "steps")
    ax_n.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_w.legend(frameon=False)
    ax_n.legend(frameon=False)
    return fig


def plot_timing(runs: dict[str, list[Run]], colors: dict[str, str],
                split: dict[str, dict[str, float]]) -> Figure | None:
    """Mean seconds per step per method, as stacked horizontal bars by phase.

    Args:
        runs: ``{method: [runs]}`` (sets the order).
        colors: method colours (tick labels).
        split: ``{method: {phase: seconds}}``, e.g. the summary's ``seconds_per_step``.
    """
    methods = [m for m in runs if m in split]
    if not methods:
        return None
    fig = Figure(figsize=(8, 1.6 + 0.55 * len(methods)), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(methods))[::-1]
    left = np.zeros(len(methods))
    for phase in PHASES:
        widths = np.array([split[m][phase] for m in methods])
        ax.barh(y, widths, left=left, color=PHASE_COLORS[phase], label=phase, height=0.6)
        left += widths
    for yi, total in zip(y, left, strict=True):
        ax.text(total, yi, f"  {total:.3g} s", va="center", fontsize=9)
    ax.set_yticks(y, methods)
    for tick, m in zip(ax.get_yticklabels(), methods, strict=True):
        tick.set_color(colors[m])
        tick.set_fontweight("bold")
    ax.set_xlim(0, left.max() * 1.18 if left.max() > 0 else 1)
    _style(ax, "Where step time goes (mean seconds per step over steps and seeds)",
           "seconds per step", "")
    ax.grid(axis="y", visible=False)
    fig.legend(ncols=len(PHASES), loc="outside lower center", frameon=False)
    return fig


def plot_run_losses(run: Run) -> Figure:
    """One run: held-out target loss at evaluation steps, with the per-step mean candidate loss
    and weighted train loss (on the stream's batches) for context."""
    fig = Figure(figsize=(8, 4.6), layout="constrained")
    ax = fig.add_subplot()
    steps = [m["step"] for m in run.metrics]
    for key, label, color in (("candidate_loss", "candidate loss (mean over B)", "#bbbbbb"),
                              ("train_loss", "train loss (weighted, selected)", "#8fb3d9")):
        values = [m.get(key) for m in run.metrics]
        pts = [(s, v) for s, v in zip(steps, values, strict=True) if v is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), color=color, linewidth=1, label=label)
    x, y = run.eval_curve()
    if x:
        ax.plot(x, y, color="#1f77b4", linewidth=2.2, marker="o", markersize=4,
                label="held-out target loss")
    _style(ax, f"Losses — {run.method}, seed {run.seed}", "training step", "loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(frameon=False)
    return fig


def plot_run_cosines(run: Run) -> Figure | None:
    """One run: every candidate's cosine with the target direction in the optimizer's metric
    (``diagnostics.cosines``, logged by ``ftw``) per step; filled: selected, sized by weight.
    The dotted line is ``min_cosine`` when the run set one. None when no cosine was logged."""
    steps = [s for s in run.selections if (s.get("diagnostics") or {}).get("cosines")]
    if not steps:
        return None
    fig = Figure(figsize=(8, 4.2), layout="constrained")
    ax = fig.add_subplot()
    rest: tuple[list[int], list[float]] = ([], [])
    chosen: tuple[list[int], list[float], list[float]] = ([], [], [])
    for s in steps:
        weight = dict(zip(s["selected_ids"], s["weights"], strict=True))
        for cid, cos in zip(s["candidate_ids"], s["diagnostics"]["cosines"], strict=True):
            if cos is None:
                continue
            if cid in weight:
                chosen[0].append(s["step"])
                chosen[1].append(cos)
                chosen[2].append(weight[cid])
            else:
                rest[0].append(s["step"])
                rest[1].append(cos)
    ax.scatter(*rest, s=14, facecolors="none", edgecolors="#999999", linewidths=0.8,
               label=f"not selected ({len(rest[0]):,})")
    k = run.setting("budget_per_step")
    scale = 60.0 * (k if isinstance(k, int) and k > 0 else 1)  # uniform weights: size 60
    ax.scatter(chosen[0], chosen[1], s=[scale * w for w in chosen[2]], color="#1f77b4",
               alpha=0.8, label=f"selected ({len(chosen[0]):,}; area ∝ weight)")
    ax.axhline(0.0, color="black", linewidth=0.6)
    threshold = (run.config.get("method_options") or {}).get("min_cosine")
    if isinstance(threshold, (int, float)) and threshold > 0:
        ax.axhline(threshold, color="#d62728", linestyle=":", label=f"min_cosine {threshold}")
    _style(ax, f"Candidates' cosine with the target (optimizer's metric) — {run.method}",
           "training step", "cosine")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.legend(ncols=3, loc="outside lower center", frameon=False)
    return fig


def plot_run_timing(run: Run) -> Figure | None:
    """One run: seconds per step by phase over steps (stacked areas)."""
    if not run.selections:
        return None
    steps = [s["step"] for s in run.selections]
    phases = np.array([[float((s.get("timing") or {}).get(p) or 0.0) for s in run.selections]
                       for p in PHASES])
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.stackplot(steps, phases, colors=[PHASE_COLORS[p] for p in PHASES],
                 labels=[f"{p} ({v:.3g} s/step)" for p, v in zip(PHASES, phases.mean(1),
                                                                  strict=True)])
    ax.set_xlim(steps[0], steps[-1])
    _style(ax, "Where step time goes (per step)", "training step", "seconds")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], frameon=False, loc="upper left",
              bbox_to_anchor=(1.0, 1.0))
    return fig
