"""``K``, ``b`` and a cross Gram from one materialization of each large per-sample gradient.

A selection step needs three inner products of the candidates' per-sample gradients ``g_i``:

    K_ij = ⟨g_i, Q ⊙ g_j⟩,   b_i = ⟨g_i, M⟩,   C_it = ⟨g_i, R ⊙ h_t⟩   (h_t: another batch)

With an elementwise preconditioner each of them forms ``g_i`` of every linear layer (the
materialize route, DESIGN.md §3), so computing them one by one forms the largest layer's
per-sample gradients (a vocabulary head: ``B T V d`` multiply-adds, as much as the head's
weight gradient) two or three times. Here each large weight is formed once, a block of weight
rows at a time, and all three products are read from the block while it is in cache:

* memory: ``B × INNER_BLOCK`` floats per block, never ``B ×`` the weight;
* accuracy: one GEMM per block of at most ``INNER_BLOCK`` columns, summed in float32, as
  ``blocked_inner`` does;
* a head's factors hold only each sample's rows with loss (``capture``), so forming its
  per-sample gradients costs the loss tokens, not every position.

Weights formed this way: every linear layer whose Gram materializes (any ``Q``, or the
materialize route), in the layout ``(d_out, d_in[+1])`` of ``LayerFactors.dense``, and every
weight tied between uses that are weight-only (an input embedding and an output head), in the
parameter's own layout. Everything else (norms, untied embeddings, ghost-route layers) takes
its own ``gram`` and ``dot_dense``, which are cheap for those kinds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from gradsift.factor_kinds import EmbeddingFactors
from gradsift.linear_factors import INNER_BLOCK, LayerFactors, is_identity, linear_route

if TYPE_CHECKING:
    from gradsift.factors import FactorizedGrads

Tensors = Mapping[str, torch.Tensor]


@dataclass
class Products:
    """The products of one call (``FactorizedGrads.products``).

    Attributes:
        gram: (B, B) ``K_ij = ⟨g_i, Q ⊙ g_j⟩``.
        dots: (B,) ``b_i = ⟨g_i, M⟩``.
        cross: (B, B') ``C_it = ⟨g_i, R ⊙ h_t⟩``, or None without another batch.
    """

    gram: torch.Tensor
    dots: torch.Tensor
    cross: torch.Tensor | None


class _Use:
    """One use of a weight as factors ``W_i = lhs_iᵀ rhs_i`` (rows of lhs: the weight's rows)."""

    def __init__(self, layer: Any, augmented: bool):
        self.embedding = isinstance(layer, EmbeddingFactors)
        if self.embedding:
            self.ids, self.delta = layer.ids, layer.d()
            return
        if augmented:  # (d_out, d_in[+1]): D against [A 1], as LayerFactors.dense lays it out
            self.lhs, rhs = layer.output_grads, layer.a()
        else:  # the parameter's own orientation
            self.lhs, rhs = layer._lhs_rhs(None)
        self.rhs = rhs.float()
        # a compact layer keeps I on one side: a block of W_i = lhs_iᵀ rhs_i is then the other
        # side's rows, copied, not multiplied by I
        self.identity = "rhs" if is_identity(self.rhs) else "lhs" if is_identity(self.lhs) else ""
        # a head's rows are each sample's rows with loss, padded with zero rows to the longest
        # (``capture``); zero rows add nothing, so each sample's GEMM runs over its own rows
        self.counts = None if self.identity else _rows_in_use(self.rhs)

    def write(self, out: torch.Tensor, rows: slice, add: bool) -> None:
        """``out (b, |rows|, width) (+)= W_i[rows]`` for every sample i."""
        if self.embedding:  # scatter δ_it into row x_it - rows.start, where it falls in rows
            if not add:
                out.zero_()
            b, n, width = out.shape
            hit = (self.ids >= rows.start) & (self.ids < rows.stop)
            sample = torch.arange(b, device=hit.device).unsqueeze(1).expand_as(hit)[hit]
            out.view(b * n, width).index_add_(0, sample * n + self.ids[hit] - rows.start,
                                              self.delta[hit])
            return
        if self.identity:
            block = (self.lhs[..., rows].float().transpose(1, 2) if self.identity == "rhs"
                     else self.rhs[:, rows])
            if add:
                out.add_(block)
            else:
                out.copy_(block)
            return
        lhs = self.lhs[..., rows].float().transpose(1, 2)
        if self.counts is not None:
            for i, n in enumerate(self.counts):
                if add:
                    out[i].addmm_(lhs[i, :, :n], self.rhs[i, :n])
                else:
                    torch.mm(lhs[i, :, :n], self.rhs[i, :n], out=out[i])
        elif add:
            out.baddbmm_(lhs, self.rhs)
        else:
            torch.bmm(lhs, self.rhs, out=out)


def _rows_in_use(x: torch.Tensor) -> list[int] | None:
    """Per sample, the rows of (b, T, n) ``x`` up to its last nonzero one, when the trailing
    zero rows are at least a quarter of all (else None: one batched GEMM is cheaper)."""
    if x.dim() != 3 or x.shape[1] == 0:
        return None
    nonzero = (x != 0).any(dim=2)
    position = torch.arange(1, x.shape[1] + 1, device=x.device)
    counts = (nonzero * position).amax(dim=1).tolist()
    return counts if sum(counts) <= 0.75 * x.shape[0] * x.shape[1] else None


class _Weight:
    """The per-sample gradients of one weight (the sum of its uses), by blocks of rows."""

    def __init__(self, uses: Sequence[Any], augmented: bool):
        self.uses = sorted((_Use(u, augmented) for u in uses), key=lambda u: u.embedding)
        self.n = len(uses[0])
        self.device = uses[0].device
        if augmented:
            self.rows, self.width = uses[0].d_out, uses[0].d_in_aug
        else:
            shape = _entry(uses[0], None, "")
            self.rows, self.width = shape

    def block(self, rows: slice, out: torch.Tensor) -> torch.Tensor:
        """(b, |rows| × width) per-sample gradients of these weight rows, flattened."""
        view = out[: self.n * (rows.stop - rows.start) * self.width].view(
            self.n, rows.stop - rows.start, self.width)
        self.write(rows, view)
        return view.view(self.n, -1)

    def write(self, rows: slice, view: torch.Tensor) -> None:
        """``view (b, |rows|, width) = W_i[rows]`` (``view`` may be strided, e.g. columns of a
        pack of several weights)."""
        for j, use in enumerate(self.uses):
            use.write(view, rows, add=j > 0)


def _entry(layer: Any, tensors: Tensors | None, what: str) -> Any:
    """The weight's entry of ``tensors`` as a (rows, width) float32 matrix in the parameter's
    own layout; with ``tensors`` None, just (rows, width)."""
    if isinstance(layer, EmbeddingFactors):
        shape = (layer.num_embeddings, layer.dim)
    else:
        shape = (layer.d_in, layer.d_out) if layer.weight_transposed else (layer.d_out,
                                                                             layer.d_in)
    if tensors is None:
        return shape
    if layer.weight_name not in tensors:
        raise KeyError(f"{what} has no entry for parameter {layer.weight_name!r}")
    return tensors[layer.weight_name].float().to(layer.device).reshape(shape)


def _weight_products(uses: Sequence[Any], others: Sequence[Any] | None, augmented: bool,
                     dense: Tensors, gram_p: Tensors | None, cross_p: Tensors | None,
                     out: Products) -> None:
    """Add one weight's share of ``K``, ``b`` and ``C`` to ``out``, a block of rows at a time."""
    first = uses[0]
    if augmented:
        def entry(tensors: Tensors | None, what: str) -> torch.Tensor | None:
            return None if tensors is None else first.dense(tensors, what)
    else:
        def entry(tensors: Tensors | None, what: str) -> torch.Tensor | None:
            return None if tensors is None else _entry(first, tensors, what)
    m, q, r = entry(dense, "dense"), entry(gram_p, "precondition"), entry(cross_p, "precondition")
    mine = _Weight(uses, augmented)
    theirs = None if others is None else _Weight(others, augmented)
    n, n2 = mine.n, 0 if theirs is None else theirs.n
    # Q = R: K and C are one GEMM, (Q ⊙ g) against [g; h] (the cross Gram's rows after K's)
    joint = theirs is not None and gram_p is cross_p
    # Q > 0 (Adam's P): K (and C) from √Q ⊙ [g; h] scaled in place, both sides of one GEMM
    # reading the same buffer, instead of Q ⊙ g written to a second one (half the traffic)
    # (Q ≥ 0 always: every optimizer reader's P is, checked for registered ones in
    # optim_state, so this needs no look at Q's values: no host sync per layer)
    root = q.sqrt() if q is not None and (theirs is None or joint) else None
    step = max(1, INNER_BLOCK // mine.width)
    size = min(step, mine.rows) * mine.width
    # buffers reused by every block: a fresh multi-MB tensor per block costs page faults
    buf = torch.empty((n + n2) * size, device=mine.device)
    scaled = torch.empty(0 if root is not None else max(n, n2) * size, device=mine.device)
    both = torch.zeros(n, n + n2, device=mine.device) if joint else None
    for start in range(0, mine.rows, step):
        rows = slice(start, min(start + step, mine.rows))
        cols = (rows.stop - rows.start) * mine.width
        mine.block(rows, buf)
        if theirs is not None:
            theirs.block(rows, buf[n * cols :])
        _add_block(buf[: (n + n2) * cols].view(n + n2, cols), n, m[rows].reshape(-1),
                   _rows_of(q, rows), _rows_of(root, rows), _rows_of(r, rows),
                   joint, both, scaled, out)
    if both is not None:
        out.gram += both[:, :n]
        out.cross += both[:, n:]


def _rows_of(x: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if x is None else x[rows].reshape(-1)


def _add_block(gh: torch.Tensor, n: int, m: torch.Tensor, q: torch.Tensor | None,
               root: torch.Tensor | None, r: torch.Tensor | None, joint: bool,
               both: torch.Tensor | None, scaled: torch.Tensor, out: Products) -> None:
    """Add one block of columns to ``K``, ``b`` and ``C``: ``gh`` holds the candidates'
    per-sample gradients ``g`` (first ``n`` rows) and the other batch's ``h`` (the rest), and
    ``m``, ``q``, ``√q``, ``r`` are ``M``, ``Q``, ``√Q``, ``R`` at the same columns."""
    g, h = gh[:n], gh[n:] if gh.shape[0] > n else None
    n2, cols = gh.shape[0] - n, gh.shape[1]
    out.dots.addmv_(g, m)
    if root is not None:  # √Q ⊙ [g; h] in place: K (and C when R = Q) in one GEMM
        gh.mul_(root.view(1, -1))
        (both if joint else out.gram).addmm_(gh[:n], gh.T)
        return
    gq = g if q is None else torch.mul(g, q.view(1, -1), out=scaled[: n * cols].view(n, cols))
    if h is None:
        out.gram.addmm_(gq, g.T)
        return
    if joint:
        both.addmm_(gq, gh.T)
        return
    out.gram.addmm_(gq, g.T)
    hr = h if r is None else torch.mul(h, r.view(1, -1), out=scaled[: n2 * cols].view(n2, cols))
    out.cross.addmm_(g, hr.T)


def _packed_products(layers: Sequence[LayerFactors], others: Sequence[LayerFactors] | None,
                     dense: Tensors, gram_p: Tensors | None, cross_p: Tensors | None,
                     out: Products) -> None:
    """``_weight_products`` for many small weights at once: their per-sample gradients side by
    side in packs of at most ``INNER_BLOCK`` columns, so a pack costs one GEMM for ``K``
    (one for ``b``, one for ``C``) instead of one per weight. (LoRA's adapters: 240 weights of
    ~5k entries each on SmolLM2. On a GPU each small GEMM is a launch, and the launches, not
    the arithmetic, made the step.)"""
    mine = [_Weight([u], True) for u in layers]
    theirs = None if others is None else [_Weight([v], True) for v in others]
    n, n2 = mine[0].n, 0 if theirs is None else theirs[0].n
    joint = theirs is not None and gram_p is cross_p
    packs, size = [], 0
    for i, w in enumerate(mine):
        if not packs or size + w.rows * w.width > INNER_BLOCK:
            packs.append([])
            size = 0
        packs[-1].append(i)
        size += w.rows * w.width
    widest = max(sum(mine[i].rows * mine[i].width for i in pack) for pack in packs)
    buf = torch.empty((n + n2) * widest, device=mine[0].device)
    rooted = gram_p is not None and (theirs is None or joint)
    scaled = torch.empty(0 if rooted else max(n, n2) * widest, device=mine[0].device)
    both = torch.zeros(n, n + n2, device=mine[0].device) if joint else None

    def entries(tensors: Tensors | None, what: str, pack: list[int]) -> torch.Tensor | None:
        if tensors is None:
            return None
        return torch.cat([layers[i].dense(tensors, what).reshape(-1) for i in pack])

    for pack in packs:
        cols = sum(mine[i].rows * mine[i].width for i in pack)
        gh = buf[: (n + n2) * cols].view(n + n2, cols)
        start = 0
        for i in pack:
            w = mine[i]
            part = slice(start, start + w.rows * w.width)
            w.write(slice(0, w.rows), gh[:n, part].unflatten(1, (w.rows, w.width)))
            if theirs is not None:
                theirs[i].write(slice(0, w.rows), gh[n:, part].unflatten(1, (w.rows, w.width)))
            start = part.stop
        q = entries(gram_p, "precondition", pack)
        _add_block(gh, n, entries(dense, "dense", pack), q,
                   q.sqrt() if rooted else None, entries(cross_p, "precondition", pack),
                   joint, both, scaled, out)
    if both is not None:
        out.gram += both[:, :n]
        out.cross += both[:, n:]


def products(grads: FactorizedGrads, dense: Tensors, precondition: Tensors | None = None,
             other: FactorizedGrads | None = None,
             other_precondition: Tensors | None = None) -> Products:
    """``K = ⟨g_i, Q ⊙ g_j⟩``, ``b = ⟨g_i, M⟩`` and ``C = ⟨g_i, R ⊙ h_t⟩`` in one pass.

    Args:
        grads: the candidates' per-sample gradients (``g``).
        dense: parameter name → ``M`` (e.g. ``P ⊙ ĝ``).
        precondition: parameter name → ``Q`` for ``K`` (None: 1).
        other: another batch over the same parameters (``h``), for ``C``; None: no ``C``.
        other_precondition: parameter name → ``R`` for ``C`` (None: 1).
    """
    dev = grads.losses.device
    out = Products(torch.zeros(len(grads), len(grads), device=dev),
                   torch.zeros(len(grads), device=dev),
                   None if other is None else torch.zeros(len(grads), len(other), device=dev))
    pairs = grads._paired_layers(other) if other is not None else None
    shared = {i for group in grads._groups for i in group}
    small: list[int] = []  # weights of at most one block: formed side by side, in packs
    for i, layer in enumerate(grads.layers):
        if i in shared:
            continue
        theirs = None if pairs is None else pairs[i][1]
        if isinstance(layer, LayerFactors) and (
                precondition is not None or other_precondition is not None
                or linear_route(layer, layer, grads.route, True) == "materialize"):
            if layer.d_out * layer.d_in_aug <= INNER_BLOCK:
                small.append(i)
                continue
            _weight_products([layer], None if theirs is None else [theirs], True, dense,
                             precondition, other_precondition, out)
            continue
        out.gram += layer.gram(layer, precondition, grads.route, True, dense, out.dots)
        if theirs is not None:
            out.cross += layer.gram(theirs, other_precondition, grads.route, False)
    if small:
        _packed_products([grads.layers[i] for i in small],
                         None if pairs is None else [pairs[i][1] for i in small],
                         dense, precondition, other_precondition, out)
    for group in grads._groups:
        uses = [grads.layers[i] for i in group]
        theirs = None if pairs is None else [pairs[i][1] for i in group]
        if all(u.param_names == [u.weight_name] for u in uses):
            _weight_products(uses, theirs, False, dense, precondition, other_precondition, out)
            continue
        same = [(u, u) for u in uses]
        out.gram += grads._shared_gram(same, precondition, True, fused=False, dense=dense,
                                       dots=out.dots)
        if theirs is not None:
            out.cross += grads._shared_gram(list(zip(uses, theirs, strict=True)),
                                            other_precondition, False, fused=False)
    return out
