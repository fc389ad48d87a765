"""Write ``report.html``: one self-contained file, PNGs embedded as base64, copies in ``plots/``."""

from __future__ import annotations

import base64
import datetime
import html
import io
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from gradsift.report import plots
from gradsift.report.runs import Run, load_compare, load_run
from gradsift.report.summary import (
    fmt_number,
    ranked_methods,
    seconds_per_step,
    summary_from_runs,
    write_summary,
)

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.8em; }
.meta { color: #666; font-size: 0.9em; }
table { border-collapse: collapse; font-size: 0.92em; margin: 0.8em 0; }
th, td { padding: 0.35em 0.8em; border-bottom: 1px solid #ddd; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
.swatch { display: inline-block; width: 0.8em; height: 0.8em; margin-right: 0.4em;
          border-radius: 2px; vertical-align: baseline; }
figure { margin: 1.2em 0; } figcaption { color: #555; font-size: 0.88em; max-width: 60em; }
img { max-width: 100%; border: 1px solid #eee; }
.note { color: #555; font-size: 0.88em; max-width: 60em; }
"""


def _save(fig: Figure, path: Path) -> bytes:
    """Render ``fig`` as PNG to ``path`` and return the bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def _render_figures(figures: list[tuple[str, str, Figure | None]], plot_dir: Path) -> str:
    """Save each ``(name, caption, figure)`` under ``plot_dir`` and return the HTML blocks."""
    blocks = []
    for name, caption, fig in figures:
        if fig is None:
            continue
        png = _save(fig, plot_dir / f"{name}.png")
        b64 = base64.b64encode(png).decode("ascii")
        blocks.append(f'<figure id="{name}"><img alt="{html.escape(caption)}" '
                      f'src="data:image/png;base64,{b64}">'
                      f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    return "\n".join(blocks)


def _page(title: str, subtitle: str, body: str) -> str:
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
            f"<h1>{html.escape(title)}</h1><p class=\"meta\">{html.escape(subtitle)} · "
            f"generated {stamp}</p>\n{body}\n</body></html>\n")


def _summary_table(summary: dict[str, Any], colors: dict[str, str]) -> str:
    head = ["method", "seeds", "final target loss (mean ± std)", "AUC (mean loss)",
            "steps to random's final (reached)", "trained tokens", "wall s/step",
            "capture / target / selection / update s/step"]
    rows = []
    methods = summary["methods"]
    for name in ranked_methods(summary):
        m = methods[name]
        final, reach = m["final_target_loss"], m["steps_to_random_final"]
        std = "" if final["std"] is None else f" ± {final['std']:.4f}"
        split = " / ".join(f"{m['seconds_per_step'][p]:.3g}" for p in plots.PHASES)
        cells = [
            f'<span class="swatch" style="background:{colors[name]}"></span>'
            f"{html.escape(name)}",
            str(m["n_seeds"]),
            fmt_number(final["mean"], ".4f") + std,
            fmt_number(m["auc_target_loss"]["mean"], ".4f"),
            f"{fmt_number(reach['mean'], '.1f')} ({reach['reached']}/{reach['n']})",
            fmt_number(m["trained_tokens_mean"], ",.0f"),
            fmt_number(m["wall_seconds_per_step"], ".3f"),
            split,
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    header = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
    return f"<table>{header}{''.join(rows)}</table>"


def _paired_table(summary: dict[str, Any]) -> str:
    """The best method against each other, per seed (``gradsift.report.paired``)."""
    pairs = summary.get("paired") or []
    if not pairs:
        return ("<p class=\"note\">No paired differences: they need at least two methods "
                "with two or more common seeds.</p>")
    head = ["difference", "metric", "mean", "95 % interval", "seeds", "lower / higher",
            "sign test p", "seeds for 80 % power", "95 % interval over seeds and held-out examples"]
    rows = []
    for p in pairs:
        metric = "final target loss" if p["metric"] == "final_target_loss" else "AUC"
        c = p.get("over_examples")
        crossed = (f"[{c['lo']:+.4f}, {c['hi']:+.4f}] ({c['n_examples']} examples)" if c
                   else "–")
        cells = [html.escape(f"{p['best']} − {p['other']}"), metric, f"{p['mean']:+.4f}",
                 f"[{p['lo']:+.4f}, {p['hi']:+.4f}]", str(p["n"]),
                 f"{p['lower']} / {p['higher']}", f"{p['sign_p']:.2g}",
                 f"{p['seeds_for_80pct_power']:g}", crossed]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    header = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
    return f"<table>{header}{''.join(rows)}</table>"


def write_report(compare_dir: str | Path, skip_incomplete: bool = False) -> Path:
    """Summarize a compare directory and write ``DIR/report.html`` (plots also in ``DIR/plots/``).

    Also writes ``DIR/summary.json`` (see :func:`summarize_compare`).

    Args:
        compare_dir: holds ``<method>/seed_<seed>/`` run directories.
        skip_incomplete: skip (count and log) runs with a missing or malformed file.

    Returns:
        The path of ``report.html``, a single self-contained file.
    """
    compare_dir = Path(compare_dir)
    runs, skipped = load_compare(compare_dir, skip_incomplete)
    summary = summary_from_runs(runs, compare_dir, skipped)
    write_summary(summary, compare_dir)
    colors = plots.method_colors(list(runs))
    ftw = {m: rs for m, rs in runs.items() if m.startswith("ftw")}
    split = {m: s["seconds_per_step"] for m, s in summary["methods"].items()}
    figures = [
        ("target_loss_vs_steps", "Held-out target loss vs training step; line: mean over "
         "seeds, band: min–max over seeds.", plots.plot_target_loss(runs, colors, "step")),
        ("target_loss_vs_tokens", "Held-out target loss vs cumulative trained tokens (the "
         "methods may train on different amounts of text per step).",
         plots.plot_target_loss(runs, colors, "trained_tokens")),
        ("source_shares", "Share of each source among the selected samples over time (stacked "
         "areas); the dashed lines are the same stack for the candidate stream, so a band "
         "thicker than its dashed outline is over-selected.",
         plots.plot_source_shares(runs, colors)),
        ("ftw_weights", "Weights FTW gave its selected samples, and how many it selected per "
         "step.", plots.plot_weights(ftw, colors) if ftw else None),
        ("step_time", "Mean seconds per step by phase.", plots.plot_timing(runs, colors, split)),
    ]
    notes = []
    if summary["random_final_target_loss"] is None:
        notes.append("No <code>random</code> runs: steps to random's final loss are undefined.")
    else:
        notes.append(f"Random's final target loss (mean over seeds): "
                     f"{summary['random_final_target_loss']:.4f}.")
    if not ftw:
        notes.append("No method named <code>ftw*</code>: the weight histogram is omitted.")
    if summary["skipped"]:
        items = "".join(f"<li>{html.escape(s['path'])}: {html.escape(s['reason'])}</li>"
                        for s in summary["skipped"])
        notes.append(f"{len(summary['skipped'])} incomplete run(s) skipped:<ul>{items}</ul>")
    definitions = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>"
                          for k, v in summary["definitions"].items())
    body = (f"<h2>Summary</h2>{_summary_table(summary, colors)}"
            f"<p class=\"note\">{' '.join(notes)}</p>"
            f"<h2>Paired differences</h2>{_paired_table(summary)}"
            f"<ul class=\"note\">{definitions}</ul>"
            f"<h2>Plots</h2>{_render_figures(figures, compare_dir / 'plots')}")
    out = compare_dir / "report.html"
    out.write_text(_page("gradsift comparison", str(compare_dir), body), encoding="utf-8")
    return out


def _run_facts(run: Run) -> str:
    cfg, timing = run.config, seconds_per_step(run)
    facts = [
        ("method", run.method), ("seed", run.seed), ("model", cfg.get("model", "–")),
        ("candidates / budget per step",
         f"{run.setting('candidates_per_step') or '–'} / {run.setting('budget_per_step') or '–'}"),
        ("steps", run.steps),
        ("final target loss", fmt_number(run.final_target_loss, ".4f")),
        ("trained samples", fmt_number(run.last_metric("trained_samples"), ",.0f")),
        ("trained tokens", fmt_number(run.last_metric("trained_tokens"), ",.0f")),
        ("wall seconds", fmt_number(run.summary.get("wall_seconds") or run.last_metric(
            "wall_seconds"), ".1f")),
        ("s/step capture / target / selection / update",
         " / ".join(f"{timing[p]:.3g}" for p in plots.PHASES)),
    ]
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
                   for k, v in facts)
    return f"<table>{rows}</table>"


def write_run_report(run_dir: str | Path) -> Path:
    """Write ``RUN_DIR/report.html`` for one run (plots also in ``RUN_DIR/plots/``).

    Plots: losses over steps, source shares of the selected samples, the weights (any method),
    the candidates' cosines with the target (when the selector logged them) and step time by
    phase.

    Args:
        run_dir: a run directory.

    Returns:
        The path of ``report.html``.
    """
    run_dir = Path(run_dir)
    run = load_run(run_dir, in_progress=True)  # a report of a run that is still going is fine
    runs = {run.method: [run]}
    colors = plots.method_colors([run.method])
    figures = [
        ("losses", "Held-out target loss at the evaluation steps, with the mean candidate loss "
         "and the weighted train loss of each step.", plots.plot_run_losses(run)),
        ("target_loss_vs_tokens", "Held-out target loss vs cumulative trained tokens.",
         plots.plot_target_loss(runs, colors, "trained_tokens")),
        ("source_shares", "Share of each source among the selected samples over time; dashed: "
         "the candidate stream.", plots.plot_source_shares(runs, colors)),
        ("weights", "Weights of the selected samples and how many were selected per step.",
         plots.plot_weights(runs, colors)),
        ("cosines", "Each candidate's cosine with the target direction in the optimizer's "
         "metric, per step (logged by ftw; min_cosine filters on it); filled: selected.",
         plots.plot_run_cosines(run)),
        ("step_time", "Seconds per step by phase.", plots.plot_run_timing(run)),
    ]
    body = (f"<h2>Run</h2>{_run_facts(run)}"
            f"<h2>Plots</h2>{_render_figures(figures, run_dir / 'plots')}")
    out = run_dir / "report.html"
    out.write_text(_page(f"gradsift run: {run.method}, seed {run.seed}", str(run_dir), body),
                   encoding="utf-8")
    return out

