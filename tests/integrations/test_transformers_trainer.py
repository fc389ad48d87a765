"""GradSiftTrainer: a few real Trainer steps on a tiny peft model."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from reference import ListStream, tiny_llama
from reference import token_rows as rows
from transformers import TrainerCallback, TrainingArguments

from gradsift.integrations.transformers import GradSiftCollator, GradSiftTrainer


class StepCounter(TrainerCallback):
    def __init__(self):
        self.steps = 0
        self.logs: list[dict] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def test_trainer_selects_and_logs(tmp_path):
    model = get_peft_model(tiny_llama(tie=False), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=6, max_steps=3,
        learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=1, save_steps=2,
        save_strategy="steps", seed=0, dataloader_num_workers=0,
    )
    counter = StepCounter()
    trainer = GradSiftTrainer(
        model=model, args=args, train_dataset=rows(24, 0, "train"),
        data_collator=GradSiftCollator(pad_token_id=0), callbacks=[counter],
        target_dataset=rows(8, 1, "target"), selector="ftw", budget_per_step=2,
        target_batch_size=4,
    )
    trainer.train()
    assert counter.steps == 3
    records = [json.loads(x) for x in (tmp_path / "selections.jsonl").read_text().splitlines()]
    assert len(records) == 3
    for r in records:
        assert len(r["candidate_ids"]) == 6
        assert all(c.startswith("train") for c in r["candidate_ids"])  # ids survived
        assert 0 < len(r["selected_ids"]) <= 2
        assert set(r["selected_ids"]) <= set(r["candidate_ids"])
        assert abs(sum(r["weights"]) - 1) < 1e-5
    assert any("gradsift/n_selected" in log for log in counter.logs)
    changed = [n for n, p in model.named_parameters()
               if p.requires_grad and not torch.equal(p.detach(), before[n])]
    assert changed, "the optimizer must have updated the LoRA weights"
    assert (tmp_path / "checkpoint-2").is_dir()  # the Trainer's own checkpointing still runs


def _lora_trainer(out, max_steps: int) -> GradSiftTrainer:
    model = get_peft_model(tiny_llama(tie=False), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1))
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=6, max_steps=max_steps,
        learning_rate=1e-2, report_to=[], use_cpu=True, save_steps=2, save_strategy="steps",
        seed=0, dataloader_num_workers=0, logging_steps=1,
        lr_scheduler_type="constant",  # the cut run's schedule must match the full run's
    )
    return GradSiftTrainer(
        model=model, args=args, train_dataset=rows(36, 0, "train"),
        data_collator=GradSiftCollator(pad_token_id=0), target_dataset=rows(8, 1, "target"),
        selector="ftw", budget_per_step=2, target_batch_size=4, target_refresh=2,
    )


def test_trainer_resume_selects_like_an_uninterrupted_run(tmp_path):
    full = _lora_trainer(tmp_path / "full", max_steps=4)
    full.train()
    # a second run that stopped after its step-2 checkpoint (its log has a lost step 3)
    cut = _lora_trainer(tmp_path / "cut", max_steps=2)
    cut.train()
    with open(tmp_path / "cut" / "selections.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "lost": True}) + "\n")
    resumed = _lora_trainer(tmp_path / "cut", max_steps=4)
    resumed.train(resume_from_checkpoint=True)

    def records(path):
        rows_ = [json.loads(x) for x in path.read_text().splitlines()]
        return [(r["step"], r["selected_ids"], [round(w, 5) for w in r["weights"]])
                for r in rows_]

    assert records(tmp_path / "cut" / "selections.jsonl") == records(
        tmp_path / "full" / "selections.jsonl")
    for (n, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters(),
                              strict=True):
        assert torch.allclose(p, q, atol=1e-6), n


def test_gradsift_config_parses_flags_and_names_bad_keys(tmp_path):
    from transformers import HfArgumentParser

    from gradsift.integrations.transformers import GradSiftConfig

    (cfg,) = HfArgumentParser(GradSiftConfig).parse_args_into_dataclasses([
        "--output_dir", str(tmp_path), "--budget_per_step", "3", "--selector", "greats",
        "--selector_options", '{"lr": 0.01}', "--capture_modules", "q_proj", "v_proj",
        "--use_cpu", "true"])
    assert (cfg.budget_per_step, cfg.selector, cfg.selector_options) == (3, "greats",
                                                                          {"lr": 0.01})
    assert cfg.selection_config().modules == ["q_proj", "v_proj"]
    for bad, key in ((["--budget_per_step", "0"], "budget_per_step"),
                     (["--target_refresh", "-1"], "target_refresh"),
                     (["--selector", "nope"], "nope"),
                     (["--selector_options", '{"min_cosine": 5}'], "min_cosine")):
        with pytest.raises(ValueError, match=key):
            HfArgumentParser(GradSiftConfig).parse_args_into_dataclasses(
                ["--output_dir", str(tmp_path), "--use_cpu", "true", *bad])


def test_trainer_takes_its_options_from_gradsift_config(tmp_path):
    from gradsift.integrations.transformers import GradSiftConfig

    model = get_peft_model(tiny_llama(tie=False), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    args = GradSiftConfig(output_dir=str(tmp_path), per_device_train_batch_size=6, max_steps=2,
                          learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                          seed=0, budget_per_step=3, selector="cosine",
                          target_with_candidates=True)
    trainer = GradSiftTrainer(model=model, args=args, train_dataset=rows(12, 0, "train"),
                              data_collator=GradSiftCollator(pad_token_id=0),
                              target_dataset=rows(8, 1, "target"))
    trainer.train()
    records = [json.loads(x) for x in (tmp_path / "selections.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(len(r["selected_ids"]) == 3 for r in records)
    assert trainer.selector.name == "cosine"
    assert trainer.selection_config.target_with_candidates
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config["engine"]["target_with_candidates"] is True


def test_a_trainer_run_renders_in_gradsift_report(tmp_path):
    """One log schema: the Trainer's output folder is a run folder ``gradsift report`` reads."""
    from gradsift.cli import main
    from gradsift.report.runs import load_run

    model = get_peft_model(tiny_llama(tie=False), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=6,
                             max_steps=3, learning_rate=1e-2, report_to=[], use_cpu=True,
                             save_strategy="no", seed=0)
    GradSiftTrainer(model=model, args=args, train_dataset=rows(24, 0, "train"),
                    data_collator=GradSiftCollator(pad_token_id=0),
                    target_dataset=rows(8, 1, "target"), budget_per_step=2).train()
    run = load_run(tmp_path)
    assert run.method == "ftw" and run.setting("budget_per_step") == 2
    assert [r["step"] for r in run.selections] == [1, 2, 3]
    steps, losses = run.eval_curve()
    assert steps == [0.0, 3.0] and all(math.isfinite(v) for v in losses)
    # and each target example's loss at both evaluations: the first 8 target rows, by id,
    # averaging to the logged loss
    assert [r["step"] for r in run.eval_losses] == [0, 3]
    for rec, mean in zip(run.eval_losses, losses, strict=True):
        assert rec["ids"] == [r["id"] for r in rows(8, 1, "target")]
        assert sum(rec["losses"]) / 8 == pytest.approx(mean, abs=1e-5)
    assert run.summary["trained_samples"] == sum(len(r["selected_ids"]) for r in run.selections)
    assert main(["--quiet", "report", str(tmp_path)]) == 0
    assert (tmp_path / "report.html").stat().st_size > 0


@pytest.mark.parametrize("method", ["ftw", "random", "loss"])
def test_trainer_and_engine_write_identical_selection_records(tmp_path, method):
    """The same model, candidate batches, target set and seed through OnlineTrainer and
    GradSiftTrainer: the same selections, weights, scores and losses, step by step, and the
    same parameters after (``random`` and ``loss`` take the step's path without capture)."""
    from gradsift.data import Example
    from gradsift.engine import EngineConfig, OnlineTrainer
    from gradsift.select import get_selector

    train, target = rows(18, 0, "train"), rows(8, 1, "target")

    def lora():
        return get_peft_model(tiny_llama(tie=False), LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))

    as_examples = [Example(r["id"], r["source"], r["input_ids"], r["labels"]) for r in train]
    model = lora()
    engine = OnlineTrainer(
        model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                                 weight_decay=0.0),
        get_selector(method), ListStream(as_examples),
        [Example(r["id"], r["source"], r["input_ids"], r["labels"]) for r in target],
        EngineConfig(candidates_per_step=6, budget_per_step=2, target_batch_size=4,
                     eval_size=0, eval_every=0, checkpoint_every=0, max_grad_norm=1.0),
        tmp_path / "engine", seed=0)
    for _ in range(3):
        engine.step()
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=6,
                             max_steps=3, learning_rate=1e-2, weight_decay=0.0, report_to=[],
                             use_cpu=True, save_strategy="no", seed=0, max_grad_norm=1.0,
                             lr_scheduler_type="constant", warmup_steps=0)

    class InOrder(GradSiftTrainer):
        def _get_train_sampler(self, *a, **k):  # the stream's order, as the engine reads it
            return torch.utils.data.SequentialSampler(self.train_dataset)

    other = lora()
    InOrder(model=other, args=args, train_dataset=train,
            data_collator=GradSiftCollator(pad_token_id=0), target_dataset=target,
            selector=method, budget_per_step=2, target_batch_size=4).train()
    for (name, p), q in zip(model.named_parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)

    def records(path):
        keep = ("step", "candidate_ids", "selected_ids", "weights", "scores", "losses", "rho")
        return [{k: r[k] for k in keep} for r in map(json.loads, path.read_text().splitlines())]

    a = records(tmp_path / "engine" / "selections.jsonl")
    b = records(tmp_path / "trainer" / "selections.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        assert ra["candidate_ids"] == rb["candidate_ids"]
        assert ra["selected_ids"] == rb["selected_ids"]
        assert ra["weights"] == pytest.approx(rb["weights"], abs=1e-5)
        assert ra["losses"] == pytest.approx(rb["losses"], abs=1e-5)
        # a step's scores share one preconditioner 1/(√v̂+ε), so float noise in the parameters
        # (1e-7 here) moves each score by a share of the vector's scale, not of its own size:
        # on an Intel Xeon a score of 0.95 beside one of 9.9 differed by 2.3e-4 at step 3
        scale = max(abs(x) for x in rb["scores"])
        assert ra["scores"] == pytest.approx(rb["scores"], rel=1e-4, abs=max(1e-4 * scale, 1e-7))


@pytest.mark.parametrize("entry", ["yaml", "engine", "trainer"])
def test_a_config_error_names_the_key_at_every_entry_point(tmp_path, entry):
    from gradsift.config import ConfigError, load_config
    from gradsift.engine import EngineConfig
    from gradsift.integrations.transformers import GradSiftConfig

    for key, value, message in (("target_refresh", 0, "must be an integer >= 1, got 0"),
                                ("target_ema", 1, "must be a number in [0, 1), got 1")):
        with pytest.raises(ValueError, match=key) as err:
            if entry == "yaml":
                load_config(None, [f"engine.{key}={value}"])
            elif entry == "engine":
                EngineConfig(**{key: value})
            else:
                GradSiftConfig(output_dir=str(tmp_path), use_cpu=True, **{key: value})
        assert message in str(err.value)
        if entry == "yaml":
            assert isinstance(err.value, ConfigError) and f"'engine.{key}'" in str(err.value)


def test_the_usual_collators_work_and_keep_the_ids(tmp_path):
    """DataCollatorForLanguageModeling / ForSeq2Seq never see the id/source columns."""
    from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq

    from gradsift.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("tiny")
    train = [{"id": f"t{i}", "source": "train", "input_ids": list(range(5, 12 + i % 3)),
              "labels": [-100] * 3 + list(range(8, 12 + i % 3))} for i in range(12)]
    no_labels = [{k: v for k, v in r.items() if k != "labels"} for r in train]
    for collator, rows_ in ((DataCollatorForLanguageModeling(tokenizer, mlm=False), no_labels),
                            (DataCollatorForSeq2Seq(tokenizer), train)):
        out = tmp_path / type(collator).__name__
        args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=6,
                                 max_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                                 remove_unused_columns=False)
        GradSiftTrainer(model=model, args=args, train_dataset=rows_, data_collator=collator,
                        target_dataset=train[:4], budget_per_step=2).train()
        (record,) = [json.loads(x) for x in (out / "selections.jsonl").read_text().splitlines()]
        assert all(i.startswith("t") for i in record["candidate_ids"])
        assert record["candidate_sources"] == ["train"] * 6


def test_gradient_accumulation_selects_once_per_optimizer_step(tmp_path):
    """budget_per_step is per optimizer step: 2 micro-batches of 3 make one selection of 2
    among 6, and the log says what was trained."""
    model = get_peft_model(tiny_llama(tie=False), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3,
                             gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="no", seed=0)
    trainer = GradSiftTrainer(model=model, args=args, train_dataset=rows(24, 0, "train"),
                              data_collator=GradSiftCollator(pad_token_id=0),
                              target_dataset=rows(8, 1, "target"), budget_per_step=2)
    trainer.train()
    records = [json.loads(x) for x in (tmp_path / "selections.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    # at most k = 2 each (ftw takes fewer where fewer candidates are aligned with the target)
    assert all(len(r["candidate_ids"]) == 6 and 1 <= len(r["selected_ids"]) <= 2
               for r in records)
    assert len({i for r in records for i in r["candidate_ids"]}) == 12
    assert trainer.counters["trained_samples"] == sum(len(r["selected_ids"]) for r in records)


def test_what_would_train_wrongly_is_refused(tmp_path):
    def make(cls, **extra):
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **extra)
        return cls(model=tiny_llama(tie=False), args=args, train_dataset=rows(4, 0, "t"),
                   data_collator=GradSiftCollator(0), target_dataset=rows(2, 1, "v"))

    with pytest.raises(ValueError, match="label_smoothing_factor"):
        make(GradSiftTrainer, label_smoothing_factor=0.1)

    class Custom(GradSiftTrainer):
        def compute_loss(self, *a, **k):
            return super().compute_loss(*a, **k)

    with pytest.raises(TypeError, match="Custom overrides compute_loss"):
        make(Custom)
