"""The benches' shared settings: scenario data, and a user's own files checked."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import pytest
import torch

from gradsift.bench import quality, scenarios
from gradsift.models import load_model_and_tokenizer


def _own_data_parser() -> argparse.ArgumentParser:
    """The benches' `--scenarios` and own-data flags, as `bench.quality` parses them."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenarios")
    scenarios.add_own_data_arguments(parser)
    return parser


def _write(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_near_duplicates_replace_the_requested_share() -> None:
    stream = [{"id": f"a{i}", "source": "arithmetic", "prompt": f"Question: What is {i}?",
               "response": " 1", "wrong_answer": i % 3 == 0} for i in range(40)]
    out = scenarios._with_near_duplicates(stream, [{"source": "arithmetic"}], 0.25)
    dups = [r for r in out if r["source"] == "duplicate"]
    assert len(out) == 40 and len(dups) == 10
    assert len({r["response"] for r in dups}) == 1 and not any(r["wrong_answer"] for r in dups)
    assert len({r["id"] for r in out}) == 40


def test_redundancy_data_are_never_seen_without_their_near_duplicates(tmp_path,
                                                                     monkeypatch) -> None:
    """The shared data folder only ever holds the finished stream: ``build_stream`` writes
    elsewhere (a shard reading the folder meanwhile would train on a stream without the
    copies), and what lands there is that stream with a quarter replaced by near-copies."""
    import gradsift.sources

    suite = quality.SUITES["smoke"]
    scenario = next(s for s in suite.scenarios if s.duplicate_share > 0)
    folder = tmp_path / "data"
    seen = []
    real = gradsift.sources.build_stream

    def spy(target, out_dir, **kw):
        seen.append(out_dir)
        assert not (folder / "stream.jsonl").exists()
        return real(target, out_dir, **kw)

    monkeypatch.setattr(gradsift.sources, "build_stream", spy)
    scenarios.build_data(scenario, suite, folder)
    assert len(seen) == 1 and str(folder) != str(seen[0])
    real(scenario.target, tmp_path / "plain", seed=0, n_stream=suite.n_stream,
         n_target=suite.eval_size + 4 * suite.target_batch_size, sources=list(scenario.sources),
         noise_rate=scenario.noise_rate)
    plain = [json.loads(x) for x in (tmp_path / "plain" / "stream.jsonl").open()]
    built = [json.loads(x) for x in (folder / "stream.jsonl").open()]
    assert len(built) == len(plain)
    changed = [a for a, b in zip(built, plain, strict=True) if a != b]
    assert {r["source"] for r in changed} == {"duplicate"}
    assert len(changed) == int(scenario.duplicate_share * len(plain))
    assert (folder / "target.jsonl").read_text() == (tmp_path / "plain" / "target.jsonl"
                                                      ).read_text()
    assert (folder / "done").exists() and not list(folder.glob(".build-*"))


def test_your_own_records_must_train_within_the_token_limit(tmp_path,
                                                            capsys) -> None:
    """A chat record whose answer lies past max_length would be skipped, shifting the batches:
    refused with the count and the flag; --max-length makes room."""
    stream = [{"id": f"s{i}", "messages": [{"role": "user", "content": f"What is {i}+1?"},
                                           {"role": "assistant", "content": f"{i + 1}"}]}
              for i in range(16)]
    plain = [{"id": f"p{i}", "text": "the cat sat on the mat"} for i in range(16)]
    target = [{"id": f"t{i}", "text": "the dog sat on the log"} for i in range(8)]
    _write(tmp_path / "stream.jsonl", stream + plain)
    _write(tmp_path / "target.jsonl", target)
    args = ["--suite", "smoke", "--out", str(tmp_path / "out"), "--quiet", "--methods",
            "random", "--seeds", "0", "--stream", str(tmp_path / "stream.jsonl"), "--target",
            str(tmp_path / "target.jsonl"), "--candidates", "4"]
    tokenizer = load_model_and_tokenizer("tiny")[1]
    tokens = max(len(tokenizer(tokenizer.apply_chat_template(r["messages"], tokenize=False),
                               add_special_tokens=False)["input_ids"]) for r in stream)
    assert tokens > scenarios.SUITES["smoke"].max_length  # the template's system turn fills it
    with pytest.raises(ValueError, match=r"--stream .*stream.jsonl: 16 records would be "
                                         r"skipped at max_length=24 .*--max-length"):
        quality.main(args)
    _write(tmp_path / "chat.jsonl", stream)
    with pytest.raises(ValueError, match=r"--stream .*chat.jsonl: no record is usable at "
                                         r"max_length=24 .*--max-length"):
        quality.main(args[:-5] + [str(tmp_path / "chat.jsonl")] + args[-4:] + ["--name", "c"])
    assert quality.main(args + ["--max-length", str(tokens + 8)]) == 0
    result = json.loads((tmp_path / "out" / "custom-target" / "random" / "seed_0" /
                         "result.json").read_text())
    assert result["trained_samples"] == 3 * 2
    # the folder now holds this scenario's runs at B=4, k=2: another B or k is refused before
    # anything runs or is summarized with them; another --name is a new scenario beside them
    rerun = args + ["--max-length", str(tokens + 8), "--budget", "1"]
    with pytest.raises(SystemExit):
        quality.main([*rerun, "--candidates", "8"])  # the last --candidates counts
    err = capsys.readouterr().err
    assert "custom-target holds runs of another k or B" in err
    assert "candidates 4 there, 8 here" in err and "budget 2 there, 1 here" in err
    with pytest.raises(SystemExit):
        quality.main([*rerun, "--report-only"])
    assert "budget 2 there, 1 here" in capsys.readouterr().err
    assert quality.main([*rerun, "--name", "one"]) == 0
    made = json.loads((tmp_path / "out" / "suite.json").read_text())["scenarios"]
    assert made["custom-target"] == {"candidates": 4, "budget": 2}
    assert made["one"] == {"candidates": 4, "budget": 1}
    result = json.loads((tmp_path / "out" / "one" / "random" / "seed_0" /
                         "result.json").read_text())
    assert result["trained_samples"] == 3 * 1


def test_a_small_target_set_holds_out_eval_size_records(tmp_path, capsys) -> None:
    """--eval-size N: the held-out loss at step 0 is the base model's mean loss on the target's
    first N records (LoRA starts at zero), computed here by a plain forward per record."""
    import torch

    words = ["cat", "dog", "owl", "fox", "elk", "ram", "hen", "bee", "ant", "yak"]
    target = [{"id": f"t{i}", "text": f"the {w} sat on the {w} mat"} for i, w in
              enumerate(words)]
    stream = [{"id": f"s{i}", "text": f"record {i} of the stream"} for i in range(16)]
    _write(tmp_path / "stream.jsonl", stream)
    _write(tmp_path / "target.jsonl", target[:5])
    args = ["--suite", "smoke", "--out", str(tmp_path / "out"), "--quiet", "--methods",
            "random", "--seeds", "0", "--stream", str(tmp_path / "stream.jsonl"), "--target",
            str(tmp_path / "target.jsonl"), "--candidates", "4"]
    with pytest.raises(ValueError, match=r"target.jsonl: 5 records; .* least 6 \(4 held out.*"
                                         r"--eval-size"):
        quality.main(args)  # the smoke suite holds out 4 and draws batches of 2
    _write(tmp_path / "target.jsonl", target)
    assert quality.main(args + ["--eval-size", "6", "--name", "small"]) == 0
    result = json.loads((tmp_path / "out" / "small" / "random" / "seed_0" /
                         "result.json").read_text())
    model, tokenizer = load_model_and_tokenizer("tiny")
    model.eval()
    max_length = scenarios.SUITES["smoke"].max_length
    with torch.no_grad():
        losses = []
        for record in target[:6]:
            ids = torch.tensor([tokenizer(record["text"])["input_ids"][:max_length]])
            losses.append(float(model(input_ids=ids, labels=ids).loss))
    assert result["losses"][0] == pytest.approx(sum(losses) / 6, rel=1e-4)
    with pytest.raises(ValueError, match="another --eval-size \\(6, now 7\\)"):
        quality.main(args + ["--eval-size", "7", "--name", "small"])
    with pytest.raises(SystemExit):
        quality.main(["--suite", "smoke", "--eval-size", "6"])
    assert "--eval-size sizes the held-out part of --target" in capsys.readouterr().err


@pytest.mark.parametrize("suite, size", [("full", (8, 2)), ("steady", (16, 4)),
                                         ("smoke", (4, 2))])
def test_your_own_data_runs_at_the_suites_size_unless_told(tmp_path, suite, size) -> None:
    """`--stream/--target` without --candidates/--budget take the B and k of the suite's own
    k/B = 1/4 scenarios (`steady` doubles `full`'s 8 and 2); given, they win."""
    for name in ("stream.jsonl", "target.jsonl"):
        _write(tmp_path / name, [{"id": "a", "text": "a"}])
    parser = _own_data_parser()
    own = ["--stream", str(tmp_path / "stream.jsonl"), "--target", str(tmp_path / "target.jsonl")]
    built = scenarios.SUITES[suite]
    custom = scenarios.with_own_data(parser, parser.parse_args(own), built).scenarios[-1]
    assert (custom.candidates, custom.budget) == size
    quarter = [s for s in built.scenarios if s.candidates == 4 * s.budget]
    assert all((s.candidates, s.budget) == size for s in quarter)
    told = parser.parse_args([*own, "--candidates", "12", "--budget", "3"])
    custom = scenarios.with_own_data(parser, told, built).scenarios[-1]
    assert (custom.candidates, custom.budget) == (12, 3)


def test_a_method_variant_names_engine_and_selector_options() -> None:
    name, engine, options = scenarios.parse_method("ftw@target_ema=0.8@min_cosine=0.1@fill=false")
    assert (name, engine, options) == ("ftw", {"target_ema": 0.8},
                                       {"min_cosine": 0.1, "fill": False})
    assert scenarios.parse_method("greats") == ("greats", {}, {})
    with pytest.raises(ValueError, match="expected KEY=VALUE after '@'"):
        scenarios.parse_method("ftw@target_ema")
    with pytest.raises(ValueError, match="target_ema"):
        scenarios.parse_method("ftw@target_ema=2")


def test_a_run_file_cut_short_is_named_and_the_summary_is_strict_json(tmp_path) -> None:
    """A finished run's file round-trips; one cut short (a copy, an edit) is refused with its
    path, not a bare JSONDecodeError; the summary writes NaN as null (strict JSON)."""
    path = tmp_path / "sc" / "ftw" / "seed_0" / "result.json"
    path.parent.mkdir(parents=True)
    run = {"losses": [2.5, 2.25], "steps": [0, 1], "accuracy": None}
    scenarios.write_result(path, run)
    assert json.loads(path.read_text()) == run == scenarios.read_result(path)
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]  # no temporary left
    path.write_text(path.read_text()[:20])
    with pytest.raises(ValueError, match=f"{path}: not a finished run's JSON"):
        scenarios.read_result(path)
    scenarios.write_summary(tmp_path / "summary.json", {"sc": {"sd": float("nan"), "n": 1}})
    assert (tmp_path / "summary.json").read_text().split() == [
        "{", '"sc":', "{", '"sd":', "null,", '"n":', "1", "}", "}"]


def test_a_larger_target_batch_reads_the_same_files_and_draws_more(tmp_path) -> None:
    """`--target-batch-size N`: every step's ĝ comes from N target examples, drawn from the
    very files the suite's own size builds (the held-out set and the stream unchanged)."""
    from gradsift.select import get_selector

    parser = _own_data_parser()
    smoke = scenarios.SUITES["smoke"]
    larger = scenarios.with_own_data(parser, parser.parse_args(["--target-batch-size", "5"]),
                                     smoke)
    assert (smoke.target_batch_size, larger.target_batch_size) == (2, 5)
    label_noise = smoke.scenarios[0]
    paths = [scenarios.build_data(label_noise, suite, tmp_path / name)
             for name, suite in (("own", smoke), ("larger", larger))]
    for name in ("stream.jsonl", "target.jsonl"):
        assert (paths[0] / name).read_bytes() == (paths[1] / name).read_bytes()
    target = [json.loads(line) for line in (paths[1] / "target.jsonl").read_text().splitlines()]
    assert len(target) == smoke.eval_size + 4 * smoke.target_batch_size  # 2 × 4 + eval
    base, tokenizer = load_model_and_tokenizer("tiny")
    trainer = scenarios.make_trainer(base, tokenizer, label_noise, larger, get_selector("ftw"),
                                     0, paths[1], tmp_path / "run")
    trainer.step()
    held_out = {ex.id for ex in trainer.eval_set}
    assert len(trainer.target_batch) == 5 and not held_out & {ex.id for ex in
                                                                trainer.target_batch}
    with pytest.raises(SystemExit):
        scenarios.with_own_data(parser, parser.parse_args(["--target-batch-size", "0"]), smoke)


def test_a_larger_target_pool_keeps_the_held_out_set(tmp_path, capsys) -> None:
    """`--target-pool N`: the built arithmetic target holds N examples besides the same
    held-out set (generated in order, so the first `eval_size` are the default build's)."""
    parser = _own_data_parser()
    smoke = scenarios.SUITES["smoke"]
    pooled = scenarios.with_own_data(parser, parser.parse_args(["--target-pool", "12"]), smoke)
    label_noise = smoke.scenarios[0]
    own, big = (scenarios.build_data(label_noise, suite, tmp_path / name)
                for name, suite in (("own", smoke), ("big", pooled)))
    rows = {name: (folder / "target.jsonl").read_text().splitlines()
            for name, folder in (("own", own), ("big", big))}
    assert len(rows["own"]) == smoke.eval_size + 4 * smoke.target_batch_size
    assert len(rows["big"]) == smoke.eval_size + 12
    assert rows["big"][: smoke.eval_size] == rows["own"][: smoke.eval_size]
    stream = [json.loads(r) for r in (big / "stream.jsonl").read_text().splitlines()]
    assert not {json.loads(r)["prompt"] for r in rows["big"]} & {r.get("prompt") for r in stream}
    for bad, says in ((["--target-pool", "1"], "must hold a target batch of 2, got 1"),
                      (["--target-pool", "9", "--stream", "s.jsonl", "--target", "t.jsonl"],
                       "--target-pool sizes the built scenarios' target sets")):
        with pytest.raises(SystemExit):
            scenarios.with_own_data(parser, parser.parse_args(bad), smoke)
        assert says in capsys.readouterr().err


def test_full_fine_tuning_trains_every_parameter_and_keeps_its_folder(tmp_path,
                                                                        capsys) -> None:
    """`--finetune full`: the run's copy trains every parameter of the model (AdamW holds
    all of them, counted from the base), one ftw step moves the embedding and a norm while the
    base stays as loaded, and the folder then refuses LoRA runs."""
    from gradsift.select import get_selector

    smoke = scenarios.SUITES["smoke"]
    full = replace(smoke, finetune="full")
    redundancy = smoke.scenarios[1]
    data = scenarios.build_data(redundancy, full, tmp_path / "data")
    base, tokenizer = load_model_and_tokenizer("tiny")
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    trainer = scenarios.make_trainer(base, tokenizer, redundancy, full, get_selector("ftw"),
                                     0, data, tmp_path / "run")
    held = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])
    assert held == sum(p.numel() for p in before.values())
    assert trainer.step() is not None
    after = dict(trainer.model.named_parameters())
    norm = next(n for n in before if "norm" in n)
    for name in ("model.embed_tokens.weight", norm):
        assert not torch.equal(after[name], before[name]), name
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())
    lora = scenarios.make_trainer(base, tokenizer, redundancy, smoke, get_selector("random"),
                                  0, data, tmp_path / "lora")
    assert all("lora_" in n for n, p in lora.model.named_parameters() if p.requires_grad)

    out = tmp_path / "suite"
    args = ["--suite", "smoke", "--quiet", "--scenarios", "redundancy", "--methods", "random",
            "--seeds", "0", "--out", str(out)]
    assert quality.main([*args, "--finetune", "full", "--lr", "1e-4"]) == 0
    assert json.loads((out / "suite.json").read_text())["finetune"] == "full"
    with pytest.raises(SystemExit):
        quality.main([*args, "--lr", "1e-4"])
    assert "finetune 'full' there, None here" in capsys.readouterr().err
