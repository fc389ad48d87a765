"""What the capture costs over a plain forward+backward, on one model, interleaved.

``gradsift.capture.capture`` (one forward with the taps, one backward that hands each layer's
``D`` over and keeps the compact factors) against a plain forward and
``torch.autograd.grad`` of the summed losses into the trainable parameters, on the same random
batch of B full-length sequences, alternating which runs first, after one warm-up each. Then one
``torch.profiler`` table of each, so that where the time goes can be read off.

    python -m gradsift.bench.capture_cost [--model smollm2-135m] [--lora] [--batch-size 4]
        [--seq-len 256] [--repeats 4] [--threads 1] [--profile]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch

from gradsift.capture import capture, forward_losses


def build(model_name: str, lora: bool) -> torch.nn.Module:
    """The model, float32, with LoRA r 8 on q/k/v/o when ``lora`` (else every weight trains)."""
    from gradsift.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(model_name, dtype=torch.float32)
    if lora:
        from peft import LoraConfig, get_peft_model

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            model = get_peft_model(model, LoraConfig(
                r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    return model.train()


def random_batch(model: torch.nn.Module, batch_size: int, seq_len: int,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """B full-length random sequences, labels = inputs, no padding."""
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (batch_size, seq_len),
                        generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def measure(model: torch.nn.Module, batch_size: int, seq_len: int, repeats: int,
            seed: int = 0) -> dict[str, list[float]]:
    """Wall-clock seconds of ``repeats`` captures and plain forward+backwards, alternating."""
    batch = random_batch(model, batch_size, seq_len, seed)
    params = [p for p in model.parameters() if p.requires_grad]

    def plain() -> None:
        torch.autograd.grad(forward_losses(model, batch, []).sum(), params)

    def captured() -> None:
        capture(model, batch)

    runs: dict[str, Callable[[], None]] = {"plain fwd+bwd": plain, "capture": captured}
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(repeats):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            t0 = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="tiny, smollm2-135m or a spec")
    parser.add_argument("--lora", action="store_true", help="LoRA r 8 on q/k/v/o")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="also print profiler tables")
    args = parser.parse_args(argv)
    for name in ("batch_size", "seq_len", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    torch.set_num_threads(args.threads)
    model = build(args.model, args.lora)
    times = measure(model, args.batch_size, args.seq_len, args.repeats)
    print(f"{args.model}{' LoRA' if args.lora else ''}, B={args.batch_size}, "
          f"T={args.seq_len}, {args.threads} thread(s), {args.repeats} interleaved runs")
    for name, ts in times.items():
        print(f"{name}: median {statistics.median(ts):.3f} s, runs "
              + " ".join(f"{t:.3f}" for t in ts))
    ratio = statistics.median(times["capture"]) / statistics.median(times["plain fwd+bwd"])
    print(f"ratio capture {ratio:.3f}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        batch = random_batch(model, args.batch_size, args.seq_len)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            capture(model, batch)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
