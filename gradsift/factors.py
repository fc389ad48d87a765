"""Per-sample gradients kept in factorized form, and the inner products computed on them.

``FactorizedGrads`` holds one factor object per captured module: ``LayerFactors`` for a
linear layer (``g_i = D_iᵀ A_i``, routes in ``gradsift.linear_factors``), and the kinds of
``gradsift.factor_kinds`` for embeddings and norms, all behind the same methods. A weight
used by several modules (a tied embedding and output head) has one factor object per use;
its per-sample gradient is the sum of the uses, and every inner product includes the cross
terms between them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch

from gradsift.linear_factors import (  # noqa: F401  (re-exported)
    BLOCK_FLOATS,
    INNER_BLOCK,
    ROUTES,
    LayerFactors,
    blocked_inner,
    choose_route,
    chunked_gram,
    linear_route,
    row_chunks,
)
from gradsift.products import Products, products


class FactorizedGrads:
    """Per-sample gradients of a batch, as per-use factors (linear, embedding, norm).

    Uses that share a weight (a tied input embedding and output head) are one parameter:
    its per-sample gradient is the sum of the uses, and every inner product includes the
    cross terms ``⟨g_i(u), h_j(v)⟩`` between different uses.

    Attributes:
        layers: one factor object per captured module (``LayerFactors`` for linear layers).
        losses: (B,) float32 per-sample losses.
        route: default route for ``gram``/``sq_norms`` (``auto``, ``ghost``, ``materialize``).
    """

    def __init__(self, layers: Sequence[Any], losses: torch.Tensor, route: str = "auto"):
        if route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
        self.layers = list(layers)
        self.losses = losses
        self.route = route
        self._groups = _tied_groups(self.layers)

    def __len__(self) -> int:
        return self.losses.shape[0]

    @property
    def param_names(self) -> list[str]:
        """Parameter names (as in ``model.named_parameters()``) covered by these gradients."""
        return list(dict.fromkeys(n for layer in self.layers for n in layer.param_names))

    def _paired_layers(self, other: FactorizedGrads) -> list[tuple[Any, Any]]:
        if other is self:
            return [(layer, layer) for layer in self.layers]
        if [(u.kind, u.param_names) for u in self.layers] != [
            (u.kind, u.param_names) for u in other.layers
        ]:
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
        return self._gram(self if other is None else other, precondition)

    def gram_and_dot(
        self,
        dense: Mapping[str, torch.Tensor],
        precondition: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gram(precondition=P), dot_dense(M))`` in one pass: (B, B) and (B,).

        A layer whose Gram materializes its per-sample gradients (always with ``P``) takes
        ``⟨g_i, M⟩`` from them, ``B·numel`` instead of a pass as costly as a forward of the
        layer (``B T d_in d_out``): for a large output head, the larger part of ``dot_dense``.
        """
        out = self.products(dense, precondition)
        return out.gram, out.dots

    def products(self, dense: Mapping[str, torch.Tensor],
                 precondition: Mapping[str, torch.Tensor] | None = None,
                 other: FactorizedGrads | None = None,
                 other_precondition: Mapping[str, torch.Tensor] | None = None) -> Products:
        """``K = ⟨g_i, Q ⊙ g_j⟩``, ``b = ⟨g_i, M⟩`` and ``C = ⟨g_i, R ⊙ h_t⟩`` in one pass.

        Each large weight's per-sample gradients are formed once, a block of rows at a time,
        for all three (``gradsift.products``). ``Q`` = ``precondition``, ``M`` = ``dense``,
        ``R`` = ``other_precondition`` (None: 1); ``C`` only with ``other`` (another batch).
        """
        return products(self, dense, precondition, other, other_precondition)

    def _gram(self, other: FactorizedGrads, precondition: Mapping[str, torch.Tensor] | None,
              dense: Mapping[str, torch.Tensor] | None = None,
              dots: torch.Tensor | None = None) -> torch.Tensor:
        same = other is self
        pairs = self._paired_layers(other)
        out = torch.zeros(len(self), len(other), device=self.losses.device)
        shared = {i for group in self._groups for i in group}
        for i, (layer, layer2) in enumerate(pairs):
            if i not in shared:
                out += layer.gram(layer2, precondition, self.route, same, dense, dots)
        for group in self._groups:
            out += self._shared_gram([pairs[i] for i in group], precondition, same,
                                     dense=dense, dots=dots)
        return out

    def _shared_gram(self, pairs: list[tuple[Any, Any]],
                     precondition: Mapping[str, torch.Tensor] | None, same: bool,
                     fused: bool | None = None, dense: Mapping[str, torch.Tensor] | None = None,
                     dots: torch.Tensor | None = None) -> torch.Tensor:
        """Gram of one weight used by several modules, ``⟨Σ_u g_i(u), P ⊙ Σ_v h_j(v)⟩``.

        ``fused``: materialize each sample's summed gradient (what a linear use costs on the
        materialize route anyway: a tied head then costs what an untied one does); else each
        use's own Gram plus the cross terms ``⟨g_i(u), P ⊙ h_j(v)⟩``, u ≠ v (None: by route).
        """
        uses, others = [u for u, _ in pairs], [v for _, v in pairs]
        p = _weight_entry(uses[0], precondition)
        if fused is None:
            fused = all(u.param_names == [u.weight_name] for u in uses) and (
                precondition is not None or any(
                    linear_route(u, v, self.route, same) == "materialize"
                    for u, v in pairs if isinstance(u, LayerFactors)))
        if fused:
            m = None if dots is None else _weight_entry(uses[0], dense, "dense")
            return chunked_gram(partial(_summed_per_sample, uses),
                                partial(_summed_per_sample, others), len(uses[0]),
                                len(others[0]), uses[0].weight_numel,
                                None if p is None else p.reshape(1, -1), same, uses[0].device,
                                None if m is None else m.reshape(-1), dots)
        out = sum(u.gram(v, precondition, self.route, same, dense, dots) for u, v in pairs)
        for x, (u, _) in enumerate(pairs):
            for y in range(x + 1, len(pairs)):
                uv = _cross_gram(u, others[y], p)  # ⟨g_i(u), P ⊙ h_j(v)⟩
                out = out + (uv.T if same else _cross_gram(pairs[y][0], others[x], p)) + uv
        return out

    def sq_norms(self, precondition: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(B,) ``Σ_params ⟨g_i, P ⊙ g_i⟩`` (plain squared norms without ``precondition``)."""
        out = torch.zeros(len(self), device=self.losses.device)
        for layer in self.layers:
            out += layer.sq_norms(precondition, self.route)
        for group in self._groups:  # ⟨u+v, P(u+v)⟩ = ⟨u,Pu⟩ + ⟨v,Pv⟩ + 2⟨u,Pv⟩
            for x, u in enumerate(group):
                for v in group[x + 1 :]:
                    p = _weight_entry(self.layers[u], precondition)
                    out += 2 * _cross_sq_norms(self.layers[u], self.layers[v], p)
        return out

    def dot_dense(self, dense: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B,) ``⟨g_i, M⟩`` with ``M`` a parameter-name → tensor dict (e.g. a target gradient).

        Linear layers: ``Σ_t δ_{i,t}ᵀ M a_{i,t}``, about one extra forward of each layer.
        """
        out = torch.zeros(len(self), device=self.losses.device)
        for layer in self.layers:
            out += layer.dot_dense(dense)
        return out

    def weighted_sum(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """``Σ_i w_i g_i`` per parameter (linear: ``(w ⊙ D)ᵀ A``, one GEMM).

        Only the samples with ``w_i ≠ 0`` enter it (a selection of k of B: k/B of the GEMMs).
        """
        w = weights.float().to(self.losses.device)
        layers = self.layers
        used = (w != 0).nonzero().squeeze(1)
        if 0 < len(used) < len(w):
            layers, w = [layer.select(used) for layer in layers], w[used]
        return _sum_dicts(layer.weighted_sum(w) for layer in layers)

    def materialize(self) -> dict[str, torch.Tensor]:
        """Parameter name → (B, *param.shape) per-sample gradients (memory ``B`` × params)."""
        return _sum_dicts(layer.per_sample() for layer in self.layers)

    def select(self, indices: torch.Tensor | slice) -> FactorizedGrads:
        """The gradients of a subset of samples (views where possible: a ``slice`` of rows
        is a view of every factor)."""
        idx = indices if isinstance(indices, slice) else indices.to(self.losses.device)
        return FactorizedGrads([layer.select(idx) for layer in self.layers], self.losses[idx],
                               route=self.route)

    @staticmethod
    def concat(parts: Sequence[FactorizedGrads]) -> FactorizedGrads:
        """Join the gradients of several micro-batches along the sample axis.

        Micro-batches of different lengths are zero-padded along tokens: a zero ``D`` row
        contributes nothing to any gradient.
        """
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        layers = [type(layer).concat([p.layers[i] for p in parts])
                  for i, layer in enumerate(first.layers)]
        losses = torch.cat([p.losses for p in parts])
        return FactorizedGrads(layers, losses, route=first.route)


def _tied_groups(layers: Sequence[Any]) -> list[list[int]]:
    """Indices of the uses of each weight that more than one use shares (a tied head)."""
    by_weight: dict[str, list[int]] = {}
    for i, layer in enumerate(layers):
        by_weight.setdefault(layer.weight_name, []).append(i)
    others = [n for layer in layers for n in layer.param_names if n != layer.weight_name]
    shared = sorted({n for n in others if others.count(n) > 1} | (set(others) & set(by_weight)))
    if shared:
        raise ValueError(f"only a weight may be shared between captured modules, not {shared}")
    return [group for group in by_weight.values() if len(group) > 1]


def _weight_entry(
    layer: Any, tensors: Mapping[str, torch.Tensor] | None, what: str = "precondition"
) -> torch.Tensor | None:
    """The float32 entry of ``tensors`` (P, or a dense M) for the weight of ``layer``."""
    if tensors is None:
        return None
    if layer.weight_name not in tensors:
        raise KeyError(f"{what} has no entry for parameter {layer.weight_name!r}")
    return tensors[layer.weight_name].float().to(layer.device)


def _summed_per_sample(uses: Sequence[Any], rows: slice) -> torch.Tensor:
    """(b, numel) per-sample gradients of a shared weight: the sum over its uses (the uses
    that can add themselves in place, e.g. an embedding's few rows, go last)."""
    uses = sorted(uses, key=lambda u: hasattr(u, "add_weight_per_sample"))
    total = uses[0].weight_per_sample(rows)
    for u in uses[1:]:
        if hasattr(u, "add_weight_per_sample"):
            u.add_weight_per_sample(total, rows)
        else:
            total += u.weight_per_sample(rows)
    return total


def _cross_gram(u: Any, v: Any, p: torch.Tensor | None) -> torch.Tensor:
    """(B, B') ``⟨g_i(u), P ⊙ h_j(v)⟩`` between two uses of one weight (u, v: two batches)."""
    out = u.cross_gram(v, p)
    if out is not None:
        return out
    out = v.cross_gram(u, p)
    if out is not None:
        return out.T
    # generic and exact: materialize both uses' weight gradients, chunk by chunk
    flat_p = None if p is None else p.reshape(1, -1)
    return chunked_gram(u.weight_per_sample, v.weight_per_sample, len(u), len(v),
                        u.weight_numel, flat_p, False, u.device)


def _cross_sq_norms(u: Any, v: Any, p: torch.Tensor | None) -> torch.Tensor:
    """(B,) ``⟨g_i(u), P ⊙ g_i(v)⟩`` between two uses of one weight in the same batch."""
    out = u.cross_sq_norms(v, p)
    if out is None:
        out = v.cross_sq_norms(u, p)
    if out is not None:
        return out
    parts = []
    for rows in row_chunks(len(u), u.weight_numel):
        g, h = u.weight_per_sample(rows), v.weight_per_sample(rows)
        parts.append((g * h * (1.0 if p is None else p.reshape(1, -1))).sum(dim=1))
    return torch.cat(parts)


def _sum_dicts(dicts: Any) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for d in dicts:
        for name, g in d.items():
            out[name] = g if name not in out else out[name] + g
    return out
