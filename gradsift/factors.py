"""Per-sample gradients kept in factorized form, and the inner products computed on them.

A layer's per-sample gradient is ``g_i = D_iᵀ A_i`` (DESIGN.md §2). A trainable bias is
folded in by appending a column of ones to ``A``: ``[g_i(W) g_i(b)] = D_iᵀ [A_i 1]``.

Routes for the Gram matrix ``⟨g_i, h_j⟩`` of one layer (B×T samples against B'×T'):

* ``ghost``: ``sum((A_i A_jᵀ) ⊙ (D_i D_jᵀ))``; cost ``B B' T T' (d_in + d_out)``,
  memory ``B B' T T'`` (chunked over rows).
* ``materialize``: form ``g_i`` (``d_out × d_in``) then one GEMM; cost
  ``(B T + B' T') d_in d_out + B B' d_in d_out``, memory ``B d_in d_out`` (chunked).
* ``auto``: per layer and per call, the route with the smaller cost above. Short sequences
  with wide layers pick ghost, long contexts pick materialize, so memory never grows as
  ``T²`` when materializing is cheaper.

An elementwise (Adam) preconditioner ``P`` cannot be pulled through the token sums, so a
preconditioned Gram always takes the materialize route: exact, one layer and one chunk of
samples at a time. ``dot_dense`` never materializes: ``⟨g_i, M⟩ = Σ_t δ_{i,t}ᵀ M a_{i,t}``.
All arithmetic is float32 whatever the model's dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

ROUTES = ("auto", "ghost", "materialize")
# Upper bound on the floats of one temporary block (per-sample grads or token Gram): 64M = 256 MB.
BLOCK_FLOATS = 64 * 2**20
# Columns summed per partial product in a materialized Gram (float32 accuracy, see below).
INNER_BLOCK = 65536


@dataclass
class LayerFactors:
    """Factors of one linear-like layer.

    Attributes:
        module_name: name in ``model.named_modules()``.
        weight_name, bias_name: parameter names (``bias_name`` is None without trainable bias).
        inputs: A, (B, T, d_in), in the model's dtype.
        output_grads: D, (B, T, d_out).
        weight_transposed: the parameter is stored as (d_in, d_out) (GPT-2 ``Conv1D``).
    """

    module_name: str
    weight_name: str
    bias_name: str | None
    inputs: torch.Tensor
    output_grads: torch.Tensor
    weight_transposed: bool = False

    @property
    def d_in(self) -> int:
        return self.inputs.shape[-1]

    @property
    def d_out(self) -> int:
        return self.output_grads.shape[-1]

    @property
    def d_in_aug(self) -> int:
        """Columns of the factored gradient: d_in, plus one for a trainable bias."""
        return self.d_in + (self.bias_name is not None)

    def a(self, rows: slice | None = None) -> torch.Tensor:
        """A in float32, with a ones column appended when there is a trainable bias."""
        a = self.inputs if rows is None else self.inputs[rows]
        a = a.float()
        if self.bias_name is not None:
            a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
        return a

    def d(self, rows: slice | None = None) -> torch.Tensor:
        d = self.output_grads if rows is None else self.output_grads[rows]
        return d.float()

    def dense(self, tensors: Mapping[str, torch.Tensor], what: str) -> torch.Tensor:
        """Parameter-shaped tensors of this layer as one (d_out, d_in[+1]) float32 matrix."""
        if self.weight_name not in tensors:
            raise KeyError(f"{what} has no entry for parameter {self.weight_name!r}")
        w = tensors[self.weight_name].float()
        w = w.t() if self.weight_transposed else w
        if self.bias_name is not None:
            if self.bias_name not in tensors:
                raise KeyError(f"{what} has no entry for parameter {self.bias_name!r}")
            w = torch.cat([w, tensors[self.bias_name].float().reshape(-1, 1)], dim=1)
        return w.to(self.inputs.device)

    def materialize(self, rows: slice | None = None) -> torch.Tensor:
        """(b, d_out, d_in[+1]) per-sample gradients ``D_iᵀ A_i`` of the given rows."""
        return torch.bmm(self.d(rows).transpose(1, 2), self.a(rows))

    def split(self, g: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split (…, d_out, d_in[+1]) back into parameter-shaped weight (and bias) tensors."""
        out = {}
        w = g[..., : self.d_in]
        out[self.weight_name] = w.transpose(-1, -2) if self.weight_transposed else w
        if self.bias_name is not None:
            out[self.bias_name] = g[..., self.d_in]
        return out


def choose_route(
    b: int, t: int, b2: int, t2: int, d_in: int, d_out: int, same: bool = False
) -> str:
    """Cheaper route for a (b×t) against (b2×t2) Gram of one layer, by the cost model above.

    ``same``: a batch against itself, whose per-sample gradients are materialized once.
    """
    ghost = b * b2 * t * t2 * (d_in + d_out)
    materialized_tokens = b * t if same else b * t + b2 * t2
    materialize = materialized_tokens * d_in * d_out + b * b2 * d_in * d_out
    return "ghost" if ghost < materialize else "materialize"


def blocked_inner(g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``g @ hᵀ`` for (b, K) and (b2, K), summing K in blocks of ``INNER_BLOCK``.

    One float32 GEMM over a very long K loses accuracy roughly in proportion to K (measured:
    4e-3 relative at K = 2²⁴); summing 65,536-column partial products keeps it near 1e-6.
    """
    k = g.shape[1]
    out = g[:, :INNER_BLOCK] @ h[:, :INNER_BLOCK].T
    for start in range(INNER_BLOCK, k, INNER_BLOCK):
        out += g[:, start : start + INNER_BLOCK] @ h[:, start : start + INNER_BLOCK].T
    return out


def _row_chunks(n: int, floats_per_row: int, max_rows: int | None = None) -> list[slice]:
    step = max(1, BLOCK_FLOATS // max(1, floats_per_row))
    if max_rows is not None:
        step = min(step, max(1, max_rows))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


class FactorizedGrads:
    """Per-sample gradients of a batch, as per-layer factors (A, D).

    Attributes:
        layers: one ``LayerFactors`` per captured module.
        losses: (B,) float32 per-sample losses.
        route: default route for ``gram``/``sq_norms`` (``auto``, ``ghost``, ``materialize``).
    """

    def __init__(self, layers: Sequence[LayerFactors], losses: torch.Tensor, route: str = "auto"):
        if route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
        self.layers = list(layers)
        self.losses = losses
        self.route = route

    def __len__(self) -> int:
        return self.losses.shape[0]

    @property
    def param_names(self) -> list[str]:
        """Parameter names (as in ``model.named_parameters()``) covered by these gradients."""
        names = []
        for layer in self.layers:
            names.append(layer.weight_name)
            if layer.bias_name is not None:
                names.append(layer.bias_name)
        return names

    def _route(self, layer: LayerFactors, other: LayerFactors) -> str:
        if self.route != "auto":
            return self.route
        b, t = layer.inputs.shape[:2]
        b2, t2 = other.inputs.shape[:2]
        return choose_route(b, t, b2, t2, layer.d_in_aug, layer.d_out, same=layer is other)

    def _paired_layers(self, other: FactorizedGrads) -> list[tuple[LayerFactors, LayerFactors]]:
        if other is self:
            return [(layer, layer) for layer in self.layers]
        if self.param_names != other.param_names:
            missing = set(self.param_names) ^ set(other.param_names)
            raise ValueError(
                "both FactorizedGrads must cover the same parameters; "
                f"differing: {sorted(missing)[:5]}"
            )
        return list(zip(self.layers, other.layers, strict=True))

    def gram(
        self,
        other: FactorizedGrads | None = None,
        precondition: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """(B, B') float32 matrix ``Σ_params ⟨g_i, P ⊙ h_j⟩``.

        Args:
            other: gradients of another batch over the same parameters (default: self).
            precondition: parameter name → positive tensor of that parameter's shape (P).
        """
        other = self if other is None else other
        out = torch.zeros(len(self), len(other), device=self.losses.device)
        for layer, layer2 in self._paired_layers(other):
            if precondition is not None:
                p = layer.dense(precondition, "precondition")
                out += self._gram_materialize(layer, layer2, p, same=other is self)
            elif self._route(layer, layer2) == "ghost":
                out += self._gram_ghost(layer, layer2)
            else:
                out += self._gram_materialize(layer, layer2, None, same=other is self)
        return out

    @staticmethod
    def _gram_ghost(layer: LayerFactors, layer2: LayerFactors) -> torch.Tensor:
        b, t = layer.inputs.shape[:2]
        b2, t2 = layer2.inputs.shape[:2]
        a2 = layer2.a().reshape(b2 * t2, -1)
        d2 = layer2.d().reshape(b2 * t2, -1)
        out = torch.empty(b, b2, device=a2.device)
        same = layer is layer2
        # A batch against itself is symmetric: each row block is computed only against the
        # columns from its own start on and mirrored (four blocks: ~5/8 of the work).
        chunks = _row_chunks(b, t * b2 * t2, max_rows=-(-b // 4) if same else None)
        for rows in chunks:
            n = rows.stop - rows.start
            first = rows.start if same else 0
            cols = slice(first * t2, b2 * t2)
            aa = (layer.a(rows).reshape(n * t, -1) @ a2[cols].T).view(n, t, b2 - first, t2)
            dd = (layer.d(rows).reshape(n * t, -1) @ d2[cols].T).view(n, t, b2 - first, t2)
            block = (aa * dd).sum(dim=(1, 3))
            out[rows, first:] = block
            if same:
                out[first:, rows] = block.T
        return out

    @staticmethod
    def _gram_materialize(
        layer: LayerFactors, layer2: LayerFactors, p: torch.Tensor | None, same: bool
    ) -> torch.Tensor:
        b, b2 = layer.inputs.shape[0], layer2.inputs.shape[0]
        size = layer.d_out * layer.d_in_aug
        out = torch.empty(b, b2, device=layer.inputs.device)
        chunks2 = _row_chunks(b2, size)
        if same and len(chunks2) == 1:
            # symmetric and small enough: materialize once, one GEMM.
            g = layer.materialize().reshape(b, -1)
            h = g if p is None else g * p.reshape(1, -1)
            return blocked_inner(g, h)
        for cols in chunks2:
            h = layer2.materialize(cols).reshape(cols.stop - cols.start, -1)
            if p is not None:
                h = h * p.reshape(1, -1)
            for rows in _row_chunks(b, size):
                g = layer.materialize(rows).reshape(rows.stop - rows.start, -1)
                out[rows, cols] = blocked_inner(g, h)
        return out

    def sq_norms(self, precondition: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(B,) ``Σ_params ⟨g_i, P ⊙ g_i⟩`` (plain squared norms without ``precondition``)."""
        out = torch.zeros(len(self), device=self.losses.device)
        for layer in self.layers:
            b, t = layer.inputs.shape[:2]
            d_in = layer.d_in_aug
            p = None if precondition is None else layer.dense(precondition, "precondition")
            # per-sample diagonal: ghost costs t² (d_in + d_out), materialize t d_in d_out.
            ghost = p is None and (
                self.route == "ghost"
                or (self.route == "auto" and t * (d_in + layer.d_out) < d_in * layer.d_out)
            )
            if ghost:
                for rows in _row_chunks(b, t * t):
                    a, d = layer.a(rows), layer.d(rows)
                    out[rows] += ((a @ a.transpose(1, 2)) * (d @ d.transpose(1, 2))).sum(dim=(1, 2))
            else:
                for rows in _row_chunks(b, layer.d_out * d_in):
                    g = layer.materialize(rows)
                    out[rows] += (g * g * (1.0 if p is None else p)).sum(dim=(1, 2))
        return out

    def dot_dense(self, dense: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B,) ``⟨g_i, M⟩`` with ``M`` a parameter-name → tensor dict (e.g. a target gradient).

        Computed as ``Σ_t δ_{i,t}ᵀ M a_{i,t}``: about one extra forward of each layer.
        """
        out = torch.zeros(len(self), device=self.losses.device)
        for layer in self.layers:
            m = layer.dense(dense, "dense")
            b, t = layer.inputs.shape[:2]
            for rows in _row_chunks(b, t * layer.d_out):
                out[rows] += (layer.d(rows) * (layer.a(rows) @ m.T)).sum(dim=(1, 2))
        return out

    def weighted_sum(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """``Σ_i w_i g_i`` per parameter, as ``(w ⊙ D)ᵀ A``: one GEMM per layer, no copies."""
        w = weights.float().to(self.losses.device).view(-1, 1, 1)
        out: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            d = (layer.d() * w).reshape(-1, layer.d_out)
            g = d.T @ layer.a().reshape(d.shape[0], -1)
            out.update(layer.split(g))
        return out

    def materialize(self) -> dict[str, torch.Tensor]:
        """Parameter name → (B, *param.shape) per-sample gradients (memory ``B`` × params)."""
        out: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            out.update(layer.split(layer.materialize()))
        return out

    def select(self, indices: torch.Tensor) -> FactorizedGrads:
        """The gradients of a subset of samples (views where possible)."""
        idx = indices.to(self.losses.device)
        layers = [
            LayerFactors(
                module_name=layer.module_name,
                weight_name=layer.weight_name,
                bias_name=layer.bias_name,
                inputs=layer.inputs[idx],
                output_grads=layer.output_grads[idx],
                weight_transposed=layer.weight_transposed,
            )
            for layer in self.layers
        ]
        return FactorizedGrads(layers, self.losses[idx], route=self.route)

    @staticmethod
    def concat(parts: Sequence[FactorizedGrads]) -> FactorizedGrads:
        """Join the gradients of several micro-batches along the sample axis.

        Micro-batches of different lengths are zero-padded along tokens: a zero ``D`` row
        contributes nothing to any gradient.
        """
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        layers = []
        for i, layer in enumerate(first.layers):
            pieces = [p.layers[i] for p in parts]
            t = max(p.inputs.shape[1] for p in pieces)
            layers.append(
                LayerFactors(
                    module_name=layer.module_name,
                    weight_name=layer.weight_name,
                    bias_name=layer.bias_name,
                    inputs=torch.cat([_pad_tokens(p.inputs, t) for p in pieces]),
                    output_grads=torch.cat([_pad_tokens(p.output_grads, t) for p in pieces]),
                    weight_transposed=layer.weight_transposed,
                )
            )
        losses = torch.cat([p.losses for p in parts])
        return FactorizedGrads(layers, losses, route=first.route)


def _pad_tokens(x: torch.Tensor, t: int) -> torch.Tensor:
    if x.shape[1] == t:
        return x
    return torch.nn.functional.pad(x, (0, 0, 0, t - x.shape[1]))
