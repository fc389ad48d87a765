"""The quality suite: its metrics against hand computations, and the smoke suite end to end."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from gradsift.bench import quality, scenarios
from gradsift.bench.progress import duration
from gradsift.bench.quality import RunResult
from gradsift.bench.scenarios import SUITES, claim_out_folder
from gradsift.report.paired import crossed_interval


def _result(method: str, seed: int, losses: list[float]) -> RunResult:
    return RunResult("s", method, seed, [0, 4, 8, 9, 10], losses, None, 0.0)


def _ten_steps() -> scenarios.Suite:
    """A suite of 10 steps whose last 20 % are steps 9 and 10 (the runs of ``_result``)."""
    return scenarios.Suite("tiny", (), (0,), steps=10, max_length=8, lr=1e-3, eval_size=1,
                           eval_every=4, target_batch_size=1, n_stream=1, n_accuracy=1)


def test_eval_steps_cover_the_last_fifth_at_every_step() -> None:
    suite = scenarios.SUITES["full"]
    steps = quality.eval_steps(suite)
    assert steps[0] == 0 and steps[-1] == suite.steps
    tail = [s for s in range(1, suite.steps + 1) if s > 0.8 * suite.steps]
    assert set(tail) <= set(steps)


def test_metrics_match_hand_computation() -> None:
    suite = _ten_steps()
    r = _result("ftw", 0, [3.0, 2.0, 1.5, 1.2, 1.0])
    # last 20 % of 10 steps: steps 9 and 10
    assert quality.primary(r, suite) == pytest.approx((1.2 + 1.0) / 2)
    # trapezoid: (3+2)/2*4 + (2+1.5)/2*4 + (1.5+1.2)/2 + (1.2+1.0)/2, over 10 steps
    assert quality.auc(r) == pytest.approx((10 + 7 + 1.35 + 1.1) / 10)
    assert quality.steps_to_reach(r, 1.5) == 8
    assert math.isinf(quality.steps_to_reach(r, 0.5))


def test_ftw_is_paired_against_every_budget_respecting_baseline() -> None:
    suite = _ten_steps()
    # primaries (mean of the last two points): ftw 1.0, 1.5, 2.0; gradnorm 1.25, 1.5, 2.5
    tails = {"ftw": [(1.0, 1.0), (1.4, 1.6), (2.0, 2.0)],
             "gradnorm": [(1.0, 1.5), (1.5, 1.5), (3.0, 2.0)],
             "opus": [(1.0, 1.0)]}  # one seed: too few to pair
    results = [_result(m, s, [3.0, 2.5, 2.0, *tail]) for m, rows in tails.items()
               for s, tail in enumerate(rows)]
    block = quality.summarize(results, suite)["s"]
    pair = block["paired"]["ftw − gradnorm"]
    diffs = [1.0 - 1.25, 1.5 - 1.5, 2.0 - 2.5]
    assert pair["n"] == 3 and pair["mean"] == pytest.approx(sum(diffs) / 3)
    assert (pair["lower"], pair["higher"]) == (2, 0)
    assert "ftw − opus" not in block["paired"]
    assert "gradnorm − ftw" not in block["paired"]  # baselines are not paired among themselves


def test_pairs_over_seeds_and_examples_use_each_example_s_last_fifth() -> None:
    suite = _ten_steps()  # the last 20 %: steps 9 and 10, the 4th and 5th evaluations

    def run(method: str, seed: int, tail: list[list[float]]) -> RunResult:
        r = _result(method, seed, [3.0, 2.5, 2.0] + [sum(e) / 3 for e in tail])
        r.example_losses = [[9.0, 9.0, 9.0]] * 3 + tail  # earlier evaluations never count
        return r

    ftw = {0: [[1.0, 2.0, 3.0], [1.0, 2.0, 5.0]], 1: [[2.0, 2.0, 2.0], [2.0, 4.0, 2.0]]}
    greats = {0: [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], 1: [[1.0, 3.0, 2.0], [3.0, 3.0, 2.0]]}
    results = [run("ftw", s, t) for s, t in ftw.items()] + [
        run("greats", s, t) for s, t in greats.items()]
    # by hand: each example's mean over the two tail evaluations, ftw − greats, per seed
    hand = [[(ftw[s][0][e] + ftw[s][1][e]) / 2 - (greats[s][0][e] + greats[s][1][e]) / 2
             for e in range(3)] for s in (0, 1)]
    assert hand == [[0.0, 1.0, 3.0], [0.0, 0.0, 0.0]]
    got = quality.summarize(results, suite)["s"]["paired_examples"]["ftw − greats"]
    assert got == pytest.approx(crossed_interval(hand))
    assert got["mean"] == pytest.approx(4.0 / 6) and got["n_examples"] == 3
    for r in results:  # runs made before the runs kept every example's loss: no such pair
        r.example_losses = []
    assert quality.summarize(results, suite)["s"]["paired_examples"] == {}


def test_smoke_suite_runs_end_to_end(tmp_path, capsys) -> None:
    assert quality.main(["--suite", "smoke", "--out", str(tmp_path), "--quiet",
                         "--methods", "ftw,random", "--seeds", "0,1"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == {"label-noise", "redundancy"}
    for block in summary.values():
        assert set(block["methods"]) == {"ftw", "random"}
        pair = block["paired"]["ftw − random"]
        assert pair["n"] == 2 and pair["lower"] + pair["higher"] <= 2
    ftw = summary["label-noise"]["methods"]["ftw"]
    assert ftw["calibration"]["n"] >= 3 and 0.0 <= ftw["accuracy"] <= 1.0
    assert -1.0 <= ftw["calibration"]["corr_next"] <= 1.0  # Adam's exact next step, probed
    assert (tmp_path / "plots" / "quality_label-noise.png").stat().st_size > 0
    # each held-out example's loss at each evaluation, and each question's right or wrong:
    # the run's means are theirs (4 held-out examples, 4 questions in the smoke suite)
    for sc in ("label-noise", "redundancy"):
        r = json.loads((tmp_path / sc / "ftw" / "seed_0" / "result.json").read_text())
        assert len(r["example_losses"]) == len(r["steps"])
        for mean, each in zip(r["losses"], r["example_losses"], strict=True):
            assert len(each) == 4 and sum(each) / 4 == pytest.approx(mean, rel=1e-6)
        assert (len(r["correct"]), r["accuracy"]) == ((4, sum(r["correct"]) / 4)
                                                      if sc == "label-noise" else (0, None))
    assert "paired ftw − random" in (tmp_path / "quality.md").read_text()
    # the secondary metric paired on the same seeds: AUC by hand from each run's curve
    for sc, block in summary.items():
        def hand_auc(method: str, seed: int, sc: str = sc) -> float:
            r = json.loads((tmp_path / sc / method / f"seed_{seed}" / "result.json").read_text())
            s, v = r["steps"], r["losses"]
            area = sum((s[i + 1] - s[i]) * (v[i] + v[i + 1]) / 2 for i in range(len(s) - 1))
            return area / (s[-1] - s[0])
        diffs = [hand_auc("ftw", seed) - hand_auc("random", seed) for seed in (0, 1)]
        per_seed = block["methods"]["ftw"]["per_seed"]["auc"]
        assert per_seed == pytest.approx({str(s): hand_auc("ftw", s) for s in (0, 1)})
        pair = block["paired_auc"]["ftw − random"]
        assert pair["n"] == 2 and pair["mean"] == pytest.approx(sum(diffs) / 2)
    assert "paired ftw − random, AUC:" in (tmp_path / "quality.md").read_text()
    assert summary["label-noise"]["paired_examples"]["ftw − random"]["n_examples"] == 4
    assert "paired ftw − random, over seeds and held-out examples:" in (
        tmp_path / "quality.md").read_text()
    # restart: every run is finished, nothing runs again
    before = {p: p.stat().st_mtime for p in tmp_path.glob("*/*/seed_*/result.json")}
    quality.main(["--suite", "smoke", "--out", str(tmp_path), "--quiet", "--methods",
                  "ftw,random", "--seeds", "0,1"])
    assert before == {p: p.stat().st_mtime for p in tmp_path.glob("*/*/seed_*/result.json")}
    # a run that is not quiet says what is left, at the times of the runs finished here:
    # two ftw runs of seed 2, each at the mean wall time of ftw's seeds 0-1 in its scenario
    capsys.readouterr()
    quality.main(["--suite", "smoke", "--out", str(tmp_path), "--methods", "ftw",
                  "--seeds", "2"])
    err = capsys.readouterr().err.splitlines()
    walls = {sc: [json.loads((tmp_path / sc / "ftw" / f"seed_{s}" / "result.json").read_text())
                  ["wall_seconds"] for s in (0, 1)] for sc in ("label-noise", "redundancy")}
    assert all(0 < t for ts in walls.values() for t in ts)
    hand = sum(sum(ts) / 2 for ts in walls.values())
    assert err[0] == f"2 runs to do, about {duration(hand)} at the times of the runs " \
                     "finished here"
    # and what the runs train: the smoke suite's k=2 of B=4 in both scenarios, 3 steps
    assert err[1] == "label-noise k=2 of B=4, redundancy k=2 of B=4: 3 steps at lr 0.01"
    assert err[2].startswith("[1/2] ") and err[2].endswith(" left")
    assert err[3].startswith("[2/2] ") and "about" not in err[3]
    # the folder keeps the setting its runs were made in: another suite or length is refused,
    # before anything is summarized over runs of another number of steps
    made = json.loads((tmp_path / "suite.json").read_text())
    assert (made["suite"], made["steps"], made["lr"]) == ("smoke", 3, 1e-2)
    for other in (["--suite", "full"], ["--suite", "smoke", "--max-length", "30"]):
        with pytest.raises(SystemExit):
            quality.main([*other, "--out", str(tmp_path), "--report-only"])
        err = capsys.readouterr().err
        assert str(tmp_path / "suite.json") in err
        assert ("steps 3 there, 12 here" if "full" in other else
                "max_length 24 there, 30 here") in err
    # --device: a CPU folder (no device key, as before the option) takes --device cpu; a GPU's
    # runs are refused there, and a GPU that is not on the machine is refused before anything
    assert quality.main(["--suite", "smoke", "--out", str(tmp_path), "--report-only",
                         "--quiet", "--device", "cpu"]) == 0
    parser = argparse.ArgumentParser()
    with pytest.raises(SystemExit):
        claim_out_folder(parser, tmp_path, "smoke", SUITES["smoke"], quality.RESULTS,
                         write=False, device="cuda")
    assert "device None there, 'cuda' here" in capsys.readouterr().err
    for bad, says in (("tpu", "--device must be cpu or cuda[:N], got 'tpu'"),
                      ("cuda:x", "--device 'cuda:x'")) + (
            () if torch.cuda.is_available() else
            (("cuda", "--device cuda: torch sees no CUDA device"),)):
        with pytest.raises(SystemExit):
            quality.main(["--suite", "smoke", "--out", str(tmp_path), "--device", bad])
        assert says in capsys.readouterr().err
    # a run's file cut short (a copy, an edit) is named, not a bare JSONDecodeError
    cut = tmp_path / "redundancy" / "ftw" / "seed_1" / "result.json"
    cut.write_text(cut.read_text()[:40])
    with pytest.raises(ValueError, match=f"{cut}: not a finished run's JSON"):
        quality.main(["--suite", "smoke", "--out", str(tmp_path), "--report-only"])


def test_report_only_on_a_folder_without_runs_says_so(tmp_path, capsys) -> None:
    assert quality.main(["--suite", "smoke", "--out", str(tmp_path / "none"),
                         "--report-only"]) == 1
    assert f"no finished runs under {tmp_path / 'none'}" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_every_method_named_runs_and_an_unknown_scenario_is_refused(tmp_path) -> None:
    """A method asked for by name runs on every scenario, also an extra method on a scenario
    that does not list the extras (it used to be dropped with exit code 0)."""
    steady = scenarios.SUITES["steady"]
    one_of_8 = next(s for s in steady.scenarios if s.name == "label-noise-1of8")
    assert not one_of_8.extra_methods
    named = ["ftw-sgd", "ftw@target_ema=0.8", "opus", "ftw-sgd"]
    assert quality.methods_for(one_of_8, named) == ["ftw-sgd", "ftw@target_ema=0.8", "opus"]
    default = quality.methods_for(one_of_8, None)
    assert "ftw-sgd" not in default and {"ftw", "greats", "cosine", "random"} <= set(default)
    with pytest.raises(ValueError, match=r"unknown scenario\(s\) \['label-noise-1of9'\]"):
        quality.main(["--suite", "smoke", "--out", str(tmp_path), "--scenarios",
                      "label-noise-1of9", "--methods", "ftw"])
    # end to end: an extra method named for a scenario without extras is run, not skipped
    assert quality.main(["--suite", "smoke", "--out", str(tmp_path), "--scenarios",
                         "redundancy", "--methods", "loss", "--seeds", "0", "--quiet"]) == 0
    assert (tmp_path / "redundancy" / "loss" / "seed_0" / "result.json").is_file()


def _write(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_your_own_stream_and_target_run_as_a_scenario(tmp_path) -> None:
    """--stream/--target: a scenario on files the suite has never seen, copied once and
    refused when the same name is asked for with other files; bad files named with the line."""
    kinds = ("the cat sat on the mat ", "def f(x): return x ")
    stream = [{"id": f"s{i}", "text": kinds[i % 2] * (1 + i % 3)} for i in range(16)]
    target = [{"id": f"t{i}", "text": "the dog sat on the log " * (1 + i % 2)} for i in range(8)]
    _write(tmp_path / "stream.jsonl", stream)
    _write(tmp_path / "target.jsonl", target)
    out = tmp_path / "out"
    args = ["--suite", "smoke", "--out", str(out), "--quiet", "--methods", "ftw,random",
            "--seeds", "0", "--stream", str(tmp_path / "stream.jsonl"), "--target",
            str(tmp_path / "target.jsonl"), "--name", "mine", "--candidates", "4"]
    assert quality.main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"mine"}
    assert set(summary["mine"]["methods"]) == {"ftw", "random"}
    data = out / "mine" / "data"
    assert [json.loads(x)["id"] for x in (data / "target.jsonl").read_text().splitlines()] == \
        [r["id"] for r in target]
    result = json.loads((out / "mine" / "ftw" / "seed_0" / "result.json").read_text())
    # smoke: 3 steps of at most k=2 (ftw takes fewer where fewer are aligned): the log's count
    run_log = out / "mine" / "ftw" / "seed_0" / "selections.jsonl"
    picked = [len(json.loads(x)["selected_ids"]) for x in run_log.read_text().splitlines()]
    assert len(picked) == 3 and all(1 <= n <= 2 for n in picked)
    assert result["trained_samples"] == sum(picked)
    # a built-in setting beside it in the same folder; --report-only (no --stream) then
    # summarizes both, each from its own runs: the primary by hand, the mean loss over the
    # evaluations after 80 % of the steps
    assert quality.main(["--suite", "smoke", "--out", str(out), "--quiet", "--methods",
                         "ftw,random", "--seeds", "0", "--scenarios", "redundancy"]) == 0
    assert quality.main(["--suite", "smoke", "--out", str(out), "--report-only"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"mine", "redundancy"}
    for sc in summary:
        for m in ("ftw", "random"):
            r = json.loads((out / sc / m / "seed_0" / "result.json").read_text())
            tail = [v for s, v in zip(r["steps"], r["losses"], strict=True) if s > 0.8 * 3]
            assert r["scenario"] == sc and tail
            assert summary[sc]["methods"][m]["per_seed"]["primary"] == pytest.approx(
                {"0": sum(tail) / len(tail)})
    _write(tmp_path / "target.jsonl", target[::-1])
    with pytest.raises(ValueError, match="built from other files"):
        quality.main(args)
    _write(tmp_path / "short.jsonl", target[:5])
    with pytest.raises(ValueError, match=r"short.jsonl: 5 records; the suite needs at least 6"):
        quality.main(args[:-6] + ["--target", str(tmp_path / "short.jsonl"), "--name", "x"])
    (tmp_path / "bad.jsonl").write_text(json.dumps(target[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        quality.main(args[:-6] + ["--target", str(tmp_path / "bad.jsonl"), "--name", "y"])
    with pytest.raises(SystemExit):
        quality.main(["--suite", "smoke", "--stream", str(tmp_path / "stream.jsonl")])


def test_jobs_share_the_runs_and_match_a_single_process(tmp_path, capsys) -> None:
    """``--jobs 2``: two processes (``--shard 0/2`` and ``1/2``) finish every run once, with
    the primaries a single process gets on the same runs (up to thread-count rounding)."""
    common = ["--suite", "smoke", "--scenarios", "label-noise", "--methods", "ftw,random",
              "--seeds", "0"]
    assert quality.main([*common, "--out", str(tmp_path / "one"), "--quiet"]) == 0
    assert quality.main([*common, "--out", str(tmp_path / "two"), "--jobs", "2"]) == 0
    for method in ("ftw", "random"):
        one, two = (json.loads((tmp_path / f / "label-noise" / method / "seed_0" / "result.json")
                               .read_text()) for f in ("one", "two"))
        assert two["method"] == method and two["losses"] == pytest.approx(one["losses"],
                                                                          rel=1e-3)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert set(summary["label-noise"]["methods"]) == {"ftw", "random"}
    capsys.readouterr()
    for bad, says in ((["--jobs", "2", "--shard", "0/2"], "--jobs sets each process's --shard"),
                      (["--jobs", "0"], "--jobs must be >= 1, got 0")):
        with pytest.raises(SystemExit):
            quality.main([*common, "--out", str(tmp_path / "two"), *bad])
        assert says in capsys.readouterr().err


def test_a_learning_rate_schedule_moves_every_step_and_keeps_its_folder(tmp_path,
                                                                         capsys) -> None:
    """--scheduler linear --warmup-steps 1 --lr 0.02 over the smoke suite's 3 steps: by
    transformers' formula the steps take lr 0 (warmup from 0), 0.02 and 0.01 (linear decay to 0
    at step 3), so the first update leaves the model where it was; the folder then refuses
    the constant schedule, and a constant-schedule folder records no schedule at all."""
    out = tmp_path / "linear"
    base = ["--suite", "smoke", "--quiet", "--scenarios", "redundancy", "--methods", "ftw",
            "--seeds", "0"]
    assert quality.main([*base, "--out", str(out), "--scheduler", "linear",
                         "--warmup-steps", "1", "--lr", "0.02"]) == 0
    run = out / "redundancy" / "ftw" / "seed_0"
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # the engine logs the lr after the scheduler's step: the next step's
    assert [m["lr"] for m in metrics] == pytest.approx([0.02, 0.01, 0.0])
    result = json.loads((run / "result.json").read_text())
    first, second = result["calibration"][:2]
    assert first["realized"] == 0.0 and first["pred"] == 0.0  # lr 0: the weights stayed
    assert first["pred_selection"] == 0.0 and second["pred_selection"] != 0.0
    made = json.loads((out / "suite.json").read_text())
    assert (made["lr"], made["scheduler"], made["warmup_steps"]) == (0.02, "linear", 1)
    with pytest.raises(SystemExit):
        quality.main([*base, "--out", str(out)])
    assert "scheduler 'linear' there, None here" in capsys.readouterr().err
    constant = tmp_path / "constant"
    assert quality.main([*base, "--out", str(constant)]) == 0
    made = json.loads((constant / "suite.json").read_text())
    assert "scheduler" not in made and "warmup_steps" not in made  # as before the option
    with pytest.raises(SystemExit):
        quality.main([*base, "--out", str(tmp_path / "x"), "--warmup-steps", "3"])
    assert "--warmup-steps must be in [0, 3)" in capsys.readouterr().err


def test_the_calibration_probe_reads_its_choice_in_adams_geometry() -> None:
    """The probe's ``bᵀw`` and ``wᵀKw`` of the chosen rows, against materialized per-sample
    gradients in the optimizer state's ``P``: ``Σ w_i ⟨g_i, P ĝ⟩`` and ``‖Σ w_i g_i‖²_P``."""
    from reference import padded_batch, reference_losses, tiny_llama

    from gradsift.capture import per_sample_grads
    from gradsift.optim_state import read_optimizer_state
    from gradsift.select import SelectionContext, get_selector

    model = tiny_llama(tie=False).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    reference_losses(model, padded_batch(4, 9, seed=7)).mean().backward()
    opt.step()
    opt.zero_grad()
    cands = per_sample_grads(model, padded_batch(6, 10, seed=1))
    names = cands.param_names
    params = dict(model.named_parameters())
    loss = reference_losses(model, padded_batch(3, 8, seed=2)).mean()
    target = dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names]), strict=True))
    state = read_optimizer_state(opt, model, names)
    probe = quality._Probe(get_selector("ftw"))
    sel = probe.select(SelectionContext(cands, target, state, 3, torch.Generator()))
    per = cands.materialize()
    w = sel.weights.double()
    update = {n: torch.einsum("i,i...->...", w, per[n][sel.indices].double()) for n in names}
    p = {n: state.preconditioner[n].double() for n in names}
    btw = sum(float((update[n] * p[n] * target[n].double()).sum()) for n in names)
    wkw = sum(float((update[n] * p[n] * update[n]).sum()) for n in names)
    assert probe.last["btw"] == pytest.approx(btw, rel=1e-4)
    assert probe.last["wkw"] == pytest.approx(wkw, rel=1e-4)
