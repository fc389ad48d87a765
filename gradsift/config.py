"""Run configuration: a YAML file plus ``key=value`` overrides, checked at start.

Unknown keys and values of the wrong type fail before anything is loaded, with a message
that names the key (``lora.r``, ``budget_per_step``, ...). Dotted overrides reach into
nested sections: ``--set lora.r=16 --set method=random``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PATH_KEYS = ("stream", "target")


class ConfigError(ValueError):
    """A configuration problem, naming the offending key."""


@dataclass
class LoraSection:
    """LoRA adapters (peft). ``lora: false`` (or ``off``) in YAML means full fine-tuning."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )


@dataclass
class RunConfig:
    """Everything a ``gradsift run`` needs. Keys mirror the YAML file."""

    model: str = "smollm2-135m"
    lora: LoraSection | None = field(default_factory=LoraSection)
    stream: str = ""
    target: str = ""
    method: str = "ftw"
    method_options: dict[str, Any] = field(default_factory=dict)
    candidates_per_step: int = 16
    budget_per_step: int = 4
    micro_batch_size: int | None = None
    steps: int = 20
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    scheduler: str = "constant"
    max_length: int = 128
    max_grad_norm: float | None = 1.0
    target_batch_size: int = 8
    target_refresh: int = 1
    eval_size: int = 16
    eval_every: int = 5
    checkpoint_every: int = 10
    skip_bad_records: bool = False
    dtype: str = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("candidates_per_step", "budget_per_step", "steps", "max_length",
                    "target_batch_size", "target_refresh"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key {key!r} must be >= 1, got {getattr(self, key)}")
        if self.lr <= 0:
            raise ConfigError(f"config key 'lr' must be > 0, got {self.lr}")
        if self.scheduler not in ("constant", "linear", "cosine"):
            raise ConfigError("config key 'scheduler' must be constant, linear or cosine, "
                              f"got {self.scheduler!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"config key 'dtype' must be float32, bfloat16 or float16, "
                              f"got {self.dtype!r}")


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """Coerce ``value`` to ``annotation`` where it is lossless; otherwise raise naming ``key``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _check_type(key, value, opt)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key {key!r}: bad value {value!r}")
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping, got {value!r}")
        return _build(annotation, value, prefix=f"{key}.")
    if origin is list:
        (item,) = typing.get_args(annotation)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        hints_txt = []
        for k in unknown:
            close = difflib.get_close_matches(k, names, n=1)
            hints_txt.append(f"{prefix}{k}" + (f" (did you mean {prefix}{close[0]}?)" if close
                                               else ""))
        raise ConfigError(f"unknown config key(s): {', '.join(hints_txt)}")
    kwargs = {}
    for k, v in data.items():
        annotation = hints[k]
        if k == "lora" and v in (False, "off", "none", None):
            kwargs[k] = None
            continue
        kwargs[k] = _check_type(prefix + k, v, annotation)
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - guarded by the checks above
        raise ConfigError(f"{prefix or 'config'}: {e}") from e


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"lora.r=16"`` → (["lora", "r"], 16); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or start from defaults), apply overrides, validate everything."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise ConfigError(f"config file not found: {path}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        data = loaded or {}
        for key in PATH_KEYS:  # relative data paths in a file are relative to that file
            value = data.get(key)
            if isinstance(value, str) and value and not Path(value).is_absolute():
                data[key] = str(path.parent / value)
    for text in overrides or []:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {} if node.get(k) in (None, True) else node[k]
            if not isinstance(node[k], dict):
                raise ConfigError(f"--set {text}: {k!r} is not a section")
            node = node[k]
        node[keys[-1]] = value
    return _build(RunConfig, data)


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    """A plain dict (YAML-ready) of a ``RunConfig``; ``lora: false`` when LoRA is off."""
    out = dataclasses.asdict(config)
    if config.lora is None:
        out["lora"] = False
    return out


def save_config(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
