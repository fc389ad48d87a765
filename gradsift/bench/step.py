"""Benchmark of one online training step: gradsift's selection step against plain training.

DESIGN.md §5: "the cost to beat is one plain training step on the same B candidates:
selection should add little on top of it". What is measured, per step, on the same candidate
batches (every configuration reads the same stream file from its start, so step i of every
configuration sees the same B records):

* ``plain B`` -- the baseline, what a team does without selection: read and tokenize the next
  B records, collate, forward, mean per-sample loss, ``.backward()``, gradient clipping (the
  run's ``max_grad_norm``, as the gradsift step does), ``AdamW.step()``, scheduler step,
  ``zero_grad``.
* ``plain k`` -- the same on a random k-subset of those B (the cost of training on the budget
  alone, without knowing which k to take).
* ``gradsift <method>`` -- the whole ``OnlineTrainer.step()`` (read + capture over all B with
  factors, target gradient, selection, weighted update from the factors + AdamW step, selection
  log), with its split from the selection record's ``timing``: ``capture`` (collate + one
  forward + one backward to the layer outputs), ``target`` (forward + backward over
  ``target_batch_size`` target examples, every ``target_refresh`` steps), ``selection``
  (optimizer state read, ``b``, ``K``, the solver), ``update`` (``Σ w_i g_i`` from the factors,
  clipping, AdamW step) and ``other`` (the rest: reading and tokenizing the stream, writing the
  logs). Selectors that read no gradients (``random``: indices; ``loss``: losses) skip the
  capture: ``capture`` is then their no-grad forward over B (``loss``) or nothing
  (``random``), and ``update`` the forward+backward over the k chosen.
* ``gradsift two-pass`` -- ``ftw``'s step with the update from a second pass: score with the
  one forward+backward over B of the capture, then train with a separate forward+backward over
  the k selected (the way GREATS' reference code trains; ``SelectionStep.second_pass``).
* ``gradsift ftw-target-rides`` (not in the defaults) -- ``ftw`` with
  ``engine.target_with_candidates``: the target batch in the candidates' capture, no target
  pass of its own (its ``target`` column is then only the split and the mean).
* ``gradsift ftw-truncated`` -- ``ftw`` with truncated scoring (``engine.score_layers`` =
  ``--score-layers``, default 1): capture over the top L blocks (and the modules above them)
  only, then the update from a separate forward+backward over the k selected.

Every trainer (plain ones included) is built by ``gradsift.recipe.setup`` from a ``RunConfig``
(``eval_every=0``, ``checkpoint_every=0``: no evaluation or checkpoint inside the timings),
on a stream made by ``gradsift.sources.build_stream`` in a temporary folder. Records shorter
than ``--seq-len`` give shorter batches; the report gives the actual padded width and the
non-pad tokens per batch.

Timing: ``--warmup`` steps per configuration first (so that AdamW's state exists and the
Adam-geometry path runs), then ``--repeats`` timed steps, all configurations interleaved
in one process, in a new order every round (a permutation drawn from ``--seed``), so that load
from other processes, and whatever one step leaves behind for the next, falls on all of them
alike. Wall-clock median (min), and median process CPU
time, and the median count of minor page faults per step (memory the allocator mapped afresh
and the step touched first). Every configuration runs with the same CPU allocator setting
(``--cpu-allocator``, gradsift's default ``tuned``: ``gradsift.allocator``). On cpu the default
is one intra-op thread (``--threads``): on a shared machine a descheduled second OpenMP thread
stalls every parallel region.

The defaults (tiny model, full fine-tuning, B=16, k=4, T=128) take about a minute and a half on
a 2-core CPU. The output ends with one line per method, ``ratio METHOD VALUE``: the median
step over the median plain-B step of the same run (scripts read these lines).

Reported at ``target_refresh=1``; the step at ``target_refresh=R`` (``--refresh``) is
derived per step as ``total - target * (1 - 1/R)``; with ``--measure-refresh`` an ``ftw``
trainer at ``target_refresh=R`` also runs, and its mean over the timed steps is given (a
median would hide the refresh steps).

With ``--seq-lens 256,512,...`` the benchmark instead writes the long-context table
(``gradsift.bench.step_long``): per T, step time and peak memory of the plain step, ``ftw``,
each capture route, ``two-pass`` and ``ftw-truncated``, one fresh process per row (defaults
there: B=4, k=1, 2 timed steps after 1 warm-up; ``--plot FILE`` draws it).

Usage::

    python -m gradsift.bench.step [--model tiny|smollm2-135m] [--device cpu|cuda]
        [--dtype float32|bfloat16]
        [--batch-size 16] [--budget 4] [--seq-len 128] [--full|--lora]
        [--methods ftw,greats,cosine,loss,two-pass,random,ftw-truncated] [--score-layers 1]
        [--repeats 3] [--warmup 1] [--refresh 4] [--measure-refresh] [--threads N]
        [--markdown FILE]
    python -m gradsift.bench.step --seq-lens 256,512,1024,2048,4096,8192 [--batch-size 4]
        [--budget 1] [--score-layers 1] [--ghost-max-len 2048] [--markdown FILE] [--plot PNG]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gradsift.allocator import MODES
from gradsift.bench import emit, quiet

SPLIT = ("capture", "target", "selection", "update", "other")
TWO_PASS = "two-pass"  # ftw's selection, then a separate forward+backward over the k
TRUNCATED = "ftw-truncated"  # ftw scoring the top --score-layers blocks, then a second pass
RIDING = "ftw-target-rides"  # ftw with the target batch in the candidates' pass
DEFAULT_METHODS = f"ftw,greats,cosine,loss,{TWO_PASS},random,{TRUNCATED}"
PLAIN_SPLIT = ("data", "compute")
DTYPE_NAMES = ("float32", "bfloat16")


@dataclass
class Measured:
    """Timings of one configuration over the timed steps."""

    name: str
    kind: str  # "plain" or "gradsift"
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    parts: dict[str, list[float]] = field(default_factory=dict)
    n_selected: list[int] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    label_tokens: list[int] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)  # minor page faults per step
    refresh: int = 1

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.times)

    def part(self, name: str) -> float:
        return statistics.median(self.parts[name]) if self.parts.get(name) else float("nan")

    def add_parts(self, parts: dict[str, float]) -> None:
        for k, v in parts.items():
            self.parts.setdefault(k, []).append(v)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _minor_faults() -> int:
    """Minor page faults of this process so far: first touches of freshly mapped memory.
    The allocator hands large tensors out as new mappings when its thresholds say so, and
    faulting them in costs time that shows up in whichever phase allocates them."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover - not on Linux
        return "n/a"


# ----------------------------------------------------------------------------- runners


class PlainRunner:
    """A plain training step on all B candidates, or on a random k-subset of them."""

    def __init__(self, name: str, run: Any, batch_size: int, k: int | None, seed: int):
        from gradsift.engine import OnlineTrainer

        trainer: OnlineTrainer = run.trainer
        self.name, self.batch_size, self.k = name, batch_size, k
        self.model, self.optimizer = trainer.model, trainer.optimizer
        self.scheduler, self.stream = trainer.scheduler, trainer.stream
        self.pad_token_id, self.device = trainer.pad_token_id, trainer.device
        self.micro = trainer.config.micro_batch_size
        self.max_grad_norm = trainer.config.max_grad_norm
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.generator = torch.Generator().manual_seed(seed)
        self.last_batch: dict[str, Any] = {}

    def step(self) -> dict[str, Any]:
        from gradsift.capture import forward_losses
        from gradsift.data import collate

        dev = str(self.device)
        _sync(dev)
        t0 = time.perf_counter()
        examples = self.stream.next_batch(self.batch_size)
        if not examples:
            raise RuntimeError("the benchmark stream ran out: raise n_stream")
        if self.k is not None:
            pick = torch.randperm(len(examples), generator=self.generator)[: self.k]
            examples = [examples[i] for i in sorted(pick.tolist())]
        size = self.micro or len(examples)
        batches = []
        for start in range(0, len(examples), size):
            b = collate(examples[start : start + size], self.pad_token_id)
            batches.append({k: v.to(self.device) if torch.is_tensor(v) else v
                            for k, v in b.items()})
        t1 = time.perf_counter()
        self.model.train()
        for b in batches:
            losses = forward_losses(self.model, b)
            (losses.sum() / len(examples)).backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        _sync(dev)
        t2 = time.perf_counter()
        self.last_batch = {
            "width": sum(int(b["input_ids"].shape[1]) for b in batches) // len(batches),
            "tokens": sum(int(b["attention_mask"].sum()) for b in batches),
            "label_tokens": sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches),
        }
        return {"data": t1 - t0, "compute": t2 - t1, "n_selected": len(examples)}


class GradsiftRunner:
    """``OnlineTrainer.step()`` of one method."""

    def __init__(self, name: str, run: Any):
        self.name, self.trainer = name, run.trainer

    def step(self) -> dict[str, Any]:
        dev = str(self.trainer.device)
        _sync(dev)
        t0 = time.perf_counter()
        record = self.trainer.step()
        _sync(dev)
        total = time.perf_counter() - t0
        if record is None:
            raise RuntimeError("the benchmark stream ran out: raise n_stream")
        parts = {k: float(record["timing"].get(k, 0.0)) for k in SPLIT[:-1]}
        parts["other"] = total - sum(parts.values())
        parts["n_selected"] = len(record["selected_ids"])
        parts["_total"] = total
        return parts


# ----------------------------------------------------------------------------- the benchmark


def build_data(folder: Path, n_stream: int, n_target: int) -> tuple[Path, Path]:
    from gradsift.sources import build_stream

    build_stream("arithmetic", folder, seed=0, n_stream=n_stream, n_target=n_target,
                 sources=["code", "verse", "arithmetic"])
    return folder / "stream.jsonl", folder / "target.jsonl"


def make_config(args: argparse.Namespace, stream: Path, target: Path, method: str,
                refresh: int = 1, score_layers: int | None = None,
                extra: tuple[str, ...] = ()) -> Any:
    from gradsift.config import load_config

    overrides = [
        f"model={args.model}", f"device={args.device}", f"dtype={args.dtype}", f"method={method}",
        f"stream={stream}", f"target={target}",
        f"engine.candidates_per_step={args.batch_size}", f"engine.budget_per_step={args.budget}",
        f"max_length={args.seq_len}", f"engine.target_batch_size={args.target_batch_size}",
        f"engine.target_refresh={refresh}", "engine.eval_every=0", "engine.checkpoint_every=0",
        "engine.max_consecutive_skips=0", "steps=1000000", f"seed={args.seed}",
    ]
    if not args.lora:
        overrides.append("lora=false")
    overrides.append(f"cpu_allocator={args.cpu_allocator}")
    if score_layers is not None:
        overrides.append(f"engine.score_layers={score_layers}")
    return load_config(None, [*overrides, *extra])


def method_overrides(method: str) -> tuple[str, tuple[str, ...]]:
    """The selector a timed configuration runs and its config overrides: the step's own
    variants (``two-pass``, ``ftw-truncated``, ``ftw-target-rides``) or the quality suite's
    (``"ftw@geometry=adam@target_ema=0.5"``: engine keys to ``engine.``, the rest to
    ``method_options.``)."""
    from gradsift.bench.scenarios import parse_method

    if method in (TWO_PASS, TRUNCATED, RIDING):
        return "ftw", ("engine.target_with_candidates=true",) if method == RIDING else ()
    selector, engine, options = parse_method(method)
    return selector, (*[f"engine.{k}={v}" for k, v in engine.items()],
                      *[f"method_options.{k}={v}" for k, v in options.items()])


def run_benchmark(args: argparse.Namespace, tmp: Path) -> tuple[list[Measured], dict[str, Any]]:
    """Build every configuration in ``tmp``, warm up, time interleaved; results and facts."""
    from gradsift.recipe import setup

    n_stream = args.batch_size * (args.warmup + args.repeats) + 64
    stream, target = build_data(tmp / "data", n_stream, args.n_target)

    runners: list[PlainRunner | GradsiftRunner] = []
    results: list[Measured] = []
    facts: dict[str, Any] = {}
    t_setup = time.perf_counter()
    for name, k in (("plain B", None), ("plain k", args.budget)):
        run = setup(make_config(args, stream, target, "random"), tmp / name.replace(" ", "-"))
        runners.append(PlainRunner(name, run, args.batch_size, k, args.seed))
        results.append(Measured(name, "plain"))
        if k is None:
            model = run.trainer.model
            facts["params"] = sum(p.numel() for p in model.parameters())
            facts["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            facts["captured_layers"] = len(run.trainer.module_names)
            facts["other_params"] = sum(p.numel() for p in run.trainer.other_params)
            pool = run.trainer.target_pool
            facts["target_len"] = statistics.fmean(len(e.input_ids) for e in pool)
    gradsift_configs = [(m, 1) for m in args.methods]
    if args.measure_refresh:
        gradsift_configs.append(("ftw", args.refresh))
    for method, refresh in gradsift_configs:
        name = f"gradsift {method}" + (f" (refresh {refresh})" if refresh != 1 else "")
        selector, extra = method_overrides(method)
        layers = args.score_layers if method == TRUNCATED else None
        run = setup(make_config(args, stream, target, selector, refresh, layers, extra),
                    tmp / name.replace(" ", "-").replace("(", "").replace(")", ""))
        run.trainer.selection.second_pass = method == TWO_PASS
        runners.append(GradsiftRunner(name, run))
        results.append(Measured(name, "gradsift", refresh=refresh))
    facts["setup_s"] = time.perf_counter() - t_setup

    n = len(runners)
    orders = random.Random(args.seed)
    for i in range(args.warmup + args.repeats):
        timed = i >= args.warmup
        # a new order every round: a step slows the one after it (a small step before a large
        # one, in measurements), so no configuration may always follow the same one
        order = list(range(n))
        orders.shuffle(order)
        for c in order:
            runner, res = runners[c], results[c]
            faults0 = _minor_faults()
            cpu0 = time.process_time()
            t0 = time.perf_counter()
            out = runner.step()
            wall = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
            faults = _minor_faults() - faults0
            if not timed:
                continue
            res.times.append(out.pop("_total", wall))
            res.cpu_times.append(cpu)
            res.faults.append(faults)
            res.n_selected.append(int(out.pop("n_selected")))
            res.add_parts(out)
            if isinstance(runner, PlainRunner):
                res.widths.append(runner.last_batch["width"])
                res.tokens.append(runner.last_batch["tokens"])
                res.label_tokens.append(runner.last_batch["label_tokens"])
        if args.verbose:
            print(f"round {i + 1}/{args.warmup + args.repeats} done "
                  f"({'timed' if timed else 'warm-up'})", file=sys.stderr, flush=True)
    return results, facts


# ----------------------------------------------------------------------------- report


def _fmt(x: float) -> str:
    return f"{x:.3f}" if x >= 0.0995 else f"{x * 1000:.1f} ms"


def _paired(times: list[float], base: list[float]) -> float:
    """Median over steps of ``times[i] / base[i]`` (step i of both saw the same batch)."""
    return statistics.median(t / b for t, b in zip(times, base, strict=True))


def markdown(results: list[Measured], facts: dict[str, Any], args: argparse.Namespace) -> str:
    by = {r.name: r for r in results}
    base, plain_k = by["plain B"], by["plain k"]
    mode = "LoRA r 8 on q/k/v/o" if args.lora else "full fine-tuning"
    truncated = (f" `ftw-truncated` scores the top {args.score_layers} block(s) and the "
                 "modules above them." if TRUNCATED in args.methods else "")
    lines = [
        f"Model `{args.model}` ({facts['params'] / 1e6:.1f}M params, {mode}: "
        f"{facts['trainable'] / 1e6:.2f}M trainable, {facts['captured_layers']} captured linear "
        f"layers, {facts['other_params'] / 1e6:.2f}M trainable params outside them). "
        f"B={args.batch_size}, k={args.budget}, max_length={args.seq_len}, "
        f"target_batch_size={args.target_batch_size} (mean target example "
        f"{facts['target_len']:.0f} tokens), AdamW, max_grad_norm 1.0, {args.dtype}. "
        f"Device: {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads"
        + (f", CPU allocator {args.cpu_allocator}." if args.device == "cpu" else ".")
        + truncated,
        f"Batches (plain B, same records for every configuration): padded width "
        f"{statistics.fmean(base.widths):.0f} tokens (min {min(base.widths)}, max "
        f"{max(base.widths)}), {statistics.fmean(base.tokens):.0f} non-pad tokens and "
        f"{statistics.fmean(base.label_tokens):.0f} loss tokens per batch of B on average; "
        f"plain k: width {statistics.fmean(plain_k.widths):.0f}, "
        f"{statistics.fmean(plain_k.tokens):.0f} non-pad tokens.",
        f"Time: wall-clock median (min) of {args.repeats} steps per configuration after "
        f"{args.warmup} warm-up steps, all {len(results)} configurations interleaved "
        f"in one process, in a new order every round; CPU: median process CPU seconds. "
        f"Load average at start / end: {args.load_start} / {_loadavg()}.",
        "",
        "| configuration | step (s) | x plain B | x plain k | CPU (s) | capture | target "
        "| selection | update | other | selected | page faults (k) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.refresh != 1:
            continue
        cpu = statistics.median(r.cpu_times)
        sel = f"{statistics.fmean(r.n_selected):.1f}"
        faults = f"{statistics.median(r.faults) / 1000:.0f}" if r.faults else "–"
        row = (f"| {r.name} | {r.median:.3f} ({min(r.times):.3f}) | "
               f"{r.median / base.median:.2f} | {r.median / plain_k.median:.2f} | {cpu:.3f} | ")
        if r.kind == "plain":
            row += (f"data {_fmt(r.part('data'))}, fwd+bwd+step {_fmt(r.part('compute'))} "
                    f"| | | | | {sel} | {faults} |")
        else:
            row += " | ".join(_fmt(r.part(k)) for k in SPLIT) + f" | {sel} | {faults} |"
        lines.append(row)
    rr = args.refresh
    lines += [
        "",
        f"Ratios: median step / median plain-B step, and (paired) the median over steps of "
        f"step i / plain-B step i (the same batch: batch widths vary from step to step). "
        f"`refresh {rr}` is derived from the same steps: per step, total - target x "
        f"(1 - 1/{rr}).",
        "",
        f"| method | x plain B (refresh 1) | paired | x plain B (refresh {rr}, derived) | "
        f"paired | x plain k (refresh 1) | overhead over plain B (s, refresh 1) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.kind != "gradsift" or r.refresh != 1:
            continue
        steps = [t - g * (1 - 1 / rr) for t, g in zip(r.times, r.parts["target"], strict=True)]
        lines.append(
            f"| {r.name.removeprefix('gradsift ')} | {r.median / base.median:.2f} | "
            f"{_paired(r.times, base.times):.2f} | {statistics.median(steps) / base.median:.2f} | "
            f"{_paired(steps, base.times):.2f} | {r.median / plain_k.median:.2f} | "
            f"{r.median - base.median:+.3f} |")
    for r in results:
        if r.refresh == 1:
            continue
        steps = range(args.warmup, args.warmup + len(r.times))  # trainer.state.step
        refreshed = sum(1 for s in steps if s % r.refresh == 0)
        lines += [
            "",
            f"Measured: `{r.name}`: mean step {r.mean:.3f} s over {len(r.times)} timed steps "
            f"({refreshed} of them drew a target batch) = {r.mean / base.mean:.2f} x the mean "
            f"plain-B step ({base.mean:.3f} s); mean split: "
            + ", ".join(f"{k} {_fmt(statistics.fmean(r.parts[k]))}" for k in SPLIT) + ".",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny, smollm2-135m or a model spec")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32",
                        help="parameter dtype of every configuration (default float32; "
                             "bfloat16 trains in bf16 and keeps gradsift's products in float32)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="B candidates per step (default 16; 4 with --seq-lens)")
    parser.add_argument("--budget", type=int, default=None,
                        help="k, the data budget per step (default 4; 1 with --seq-lens)")
    parser.add_argument("--seq-len", type=int, default=128, help="max_length (truncation)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--full", dest="lora", action="store_false", default=False,
                       help="full fine-tuning (default)")
    group.add_argument("--lora", dest="lora", action="store_true", help="LoRA r 8 on q/k/v/o")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f"comma-separated selectors to time (variants as in the quality "
                             f"suite: ftw@geometry=adam), and {TWO_PASS!r} "
                             f"(default: {DEFAULT_METHODS})")
    parser.add_argument("--score-layers", type=int, default=1,
                        help=f"L of {TRUNCATED!r}: score with the top L blocks (default 1)")
    parser.add_argument("--seq-lens", default=None,
                        help="comma-separated T: write the long-context table instead")
    parser.add_argument("--ghost-max-len", type=int, default=2048,
                        help="with --seq-lens: run the ghost route only up to this T")
    parser.add_argument("--plot", help="with --seq-lens: also draw the table to this PNG")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed steps per configuration (default 3; 2 with --seq-lens)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (>= 1)")
    parser.add_argument("--target-batch-size", type=int, default=8)
    parser.add_argument("--n-target", type=int, default=200, help="target records built")
    parser.add_argument("--refresh", type=int, default=4,
                        help="target_refresh R for the derived (and measured) refresh-R step")
    parser.add_argument("--measure-refresh", action="store_true",
                        help="also time an ftw trainer at target_refresh=R")
    parser.add_argument("--cpu-allocator", choices=MODES, default="tuned",
                        help="on cpu: glibc malloc keeping freed memory (tuned, gradsift's "
                        "default, for every configuration) or as it comes (system)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: 1 on cpu, torch's own on cuda)")
    parser.add_argument("--markdown", help="also write the markdown report to this file")
    parser.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")
    args = parser.parse_args(argv)
    long = args.seq_lens is not None
    for key, normal, with_seq_lens in (("batch_size", 16, 4), ("budget", 4, 1),
                                       ("repeats", 3, 2)):
        if getattr(args, key) is None:
            setattr(args, key, with_seq_lens if long else normal)
    args.methods = [m for m in args.methods.split(",") if m]
    if args.warmup < 1:
        parser.error("--warmup must be >= 1: the Adam-geometry path needs optimizer state")
    if args.repeats < 1 or args.refresh < 1:
        parser.error("--repeats and --refresh must be >= 1")
    if args.budget > args.batch_size:
        parser.error("--budget must not exceed --batch-size")
    if args.score_layers < 1:
        parser.error("--score-layers must be >= 1")
    if args.threads is None and not args.device.startswith("cuda"):
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    args.load_start = _loadavg()
    if long:
        with quiet():
            return long_context(args, parser)
    with quiet(), tempfile.TemporaryDirectory(prefix="gradsift-bench-step-") as tmp:
        results, facts = run_benchmark(args, Path(tmp))
    report = markdown(results, facts, args)
    emit(report, args.markdown)
    print("\n".join(ratio_lines(results)))
    return 0


def long_context(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``--seq-lens``: the long-context table (``gradsift.bench.step_long``), and its plot."""
    from gradsift.bench import step_long

    try:
        args.seq_lens = [int(t) for t in args.seq_lens.split(",") if t]
    except ValueError:
        parser.error(f"--seq-lens must be comma-separated integers, got {args.seq_lens!r}")
    if not args.seq_lens or min(args.seq_lens) < 2:
        parser.error("--seq-lens needs at least one T >= 2")
    if args.lora:
        parser.error("--seq-lens measures full fine-tuning only")
    results = step_long.run(args)
    emit(step_long.markdown(results, args), args.markdown)
    if args.plot:
        step_long.plot(results, args, args.plot)
    return 1 if any("failed" in r for r in results) else 0


def ratio_lines(results: list[Measured]) -> list[str]:
    """``ratio METHOD VALUE`` per method at refresh 1: median step / median plain-B step."""
    base = next(r for r in results if r.name == "plain B")
    return [f"ratio {r.name.removeprefix('gradsift ')} {r.median / base.median:.3f}"
            for r in results if r.kind == "gradsift" and r.refresh == 1]


def read_ratios(text: str) -> dict[str, float]:
    """The ``ratio METHOD VALUE`` lines of this benchmark's output, as a dict."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "ratio":
            out[parts[1]] = float(parts[2])
    return out


if __name__ == "__main__":
    sys.exit(main())
