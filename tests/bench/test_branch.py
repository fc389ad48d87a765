"""bench.branch: one-step gains from common states, checked against real runs of the engine."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from gradsift.bench import branch, scenarios
from gradsift.bench.progress import duration
from gradsift.models import load_model_and_tokenizer
from gradsift.select import Selection, SelectionContext, Selector, get_selector


@pytest.fixture(scope="module")
def tiny():
    base, tokenizer = load_model_and_tokenizer("tiny", dtype=torch.float32)
    for p in base.parameters():
        p.requires_grad_(False)
    return base, tokenizer


def _standalone(tiny, scenario, suite, method, data, folder, steps):
    """A normal online run of ``method``: its held-out loss after each of ``steps`` steps."""
    name, _, options = scenarios.parse_method(method)
    trainer = scenarios.make_trainer(*tiny, scenario, suite,
                                   get_selector(name, **options), 0, data, folder)
    return [trainer.evaluate()] + [
        (trainer.step(), trainer.evaluate())[1] for _ in range(steps)]


def test_branches_equal_the_engines_own_steps(tiny, tmp_path, monkeypatch) -> None:
    # clip hard, so the branches must clip like the engine does to agree with it
    monkeypatch.setattr(scenarios, "MAX_GRAD_NORM", 1e-3)
    monkeypatch.setattr(branch, "MAX_GRAD_NORM", 1e-3)
    suite = scenarios.SUITES["smoke"]
    scenario = suite.scenarios[0]
    data = scenarios.build_data(scenario, suite, tmp_path / "data")
    methods = ["greats", "ftw", "random", "cosine"]
    res = branch.run_branches(*tiny, scenario, suite, methods, "random", 0, data,
                              tmp_path / "branches", verify=True)
    rows = res["steps"]
    assert [r["step"] for r in rows] == list(range(1, suite.steps + 1))
    # the reference's trajectory is a normal random run: same losses step by step
    ref = _standalone(tiny, scenario, suite, "random", data, tmp_path / "random", suite.steps)
    assert [rows[0]["before"]] + [r["after"]["random"] for r in rows] == pytest.approx(
        ref, abs=1e-5)
    for r in rows:
        # replaying the reference's selection through the branch path gives its real step
        assert r["reference_replay"] == pytest.approx(r["after"]["random"], abs=1e-5)
        # one state: the next step starts where the reference's step ended
    for prev, nxt in zip(rows, rows[1:], strict=False):
        assert nxt["before"] == pytest.approx(prev["after"]["random"], abs=1e-6)
    # from the first state, every method's branch is that method's own first step
    for m in ("greats", "ftw"):
        own = _standalone(tiny, scenario, suite, m, data, tmp_path / m, 1)
        assert rows[0]["after"][m] == pytest.approx(own[1], abs=1e-5)
        assert rows[0]["before"] == pytest.approx(own[0], abs=1e-6)


class _Fixed(Selector):
    """Always the same rows at uniform weights: one subset of the oracle's, as a selector."""

    name = "fixed"
    needs = "indices"

    def __init__(self, rows: tuple[int, ...]):
        super().__init__()
        self.rows = rows

    def _select(self, ctx: SelectionContext) -> Selection:
        n = len(self.rows)
        return Selection(torch.tensor(self.rows), torch.full((n,), 1.0 / n),
                         torch.zeros(len(ctx.candidates)), {"n_filtered": len(ctx.candidates)})


class _Recording(Selector):
    """Keeps the context it selects from (with the per-example target factors); first k rows."""

    name = "recording"
    needs = "grads"
    needs_target = True
    needs_target_samples = True

    def _select(self, ctx: SelectionContext) -> Selection:
        self.ctx = ctx
        return Selection(torch.arange(ctx.k), torch.full((ctx.k,), 1.0 / ctx.k),
                         torch.zeros(len(ctx.candidates)))


def test_oracle_is_the_best_subset_of_real_first_steps(tiny, tmp_path) -> None:
    """From the first state, the oracle's loss is the lowest of the engine's own first steps
    over every k-subset at uniform weights (each a separate run); at every state it is no
    higher than any uniform-weight method's."""
    suite = scenarios.SUITES["smoke"]
    scenario = suite.scenarios[0]
    data = scenarios.build_data(scenario, suite, tmp_path / "data")
    # ftw in the state's P, the P of the oracle's table (ftw's default scores in the next P')
    in_state_p = "ftw@geometry=adam"
    res = branch.run_branches(*tiny, scenario, suite, ["random", "cosine", in_state_p, "oracle"],
                              "random", 0, data, tmp_path / "branches")
    assert res["methods"][-1] == "oracle"
    losses = {}
    for rows in itertools.combinations(range(scenario.candidates), scenario.budget):
        trainer = scenarios.make_trainer(*tiny, scenario, suite, _Fixed(rows), 0, data,
                                         tmp_path / "fixed" / "-".join(map(str, rows)))
        trainer.step()
        losses[rows] = trainer.evaluate()
    first = res["steps"][0]
    assert first["after"]["oracle"] == pytest.approx(min(losses.values()), abs=1e-5)
    # the table keeps every subset's loss: each one a separate real first step
    table = {tuple(rows): loss for rows, loss in first["oracle_table"]["pairs"]}
    assert table.keys() == losses.keys()
    for rows, loss in losses.items():
        assert table[rows] == pytest.approx(loss, abs=1e-5)
    # ... and b, K, ⟨g_i, P h_t⟩ at that state, from the materialized per-sample gradients
    recorder = _Recording()
    scenarios.make_trainer(*tiny, scenario, suite, recorder, 0, data,
                           tmp_path / "recorded").step()
    ctx = recorder.ctx
    names = ctx.candidates.param_names
    flat = lambda d: torch.cat([d[n].reshape(len(d[n]), -1).double() for n in names], 1)  # noqa: E731
    g, h = flat(ctx.candidates.materialize()), flat(ctx.target_samples.materialize())
    p_vec = torch.cat([ctx.optimizer_state.preconditioner[n].reshape(-1).double()
                       for n in names])
    g_v = torch.cat([ctx.target_grad[n].reshape(-1).double() for n in names])
    t = first["oracle_table"]
    assert t["alignment"] == pytest.approx((g * p_vec) @ g_v, rel=1e-4, abs=1e-9)
    assert np.array(t["interaction"]) == pytest.approx((g * p_vec) @ g.T, rel=1e-4, abs=1e-9)
    assert np.array(t["target_cross"]) == pytest.approx((g * p_vec) @ h.T, rel=1e-4, abs=1e-9)
    assert t["target_sq_norm"] == pytest.approx(float(g_v @ (p_vec * g_v)), rel=1e-5)
    # the first state's P is constant (no v̂ yet); at the later ones, where it is not, ftw's
    # logged cosines (tested against materialized gradients) are b_i / √(K_ii ĝᵀPĝ)
    assert len(set(np.round(p_vec.numpy(), 6))) == 1
    for row in res["steps"]:
        t = row["oracle_table"]
        # every method's rows at uniform weights are one entry of the table
        ids, table = t["candidate_ids"], {tuple(r): loss for r, loss in t["pairs"]}
        for m in ("random", "cosine", "oracle"):
            rows = tuple(sorted(ids.index(i) for i in row["selected"][m]))
            assert table[rows] == pytest.approx(row["after"][m], abs=1e-6)
        cos = np.array(t["alignment"]) / np.sqrt(np.diag(t["interaction"]) * t["target_sq_norm"])
        assert row["diagnostics"][in_state_p]["cosines"] == pytest.approx(cos, abs=2e-6)
    assert len(set(np.round(list(losses.values()), 6))) > 1  # the choice matters here
    for row in res["steps"]:
        assert len(row["selected"]["oracle"]) == scenario.budget
        assert row["after"]["oracle"] <= min(row["after"]["random"],
                                             row["after"]["cosine"]) + 1e-6
    with pytest.raises(ValueError, match="one-step bound"):
        branch.run_rollouts(*tiny, scenario, suite, ["oracle"], "random", 0, data,
                            tmp_path / "r", 2)
    with pytest.raises(ValueError, match="reference"):
        branch.make_selectors(["ftw"], "oracle")


def test_rollouts_equal_the_engines_own_runs_and_one_step_branches(tiny, tmp_path) -> None:
    suite = scenarios.SUITES["smoke"]
    scenario = suite.scenarios[0]
    data = scenarios.build_data(scenario, suite, tmp_path / "data")
    methods = ["greats", "ftw", "random"]
    # the whole run as one segment: every method's rollout is its own run from the seed
    whole = branch.run_rollouts(*tiny, scenario, suite, methods, "random", 0, data,
                                tmp_path / "whole", horizon=suite.steps)
    (row,) = whole["steps"]
    for m in methods:
        own = _standalone(tiny, scenario, suite, m, data, tmp_path / m, suite.steps)
        assert row["before"] == pytest.approx(own[0], abs=1e-6)
        assert row["after"][m] == pytest.approx(own[-1], abs=1e-5)
    assert len(row["selected"]["ftw"]) == suite.steps
    # one step per segment: the shared-capture branches, computed another way
    one = branch.run_rollouts(*tiny, scenario, suite, methods, "random", 0, data,
                              tmp_path / "one", horizon=1)
    shared = branch.run_branches(*tiny, scenario, suite, methods, "random", 0, data,
                                 tmp_path / "shared")
    for a, b in zip(one["steps"], shared["steps"], strict=True):
        assert a["before"] == pytest.approx(b["before"], abs=1e-6)
        for m in methods:
            assert a["after"][m] == pytest.approx(b["after"][m], abs=1e-5)
            assert a["selected"][m] == [b["selected"][m]]
    # the trajectory's log holds the reference's steps only
    logged = (tmp_path / "one" / "selections.jsonl").read_text().splitlines()
    assert len(logged) == suite.steps
    with pytest.raises(ValueError, match="horizon must be between 1"):
        branch.run_rollouts(*tiny, scenario, suite, methods, "random", 0, data,
                            tmp_path / "bad", horizon=suite.steps + 1)


def test_summary_by_hand() -> None:
    def row(step, before, after, selected):
        return {"step": step, "before": before, "after": after, "selected": selected,
                "weights": {m: [1.0] for m in after}}

    results = []
    for seed, (a, b) in enumerate([((1.0, 0.8), (1.0, 0.9)), ((0.9, 0.7), (0.9, 0.75))]):
        # ftw's loss after; random's loss after; the reference is random
        results.append({"scenario": "s", "reference": "random", "seed": seed,
                        "methods": ["random", "ftw"], "steps": [
                            row(1, 2.0, {"ftw": a[0], "random": b[0]},
                                {"ftw": ["x"], "random": ["x"]}),
                            row(2, b[0], {"ftw": a[1], "random": b[1]},
                                {"ftw": ["y", "w"], "random": ["z"]})]})
    table = branch.summarize(results)["s (reference random)"]
    gains_ftw = [2.0 - 1.0, 1.0 - 0.8, 2.0 - 0.9, 0.9 - 0.7]
    gains_random = [2.0 - 1.0, 1.0 - 0.9, 2.0 - 0.9, 0.9 - 0.75]
    assert table["ftw"]["gain"] == pytest.approx(np.mean(gains_ftw))
    assert table["ftw"]["gain_vs_random"] == pytest.approx(
        np.mean(gains_ftw) / np.mean(gains_random))
    assert (table["ftw"]["samples"], table["random"]["samples"]) == (1.5, 1.0)
    r = table["random"]
    assert r["same"] == pytest.approx(0.5)  # step 1 of both seeds: the same rows
    # per seed, mean over steps of L(ftw) − L(random): (0 − 0.1)/2 and (0 − 0.05)/2
    per_seed = [-0.05, -0.025]
    assert r["diff"] == pytest.approx(np.mean(per_seed))
    half = 12.706204736174707 * np.std(per_seed, ddof=1) / np.sqrt(2)  # t(0.975, 1 d.f.)
    assert (r["lo"], r["hi"]) == pytest.approx((r["diff"] - half, r["diff"] + half))
    assert (r["better"], r["worse"]) == (2, 0)
    assert r["sign_p"] == pytest.approx(0.5)  # 2 of 2: 2 * (1/2)^2
    # per-seed means −0.05, −0.025: effect |mean|/sd = 0.0375/0.0177 = 2.12 → 5 seeds
    assert r["seeds_for_80pct_power"] == 5


def test_cli_smoke_and_resume(tmp_path, capsys) -> None:
    args = ["--suite", "smoke", "--out", str(tmp_path), "--quiet", "--scenarios",
            "redundancy", "--seeds", "0", "--methods", "ftw,cosine,random"]
    assert branch.main(args) == 0
    path = tmp_path / "redundancy" / "ref-random" / "seed_0" / "branch.json"
    first = path.stat().st_mtime_ns
    assert branch.main(args) == 0  # finished: not run again
    assert path.stat().st_mtime_ns == first
    res = res_h1 = json.loads(path.read_text())
    assert set(res["methods"]) == {"ftw", "cosine", "random"}
    assert "| ftw |" in (tmp_path / "branch.md").read_text()
    assert (tmp_path / "branch.png").stat().st_size > 0
    # segments of H steps: their own files and their own table
    assert branch.main(args + ["--horizon", "3"]) == 0
    res = json.loads((path.parent.parent.parent / "ref-random-h3" / "seed_0" /
                      "branch.json").read_text())
    assert res["horizon"] == 3 and [r["start"] for r in res["steps"]] == [0]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == {"redundancy (reference random)",
                            "redundancy (reference random, 3 steps from each state)"}
    # not quiet: the time left, at the time of the finished run of the same horizon
    capsys.readouterr()
    assert branch.main(["--suite", "smoke", "--out", str(tmp_path), "--scenarios", "redundancy",
                        "--seeds", "1", "--methods", "ftw,cosine,random"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"1 run to do, about {duration(res_h1['seconds'])} at the times of the " \
                     "runs finished here"
    assert err[1] == "redundancy k=2 of B=4: 3 steps at lr 0.01"  # the smoke suite's sizes
    assert err[2].startswith("[1/1] redundancy seed 1: ") and "about" not in err[2]
    with pytest.raises(ValueError, match="engine options"):
        branch.main(args[:-1] + ["ftw@target_refresh=2"])
    with pytest.raises(ValueError, match="unknown scenario"):
        branch.main(["--suite", "smoke", "--out", str(tmp_path), "--scenarios", "nope"])
    # --device: this CPU folder takes --device cpu; a device that is not cpu or cuda, or a GPU
    # that is not on the machine, is refused before anything runs
    assert branch.main(["--suite", "smoke", "--out", str(tmp_path), "--report-only",
                        "--device", "cpu"]) == 0
    for bad, says in (("tpu", "--device must be cpu or cuda[:N], got 'tpu'"),) + (
            () if torch.cuda.is_available() else
            (("cuda", "--device cuda: torch sees no CUDA device"),)):
        with pytest.raises(SystemExit):
            branch.main(["--suite", "smoke", "--out", str(tmp_path), "--device", bad])
        assert says in capsys.readouterr().err


def test_your_own_stream_and_target_run_as_a_scenario(tiny, tmp_path) -> None:
    """--stream/--target: the one-step bench on files it has never seen; its first state is
    the engine's own run on them (same held-out loss before the first step)."""
    kinds = ("the cat sat on the mat ", "def f(x): return x ")
    stream = [{"id": f"s{i}", "text": kinds[i % 2] * (1 + i % 3)} for i in range(16)]
    target = [{"id": f"t{i}", "text": "the dog sat on the log " * (1 + i % 2)} for i in range(8)]
    for name, rows in (("stream", stream), ("target", target)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    args = ["--suite", "smoke", "--out", str(out), "--quiet", "--methods", "ftw,random",
            "--seeds", "0", "--stream", str(tmp_path / "stream.jsonl"), "--target",
            str(tmp_path / "target.jsonl"), "--name", "mine", "--candidates", "4"]
    assert branch.main(args) == 0
    assert set(json.loads((out / "summary.json").read_text())) == {"mine (reference random)"}
    data = out / "mine" / "data"
    assert [json.loads(x)["id"] for x in (data / "target.jsonl").read_text().splitlines()] == \
        [r["id"] for r in target]
    res = json.loads((out / "mine" / "ref-random" / "seed_0" / "branch.json").read_text())
    suite = scenarios.SUITES["smoke"]
    scenario = scenarios.custom_scenario(tmp_path / "stream.jsonl", tmp_path / "target.jsonl",
                                       "mine", candidates=4)
    own = _standalone(tiny, scenario, suite, "random", data, tmp_path / "own", 0)
    assert res["steps"][0]["before"] == pytest.approx(own[0], abs=1e-6)
    with pytest.raises(SystemExit):  # one without the other
        branch.main(["--suite", "smoke", "--target", str(tmp_path / "target.jsonl")])


def test_the_oracle_refuses_more_subsets_than_it_can_step(tmp_path) -> None:
    # steady's redundancy: 4 of 16, C(16, 4) = 1820 held-out evaluations a state; full's 2 of
    # 8 is C(8, 2) = 28. Refused before any model loads (none would here: no weights needed).
    steady = branch.SUITES["steady"]
    with pytest.raises(ValueError, match=r"C\(16, 4\) = 1820 subsets a state in scenario "
                                         r"'redundancy'"):
        branch.run_suite(steady, tmp_path, ["redundancy"], ["ftw", "oracle"], "random", [0])
    assert not list(tmp_path.iterdir())


def test_jobs_split_the_seeds_over_processes(tmp_path) -> None:
    """``--jobs 2``: two shard processes finish one seed each, with the picks and held-out
    losses a single process gets on the same seeds (up to thread-count rounding)."""
    common = ["--suite", "smoke", "--quiet", "--scenarios", "redundancy", "--seeds", "0,1",
              "--methods", "ftw,random"]
    assert branch.main([*common, "--out", str(tmp_path / "one")]) == 0
    assert branch.main([*common, "--out", str(tmp_path / "two"), "--jobs", "2"]) == 0
    for seed in (0, 1):
        one, two = (json.loads((tmp_path / f / "redundancy" / "ref-random" / f"seed_{seed}" /
                                "branch.json").read_text()) for f in ("one", "two"))
        for a, b in zip(one["steps"], two["steps"], strict=True):
            assert b["selected"] == a["selected"]
            assert b["after"] == pytest.approx(a["after"], rel=1e-4)
