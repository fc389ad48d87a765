"""GradSiftTrainer: a few real Trainer steps on a tiny peft model."""

from __future__ import annotations

import json

import torch
from peft import LoraConfig, get_peft_model
from reference import tiny_llama
from transformers import TrainerCallback, TrainingArguments

from gradsift.integrations.transformers import GradSiftCollator, GradSiftTrainer


def rows(n: int, seed: int, prefix: str) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(1, 64, (int(torch.randint(5, 10, (1,), generator=g)),),
                            generator=g).tolist()
        out.append({"id": f"{prefix}{i}", "source": prefix, "input_ids": ids,
                    "labels": [-100, -100] + ids[2:]})
    return out


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
