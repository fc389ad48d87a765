"""A linear layer's per-sample gradients as factors, and the blocks every kind computes with.

A linear layer's per-sample gradient is ``g_i = D_iᵀ A_i`` (DESIGN.md §2). A trainable bias
is folded in by appending a column of ones to ``A``: ``[g_i(W) g_i(b)] = D_iᵀ [A_i 1]``.

Routes for the Gram matrix ``⟨g_i, h_j⟩`` of one linear layer (B×T samples against B'×T'):

* ``ghost``: ``sum((A_i A_jᵀ) ⊙ (D_i D_jᵀ))``; cost ``B B' T T' (d_in + d_out)``,
  memory ``B B' T T'`` (chunked over rows).
* ``materialize``: form ``g_i`` (``d_out × d_in``) then one GEMM; cost
  ``(B T + B' T') d_in d_out + B B' d_in d_out``, memory ``B d_in d_out`` (chunked).
* ``auto``: per layer and per call, the route with the smaller cost above. Short sequences
  with wide layers pick ghost, long contexts pick materialize, so memory never grows as
  ``T²`` when materializing is cheaper.

An elementwise (Adam) preconditioner ``P`` cannot be pulled through a linear layer's token
sums, so a preconditioned linear Gram always takes the materialize route: exact, one layer
and one chunk of samples at a time. ``dot_dense`` never materializes:
``⟨g_i, M⟩ = Σ_t δ_{i,t}ᵀ M a_{i,t}``. All arithmetic is float32 whatever the model's dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

ROUTES = ("auto", "ghost", "materialize")
# Upper bound on the floats of one temporary block (per-sample grads or token Gram): 64M = 256 MB.
BLOCK_FLOATS = 64 * 2**20
# Columns summed per partial product in a materialized Gram (float32 accuracy, see below).
INNER_BLOCK = 65536


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


def row_chunks(n: int, floats_per_row: int, max_rows: int | None = None) -> list[slice]:
    """Slices of ``range(n)`` whose blocks of ``floats_per_row`` floats stay under BLOCK_FLOATS."""
    step = max(1, BLOCK_FLOATS // max(1, floats_per_row))
    if max_rows is not None:
        step = min(step, max(1, max_rows))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]



def chunked_gram(materialize_g, materialize_h, b: int, b2: int, size: int,
                 p: torch.Tensor | None, same: bool, device: torch.device,
                 dense: torch.Tensor | None = None,
                 dots: torch.Tensor | None = None) -> torch.Tensor:
    """(b, b2) ``⟨g_i, P ⊙ h_j⟩`` from per-sample flattened gradients, chunk by chunk.

    ``materialize_g(rows)`` / ``materialize_h(cols)`` return (n, size) float32 blocks;
    ``same``: g and h are the same batch (materialized once when one chunk holds it).
    With ``dense`` (size,) and ``dots`` (b,), also ``dots += g @ dense`` from the same blocks.
    """
    chunks2 = row_chunks(b2, size)
    if same and len(chunks2) == 1:
        g = materialize_g(slice(0, b))
        if dots is not None:
            dots += g @ dense
        return blocked_inner(g, g if p is None else g * p)
    out = torch.empty(b, b2, device=device)
    for cols in chunks2:
        h = materialize_h(cols)
        if p is not None:
            h = h * p
        for rows in row_chunks(b, size):
            g = materialize_g(rows)
            if dots is not None and cols.start == 0:
                dots[rows] += g @ dense
            out[rows, cols] = blocked_inner(g, h)
    return out


_EYES: dict[tuple[int, str], torch.Tensor] = {}  # one float32 I per (size, device)


def identity_factor(batch: int, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(batch, size, size) ``I`` for every sample, as a view of one shared float32 ``I``: the
    factor a compact layer keeps on one side (``capture._compact_linear``)."""
    key = (size, str(torch.device(device)))
    if key not in _EYES:
        _EYES[key] = torch.eye(size, dtype=torch.float32, device=device)
    return _EYES[key].expand(batch, size, size)


def is_identity(x: torch.Tensor) -> bool:
    """Whether ``x`` is an :func:`identity_factor` (or a slice of one): told by where it points,
    not by its values, so the check reads nothing from the device (no host sync per layer). An
    identity built any other way is multiplied as it stands: the same result, at GEMM cost."""
    if x.dim() != 3 or x.shape[1] != x.shape[2] or x.shape[1] == 0 or x.stride(0) != 0:
        return False
    eye = _EYES.get((x.shape[1], str(x.device)))
    return (eye is not None and x.dtype == eye.dtype and x.stride() == (0, *eye.stride())
            and x.storage_offset() == 0 and x.data_ptr() == eye.data_ptr())


def per_sample_products(lhs: torch.Tensor, rhs: torch.Tensor,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """(b, m, n) float32 ``lhs_iᵀ rhs_i`` for (b, T, m) and (b, T, n), summed over tokens.

    With one side ``I`` (a compact layer) the product is the other side, copied, not multiplied.
    """
    if is_identity(rhs):
        product = lhs.float().transpose(1, 2)
    elif is_identity(lhs):
        product = rhs.float()
    else:
        return torch.bmm(lhs.float().transpose(1, 2), rhs.float(), out=out)
    if out is None:
        return product.contiguous()
    return out.copy_(product)


def pad_tokens(x: torch.Tensor, t: int, value: float = 0) -> torch.Tensor:
    """Pad dim 1 (tokens) of ``x`` to length ``t``."""
    if x.shape[1] == t:
        return x
    pad = [0, 0] * (x.dim() - 2) + [0, t - x.shape[1]]
    return torch.nn.functional.pad(x, pad, value=value)


@dataclass
class LayerFactors:
    """Factors of one linear-like layer: ``g_i(W) = D_iᵀ A_i``.

    Attributes:
        module_name: name in ``model.named_modules()``.
        weight_name, bias_name: parameter names (``bias_name`` is None without trainable bias).
        inputs: A, (B, T, d_in), in the model's dtype.
        output_grads: D, (B, T, d_out).
        weight_transposed: the parameter is stored as (d_in, d_out) (GPT-2 ``Conv1D``).

    An output head keeps only each sample's rows with loss (``capture``): its ``D`` is exactly
    zero at the others, and every product then costs the loss tokens only.
    """

    module_name: str
    weight_name: str
    bias_name: str | None
    inputs: torch.Tensor
    output_grads: torch.Tensor
    weight_transposed: bool = False

    kind = "linear"

    def __len__(self) -> int:
        return self.inputs.shape[0]

    @property
    def device(self) -> torch.device:
        return self.inputs.device

    @property
    def param_names(self) -> list[str]:
        return [self.weight_name] + ([self.bias_name] if self.bias_name is not None else [])

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
        return per_sample_products(self.d(rows), self.a(rows))

    def split(self, g: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split (…, d_out, d_in[+1]) back into parameter-shaped weight (and bias) tensors."""
        out = {}
        w = g[..., : self.d_in]
        out[self.weight_name] = w.transpose(-1, -2) if self.weight_transposed else w
        if self.bias_name is not None:
            out[self.bias_name] = g[..., self.d_in]
        return out

    # ------------------------------------------------------------ one use, two batches
    def gram(self, other: LayerFactors, precondition: Mapping[str, torch.Tensor] | None,
             route: str, same: bool, dense: Mapping[str, torch.Tensor] | None = None,
             dots: torch.Tensor | None = None) -> torch.Tensor:
        """(B, B') ``⟨g_i, P ⊙ h_j⟩`` of this layer against the same layer of another batch.

        With ``dense`` and ``dots`` (self-Gram only), also ``dots += dot_dense(dense)``, from
        the materialized per-sample gradients when the route materializes them anyway.
        """
        p = None if precondition is None else self.dense(precondition, "precondition")
        if p is None and linear_route(self, other, route, same) == "ghost":
            out = self._gram_ghost(other, same)
            if dots is not None:
                dots += self.dot_dense(dense)
            return out
        m = None if dots is None else self.dense(dense, "dense").reshape(-1)
        return self._gram_materialize(other, p, same, m, dots)

    def _gram_ghost(self, other: LayerFactors, same: bool) -> torch.Tensor:
        b, t = self.inputs.shape[:2]
        b2, t2 = other.inputs.shape[:2]
        a2 = other.a().reshape(b2 * t2, -1)
        d2 = other.d().reshape(b2 * t2, -1)
        out = torch.empty(b, b2, device=a2.device)
        # A batch against itself is symmetric: each row block is computed only against the
        # columns from its own start on and mirrored (four blocks: ~5/8 of the work).
        chunks = row_chunks(b, t * b2 * t2, max_rows=-(-b // 4) if same else None)
        for rows in chunks:
            n = rows.stop - rows.start
            first = rows.start if same else 0
            cols = slice(first * t2, b2 * t2)
            aa = (self.a(rows).reshape(n * t, -1) @ a2[cols].T).view(n, t, b2 - first, t2)
            dd = (self.d(rows).reshape(n * t, -1) @ d2[cols].T).view(n, t, b2 - first, t2)
            block = (aa * dd).sum(dim=(1, 3))
            out[rows, first:] = block
            if same:
                out[first:, rows] = block.T
        return out

    def _gram_materialize(self, other: LayerFactors, p: torch.Tensor | None, same: bool,
                          dense: torch.Tensor | None = None,
                          dots: torch.Tensor | None = None) -> torch.Tensor:
        def flat(layer: LayerFactors):
            return lambda rows: layer.materialize(rows).reshape(rows.stop - rows.start, -1)

        return chunked_gram(flat(self), flat(other), len(self), len(other),
                            self.d_out * self.d_in_aug, None if p is None else p.reshape(1, -1),
                            same, self.inputs.device, dense, dots)

    # --------------------------------------------------------------------- one batch
    def sq_norms(self, precondition: Mapping[str, torch.Tensor] | None, route: str) -> torch.Tensor:
        """(B,) ``⟨g_i, P ⊙ g_i⟩`` of this layer."""
        b, t = self.inputs.shape[:2]
        d_in = self.d_in_aug
        out = torch.zeros(b, device=self.inputs.device)
        p = None if precondition is None else self.dense(precondition, "precondition")
        # per-sample diagonal: ghost costs t² (d_in + d_out), materialize t d_in d_out.
        ghost = p is None and (
            route == "ghost" or (route == "auto" and t * (d_in + self.d_out) < d_in * self.d_out)
        )
        if ghost:
            for rows in row_chunks(b, t * t):
                a, d = self.a(rows), self.d(rows)
                out[rows] = ((a @ a.transpose(1, 2)) * (d @ d.transpose(1, 2))).sum(dim=(1, 2))
        else:
            for rows in row_chunks(b, self.d_out * d_in):
                g = self.materialize(rows)
                out[rows] = (g * g * (1.0 if p is None else p)).sum(dim=(1, 2))
        return out

    def dot_dense(self, dense: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B,) ``⟨g_i, M⟩ = Σ_t δ_{i,t}ᵀ M a_{i,t}``: about one extra forward of the layer."""
        m = self.dense(dense, "dense")
        b, t = self.inputs.shape[:2]
        out = torch.zeros(b, device=self.inputs.device)
        for rows in row_chunks(b, t * self.d_out):
            out[rows] = (self.d(rows) * (self.a(rows) @ m.T)).sum(dim=(1, 2))
        return out

    def weighted_sum(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """``Σ_i w_i g_i`` as ``(w ⊙ D)ᵀ A``: one GEMM; with a compact side ``I``, the weighted
        sum of the other side."""
        a, d = self.a(), self.d()
        if is_identity(a):  # A' = I: Σ_i w_i D'_iᵀ
            return self.split(torch.tensordot(weights, d, dims=1).T.contiguous())
        if is_identity(d):  # D' = I: Σ_i w_i A'_i
            return self.split(torch.tensordot(weights, a, dims=1))
        d = (d * weights.view(-1, 1, 1)).reshape(-1, self.d_out)
        return self.split(d.T @ a.reshape(d.shape[0], -1))

    def per_sample(self) -> dict[str, torch.Tensor]:
        """Parameter name → (B, *param.shape) per-sample gradients."""
        return self.split(self.materialize())

    def select(self, idx: torch.Tensor | slice) -> LayerFactors:
        def pick(x: torch.Tensor) -> torch.Tensor:
            if not is_identity(x):
                return x[idx]
            n = len(range(len(x))[idx]) if isinstance(idx, slice) else len(idx)
            return identity_factor(n, x.shape[1], x.device)

        return replace(self, inputs=pick(self.inputs), output_grads=pick(self.output_grads))

    @staticmethod
    def concat(parts: Sequence[LayerFactors]) -> LayerFactors:
        """Join along samples; shorter parts are zero-padded along tokens (a zero D row adds 0)."""
        t = max(p.inputs.shape[1] for p in parts)

        def join(sides: list[torch.Tensor]) -> torch.Tensor:
            if all(is_identity(x) and x.shape[1] == t for x in sides):
                return identity_factor(sum(len(x) for x in sides), t, sides[0].device)
            return torch.cat([pad_tokens(x, t) for x in sides])

        return replace(parts[0], inputs=join([p.inputs for p in parts]),
                       output_grads=join([p.output_grads for p in parts]))

    # ------------------------------------------- the weight alone, in parameter orientation
    def _lhs_rhs(self, rows: slice | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(row factor, column factor) of the weight, ``W_i = lhsᵀ rhs``, in the model's dtype."""
        a = self.inputs if rows is None else self.inputs[rows]
        d = self.output_grads if rows is None else self.output_grads[rows]
        return (a, d) if self.weight_transposed else (d, a)

    @property
    def weight_numel(self) -> int:
        return self.d_in * self.d_out

    def weight_rows(self, index: torch.Tensor | None, rows: slice | None = None) -> torch.Tensor:
        """(b, |index|, cols) per-sample gradients of the weight's rows ``index`` (all: None)."""
        lhs, rhs = self._lhs_rhs(rows)
        if index is not None:
            lhs = lhs[..., index]
        return per_sample_products(lhs, rhs)

    def weight_at(self, index: torch.Tensor, rows: slice) -> torch.Tensor:
        """(n, S, cols): sample i's own weight gradient at its weight rows ``index[i]`` (n, S).

        Gathers the S needed columns of the row factor first: cost ``n T S cols``, whatever
        the number of rows (a vocabulary) is.
        """
        lhs, rhs = self._lhs_rhs(rows)
        n, t = lhs.shape[:2]
        picked = torch.gather(lhs, 2, index.unsqueeze(1).expand(n, t, index.shape[1]))
        return torch.bmm(picked.float().transpose(1, 2), rhs.float())

    def weight_per_sample(self, rows: slice) -> torch.Tensor:
        """(b, numel) per-sample weight gradients in parameter orientation (a new tensor)."""
        return self.weight_rows(None, rows).reshape(rows.stop - rows.start, -1)

    def cross_gram(self, other: Any, p: torch.Tensor | None) -> torch.Tensor | None:
        """No specialised cross term between two linear uses: the generic one is exact."""
        return None

    def cross_sq_norms(self, other: Any, p: torch.Tensor | None) -> torch.Tensor | None:
        return None


def linear_route(u: LayerFactors, v: LayerFactors, route: str, same: bool) -> str:
    """The route of a linear layer's Gram: ``route`` itself, or by ``choose_route`` for auto."""
    if route != "auto":
        return route
    b, t = u.inputs.shape[:2]
    b2, t2 = v.inputs.shape[:2]
    return choose_route(b, t, b2, t2, u.d_in_aug, u.d_out, same=same)
