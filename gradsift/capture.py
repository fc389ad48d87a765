"""Capture per-sample gradient factors with one forward and one backward pass.

For a linear-like layer ``y = W a + b`` applied at every token, the per-sample gradient is
``g_i(W) = D_iᵀ A_i`` with ``A_i`` (T, d_in) the layer inputs and ``D_i`` (T, d_out) the
gradients of ``ℓ_i`` w.r.t. its outputs. A forward hook keeps each captured module's input and
passes its output through a tap (an identity autograd function); one ``torch.autograd.grad``
(w.r.t. a scalar every tap takes as a second input) runs the backward through every tap, which
hands its layer's ``D`` over as it goes by: without touching any parameter's ``.grad``, without
computing any weight gradient, and without holding every layer's ``D`` until the end. A
bias-free linear layer whose tokens outnumber ``r = min(d_in, d_out)`` is made compact on
arrival: ``g_i = D_iᵀ A_i`` is formed (one GEMM, what a plain backward spends on the weight
gradient) and kept as ``r`` factor rows (``A' = g_i, D' = I`` or ``A' = I, D' = g_iᵀ``), so
its memory is ``r (d_in + d_out)`` per sample instead of ``T (d_in + d_out)`` (a LoRA factor at
any length, every layer at long context), and ``A`` and ``D`` are let go during the backward.
Likewise an embedding keeps one row per distinct id of a sample, and a norm its two sums; an
output head keeps only each sample's rows with loss (its ``D`` is exactly zero elsewhere), before
any compaction.
The same pass serves every other trainable kind (``gradsift.layers``): an embedding keeps its
ids (``g_i`` is ``D_i`` scattered into the rows looked up), a norm ``y = w ⊙ x̂ + b`` reduces
to ``g_i(w) = Σ_t δ_it ⊙ x̂_it`` and ``g_i(b) = Σ_t δ_it`` as its ``D`` arrives.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
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
from gradsift.linear_factors import identity_factor
from gradsift.loss import (
    logit_rows_with_loss,
    loss_positions,
    per_sample_loss,
    per_sample_loss_at_rows,
)


class _Tap(torch.autograd.Function):
    """Identity on ``y``; its backward hands ``D = ∂L/∂y`` to ``receive`` and passes it on.
    ``anchor`` (a scalar, the input the backward is asked for) puts every tap on the path."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, anchor: torch.Tensor,
                receive: Callable[[torch.Tensor], None]) -> torch.Tensor:
        ctx.receive = receive
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, d: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        ctx.receive(d)
        return d, None, None


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
        # per call: a weak reference to the (tapped) output and its shape, dtype and device —
        # holding the outputs themselves would keep the ones autograd does not save alive
        # through the end of the forward, when memory peaks
        self.outputs: dict[str, list[tuple[weakref.ref, torch.Size, torch.dtype,
                                           torch.device]]] = {n: [] for n in names}
        self.grads: dict[str, list[torch.Tensor | None]] = {n: [] for n in names}
        # per module: what to keep of (A, D) once D arrives (``_ON_ARRIVAL``; None: as is)
        self.compact: dict[str, Callable[..., tuple[Any, Any] | None] | None] = {}
        # per module: (B, T) rows known to carry a gradient (a head: its rows with loss); the
        # others are dropped as D arrives, before any compaction
        self.row_masks: dict[str, torch.Tensor] = {}
        # per module: a head that ran on its rows with loss only, each sample's count of them
        self.head_rows: dict[str, list[int]] = {}
        self.anchors: dict[torch.device, torch.Tensor] = {}  # one per device of an output
        self.receiving = False  # only the capture's own backward hands D over
        self.enabled = True
        self._handles: list[Any] = []

    def _receiver(self, name: str, call: int) -> Callable[[torch.Tensor], None]:
        def receive(d: torch.Tensor) -> None:
            if not self.receiving:  # a later backward through the retained graph
                return
            compact = self.compact.get(name)
            x = self.inputs[name][call]
            # a head keeps each sample's rows with loss only (D is exactly zero elsewhere), as
            # (N, ·) rows one sample after another: run there alone (``head_rows``) or gathered
            counts, mask = self.head_rows.get(name), self.row_masks.get(name)
            if counts is not None and x.shape[:2] == d.shape[:2] == (1, sum(counts)):
                x, d = x[0], d[0]
            elif mask is not None and x.shape[:2] == d.shape[:2] == mask.shape:
                x, d, counts = x[mask], d[mask], mask.sum(dim=1).tolist()
            else:
                counts = None
            small = None
            if counts is not None:
                small = compact(x, d, counts) if compact is not None else None
                if small is None:
                    small = _pad_rows(x, d, counts)
            elif compact is not None and x.shape[0] == d.shape[0] == self.batch_size:
                small = compact(x, d)
            if small is not None:
                x, d = small
            self.inputs[name][call] = x
            self.grads[name][call] = d

        return receive

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
            call = len(self.inputs[name])
            self.inputs[name].append(x)
            self.grads[name].append(None)
            anchor = self.anchors.get(output.device)
            if anchor is None:
                anchor = self.anchors[output.device] = torch.zeros(
                    (), device=output.device, requires_grad=True)
            tapped = _Tap.apply(output, anchor, self._receiver(name, call))
            self.outputs[name].append((weakref.ref(tapped), tapped.shape, tapped.dtype,
                                       tapped.device))
            return tapped

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


def output_head(model: nn.Module) -> nn.Module | None:
    """The module that computes the logits (``get_output_embeddings``), or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    get = getattr(base, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Module) else None


@contextmanager
def _head_at_rows(head: nn.Module | None, rows: torch.Tensor) -> Iterator[list[bool]]:
    """While inside, ``head`` runs on its input's ``rows`` (B, P bool) only, as one (1, N, ·)
    sequence of every sample's rows one after another; the list yielded says whether it did."""
    ran: list[bool] = []
    if head is None:
        yield ran
        return

    def gather(module: nn.Module, args: tuple) -> tuple | None:
        x = args[0] if args else None
        if ran or not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[:2] != rows.shape:
            return None
        ran.append(True)
        return (x[rows.to(x.device)].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield ran
    finally:
        handle.remove()


def forward_losses(model: nn.Module, batch: Mapping[str, torch.Tensor],
                   _logits: list | None = None, head_at_rows: bool = True) -> torch.Tensor:
    """(B,) per-sample losses of a causal LM on ``batch`` (no KV cache).

    When the model takes ``logits_to_keep`` (transformers' causal LMs do), the vocabulary
    projection runs only at positions that carry loss in some sample (``loss_positions``).
    With ``head_at_rows`` the output head (``output_head``) runs only at each sample's own
    rows with loss, all samples' rows as one sequence: the losses are the same, the prompt and
    padding positions just cost nothing there.
    ``_logits`` (internal): a list that receives the logits, their rows with loss (B, P) and
    each sample's count of rows when the head ran at those rows only (else None).
    """
    kwargs = {"input_ids": batch["input_ids"], "use_cache": False}
    if batch.get("attention_mask") is not None:
        kwargs["attention_mask"] = batch["attention_mask"]
    labels = batch["labels"]
    positions = loss_positions(labels)
    if 0 < positions.numel() < labels.shape[1] - 1 and _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = positions.to(batch["input_ids"].device)
    else:
        positions = None
    rows = logit_rows_with_loss(labels, positions)
    counts = rows.sum(dim=1)
    head = output_head(model) if head_at_rows and bool(rows.any()) else None
    with _head_at_rows(head, rows) as ran:
        out = model(**kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    if ran:
        if logits.shape[:2] != (1, int(counts.sum())):
            raise RuntimeError(
                f"the output head ({type(head).__name__}) ran on the rows with loss, but the "
                f"model returned logits of shape {tuple(logits.shape)}: call forward_losses "
                "with head_at_rows=False for this model")
        if positions is None:  # rows over every position; the last one predicts nothing
            targets = labels[:, 1:][rows[:, :-1].to(labels.device)]
        else:
            targets = labels[:, positions.to(labels.device) + 1][rows.to(labels.device)]
        losses = per_sample_loss_at_rows(logits[0], targets, counts)
    else:
        losses = per_sample_loss(logits, labels, positions)
    if _logits is not None:
        _logits.extend([logits, rows, counts.tolist() if ran else None])
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

    ``D`` is handed over by each output's tap during one backward of ``Σ_i ℓ_i``: samples do
    not interact, so the gradient of the sum w.r.t. sample i's outputs is exactly
    ``∂ℓ_i/∂y_i``. No ``.grad`` is
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
    recorder.compact = {n: _ON_ARRIVAL[specs[n].kind](module_map[n], specs[n]) for n in names}
    logits: list[Any] = []
    truncate = graph_from(model, module_map[graph_start]) if graph_start else nullcontext()
    # the head runs on each sample's rows with loss only (its D is exactly zero elsewhere),
    # unless a captured module lives inside it (a LoRA on the head: its rows are per token)
    head = output_head(model)
    head_name = next((n for n, m in module_map.items() if m is head), None)
    at_rows = head_name is not None and not any(n.startswith(head_name + ".") for n in names)
    with recorder.attached(), truncate:
        losses = forward_losses(model, batch, logits, head_at_rows=at_rows)
    batch_size = losses.shape[0]
    if logits[2] is not None and head_name in names:
        recorder.head_rows[head_name] = logits[2]
    # otherwise: the module whose output *is* the logits keeps its rows with loss, gathered
    # as its D arrives
    heads = {n for n in names if specs[n].kind == "linear" and len(recorder.outputs[n]) == 1
             and recorder.outputs[n][0][0]() is logits[0] and n not in recorder.head_rows}
    shapes = {n: [o[1:] for o in recorder.outputs[n]] for n in names}
    if not any(shapes.values()):
        raise RuntimeError(f"none of the modules {names[:5]}... ran in the forward pass")
    recorder.outputs = {n: [] for n in names}  # the taps hand D over; hold nothing else
    token_mask, logits = logits[1], None
    recorder.row_masks = dict.fromkeys(heads, token_mask)
    recorder.receiving = True
    torch.autograd.grad(losses.sum(), list(recorder.anchors.values()), allow_unused=True,
                        retain_graph=retain_graph)
    recorder.receiving = False
    grads_by_name: dict[str, list[torch.Tensor]] = {
        n: [torch.zeros(*shape, dtype=dtype, device=device) if g is None else g  # loss-free call
            for g, (shape, dtype, device) in zip(recorder.grads.pop(n), shapes[n], strict=True)]
        for n in names}

    param_names = {id(p): n for n, p in model.named_parameters()}
    layers = []
    for n in names:
        build = _FACTOR_BUILDERS[specs[n].kind]
        layers.append(build(n, module_map[n], specs[n], recorder.inputs.pop(n),
                            grads_by_name.pop(n), batch_size, param_names))
    return Capture(
        grads=FactorizedGrads(layers, losses.detach().float(), route=route), losses=losses
    )


def _pad_rows(a: torch.Tensor, d: torch.Tensor, counts: list[int]
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, ·) rows of every sample one after another (sample i's: the next ``counts[i]``) as
    (B, max count, ·), padded with zero rows: a zero row adds nothing to ``g_i = D_iᵀ A_i``."""
    width = max(max(counts, default=0), 1)
    sample = torch.repeat_interleave(torch.arange(len(counts), device=a.device),
                                     torch.tensor(counts, device=a.device))
    starts = torch.tensor([0, *counts[:-1]], device=a.device).cumsum(0)
    row = torch.arange(a.shape[0], device=a.device) - starts[sample]
    out_a = a.new_zeros(len(counts), width, a.shape[-1])
    out_d = d.new_zeros(len(counts), width, d.shape[-1])
    out_a[sample, row] = a
    out_d[sample, row] = d
    return out_a, out_d


def _compact_linear(a: torch.Tensor, d: torch.Tensor, counts: list[int] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(A, D)`` of one call of a bias-free linear layer as ``r = min(d_in, d_out)`` factor
    rows with the same ``g_i = D_iᵀ A_i``, when ``r`` is below its token count (else None).
    With ``counts``, ``a`` and ``d`` are (N, ·) rows of every sample one after another (a head
    at its rows with loss): one GEMM per sample over its own rows."""
    d_in, d_out = a.shape[-1], d.shape[-1]
    if counts is None:
        batch = a.shape[0]
        a, d = a.reshape(batch, -1, d_in), d.reshape(batch, -1, d_out)
        rows = a.shape[1]
    else:
        batch, rows = len(counts), max(counts, default=0)
    if min(d_in, d_out) >= rows or a.dtype != d.dtype or a.shape[-2] != d.shape[-2]:
        return None
    # d_out ≤ d_in: A' = g_i = D_iᵀ A_i (d_out rows), D' = I; else A' = I, D' = g_iᵀ = A_iᵀ D_i
    # The sum over tokens runs in float32 (bf16 inputs are upcast): the compact rows are the
    # per-sample gradient itself, and a bf16 sum over T tokens would round it.
    left, right = (d, a) if d_out <= d_in else (a, d)
    if counts is None:
        kept = torch.bmm(left.transpose(1, 2).float(), right.float())
    else:
        kept = a.new_empty(batch, left.shape[-1], right.shape[-1], dtype=torch.float32)
        for i, (lhs, rhs) in enumerate(zip(left.split(counts), right.split(counts),
                                           strict=True)):
            torch.mm(lhs.T.float(), rhs.float(), out=kept[i])
    r = left.shape[-1]
    eye = identity_factor(batch, r, a.device)
    return (kept, eye) if d_out <= d_in else (eye, kept)


def _compact_embedding(ids: torch.Tensor, d: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One call of an embedding as one row per distinct id of each sample (``δ`` summed over
    the tokens that looked it up; shorter samples padded with id 0 and a zero row), when that
    is fewer rows than tokens (else None): ``g_i = Σ_t e_{x_it} δ_itᵀ`` is unchanged."""
    batch, dim = ids.shape[0], d.shape[-1]
    ids, d = ids.reshape(batch, -1), d.reshape(batch, -1, dim)
    if ids.shape[1] != d.shape[1]:
        return None
    rows = [torch.unique(ids[i], return_inverse=True) for i in range(batch)]
    width = max(len(u) for u, _ in rows)
    if width >= ids.shape[1]:
        return None
    out_ids = ids.new_zeros(batch, width)
    out_d = d.new_zeros(batch, width, dim, dtype=torch.float32)  # summed in float32
    for i, (uniq, inverse) in enumerate(rows):
        out_ids[i, : len(uniq)] = uniq
        out_d[i].index_add_(0, inverse, d[i].float())
    return out_ids, out_d


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


@dataclass
class _NormSums:
    """One call of a norm, reduced on arrival: ``Σ_t δ_t ⊙ x̂_t`` and ``Σ_t δ_t``, (B, *w)."""

    weight: torch.Tensor
    bias: torch.Tensor


def _norm_reducer(spec: LayerSpec, shape: torch.Size
                  ) -> Callable[[torch.Tensor, torch.Tensor], tuple[_NormSums, _NormSums]]:
    def reduce(x: torch.Tensor, d: torch.Tensor) -> tuple[_NormSums, _NormSums]:
        d = d.float().reshape(d.shape[0], -1, *shape)
        sums = _NormSums((d * spec.normalize(x).float().reshape(d.shape)).sum(1), d.sum(1))
        return sums, sums

    return reduce


def _norm_factors(name: str, module: nn.Module, spec: LayerSpec, inputs: list[Any],
                  grads: list[Any], batch_size: int,
                  param_names: dict[int, str]) -> NormFactors:
    """``g_i(w) = Σ_t δ_it ⊙ x̂_it``, ``g_i(b) = Σ_t δ_it``, summed on arrival (d per sample)."""
    w = module.weight
    bias_name = _trainable_name(module, "bias", param_names)
    weight_grads = torch.zeros(batch_size, *w.shape, device=w.device)
    bias_grads = torch.zeros(batch_size, *module.bias.shape, device=w.device) if bias_name else None
    for x, d in zip(inputs, grads, strict=True):
        if not isinstance(d, _NormSums):  # a call whose output the loss did not reach
            _check_batch(d, batch_size, name)
            d = _norm_reducer(spec, w.shape)(x, d)[1]
        weight_grads += d.weight
        if bias_grads is not None:
            bias_grads += d.bias
    return NormFactors(module_name=name, weight_name=param_names[id(w)], bias_name=bias_name,
                       weight_grads=weight_grads, bias_grads=bias_grads)


def _linear_on_arrival(module: nn.Module, spec: LayerSpec) -> Callable | None:
    bias = getattr(module, "bias", None)
    trained_bias = isinstance(bias, nn.Parameter) and bias.requires_grad
    return None if trained_bias else _compact_linear  # a bias needs its tokens' D


# what each kind keeps once its D arrives during the backward (None: A and D as they are)
_ON_ARRIVAL: dict[str, Callable[[nn.Module, LayerSpec], Callable | None]] = {
    "linear": _linear_on_arrival,
    "embedding": lambda module, spec: _compact_embedding,
    "norm": lambda module, spec: _norm_reducer(spec, module.weight.shape),
}

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
