"""The long-context table of the step benchmark at a tiny size: rows of the real worker (run in
this process here; the benchmark runs each in a fresh one), the table and the plot. No timing
target: the numbers only have to be there."""

from __future__ import annotations

import argparse
import math

from gradsift.bench import step as bench_step
from gradsift.bench import step_long


def _args(**kw) -> argparse.Namespace:
    base = dict(model="tiny", device="cpu", dtype="float32", batch_size=2, budget=1,
                score_layers=1, repeats=1, warmup=1, seed=0, threads=1, seq_lens=[16],
                ghost_max_len=8, load_start="n/a")
    return argparse.Namespace(**{**base, **kw})


def test_every_route_is_a_row_and_the_records_have_t_tokens():
    assert step_long.configurations(2) == [
        "plain B", "ftw", "ftw-sgd ghost", "ftw-sgd materialize", "ftw-sgd auto", "two-pass",
        "ftw-truncated L=2"]
    _, tok = step_long.build_model("tiny", "cpu")
    records = step_long.stdlib_records(tok, 3, 40, skip=5)
    assert [len(r.input_ids) for r in records] == [40] * 3
    assert records[0].labels == records[0].input_ids


def test_rows_table_and_plot(tmp_path):
    args = _args()
    results = [step_long.worker(c, 16, args)
               for c in ("plain B", "ftw-sgd materialize", "ftw-truncated L=1")]
    results.append({"config": "ftw-sgd ghost", "seq_len": 16, "skipped": True})
    for r in results[:3]:
        assert len(r["times"]) == 1 and r["times"][0] > 0 and r["peak_bytes"] >= 0
        assert r["vocab"] == 259 and r["layers"] == 2
    table = step_long.markdown(results, args)
    rows = {line.split("|")[2].strip(): line for line in table.splitlines()
            if line.startswith("| 16 |")}
    assert set(rows) == {"plain B", "ftw-sgd materialize", "ftw-truncated L=1", "ftw-sgd ghost"}
    assert rows["plain B"].split("|")[4].strip() == "1.00"
    assert math.isfinite(float(rows["ftw-truncated L=1"].split("|")[4]))
    assert "not run" in rows["ftw-sgd ghost"]
    step_long.plot(results, args, tmp_path / "long.png")
    assert (tmp_path / "long.png").stat().st_size > 1000


def test_seq_lens_arguments_are_checked(capsys):
    for bad in (["--seq-lens", "a,b"], ["--seq-lens", "16", "--lora"],
                ["--seq-lens", "16", "--score-layers", "0"]):
        try:
            bench_step.main(bad)
        except SystemExit as e:
            assert e.code == 2
        else:  # pragma: no cover
            raise AssertionError(f"{bad} was accepted")
