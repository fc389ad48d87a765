"""Config loading: YAML parsing, range checks naming their key, paths that survive a resume."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradsift.config import (
    ConfigError,
    RunConfig,
    config_differences,
    load_config,
    save_config,
)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("engine.max_grad_norm=0", "'engine.max_grad_norm' must be > 0"),
        ("engine.max_grad_norm=-1", "'engine.max_grad_norm' must be > 0"),
        ("engine.budget_per_step=5",
         "'engine.budget_per_step' (5) must not exceed candidates_per_step (4)"),
        ("warmup_steps=-1", "'warmup_steps' must be >= 0"),
        ("lora.r=0", "'lora.r' must be >= 1"),
        ("lora.alpha=0", "'lora.alpha' must be > 0"),
        ("lora.dropout=1.0", "'lora.dropout'"),
        ("lora.target_modules=[]", "'lora.target_modules'"),
        ("engine.keep_checkpoints=0", "'engine.keep_checkpoints' must be an integer >= 1"),
        ("engine.max_consecutive_skips=-1",
         "'engine.max_consecutive_skips' must be an integer >= 0"),
        ("lr=.nan", "'lr' must be > 0"),
        ("lr=.inf", "'lr' must be > 0"),
        ("weight_decay=-0.1", "'weight_decay' must be >= 0"),
        ("engine.eval_every=-1", "'engine.eval_every' must be an integer >= 0"),
        ("engine.micro_batch_size=0", "'engine.micro_batch_size' must be an integer >= 1"),
        ("engine.target_refresh=0", "'engine.target_refresh' must be an integer >= 1"),
        ("budget_per_step=2", "budget_per_step (it belongs in the engine section"),
        ("max_length=1", "'max_length' must be >= 2"),
        ("seed=-1", "'seed'"),
        ("device=gpu 0", "'device'"),
        ("lr=1" + "0" * 400, "'lr'"),
    ],
)
def test_values_that_corrupt_training_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["engine.candidates_per_step=4", override])
    assert message in str(err.value)


def test_clipping_off_is_null_not_zero():
    assert load_config(None, ["engine.max_grad_norm=null"]).engine.max_grad_norm is None


def test_exponent_floats_without_a_dot(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 1e-4\nweight_decay: 2E-2\nengine:\n  max_grad_norm: 5e0\n")
    config = load_config(cfg, ["method_options.min_cosine=1e-3"])
    assert config.lr == 1e-4 and config.weight_decay == 0.02
    assert config.engine.max_grad_norm == 5.0
    assert config.method_options == {"min_cosine": 1e-3}
    assert load_config(None, ["lr=3e-5"]).lr == 3e-5


def test_duplicate_keys_name_the_key_and_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: 10\nlr: 0.1\nlora:\n  r: 4\n  r: 8\n")
    with pytest.raises(ConfigError, match=r"c.yaml: duplicate config key 'r' on line 5 "
                                          r"\(first on line 4\)"):
        load_config(cfg)
    cfg.write_text("lr: 0.1\nsteps: 3\nlr: 0.2\n")
    with pytest.raises(ConfigError, match="duplicate config key 'lr' on line 3"):
        load_config(cfg)


def test_new_keys_have_their_defaults():
    config = RunConfig()
    assert config.engine.keep_checkpoints == 3 and config.engine.max_consecutive_skips == 5


def test_saved_config_holds_absolute_paths_that_work_from_anywhere(tmp_path, monkeypatch):
    """Defect 1: relative data paths are resolved once, at load, and saved absolute."""
    (tmp_path / "base" / "data").mkdir(parents=True)
    (tmp_path / "base" / "run.yaml").write_text("stream: data/stream.jsonl\n"
                                                "target: ../t.jsonl\n")
    monkeypatch.chdir(tmp_path)
    config = load_config("base/run.yaml", ["target=elsewhere/t.jsonl"])
    assert config.stream == str(tmp_path / "base" / "data" / "stream.jsonl")
    assert config.target == str(tmp_path / "elsewhere" / "t.jsonl")  # --set: the working folder
    save_config(config, tmp_path / "saved.yaml")
    stored = yaml.safe_load((tmp_path / "saved.yaml").read_text())
    assert os.path.isabs(stored["stream"]) and os.path.isabs(stored["target"])
    monkeypatch.chdir(tmp_path / "base")
    again = load_config(tmp_path / "saved.yaml")
    assert (again.stream, again.target) == (config.stream, config.target)
    assert config_differences(config, again) == []


def test_config_differences_name_the_keys():
    a = load_config(None, ["lr=0.01", "lora.r=4"])
    b = load_config(None, ["lr=0.02", "lora.r=4", "lora.alpha=32"])
    diff = config_differences(a, b)
    assert sorted(diff) == ["lora.alpha: 16 → 32", "lr: 0.01 → 0.02"]


def test_unreadable_config_files_raise_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"lr: \xff\xfe\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)  # a folder
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(None, ["1=2"])


# --------------------------------------------------------------------- fuzzing (hypothesis)
KEYS = [f.name for f in dataclasses.fields(RunConfig)] + ["r", "alpha", "x"]
scalars = (st.none() | st.booleans() | st.integers(-5, 10**6) | st.integers()
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3)
                      | st.dictionaries(st.sampled_from(KEYS) | scalars, c, max_size=3),
                      max_leaves=12)
configs = st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), values, max_size=6)
override_text = st.builds(lambda k, v: f"{k}={v}",
                          st.sampled_from([*KEYS, "lora.r", "lora.x", "a..b", ".", "lora.r.s"])
                          | st.text(max_size=10), st.text(max_size=12))


def _load_or_config_error(text: str, overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            config = load_config(path, overrides)
        except ConfigError:
            return
        assert isinstance(config, RunConfig)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=configs, overrides=st.lists(override_text, max_size=3))
def test_config_loader_raises_only_config_error_on_structures(data, overrides):
    try:
        text = yaml.safe_dump(data)
    except yaml.YAMLError:
        return
    _load_or_config_error(text, overrides)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=80)
       | st.lists(st.sampled_from(["lr: 1e-4", "lora:", "  r: 0", "  r: x", "steps: 3",
                                   "steps: 4", "&a [*a]", "- 1", "<<: {a: 1}", "? [a]\n: 1",
                                   "lr: !!python/object:os.system x", "\t", "lr: .nan",
                                   "stream: 2024-01-01", "seed: 99999999999999999999"]),
                  max_size=6).map("\n".join))
def test_config_loader_raises_only_config_error_on_text(text):
    _load_or_config_error(text, [])
