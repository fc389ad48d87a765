"""Bytes per step and step times of 1, 2 and 4 gloo ranks (CPU), both exchange modes.

    OMP_NUM_THREADS=1 .venv/bin/python tests/distributed/bench_ddp.py

Prints one Markdown row per setting: medians over steps 2-4 (step 1 warms up) of what rank 0
records (``timing`` and ``diagnostics.distributed.bytes_sent`` in ``selections.jsonl``).
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from launch import launch, logs  # noqa: E402

SETTINGS = [("lora", "exact", 256), ("lora", "sketch", 256), ("full", "exact", 64),
            ("full", "sketch", 64)]


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="gradsift-ddp-bench-"))
    print("| model | ranks | exchange | sketch_dim | bytes sent / rank / step | capture ms "
          "| selection ms | update ms |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    try:
        for model, mode, dim in SETTINGS:
            for world in (1, 2, 4):
                if world == 1 and mode == "sketch":
                    continue  # one process never exchanges
                out = root / f"{model}-{mode}-{world}"
                codes = launch("online", out, world if world > 1 else 0, f"model={model}",
                               f"exchange={mode}", f"sketch_dim={dim}", "B=16", "k=4",
                               "steps=4", timeout=600)
                assert set(codes) == {0}, logs(out)
                lines = (out / "run" / "selections.jsonl").read_text().splitlines()[1:]
                recs = [json.loads(line) for line in lines]

                def median(key: str, recs: list = recs) -> float:
                    return statistics.median(r["timing"][key] for r in recs) * 1e3

                sent = statistics.median(r["diagnostics"].get("distributed", {}).get(
                    "bytes_sent", 0) for r in recs)
                print(f"| {model} | {world} | {mode if world > 1 else '-'} | "
                      f"{dim if mode == 'sketch' else '-'} | {sent:,.0f} | "
                      f"{median('capture'):.1f} | {median('selection'):.1f} | "
                      f"{median('update'):.1f} |", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
