"""The step benchmark end to end at a tiny size: its last lines are the ``ratio`` lines that
scripts read (no timing target here: the numbers only have to be there and be ratios)."""

from __future__ import annotations

import math

from gradsift.bench import step as bench_step


def test_the_benchmark_ends_with_one_ratio_line_per_method(capsys) -> None:
    argv = ["--batch-size", "3", "--budget", "1", "--seq-len", "16", "--repeats", "1",
            "--warmup", "1", "--n-target", "8", "--target-batch-size", "2"]
    assert bench_step.main(argv) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    methods = bench_step.DEFAULT_METHODS.split(",")
    tail = lines[-len(methods):]
    assert [line.split()[:2] for line in tail] == [["ratio", m] for m in methods]
    ratios = bench_step.read_ratios(out)
    assert set(ratios) == {"ftw", "greats", "cosine", "loss", "two-pass", "random",
                           "ftw-truncated"}
    assert all(math.isfinite(v) and v > 0 for v in ratios.values())
    # each VALUE is that method's median step over the plain-B median in the table above
    table = {row.split("|")[1].strip(): row.split("|")[3].strip() for row in lines
             if row.startswith("| gradsift ")}
    for method, value in ratios.items():
        assert abs(float(table[f"gradsift {method}"]) - value) <= 0.006, method


def test_read_ratios_takes_only_ratio_lines() -> None:
    text = "| table | 1 |\nratio ftw 1.250\nratio two-pass 0.500\nsome ratio here\n"
    assert bench_step.read_ratios(text) == {"ftw": 1.25, "two-pass": 0.5}


def test_a_method_variant_reaches_the_run_config() -> None:
    """``ftw@geometry=sgd@target_ema=0.5``: the selector's option lands in the run's
    ``method_options``, the engine's in ``engine``; the step's own variants run ftw."""
    from gradsift.config import load_config

    selector, extra = bench_step.method_overrides("ftw@geometry=sgd@target_ema=0.5")
    cfg = load_config(None, [f"method={selector}", *extra])
    assert (cfg.method, cfg.method_options) == ("ftw", {"geometry": "sgd"})
    assert cfg.engine.target_ema == 0.5
    assert bench_step.method_overrides("ftw-target-rides") == (
        "ftw", ("engine.target_with_candidates=true",))
    assert bench_step.method_overrides("greats") == ("greats", ())
