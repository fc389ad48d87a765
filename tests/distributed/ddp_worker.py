"""One rank of a test run (started by ``launch.py`` with the launcher's environment variables,
or alone for the single-process reference). Writes ``rank<r>.pt`` with what the tests compare.

    python ddp_worker.py SCENARIO OUT_DIR [key=value ...] [++ OUT_DIR [key=value ...] ...]

(``scenario=NAME`` among a run's options runs that scenario instead of SCENARIO.)

Several runs (``++``-separated, each with its own folder and options) share one process and
one process group: a launch costs seconds of imports, a tiny run a fraction of that. Each run
starts from the same seed, so a run does not depend on the ones before it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: reference helpers

from reference import make_examples, token_rows  # noqa: E402

torch.set_num_threads(1)


def build_model(kind: str):
    from peft import LoraConfig, get_peft_model
    from reference import tiny_llama

    model = tiny_llama(tie=False)
    if kind == "lora":
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj"]))
    return model


def online(out: Path, opts: dict[str, str]) -> None:
    """OnlineTrainer for ``steps`` steps; every rank records what it captured."""
    from reference import ListStream

    from gradsift import distributed as ddp
    from gradsift.distributed import DistributedConfig
    from gradsift.engine import EngineConfig, OnlineTrainer
    from gradsift.select import get_selector

    distributed = ddp.init_from_env()
    torch.manual_seed(0)
    steps = int(opts.get("steps", 3))
    model = build_model(opts.get("model", "lora"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    config = EngineConfig(candidates_per_step=int(opts.get("B", 8)),
                          budget_per_step=int(opts.get("k", 3)), target_batch_size=5,
                          eval_size=2, eval_every=0, checkpoint_every=int(opts.get("ckpt", 0)),
                          max_grad_norm=1.0)
    dcfg = DistributedConfig(exchange=opts.get("exchange", "exact"),
                             scope=opts.get("scope", "global"),
                             sketch_dim=int(opts.get("sketch_dim", 256)))
    model = model if not distributed else torch.nn.parallel.DistributedDataParallel(model)
    stream = ListStream(make_examples(int(opts.get("n_stream", 60)), seed=1))
    trainer = OnlineTrainer(model, optimizer, get_selector(opts.get("method", "ftw")), stream,
                            make_examples(12, seed=2), config, out / "run", seed=0,
                            distributed=dcfg)
    if opts.get("resume") == "1":
        trainer.resume()
    captured: list[list[str]] = []
    run = trainer.selection.run

    def recording_run(batches, *args, **kwargs):
        captured.append([i for b in batches for i in b["ids"]])
        return run(batches, *args, **kwargs)

    trainer.selection.run = recording_run
    die_at = int(opts.get("die_at", 0))
    records = []
    while trainer.state.step < steps:
        if die_at and trainer.state.step == die_at and ddp.rank() == int(opts.get("die_rank", 1)):
            os._exit(3)  # a rank dies mid-run
        record = trainer.step()
        if record is None:  # the stream ended
            break
        records.append(record)
    torch.save({"records": records, "captured": captured,
                "params": {n: p.detach().clone() for n, p in trainer.params.items()}},
               out / f"rank{ddp.rank()}.pt")


def trainer(out: Path, opts: dict[str, str]) -> None:
    """GradSiftTrainer for ``steps`` steps, data in order (a sequential sampler), global batch
    of 8: one process with a batch of 8, or each rank with 8 / WORLD_SIZE."""
    from torch.utils.data import SequentialSampler

    from gradsift.integrations.transformers import (
        GradSiftCollator,
        GradSiftConfig,
        GradSiftTrainer,
    )

    class InOrder(GradSiftTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = GradSiftConfig(
        output_dir=str(out / "run"), per_device_train_batch_size=8 // world,
        max_steps=int(opts.get("steps", 3)), learning_rate=1e-2, report_to=[], use_cpu=True,
        save_strategy="no", seed=0, dataloader_num_workers=0, logging_steps=1,
        lr_scheduler_type="constant", ddp_backend="gloo" if world > 1 else None,
        budget_per_step=3, target_batch_size=5, selector="ftw",
        distributed={"exchange": opts.get("exchange", "exact")})
    model = build_model("lora")
    t = InOrder(model=model, args=args, train_dataset=token_rows(40, 0, "train"),
                data_collator=GradSiftCollator(pad_token_id=0),
                target_dataset=token_rows(12, 1, "target"))
    t.train()
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save({"params": {n: p.detach().clone() for n, p in model.named_parameters()
                           if p.requires_grad}}, out / f"rank{rank}.pt")


SCENARIOS = {"online": online, "trainer": trainer}

if __name__ == "__main__":
    name, *rest = sys.argv[1:]
    runs = " ".join(rest).split(" ++ ")
    for run in runs:
        folder, *options = run.split()
        opts = dict(o.split("=", 1) for o in options)
        Path(folder).mkdir(parents=True, exist_ok=True)
        SCENARIOS[opts.pop("scenario", name)](Path(folder), opts)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
