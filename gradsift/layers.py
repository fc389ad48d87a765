"""The layer registry: which module kinds gradsift captures, and which modules of a model.

One small function per kind, registered for a class and looked up through the MRO (so
subclasses of ``nn.Linear`` match), in the style of opacus' grad samplers:

* ``nn.Linear`` and transformers' ``Conv1D``: ``g_i = D_iᵀ A_i``;
* ``nn.Embedding``: ``g_i = Σ_t e_{x_it} δ_itᵀ`` (sparse rows);
* ``nn.LayerNorm``, ``nn.RMSNorm``, transformers' ``LlamaRMSNorm``: ``g_i(w) = Σ_t δ_it ⊙ x̂_it``,
  ``g_i(b) = Σ_t δ_it``.

Other RMSNorm classes (the copies of Llama's in Qwen2, Mistral, ..., Gemma's ``(1 + w)``
form) are recognized by duck typing, their form checked once on a probe.
"""

from __future__ import annotations

import difflib
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LayerSpec:
    """How a registered layer kind exposes its factors.

    Attributes:
        kind: ``"linear"`` (``g = Dᵀ A``), ``"embedding"`` (``g = Σ_t e_{x_t} δ_tᵀ``) or
            ``"norm"`` (``g(w) = Σ_t δ_t ⊙ x̂_t``, ``g(b) = Σ_t δ_t``).
        weight_transposed: a linear weight stored as (d_in, d_out) (GPT-2 ``Conv1D``)
            instead of ``nn.Linear``'s (d_out, d_in).
        normalize: for a norm, the input ``x`` → ``x̂``, the normalized input before scaling.
    """

    kind: str = "linear"
    weight_transposed: bool = False
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None


# layer class -> function(module) -> LayerSpec (None: this instance cannot be captured)
_LAYER_REGISTRY: dict[type, Callable[[nn.Module], LayerSpec | None]] = {}
# functions(module) -> LayerSpec | None, tried in order for classes not in the registry
_LAYER_MATCHERS: list[Callable[[nn.Module], LayerSpec | None]] = []


def register_layer(*layer_types: type) -> Callable:
    """Decorator registering a function ``(module) -> LayerSpec | None`` for layer types."""

    def decorator(fn: Callable[[nn.Module], LayerSpec | None]) -> Callable:
        for layer_type in layer_types:
            if layer_type in _LAYER_REGISTRY:
                raise ValueError(f"layer type {layer_type.__name__} is already registered")
            _LAYER_REGISTRY[layer_type] = fn
        return fn

    return decorator


def register_layer_matcher(fn: Callable[[nn.Module], LayerSpec | None]) -> Callable:
    """Decorator registering a duck-typed ``(module) -> LayerSpec | None`` for any other class."""
    _LAYER_MATCHERS.append(fn)
    return fn


def layer_spec(module: nn.Module) -> LayerSpec | None:
    """The spec for ``module``: registered through its class MRO, else a matcher's; ``None`` if
    unsupported."""
    for cls in type(module).__mro__:
        fn = _LAYER_REGISTRY.get(cls)
        if fn is not None:
            return fn(module)
    for fn in _LAYER_MATCHERS:
        spec = fn(module)
        if spec is not None:
            return spec
    return None


def _supported_kinds() -> str:
    return ", ".join([t.__name__ for t in _LAYER_REGISTRY] + ["modules of the RMSNorm form"])


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


@register_layer(nn.Embedding)
def _embedding_spec(module: nn.Module) -> LayerSpec | None:
    # scale_grad_by_freq divides each row's gradient by its count in the whole batch, so a
    # sample's gradient depends on the other samples: no per-sample form to capture.
    return None if module.scale_grad_by_freq else LayerSpec(kind="embedding")


@register_layer(nn.LayerNorm)
def _layer_norm_spec(module: nn.Module) -> LayerSpec:
    shape, eps = tuple(module.normalized_shape), module.eps
    return LayerSpec(kind="norm", normalize=lambda x: F.layer_norm(x.float(), shape, eps=eps))


@register_layer(nn.RMSNorm)
def _rms_norm_spec(module: nn.Module) -> LayerSpec:
    shape = tuple(module.normalized_shape)

    def normalize(x: torch.Tensor) -> torch.Tensor:
        eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
        return F.rms_norm(x.float(), shape, eps=eps)

    return LayerSpec(kind="norm", normalize=normalize)


def _rms(x: torch.Tensor, eps: float, keep_float: bool = False) -> torch.Tensor:
    """``x̂ = x / sqrt(mean(x²) + eps)`` in float32, cast back to x's dtype as Llama does."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return h if keep_float else h.to(x.dtype)


try:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    @register_layer(LlamaRMSNorm)
    def _llama_rms_norm_spec(module: nn.Module) -> LayerSpec:
        # y = w ⊙ x̂.to(input dtype)
        return LayerSpec(kind="norm", normalize=partial(_rms, eps=module.variance_epsilon))

except ImportError:  # pragma: no cover - transformers is a hard dependency
    pass


# module -> offset c of its form y = (c + w) ⊙ x̂, or None; probed once per module
_RMS_FORM: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _rms_form_offset(module: nn.Module, eps: float) -> float | None:
    """``c`` when ``module(x) = (c + w) ⊙ rms(x)`` with c ∈ {0, 1} on a random probe (random
    weight too), else None. Llama's copies have c = 0, Gemma's c = 1."""
    if module not in _RMS_FORM:
        w = module.weight
        offset = None
        if w.device.type != "meta":
            gen = torch.Generator().manual_seed(0)
            x = (3 * torch.randn(2, 3, w.shape[0], generator=gen)).to(w.device, w.dtype)
            probe = (torch.rand(w.shape[0], generator=gen) + 0.5).to(w.device, w.dtype)
            with torch.no_grad():
                y = torch.func.functional_call(module, {"weight": probe}, (x,))
            tol = 1e-4 if w.dtype == torch.float32 else 3e-2
            for c in (0.0, 1.0):
                ref = (probe.float() + c) * _rms(x, eps, keep_float=True)
                if y.shape == ref.shape and torch.allclose(y.float(), ref, rtol=tol, atol=tol):
                    offset = c
                    break
        _RMS_FORM[module] = offset
    return _RMS_FORM[module]


@register_layer_matcher
def _rms_norm_by_form(module: nn.Module) -> LayerSpec | None:
    """Any other RMSNorm class (Qwen2RMSNorm, MistralRMSNorm, GemmaRMSNorm, T5LayerNorm, ...):
    a 1-D ``weight`` as its only parameter, a float ``variance_epsilon`` or ``eps``, and the
    form ``(c + w) ⊙ x̂`` verified on a probe. ``∂y/∂w = x̂`` either way."""
    if "RMSNorm" not in type(module).__name__ and not hasattr(module, "variance_epsilon"):
        return None
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    weight = getattr(module, "weight", None)
    if not isinstance(eps, float) or not isinstance(weight, nn.Parameter) or weight.dim() != 1:
        return None
    if [n for n, _ in module.named_parameters()] != ["weight"]:
        return None
    offset = _rms_form_offset(module, eps)
    if offset is None:
        return None
    # Llama's form casts x̂ to the input dtype before scaling; Gemma's scales in float32.
    return LayerSpec(kind="norm", normalize=partial(_rms, eps=eps, keep_float=offset != 0))


def _parameter_owners(model: nn.Module) -> dict[int, list[str]]:
    """id of each parameter → the modules that hold it (two for a tied embedding and head)."""
    owners: dict[int, list[str]] = {}
    for name, m in model.named_modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    return owners


def _trainable_weight(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, nn.Parameter) and weight.requires_grad


def resolve_modules(model: nn.Module, modules: Iterable[str] | None = None) -> list[str]:
    """Names of the modules whose per-sample gradients are captured.

    Default: every module of a registered kind (linear, Conv1D, embedding, LayerNorm,
    RMSNorm) whose weight is trainable — so for a peft LoRA model just the LoRA factors, and
    for full fine-tuning every trainable parameter. A weight shared by several modules (a
    tied embedding and output head) is captured through all of them or, when one of them
    cannot be captured, through none.

    Raises:
        ValueError: an unknown name (close matches listed), a module of an unsupported type,
            a module with no trainable weight, a shared weight named through only some of its
            modules, or a model with no eligible module at all.
    """
    named = dict(model.named_modules())
    owners = _parameter_owners(model)
    if modules is None:
        chosen = [n for n, m in named.items() if layer_spec(m) is not None
                  and _trainable_weight(m)]
        chosen_set = set(chosen)
        chosen = [n for n in chosen if set(owners[id(named[n].weight)]) <= chosen_set]
        if not chosen:
            raise ValueError(
                f"no trainable module of a supported kind found in the model ({_supported_kinds()})"
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
            "unsupported module type(s): " + ", ".join(unsupported)
            + f"; supported: {_supported_kinds()}"
        )
    frozen = [n for n in chosen if not _trainable_weight(named[n])]
    if frozen:
        raise ValueError(f"module(s) without a trainable weight cannot be captured: {frozen}")
    for n in chosen:
        missing = [o for o in owners[id(named[n].weight)] if o not in chosen]
        if missing:
            raise ValueError(
                f"the weight of {n!r} is shared with {missing}: its gradient is the sum over "
                "every module that uses it, so name all of them or none"
            )
    return chosen
