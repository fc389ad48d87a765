"""Factors of the parameter kinds that are not linear layers: embeddings and norms.

* Embedding ``y_t = W[x_t]``: a linear layer whose input is one-hot over the vocabulary,
  ``g_i = Σ_t e_{x_it} δ_itᵀ``. Only the rows a sample uses are nonzero, so nothing ever
  forms the (vocab × d) matrix per sample: ``⟨g_i, g_j⟩ = Σ_{t,s} [x_it = x_js] ⟨δ_it, δ_js⟩``
  (ghost), or both gradients at the rows the two batches share (materialize).
* Norm ``y_t = w ⊙ x̂_t (+ b)``: ``g_i(w) = Σ_t δ_it ⊙ x̂_it``, ``g_i(b) = Σ_t δ_it`` —
  d numbers per sample, so they are kept whole.

Both expose the methods ``FactorizedGrads`` calls on ``LayerFactors``. A weight shared by an
embedding and a linear output head (tied) adds the cross term
``⟨g_i(emb), P ⊙ h_j(head)⟩ = ⟨E_i[R], P[R] ⊙ H_j[R]⟩`` over the rows R the embedding uses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from gradsift.linear_factors import LayerFactors, chunked_gram, pad_tokens, row_chunks


def _param(tensors: Mapping[str, torch.Tensor], name: str, what: str,
           device: torch.device) -> torch.Tensor:
    if name not in tensors:
        raise KeyError(f"{what} has no entry for parameter {name!r}")
    return tensors[name].float().to(device)


@dataclass
class EmbeddingFactors:
    """Factors of one embedding lookup: ``g_i = Σ_t e_{x_it} δ_itᵀ`` (vocab × d, sparse rows).

    Attributes:
        module_name: name in ``model.named_modules()``.
        weight_name: the weight's name in ``model.named_parameters()``.
        ids: (B, T) token ids looked up.
        output_grads: δ, (B, T, d); zero where the id is the module's ``padding_idx``.
        num_embeddings: rows of the weight (the vocabulary).
    """

    module_name: str
    weight_name: str
    ids: torch.Tensor
    output_grads: torch.Tensor
    num_embeddings: int

    kind = "embedding"
    bias_name = None

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def device(self) -> torch.device:
        return self.output_grads.device

    @property
    def param_names(self) -> list[str]:
        return [self.weight_name]

    @property
    def dim(self) -> int:
        return self.output_grads.shape[-1]

    @property
    def weight_numel(self) -> int:
        return self.num_embeddings * self.dim

    def d(self, rows: slice | None = None) -> torch.Tensor:
        d = self.output_grads if rows is None else self.output_grads[rows]
        return d.float()

    def weight_rows(self, index: torch.Tensor | None, rows: slice | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
        """(b, |index|, d) per-sample gradients at weight rows ``index`` (all rows: None),
        added into ``out`` (contiguous, that many floats) when given."""
        ids = self.ids if rows is None else self.ids[rows]
        n = ids.shape[0]
        if index is None:
            index = torch.arange(self.num_embeddings, device=ids.device)
        k = index.shape[0]
        pos = torch.full((self.num_embeddings,), -1, dtype=torch.long, device=ids.device)
        pos[index] = torch.arange(k, device=ids.device)
        where = pos[ids]
        keep = where >= 0
        flat = (torch.arange(n, device=ids.device).unsqueeze(1) * k + where)[keep]
        out = (torch.zeros(n * k, self.dim, device=self.device) if out is None
               else out.view(n * k, self.dim))
        out.index_add_(0, flat, self.d(rows)[keep])
        return out.view(n, k, self.dim)

    def weight_per_sample(self, rows: slice) -> torch.Tensor:
        """(b, vocab·d) per-sample gradients, flattened (a new tensor)."""
        return self.weight_rows(None, rows).reshape(rows.stop - rows.start, -1)

    def add_weight_per_sample(self, total: torch.Tensor, rows: slice) -> None:
        """``total += weight_per_sample(rows)``, touching only the rows used."""
        self.weight_rows(None, rows, out=total)

    def _rows_gram(self, other: Any, index: torch.Tensor, p: torch.Tensor | None,
                   same: bool) -> torch.Tensor:
        """``⟨g_i[R], P[R] ⊙ h_j[R]⟩`` with R = ``index``: exact when g or h is zero off R."""
        k = index.shape[0]
        if k == 0:
            return torch.zeros(len(self), len(other), device=self.device)

        def flat(use: Any):
            return lambda r: use.weight_rows(index, r).reshape(r.stop - r.start, -1)

        pr = None if p is None else p[index].reshape(1, -1)
        return chunked_gram(flat(self), flat(other), len(self), len(other), k * self.dim, pr,
                            same, self.device)

    def gram(self, other: EmbeddingFactors, precondition: Mapping[str, torch.Tensor] | None,
             route: str, same: bool, dense: Mapping[str, torch.Tensor] | None = None,
             dots: torch.Tensor | None = None) -> torch.Tensor:
        """(B, B') ``⟨g_i, P ⊙ h_j⟩``: ghost ``Σ_{t,s} [x_it = x_js] ⟨δ_it, P[x_it] ⊙ δ_js⟩``,
        or materialize both at the rows both batches use. Both are exact with ``P``.
        With ``dots``, also ``dots += dot_dense(dense)``."""
        if dots is not None:
            dots += self.dot_dense(dense)
        p = None if precondition is None else _param(precondition, self.weight_name,
                                                     "precondition", self.device)
        index = self.ids.unique() if same else _shared(self.ids.unique(), other.ids.unique())
        b, t = self.ids.shape
        b2, t2 = other.ids.shape
        if route == "auto":
            ghost = b * b2 * t * t2 * (self.dim + 1)
            rows = (b * t + b2 * t2) * self.dim + b * b2 * index.shape[0] * self.dim
            route = "ghost" if ghost < rows else "materialize"
        if route != "ghost":
            return self._rows_gram(other, index, p, same)
        ids2 = other.ids.reshape(1, 1, b2, t2)
        d2 = other.d().reshape(b2 * t2, -1)
        out = torch.empty(b, b2, device=self.device)
        for rows in row_chunks(b, t * b2 * t2):
            n = rows.stop - rows.start
            d1 = self.d(rows) if p is None else self.d(rows) * p[self.ids[rows]]
            dd = (d1.reshape(n * t, -1) @ d2.T).view(n, t, b2, t2)
            out[rows] = (dd * (self.ids[rows].reshape(n, t, 1, 1) == ids2)).sum(dim=(1, 3))
        return out

    def sq_norms(self, precondition: Mapping[str, torch.Tensor] | None, route: str) -> torch.Tensor:
        """(B,) ``Σ_v ‖Σ_{t: x_it = v} δ_it‖²_P``: one scatter over (sample, row) keys."""
        p = None if precondition is None else _param(precondition, self.weight_name,
                                                     "precondition", self.device)
        return _keyed_inner(self, self, p)

    def dot_dense(self, dense: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B,) ``⟨g_i, M⟩ = Σ_t ⟨δ_it, M[x_it]⟩``."""
        m = _param(dense, self.weight_name, "dense", self.device)
        b, t = self.ids.shape
        out = torch.zeros(b, device=self.device)
        for rows in row_chunks(b, t * self.dim):
            out[rows] = (self.d(rows) * m[self.ids[rows]]).sum(dim=(1, 2))
        return out

    def weighted_sum(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """``Σ_i w_i g_i``: one ``index_add`` of ``w_i δ_it`` into row ``x_it``."""
        g = torch.zeros(self.num_embeddings, self.dim, device=self.device)
        g.index_add_(0, self.ids.reshape(-1), (self.d() * weights.view(-1, 1, 1)).reshape(
            -1, self.dim))
        return {self.weight_name: g}

    def per_sample(self) -> dict[str, torch.Tensor]:
        """(B, vocab, d) per-sample gradients."""
        return {self.weight_name: self.weight_rows(None)}

    def select(self, idx: torch.Tensor) -> EmbeddingFactors:
        return replace(self, ids=self.ids[idx], output_grads=self.output_grads[idx])

    @staticmethod
    def concat(parts: Sequence[EmbeddingFactors]) -> EmbeddingFactors:
        """Join along samples; padded tokens get id 0 and a zero δ (they add nothing)."""
        t = max(p.ids.shape[1] for p in parts)
        return replace(parts[0], ids=torch.cat([pad_tokens(p.ids, t) for p in parts]),
                       output_grads=torch.cat([pad_tokens(p.output_grads, t) for p in parts]))

    def cross_gram(self, other: Any, p: torch.Tensor | None) -> torch.Tensor | None:
        """(B, B') ``⟨g_i, P ⊙ h_j⟩`` against another use of this weight (e.g. a tied head),
        over the rows this embedding uses (and, for another embedding, that one too)."""
        index = self.ids.unique()
        if isinstance(other, EmbeddingFactors):
            index = _shared(index, other.ids.unique())
        elif not isinstance(other, LayerFactors):
            return None
        return self._rows_gram(other, index, p, same=False)

    def cross_sq_norms(self, other: Any, p: torch.Tensor | None) -> torch.Tensor | None:
        """(B,) ``⟨g_i, P ⊙ h_i⟩`` against another use of this weight in the same batch:
        ``Σ_t ⟨P[x_it] ⊙ δ_it, h_i[x_it]⟩``, a linear use evaluated only at sample i's ids."""
        if isinstance(other, EmbeddingFactors):
            return _keyed_inner(self, other, p)
        if not isinstance(other, LayerFactors):
            return None
        b, t = self.ids.shape
        out = torch.zeros(b, device=self.device)
        for rows in row_chunks(b, t * (other.output_grads.shape[1] + self.dim)):
            h = other.weight_at(self.ids[rows], rows)
            d = self.d(rows) if p is None else self.d(rows) * p[self.ids[rows]]
            out[rows] = (d * h).sum(dim=(1, 2))
        return out


def _shared(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sorted ids in both ``a`` and ``b`` (each already unique)."""
    return a[torch.isin(a, b)]


def _keyed_inner(u: EmbeddingFactors, v: EmbeddingFactors, p: torch.Tensor | None) -> torch.Tensor:
    """(B,) ``⟨g_i(u), P ⊙ g_i(v)⟩`` of two embedding uses in one batch, summed per
    (sample, row) key: cost ``B T d``, no vocabulary-sized tensor."""
    b, vocab = len(u), u.num_embeddings
    sample = torch.arange(b, device=u.ids.device).unsqueeze(1)
    keys = torch.cat([(sample * vocab + u.ids).reshape(-1), (sample * vocab + v.ids).reshape(-1)])
    uniq, inverse = torch.unique(keys, return_inverse=True)
    n = u.ids.numel()
    acc_u = torch.zeros(uniq.shape[0], u.dim, device=u.device)
    acc_u.index_add_(0, inverse[:n], u.d().reshape(-1, u.dim))
    if v is u:
        acc_v = acc_u
    else:
        acc_v = torch.zeros_like(acc_u).index_add_(0, inverse[n:], v.d().reshape(-1, v.dim))
    prod = acc_u * acc_v
    if p is not None:
        prod = prod * p[uniq % vocab]
    return torch.zeros(b, device=u.device).index_add_(0, uniq // vocab, prod.sum(dim=1))


@dataclass
class NormFactors:
    """Per-sample gradients of a norm's scale and shift, kept whole (d numbers per sample).

    ``g_i(w) = Σ_t δ_it ⊙ x̂_it`` with ``x̂`` the normalized input before scaling;
    ``g_i(b) = Σ_t δ_it``.

    Attributes:
        module_name: name in ``model.named_modules()``.
        weight_name, bias_name: parameter names (``bias_name`` None without trainable bias).
        weight_grads: (B, *weight.shape) float32.
        bias_grads: (B, *bias.shape) float32, or None.
    """

    module_name: str
    weight_name: str
    bias_name: str | None
    weight_grads: torch.Tensor
    bias_grads: torch.Tensor | None = None

    kind = "norm"

    def __len__(self) -> int:
        return self.weight_grads.shape[0]

    @property
    def device(self) -> torch.device:
        return self.weight_grads.device

    @property
    def param_names(self) -> list[str]:
        return [self.weight_name] + ([self.bias_name] if self.bias_name is not None else [])

    @property
    def weight_numel(self) -> int:
        return self.weight_grads[0].numel()

    def _flat(self, tensors: Mapping[str, torch.Tensor] | None = None,
              what: str = "") -> torch.Tensor:
        """(B, n) per-sample gradients, or (n,) of ``tensors`` (e.g. P) in the same layout."""
        if tensors is not None:
            return torch.cat([_param(tensors, n, what, self.device).reshape(-1)
                              for n in self.param_names])
        parts = [self.weight_grads] + ([self.bias_grads] if self.bias_name is not None else [])
        return torch.cat([g.reshape(len(self), -1) for g in parts], dim=1)

    def gram(self, other: NormFactors, precondition: Mapping[str, torch.Tensor] | None,
             route: str, same: bool, dense: Mapping[str, torch.Tensor] | None = None,
             dots: torch.Tensor | None = None) -> torch.Tensor:
        """(B, B') ``⟨g_i, P ⊙ h_j⟩``, one small GEMM (with ``dots``: ``+= dot_dense``)."""
        if dots is not None:
            dots += self.dot_dense(dense)
        h = other._flat()
        if precondition is not None:
            h = h * self._flat(precondition, "precondition")
        return self._flat() @ h.T

    def sq_norms(self, precondition: Mapping[str, torch.Tensor] | None, route: str) -> torch.Tensor:
        g = self._flat()
        p = 1.0 if precondition is None else self._flat(precondition, "precondition")
        return (g * g * p).sum(dim=1)

    def dot_dense(self, dense: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self._flat() @ self._flat(dense, "dense")

    def weighted_sum(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: torch.tensordot(weights, g, dims=1) for n, g in self.per_sample().items()}

    def per_sample(self) -> dict[str, torch.Tensor]:
        out = {self.weight_name: self.weight_grads}
        if self.bias_name is not None:
            out[self.bias_name] = self.bias_grads
        return out

    def weight_per_sample(self, rows: slice) -> torch.Tensor:
        """(b, numel) per-sample weight gradients (a new tensor)."""
        return self.weight_grads[rows].reshape(rows.stop - rows.start, -1).clone()

    def select(self, idx: torch.Tensor) -> NormFactors:
        return replace(self, weight_grads=self.weight_grads[idx],
                       bias_grads=None if self.bias_grads is None else self.bias_grads[idx])

    @staticmethod
    def concat(parts: Sequence[NormFactors]) -> NormFactors:
        bias = None if parts[0].bias_grads is None else torch.cat([p.bias_grads for p in parts])
        return replace(parts[0], weight_grads=torch.cat([p.weight_grads for p in parts]),
                       bias_grads=bias)

    def cross_gram(self, other: Any, p: torch.Tensor | None) -> None:
        return None

    def cross_sq_norms(self, other: Any, p: torch.Tensor | None) -> None:
        return None
