"""The optimizer's geometry: Adam's preconditioner and momentum, read from a torch optimizer.

With the denominator frozen at its current value, AdamW's next update is (DESIGN.md §3)

    Δ ≈ −c · P (β₁ m + (1−β₁) g) − ηλθ,   P = 1 / (√v̂ + ε),   v̂ = v / (1 − β₂ᵗ)

so ``P`` (elementwise, one tensor per parameter), ``m``, ``β₁`` and ``η`` are what the
selection objective needs. Supported:

* ``torch.optim.Adam`` / ``AdamW`` (plain, ``foreach`` or ``fused``; ``amsgrad`` uses
  ``max_exp_avg_sq``), each parameter with its own group's ``eps`` and ``betas``;
* ``torch.optim.SGD``: ``P = 1`` (SGD geometry), no Adam-style momentum;
* transformers' ``Adafactor``: its own rank-1 factored second moment
  ``P = rsqrt(r/mean(r)) rsqrt(c)`` (exactly the preconditioner Adafactor applies, before its
  RMS update clipping); its momentum acts on the preconditioned update, so it is not exposed.

A parameter without optimizer state yet (before its first step) gets ``P = 1``; it is
logged and listed in ``OptimizerState.uninitialized``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


@dataclass
class OptimizerState:
    """What the selection objective reads from the optimizer, per parameter name.

    Attributes:
        preconditioner: ``P`` for each requested parameter (float32, the parameter's shape).
        momentum: ``m`` (Adam's ``exp_avg``) per parameter, zeros where the optimizer has no
            state yet; ``None`` for optimizers without Adam-style momentum (SGD, Adafactor).
        beta1: ``β₁`` per parameter (0 where there is no momentum).
        lr: the learning rate ``η`` of each parameter's group.
        uninitialized: parameters for which ``P`` fell back to ones (no state yet).
        optimizer: class name of the optimizer the state was read from.
        moments: Adam's second moments per parameter (None for other optimizers).
    """

    preconditioner: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor] | None
    beta1: dict[str, float]
    lr: dict[str, float]
    uninitialized: list[str] = field(default_factory=list)
    optimizer: str = ""
    moments: dict[str, AdamMoments] | None = None

    def mean_lr(self, names: Iterable[str] | None = None) -> float:
        """Mean learning rate over ``names`` (default: every parameter)."""
        values = [self.lr[n] for n in (self.lr if names is None else names)]
        return sum(values) / len(values) if values else 0.0


@dataclass(frozen=True)
class AdamMoments:
    """What Adam's *next* step needs beyond ``m``: the second moment and its constants.

    The next update for a gradient ``g`` is ``−η m̂'/(√v̂' + ε)`` with
    ``v' = β₂ v + (1−β₂) g²`` (``max(v_max, v')`` with amsgrad), ``v̂' = v'/(1 − β₂^(t+1))``.

    Attributes:
        exp_avg_sq: ``v`` (zeros before the first step), float32.
        max_exp_avg_sq: amsgrad's running maximum of ``v`` (None without amsgrad).
        beta2: ``β₂``.
        step: ``t``, the steps taken so far.
        eps: ``ε``.
    """

    exp_avg_sq: torch.Tensor
    max_exp_avg_sq: torch.Tensor | None
    beta2: float
    step: int
    eps: float

    def next_v_hat(self, g: torch.Tensor) -> torch.Tensor:
        """``v̂'`` of the next step taken on gradient(s) ``g`` (the parameter's shape, or a
        batch of them in front), in ``g``'s dtype."""
        # β₂ v + ((1−β₂) g) g, rounded as written, in place where the result is new
        v = torch.mul(g, 1.0 - self.beta2).mul_(g).add_(self.beta2 * self.exp_avg_sq.to(g.dtype))
        if self.max_exp_avg_sq is not None:
            torch.maximum(self.max_exp_avg_sq.to(g.dtype), v, out=v)
        return v.div_(1.0 - self.beta2 ** (self.step + 1))

    def next_denominator(self, g: torch.Tensor) -> torch.Tensor:
        """``√v̂' + ε`` of the next step taken on gradient(s) ``g``: ``1/`` it is that step's
        ``P``."""
        return self.next_v_hat(g).sqrt() + self.eps


def next_step_preconditioner(
    moments: dict[str, AdamMoments], stand_in: dict[str, torch.Tensor], names: Iterable[str]
) -> tuple[dict[str, torch.Tensor], int]:
    """``P' = 1/(√v̂' + ε)`` of Adam's next step with ``stand_in`` as its gradient, and the
    number of *fresh* coordinates, where ``v̂' = 0``.

    A fresh coordinate has had no gradient yet and gets none from the stand-in either: an
    untied embedding row of a token neither the run nor the target batch has used, an expert
    no token was routed to. ``1/ε`` there would weigh a candidate's gradient on it by ``10⁸``.
    A gradient that does reach it gets a sign step, whose size does not depend on that
    gradient, so its scale is taken from the coordinates Adam knows: the mean ``v̂'`` of the
    tensor's other coordinates, or, in a tensor fresh throughout, of every tensor's.
    """
    v_hat = {n: moments[n].next_v_hat(stand_in[n].float()) for n in names}
    fresh = {n: v.numel() - int(torch.count_nonzero(v)) for n, v in v_hat.items()}
    n_fresh = sum(fresh.values())
    if n_fresh:
        # per tensor the sum of v̂' over its known coordinates (fresh ones add 0)
        sums = {n: float(v.sum()) for n, v in v_hat.items()}
        known = sum(v.numel() for v in v_hat.values()) - n_fresh
        overall = sum(sums.values()) / known if known else 0.0
        for n, v in v_hat.items():
            if fresh[n]:
                own = v.numel() - fresh[n]
                v_hat[n] = torch.where(v == 0, sums[n] / own if own else overall, v)
    # in place: each v̂' is this call's own tensor (a whole-model P' is ~4 bytes a parameter,
    # and every temporary of that size costs a pass and page faults)
    return {n: v.sqrt_().add_(moments[n].eps).reciprocal_() for n, v in v_hat.items()}, n_fresh


@dataclass(frozen=True)
class ParamGeometry:
    """What one parameter's optimizer state gives: ``P`` (None before its first step),
    ``m`` (None for optimizers without Adam-style momentum), ``β₁``, ``η`` and, for Adam, the
    second moment that its next step will update."""

    preconditioner: torch.Tensor | None
    momentum: torch.Tensor | None
    beta1: float
    lr: float
    moments: AdamMoments | None = None


Reader = Callable[[torch.Tensor, dict, dict], ParamGeometry]


@dataclass(frozen=True)
class _OptimizerKind:
    name: str
    matches: Callable[[torch.optim.Optimizer], bool]
    read: Reader
    has_momentum: bool


_OPTIMIZERS: list[_OptimizerKind] = []


def register_optimizer(name: str, matches: type | Callable[[torch.optim.Optimizer], bool],
                       has_momentum: bool = False) -> Callable[[Reader], Reader]:
    """Register ``read(param, group, state) -> ParamGeometry`` for optimizers that ``matches``
    (a class, looked up with ``isinstance``, or a predicate); the first match wins. Its
    preconditioner must be >= 0 elementwise (a diagonal metric); a negative entry is refused."""
    test = (lambda o: isinstance(o, matches)) if isinstance(matches, type) else matches

    def decorator(read: Reader) -> Reader:
        if any(k.name == name for k in _OPTIMIZERS):
            raise ValueError(f"an optimizer kind named {name!r} is already registered")
        _OPTIMIZERS.append(_OptimizerKind(name, test, read, has_momentum))
        return read

    return decorator


def _kind(optimizer: torch.optim.Optimizer) -> _OptimizerKind:
    for kind in _OPTIMIZERS:
        if kind.matches(optimizer):
            return kind
    raise NotImplementedError(
        f"gradsift cannot read the preconditioner of {type(optimizer).__name__}; supported: "
        f"{', '.join(k.name for k in _OPTIMIZERS)} (gradsift.optim_state.register_optimizer "
        "adds one)")


def _is_adafactor(optimizer: torch.optim.Optimizer) -> bool:
    try:
        from transformers.optimization import Adafactor
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        return False
    return isinstance(optimizer, Adafactor)


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer``."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _names_by_id(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def _as_float(x: float | torch.Tensor) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def _adam_p(group: dict, state: dict) -> torch.Tensor | None:
    """``1/(√(v/(1−β₂ᵗ)) + ε)`` or None when the parameter has no state yet."""
    key = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"
    if key not in state or "step" not in state:
        return None
    step = _as_float(state["step"])
    if step <= 0:
        return None
    beta2 = _as_float(group["betas"][1])
    eps = _as_float(group["eps"])
    v_hat = state[key].float() / (1.0 - beta2**step)
    return 1.0 / (v_hat.sqrt() + eps)


def _adafactor_p(state: dict) -> torch.Tensor | None:
    """Adafactor's ``rsqrt(v̂)``: rank-1 ``rsqrt(r/mean r) rsqrt(c)`` for matrices."""
    tiny = torch.finfo(torch.float32).tiny
    if "exp_avg_sq_row" in state:
        row = state["exp_avg_sq_row"].float()
        col = state["exp_avg_sq_col"].float()
        r = (row / row.mean(dim=-1, keepdim=True).clamp(min=tiny)).clamp(min=tiny).rsqrt()
        return r.unsqueeze(-1) * col.clamp(min=tiny).rsqrt().unsqueeze(-2)
    if "exp_avg_sq" in state:
        return state["exp_avg_sq"].float().clamp(min=tiny).rsqrt()
    return None


def _adafactor_lr(group: dict, state: dict, param: torch.Tensor) -> float:
    """The step size Adafactor will use at its next step (relative step and parameter scale)."""
    step = _as_float(state.get("step", 0)) + 1
    lr = group["lr"]
    if group["relative_step"]:
        min_step = 1e-6 * step if group["warmup_init"] else 1e-2
        lr = min(min_step, 1.0 / math.sqrt(step))
    if group["scale_parameter"]:
        rms = float(param.detach().float().norm() / math.sqrt(max(1, param.numel())))
        lr = lr * max(group["eps"][1], rms)
    return float(lr)


@register_optimizer("torch.optim.Adam/AdamW",
                    lambda o: isinstance(o, torch.optim.Adam | torch.optim.AdamW),
                    has_momentum=True)
def _read_adam(p: torch.Tensor, group: dict, state: dict) -> ParamGeometry:
    m = state.get("exp_avg")
    v = state.get("exp_avg_sq")
    v_max = state.get("max_exp_avg_sq") if group.get("amsgrad", False) else None
    def read(x: torch.Tensor | None) -> torch.Tensor:  # zeros only before the first step
        return x.detach().float() if x is not None else torch.zeros_like(p, dtype=torch.float32)

    moments = AdamMoments(
        read(v), read(v_max) if group.get("amsgrad", False) else None,
        _as_float(group["betas"][1]), int(_as_float(state.get("step", 0))),
        _as_float(group["eps"]))
    return ParamGeometry(_adam_p(group, state), read(m),
                         _as_float(group["betas"][0]), _as_float(group["lr"]), moments)


@register_optimizer("torch.optim.SGD", torch.optim.SGD)
def _read_sgd(p: torch.Tensor, group: dict, state: dict) -> ParamGeometry:
    """SGD geometry, never "uninitialized"."""
    return ParamGeometry(torch.ones_like(p, dtype=torch.float32), None, 0.0,
                         _as_float(group["lr"]))


@register_optimizer("transformers Adafactor", _is_adafactor)
def _read_adafactor(p: torch.Tensor, group: dict, state: dict) -> ParamGeometry:
    return ParamGeometry(_adafactor_p(state), None, 0.0, _adafactor_lr(group, state, p))


_BUILT_IN = frozenset(k.name for k in _OPTIMIZERS)  # their P > 0 by construction


def read_optimizer_state(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    param_names: list[str] | None = None,
) -> OptimizerState:
    """Read ``P``, ``m``, ``β₁`` and ``η`` for the named parameters.

    ``P = 1/(√v̂ + ε)`` with ``v̂ = exp_avg_sq / (1 − β₂^step)`` and each group's own ``eps``
    and ``betas``; ones for parameters without state yet (and for SGD).

    Args:
        optimizer: the torch optimizer that trains ``model``.
        model: the model; names are those of ``model.named_parameters()`` (tied parameters
            answer to each of their names).
        param_names: parameters to read (default: every named parameter the optimizer holds).

    Returns:
        ``OptimizerState`` with float32 tensors on each parameter's device.

    Raises:
        NotImplementedError: an optimizer other than Adam, AdamW, SGD or Adafactor.
        KeyError: a requested name that is not a parameter of ``model``.
        ValueError: a requested parameter that the optimizer does not hold.
    """
    optimizer = _unwrap(optimizer)
    kind = _kind(optimizer)
    names_by_id = _names_by_id(model)
    found: dict[str, tuple[torch.Tensor, dict]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name in names_by_id.get(id(p), []):
                found[name] = (p, group)

    if param_names is None:
        wanted = list(found)
    else:
        wanted = list(dict.fromkeys(param_names))
        all_names = {n for names in names_by_id.values() for n in names}
        unknown = [n for n in wanted if n not in all_names]
        if unknown:
            raise KeyError(f"not parameters of the model: {unknown[:5]}")
        missing = [n for n in wanted if n not in found]
        if missing:
            raise ValueError(
                f"the optimizer ({type(optimizer).__name__}) does not hold parameter(s) "
                f"{missing[:5]}{' ...' if len(missing) > 5 else ''}"
            )

    precond: dict[str, torch.Tensor] = {}
    momentum: dict[str, torch.Tensor] | None = {} if kind.has_momentum else None
    beta1: dict[str, float] = {}
    lr: dict[str, float] = {}
    uninitialized: list[str] = []
    moments: dict[str, AdamMoments] = {}
    for name in wanted:
        p, group = found[name]
        geo = kind.read(p, group, optimizer.state.get(p, {}))
        beta1[name], lr[name] = geo.beta1, geo.lr
        if geo.moments is not None:
            moments[name] = geo.moments
        if momentum is not None and geo.momentum is not None:
            momentum[name] = geo.momentum
        pc = geo.preconditioner
        if pc is None:
            uninitialized.append(name)
            pc = torch.ones_like(p, dtype=torch.float32)
        elif kind.name not in _BUILT_IN and not bool((pc >= 0).all()):
            raise ValueError(f"the reader registered as {kind.name!r} returned a preconditioner "
                             f"with negative entries for {name!r}: P must be >= 0 elementwise")
        precond[name] = pc.detach().to(p.device)

    if uninitialized:
        logger.info(
            "%d parameter(s) have no %s state yet; using P = 1 (SGD geometry) for them: %s",
            len(uninitialized),
            type(optimizer).__name__,
            uninitialized[:5],
        )
    return OptimizerState(
        preconditioner=precond,
        momentum=momentum,
        beta1=beta1,
        lr=lr,
        uninitialized=uninitialized,
        optimizer=type(optimizer).__name__,
        moments=moments if len(moments) == len(wanted) else None,
    )


def adam_preconditioner(
    optimizer: torch.optim.Optimizer, model: nn.Module
) -> dict[str, torch.Tensor]:
    """``P = 1/(√v̂ + ε)`` for every parameter the optimizer holds, keyed by parameter name.

    Ones for parameters without state yet (reported through the log) and for SGD; Adafactor's
    rank-1 factored ``rsqrt(v̂)``. See ``read_optimizer_state`` for the details.

    Raises:
        NotImplementedError: any other optimizer class (named in the message).
    """
    return read_optimizer_state(optimizer, model).preconditioner
