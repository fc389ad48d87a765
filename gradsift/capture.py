"""Capture per-sample gradient factors with one forward and one backward pass.

For a linear-like layer ``y = W a + b`` applied at every token, the per-sample gradient is
``g_i(W) = D_iᵀ A_i`` with ``A_i`` (T, d_in) the layer inputs and ``D_i`` (T, d_out) the
gradients of ``ℓ_i`` w.r.t. its outputs. A forward hook keeps each captured module's input
and output tensor; ``torch.autograd.grad`` w.r.t. the kept outputs returns every ``D`` at
once, without touching any parameter's ``.grad`` and without computing any weight gradient.
The same pass serves every other trainable kind (``gradsift.layers``): an embedding keeps its
ids (``g_i`` is ``D_i`` scattered into the rows looked up), a norm ``y = w ⊙ x̂ + b`` reduces
to ``g_i(w) = Σ_t δ_it ⊙ x̂_it`` and ``g_i(b) = Σ_t δ_it`` right after the backward.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradsift.blocks import graph_from
from gradsift.factor_kinds import EmbeddingFactors, NormFactors
from gradsift.factors import FactorizedGrads, LayerFactors
from gradsift.layers import (  # noqa: F401  (re-exported: the registry's public names)
    LayerSpec,
    layer_spec,
    register_layer,
    register_layer_matcher,
    resolve_modules,
)
from gradsift.loss import logit_rows_with_loss, loss_positions, per_sample_loss


class _Recorder:
    """Forward hooks that keep each module's input and output; removed in ``finally``.

    An embedding whose lookup is shared by the whole batch (GPT-2's positions: ids of shape
    (1, T)) has its output expanded to the batch size in the hook, so that the gradient
    w.r.t. it is per sample; downstream, the expanded output broadcasts as before.
    """

    def __init__(self, model: nn.Module, names: list[str], batch_size: int = 0,
                 expand: Iterable[str] = ()):
        self.model = model
        self.names = names
        self.batch_size = batch_size
        self.expand = set(expand)
        self.inputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        self.outputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        self.enabled = True
        self._handles: list[Any] = []

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if not self.enabled or not torch.is_grad_enabled():
                return None
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return None
            x, b = args[0].detach(), self.batch_size
            expanded = name in self.expand and output.dim() >= 2 and output.shape[0] == 1 < b
            if expanded:
                x = x.expand(b, *x.shape[1:])
                output = output.expand(b, *output.shape[1:])
            self.inputs[name].append(x)
            self.outputs[name].append(output)
            return output if expanded else None

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


def forward_losses(model: nn.Module, batch: Mapping[str, torch.Tensor],
                   _logits: list | None = None) -> torch.Tensor:
    """(B,) per-sample losses of a causal LM on ``batch`` (no KV cache).

    When the model takes ``logits_to_keep`` (transformers' causal LMs do), the vocabulary
    projection runs only at positions that carry loss in some sample (``loss_positions``);
    the losses are the same, the prompt and padding positions just cost nothing there.
    ``_logits`` (internal): a list that receives the logits and their rows with loss.
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
    losses = per_sample_loss(logits, batch["labels"], positions)
    if _logits is not None:
        _logits.extend([logits, logit_rows_with_loss(batch["labels"], positions)])
    return losses


def capture(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    modules: Iterable[str] | None = None,
    route: str = "auto",
    retain_graph: bool = False,
    graph_start: str | None = None,
) -> Capture:
    """One forward and one backward over ``batch``; returns per-sample factors and losses.

    ``D`` is obtained as ``autograd.grad(Σ_i ℓ_i, outputs)``: samples do not interact, so the
    gradient of the sum w.r.t. sample i's outputs is exactly ``∂ℓ_i/∂y_i``. No ``.grad`` is
    touched. With ``retain_graph`` the graph is kept so that the caller can backpropagate a
    weighted loss into parameters that are not captured. With ``graph_start`` (a module name:
    truncated scoring, ``gradsift.blocks``) the forward records no graph before that module
    runs, so the backward ends there; the captured modules must all run after it.
    """
    names = resolve_modules(model, modules)
    module_map = dict(model.named_modules())
    specs = {n: layer_spec(module_map[n]) for n in names}
    recorder = _Recorder(model, names, batch["input_ids"].shape[0],
                         expand=[n for n in names if specs[n].kind == "embedding"])
    logits: list[torch.Tensor] = []
    truncate = graph_from(model, module_map[graph_start]) if graph_start else nullcontext()
    with recorder.attached(), truncate:
        losses = forward_losses(model, batch, logits)
    batch_size = losses.shape[0]
    # the module whose output *is* the logits (the head): D is exactly zero at its rows
    # without loss, and every product skips them
    heads = {n for n in names if specs[n].kind == "linear" and len(recorder.outputs[n]) == 1
             and recorder.outputs[n][0] is logits[0]}

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

    param_names = {id(p): n for n, p in model.named_parameters()}
    layers = []
    for n in names:
        build = _FACTOR_BUILDERS[specs[n].kind]
        layers.append(build(n, module_map[n], specs[n], recorder.inputs.pop(n),
                            grads_by_name.pop(n), batch_size, param_names))
        if n in heads and layers[-1].output_grads.shape[:2] == logits[1].shape:
            layers[-1].token_mask = logits[1]
    return Capture(
        grads=FactorizedGrads(layers, losses.detach().float(), route=route), losses=losses
    )


def _trainable_name(module: nn.Module, attr: str, param_names: dict[int, str]) -> str | None:
    """The model-level name of ``module.<attr>`` when it is a trainable parameter."""
    p = getattr(module, attr, None)
    return param_names[id(p)] if isinstance(p, nn.Parameter) and p.requires_grad else None


def _linear_factors(name: str, module: nn.Module, spec: LayerSpec, inputs: list[torch.Tensor],
                    grads: list[torch.Tensor], batch_size: int,
                    param_names: dict[int, str]) -> LayerFactors:
    """``g_i(W) = D_iᵀ A_i``: keep A and D as they are."""
    w = module.weight
    d_in, d_out = w.shape if spec.weight_transposed else (w.shape[1], w.shape[0])
    return LayerFactors(
        module_name=name,
        weight_name=param_names[id(w)],
        bias_name=_trainable_name(module, "bias", param_names),
        inputs=_tokens_first(inputs, batch_size, name, w.new_zeros(batch_size, 0, d_in)),
        output_grads=_tokens_first(grads, batch_size, name, w.new_zeros(batch_size, 0, d_out)),
        weight_transposed=spec.weight_transposed,
    )


def _embedding_factors(name: str, module: nn.Module, spec: LayerSpec,
                       inputs: list[torch.Tensor], grads: list[torch.Tensor], batch_size: int,
                       param_names: dict[int, str]) -> EmbeddingFactors:
    """``g_i = Σ_t e_{x_it} δ_itᵀ``: keep the ids and D; the padding row gets no gradient."""
    w = module.weight
    empty_ids = torch.zeros(batch_size, 0, dtype=torch.long, device=w.device)
    ids = _tokens_first(inputs, batch_size, name, empty_ids, feature_dims=0)
    d = _tokens_first(grads, batch_size, name, w.new_zeros(batch_size, 0, w.shape[1]))
    if module.padding_idx is not None:
        d = d.masked_fill((ids == module.padding_idx).unsqueeze(-1), 0)
    return EmbeddingFactors(module_name=name, weight_name=param_names[id(w)], ids=ids,
                            output_grads=d, num_embeddings=w.shape[0])


def _norm_factors(name: str, module: nn.Module, spec: LayerSpec, inputs: list[torch.Tensor],
                  grads: list[torch.Tensor], batch_size: int,
                  param_names: dict[int, str]) -> NormFactors:
    """``g_i(w) = Σ_t δ_it ⊙ x̂_it``, ``g_i(b) = Σ_t δ_it``, summed right away (d per sample)."""
    w = module.weight
    bias_name = _trainable_name(module, "bias", param_names)
    weight_grads = torch.zeros(batch_size, *w.shape, device=w.device)
    bias_grads = torch.zeros(batch_size, *module.bias.shape, device=w.device) if bias_name else None
    for x, d in zip(inputs, grads, strict=True):
        _check_batch(d, batch_size, name)
        d = d.float()
        weight_grads += (d * spec.normalize(x).float()).reshape(batch_size, -1, *w.shape).sum(1)
        if bias_grads is not None:
            bias_grads += d.reshape(batch_size, -1, *w.shape).sum(1)
    return NormFactors(module_name=name, weight_name=param_names[id(w)], bias_name=bias_name,
                       weight_grads=weight_grads, bias_grads=bias_grads)


_FACTOR_BUILDERS: dict[str, Callable[..., Any]] = {
    "linear": _linear_factors,
    "embedding": _embedding_factors,
    "norm": _norm_factors,
}


def _check_batch(t: torch.Tensor, batch_size: int, name: str) -> None:
    if t.dim() < 2 or t.shape[0] != batch_size:
        raise ValueError(
            f"module {name!r}: expected a leading batch dimension of {batch_size}, "
            f"got a tensor of shape {tuple(t.shape)}"
        )


def _tokens_first(parts: list[torch.Tensor], batch_size: int, name: str, empty: torch.Tensor,
                  feature_dims: int = 1) -> torch.Tensor:
    """Stack one module's calls as (B, T_total, *features): extra dims fold into tokens.

    ``empty`` is the result for a module that did not run (no tokens: a zero gradient).
    """
    flat = []
    for t in parts:
        _check_batch(t, batch_size, name)
        features = t.shape[t.dim() - feature_dims :] if feature_dims else ()
        flat.append(t.reshape(batch_size, -1, *features).detach())
    if not flat:
        return empty
    return flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)


def per_sample_grads(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    modules: Iterable[str] | None = None,
    route: str = "auto",
) -> FactorizedGrads:
    """Factorized per-sample gradients of every captured module.

    ``g_i(W) = D_iᵀ A_i`` and ``g_i(b) = Σ_t D_i[t]`` for a linear layer (embeddings and norms:
    ``gradsift.factor_kinds``) of the per-sample loss
    ``ℓ_i = mean_t CE`` over sample i's labelled positions (HF causal-LM convention:
    ``-100`` means no loss, labels shifted inside). A sample without labelled positions
    has ``ℓ_i = 0`` and a zero gradient.

    Args:
        model: a causal LM returning ``logits`` (transformers or peft model).
        batch: ``input_ids`` (B, T), optional ``attention_mask`` (B, T), ``labels`` (B, T).
        modules: names as in ``model.named_modules()``. Default: every module of a
            registered kind (``nn.Linear``, transformers ``Conv1D``, ``nn.Embedding``,
            LayerNorm, RMSNorm) whose weight is trainable — so for a peft LoRA model just the
            LoRA factors, and with full fine-tuning every parameter. A tied input embedding
            and output head are one parameter, the sum of both uses.
        route: ``"ghost"``, ``"materialize"`` or ``"auto"`` (per layer, by cost model; see
            ``FactorizedGrads``).

    Returns:
        ``FactorizedGrads``. Parameters' ``.grad`` are left as they were and no hook remains.
    """
    return capture(model, batch, modules=modules, route=route).grads
