"""Benchmark of the Filter-then-Weight solver: time of ``filter_then_weight(b, K, k)`` per (B, k).

What is measured: for each ``B×k`` in ``--sizes``, a seeded random instance is built from
explicit vectors ``G`` (B × ``--dim``): Gaussian rows plus a shared component along a random
target ``t``, a quarter of them replaced by near-duplicates of others, with norms spread over
two orders of magnitude; then ``b = G t`` and ``K = G Gᵀ`` (float32 torch tensors, CPU). The
time is that of ``filter_then_weight(b, K, k)`` alone (float64 NumPy inside, including the
conversion), median and min over ``--repeats`` runs after one warm-up. The table also gives
the number selected and ``ρ`` of the result relative to top-``k`` by ``b`` with uniform weights.

Usage::

    python -m gradsift.bench.select [--sizes 64x16,128x32,256x64,512x128] [--dim 2048]
        [--repeats 7] [--seed 0]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gradsift.select import alignment_ratio, filter_then_weight


def make_instance(b: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Alignment ``G t`` and Gram ``G Gᵀ`` of a seeded random instance (see module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(dim, generator=gen)
    g = torch.randn(b, dim, generator=gen) + 0.2 * t
    dup = torch.randperm(b, generator=gen)[: b // 4]
    src = torch.randint(0, b, (dup.numel(),), generator=gen)
    g[dup] = g[src] + 0.05 * torch.randn(dup.numel(), dim, generator=gen)
    g = g * torch.exp(torch.empty(b, 1).uniform_(-2.3, 2.3, generator=gen))
    return g @ t, g @ g.T


def bench(sizes: list[tuple[int, int]], dim: int, repeats: int, seed: int) -> list[dict]:
    """One row per (B, k): median/min milliseconds, number selected, ρ / ρ(top-k uniform)."""
    rows = []
    for b_size, k in sizes:
        align, gram = make_instance(b_size, dim, seed)
        filter_then_weight(align, gram, k)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            idx, w = filter_then_weight(align, gram, k)
            times.append(time.perf_counter() - t0)
        top = torch.topk(align, k).indices
        rho_top = alignment_ratio(align, gram, top, torch.full((k,), 1.0 / k))
        rho = alignment_ratio(align, gram, idx, w)
        rows.append(
            {
                "B": b_size,
                "k": k,
                "median_ms": 1e3 * statistics.median(times),
                "min_ms": 1e3 * min(times),
                "selected": int(idx.numel()),
                "rho_vs_topk": rho / rho_top if rho_top > 0 else float("nan"),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="64x16,128x32,256x64,512x128")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    rows = bench(sizes, args.dim, args.repeats, args.seed)  # type: ignore[arg-type]
    print(f"filter_then_weight on CPU ({torch.get_num_threads()} torch threads), dim={args.dim}")
    print(f"{'B':>5} {'k':>5} {'median ms':>10} {'min ms':>8} {'selected':>8} {'rho/topk':>9}")
    for r in rows:
        print(
            f"{r['B']:>5} {r['k']:>5} {r['median_ms']:>10.2f} {r['min_ms']:>8.2f} "
            f"{r['selected']:>8} {r['rho_vs_topk']:>9.3f}"
        )


if __name__ == "__main__":
    main()
