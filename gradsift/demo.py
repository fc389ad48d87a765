"""The main job behind ``make demo``: build a real stream, compare ftw / random / greats.

1. Build ``stream.jsonl`` / ``target.jsonl`` from text shipped in packages (required sources
   only, so the stream is the same on every machine): Python code, King James verse, and
   generated arithmetic with 25% wrong answers. The target set is correct arithmetic.
2. Run the bundled SmolLM2-135M-Instruct with LoRA under each method, same budget.
3. Write ``summary.json`` and ``report.html`` (plots) and print the summary table.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from gradsift.config import load_config
from gradsift.jsonio import write_json

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"
DEMO_METHODS = ["ftw", "random", "greats"]
DEMO_SOURCES = ["code", "verse", "arithmetic"]


def run_demo(out: str | Path = "runs/demo", overrides: list[str] | None = None,
             quiet: bool = False) -> dict:
    """Build data under ``out/data`` (once), then ``compare`` into ``out``; returns the summary.

    Restartable after Ctrl-C: the data is reused once complete, and ``compare`` resumes.
    """
    from gradsift.recipe import check_device, resolve_model
    from gradsift.rundir import check_compare_dir, locked
    from gradsift.sources import build_stream

    out = Path(out).absolute()  # the runs' saved configs then work from any folder
    data = out / "data"
    config = load_config(DEMO_CONFIG, overrides)
    config = dataclasses.replace(config, stream=str(data / "stream.jsonl"),
                                 target=str(data / "target.jsonl"))
    check_device(config.device)  # before building anything (the data is checked later)
    resolve_model(config.model)
    check_compare_dir(out)
    with locked(out):
        if not (data / "manifest.json").exists():  # written last: the data is complete
            build_stream("arithmetic", data, seed=0, n_stream=3000, n_target=120,
                         sources=DEMO_SOURCES)
        return _compare_and_report(config, out, data, quiet)


def _compare_and_report(config: Any, out: Path, data: Path, quiet: bool) -> dict:
    from gradsift.recipe import compare

    if not quiet:
        print(f"gradsift demo: {config.model} + LoRA r={config.lora.r if config.lora else '-'}, "
              f"B={config.engine.candidates_per_step}, k={config.engine.budget_per_step}, "
              f"{config.steps} steps per method, methods {', '.join(DEMO_METHODS)}\n"
              f"data: {data} (target: correct arithmetic; stream: code, verse, arithmetic "
              "with 25% wrong answers)", file=sys.stderr)
    summary = compare(config, DEMO_METHODS, [config.seed], out, quiet=quiet)
    noise = label_noise_shares(out, data / "stream.jsonl")
    write_json(out / "label_noise.json", noise)
    if not quiet:
        print("\nwrong-answer share among arithmetic records (stream: "
              f"{noise['stream']:.0%} of arithmetic candidates)")
        for method, share in noise["selected"].items():
            print(f"  {method:>8}: {share:.0%} of the arithmetic records it trained on")
    return summary


def label_noise_shares(compare_dir: Path, stream_file: Path) -> dict:
    """Share of wrong answers among arithmetic candidates seen, and among those each method
    selected (pooled over seeds): does the method steer clear of label noise?"""
    wrong = {}
    with open(stream_file, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if record.get("source") == "arithmetic":
                wrong[record["id"]] = bool(record.get("wrong_answer"))
    seen: list[bool] = []
    selected: dict[str, list[bool]] = {}
    for log in sorted(Path(compare_dir).glob("*/seed_*/selections.jsonl")):
        method = log.parent.parent.name
        with open(log, encoding="utf-8") as f:
            for line in f:
                step = json.loads(line)
                seen += [wrong[i] for i in step["candidate_ids"] if i in wrong]
                selected.setdefault(method, []).extend(
                    wrong[i] for i in step["selected_ids"] if i in wrong)
    return {"stream": _share(seen), "selected": {m: _share(v) for m, v in selected.items()}}


def _share(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


if __name__ == "__main__":
    run_demo()
