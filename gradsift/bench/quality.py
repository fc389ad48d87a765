"""The quality suite: does a selection method move the model towards the target faster?

``python -m gradsift.bench.quality --suite full`` fine-tunes the bundled SmolLM2-135M with
LoRA online on real streams built by ``gradsift.sources`` under every method, with the same
budget ``k`` of ``B`` candidates per step, and compares them in a **paired** design:

* **Scenarios** (``gradsift.bench.scenarios``): label noise (arithmetic, 25 % wrong answers
  in the stream; the target is correct answers; exact-match accuracy of greedy answers on 100
  held-out questions too), domain shift to code, verse as a second target domain, redundancy
  (a share of the stream is near-copies of one target-like record), and label noise at
  ``k/B = 1/8``.
* **Seeds.** A seed fixes the stream order, the LoRA initialisation, the target draws and the
  selector's generator, identically for every method: the methods of one seed differ only in
  what they select.
* **Evaluation.** The same held-out target examples (``eval_size``, never drawn for ``g_V``)
  at step 0, every ``eval_every`` steps and at every step of the last 20 %. The primary metric
  is the mean held-out loss over the last 20 % of steps; also the final loss, the AUC (the
  trapezoid mean of the loss curve) and the steps to reach random's final loss (paired).
  Each run keeps every held-out example's loss at each evaluation and each accuracy
  question's right or wrong, so a paired difference is also given over seeds *and* held-out
  examples (``paired_examples``): the interval over seeds alone is about these 64 examples.
* **Calibration.** For methods that use a target gradient ``ĝ``, every step logs the target
  loss of the step's target batch before and after the update (``realized``), the first-order
  prediction ``ĝᵀ(θ − θ')`` of the update actually taken, the selection-time prediction
  ``η_t (1−β₁) bᵀw`` in Adam's geometry, and ``½ Δθᵀ P⁻¹ Δθ`` (Adam's curvature model), so
  ``realized ≈ pred − c · quad`` can be checked and ``c`` estimated.

Every run writes ``<out>/<scenario>/<method>/seed_<s>/result.json``; a restarted suite skips
the finished runs (resume at run granularity: a run killed half-way is run again), and
``<out>/suite.json`` keeps the folder to the setting its runs were made in. Unless ``--quiet``,
the suite says how many runs it has to do and about how long they take: each at the mean wall
time of the runs already finished in the folder (same scenario and method where there are
some), updated after every run.
``--suite steady`` is ``full`` with k and B doubled, twice the steps at half the lr: each step
averages over more samples and moves the model less, which is meant to shrink the seed-to-seed
spread of a paired difference (``BENCHMARKS.md`` says by how much), at about 2.6 times
``full``'s time a run. ``--suite smoke`` runs the pipeline on the tiny model in well under a minute
(``make test``).
``--lr``, ``--scheduler linear|cosine`` and ``--warmup-steps`` train every method under
another learning-rate schedule (transformers'; the suites' is constant), as a user's own runs
would; ``suite.json`` keeps a folder to one schedule.
``--stream FILE --target FILE`` adds a scenario on your own data (and runs only it, unless
``--scenarios`` names more): the same paired comparison on a stream and target the suite has
never seen.

A method is a selector name, optionally with options: ``ftw@target_ema=0.8@min_cosine=0.1``
runs ftw with the engine's ``target_ema`` (a ``SelectionConfig`` key) and the selector option
``min_cosine``; such a variant runs on every requested seed and is compared like ftw's other
variants. Every method named in ``--methods`` runs on every requested scenario and seed; without
``--methods`` the ablations and weaker baselines run on the scenarios that list them
(``extra_methods``), on the suite's first ``extra_seeds`` seeds.

Usage::

    python -m gradsift.bench.quality --suite full [--out runs/quality] [--seeds 0,1,2,3,4]
        [--scenarios label-noise,code] [--methods ftw,random,ftw@target_ema=0.8]
        [--report-only] [--device cuda] [--jobs N]

``--jobs N`` runs N processes, each every N-th pending run (``--shard i/N``, which two
shells can also give by hand), with the cores split between them. On a GPU (``--device
cuda``) a step of the 135M model is launch-bound (BENCHMARKS.md, session 6), so several
processes can share one (not yet measured for this suite). A folder holds one device kind's
runs (``suite.json``), so paired methods ran on the same kind.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
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
from gradsift.capture import forward_losses
from gradsift.engine import OnlineTrainer
from gradsift.jsonio import read_jsonl, write_text_atomic
from gradsift.optim_state import read_optimizer_state
from gradsift.report.paired import (
    crossed_interval,
    describe,
    describe_crossed,
    paired_comparison,
)
from gradsift.select import Selection, SelectionContext, Selector, get_selector

logger = logging.getLogger(__name__)

CORE_METHODS = ("ftw", "greats", "cosine", "random")
# the order runs are made in: what decides first (so a stopped suite has complete pairs)
PHASES = (("ftw", "greats", "random"),
          ("ftw-next-step-weights", "ftw-filter-only", "ftw-next-step", "cosine", "ftw-nnls"))
# candidates for FTW's default weighting run on every scenario, like the core methods
DEFAULT_CANDIDATES = ("ftw-next-step", "ftw-next-step-weights", "ftw-filter-only")
EXTRA_METHODS = ("ftw-nnls", "ftw-weight-only", "ftw-sgd", "opus", "loss", "gradnorm", "full")
# ---------------------------------------------------------------------- the probe
class _Probe(Selector):
    """Wraps a selector; records ``bᵀw`` and ``wᵀKw`` of its choice in Adam's geometry."""

    def __init__(self, inner: Selector):
        self.inner, self.config = inner, inner.config
        self.name, self.needs_target = inner.name, inner.needs_target
        self.needs_grads, self.needs = inner.needs_grads, inner.needs
        self.last: dict[str, float] = {}

    @property
    def needs_target_samples(self) -> bool:
        return self.inner.needs_target_samples

    def select(self, ctx: SelectionContext) -> Selection:
        from gradsift.objective import alignment, interaction
        from gradsift.select.next_step import NextStep

        sel = self.inner.select(ctx)
        self.last = {}
        if ctx.target_grad is not None and sel.indices.numel() > 0:
            names = ctx.candidates.param_names
            p = {n: ctx.optimizer_state.preconditioner[n] for n in names}
            # b and K of the k chosen only (k × k, not B × B: in full fine-tuning the exact K
            # forms every layer's per-sample gradients)
            chosen = ctx.candidates.select(sel.indices)
            b = alignment(chosen, ctx.target_grad, p).double().cpu()
            kmat = interaction(chosen, p).double().cpu()
            w = sel.weights.double()
            self.last = {"btw": float(b @ w), "wkw": float(w @ kmat @ w)}
            if ctx.optimizer_state.moments is not None:  # Adam's exact next step
                step = NextStep(chosen.materialize(), ctx.optimizer_state,
                                max_grad_norm=MAX_GRAD_NORM)
                with torch.no_grad():
                    self.last["next"] = float(step.decrease(w, ctx.target_grad))
        return sel

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()


# ---------------------------------------------------------------------- one run
@dataclass
class RunResult:
    scenario: str
    method: str
    seed: int
    steps: list[int]
    losses: list[float]
    accuracy: float | None
    seconds: float
    calibration: list[dict[str, float]] = field(default_factory=list)
    trained_samples: int = 0
    selected_sources: dict[str, int] = field(default_factory=dict)
    wrong_answers: int = 0
    wall_seconds: float = 0.0  # the whole run, model copy and final evaluations included
    # each held-out example's loss at each evaluation (aligned with ``steps``), and whether
    # each accuracy question was answered right: what intervals over examples need
    example_losses: list[list[float]] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)


def eval_steps(suite: Suite) -> list[int]:
    """Step 0, every ``eval_every`` steps, and every step of the last 20 %."""
    tail = set(range(int(math.floor(0.8 * suite.steps)) + 1, suite.steps + 1))
    return sorted({0, *range(suite.eval_every, suite.steps + 1, suite.eval_every), *tail})


def run_one(base: torch.nn.Module, tokenizer: Any, scenario: Scenario, suite: Suite,
            method: str, seed: int, data: Path, run_dir: Path) -> RunResult:
    """Fine-tune a copy of ``base`` (LoRA, or every parameter: ``suite.finetune``) under
    ``method`` for ``suite.steps`` steps."""
    selector_name, engine_options, selector_options = parse_method(method)
    selector = _Probe(get_selector(selector_name, **selector_options))
    trainer = make_trainer(base, tokenizer, scenario, suite, selector, seed, data, run_dir,
                           engine_options)
    model = trainer.model
    wanted = eval_steps(suite)
    first, first_each = _initial_loss(trainer, run_dir.parent.parent)
    losses, example_losses = [first], [first_each]
    calibration = []
    sources: dict[str, int] = {}
    t0 = time.perf_counter()
    for step in range(1, suite.steps + 1):
        before = _snapshot(trainer) if selector.needs_target else None
        lr = trainer.optimizer.param_groups[0]["lr"]  # this step's: a schedule moves it after
        record = trainer.step()
        if record is None:
            raise stream_ended(trainer, data, step)
        if before is not None:
            calibration.append(_calibrate(trainer, selector, before, lr))
        chosen = set(record["selected_ids"])
        for cid, src in zip(record["candidate_ids"], record["candidate_sources"], strict=True):
            if cid in chosen:
                sources[src] = sources.get(src, 0) + 1
        if step in wanted:
            loss, each = trainer.evaluate_examples()
            losses.append(loss)
            example_losses.append(each)
    correct = arithmetic_answers(model, tokenizer, data / "accuracy.jsonl") \
        if scenario.accuracy else []
    accuracy = sum(correct) / len(correct) if correct else None
    wrong = _count_wrong(run_dir / "selections.jsonl", data / f"stream_seed{seed}.jsonl")
    return RunResult(scenario.name, method, seed, wanted, losses, accuracy,
                     round(time.perf_counter() - t0, 2), calibration,
                     trainer.state.trained_samples, sources, wrong,
                     example_losses=example_losses, correct=correct)


def _initial_loss(trainer: OnlineTrainer, scenario_dir: Path) -> tuple[float, list[float]]:
    """Step 0's loss, mean and per example, is the base model's (LoRA starts at zero):
    computed once per scenario (a cache without the per-example losses is filled in)."""
    cache = scenario_dir / "step0_loss.json"
    if cache.exists():
        known = json.loads(cache.read_text())
        if "example_losses" in known:
            return float(known["loss"]), [float(v) for v in known["example_losses"]]
    loss, each = trainer.evaluate_examples()
    write_text_atomic(cache, json.dumps({"loss": loss, "example_losses": each}))
    return loss, each  # (suites may share the folder: the write is atomic)


def _count_wrong(selections: Path, stream: Path) -> int:
    wrong = {r["id"] for r in read_jsonl(stream) if r.get("wrong_answer")}
    return sum(i in wrong for r in read_jsonl(selections) for i in r["selected_ids"])


def _snapshot(trainer: OnlineTrainer) -> dict[str, Any]:
    return {n: p.detach().clone() for n, p in trainer.params.items()}


@torch.no_grad()
def _calibrate(trainer: OnlineTrainer, probe: _Probe, before: dict[str, torch.Tensor],
               lr: float) -> dict[str, float]:
    """Realized vs predicted decrease of the step's target-batch loss (module docstring);
    ``lr``: the step's learning rate."""
    batch = trainer.target_batch
    if not batch or trainer.target_grad is None:
        return {}
    model = trainer.model
    was = model.training
    model.eval()
    after_params = {n: p.detach().clone() for n, p in trainer.params.items()}
    (b,) = trainer.selection.batches(batch, len(batch))
    loss_after = float(forward_losses(model, b).mean())
    for n, p in trainer.params.items():
        p.copy_(before[n])
    loss_before = float(forward_losses(model, b).mean())
    for n, p in trainer.params.items():
        p.copy_(after_params[n])
    model.train(was)
    names = list(trainer.target_grad)
    state = read_optimizer_state(trainer.optimizer, model, names)
    pred = quad = 0.0
    for n in names:
        delta = (before[n] - after_params[n]).float()
        pred += float((trainer.target_grad[n].float() * delta).sum())
        quad += 0.5 * float((delta * delta / state.preconditioner[n].float()).sum())
    beta1 = trainer.optimizer.param_groups[0]["betas"][0]
    t = max(int(trainer.state.step), 1)
    eta_t = lr * (1 - beta1) / (1 - beta1**t)
    out = {"realized": loss_before - loss_after, "pred": pred, "quad": quad}
    if probe.last:
        out["pred_selection"] = eta_t * probe.last["btw"]
        out["wkw"] = probe.last["wkw"]
        if "next" in probe.last:
            out["pred_next"] = probe.last["next"]
    return out


@torch.no_grad()
def arithmetic_answers(model: torch.nn.Module, tokenizer: Any, path: Path,
                       batch_size: int = 25) -> list[bool]:
    """Per question of ``path``: does the first integer of the greedy answer (8 new tokens)
    equal the truth (exact match)?"""
    rows = read_jsonl(path)
    was = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    correct: list[bool] = []
    device = next(model.parameters()).device
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            enc = tokenizer([r["prompt"] for r in chunk], return_tensors="pt", padding=True)
            out = model.generate(**{k: v.to(device) for k, v in enc.items()}, max_new_tokens=8,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:],
                                           skip_special_tokens=True)
            for r, text in zip(chunk, texts, strict=True):
                m = re.search(r"-?\d+", text)
                correct.append(bool(m) and int(m.group()) == int(r["correct_answer"]))
    finally:
        tokenizer.padding_side = side
        model.train(was)
    return correct


# --------------------------------------------------------------------- the suite
def methods_for(scenario: Scenario, methods: Sequence[str] | None) -> list[str]:
    """The methods run on ``scenario``: the ones named (every one, in order), or by default the
    core methods and weight-stage candidates, plus the extra methods where the scenario lists
    them."""
    if methods is not None:
        return list(dict.fromkeys(methods))
    return list(CORE_METHODS) + list(DEFAULT_CANDIDATES) + (
        list(EXTRA_METHODS) if scenario.extra_methods else [])


def run_suite(suite: Suite, out: Path, scenarios: Sequence[str] | None = None,
              methods: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
              quiet: bool = False, shard: tuple[int, int] = (0, 1),
              device: str = "cpu") -> list[RunResult]:
    """Every (seed, scenario, method) run not finished yet (in ``_job_order``; with
    ``shard=(i, n)`` every n-th of them from the i-th), on ``device``, then the results of
    all finished runs."""
    from gradsift.models import load_model_and_tokenizer

    chosen = choose_scenarios(suite, scenarios)
    for m in methods or ():
        parse_method(m)
    for sc in chosen:  # a user's files: checked (and refused if changed) before anything runs
        if sc.stream_file is not None:
            build_data(sc, suite, out / sc.name / "data")
    # first what decides (core methods and FTW's weight-stage ablations), then the rest
    seeds = list(seeds or suite.seeds)
    jobs = sorted(((seed, sc, m) for seed in seeds for sc in chosen
                   for m in methods_for(sc, methods)
                   if methods is not None or m in CORE_METHODS + DEFAULT_CANDIDATES
                   or seed in seeds[: suite.extra_seeds]), key=_job_order)
    todo = [j for j in jobs if not _result_path(out, j[1].name, j[2], j[0]).exists()]
    todo = todo[shard[0]::shard[1]]
    if todo:
        known: dict[tuple[str, str], list[float]] = {}
        for r in load_results(out):
            known.setdefault((r.scenario, r.method), []).append(r.wall_seconds or r.seconds)
        left = [(sc.name, method) for _, sc, method in todo]
        if not quiet:
            print(runs_to_do(left, known), file=sys.stderr, flush=True)
            print(sizes_line((sc for _, sc, _ in todo), suite),
                  file=sys.stderr, flush=True)
        base, tokenizer = load_model_and_tokenizer(suite.model, dtype=torch.float32)
        base.to(device)
        for p in base.parameters():
            p.requires_grad_(False)
        for n, (seed, sc, method) in enumerate(todo, 1):
            t0 = time.perf_counter()
            data = build_data(sc, suite, out / sc.name / "data")
            path = _result_path(out, sc.name, method, seed)
            res = run_one(base, tokenizer, sc, suite, method, seed, data, path.parent)
            res.wall_seconds = round(time.perf_counter() - t0, 2)
            write_result(path, asdict(res))
            known.setdefault((sc.name, method), []).append(res.wall_seconds)
            if not quiet:
                print(f"[{n}/{len(todo)}] {sc.name} {method} seed {seed}: primary "
                      f"{primary(res, suite):.4f} ({res.wall_seconds:.0f} s)"
                      f"{about(left[n:], known, 'left')}", file=sys.stderr, flush=True)
    return load_results(out)


def _job_order(job: tuple[int, Scenario, str]) -> tuple:
    """Three seeds of the deciding methods first, then their other seeds, the 1/8 scenario
    after the others; seed-major within a phase, so a stopped suite leaves complete pairs."""
    seed, sc, method = job
    phase = next((i for i, ms in enumerate(PHASES) if method in ms), len(PHASES))
    return (seed >= 3, phase, sc.candidates > 4 * sc.budget, seed)


def _result_path(out: Path, scenario: str, method: str, seed: int) -> Path:
    return out / scenario / method / f"seed_{seed}" / "result.json"


RESULTS = "*/*/seed_*/result.json"  # a finished run, under --out


def load_results(out: Path) -> list[RunResult]:
    return [RunResult(**read_result(p)) for p in sorted(out.glob(RESULTS))]


# ------------------------------------------------------------------------ metrics
def primary(res: RunResult, suite: Suite) -> float:
    """Mean held-out loss over the evaluations in the last 20 % of steps."""
    cut = 0.8 * suite.steps
    tail = [v for s, v in zip(res.steps, res.losses, strict=True) if s > cut]
    return float(np.mean(tail))


def example_primary(res: RunResult, suite: Suite) -> np.ndarray | None:
    """Each held-out example's primary: its loss averaged over the last 20 % of steps
    (None for a run made before the runs kept them)."""
    if not res.example_losses:
        return None
    cut = 0.8 * suite.steps
    tail = [v for s, v in zip(res.steps, res.example_losses, strict=True) if s > cut]
    return np.mean(np.asarray(tail, dtype=np.float64), axis=0)


def paired_over_examples(mine: dict[int, RunResult], other: dict[int, RunResult],
                         suite: Suite) -> dict[str, Any] | None:
    """``mine − other`` over the seeds both ran and the held-out examples (``crossed_interval``);
    None unless at least two common seeds kept every example's loss."""
    rows = []
    for seed in sorted(set(mine) & set(other)):
        a, b = example_primary(mine[seed], suite), example_primary(other[seed], suite)
        if a is None or b is None or a.shape != b.shape:
            return None
        rows.append(a - b)
    return crossed_interval(np.stack(rows)) if len(rows) >= 2 and rows[0].size >= 2 else None


def auc(res: RunResult) -> float:
    """Trapezoid mean of the loss curve over steps 0..T."""
    return float(np.trapezoid(res.losses, res.steps) / (res.steps[-1] - res.steps[0]))


def steps_to_reach(res: RunResult, level: float) -> float:
    """The first evaluated step whose loss is ≤ ``level`` (inf if none)."""
    return next((float(s) for s, v in zip(res.steps, res.losses, strict=True) if v <= level),
                math.inf)


# the methods every ftw variant is paired against, where both ran on the same seed: every
# budget-respecting baseline (issue 8's bar 1 asks for ftw's lead over all of them) and ftw
PAIRED_AGAINST = ("random", "greats", "cosine", "opus", "loss", "gradnorm", "ftw")


def summarize(results: list[RunResult], suite: Suite) -> dict[str, Any]:
    """Per scenario and method: means over seeds; paired differences against ftw."""
    out: dict[str, Any] = {}
    for sc in sorted({r.scenario for r in results}):
        runs = {(r.method, r.seed): r for r in results if r.scenario == sc}
        methods = sorted({m for m, _ in runs})
        seeds = sorted({s for _, s in runs})
        by_seed = {m: {s: primary(r, suite) for (m2, s), r in runs.items() if m2 == m}
                   for m in methods}  # the primary metric, per method and seed
        auc_by_seed = {m: {s: auc(r) for (m2, s), r in runs.items() if m2 == m}
                       for m in methods}  # the secondary: the whole curve, per seed
        table = {}
        for m in methods:
            rs = [runs[(m, s)] for s in seeds if (m, s) in runs]
            reach = []
            for r in rs:
                ref = runs.get(("random", r.seed))
                reach.append(steps_to_reach(r, ref.losses[-1]) if ref else math.nan)
            accs = [r.accuracy for r in rs if r.accuracy is not None]
            cal = [c for r in rs for c in r.calibration if c]
            table[m] = {
                "n_seeds": len(rs),
                "primary": float(np.mean(list(by_seed[m].values()))),
                "primary_sd": float(np.std(list(by_seed[m].values()), ddof=1))
                if len(rs) > 1 else math.nan,
                "final": float(np.mean([r.losses[-1] for r in rs])),
                "auc": float(np.mean([auc(r) for r in rs])),
                "steps_to_random_final": float(np.median(reach)) if reach else math.nan,
                "accuracy": float(np.mean(accs)) if accs else None,
                "wrong_answers_trained": float(np.mean([r.wrong_answers for r in rs])),
                "trained_samples": float(np.mean([r.trained_samples for r in rs])),
                "calibration": _calibration_fit(cal),
                # per seed, so later runs can be paired with these without the run files
                "per_seed": {"primary": by_seed[m], "auc": auc_by_seed[m]},
            }
        pairs, pairs_auc, pairs_examples = {}, {}, {}
        by_run = {m: {s: r for (m2, s), r in runs.items() if m2 == m} for m in methods}
        for mine in [m for m in methods if m.startswith("ftw")]:
            for other in PAIRED_AGAINST:
                if other == mine or other not in by_seed:
                    continue
                pair = paired_comparison(by_seed[mine], by_seed[other])
                if pair is not None:
                    pairs[f"{mine} − {other}"] = pair
                    pairs_auc[f"{mine} − {other}"] = paired_comparison(
                        auc_by_seed[mine], auc_by_seed[other])
                    crossed = paired_over_examples(by_run[mine], by_run[other], suite)
                    if crossed is not None:
                        pairs_examples[f"{mine} − {other}"] = crossed
        out[sc] = {"methods": table, "paired": pairs, "paired_auc": pairs_auc,
                   "paired_examples": pairs_examples}
    return out


def _calibration_fit(rows: list[dict[str, float]]) -> dict[str, float] | None:
    """Correlation of realized with predicted decreases, and ``c`` in
    ``realized ≈ pred − c·quad`` by least squares."""
    rows = [r for r in rows if all(math.isfinite(r.get(k, math.nan))
                                   for k in ("realized", "pred", "quad"))]
    if len(rows) < 3:
        return None
    real = np.array([r["realized"] for r in rows])
    pred = np.array([r["pred"] for r in rows])
    quad = np.array([r["quad"] for r in rows])
    c = float(np.dot(pred - real, quad) / max(np.dot(quad, quad), 1e-300))
    fit = {"n": len(rows), "corr_pred": _corr(real, pred), "c": c,
           "corr_pred_minus_c_quad": _corr(real, pred - c * quad)}
    sel = [r for r in rows if "pred_selection" in r]
    if len(sel) >= 3:
        fit["corr_selection"] = _corr(np.array([r["realized"] for r in sel]),
                                      np.array([r["pred_selection"] for r in sel]))
    nxt = [r for r in rows if "pred_next" in r]
    if len(nxt) >= 3:
        real_n = np.array([r["realized"] for r in nxt])
        pred_n = np.array([r["pred_next"] for r in nxt])
        fit["corr_next"] = _corr(real_n, pred_n)
        fit["ratio_next"] = float(np.dot(real_n, pred_n) / max(np.dot(pred_n, pred_n), 1e-300))
    return fit


def _corr(x: np.ndarray, y: np.ndarray) -> float:
    if x.std() == 0 or y.std() == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def markdown(summary: dict[str, Any]) -> str:
    """The tables for BENCHMARKS.md."""
    lines = []
    for sc, block in summary.items():
        lines += [f"\n**{sc}**\n",
                  "| method | seeds | primary (last 20 %) | ± sd | final | AUC | steps to "
                  "random's final | accuracy | wrong answers trained | calib. corr (update / "
                  "selection / next step) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        ranked = sorted(block["methods"].items(), key=lambda kv: kv[1]["primary"])
        for m, r in ranked:
            acc = f"{r['accuracy']:.1%}" if r["accuracy"] is not None else "–"
            cal = r["calibration"]
            corr = " / ".join(f"{cal[k]:.2f}" if cal and k in cal else "–"
                              for k in ("corr_pred", "corr_selection", "corr_next"))
            lines.append(f"| {m} | {r['n_seeds']} | {r['primary']:.4f} | {r['primary_sd']:.4f} "
                         f"| {r['final']:.4f} | {r['auc']:.4f} | {r['steps_to_random_final']:g} "
                         f"| {acc} | {r['wrong_answers_trained']:.1f} | {corr} |")
        for name, p in block["paired"].items():
            lines.append(f"\npaired {name}: {describe(p)}")
            p_auc = block.get("paired_auc", {}).get(name)
            if p_auc is not None:  # the secondary metric, on the same seeds
                lines.append(f"\npaired {name}, AUC: {describe(p_auc)}")
            p_ex = block.get("paired_examples", {}).get(name)
            if p_ex is not None:  # the same primary, its interval over examples too
                lines.append(f"\npaired {name}, over seeds and held-out examples: "
                             f"{describe_crossed(p_ex)}")
    return "\n".join(lines) + "\n"


def plot(results: list[RunResult], summary: dict[str, Any], folder: Path) -> list[Path]:
    """One loss-curve plot per scenario (mean over seeds, band ±1 standard error), and one
    calibration scatter (realized vs predicted decrease) per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for sc in summary:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for m in sorted(summary[sc]["methods"]):
            rs = [r for r in results if r.scenario == sc and r.method == m]
            curves = np.array([r.losses for r in rs])
            mean = curves.mean(0)
            se = curves.std(0, ddof=1) / math.sqrt(len(rs)) if len(rs) > 1 else 0 * mean
            ax.plot(rs[0].steps, mean, label=m, lw=2.2 if m == "ftw" else 1.2)
            ax.fill_between(rs[0].steps, mean - se, mean + se, alpha=0.15)
        ax.set(title=f"{sc}: held-out target loss (mean ± s.e. over seeds)", xlabel="step",
               ylabel="target loss")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = folder / f"quality_{sc}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    cal = [(r.method, c) for r in results for c in r.calibration if c]
    if cal:
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        for m in sorted({m for m, _ in cal}):
            pts = np.array([(c["pred"], c["realized"]) for mm, c in cal if mm == m])
            ax.scatter(pts[:, 0], pts[:, 1], s=6, alpha=0.5, label=m)
        lim = [min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1])]
        ax.plot(lim, lim, "k--", lw=0.8)
        ax.set(title="calibration: target-batch loss decrease per step",
               xlabel="predicted (first order, ĝᵀΔθ)", ylabel="realized")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = folder / "quality_calibration.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _add_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("the learning rate (every method the same)")
    group.add_argument("--lr", type=float, help="AdamW's (peak) learning rate (default: the "
                       "suite's, 2e-3 in full, 1e-3 in steady)")
    group.add_argument("--scheduler", choices=("constant", "linear", "cosine"),
                       help="the schedule over the run's steps, transformers' (default: "
                       "constant)")
    group.add_argument("--warmup-steps", type=int, help="linear warmup steps before the "
                       "schedule (default: 0)")
    parser.add_argument("--finetune", choices=("lora", "full"), help="what trains: LoRA r 8 on "
                        "q/k/v/o, or every parameter (default: lora; give a full fine-tuning "
                        "--lr, e.g. 1e-5)")


def _with_schedule(parser: argparse.ArgumentParser, args: argparse.Namespace,
                   suite: Suite) -> Suite:
    """``suite`` at ``--lr``, ``--scheduler``, ``--warmup-steps`` and ``--finetune``
    (``suite.json`` keeps them, so runs under another schedule are not mixed)."""
    if args.lr is not None:
        if not args.lr > 0:
            parser.error(f"--lr must be > 0, got {args.lr}")
        suite = replace(suite, lr=args.lr)
    if args.scheduler is not None:
        suite = replace(suite, scheduler=args.scheduler)
    if args.warmup_steps is not None:
        if not 0 <= args.warmup_steps < suite.steps:
            parser.error(f"--warmup-steps must be in [0, {suite.steps}) (the suite's steps), "
                         f"got {args.warmup_steps}")
        suite = replace(suite, warmup_steps=args.warmup_steps)
    if args.finetune is not None:
        suite = replace(suite, finetune=args.finetune)
    return suite


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gradsift.bench.quality",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="full")
    parser.add_argument("--out", type=Path, default=None, help="default: runs/quality-<suite>")
    parser.add_argument("--scenarios", help="comma-separated scenario names (default: all)")
    parser.add_argument("--methods", help="comma-separated methods (default: the suite's)")
    parser.add_argument("--seeds", help="comma-separated seeds (default: the suite's)")
    parser.add_argument("--report-only", action="store_true", help="summarize finished runs")
    parser.add_argument("--threads", type=int, help="torch threads per process")
    parser.add_argument("--shard", default="0/1", help="I/N: run every N-th pending run from "
                        "the I-th (N processes share a machine, e.g. with --threads 1)")
    add_device_argument(parser)
    add_jobs_argument(parser)
    parser.add_argument("--quiet", action="store_true")
    add_own_data_arguments(parser)
    _add_schedule_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    check_jobs(parser, args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    kind = device_kind(parser, args.device)
    suite = _with_schedule(parser, args, with_own_data(parser, args, SUITES[args.suite]))
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or Path(f"runs/quality-{args.suite}")
    claim_out_folder(parser, out, args.suite, suite, RESULTS,
                     write=not args.report_only, device=kind)

    def split(text: str | None) -> list[str] | None:
        return [x.strip() for x in text.split(",") if x.strip()] if text else None

    seeds = [int(s) for s in split(args.seeds)] if args.seeds else None
    if args.report_only:
        results = load_results(out)
    elif args.jobs > 1:
        if run_jobs("gradsift.bench.quality", argv, args, suite, out, split(args.scenarios)):
            return 1
        results = load_results(out)
    else:
        i, n = (int(x) for x in args.shard.split("/"))
        results = run_suite(suite, out, split(args.scenarios), split(args.methods), seeds,
                            quiet=args.quiet, shard=(i, n), device=args.device)
    if not results:
        print(f"no finished runs under {out}", file=sys.stderr)
        return 1
    summary = summarize(results, suite)
    write_summary(out / "summary.json", summary)
    (out / "quality.md").write_text(markdown(summary))
    plot(results, summary, out / "plots")
    if not args.quiet:
        print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
