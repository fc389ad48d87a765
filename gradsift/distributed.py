"""Data-parallel runs (``torchrun`` / ``accelerate launch``, DDP) with one global selection.

Every rank holds a replica of the model and a contiguous slice of the global batch of ``B``
candidates (:func:`rank_slice`). ``gradsift.step.SelectionStep`` then, on every rank:

1. captures the factors of its local candidates (on the unwrapped module: DDP's forward is
   never called, so DDP's own gradient hooks never fire);
2. computes its share of the target gradient, ``g_V = Σ_r Σ_{t∈T_r} g_t / |T|`` with one
   ``all_reduce(SUM)`` (every rank draws the *same* target batch ``T`` from the same seeded
   generator and captures its slice ``T_r``);
3. exchanges what the selection needs (:class:`Exchange`): ``exact`` all-gathers the
   materialized per-sample gradients ``g_i`` (``B·numel`` floats: LoRA-sized models), ``sketch``
   all-gathers a seeded Kronecker projection ``S_out (√P̃ ⊙ g_i) S_inᵀ`` built from the factors
   (``B·sketch_dim`` floats per layer). Every rank then holds the same global candidates and
   runs the same selector with the same generator; rank 0's indices and weights are broadcast
   so the replicas can never drift;
4. puts its local share ``Σ_{i∈local} w_i g_i`` (global weights, ``Σ_i w_i = 1``) into
   ``.grad`` and sums the shares with ONE ``all_reduce(SUM)`` over every trainable gradient.
   The result is what one process computes on the concatenated batch.

``scope: local`` skips the exchange: each rank selects ``k/N`` of its own ``B/N`` and every
rank's selection weighs ``1/N`` (for comparison with the global selection).

Without an initialized process group every helper is a no-op and the step is the
single-process one, unchanged. FSDP and DeepSpeed ZeRO shard parameters or gradients, which
the factor capture and the direct ``.grad`` writes cannot see: :func:`check_supported` refuses
them at start.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradsift.factor_kinds import NormFactors
from gradsift.factors import FactorizedGrads, LayerFactors
from gradsift.optim_state import OptimizerState

EXCHANGES = ("exact", "sketch")
SCOPES = ("global", "local")


@dataclass
class DistributedConfig:
    """How ranks share one selection (ignored without a launcher).

    Attributes:
        exchange: ``exact`` (all-gather the per-sample gradients ``g_i``) or ``sketch``
            (all-gather a seeded Kronecker projection of ``√P̃ ⊙ g_i``, built from factors).
        scope: ``global`` (one selection of ``k`` over the global ``B``) or ``local`` (each
            rank selects ``k/N`` of its ``B/N``, no exchange).
        sketch_dim: numbers per linear layer and sample in the sketch, ``k_o k_i ≤ sketch_dim``
            (``√sketch_dim`` a side; a side narrower than that, LoRA's rank, is kept whole and
            the other gets the rest of the budget).
    """

    exchange: str = "exact"
    scope: str = "global"
    sketch_dim: int = 256

    def __post_init__(self) -> None:
        if self.exchange not in EXCHANGES:
            raise ValueError(f"exchange must be one of {EXCHANGES}, got {self.exchange!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if isinstance(self.sketch_dim, bool) or not isinstance(self.sketch_dim, int) or (
                self.sketch_dim < 1):
            raise ValueError(f"sketch_dim must be an integer >= 1, got {self.sketch_dim!r}")

    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | None) -> DistributedConfig:
        """From a mapping with the config keys (unknown keys raise, naming them)."""
        options = dict(options or {})
        unknown = sorted(set(options) - {"exchange", "scope", "sketch_dim"})
        if unknown:
            raise ValueError(f"unknown distributed option(s) {unknown}; valid: exchange, "
                             "scope, sketch_dim")
        return cls(**options)


# ---------------------------------------------------------------------- rank helpers
def is_distributed() -> bool:
    """A process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Ranks in the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process' rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """Rank 0 (the only process without a launcher): it writes logs and checkpoints."""
    return rank() == 0


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group a launcher (``torchrun``, ``accelerate launch``) describes in
    ``WORLD_SIZE``/``RANK``/``MASTER_ADDR``; gloo on CPU, nccl on CUDA. Returns whether the
    run is distributed (no launcher, or one rank: nothing is initialized)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
    return is_distributed()


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_distributed():
        dist.barrier()


def agree_max(value: int) -> int:
    """The largest ``value`` over the ranks (e.g. a stop request seen by any of them)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def rank_slice(n: int, rank_: int | None = None, world: int | None = None) -> slice:
    """This rank's contiguous part of ``n`` items: sizes differ by at most one, the slices of
    ranks ``0..N-1`` tile ``range(n)`` in order (so the global order is the stream's)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return slice(start, start + base + (r < extra))


def _comm_device(x: torch.Tensor) -> torch.device:
    """Where a collective's tensors must live: CUDA for nccl, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` concatenated along dim 0 in rank order (row counts may differ)."""
    if not is_distributed():
        return x
    dev = _comm_device(x)
    n = torch.tensor([x.shape[0]], device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    counts = [int(s) for s in sizes]
    padded = torch.zeros((max(counts), *x.shape[1:]), dtype=x.dtype, device=dev)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]).to(x.device)


def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """Sum each tensor over ranks in place, with one collective over a flat buffer."""
    if not is_distributed() or not tensors:
        return
    dev = _comm_device(tensors[0])
    flat = torch.cat([t.detach().reshape(-1).to(dev, torch.float32) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def check_supported(model: nn.Module) -> None:
    """Raise when the model is sharded by FSDP or DeepSpeed ZeRO.

    Raises:
        NotImplementedError: naming the engine; gradsift needs whole parameters and their
            ``.grad`` on every rank (DDP).
    """
    names = {type(m).__name__ for m in model.modules()} | {type(model).__name__}
    sharded = next((n for n in ("FullyShardedDataParallel", "FSDPModule", "DeepSpeedEngine")
                    if any(n in x for x in names)), None)
    if sharded is None and any(hasattr(p, "ds_id") or type(p).__name__ == "DTensor"
                               for p in model.parameters()):
        sharded = "DeepSpeed ZeRO / DTensor-sharded parameters"
    if sharded is not None:
        raise NotImplementedError(
            f"gradsift does not support {sharded}: the selection needs every trainable "
            "parameter whole on every rank and writes .grad itself. Use DDP (torchrun or "
            "accelerate launch without FSDP/DeepSpeed), e.g. with LoRA to fit the model")


# ------------------------------------------------------------------------- exchange
@dataclass
class DenseGrads(NormFactors):
    """Per-sample gradients of one parameter kept whole, (B, *shape): what ranks exchange.
    Every ``FactorizedGrads`` method works on them (a GEMM each)."""

    kind = "dense"


def dense_candidates(per_param: Mapping[str, torch.Tensor], losses: torch.Tensor,
                     names: Sequence[str]) -> FactorizedGrads:
    """A ``FactorizedGrads`` over whole per-sample gradients (name → (B, *shape))."""
    return FactorizedGrads([DenseGrads(n, n, None, per_param[n].float()) for n in names],
                           losses)


class Exchange:
    """Turns each rank's local candidates into the same global candidates on every rank.

    ``exact``: ``g_i`` whole (``FactorizedGrads.materialize``), one all-gather of a
    (B_local, 1 + Σ numel) buffer (the loss rides along). ``sketch``: per linear layer
    ``s_i = S_o (√P̃ ⊙ g_i) S_iᵀ = (D_i diag(√r) S_oᵀ)ᵀ (A_i diag(√c) S_iᵀ)`` with the rank-1
    (Adafactor-style) ``P̃ = r cᵀ / Σr`` of Adam's ``P`` and Gaussian ``S`` (entries
    ``N(0, 1/k)``, seeded identically on every rank), so ``⟨s_i, s_j⟩ ≈ ⟨g_i, P̃ g_j⟩``;
    other kinds (norms, embeddings) are exchanged whole, times ``√P``. The selector then sees
    the sketch in a geometry with ``P = 1`` (:meth:`geometry`).

    Args:
        config: the ``DistributedConfig``.
        shapes: captured parameter name → shape, in capture order (identical on every rank).
        seed: seeds the projections.
    """

    def __init__(self, config: DistributedConfig, shapes: Mapping[str, torch.Size],
                 seed: int = 0):
        self.config, self.shapes, self.seed = config, dict(shapes), seed
        self._proj: dict[tuple[str, int, int], torch.Tensor] = {}
        self.sent_bytes = 0  # bytes this rank contributed to the last all-gather

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    # ---- exact
    def gather_exact(self, local: FactorizedGrads | None, device: torch.device) -> FactorizedGrads:
        """Global ``FactorizedGrads`` of whole ``g_i`` (rank order = stream order)."""
        names = self.names
        if local is None or len(local) == 0:
            flat = torch.zeros(0, 1 + sum(math.prod(self.shapes[n]) for n in names),
                               device=device)
        else:
            per = local.materialize()
            flat = torch.cat([local.losses.float().reshape(-1, 1)] + [
                per[n].reshape(len(local), -1).float() for n in names], dim=1)
        self.sent_bytes = flat.numel() * flat.element_size()
        rows = all_gather_rows(flat)
        out, offset = {}, 1
        for n in names:
            size = math.prod(self.shapes[n])
            out[n] = rows[:, offset : offset + size].reshape(-1, *self.shapes[n])
            offset += size
        return dense_candidates(out, rows[:, 0].contiguous(), names)

    # ---- sketch
    def _projection(self, key: str, k: int, d: int, device: torch.device) -> torch.Tensor:
        """(k, d) Gaussian ``N(0, 1/k)`` (the identity when ``k >= d``), the same on every rank."""
        if (key, k, d) not in self._proj:
            if k >= d:
                s = torch.eye(d)
            else:
                g = torch.Generator().manual_seed(
                    (self.seed * 1_000_003 + sum(map(ord, key)) * 7919 + d) % 2**62)
                s = torch.randn(k, d, generator=g) / math.sqrt(k)
            self._proj[key, k, d] = s
        return self._proj[key, k, d].to(device)

    def _sides(self, layer: LayerFactors) -> tuple[int, int]:
        """``(k_o, k_i)``, ``k_o k_i ≤ sketch_dim``: ``√sketch_dim`` a side, the budget a
        narrow side (LoRA's rank) leaves going to the other."""
        dim = self.config.sketch_dim
        k_o = min(layer.d_out, math.isqrt(dim))
        k_i = min(layer.d_in_aug, dim // k_o)
        k_o = min(layer.d_out, dim // k_i)
        return k_o, k_i

    def _rank1(self, layer: LayerFactors, state: OptimizerState) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
        """``(√r, √c/√Σr)`` with ``P̃ = r cᵀ / Σr``, ``r``/``c`` the row/column sums of P."""
        p = layer.dense(state.preconditioner, "precondition")
        r, c = p.sum(dim=1), p.sum(dim=0)
        return r.clamp(min=0).sqrt(), (c.clamp(min=0) / r.sum().clamp(min=1e-30)).sqrt()

    def sketch_layer(self, layer: Any, state: OptimizerState) -> dict[str, torch.Tensor]:
        """Name → (b, …) sketched rows of ``√P̃ ⊙ g_i`` of one captured use."""
        if not isinstance(layer, LayerFactors):  # small kinds: whole, times √P
            per = layer.per_sample()
            return {n: g.float() * state.preconditioner[n].float().to(g.device).sqrt()
                    for n, g in per.items()}
        k_o, k_i = self._sides(layer)
        sr, sc = self._rank1(layer, state)
        s_o = self._projection(layer.weight_name + "/out", k_o, layer.d_out, layer.device)
        s_i = self._projection(layer.weight_name + "/in", k_i, layer.d_in_aug, layer.device)
        left = (layer.d() * sr) @ s_o.T  # (b, T, k_o)
        right = (layer.a() * sc) @ s_i.T  # (b, T, k_i)
        return {sketch_name(layer.weight_name): left.transpose(1, 2) @ right}

    def sketch_dense(self, tensors: Mapping[str, torch.Tensor], layers: Sequence[Any],
                     state: OptimizerState) -> dict[str, torch.Tensor]:
        """The same map ``M ↦ S_o (√P̃ ⊙ M) S_iᵀ`` for a parameter-shaped dense ``M``
        (``g_V``, Adam's ``m``), so that ``⟨s_i, sketch(M)⟩ ≈ ⟨g_i, P̃ M⟩``."""
        out: dict[str, torch.Tensor] = {}
        for layer in layers:
            if not isinstance(layer, LayerFactors):
                for n in layer.param_names:
                    out[n] = tensors[n].float() * state.preconditioner[n].float().sqrt()
                continue
            k_o, k_i = self._sides(layer)
            sr, sc = self._rank1(layer, state)
            m = layer.dense(tensors, "dense") * sr[:, None] * sc[None, :]
            s_o = self._projection(layer.weight_name + "/out", k_o, layer.d_out, layer.device)
            s_i = self._projection(layer.weight_name + "/in", k_i, layer.d_in_aug, layer.device)
            out[sketch_name(layer.weight_name)] = s_o @ m @ s_i.T
        return out

    def sketch_shapes(self, layers: Sequence[Any]) -> dict[str, tuple[int, ...]]:
        """Name → shape of each sketched entry, in layer order."""
        out: dict[str, tuple[int, ...]] = {}
        for layer in layers:
            if isinstance(layer, LayerFactors):
                out[sketch_name(layer.weight_name)] = self._sides(layer)
            else:
                out.update({n: tuple(self.shapes[n]) for n in layer.param_names})
        return out

    def gather_sketch(self, local: FactorizedGrads, state: OptimizerState) -> FactorizedGrads:
        """Global ``FactorizedGrads`` of the sketched ``√P̃ ⊙ g_i`` (rank order)."""
        shapes = self.sketch_shapes(local.layers)
        parts: dict[str, torch.Tensor] = {}
        for layer in local.layers:
            for n, s in self.sketch_layer(layer, state).items():
                parts[n] = parts[n] + s if n in parts else s
        flat = torch.cat([local.losses.float().reshape(-1, 1)] + [
            parts[n].reshape(len(local), math.prod(shapes[n])) for n in shapes], dim=1)
        self.sent_bytes = flat.numel() * flat.element_size()
        rows = all_gather_rows(flat)
        out, offset = {}, 1
        for n, shape in shapes.items():
            size = math.prod(shape)
            out[n] = rows[:, offset : offset + size].reshape(-1, *shape)
            offset += size
        return dense_candidates(out, rows[:, 0].contiguous(), list(shapes))

    def geometry(self, local: FactorizedGrads, target_grad: dict[str, torch.Tensor] | None,
                 state: OptimizerState) -> tuple[dict[str, torch.Tensor] | None, OptimizerState]:
        """The target gradient and optimizer state the selector sees for sketched candidates:
        ``sketch(g_V)``, ``sketch(m)`` and ``P = 1`` (``P̃`` is inside the sketch)."""
        shapes = self.sketch_shapes(local.layers)
        target = None if target_grad is None else self.sketch_dense(target_grad, local.layers,
                                                                    state)
        momentum = None if state.momentum is None else self.sketch_dense(
            state.momentum, local.layers, state)
        source = {n: (layer.weight_name if isinstance(layer, LayerFactors) else n)
                  for layer in local.layers for n in self.sketch_shapes([layer])}
        device = local.losses.device
        return target, OptimizerState(
            preconditioner={n: torch.ones(s, device=device) for n, s in shapes.items()},
            momentum=momentum,
            beta1={n: state.beta1.get(source[n], 0.0) for n in shapes},
            lr={n: state.lr.get(source[n], 0.0) for n in shapes},
            uninitialized=list(state.uninitialized), optimizer=state.optimizer)


def sketch_name(weight_name: str) -> str:
    """The name a linear layer's sketch goes by in the selector's view."""
    return f"sketch:{weight_name}"


SKETCH_SELECTORS = ("ftw", "ftw-nnls", "ftw-filter-only", "ftw-weight-only", "random", "loss")


def check_sketch_selector(selector: Any) -> None:
    """``sketch`` carries Adam's metric ``⟨g_i, P g_j⟩`` in the state's ``P``: only selectors
    in that geometry (and those that read no gradients) can use it. ftw's ``adam-next`` (the
    next step's ``P'``) needs the dense moments, which the sketch does not carry: it runs in the
    state's ``P`` there, and its selection log says ``geometry: adam``.

    Raises:
        ValueError: naming the selector and the ones that work.
    """
    cfg = getattr(selector, "config", None)
    ok = selector.name in SKETCH_SELECTORS and getattr(cfg, "curvature", "adam") == "adam" and (
        getattr(cfg, "geometry", "adam") in ("adam", "adam-next"))
    if not ok:
        raise ValueError(f"distributed.exchange=sketch carries Adam's metric <g_i, P g_j>; "
                         f"selector {selector.name!r} ({cfg}) needs another geometry. Use "
                         f"exchange: exact, or one of {SKETCH_SELECTORS}")
