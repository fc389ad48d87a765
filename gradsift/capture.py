"""Capture per-sample gradient factors with one forward and one backward pass.

For a linear-like layer ``y = W a + b`` applied at every token, the per-sample gradient is
``g_i(W) = D_iᵀ A_i`` with ``A_i`` (T, d_in) the layer inputs and ``D_i`` (T, d_out) the
gradients of ``ℓ_i`` w.r.t. its outputs. A forward hook keeps ``A`` and the output tensor;
``torch.autograd.grad`` w.r.t. the kept outputs returns every ``D`` at once, without
touching any parameter's ``.grad`` and without computing any weight gradient.

Layer kinds are handled through a registry, one small function per kind, looked up through
the class hierarchy (so subclasses of ``nn.Linear`` match), in the style of opacus'
grad samplers.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradsift.factors import FactorizedGrads, LayerFactors
from gradsift.loss import loss_positions, per_sample_loss


@dataclass(frozen=True)
class LayerSpec:
    """How a registered layer kind exposes its factors.

    Attributes:
        weight_transposed: the weight is stored as (d_in, d_out) (GPT-2 ``Conv1D``)
            instead of ``nn.Linear``'s (d_out, d_in).
    """

    weight_transposed: bool = False


# layer class -> function(module) -> LayerSpec
_LAYER_REGISTRY: dict[type, Callable[[nn.Module], LayerSpec]] = {}


def register_layer(*layer_types: type) -> Callable:
    """Decorator registering a function ``(module) -> LayerSpec`` for linear-like layer types."""

    def decorator(fn: Callable[[nn.Module], LayerSpec]) -> Callable[[nn.Module], LayerSpec]:
        for layer_type in layer_types:
            if layer_type in _LAYER_REGISTRY:
                raise ValueError(f"layer type {layer_type.__name__} is already registered")
            _LAYER_REGISTRY[layer_type] = fn
        return fn

    return decorator


def layer_spec(module: nn.Module) -> LayerSpec | None:
    """The registered spec for ``module``, found through its class MRO; ``None`` if unsupported."""
    for cls in type(module).__mro__:
        fn = _LAYER_REGISTRY.get(cls)
        if fn is not None:
            return fn(module)
    return None


@register_layer(nn.Linear)
def _linear_spec(module: nn.Module) -> LayerSpec:
    # nn.Linear: weight (d_out, d_in); peft's LoRA A/B factors are nn.Linear too.
    return LayerSpec(weight_transposed=False)


try:  # transformers' GPT-2 style Conv1D: y = x @ W + b with W (d_in, d_out)
    from transformers.pytorch_utils import Conv1D

    @register_layer(Conv1D)
    def _conv1d_spec(module: nn.Module) -> LayerSpec:
        return LayerSpec(weight_transposed=True)

except ImportError:  # pragma: no cover - transformers is a hard dependency
    pass


def _tied_parameter_ids(model: nn.Module) -> set[int]:
    """ids of parameters that appear under more than one name (e.g. a tied LM head)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {pid for pid, n in seen.items() if n > 1}


def resolve_modules(model: nn.Module, modules: Iterable[str] | None = None) -> list[str]:
    """Names of the linear-like modules whose per-sample gradients are captured.

    Default: every registered linear-like module whose weight is trainable, except an output
    head whose weight is tied to (shared with) the input embedding.

    Raises:
        ValueError: an unknown name (close matches listed), a module of an unsupported type,
            a module with no trainable weight, or a model with no eligible module at all.
    """
    named = dict(model.named_modules())
    if modules is None:
        tied = _tied_parameter_ids(model)
        chosen = [
            name
            for name, m in named.items()
            if layer_spec(m) is not None
            and isinstance(getattr(m, "weight", None), nn.Parameter)
            and m.weight.requires_grad
            and id(m.weight) not in tied
        ]
        if not chosen:
            raise ValueError(
                "no trainable linear-like module found in the model (supported types: "
                f"{', '.join(t.__name__ for t in _LAYER_REGISTRY)})"
            )
        return chosen

    chosen = list(dict.fromkeys(modules))
    unknown = [n for n in chosen if n not in named]
    if unknown:
        hints = []
        for n in unknown:
            close = difflib.get_close_matches(n, list(named), n=3, cutoff=0.5)
            hints.append(f"{n!r} (close matches: {close})" if close else repr(n))
        raise ValueError(f"unknown module name(s): {'; '.join(hints)}")
    unsupported = [
        f"{n} ({type(named[n]).__name__})" for n in chosen if layer_spec(named[n]) is None
    ]
    if unsupported:
        raise ValueError(
            "unsupported module type(s): "
            + ", ".join(unsupported)
            + f"; supported: {', '.join(t.__name__ for t in _LAYER_REGISTRY)}"
        )
    frozen = [n for n in chosen if not named[n].weight.requires_grad]
    if frozen:
        raise ValueError(f"module(s) with a frozen weight cannot be captured: {frozen}")
    return chosen


class _Recorder:
    """Forward hooks that keep each module's input and output; removed in ``finally``."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.model = model
        self.names = names
        self.inputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        self.outputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        self.enabled = True
        self._handles: list[Any] = []

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if not self.enabled or not torch.is_grad_enabled():
                return
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return
            self.inputs[name].append(args[0].detach())
            self.outputs[name].append(output)

        return hook

    @contextmanager
    def attached(self):
        if getattr(self.model, "_gradsift_hooked", False):
            raise RuntimeError("gradsift hooks are already attached to this model")
        modules = dict(self.model.named_modules())
        self.model._gradsift_hooked = True
        try:
            for n in self.names:
                self._handles.append(modules[n].register_forward_hook(self._hook(n)))
            yield self
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()
            self.enabled = False
            self.model._gradsift_hooked = False


def _param_name(module_name: str, attr: str) -> str:
    return f"{module_name}.{attr}" if module_name else attr


@dataclass
class Capture:
    """Factors of one candidate batch, plus the graph when it was retained.

    Attributes:
        grads: the per-sample factorized gradients.
        losses: (B,) per-sample losses, still attached to the graph when ``retain_graph``.
    """

    grads: FactorizedGrads
    losses: torch.Tensor


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False


def forward_losses(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(B,) per-sample losses of a causal LM on ``batch`` (no KV cache).

    When the model takes ``logits_to_keep`` (transformers' causal LMs do), the vocabulary
    projection runs only at positions that carry loss in some sample (``loss_positions``);
    the losses are the same, the prompt and padding positions just cost nothing there.
    """
    kwargs = {"input_ids": batch["input_ids"], "use_cache": False}
    if batch.get("attention_mask") is not None:
        kwargs["attention_mask"] = batch["attention_mask"]
    positions = loss_positions(batch["labels"])
    if 0 < positions.numel() < batch["labels"].shape[1] - 1 and _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = positions.to(batch["input_ids"].device)
    else:
        positions = None
    out = model(**kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return per_sample_loss(logits, batch["labels"], positions)


def capture(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    modules: Iterable[str] | None = None,
    route: str = "auto",
    retain_graph: bool = False,
) -> Capture:
    """One forward and one backward over ``batch``; returns per-sample factors and losses.

    ``D`` is obtained as ``autograd.grad(Σ_i ℓ_i, outputs)``: samples do not interact, so the
    gradient of the sum w.r.t. sample i's outputs is exactly ``∂ℓ_i/∂y_i``. No ``.grad`` is
    touched. With ``retain_graph`` the graph is kept so that the caller can backpropagate a
    weighted loss into parameters that are not captured (embeddings, norms).
    """
    names = resolve_modules(model, modules)
    module_map = dict(model.named_modules())
    recorder = _Recorder(model, names)
    with recorder.attached():
        losses = forward_losses(model, batch)
    batch_size = losses.shape[0]

    keys = [(n, i) for n in names for i in range(len(recorder.outputs[n]))]
    outputs = [recorder.outputs[n][i] for n, i in keys]
    if not outputs:
        raise RuntimeError(f"none of the modules {names[:5]}... ran in the forward pass")
    out_grads = torch.autograd.grad(
        losses.sum(), outputs, allow_unused=True, retain_graph=retain_graph
    )
    grads_by_name: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for (n, _), out, g in zip(keys, outputs, out_grads, strict=True):
        grads_by_name[n].append(torch.zeros_like(out) if g is None else g)
    del outputs, out_grads

    layers = []
    for n in names:
        module = module_map[n]
        spec = layer_spec(module)
        a = _tokens_first(recorder.inputs[n], batch_size, n)
        d = _tokens_first(grads_by_name[n], batch_size, n)
        bias = getattr(module, "bias", None)
        has_bias = isinstance(bias, nn.Parameter) and bias.requires_grad
        layers.append(
            LayerFactors(
                module_name=n,
                weight_name=_param_name(n, "weight"),
                bias_name=_param_name(n, "bias") if has_bias else None,
                inputs=a,
                output_grads=d,
                weight_transposed=spec.weight_transposed,
            )
        )
    return Capture(
        grads=FactorizedGrads(layers, losses.detach().float(), route=route), losses=losses
    )


def _tokens_first(parts: list[torch.Tensor], batch_size: int, name: str) -> torch.Tensor:
    """Stack one module's calls as (B, T_total, d): every extra dim is folded into tokens."""
    flat = []
    for t in parts:
        if t.dim() < 2 or t.shape[0] != batch_size:
            raise ValueError(
                f"module {name!r}: expected a leading batch dimension of {batch_size}, "
                f"got a tensor of shape {tuple(t.shape)}"
            )
        flat.append(t.reshape(batch_size, -1, t.shape[-1]).detach())
    return flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)


def per_sample_grads(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    modules: Iterable[str] | None = None,
    route: str = "auto",
) -> FactorizedGrads:
    """Factorized per-sample gradients of every captured linear-like layer.

    ``g_i(W) = D_iᵀ A_i`` and ``g_i(b) = Σ_t D_i[t]`` of the per-sample loss
    ``ℓ_i = mean_t CE`` over sample i's labelled positions (HF causal-LM convention:
    ``-100`` means no loss, labels shifted inside). A sample without labelled positions
    has ``ℓ_i = 0`` and a zero gradient.

    Args:
        model: a causal LM returning ``logits`` (transformers or peft model).
        batch: ``input_ids`` (B, T), optional ``attention_mask`` (B, T), ``labels`` (B, T).
        modules: names as in ``model.named_modules()``. Default: every ``nn.Linear`` or
            transformers ``Conv1D`` whose weight is trainable — so for a peft LoRA model just
            the LoRA factors — leaving out an output head tied to the input embedding.
        route: ``"ghost"``, ``"materialize"`` or ``"auto"`` (per layer, by cost model; see
            ``FactorizedGrads``).

    Returns:
        ``FactorizedGrads``. Parameters' ``.grad`` are left as they were and no hook remains.
    """
    return capture(model, batch, modules=modules, route=route).grads
