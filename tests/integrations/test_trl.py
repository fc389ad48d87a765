"""GradSiftSFTTrainer: TRL's SFTTrainer with gradsift's selection, for the three data shapes."""

from __future__ import annotations

import json

import pytest

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from peft import LoraConfig, get_peft_model  # noqa: E402
from reference import tiny_llama  # noqa: E402
from trl import SFTConfig  # noqa: E402

from gradsift.integrations.trl import GradSiftSFTTrainer  # noqa: E402
from gradsift.models import load_model_and_tokenizer, load_tokenizer  # noqa: E402


def _rows(shape: str, n: int, offset: int = 0) -> list[dict]:
    out = []
    for i in range(offset, offset + n):
        q, a = f"What is {i} plus {i % 5}?", f"It is {i + i % 5}."
        if shape == "text":
            out.append({"text": f"{q} {a}"})
        elif shape == "prompt-completion":
            out.append({"prompt": q, "completion": " " + a})
        else:
            out.append({"messages": [{"role": "user", "content": q},
                                     {"role": "assistant", "content": a}]})
    return out


@pytest.mark.parametrize("shape", ["text", "prompt-completion", "messages"])
def test_sft_trainer_selects_within_each_batch(tmp_path, shape):
    model, tokenizer = load_model_and_tokenizer("tiny")
    model = get_peft_model(model, LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=6, max_steps=1,
                     learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                     seed=0, max_length=48, logging_steps=1)
    train = datasets.Dataset.from_list(_rows(shape, 24))
    trainer = GradSiftSFTTrainer(model=model, args=args, train_dataset=train,
                                 processing_class=tokenizer,
                                 target_dataset=datasets.Dataset.from_list(_rows(shape, 8, 100)),
                                 budget_per_step=2)
    # the target went through TRL's pipeline: tokenized, with labels
    assert len(trainer.target_examples) == 8
    assert all(any(t != -100 for t in e.labels) for e in trainer.target_examples)
    if shape == "prompt-completion":  # completion-only loss: the prompt carries no loss
        assert all(e.labels[0] == -100 for e in trainer.target_examples)
    trainer.train()
    records = [json.loads(x) for x in (tmp_path / "selections.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1]
    assert all(len(r["candidate_ids"]) == 6 and len(r["selected_ids"]) == 2 for r in records)


def test_packing_is_refused(tmp_path):
    args = SFTConfig(output_dir=str(tmp_path), packing=True, use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="packing=True"):
        GradSiftSFTTrainer(model=tiny_llama(tie=False), args=args,
                           train_dataset=datasets.Dataset.from_list(_rows("text", 4)),
                           processing_class=load_tokenizer("tiny"),
                           target_dataset=_rows("text", 2))


def test_untokenized_target_for_plain_trainer_is_a_clear_error(tmp_path):
    from transformers import TrainingArguments

    from gradsift.integrations.transformers import GradSiftCollator, GradSiftTrainer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match=r"target_dataset\[0\] is not tokenized"):
        GradSiftTrainer(model=tiny_llama(tie=False), args=args,
                        train_dataset=[{"input_ids": [1, 2, 3]}],
                        data_collator=GradSiftCollator(0), target_dataset=_rows("text", 2))
