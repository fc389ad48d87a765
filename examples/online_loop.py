"""The online loop as a library user writes it: your model, your optimizer, gradsift's step.

    python examples/online_loop.py                 # the bundled SmolLM2-135M-Instruct
    python examples/online_loop.py --model tiny    # a small random model, seconds

Builds a small stream (code, verse, arithmetic) and a target set of correct arithmetic,
then trains LoRA adapters online: each step 8 candidates arrive and Filter-then-Weight
picks at most 2, with weights.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

import gradsift
from gradsift.data import ExampleStream, load_examples
from gradsift.models import load_model_and_tokenizer
from gradsift.select import get_selector
from gradsift.sources import build_stream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        build_stream("arithmetic", data, seed=0, n_stream=200, n_target=40,
                     sources=["code", "verse", "arithmetic"])
        model, tokenizer = load_model_and_tokenizer(args.model)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16,
                                                 target_modules=["q_proj", "v_proj"]))
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=2e-3)
        trainer = gradsift.OnlineTrainer(
            model, optimizer, get_selector("ftw"),
            ExampleStream(data / "stream.jsonl", tokenizer, max_length=64),
            load_examples(data / "target.jsonl", tokenizer, max_length=64),
            gradsift.EngineConfig(candidates_per_step=8, budget_per_step=2, eval_every=0,
                                  checkpoint_every=0),
            run_dir=data / "run", pad_token_id=tokenizer.pad_token_id,
        )
        print(f"target loss before: {trainer.evaluate():.3f}")
        for _ in range(args.steps):
            record = trainer.step()
            picked = ", ".join(f"{i} (w={w:.2f})"
                               for i, w in zip(record["selected_ids"], record["weights"],
                                               strict=True))
            print(f"step {record['step']}: rho={record['rho']}, trained on {picked or 'nothing'}")
        print(f"target loss after:  {trainer.evaluate():.3f}")


if __name__ == "__main__":
    main()
