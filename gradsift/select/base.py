"""One interface and one budget for every selection method, and the registry that names them.

A method is a small config dataclass (validated in ``__post_init__``), a ``Selector``
subclass implementing ``_select``, and one ``register_selector`` call (peft-style: a name is
registered once). ``Selector.select`` wraps ``_select`` with the checks and diagnostics every
method shares: the budget, the time taken, ``n_selected`` and a note when fewer than ``k``
were selected.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from gradsift.factors import FactorizedGrads
from gradsift.optim_state import OptimizerState


@dataclass
class SelectionContext:
    """Everything a selector may look at for one step.

    Attributes:
        candidates: factorized per-sample gradients of the ``B`` candidates;
            ``candidates.losses`` are the per-sample losses.
        target_grad: ``g_V``, the mean gradient of a target batch over
            ``candidates.param_names`` (None when the selector does not need it).
        optimizer_state: ``P``, ``m``, ``β₁``, ``η`` for ``candidates.param_names``.
        k: the budget (at most ``k`` candidates).
        generator: the only source of randomness a selector may use.
        target_samples: the per-example factors of the target batch behind ``target_grad``
            (given when ``selector.needs_target_samples``): ``⟨g_i, P g_t⟩`` per target
            example ``t`` measures how noisy each alignment ``b_i`` is.
        max_grad_norm: the clipping the weighted gradient will get before the optimizer
            step (None: none), for selectors that model the step exactly.
    """

    candidates: FactorizedGrads
    target_grad: dict[str, torch.Tensor] | None
    optimizer_state: OptimizerState
    k: int
    generator: torch.Generator
    target_samples: FactorizedGrads | None = None
    max_grad_norm: float | None = None


@dataclass
class Selection:
    """A selector's choice for one step.

    Attributes:
        indices: (n,) int64 distinct candidate indices, ``n ≤ k`` (may be empty), on the CPU.
        weights: (n,) float32, positive, summing to 1 (empty when nothing is selected).
        scores: (B,) float32 per-candidate score the method ranked by.
        diagnostics: JSON-serializable; at least ``rho`` (float or None), ``n_filtered``,
            ``n_selected``, ``seconds`` and, when fewer than ``k`` were selected, ``note``.
    """

    indices: torch.Tensor
    weights: torch.Tensor
    scores: torch.Tensor
    diagnostics: dict[str, Any] = field(default_factory=dict)


@dataclass
class SelectorConfig:
    """Base of every selector's options (none in common)."""


NEEDS = ("indices", "losses", "grads")
"""What a selector reads of the candidates, cheapest first: only their number (``indices``),
their losses (``losses``: a no-grad forward over the B), or their per-sample gradients."""


class Selector:
    """Base class: subclasses set the class attributes and implement ``_select``.

    Attributes:
        name: the registered name.
        needs: what the method reads of the candidates (``NEEDS``). The step pays only for
            that: ``indices`` selects before any pass over the B, ``losses`` after a no-grad
            forward; both then train on the chosen k with one forward+backward over the k.
            With ``indices`` the losses of the unchosen candidates are NaN (not computed).
        needs_target: ``ctx.target_grad`` must be given.
        needs_grads: ``needs == "grads"`` (kept in step with ``needs`` for every subclass).
        config_class: the options dataclass.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[str] = "grads"
    needs_target: ClassVar[bool] = False
    needs_grads: ClassVar[bool] = True
    config_class: ClassVar[type[SelectorConfig]] = SelectorConfig

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "needs" not in vars(cls) and vars(cls).get("needs_grads") is False:
            cls.needs = "losses"  # a subclass written before ``needs``: losses are safe
        if cls.needs not in NEEDS:
            raise ValueError(f"{cls.__name__}.needs must be one of {NEEDS}, got {cls.needs!r}")
        if cls.needs_target and cls.needs != "grads":
            raise ValueError(f"{cls.__name__}: needs_target requires needs = 'grads'")
        cls.needs_grads = cls.needs == "grads"

    @property
    def needs_target_samples(self) -> bool:
        """The per-example target factors (``ctx.target_samples``) are read, not only ``g_V``."""
        return False

    def __init__(self, config: SelectorConfig | None = None):
        self.config = self.config_class() if config is None else config
        if not isinstance(self.config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} takes a {self.config_class.__name__}, "
                f"got {type(self.config).__name__}"
            )

    def select(self, ctx: SelectionContext) -> Selection:
        """Select at most ``ctx.k`` candidates and their weights."""
        if ctx.k < 0:
            raise ValueError(f"budget k must be >= 0, got {ctx.k}")
        if self.needs_target and ctx.target_grad is None:
            raise ValueError(f"selector {self.name!r} needs ctx.target_grad (g_V)")
        t0 = time.perf_counter()
        sel = self._select(ctx)
        n = int(sel.indices.numel())
        diag = sel.diagnostics
        diag.setdefault("rho", None)
        diag.setdefault("n_filtered", len(ctx.candidates))
        diag["n_selected"] = n
        diag["seconds"] = time.perf_counter() - t0
        if n < ctx.k and "note" not in diag:
            b = len(ctx.candidates)
            diag["note"] = (
                f"only {b} candidates for a budget of {ctx.k}"
                if n == b
                else f"selected {n} of budget {ctx.k}"
            )
        sel.indices = sel.indices.to("cpu", torch.long)
        sel.weights = sel.weights.to("cpu", torch.float32)
        sel.scores = sel.scores.detach().to("cpu", torch.float32)
        return sel

    def _select(self, ctx: SelectionContext) -> Selection:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """State needed to resume exactly (``{}``: built-in selectors are stateless)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``; stateless selectors accept only ``{}``."""
        if state:
            raise ValueError(
                f"selector {self.name!r} is stateless; unexpected state {sorted(state)}"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, config={self.config})"


@dataclass(frozen=True)
class _Entry:
    selector_class: type[Selector]
    fixed: dict[str, Any]


_REGISTRY: dict[str, _Entry] = {}


def register_selector(name: str, selector_class: type[Selector], **fixed: Any) -> None:
    """Register ``selector_class`` under ``name``; ``fixed`` options are set for this name.

    Raises:
        ValueError: ``name`` is already registered, or a fixed option is not a field of the
            selector's config.
    """
    if name in _REGISTRY:
        raise ValueError(f"a selector named {name!r} is already registered")
    fields = {f.name for f in dataclasses.fields(selector_class.config_class)}
    unknown = sorted(set(fixed) - fields)
    if unknown:
        raise ValueError(
            f"fixed option(s) {unknown} are not fields of {selector_class.config_class.__name__}"
        )
    _REGISTRY[name] = _Entry(selector_class, dict(fixed))


def available_selectors() -> list[str]:
    """Registered selector names, sorted."""
    return sorted(_REGISTRY)


def get_selector(name: str, **options: Any) -> Selector:
    """A new selector ``name`` configured with ``options``.

    Raises:
        ValueError: unknown name (known names listed), an unknown option (named, with the
            valid ones), an option that the name fixes, or an invalid value (from the config).
    """
    entry = _REGISTRY.get(name)
    if entry is None:
        raise ValueError(
            f"unknown selector {name!r}; available: {', '.join(available_selectors())}"
        )
    config_class = entry.selector_class.config_class
    fields = [f.name for f in dataclasses.fields(config_class)]
    free = [f for f in fields if f not in entry.fixed]
    unknown = [o for o in options if o not in fields]
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for selector {name!r}; valid options: {free or 'none'}"
        )
    clash = [o for o in options if o in entry.fixed]
    if clash:
        raise ValueError(f"option(s) {clash} are fixed by selector {name!r}: {entry.fixed}")
    selector = entry.selector_class(config_class(**options, **entry.fixed))
    selector.name = name  # instance attribute: the registered name (variants share a class)
    return selector
