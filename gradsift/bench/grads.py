"""Benchmark of per-sample gradient Grams: gradsift's routes against plain training and torch.func.

What is measured, at each sequence length T, on a small randomly initialised Llama built from a
``transformers`` config (no download; see ``MODEL``) and one random batch of B full-length
sequences (labels = inputs, no padding):

* ``fwd+bwd`` -- the baseline: one forward, the mean per-sample loss, ``.backward()`` into
  every parameter (what one training step costs before the optimizer).
* ``gradsift auto|ghost|materialize`` -- ``gradsift.per_sample_grads(model, batch, route=...)``
  followed by ``.gram()``: the (B, B) Gram of the per-sample gradients of every captured linear
  weight (all projections and the untied ``lm_head``).
* ``torch.func`` -- ``vmap(grad(...))`` over ``functional_call`` of the same model, w.r.t. the
  same linear weights, then the Gram of the flattened per-sample gradients (summed over blocks
  of 65536 entries: the same number as one GEMM on the concatenation, without its copy, and
  accurate to ~1e-6 in float32, so it serves as the reference of the correctness check).

Time: the median (and min) wall-clock seconds over ``--repeats`` runs after one warm-up run
(``torch.cuda.synchronize`` around each run on cuda), plus the process CPU time of the same runs.
All configurations of one T are timed in one subprocess, interleaved round-robin, so that load
from other processes on a shared machine falls on all of them alike.

Peak memory: each configuration runs (warm-up + one run) in a fresh subprocess. On cpu, it is
``ru_maxrss`` (``getrusage(RUSAGE_SELF)``, the process' resident-set high-water mark) at the end
minus the current RSS (``/proc/self/statm``) measured after the model and batch are built and
garbage collected; this counts every byte touched by PyTorch and by the allocator. On cuda it is
``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` at the same point.

Correctness is checked before anything is reported: the Grams of the three routes must agree with
each other at every T, and with torch.func's at every T where torch.func ran, to ``--rtol``
(``max|G - G_ref| / max|G_ref|``); otherwise the script exits with an error and no table.

Usage::

    python -m gradsift.bench.grads [--device cpu|cuda] [--seq-lens 128,512,2048]
        [--batch-size 8,4,2] [--repeats 5] [--threads N] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from gradsift.bench import emit

CONFIGS = ("fwd+bwd", "auto", "ghost", "materialize", "torch.func")
ROUTE_CONFIGS = ("auto", "ghost", "materialize")
# Small Llama: 4 layers, hidden 256, MLP 688, 4 heads, vocab 4096, untied lm_head (~5.3M params).
MODEL: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 4096,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}
SEED = 0
# torch.func's Gram is summed over blocks of this many gradient entries: one float32 GEMM over
# millions of columns loses ~K * 1e-10 relative accuracy on CPU, blocks keep it at ~1e-6.
GRAM_BLOCK = 2**16


@dataclass
class Result:
    """One configuration at one sequence length, as measured by a worker subprocess."""

    config: str
    seq_len: int
    batch_size: int
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    gram: list[list[float]] | None = None
    routes: dict[str, list[str]] | None = None
    skipped: str | None = None
    rel_err: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.times)


# ----------------------------------------------------------------------------- model and batch


def build_model(device: str) -> nn.Module:
    """The benchmark's randomly initialised Llama (deterministic: seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**MODEL))
    return model.to(device).eval()


def make_batch(batch_size: int, seq_len: int, device: str) -> dict[str, torch.Tensor]:
    """B random full-length sequences, labels = inputs (deterministic: seeded)."""
    gen = torch.Generator().manual_seed(SEED + seq_len)
    ids = torch.randint(0, MODEL["vocab_size"], (batch_size, seq_len), generator=gen)
    return {"input_ids": ids.to(device), "labels": ids.clone().to(device)}


# ----------------------------------------------------------------------------- the configurations


def _fwd_bwd(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> None:
    from gradsift.capture import forward_losses

    model.zero_grad(set_to_none=True)
    forward_losses(model, batch).mean().backward()


def _gradsift(route: str) -> Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]:
    from gradsift import per_sample_grads

    def run(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return per_sample_grads(model, batch, route=route).gram()

    return run


def _torch_func(
    model: nn.Module,
) -> Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]:
    """Per-sample grads of the captured linear weights by ``vmap(grad(functional_call))``."""
    from torch.func import functional_call, grad, vmap

    from gradsift.capture import resolve_modules
    from gradsift.loss import per_sample_loss

    weight_names = [f"{n}.weight" for n in resolve_modules(model)]
    params = dict(model.named_parameters())

    def loss_one(weights: dict[str, torch.Tensor], ids: torch.Tensor, labels: torch.Tensor):
        out = functional_call(
            model, weights, args=(), kwargs={"input_ids": ids[None], "use_cache": False}
        )
        return per_sample_loss(out.logits, labels[None])[0]

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))

    def run(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        weights = {n: params[n].detach() for n in weight_names}
        # no_grad: grad() ignores it, but it stops the outer autograd from recording a graph.
        with torch.no_grad():
            grads = per_sample(weights, batch["input_ids"], batch["labels"])
            b = batch["input_ids"].shape[0]
            gram = torch.zeros(b, b, device=batch["input_ids"].device)
            for n in weight_names:
                for g in grads[n].reshape(b, -1).split(GRAM_BLOCK, dim=1):
                    gram += g @ g.T
        return gram

    return run


def _routes_chosen(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """Route ``auto`` takes for each layer type (``model.layers.N.`` stripped) of a self-Gram."""
    import re

    from gradsift import per_sample_grads
    from gradsift.factors import choose_route

    grads = per_sample_grads(model, batch, route="auto")
    chosen: dict[str, set[str]] = {}
    for layer in grads.layers:
        if getattr(layer, "kind", "linear") != "linear":
            continue  # embeddings and norms have one way each; routes are for linear layers
        b, t = layer.inputs.shape[:2]
        kind = re.sub(r"^(model\.)?layers\.\d+\.", "", layer.module_name)
        route = choose_route(b, t, b, t, layer.d_in_aug, layer.d_out)
        chosen.setdefault(kind, set()).add(route)
    return {k: sorted(v) for k, v in chosen.items()}


# ----------------------------------------------------------------------------- worker


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


Fn = Callable[[nn.Module, Mapping[str, torch.Tensor]], Any]


def _make_fn(config: str, model: nn.Module) -> Fn:
    if config == "fwd+bwd":
        return _fwd_bwd
    if config == "torch.func":
        return _torch_func(model)
    return _gradsift(config)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def memory_worker(config: str, seq_len: int, batch_size: int, device: str) -> Result:
    """Peak memory and Gram of one configuration, in this fresh process (warm-up + one run)."""
    warnings.filterwarnings("ignore", message=".*batching rule.*")  # sdpa under vmap (torch.func)
    model = build_model(device)
    batch = make_batch(batch_size, seq_len, device)
    fn = _make_fn(config, model)
    cuda = device.startswith("cuda")
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _current_rss()
    out = None
    for _ in range(2):
        out = None
        out = fn(model, batch)
    _sync(device)
    result = Result(config=config, seq_len=seq_len, batch_size=batch_size)
    result.peak_bytes = (torch.cuda.max_memory_allocated() if cuda else _max_rss()) - base
    if isinstance(out, torch.Tensor):
        result.gram = out.double().cpu().tolist()
    if config == "auto":  # after the measurement: it must not pre-warm the allocator
        result.routes = _routes_chosen(model, batch)
    return result


def time_worker(
    configs: list[str], seq_len: int, batch_size: int, device: str, repeats: int
) -> list[Result]:
    """Wall and CPU times of several configurations, interleaved round-robin in one process.

    Interleaving spreads any interference from other processes over all configurations alike,
    so that their ratios stay meaningful on a shared machine.
    """
    warnings.filterwarnings("ignore", message=".*batching rule.*")
    model = build_model(device)
    batch = make_batch(batch_size, seq_len, device)
    fns = {c: _make_fn(c, model) for c in configs}
    results = {c: Result(config=c, seq_len=seq_len, batch_size=batch_size) for c in configs}
    for i in range(repeats + 1):  # the first round is the warm-up
        for c in configs:
            _sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            fns[c](model, batch)
            _sync(device)
            if i > 0:
                results[c].times.append(time.perf_counter() - start)
                results[c].cpu_times.append(time.process_time() - cpu_start)
        model.zero_grad(set_to_none=True)
    return list(results.values())


def _spawn(
    mode: str, configs: list[str], seq_len: int, batch_size: int, args: argparse.Namespace
) -> list[Result]:
    """Run a worker subprocess; a failure or timeout marks every configuration skipped."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [sys.executable, "-m", "gradsift.bench.grads", "--worker", mode, "--out", path]
    cmd += ["--configs", ",".join(configs), "--device", args.device, "--seq-lens", str(seq_len)]
    cmd += ["--batch-size", str(batch_size), "--repeats", str(args.repeats)]
    cmd += ["--threads", str(args.threads)]
    timeout = args.worker_timeout * len(configs)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            why = f"failed (rc {proc.returncode}): {tail}"
            return [Result(c, seq_len, batch_size, skipped=why) for c in configs]
        with open(path) as f:
            return [Result(**r) for r in json.load(f)]
    except subprocess.TimeoutExpired:
        return [Result(c, seq_len, batch_size, skipped=f"over {timeout:.0f} s") for c in configs]
    finally:
        os.unlink(path)


# ----------------------------------------------------------------------------- checks and report


def _rel_err(g: list[list[float]], ref: list[list[float]]) -> float:
    a, b = torch.tensor(g, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64)
    return ((a - b).abs().max() / b.abs().max()).item()


def check(results: list[Result], rtol: float) -> list[str]:
    """Fill ``rel_err`` (against torch.func where it ran, else materialize); return failures."""
    failures = []
    for t in sorted({r.seq_len for r in results}):
        at_t = {r.config: r for r in results if r.seq_len == t and r.gram is not None}
        routes = [at_t[c] for c in ROUTE_CONFIGS if c in at_t]
        if len(routes) < len(ROUTE_CONFIGS):
            failures.append(f"T={t}: a gradsift route did not run, routes cannot be compared")
        ref = at_t.get("torch.func") or at_t.get("materialize")
        for r in routes:
            for other in routes:
                err = _rel_err(r.gram, other.gram)  # type: ignore[arg-type]
                if err > rtol:
                    failures.append(f"T={t}: {r.config} vs {other.config}: rel. err {err:.2e}")
            if ref is not None:
                r.rel_err = _rel_err(r.gram, ref.gram)  # type: ignore[arg-type]
                if r.rel_err > rtol:
                    failures.append(f"T={t}: {r.config} vs {ref.config}: rel. err {r.rel_err:.2e}")
    smallest = min(r.seq_len for r in results)
    if not any(
        r.config == "torch.func" and r.gram is not None and r.seq_len == smallest for r in results
    ):
        failures.append(
            f"T={smallest}: torch.func did not run, the Grams are not checked against it"
        )
    return list(dict.fromkeys(failures))


def _get(results: list[Result], config: str, t: int) -> Result | None:
    for r in results:
        if r.config == config and r.seq_len == t and not r.skipped:
            return r
    return None


def ratios(results: list[Result], seq_lens: list[int]) -> list[tuple[str, str, str, str, str]]:
    """The three headline ratios: (what, ratio of medians, ratio of mins, target, verdict)."""
    rows = []

    def row(
        name: str, t: int, num: str, den: list[str], target: str, ok: Callable[[float], bool]
    ) -> None:
        n, ds = _get(results, num, t), [_get(results, d, t) for d in den]
        if t not in seq_lens or n is None or any(d is None for d in ds):
            rows.append((f"{name} (T={t})", "n/a", "n/a", target, "not measured"))
            return
        value = n.median / min(d.median for d in ds if d is not None)
        best = min(n.times) / min(min(d.times) for d in ds if d is not None)
        verdict = "PASS" if ok(value) else "FAIL"
        rows.append((f"{name} (T={t})", f"{value:.2f}x", f"{best:.2f}x", target, verdict))

    row("gradsift auto + gram / fwd+bwd", 128, "auto", ["fwd+bwd"], "<= 1.5x", lambda v: v <= 1.5)
    row("torch.func / gradsift auto", 512, "torch.func", ["auto"], ">= 5x", lambda v: v >= 5.0)
    row(
        "auto / min(ghost, materialize)",
        2048,
        "auto",
        ["ghost", "materialize"],
        "<= 1.1x",
        lambda v: v <= 1.1,
    )
    return rows


def markdown(results: list[Result], seq_lens: list[int], args: argparse.Namespace) -> str:
    """The report: measurement table, headline ratios, routes auto chose."""
    mem_method = (
        "torch.cuda.max_memory_allocated() - memory_allocated() after building model and batch"
        if args.device.startswith("cuda")
        else "ru_maxrss at the end - current RSS after building model and batch, "
        "one fresh subprocess per configuration (warm-up + 1 run)"
    )
    n_params = sum(p.numel() for p in build_model("cpu").parameters())
    lines = [
        f"Model: random Llama {MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}, "
        f"MLP {MODEL['intermediate_size']}, {MODEL['num_attention_heads']} heads, vocab "
        f"{MODEL['vocab_size']}, untied lm_head ({n_params / 1e6:.1f}M params; 29 linear "
        f"weights captured). Device: {args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads.",
        f"Time: wall-clock median (min) of {args.repeats} runs after 1 warm-up, configurations "
        f"of one T interleaved round-robin in one process; CPU time: median process CPU seconds "
        f"(all threads) of the same runs. Load average at start / end: "
        f"{args.load_start} / {_loadavg()}. Peak memory: {mem_method}.",
        f"Gram check: rel. err = max|G - G_ref| / max|G_ref|, G_ref = torch.func's Gram where it "
        f"ran (else materialize's); routes must agree to {args.rtol:g}.",
        "",
        "| T | B | configuration | time (s) | x fwd+bwd | CPU time (s) | peak mem (MiB) "
        "| Gram rel. err |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for t in seq_lens:
        base = _get(results, "fwd+bwd", t)
        for config in CONFIGS:
            r = next((r for r in results if r.config == config and r.seq_len == t), None)
            if r is None:
                continue
            name = config if config in ("fwd+bwd", "torch.func") else f"gradsift {config} + gram"
            if r.skipped:
                lines.append(f"| {t} | {r.batch_size} | {name} | skipped: {r.skipped} | | | | |")
                continue
            rel = f"{r.median / base.median:.2f}" if base else "n/a"
            mem = f"{r.peak_bytes / 2**20:.0f}" if r.peak_bytes is not None else "n/a"
            err = f"{r.rel_err:.1e}" if r.rel_err is not None else ""
            cpu = f"{statistics.median(r.cpu_times):.3f}" if r.cpu_times else "n/a"
            lines.append(
                f"| {t} | {r.batch_size} | {name} | {r.median:.3f} ({min(r.times):.3f}) | {rel} "
                f"| {cpu} | {mem} | {err} |"
            )
    lines += [
        "",
        "| ratio | of medians | of mins | target | verdict (on medians) |",
        "|---|---:|---:|---:|---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in ratios(results, seq_lens)]
    kinds: list[str] = []
    for r in results:
        for k in r.routes or {}:
            if k not in kinds:
                kinds.append(k)
    lines += ["", "Route `auto` chose, per layer type:", ""]
    lines += ["| layer | " + " | ".join(f"T={t}" for t in seq_lens) + " |"]
    lines += ["|---|" + "---|" * len(seq_lens)]
    for k in kinds:
        cells = []
        for t in seq_lens:
            r = _get(results, "auto", t)
            cells.append("/".join(r.routes.get(k, [])) if r and r.routes else "n/a")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def default_batch_size(seq_len: int) -> int:
    """B used when ``--batch-size`` is not given: 8 up to T=128, 4 up to T=512, else 2."""
    return 8 if seq_len <= 128 else 4 if seq_len <= 512 else 2


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover - not on Linux
        return "n/a"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--seq-lens", default="128,512,2048", help="comma-separated T values")
    parser.add_argument(
        "--batch-size",
        default=None,
        help="one B for every T, or one per T (default: 8 up to T=128, 4 up to 512, else 2)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after 1 warm-up")
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help="subset of " + ",".join(CONFIGS)
    )
    parser.add_argument(
        "--func-max-seq-len",
        type=int,
        default=2048,
        help="skip torch.func above this T (default 2048)",
    )
    parser.add_argument("--worker-timeout", type=float, default=600.0, help="seconds per config")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads in every worker (default: torch's default, the core count)",
    )
    parser.add_argument("--rtol", type=float, default=1e-3, help="Gram agreement tolerance")
    parser.add_argument("--markdown", help="also write the markdown report to this file")
    parser.add_argument("--worker", choices=("mem", "time"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    seq_lens = _ints(args.seq_lens)
    sizes = _ints(args.batch_size) if args.batch_size else [default_batch_size(t) for t in seq_lens]
    if len(sizes) == 1:
        sizes = sizes * len(seq_lens)
    if len(sizes) != len(seq_lens):
        parser.error("--batch-size takes one value or one per --seq-lens value")

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}; choose from {CONFIGS}")
    if args.worker:
        if args.worker == "mem":
            out = [memory_worker(configs[0], seq_lens[0], sizes[0], args.device)]
        else:
            out = time_worker(configs, seq_lens[0], sizes[0], args.device, args.repeats)
        with open(args.out, "w") as f:
            json.dump([asdict(r) for r in out], f)
        return 0

    args.load_start = _loadavg()
    results: list[Result] = []
    for t, b in zip(seq_lens, sizes, strict=True):
        measured: list[Result] = []
        for config in configs:
            if config == "torch.func" and t > args.func_max_seq_len:
                why = f"T > --func-max-seq-len {args.func_max_seq_len}"
                results.append(Result(config, t, b, skipped=why))
                continue
            print(f"T={t} B={b} {config}: peak memory ...", end=" ", file=sys.stderr, flush=True)
            (r,) = _spawn("mem", [config], t, b, args)
            print(
                r.skipped or f"{(r.peak_bytes or 0) / 2**20:.0f} MiB", file=sys.stderr, flush=True
            )
            (results if r.skipped else measured).append(r)
        if not measured:
            continue
        names = [r.config for r in measured]
        print(f"T={t} B={b} timing {', '.join(names)} ...", file=sys.stderr, flush=True)
        timed = {r.config: r for r in _spawn("time", names, t, b, args)}
        for r in measured:
            tr = timed[r.config]
            r.times, r.cpu_times, r.skipped = tr.times, tr.cpu_times, tr.skipped
            msg = r.skipped or f"median {r.median:.3f} s (min {min(r.times):.3f})"
            print(f"  {r.config}: {msg}", file=sys.stderr, flush=True)
            results.append(r)

    failures = check(results, args.rtol)
    if failures:
        print("Gram check FAILED, no table reported:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    report = markdown(results, seq_lens, args)
    emit(report, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
