"""The settings the quality suite and the one-step bench share: scenarios, suites, data.

A **scenario** (``SCENARIOS``) is one stream/target setting built from ``gradsift.sources``:
label noise, domain shift to code, verse, redundancy, label noise at ``k/B = 1/8``; or a
user's own stream and target (``custom_scenario``, ``--stream``/``--target``). A **suite**
(``SUITES``) fixes the model, steps, lengths and evaluation sizes. ``build_data`` writes a
scenario's files once; ``make_trainer`` builds the run both benches start from: a LoRA copy of
the model initialised by the seed (or, ``finetune="full"``, a copy that trains every
parameter), AdamW, the seed's stream order and the target, in an
``OnlineTrainer``. Both benches also share how a method is named (``parse_method``:
``"ftw@min_cosine=0.1"``) and how a finished run's file is written and read (``write_result``,
atomic, so a stopped run leaves no half file; ``read_result``, which names a damaged one).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradsift.data import DataError, ExampleStream, load_examples, read_examples
from gradsift.engine import EngineConfig, OnlineTrainer
from gradsift.jsonio import json_safe, read_jsonl, write_jsonl, write_text_atomic
from gradsift.recipe import build_scheduler
from gradsift.select import Selector, get_selector

MAX_GRAD_NORM = 1.0


@dataclass(frozen=True)
class Scenario:
    """One stream/target setting of the suite."""

    name: str
    description: str
    target: str
    sources: tuple[str, ...]
    noise_rate: float = 0.25
    duplicate_share: float = 0.0
    candidates: int = 8
    budget: int = 2
    accuracy: bool = False
    extra_methods: bool = False
    stream_file: str | None = None  # a user's own stream and target (``custom_scenario``)
    target_file: str | None = None
    eval_size: int | None = None  # a user's held-out set (default: the suite's eval_size)


def custom_scenario(stream: Path, target: Path, name: str | None = None, candidates: int = 8,
                    budget: int = 2, eval_size: int | None = None) -> Scenario:
    """A scenario on a user's own files (gradsift's JSONL records, as ``gradsift run`` reads
    them): the stream as given, the target's first ``eval_size`` records (default: the
    suite's) held out for the evaluation and the rest drawn as target batches."""
    for path, what in ((stream, "--stream"), (target, "--target")):
        if not path.is_file():
            raise FileNotFoundError(f"{what}: {path} is not a file")
    if not 0 < budget <= candidates:
        raise ValueError(f"--budget {budget} must be between 1 and --candidates {candidates}")
    if eval_size is not None and eval_size < 1:
        raise ValueError(f"--eval-size must be at least 1, got {eval_size}")
    return Scenario(name or f"custom-{target.stem}", f"stream {stream.name}, target "
                    f"{target.name}", "custom", (), candidates=candidates, budget=budget,
                    stream_file=str(stream.resolve()), target_file=str(target.resolve()),
                    eval_size=eval_size)


@dataclass(frozen=True)
class Suite:
    """Sizes of one suite run (model, steps, lengths, evaluation)."""

    model: str
    scenarios: tuple[Scenario, ...]
    seeds: tuple[int, ...]
    steps: int
    max_length: int
    lr: float
    eval_size: int
    eval_every: int
    target_batch_size: int
    n_stream: int
    n_accuracy: int
    lora_r: int = 8
    extra_seeds: int = 3  # the ablations and weaker baselines run on this many seeds
    candidates: int = 8  # B and k of a user's own data (--stream), unless given: the size
    budget: int = 2  # of the suite's k/B = 1/4 scenarios
    # the built scenarios' target examples (None: eval_size + 4 × target_batch_size);
    # --target-batch-size keeps the suite's, so its runs read the same files; --target-pool
    # sets it
    n_target: int | None = None
    # the learning-rate schedule over ``steps`` (transformers' names; --scheduler,
    # --warmup-steps): constant in every suite
    scheduler: str = "constant"
    warmup_steps: int = 0
    # "lora" (LoRA r ``lora_r`` on q/k/v/o) or "full" (every parameter of the model trains:
    # embeddings, norms, the tied head): --finetune
    finetune: str = "lora"


_MIXED = ("code", "verse", "arithmetic")
SCENARIOS = (
    Scenario("label-noise", "arithmetic target; 25% wrong answers among the stream's "
             "arithmetic", "arithmetic", _MIXED, accuracy=True, extra_methods=True),
    Scenario("code", "held-out code target; mixed stream", "code", _MIXED),
    Scenario("verse", "held-out verse target; mixed stream", "verse", _MIXED),
    Scenario("redundancy", "arithmetic target; 25% of the stream are near-copies of one "
             "correct arithmetic record", "arithmetic", _MIXED, duplicate_share=0.25,
             extra_methods=True),
    Scenario("label-noise-1of8", "label noise at k/B = 2/16", "arithmetic", _MIXED,
             candidates=16, budget=2, accuracy=True),
)
SUITES = {
    "full": Suite("smollm2-135m", SCENARIOS, (0, 1, 2, 3, 4), steps=12, max_length=40,
                  lr=2e-3, eval_size=64, eval_every=4, target_batch_size=8, n_stream=1200,
                  n_accuracy=100),
    # the same scenarios with twice the candidates and budget (k/B unchanged), twice the steps
    # at half the lr: each step averages over more samples and moves the model less; the seed
    # sd of a paired difference fell to 0.25-0.6 of full's (BENCHMARKS.md, session 13)
    "steady": Suite("smollm2-135m", tuple(replace(s, candidates=2 * s.candidates,
                                                  budget=2 * s.budget) for s in SCENARIOS),
                    (0, 1, 2, 3, 4), steps=24, max_length=40, lr=1e-3, eval_size=64,
                    eval_every=4, target_batch_size=8, n_stream=1200, n_accuracy=100,
                    candidates=16, budget=4),
    "smoke": Suite("tiny", (
        Scenario("label-noise", "smoke", "arithmetic", _MIXED, candidates=4, budget=2,
                 accuracy=True),
        Scenario("redundancy", "smoke", "arithmetic", _MIXED, duplicate_share=0.5,
                 candidates=4, budget=2),
    ), (0, 1), steps=3, max_length=24, lr=1e-2, eval_size=4, eval_every=2,
        target_batch_size=2, n_stream=40, n_accuracy=4, extra_seeds=2, candidates=4,
        budget=2),
}


def choose_scenarios(suite: Suite, names: Sequence[str] | None) -> list[Scenario]:
    """The suite's scenarios named (all without names); a name it does not have is an
    error that lists the ones it has, never a silent empty run."""
    unknown = sorted(set(names or ()) - {s.name for s in suite.scenarios})
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}; "
                         f"available: {[s.name for s in suite.scenarios]}")
    return [s for s in suite.scenarios if names is None or s.name in names]


def sizes_line(scenarios: Iterable[Scenario], suite: Suite) -> str:
    """``label-noise k=2 of B=8, code k=2 of B=8: 12 steps at lr 0.002``: what a run trains
    (each scenario once, in the order first met)."""
    once = {sc.name: sc for sc in scenarios}.values()
    return (", ".join(f"{sc.name} k={sc.budget} of B={sc.candidates}" for sc in once)
            + f": {suite.steps} steps at lr {suite.lr:g}")


def held_out_size(scenario: Scenario, suite: Suite) -> int:
    """How many of the target's first records are the held-out evaluation set."""
    return scenario.eval_size if scenario.eval_size is not None else suite.eval_size


def target_examples_built(suite: Suite) -> int:
    """Target examples a built scenario holds: the held-out set and a pool of 4 batches."""
    return suite.n_target or suite.eval_size + 4 * suite.target_batch_size


def build_data(scenario: Scenario, suite: Suite, folder: Path) -> Path:
    """``stream.jsonl``, ``target.jsonl`` (eval examples first) and, for arithmetic,
    ``accuracy.jsonl`` (questions in neither), built once per scenario with seed 0."""
    from gradsift.sources import build_stream
    from gradsift.sources.arithmetic import arithmetic_records

    if scenario.stream_file is not None:
        return _copy_user_data(scenario, suite, folder)
    if (folder / "done").exists():
        return folder
    n_target = target_examples_built(suite)
    folder.mkdir(parents=True, exist_ok=True)
    # built in a folder of this process's own, so a shard reading ``folder`` never sees the
    # stream before its near-duplicates are in (each file below is replaced atomically)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".build-") as tmp:
        build_stream(scenario.target, tmp, seed=0, n_stream=suite.n_stream, n_target=n_target,
                     sources=list(scenario.sources), noise_rate=scenario.noise_rate)
        stream = read_jsonl(Path(tmp) / "stream.jsonl")
        target = read_jsonl(Path(tmp) / "target.jsonl")
        if scenario.duplicate_share > 0:
            stream = _with_near_duplicates(stream, target, scenario.duplicate_share)
        write_jsonl(folder / "stream.jsonl", stream)
        write_jsonl(folder / "target.jsonl", target)
        os.replace(Path(tmp) / "manifest.json", folder / "manifest.json")
    if scenario.accuracy:
        seen = frozenset(r["prompt"] for r in stream + target if "prompt" in r)
        questions = arithmetic_records(random.Random(12345), suite.n_accuracy, noise_rate=0.0,
                                       exclude=seen)
        write_jsonl(folder / "accuracy.jsonl", questions)
    (folder / "done").write_text("ok")
    return folder


def _copy_user_data(scenario: Scenario, suite: Suite, folder: Path) -> Path:
    """A custom scenario's files, checked and copied (the runs never read the user's path);
    a folder built from other files is refused, not reused."""
    import hashlib

    held_out = held_out_size(scenario, suite)
    digest: dict[str, Any] = {
        name: hashlib.sha256(Path(path).read_bytes()).hexdigest()
        for name, path in (("stream", scenario.stream_file), ("target", scenario.target_file))}
    digest["eval_size"] = held_out
    if (folder / "done").exists():
        built = json.loads((folder / "source.json").read_text())
        built.setdefault("eval_size", suite.eval_size)  # folders of before --eval-size
        if built != digest:
            raise ValueError(f"{folder} was built from other files than {scenario.stream_file} "
                             f"and {scenario.target_file}, or for another --eval-size "
                             f"({built['eval_size']}, now {held_out}): choose another --name "
                             "or --out")
        return folder
    stream = read_jsonl(Path(scenario.stream_file))
    target = read_jsonl(Path(scenario.target_file))
    need = held_out + suite.target_batch_size
    if len(target) < need:
        raise ValueError(f"{scenario.target_file}: {len(target)} records; the suite needs at "
                         f"least {need} ({held_out} held out for the evaluation and a target "
                         f"batch of {suite.target_batch_size}; --eval-size sets the first)")
    need = suite.steps * scenario.candidates
    if len(stream) < need:
        raise ValueError(f"{scenario.stream_file}: {len(stream)} records; {suite.steps} steps "
                         f"of {scenario.candidates} candidates need {need}")
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "stream.jsonl", stream)
    write_jsonl(folder / "target.jsonl", target)
    (folder / "source.json").write_text(json.dumps(digest))
    (folder / "done").write_text("ok")
    return folder


def stream_ended(trainer: OnlineTrainer, data: Path, step: int) -> RuntimeError:
    """The error for a stream that ran out before the suite's last step, with its skips."""
    skipped = trainer.stream.skipped
    why = f"; records skipped: {skipped}" if skipped else ""
    return RuntimeError(f"{data}: the stream ended at step {step}{why}")


def check_user_data(scenario: Scenario, suite: Suite, data: Path, tokenizer: Any) -> None:
    """Every record of a user's stream and target must train within the suite's token
    limit: a skipped target record would shift the held-out set, a skipped stream record the
    candidate batches, so the run is refused, with the counts, instead."""
    for name, flag, source in (("target.jsonl", "--target", scenario.target_file),
                               ("stream.jsonl", "--stream", scenario.stream_file)):
        hint = (f"at max_length={suite.max_length} tokens (the suite's limit; --max-length "
                "raises it)")
        try:
            _, skipped = read_examples(data / name, tokenizer, suite.max_length)
        except DataError as err:
            raise ValueError(f"{flag} {source}: no record is usable {hint}: {err}") from err
        if skipped:
            raise ValueError(f"{flag} {source}: {sum(skipped.values())} records would be "
                             f"skipped {hint}: {skipped}")


def _with_near_duplicates(stream: list[dict], target: list[dict], share: float) -> list[dict]:
    """Replace ``share`` of the stream by near-copies of one correct record of the target's
    kind: the same question with a small edit each time (spacing, punctuation, a prefix)."""
    rng = random.Random(7)
    template = next(r for r in stream if r.get("source") == target[0].get("source")
                    and not r.get("wrong_answer"))
    edits = ["", " ", "  ", "Q. ", "Quick one. ", "Please answer. ", "Again: ", "Hmm. "]
    out = list(stream)
    slots = rng.sample(range(len(out)), int(share * len(out)))
    for n, i in enumerate(slots):
        prompt = template["prompt"]
        edit = edits[n % len(edits)]
        prompt = edit + prompt if n % 2 == 0 else prompt.replace("?", " ?" if n % 4 else "?")
        out[i] = {**template, "id": f"dup/{n}", "source": "duplicate", "prompt": prompt}
    return out


def seeded_stream(data: Path, seed: int) -> Path:
    """The scenario's stream in the order of ``seed`` (the same file for every method)."""
    path = data / f"stream_seed{seed}.jsonl"
    if not path.exists():
        rows = read_jsonl(data / "stream.jsonl")
        random.Random(seed).shuffle(rows)
        write_jsonl(path, rows)
    return path


def make_trainer(base: torch.nn.Module, tokenizer: Any, scenario: Scenario, suite: Suite,
                 selector: Selector, seed: int, data: Path, run_dir: Path,
                 engine_options: dict[str, Any] | None = None) -> OnlineTrainer:
    """A LoRA copy of ``base`` (initialised by ``seed``), or with ``suite.finetune == "full"``
    a copy whose every parameter trains, AdamW, the seed's stream and the scenario's target,
    in an online trainer that logs to ``run_dir``."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if suite.finetune == "full":
        model = copy.deepcopy(base).requires_grad_(True)
    else:
        from peft import LoraConfig, get_peft_model

        with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            model = get_peft_model(copy.deepcopy(base), LoraConfig(
                r=suite.lora_r, lora_alpha=2 * suite.lora_r, lora_dropout=0.0,
                task_type="CAUSAL_LM", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=suite.lr, weight_decay=0.0)
    scheduler = build_scheduler(optimizer, suite.scheduler, suite.warmup_steps, suite.steps)
    if scenario.stream_file is not None:
        check_user_data(scenario, suite, data, tokenizer)
    stream = ExampleStream(seeded_stream(data, seed), tokenizer, suite.max_length)
    target = load_examples(data / "target.jsonl", tokenizer, suite.max_length)
    config = EngineConfig(**{
        "candidates_per_step": scenario.candidates, "budget_per_step": scenario.budget,
        "target_batch_size": suite.target_batch_size, "eval_size": held_out_size(scenario, suite),
        "eval_every": 0, "checkpoint_every": 0, "max_grad_norm": MAX_GRAD_NORM,
        **(engine_options or {})})
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("selections.jsonl", "metrics.jsonl"):
        (run_dir / name).unlink(missing_ok=True)
    return OnlineTrainer(model, optimizer, selector, stream, target, config, run_dir,
                         scheduler=scheduler, pad_token_id=tokenizer.pad_token_id, seed=seed)


# sizes added after folders were written (which hold CPU runs at a constant lr and no such
# key): recorded in ``suite.json`` only when not these
_LATER_SIZES = {"device": "cpu", "scheduler": "constant", "warmup_steps": 0, "finetune": "lora"}


def claim_out_folder(parser: argparse.ArgumentParser, out: Path, name: str, suite: Suite,
                     finished: str, write: bool = True, device: str = "cpu") -> None:
    """Refuse a folder whose ``suite.json`` says its finished runs (files matching the glob
    ``finished``, ``<scenario>/...``) were made under other sizes, or a scenario's under
    another k or B, or on another kind of device (a GPU's runs differ from a CPU's in the
    digits a paired difference reads), which resuming or summarizing would mix; with
    ``write``, record this call's sizes (keeping the other scenarios' records)."""
    per_scenario = ("scenarios", "seeds", "candidates", "budget")  # k and B: in ``kb``
    sizes = {"suite": name, **{f.name: getattr(suite, f.name) for f in fields(Suite)
                               if f.name not in per_scenario}}
    sizes["device"] = device
    for key, before_the_option in _LATER_SIZES.items():
        if sizes[key] == before_the_option:
            del sizes[key]
    kb = {sc.name: {"candidates": sc.candidates, "budget": sc.budget} for sc in suite.scenarios}
    path = out / "suite.json"
    has_runs = next(out.glob(finished), None) is not None
    made: dict[str, Any] = {}
    if path.exists():
        try:
            made = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            if has_runs:
                parser.error(f"{path}: not JSON ({exc}); remove it if the runs under {out} are "
                             f"--suite {name}'s")
    if has_runs:
        differ = sorted(k for k in (sizes.keys() | made.keys()) - {"scenarios"}
                        if made.get(k) != sizes.get(k))
        if differ:
            parser.error(f"{out} holds runs of another setting ({path}: " + ", ".join(
                f"{k} {made.get(k)!r} there, {sizes.get(k)!r} here" for k in differ)
                + "); give another --out or the same --suite and --max-length")
        below = finished.split("/", 1)[1]
        for scenario, here in kb.items():
            there = made.get("scenarios", {}).get(scenario)
            if there not in (None, here) and next((out / scenario).glob(below), None):
                parser.error(f"{out / scenario} holds runs of another k or B ({path}: " + ", "
                             .join(f"{k} {there.get(k)!r} there, {here[k]!r} here" for k in
                                   here if there.get(k) != here[k]) + "); give another "
                             "--out or --name, or the same --candidates and --budget")
    text = json.dumps({**sizes, "scenarios": {**made.get("scenarios", {}), **kb}}, indent=1)
    if write and made != json.loads(text):  # whole, so a shard started alongside reads JSON
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, text + "\n")


def parse_method(method: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``"ftw@target_ema=0.8@min_cosine=0.1"`` → (selector name, engine options, selector
    options): keys of ``SelectionConfig`` go to the engine, the others to the selector. Values
    are read as YAML scalars (numbers, booleans, strings)."""
    import yaml

    from gradsift.step import SelectionConfig

    name, *pairs = method.split("@")
    engine_keys = {f.name for f in fields(SelectionConfig)} - {"budget_per_step", "modules"}
    engine: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"method {method!r}: expected KEY=VALUE after '@', got {pair!r}")
        (engine if key in engine_keys else options)[key] = yaml.safe_load(value)
    get_selector(name, **options)  # names a bad selector or option before any run
    SelectionConfig(**engine)
    return name, engine, options


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Write one finished run's JSON atomically: the file is what marks the run finished, so a
    stop while writing must leave no file rather than half of one."""
    write_text_atomic(path, json.dumps(result))


def read_result(path: Path) -> dict[str, Any]:
    """One finished run's JSON; a file that is not (a copy cut short, an edit) is named."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a finished run's JSON ({exc}); delete it and the run is "
                         "made again") from None


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    """The report's numbers as strict JSON (NaN and ±inf as ``null``), written atomically."""
    write_text_atomic(path, json.dumps(json_safe(summary), indent=1))


def add_own_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--stream``/``--target`` (and ``--name``, ``--candidates``, ``--budget``): a user's own
    data as one more scenario (``custom_scenario``); ``--max-length``,
    ``--target-batch-size`` and ``--target-pool`` resize every scenario. ``bench.quality``
    and ``bench.branch``."""
    own = parser.add_argument_group("your own data, as one more scenario")
    own.add_argument("--stream", type=Path, help="a JSONL stream (gradsift's record format)")
    own.add_argument("--target", type=Path, help="a JSONL target set: its first --eval-size "
                     "records are held out for the evaluation, the rest are target batches")
    own.add_argument("--eval-size", type=int, help="the held-out set's size (default: the "
                     "suite's, 64 in full): a small target set can spare fewer")
    own.add_argument("--name", help="the scenario's name (default: custom-<target file stem>)")
    own.add_argument("--candidates", type=int, help="B (default: the suite's, 8 in full, 16 "
                     "in steady)")
    own.add_argument("--budget", type=int, help="k (default: the suite's, 2 in full, 4 in "
                     "steady)")
    own.add_argument("--max-length", type=int, help="tokens per record, prompt and answer "
                     "(default: the suite's, 40 in full; every record must train within it)")
    own.add_argument("--target-batch-size", type=int, help="target examples per target "
                     "gradient ĝ (default: the suite's, 8): how much a run's selections see of "
                     "the target each step")
    own.add_argument("--target-pool", type=int, help="target examples the built scenarios "
                     "draw target batches from, besides the held-out set (default: 4 target "
                     "batches, 32 in full and steady): how many distinct target examples a "
                     "run's selections ever see")


def device_kind(parser: argparse.ArgumentParser, name: str) -> str:
    """``--device``: ``cpu`` or ``cuda`` (``cuda:N`` picks a GPU); the kind is returned, and a
    GPU that is not there is refused before any run."""
    if name.split(":")[0] not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda[:N], got {name!r}")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        parser.error(f"--device {name!r}: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {name}: torch sees no CUDA device on this machine")
    return device.type


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device cpu|cuda[:N]`` (``device_kind`` checks it)."""
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu); a "
                        "folder holds one kind's runs: pair methods on one device")


def add_jobs_argument(parser: argparse.ArgumentParser) -> None:
    """``--jobs N``: N processes share the runs (``run_jobs``)."""
    parser.add_argument("--jobs", type=int, default=1, help="N processes sharing the runs "
                        "(each --shard i/N, --threads cores/N unless given)")


def check_jobs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.jobs > 1 and args.shard != "0/1":
        parser.error("--jobs sets each process's --shard: give one of them")


def run_jobs(module: str, argv: Sequence[str], args: argparse.Namespace, suite: Suite,
             out: Path, scenarios: Sequence[str] | None) -> int:
    """``args.jobs`` processes of ``python -m module argv``, the i-th with ``--shard i/N
    --quiet``: every run still to do, each by one of them. The scenarios' data are built here
    first, once. Returns 0, or 1 naming the shards that failed (the command resumes them)."""
    for sc in choose_scenarios(suite, scenarios):
        build_data(sc, suite, out / sc.name / "data")
    jobs = args.jobs
    threads = args.threads or max(1, (os.cpu_count() or 1) // jobs)
    mine = ("--jobs", "--threads", "--shard")  # each shard's own, set below
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in mine:
            skip = True
        elif not arg.startswith(tuple(f"{m}=" for m in mine)) and arg != "--quiet":
            rest.append(arg)
    children = [subprocess.Popen([sys.executable, "-m", module, *rest, "--shard", f"{i}/{jobs}",
                                  "--quiet", "--threads", str(threads)]) for i in range(jobs)]
    failed = [f"{i}/{jobs} (exit {rc})" for i, child in enumerate(children)
              if (rc := child.wait()) != 0]
    if failed:
        print(f"shard(s) {', '.join(failed)} failed: their runs are not finished; the same "
              "command resumes them", file=sys.stderr)
        return 1
    return 0


def with_own_data(parser: argparse.ArgumentParser, args: argparse.Namespace,
                  suite: Suite) -> Suite:
    """``suite`` with the user's scenario added, which becomes the only one run unless
    ``--scenarios`` names others."""
    if (args.stream is None) != (args.target is None):
        parser.error("--stream and --target go together")
    if args.max_length is not None:
        if args.max_length < 2:
            parser.error(f"--max-length must be at least 2, got {args.max_length}")
        suite = replace(suite, max_length=args.max_length)
    if args.target_batch_size is not None:
        if args.target_batch_size < 1:
            parser.error(f"--target-batch-size must be at least 1, got {args.target_batch_size}")
        suite = replace(suite, target_batch_size=args.target_batch_size,
                        n_target=target_examples_built(suite))
    if args.target_pool is not None:
        if args.stream is not None:
            parser.error("--target-pool sizes the built scenarios' target sets; with --target "
                         "its records after the held-out ones are the pool")
        if args.target_pool < suite.target_batch_size:
            parser.error(f"--target-pool must hold a target batch of {suite.target_batch_size}, "
                         f"got {args.target_pool}")
        suite = replace(suite, n_target=suite.eval_size + args.target_pool)
    if args.stream is None:
        if args.eval_size is not None:
            parser.error("--eval-size sizes the held-out part of --target: give --stream and "
                         "--target with it")
        return suite
    custom = custom_scenario(args.stream, args.target, args.name,
                             suite.candidates if args.candidates is None else args.candidates,
                             suite.budget if args.budget is None else args.budget,
                             args.eval_size)
    if args.scenarios is None:
        args.scenarios = custom.name
    return replace(suite, scenarios=(*suite.scenarios, custom))
