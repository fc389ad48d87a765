"""One-step gains from common states: whose selection moves the held-out target loss most?

A full-run comparison (``gradsift.bench.quality``) mixes two things: what a method selects
at a step, and where its earlier selections took the model. Runs of two methods part at the
first step they choose differently, and from then on their losses differ by the chaos of
fine-tuning as much as by the quality of their choices. This bench takes the second part
out. It follows one reference trajectory (``--reference``, ``random`` by default: no
compared selector shapes the states). At every step, from the same parameters, optimizer
state, candidates and target batch, every method selects; each distinct selection's AdamW
update (clipped like the engine's) is applied to a copy of the state and the held-out target
loss is measured on the same examples. Then the reference's step is kept and the next state
follows. Per state and method::

    gain_m(t) = L(θ_t) − L(θ_t + Δ_m)

the held-out loss decrease of method ``m``'s step: what gradsift is built to maximize, how
far the next AdamW update moves the model towards the target. Two methods that select the
same rows with the same weights have the same gain, exactly. Reported per scenario: the mean
gain per method, its ratio to random's, how often it chose the rows ftw chose, and the paired
difference of the loss after the step, ``L(ftw) − L(m)``, with a 95 % t-interval over seeds
(each seed's differences averaged over its steps first, so the correlated states of one
trajectory count once), and a two-sided sign test over the states where the two differ (this
one treats the states as independent).

``--horizon H`` asks whether a one-step lead lasts: the run is cut into segments of ``H``
steps, and from each segment's first state every method trains ``H`` steps on its own
selections (the same candidates and target draws for all) before the held-out loss is
compared; the reference's segment is the trajectory (``run_rollouts``; a capture per method
and step, so about ``H`` times the cost of ``H = 1``, whose methods share one capture).

Every (scenario, seed) writes ``<out>/<scenario>/ref-<reference>[-h<H>]/seed_<s>/branch.json``; a
restarted run skips those that hold every requested method. The report goes to
``<out>/branch.md`` and ``<out>/branch.png`` (the paired differences with their intervals).
``--suite smoke`` runs the tiny model in seconds (``make test``).

Usage::

    python -m gradsift.bench.branch --suite full [--out runs/branch] [--seeds 0,1,2,3,4]
        [--scenarios label-noise,code] [--methods ftw,greats,cosine,random]
        [--reference random] [--horizon 1] [--jobs N | --shard I/N] [--threads 1]
        [--device cuda] [--report-only]
        [--stream my_stream.jsonl --target my_target.jsonl [--name mine]
         [--candidates 8 --budget 2] [--eval-size 64]]

``--stream``/``--target`` add a user's own data as one more scenario (as in
``gradsift.bench.quality``: the target's first ``--eval-size`` records are the held-out set;
``--candidates``/``--budget`` default to the suite's B and k, 8 and 2 in ``full``).

The method ``oracle`` (one step only) is the best choice in hindsight: every ``k``-subset of
the ``B`` candidates at uniform weights is stepped and evaluated, and the lowest held-out loss
kept. It bounds what any uniform-weight choice could gain from a state (chosen on the same
held-out examples that score it, so it is optimistic by their noise) and costs ``C(B, k)``
evaluations a state (more than ``MAX_ORACLE_SUBSETS`` are refused: ``--suite steady``'s
C(16, 4) = 1820). Each state's row then also keeps the whole table, ``oracle_table``, so
that any subset rule can be scored offline, without a model:

    candidate_ids: the B candidates' ids (``selected`` names rows by id)
    pairs:       [[i, j, ...], loss]   every k-subset at uniform weights, held-out loss after
    alignment:   b_i = ⟨g_i, P ĝ⟩      (ĝ = g_V, P = Adam's 1/(√v̂ + ε) at that state)
    interaction: K_ij = ⟨g_i, P g_j⟩
    target_cross: ⟨g_i, P h_t⟩ per target example t (B × n_t; when a method read them)
    target_sq_norm: ĝᵀPĝ
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import logging
import math
import sys
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradsift.bench.progress import about, runs_to_do
from gradsift.bench.scenarios import (
    MAX_GRAD_NORM,
    SUITES,
    Scenario,
    Suite,
    add_device_argument,
    add_jobs_argument,
    add_own_data_arguments,
    build_data,
    check_jobs,
    choose_scenarios,
    claim_out_folder,
    device_kind,
    make_trainer,
    parse_method,
    read_result,
    run_jobs,
    sizes_line,
    stream_ended,
    with_own_data,
    write_result,
    write_summary,
)
from gradsift.engine import OnlineTrainer
from gradsift.objective import alignment_and_interaction, target_sq_norm
from gradsift.report.paired import paired_interval, seeds_for_power, sign_test
from gradsift.select import Selection, SelectionContext, Selector, get_selector
from gradsift.update import set_weighted_gradients

logger = logging.getLogger(__name__)

METHODS = ("ftw", "greats", "cosine", "random", "opus", "gradnorm", "loss",
           "ftw-filter-only", "ftw-nnls", "ftw-weight-only", "ftw-sgd",
           "ftw-next-step-weights", "ftw-next-step", "ftw@subset=uniform",
           "ftw@subset=uniform@weighting=uniform")


# the best k-subset at uniform weights in hindsight (module docstring); not a selector
ORACLE = "oracle"
MAX_ORACLE_SUBSETS = 500  # C(B, k) held-out evaluations a state; C(16, 4) = 1820 is refused


class _Branches(Selector):
    """Selects with the reference; every other method selects on the same context too,
    each with a generator of its own (so the reference's draws are its own as well)."""

    name = "branches"
    needs = "grads"
    needs_target = True

    def __init__(self, methods: dict[str, Selector], reference: str, seed: int):
        super().__init__()
        self.methods, self.reference = methods, reference
        self.generators = {m: torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(
            m.encode())) for m in methods if m != reference}
        self.ctx: SelectionContext | None = None
        self.choices: dict[str, Selection] = {}

    @property
    def needs_target_samples(self) -> bool:
        return any(s.needs_target_samples for s in self.methods.values())

    def select(self, ctx: SelectionContext) -> Selection:
        self.ctx, self.choices = ctx, {}
        for m, selector in self.methods.items():
            if m != self.reference:
                self.choices[m] = selector.select(
                    dataclasses.replace(ctx, generator=self.generators[m]))
        self.choices[self.reference] = self.methods[self.reference].select(ctx)
        return self.choices[self.reference]


def _key(sel: Selection) -> tuple:
    """Selections that make the same update (same rows, weights equal to 1e-6)."""
    order = torch.argsort(sel.indices)
    return (tuple(sel.indices[order].tolist()),
            tuple(round(float(w), 6) for w in sel.weights[order]))


def _state(trainer: OnlineTrainer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return ({n: p.detach().clone() for n, p in trainer.params.items()},
            copy.deepcopy(trainer.optimizer.state_dict()))


@torch.no_grad()
def _restore(trainer: OnlineTrainer, state: tuple[dict[str, torch.Tensor], dict[str, Any]]
             ) -> None:
    params, optim = state
    for n, p in trainer.params.items():
        p.copy_(params[n])
    # load_state_dict keeps tensors it need not cast: hand it a copy, keep the snapshot intact
    trainer.optimizer.load_state_dict(copy.deepcopy(optim))


def _step_and_evaluate(trainer: OnlineTrainer, ctx: SelectionContext, sel: Selection
                       ) -> float:
    """Apply ``sel``'s update from the current state as the engine does (``Σ w_i g_i`` from
    the factors, clipped to ``MAX_GRAD_NORM``, one AdamW step) and evaluate."""
    if sel.indices.numel() > 0:
        weights = torch.zeros(len(ctx.candidates))
        weights[sel.indices] = sel.weights.float()
        # every trainable parameter is captured (run_branches checks): no graph is needed
        set_weighted_gradients([], ctx.candidates, weights, trainer.params, [])
        norm = torch.nn.utils.clip_grad_norm_(list(trainer.params.values()), MAX_GRAD_NORM)
        if torch.isfinite(norm):
            trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
    return trainer.evaluate()


def _uniform_subsets(ctx: SelectionContext) -> list[Selection]:
    """Every ``k``-subset of the candidates at uniform weights."""
    n = len(ctx.candidates)
    k = min(ctx.k, n)
    return [Selection(torch.tensor(subset, dtype=torch.int64), torch.full((k,), 1.0 / k),
                      torch.zeros(n)) for subset in itertools.combinations(range(n), k)]


def _oracle(trainer: OnlineTrainer, ctx: SelectionContext, start: Any,
            done: dict[tuple, float]) -> tuple[Selection, list[list]]:
    """Every ``k``-subset at uniform weights stepped from ``start`` and evaluated (into
    ``done``, which already holds the other methods' losses): the lowest one, and every
    subset's ``[rows, loss]``."""
    pairs, best = [], None
    for sel in _uniform_subsets(ctx):
        if _key(sel) not in done:
            _restore(trainer, start)
            done[_key(sel)] = _step_and_evaluate(trainer, ctx, sel)
        pairs.append([sel.indices.tolist(), done[_key(sel)]])
        if best is None or done[_key(sel)] < done[_key(best)]:
            best = sel
    assert best is not None
    return best, pairs


def _objective_terms(ctx: SelectionContext) -> dict[str, Any]:
    """``b``, ``K``, the target cross Gram and ``ĝᵀPĝ`` at this state, in Adam's geometry
    (the oracle's table, module docstring)."""
    names = ctx.candidates.param_names
    precondition = {n: ctx.optimizer_state.preconditioner[n] for n in names}
    assert ctx.target_grad is not None
    g_hat = {n: ctx.target_grad[n].float() for n in names}
    b, kmat, cross = alignment_and_interaction(ctx.candidates, g_hat, precondition, "adam",
                                               ctx.target_samples)
    return {"alignment": b.tolist(), "interaction": kmat.tolist(),
            **({"target_cross": cross.tolist()} if cross is not None else {}),
            "target_sq_norm": target_sq_norm(g_hat, precondition, names)}


def make_selectors(methods: Sequence[str], reference: str) -> dict[str, Selector]:
    """One selector per method (the reference first; ``oracle`` is not one); engine options
    are refused."""
    if reference == ORACLE:
        raise ValueError("the oracle chooses in hindsight: it cannot be the reference")
    selectors = {}
    for m in dict.fromkeys([reference, *methods]):
        if m == ORACLE:
            continue
        name, engine, options = parse_method(m)
        if engine:
            raise ValueError(f"method {m!r}: engine options ({sorted(engine)}) change the "
                             "trajectory, not one step; the branch bench compares selections")
        selectors[m] = get_selector(name, **options)
    return selectors


def run_branches(base: torch.nn.Module, tokenizer: Any, scenario: Scenario, suite: Suite,
                 methods: Sequence[str], reference: str, seed: int, data: Path,
                 run_dir: Path, verify: bool = False) -> dict[str, Any]:
    """Follow ``reference`` for ``suite.steps`` steps; at each, every method's one-step
    held-out loss from the same state. With ``verify``, the reference's own selection is
    also replayed through the branch path (``reference_replay``: must equal its loss)."""
    selectors = make_selectors(methods, reference)
    branches = _Branches(selectors, reference, seed)
    trainer = make_trainer(base, tokenizer, scenario, suite, branches, seed, data, run_dir)
    if trainer.selection.other_params:
        raise ValueError("the branch bench needs every trainable parameter captured")
    t0 = time.perf_counter()
    before = trainer.evaluate()
    rows = []
    for step in range(1, suite.steps + 1):
        start = _state(trainer)
        record = trainer.step()
        if record is None:
            raise stream_ended(trainer, data, step)
        ctx, choices = branches.ctx, dict(branches.choices)
        assert ctx is not None
        done = {_key(choices[reference]): trainer.evaluate()}
        after = _state(trainer)
        replay = None
        if verify:
            _restore(trainer, start)
            replay = _step_and_evaluate(trainer, ctx, choices[reference])
        for sel in choices.values():
            if _key(sel) not in done:
                _restore(trainer, start)
                done[_key(sel)] = _step_and_evaluate(trainer, ctx, sel)
        ids, table = record["candidate_ids"], None
        if ORACLE in methods:
            choices[ORACLE], pairs = _oracle(trainer, ctx, start, done)
            table = {"candidate_ids": list(ids), "pairs": pairs, **_objective_terms(ctx)}
        _restore(trainer, after)
        rows.append({
            "step": step, "before": before,
            "after": {m: done[_key(s)] for m, s in choices.items()},
            "selected": {m: [ids[i] for i in s.indices.tolist()] for m, s in choices.items()},
            "weights": {m: [round(float(w), 6) for w in s.weights] for m, s in choices.items()},
            "diagnostics": {m: s.diagnostics for m, s in choices.items() if s.diagnostics},
            **({"reference_replay": replay} if verify else {}),
            **({"oracle_table": table} if table is not None else {}),
        })
        before = done[_key(choices[reference])]
    return {"scenario": scenario.name, "reference": reference, "seed": seed,
            "methods": list(selectors) + ([ORACLE] if ORACLE in methods else []),
            "steps": rows,
            "seconds": round(time.perf_counter() - t0, 2)}


class _DrawsTarget(Selector):
    """``selector``, with the target batch drawn and its gradient formed at every step, as
    for the target-aware methods: every method's segment then sees the same target draws
    (and the one-step branches' draws)."""

    name = "draws-target"
    needs = "grads"
    needs_target = True

    def __init__(self, selector: Selector, samples: bool):
        super().__init__()
        self.inner, self.samples = selector, samples

    @property
    def needs_target_samples(self) -> bool:
        return self.samples

    def select(self, ctx: SelectionContext) -> Selection:
        return self.inner.select(ctx)


def _snapshot(trainer: OnlineTrainer) -> dict[str, Any]:
    """Everything a step reads or moves: parameters, optimizer, stream position, the target
    and selector generators, the counters (the selector itself holds no state here)."""
    step = trainer.selection.state_dict()
    step.pop("selector")
    return {"model": _state(trainer), "stream": copy.deepcopy(trainer.stream.state_dict()),
            "step": copy.deepcopy(step), "counters": copy.deepcopy(trainer.state)}


def _rewind(trainer: OnlineTrainer, snap: dict[str, Any], selector: Selector) -> None:
    """Back to ``snap``, with ``selector`` choosing from there."""
    _restore(trainer, snap["model"])
    trainer.stream.load_state_dict(copy.deepcopy(snap["stream"]))
    trainer.selection.selector = selector
    trainer.selection.load_state_dict({**copy.deepcopy(snap["step"]), "selector": {}})
    trainer.state = copy.deepcopy(snap["counters"])


def _check_horizon(horizon: int, suite: Suite, methods: Sequence[str]) -> None:
    if not 1 <= horizon <= suite.steps:
        raise ValueError(f"horizon must be between 1 and the suite's {suite.steps} steps, "
                         f"got {horizon}")
    if horizon > 1 and ORACLE in methods:
        raise ValueError("the oracle is a one-step bound: it needs --horizon 1")


def run_rollouts(base: torch.nn.Module, tokenizer: Any, scenario: Scenario, suite: Suite,
                 methods: Sequence[str], reference: str, seed: int, data: Path,
                 run_dir: Path, horizon: int) -> dict[str, Any]:
    """``horizon``-step gains from common states: the run is cut into segments of
    ``horizon`` steps; from each segment's first state every method trains ``horizon`` steps
    on its own selections (the same candidates and target draws for all), and the held-out
    loss after them is measured. The reference's segment is the trajectory: the next segment
    starts where it ended. ``horizon=1`` is ``run_branches`` at full cost (a capture per
    method and step instead of one shared one); the whole run as one segment is the quality
    suite's run of every method from the same seed."""
    _check_horizon(horizon, suite, methods)
    selectors = make_selectors(methods, reference)
    samples = any(s.needs_target_samples for s in selectors.values())
    selectors = {m: s if s.needs_target and s.needs_target_samples == samples
                 else _DrawsTarget(s, samples) for m, s in selectors.items()}
    trainer = make_trainer(base, tokenizer, scenario, suite, selectors[reference], seed, data,
                           run_dir)
    t0 = time.perf_counter()
    before = trainer.evaluate()
    rows = []
    order = [m for m in selectors if m != reference] + [reference]  # the trajectory last
    for start in range(0, suite.steps - horizon + 1, horizon):
        snap = _snapshot(trainer)
        after, selected, weights = {}, {}, {}
        for m in order:
            _rewind(trainer, snap, selectors[m])
            trainer.runlog.enabled = m == reference  # the log holds the trajectory only
            records = [trainer.step() for _ in range(horizon)]
            if any(r is None for r in records):
                raise stream_ended(trainer, data, start + records.index(None) + 1)
            after[m] = trainer.evaluate()
            selected[m] = [r["selected_ids"] for r in records]
            weights[m] = [[round(float(w), 6) for w in r["weights"]] for r in records]
        rows.append({"step": start + horizon, "start": start, "before": before,
                     "after": after, "selected": selected, "weights": weights})
        before = after[reference]
    return {"scenario": scenario.name, "reference": reference, "horizon": horizon,
            "seed": seed, "methods": list(selectors), "steps": rows,
            "seconds": round(time.perf_counter() - t0, 2)}


def _path(out: Path, scenario: str, reference: str, seed: int, horizon: int = 1) -> Path:
    ref = f"ref-{reference}" + (f"-h{horizon}" if horizon > 1 else "")
    return out / scenario / ref / f"seed_{seed}" / "branch.json"


def run_suite(suite: Suite, out: Path, scenarios: Sequence[str] | None, methods: Sequence[str],
              reference: str, seeds: Sequence[int] | None, shard: tuple[int, int] = (0, 1),
              quiet: bool = False, horizon: int = 1, device: str = "cpu"
              ) -> list[dict[str, Any]]:
    """Every (scenario, seed) not finished with all ``methods`` (every n-th from the i-th
    with ``shard=(i, n)``), on ``device``, then every finished result under ``out``.
    ``horizon > 1``: ``run_rollouts`` instead of ``run_branches``."""
    _check_horizon(horizon, suite, methods)  # before the model loads
    from gradsift.models import load_model_and_tokenizer

    make_selectors(methods, reference)  # a bad name or option fails before any run
    chosen = choose_scenarios(suite, scenarios)
    if ORACLE in methods:
        for sc in chosen:
            if math.comb(sc.candidates, sc.budget) > MAX_ORACLE_SUBSETS:
                raise ValueError(
                    f"the oracle steps every one of C({sc.candidates}, {sc.budget}) = "
                    f"{math.comb(sc.candidates, sc.budget)} subsets a state in scenario "
                    f"{sc.name!r}, more than {MAX_ORACLE_SUBSETS}: run it on a smaller k of B "
                    "(--suite full) or leave it out of --methods")
    wanted = set(methods) | {reference}
    jobs = [(seed, sc) for seed in (seeds or suite.seeds) for sc in chosen]
    todo = [(seed, sc) for seed, sc in jobs if not _finished(
        _path(out, sc.name, reference, seed, horizon), wanted)][shard[0]::shard[1]]
    if todo:
        known: dict[tuple[str, str], list[float]] = {}
        for r in load_results(out):
            kind = f"{r['reference']}, horizon {r.get('horizon', 1)}"
            known.setdefault((r["scenario"], kind), []).append(r["seconds"])
        kind = f"{reference}, horizon {horizon}"
        left = [(sc.name, kind) for _, sc in todo]
        if not quiet:
            print(runs_to_do(left, known), file=sys.stderr, flush=True)
            print(sizes_line((sc for _, sc in todo), suite),
                  file=sys.stderr, flush=True)
        base, tokenizer = load_model_and_tokenizer(suite.model, dtype=torch.float32)
        base.to(device)
        for p in base.parameters():
            p.requires_grad_(False)
        for n, (seed, sc) in enumerate(todo, 1):
            path = _path(out, sc.name, reference, seed, horizon)
            data = build_data(sc, suite, out / sc.name / "data")
            if horizon == 1:
                res = run_branches(base, tokenizer, sc, suite, methods, reference, seed, data,
                                   path.parent)
            else:
                res = run_rollouts(base, tokenizer, sc, suite, methods, reference, seed, data,
                                   path.parent, horizon)
            write_result(path, res)
            known.setdefault((sc.name, kind), []).append(res["seconds"])
            if not quiet:
                print(f"[{n}/{len(todo)}] {sc.name} seed {seed}: {res['seconds']:.0f} s"
                      f"{about(left[n:], known, 'left')}", file=sys.stderr, flush=True)
    return load_results(out)


def _finished(path: Path, methods: set[str]) -> bool:
    return path.exists() and methods <= set(read_result(path)["methods"])


RESULTS = "*/ref-*/seed_*/branch.json"  # a finished run, under --out


def load_results(out: Path) -> list[dict[str, Any]]:
    return [read_result(p) for p in sorted(out.glob(RESULTS))]


def summarize(results: list[dict[str, Any]], versus: str = "ftw") -> dict[str, Any]:
    """Per scenario and reference: each method's mean one-step gain, its ratio to random's,
    the rows it trained per state, how often it selected the rows ``versus`` selected, and the
    paired ``L(versus) − L(m)``."""
    out: dict[str, Any] = {}
    for sc, ref, h in sorted({(r["scenario"], r["reference"], r.get("horizon", 1))
                              for r in results}):
        runs = [r for r in results if r["scenario"] == sc and r["reference"] == ref
                and r.get("horizon", 1) == h]
        methods = list(dict.fromkeys(m for r in runs for m in r["methods"]))
        gains = {m: [row["before"] - row["after"][m] for r in runs for row in r["steps"]
                     if m in row["after"]] for m in methods}
        rand = float(np.mean(gains["random"])) if gains.get("random") else math.nan
        table = {}
        for m in methods:
            entry: dict[str, Any] = {"states": len(gains[m]),
                                     "gain": float(np.mean(gains[m])),
                                     "gain_vs_random": float(np.mean(gains[m])) / rand,
                                     # rows trained per state (below k: budget not spent)
                                     "samples": float(np.mean([
                                         len(row["selected"][m]) for r in runs
                                         for row in r["steps"] if m in row["selected"]]))}
            pairs = [(row, r["seed"]) for r in runs for row in r["steps"]
                     if m in row["after"] and versus in row["after"]]
            if pairs and m != versus:
                same = [sorted(row["selected"][m]) == sorted(row["selected"][versus])
                        for row, _ in pairs]
                diff = [row["after"][versus] - row["after"][m] for row, _ in pairs]
                by_seed: dict[int, list[float]] = {}
                for d, (_, seed) in zip(diff, pairs, strict=True):
                    by_seed.setdefault(seed, []).append(d)
                per_seed = [float(np.mean(v)) for v in by_seed.values()]
                mean, lo, hi = paired_interval(per_seed)
                better, worse = int(sum(d < 0 for d in diff)), int(sum(d > 0 for d in diff))
                power_n = (seeds_for_power(mean, float(np.std(per_seed, ddof=1)))
                           if len(per_seed) > 1 else math.nan)
                entry.update(same=float(np.mean(same)), diff=mean, lo=lo, hi=hi,
                             seeds=len(by_seed), better=better, worse=worse,
                             sign_p=sign_test(better, worse), seeds_for_80pct_power=power_n)
            table[m] = entry
        out[f"{sc} (reference {ref})" if h == 1 else
            f"{sc} (reference {ref}, {h} steps from each state)"] = table
    return out


def markdown(summary: dict[str, Any], versus: str = "ftw") -> str:
    """The tables for BENCHMARKS.md."""
    lines = []
    for title, table in summary.items():
        lines += [f"\n**{title}**\n",
                  "| method | states | mean gain (loss before − after) | × random's | "
                  f"samples per state | same rows as {versus} | "
                  f"{versus} − method (loss after), 95 % CI over seeds | {versus} lower / "
                  "higher (states) | sign test p | seeds for 80 % power |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for m, e in sorted(table.items(), key=lambda kv: -kv[1]["gain"]):
            if "diff" in e:
                ci = (f"{e['diff']:+.4f} [{e['lo']:+.4f}, {e['hi']:+.4f}] ({e['seeds']})")
                rest = (f"{e['same']:.0%} | {ci} | {e['better']} / {e['worse']} | "
                        f"{e['sign_p']:.2g} | {e.get('seeds_for_80pct_power', math.nan):g}")
            else:
                rest = "– | – | – | – | –"
            lines.append(f"| {m} | {e['states']} | {e['gain']:.4f} | "
                         f"{e['gain_vs_random']:.2f} | {e['samples']:.2f} | {rest} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path, versus: str = "ftw", horizon: int | None = 1
         ) -> Path:
    """One panel per scenario: each method's mean ``L(versus) − L(m)`` after ``horizon`` steps
    (None: several, each panel's title says how many) with its 95 % interval over seeds (left
    of zero: ``versus`` moved the held-out loss further)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    titles = list(summary)
    fig, axes = plt.subplots(1, len(titles), figsize=(4.2 * len(titles), 3.6), squeeze=False)
    for ax, title in zip(axes[0], titles, strict=True):
        rows = sorted(((m, e) for m, e in summary[title].items() if "diff" in e),
                      key=lambda kv: kv[1]["diff"])
        y = np.arange(len(rows))
        mean = np.array([e["diff"] for _, e in rows])
        lo = np.array([e["lo"] for _, e in rows])
        hi = np.array([e["hi"] for _, e in rows])
        ok = np.isfinite(lo) & np.isfinite(hi)
        ax.errorbar(mean[ok], y[ok], xerr=[mean[ok] - lo[ok], hi[ok] - mean[ok]], fmt="o",
                    ms=4, capsize=3)
        ax.plot(mean[~ok], y[~ok], "o", ms=4)
        ax.axvline(0.0, color="k", lw=0.8)
        ax.set_yticks(y, [m for m, _ in rows], fontsize=7)
        ax.set_title(title.replace(" (", "\n(", 1), fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.tick_params(axis="x", labelsize=7)
        after = {None: "the steps in the title", 1: "one step"}.get(horizon, f"{horizon} steps")
        ax.set_xlabel(f"L({versus}) − L(method) after {after}", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gradsift.bench.branch",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="full")
    parser.add_argument("--out", type=Path, default=None, help="default: runs/branch-<suite>")
    parser.add_argument("--scenarios", help="comma-separated scenario names (default: all)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated methods, variants as METHOD@KEY=VALUE")
    parser.add_argument("--reference", default="random",
                        help="the method whose steps make the trajectory (default: random)")
    parser.add_argument("--versus", default="ftw", help="the method the others are paired "
                        "against in the report (default: ftw)")
    parser.add_argument("--seeds", help="comma-separated seeds (default: the suite's)")
    parser.add_argument("--horizon", type=int, default=1, help="steps each method trains "
                        "from a common state before the held-out loss is compared (default 1;"
                        " H > 1 cuts the run into segments of H steps)")
    parser.add_argument("--shard", default="0/1", help="I/N: every N-th pending run from the "
                        "I-th (N processes share a machine, e.g. with --threads 1)")
    parser.add_argument("--threads", type=int, help="torch threads per process")
    add_device_argument(parser)
    add_jobs_argument(parser)
    parser.add_argument("--report-only", action="store_true", help="summarize finished runs")
    parser.add_argument("--quiet", action="store_true")
    add_own_data_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    check_jobs(parser, args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    kind = device_kind(parser, args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    suite = with_own_data(parser, args, SUITES[args.suite])
    out = args.out or Path(f"runs/branch-{args.suite}")
    claim_out_folder(parser, out, args.suite, suite, RESULTS,
                     write=not args.report_only, device=kind)

    def split(text: str | None) -> list[str] | None:
        return [x.strip() for x in text.split(",") if x.strip()] if text else None

    if args.report_only:
        results = load_results(out)
    elif args.jobs > 1:
        if run_jobs("gradsift.bench.branch", argv, args, suite, out, split(args.scenarios)):
            return 1
        results = load_results(out)
    else:
        i, n = (int(x) for x in args.shard.split("/"))
        seeds = [int(s) for s in split(args.seeds) or []] or None
        results = run_suite(suite, out, split(args.scenarios), split(args.methods) or [],
                            args.reference, seeds, shard=(i, n), quiet=args.quiet,
                            horizon=args.horizon, device=args.device)
    if not results:
        print(f"no finished runs under {out}", file=sys.stderr)
        return 1
    summary = summarize(results, args.versus)
    out.mkdir(parents=True, exist_ok=True)
    write_summary(out / "summary.json", summary)
    (out / "branch.md").write_text(markdown(summary, args.versus))
    horizons = {r.get("horizon", 1) for r in results}  # a folder may hold several
    plot(summary, out / "branch.png", args.versus,
         horizons.pop() if len(horizons) == 1 else None)
    if not args.quiet:
        print(markdown(summary, args.versus))
    return 0


if __name__ == "__main__":
    sys.exit(main())
