"""Experiment trackers for ``gradsift run``: the config key ``report_to``, as in
``transformers.TrainingArguments``.

``report_to`` is ``none`` (the default), ``all`` (every backend whose package is installed), one
backend name, or a list of them. One small class per backend, registered by name; each gets the
same scalars, step by step, from the run log (:class:`gradsift.runlog.RunLog` forwards every
record it writes):

* ``train/loss``: the weighted loss of the trained subset (``metrics.jsonl`` ``train_loss``);
* ``train/learning_rate``: the optimizer's lr after the step (``metrics.jsonl`` ``lr``);
* ``eval/target_loss``: the held-out target loss at step 0, every ``eval_every`` steps and at
  the end (``metrics.jsonl`` ``target_loss``);
* ``train/n_selected``: how many candidates the step trained on (``selections.jsonl``
  ``selected_ids``);
* ``train/rho``: the selection's ρ = bᵀw / √(wᵀKw), when the selector reports one
  (``selections.jsonl`` ``rho``).

A value the log holds as ``null`` (non-finite, or not reported) is not sent. A backend's package
is checked by :func:`check_report_to` at preflight, so a missing one stops the run before any
work with the pip command; the package itself is imported only when the run opens it.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

NONE, ALL = "none", "all"
CONFIG_KEY = "report_to"


class ReportToError(ValueError):
    """``report_to`` names an unknown backend or one whose package is missing."""


class Reporter:
    """One tracker. Subclasses set ``name``, ``modules`` (what must be importable) and
    ``install``, and implement :meth:`log_scalars` and :meth:`close`."""

    name: str = ""
    modules: tuple[str, ...] = ()
    install: str = ""

    def __init__(self, run_dir: Path, config: dict[str, Any], start_step: int = 0):
        """Open the tracker for the run in ``run_dir``; ``start_step`` is the first step this
        process will log (a resumed run's steps from there on replace any logged before)."""

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


REPORTERS: dict[str, type[Reporter]] = {}


def register(cls: type[Reporter]) -> type[Reporter]:
    """Class decorator: make ``cls`` available as ``report_to: <cls.name>``."""
    if not cls.name or cls.name in (NONE, ALL) or cls.name in REPORTERS:
        raise ValueError(f"reporter name {cls.name!r} is empty, reserved or already registered")
    REPORTERS[cls.name] = cls
    return cls


def _run_name(run_dir: Path) -> str:
    """``ftw/seed_0`` for a compare run, else the folder's name."""
    parent = run_dir.parent.name
    return f"{parent}/{run_dir.name}" if run_dir.name.startswith("seed_") else run_dir.name


@register
class TensorBoardReporter(Reporter):
    """Event files in ``<run_dir>/tensorboard`` (``tensorboard --logdir <run or compare dir>``)."""

    name = "tensorboard"
    modules = ("tensorboard",)
    install = "pip install tensorboard"

    def __init__(self, run_dir: Path, config: dict[str, Any], start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard drops the events at and after it that earlier files hold,
        # so a resumed run's curve is not drawn twice
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step)

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


@register
class WandbReporter(Reporter):
    """A Weights & Biases run (project ``$WANDB_PROJECT`` or ``gradsift``; files under the run
    folder; ``WANDB_MODE=offline`` works without network)."""

    name = "wandb"
    modules = ("wandb",)
    install = "pip install wandb"

    def __init__(self, run_dir: Path, config: dict[str, Any], start_step: int = 0):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "gradsift"),
                              name=_run_name(run_dir), dir=str(run_dir), config=config,
                              reinit="create_new")

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


@register
class TrackioReporter(Reporter):
    """A trackio run (local-first; project ``$TRACKIO_PROJECT`` or ``gradsift``)."""

    name = "trackio"
    modules = ("trackio",)
    install = "pip install trackio"

    def __init__(self, run_dir: Path, config: dict[str, Any], start_step: int = 0):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", "gradsift"),
                                name=_run_name(run_dir), config=config)

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self.trackio.log(scalars, step=step)

    def close(self) -> None:
        self.trackio.finish()


def _installed(cls: type[Reporter]) -> bool:
    try:
        return all(importlib.util.find_spec(m) is not None for m in cls.modules)
    except (ImportError, ValueError):  # a module set to None in sys.modules, or a broken one
        return False


def normalize(value: str | Iterable[str] | None) -> list[str]:
    """``report_to`` as a sorted list of names: ``[]`` for none, ``["all"]`` kept as is.

    Raises:
        ReportToError: an unknown name, or ``none``/``all`` together with other names.
    """
    if value is None:
        return []
    names = [value] if isinstance(value, str) else list(value)
    names = [str(n).strip().lower() for n in names if str(n).strip()]
    known = (NONE, ALL, *REPORTERS)
    unknown = [n for n in names if n not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        raise ReportToError(f"config key {CONFIG_KEY!r}: unknown backend {unknown[0]!r}"
                            + (f" (did you mean {close[0]}?)" if close else "")
                            + f"; choose from {', '.join(known)}")
    special = sorted({n for n in names if n in (NONE, ALL)})
    if special and len(set(names)) > 1:
        raise ReportToError(f"config key {CONFIG_KEY!r}: {special[0]!r} cannot be combined "
                            f"with other backends, got {names}")
    if names in ([], [NONE]) or set(names) == {NONE}:
        return []
    return sorted(set(names))


def check_report_to(names: Iterable[str]) -> list[type[Reporter]]:
    """The reporter classes of ``names`` (``all``: those installed), checked to be importable.

    Raises:
        ReportToError: a backend's package is missing; one line with the pip command.
    """
    names = normalize(list(names))
    if names == [ALL]:
        return [cls for cls in REPORTERS.values() if _installed(cls)]
    classes = [REPORTERS[n] for n in names]
    for cls in classes:
        if not _installed(cls):
            raise ReportToError(f"config key {CONFIG_KEY!r}: {cls.name} needs the package "
                                f"{'/'.join(cls.modules)}: {cls.install} (or remove "
                                f"{cls.name} from {CONFIG_KEY})")
    return classes


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def scalars_of(name: str, record: dict[str, Any]) -> dict[str, float]:
    """The scalars a log record carries (see the table above); ``name`` is the log file."""
    from gradsift.runlog import METRICS, SELECTIONS

    if name == METRICS:
        pairs = (("train/loss", record.get("train_loss")),
                 ("train/learning_rate", record.get("lr")),
                 ("eval/target_loss", record.get("target_loss")))
    elif name == SELECTIONS:
        selected = record.get("selected_ids")
        pairs = (("train/n_selected", len(selected) if selected is not None else None),
                 ("train/rho", record.get("rho")))
    else:
        return {}
    return {tag: float(v) for tag, v in pairs if _finite(v)}


class Reporters:
    """The open trackers of one run: forwards each log record's scalars to every one."""

    def __init__(self, reporters: list[Reporter]):
        self.reporters = reporters

    def record(self, name: str, record: dict[str, Any]) -> None:
        scalars = scalars_of(name, record)
        if scalars and "step" in record:
            for reporter in self.reporters:
                reporter.log_scalars(int(record["step"]), scalars)

    def close(self) -> None:
        for reporter in self.reporters:
            reporter.close()


def open_reporters(names: Iterable[str], run_dir: str | Path, config: dict[str, Any],
                   start_step: int = 0) -> Reporters:
    """Open the backends of ``report_to`` for the run in ``run_dir`` (call on rank 0 only).

    Args:
        names: the ``report_to`` value.
        run_dir: the run folder.
        config: the resolved config, stored with the tracker's run.
        start_step: the first step this process logs (0 for a fresh run).
    """
    run_dir = Path(run_dir)
    opened = Reporters([])
    try:
        for cls in check_report_to(names):
            opened.reporters.append(cls(run_dir, config, start_step))
    except BaseException:
        opened.close()
        raise
    return opened
