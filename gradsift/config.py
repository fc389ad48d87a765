"""Run configuration: a YAML file plus ``key=value`` overrides, checked at start.

Unknown keys, duplicate keys and values of the wrong type or out of range fail before
anything is loaded, with a message that names the key (``lora.r``, ``budget_per_step``, ...).
Dotted overrides reach into nested sections: ``--set lora.r=16 --set method=random``.

YAML is read with a safe loader that also takes ``1e-4`` as a number (PyYAML's YAML 1.1
resolver wants ``1.0e-4``). Relative ``stream``/``target`` paths are resolved when the config
is loaded — against the config file's folder for paths in a file, against the working folder
for ``--set`` — so a saved ``config.yaml`` holds absolute paths and works from anywhere.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gradsift.allocator import MODES as ALLOCATOR_MODES
from gradsift.distributed import DistributedConfig
from gradsift.engine import EngineConfig
from gradsift.reporting import ReportToError
from gradsift.reporting import normalize as normalize_report_to

PATH_KEYS = ("stream", "target")
# keys that only choose where a run's log goes: a compare reuses a run that differs in them
LOGGING_KEYS = ("report_to",)
DATASET_BUILDERS = ("json", "parquet", "csv", "arrow", "text")  # gradsift.hf_datasets


class ConfigError(ValueError):
    """A configuration problem, naming the offending key."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, plus: ``1e-4`` is a float, and a repeated key is an error."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = self.construct_object(key_node)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # unhashable: the base class reports it
                continue
            if first != key_node.start_mark.line + 1:
                raise ConfigError(f"duplicate config key {key!r} on line "
                                  f"{key_node.start_mark.line + 1} (first on line {first})")
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(  # YAML 1.2 floats: the dot and the exponent's sign are optional
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)
                |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?)$""", re.X),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """Parse YAML with the config loader (see :class:`_Loader`)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


@dataclass
class LoraSection:
    """LoRA adapters (peft). ``lora: false`` (or ``off``) in YAML means full fine-tuning."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"config key 'lora.r' must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"config key 'lora.alpha' must be > 0, got {self.alpha}")
        if not (0.0 <= self.dropout < 1.0):
            raise ConfigError(f"config key 'lora.dropout' must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("config key 'lora.target_modules' must name at least one module")


@dataclass
class RunConfig:
    """Everything a ``gradsift run`` needs. Keys mirror the YAML file."""

    model: str = "smollm2-135m"
    lora: LoraSection | None = field(default_factory=LoraSection)
    stream: str = ""
    target: str = ""
    method: str = "ftw"
    method_options: dict[str, Any] = field(default_factory=dict)
    engine: EngineConfig = field(default_factory=EngineConfig)
    # under torchrun / accelerate launch: how ranks share one selection (exchange: exact |
    # sketch, scope: global | local, sketch_dim); ignored in one process
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    steps: int = 20
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    scheduler: str = "constant"
    max_length: int = 128
    skip_bad_records: bool = False
    dtype: str = "float32"
    device: str = "cpu"
    # on cpu: "tuned" keeps freed memory for reuse (gradsift.allocator), "system" leaves malloc
    cpu_allocator: str = "tuned"  # gradsift.allocator.MODES
    trust_remote_code: bool = False
    seed: int = 0
    # experiment trackers, as TrainingArguments.report_to: none | all | tensorboard | wandb |
    # trackio, or a list; stored sorted, [] for none (gradsift.reporting)
    report_to: list[str] | None = field(default_factory=list)

    def __post_init__(self) -> None:
        """Every range check, in one place; each message names its key."""
        try:
            self.report_to = normalize_report_to(self.report_to)
        except ReportToError as e:
            raise ConfigError(str(e)) from None
        if self.steps < 1:
            raise ConfigError(f"config key 'steps' must be >= 1, got {self.steps}")
        if self.warmup_steps < 0:
            raise ConfigError(f"config key 'warmup_steps' must be >= 0, got {self.warmup_steps}")
        if self.max_length < 2:
            raise ConfigError(f"config key 'max_length' must be >= 2, got {self.max_length}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"config key 'lr' must be > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"config key 'weight_decay' must be >= 0, got {self.weight_decay}")
        if not (0 <= self.seed < 2**32 - 1):
            raise ConfigError(f"config key 'seed' must be in [0, 2**32 - 1), got {self.seed}")
        if not self.model.strip():
            raise ConfigError("config key 'model' must not be empty")
        if self.cpu_allocator not in ALLOCATOR_MODES:
            raise ConfigError(f"config key 'cpu_allocator' must be tuned or system, "
                              f"got {self.cpu_allocator!r}")
        if not re.fullmatch(r"[a-z]+(:[0-9]+)?", self.device):
            raise ConfigError(f"config key 'device' must look like cpu, cuda or cuda:0, "
                              f"got {self.device!r}")
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
            try:
                return float(value)
            except OverflowError:
                raise ConfigError(f"config key {key!r}: {value} is too large") from None
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
        engine_keys = {f.name for f in dataclasses.fields(EngineConfig)}
        for k in unknown:
            if cls is RunConfig and k in engine_keys:
                hints_txt.append(f"{k} (it belongs in the engine section: engine.{k})")
                continue
            options = [f"{prefix}{n}" for n in names]
            if cls is RunConfig:
                options += [f"engine.{n}" for n in engine_keys]
            close = difflib.get_close_matches(f"{prefix}{k}", options, n=1)
            if not close and cls is RunConfig:
                close = [f"engine.{c}" for c in difflib.get_close_matches(str(k), engine_keys, n=1)]
            hints_txt.append(f"{prefix}{k}" + (f" (did you mean {close[0]}?)" if close else ""))
        raise ConfigError(f"unknown config key(s): {', '.join(hints_txt)}")
    kwargs = {}
    for k, v in data.items():
        annotation = hints[k]
        if k == "lora" and v in (False, "off", "none", None):
            kwargs[k] = None
            continue
        if k == "lora" and v in (True, "on"):
            v = {}
        kwargs[k] = _check_type(prefix + k, v, annotation)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # a section validated by its own dataclass
        message = str(e)
        key = next((n for n in sorted(names, key=len, reverse=True)
                    if message.startswith(n + " ")), None)
        if key is None:
            raise ConfigError(f"config section {prefix[:-1] or 'config'!r}: {e}") from e
        raise ConfigError(f"config key '{prefix}{key}'{message[len(key):]}") from e


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"lora.r=16"`` → (["lora", "r"], 16); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    keys = [k.strip() for k in key.split(".")]
    if not all(keys):
        raise ConfigError(f"--set {text}: empty key")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text}: not a valid YAML value: {e}") from e
    return keys, value


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {path}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the config file: {e}") from e
    try:
        loaded = yaml_load(text)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
    except (yaml.YAMLError, RecursionError) as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return loaded or {}


def _absolute(value: Any, base: Path) -> Any:
    """A data path made absolute; in a ``json:PATH``-style dataset spec, the path part."""
    if isinstance(value, str) and value:
        builder, sep, rest = value.partition(":")
        if sep and builder in DATASET_BUILDERS and rest:
            return f"{builder}:{_absolute(rest, base)}"
        return os.path.abspath(os.path.join(base, os.path.expanduser(value)))
    return value


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or start from defaults), apply overrides, validate everything.

    Relative data paths become absolute: a path in the file is relative to the file's folder,
    a path given with ``--set`` to the working folder.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        data = _read_file(path)
        for key in PATH_KEYS:
            if key in data:
                data[key] = _absolute(data[key], path.parent)
    for text in overrides or []:
        keys, value = parse_override(text)
        if len(keys) == 1 and keys[0] in PATH_KEYS:
            value = _absolute(value, Path.cwd())
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
    """A plain dict (YAML-ready) of a ``RunConfig``; ``lora: false`` when LoRA is off; data
    paths absolute (relative ones are taken relative to the working folder)."""
    out = dataclasses.asdict(config)
    if config.lora is None:
        out["lora"] = False
    for key in PATH_KEYS:
        out[key] = _absolute(out[key], Path.cwd())
    return out


def config_differences(stored: RunConfig, requested: RunConfig,
                       ignore: tuple[str, ...] = ()) -> list[str]:
    """``["lr: 0.01 → 0.02", ...]``: every (dotted) key whose value differs, except the
    keys in ``ignore`` (such as ``LOGGING_KEYS``)."""

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, dict) and k != "method_options":
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(config_to_dict(stored)), flat(config_to_dict(requested))
    return [f"{k}: {a.get(k, '-')!r} → {b.get(k, '-')!r}" for k in dict.fromkeys([*a, *b])
            if a.get(k) != b.get(k) and k not in ignore]


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config (absolute data paths) to ``path`` atomically."""
    from gradsift.jsonio import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))
