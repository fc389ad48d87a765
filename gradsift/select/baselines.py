"""Baseline selectors, on the same interface and budget as Filter-then-Weight.

All return exactly ``min(k, B)`` candidates with uniform weights (``full`` returns all ``B``).
A non-finite score ranks last; ties are broken by candidate index (stable sort).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradsift.objective import alignment_and_interaction
from gradsift.select.base import (
    Selection,
    SelectionContext,
    Selector,
    SelectorConfig,
    register_selector,
)
from gradsift.select.ftw import alignment_ratio


def _uniform(n: int) -> torch.Tensor:
    return torch.full((n,), 1.0 / n) if n else torch.zeros(0)


def _top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """Indices of the ``min(k, B)`` largest scores (non-finite last) and the non-finite count."""
    s = scores.detach().double().cpu()
    finite = torch.isfinite(s)
    ranked = torch.where(finite, s, torch.full_like(s, -torch.inf))
    order = torch.sort(ranked, descending=True, stable=True).indices
    return order[: min(k, s.numel())].sort().values, int((~finite).sum())


def _ranked(scores: torch.Tensor, k: int, **diagnostics: object) -> Selection:
    idx, n_bad = _top_k(scores, k)
    diag: dict[str, object] = {"n_filtered": int(scores.numel()) - n_bad, **diagnostics}
    if n_bad:
        diag["n_nonfinite"] = n_bad
    return Selection(
        indices=idx, weights=_uniform(idx.numel()), scores=scores.float(), diagnostics=diag
    )


@dataclass
class NoOptions(SelectorConfig):
    """A selector without options."""


class RandomSelector(Selector):
    """Uniform random subset without replacement, uniform weights (the standard baseline).

    Uses only ``ctx.generator``: the same seed gives the same choice. Scores are the
    random ranks (``B`` for the first drawn, down to 1).
    """

    name = "random"
    needs = "indices"
    config_class = NoOptions

    def _select(self, ctx: SelectionContext) -> Selection:
        n = len(ctx.candidates)
        g = ctx.generator
        perm = torch.randperm(n, generator=g, device=g.device).cpu()
        scores = torch.empty(n)
        scores[perm] = torch.arange(n, 0, -1, dtype=torch.float32)
        idx = perm[: min(ctx.k, n)].sort().values
        return Selection(idx, _uniform(idx.numel()), scores, {"n_filtered": n})


class LossSelector(Selector):
    """Largest per-sample loss first (loss-based prioritization, e.g. Loshchilov & Hutter,
    "Online Batch Selection for Faster Training of Neural Networks", 2015), uniform weights."""

    name = "loss"
    needs = "losses"
    config_class = NoOptions

    def _select(self, ctx: SelectionContext) -> Selection:
        return _ranked(ctx.candidates.losses, ctx.k)


class GradNormSelector(Selector):
    """Largest per-sample gradient norm ``‖g_i‖`` first (Katharopoulos & Fleuret, "Not All
    Samples Are Created Equal", ICML 2018), uniform weights; plain (SGD) norm."""

    name = "gradnorm"
    needs_target = False
    needs_grads = True
    config_class = NoOptions

    def _select(self, ctx: SelectionContext) -> Selection:
        return _ranked(ctx.candidates.sq_norms().clamp(min=0).sqrt(), ctx.k)


@dataclass
class GreatsConfig(SelectorConfig):
    """Options of GREATS.

    Attributes:
        lr: the step size ``η`` of the score (default: the mean learning rate of the
            captured parameters' groups).
    """

    lr: float | None = None

    def __post_init__(self) -> None:
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0 or None, got {self.lr}")


class GreatsSelector(Selector):
    """GREATS (Wang et al., "GREATS: Online Selection of High-Quality Data for LLM Training
    in Every Iteration", NeurIPS 2024), as in DESIGN.md §4.

    Greedy in SGD geometry (``P = 1``): repeatedly add the candidate maximizing
    ``η b_i − η² Σ_{j∈S} K_ij`` with ``b_i = ⟨g_i, g_V⟩``, ``K_ij = ⟨g_i, g_j⟩``; always
    ``min(k, B)`` candidates, uniform weights. Scores: each selected candidate's marginal
    score when it was added, the others' after the last addition. ``rho`` is in SGD geometry.
    """

    name = "greats"
    needs_target = True
    needs_grads = True
    config_class = GreatsConfig

    def _select(self, ctx: SelectionContext) -> Selection:
        cfg: GreatsConfig = self.config  # type: ignore[assignment]
        cands = ctx.candidates
        assert ctx.target_grad is not None
        eta = cfg.lr if cfg.lr is not None else ctx.optimizer_state.mean_lr(cands.param_names)
        b, kmat, _ = alignment_and_interaction(cands, ctx.target_grad, None)  # one pass
        b, kmat = b.double(), kmat.double()
        n = b.numel()
        bad = ~(torch.isfinite(b) & torch.isfinite(kmat).all(0) & torch.isfinite(kmat).all(1))
        b_ok = torch.where(bad, torch.zeros_like(b), b)
        k_ok = torch.where(bad[:, None] | bad[None, :], torch.zeros_like(kmat), kmat)
        penalty = torch.zeros_like(b)
        taken = torch.zeros(n, dtype=torch.bool, device=b.device)
        scores = torch.zeros_like(b)
        chosen = []
        for _ in range(min(ctx.k, n)):
            gain = eta * b_ok - eta**2 * penalty
            gain = torch.where(taken | bad, torch.full_like(gain, -torch.inf), gain)
            j = (
                int(torch.argmax(gain))
                if not bool((taken | bad).all())
                else int((~taken).nonzero()[0])
            )
            scores[j] = gain[j] if torch.isfinite(gain[j]) else -torch.inf
            taken[j] = True
            chosen.append(j)
            penalty += k_ok[:, j]
        rest = ~taken
        scores[rest] = (eta * b_ok - eta**2 * penalty)[rest]
        idx = torch.tensor(sorted(chosen), dtype=torch.long)
        w = _uniform(idx.numel())
        rho = alignment_ratio(b_ok, k_ok, idx.to(b.device), w.to(b.device)) if chosen else 0.0
        diag = {"rho": rho, "rho_geometry": "sgd", "lr": eta, "n_filtered": int((~bad).sum())}
        return Selection(idx, w, scores.float(), diag)


class CosineSelector(Selector):
    """LESS-style optimizer-aware cosine (Xia et al., "LESS: Selecting Influential Data for
    Targeted Instruction Tuning", ICML 2024): top-``k`` by ``cos(P g_i, g_V)``.

    LESS compares Adam's preconditioned update direction of each training example with the
    target gradient: ``cos_i = ⟨P g_i, g_V⟩ / (‖P g_i‖ ‖g_V‖) = b_i / √(g_iᵀP²g_i) / ‖g_V‖``.
    No interactions, uniform weights.
    """

    name = "cosine"
    needs_target = True
    needs_grads = True
    config_class = NoOptions

    def _select(self, ctx: SelectionContext) -> Selection:
        cands, state = ctx.candidates, ctx.optimizer_state
        names = cands.param_names
        assert ctx.target_grad is not None
        p = {n: state.preconditioner[n] for n in names}
        # b = ⟨g_i, P g_V⟩ and ‖P g_i‖² (the diagonal of the identity-curvature K), one pass
        b, kmat, _ = alignment_and_interaction(cands, ctx.target_grad, p, "identity")
        norms = kmat.diagonal().clamp(min=0).sqrt()
        target_norm = sum(float(ctx.target_grad[n].float().pow(2).sum()) for n in names) ** 0.5
        cos = b / (norms * target_norm)
        return _ranked(cos, ctx.k)


@dataclass
class OpusConfig(SelectorConfig):
    """Options of OPUS.

    Attributes:
        temperature: Boltzmann temperature ``τ`` over standardized utilities (the paper's 0.9).
        lr: the step size ``η`` of the redundancy penalty (default: the optimizer's mean lr).
    """

    temperature: float = 0.9
    lr: float | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0 or None, got {self.lr}")


class OpusSelector(Selector):
    """OPUS (S. Wang et al., "OPUS: Towards Efficient and Principled Data Selection in Large
    Language Model Pre-training in Every Iteration", 2026, arXiv 2602.05400), as we read it.

    The utility of a candidate is its Adam-shaped update ``P g_i`` projected on the target
    gradient, minus an in-step redundancy penalty against the candidates drawn so far:
    ``u_i = ⟨P g_i, g_V⟩ − η Σ_{s∈S} ⟨P g_i, P g_s⟩``. The ``k`` draws are Boltzmann samples
    without replacement, ``p_i ∝ exp(z_i / τ)`` with ``z`` the utilities standardized over the
    candidates left (so ``τ`` is scale-free); uniform weights. Scores: the first utilities.
    (The paper's CountSketch projection is an approximation of these inner products; here they
    are exact.)
    """

    name = "opus"
    needs_target = True
    needs_grads = True
    config_class = OpusConfig

    def _select(self, ctx: SelectionContext) -> Selection:
        cfg: OpusConfig = self.config  # type: ignore[assignment]
        cands, state = ctx.candidates, ctx.optimizer_state
        names = cands.param_names
        assert ctx.target_grad is not None
        eta = cfg.lr if cfg.lr is not None else state.mean_lr(names)
        p = {n: state.preconditioner[n] for n in names}
        u0, kmat, _ = alignment_and_interaction(cands, ctx.target_grad, p, "identity")
        u0, kmat = u0.double().cpu(), kmat.double().cpu()
        idx, n_ok = boltzmann_draws(u0, kmat, ctx.k, eta, cfg.temperature, ctx.generator)
        diag = {"n_filtered": n_ok, "temperature": cfg.temperature, "lr": eta}
        return Selection(idx, _uniform(idx.numel()), u0.float(), diag)


def boltzmann_draws(utility: torch.Tensor, kmat: torch.Tensor, k: int, eta: float,
                    temperature: float, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """OPUS' draws: ``k`` times, sample ``j ∝ exp(z_j/τ)`` among the candidates left, with ``z``
    the standardized ``u − η Σ_{s∈S} K_{·s}``; returns the sorted indices and how many
    candidates had finite utilities and interactions."""
    n = utility.numel()
    ok = torch.isfinite(utility) & torch.isfinite(kmat).all(0) & torch.isfinite(kmat).all(1)
    left = ok.clone()
    penalty = torch.zeros(n, dtype=torch.float64)
    chosen: list[int] = []
    for _ in range(min(k, int(ok.sum()))):
        u = utility - eta * penalty
        z = torch.zeros(n, dtype=torch.float64)
        spread = float(u[left].std()) if int(left.sum()) > 1 else 0.0
        if spread > 0:
            z[left] = (u[left] - u[left].mean()) / spread
        logits = torch.where(left, z / temperature, torch.full_like(z, -torch.inf))
        j = int(torch.multinomial(torch.softmax(logits, dim=0).float(), 1, generator=generator))
        chosen.append(j)
        left[j] = False
        penalty += torch.where(ok, kmat[:, j], torch.zeros_like(penalty))
    return torch.tensor(sorted(chosen), dtype=torch.long), int(ok.sum())


class FullSelector(Selector):
    """All ``B`` candidates with uniform weights: the plain training step, for reference.

    Ignores the budget ``k`` (it is not a selection method; compare it at equal steps,
    not at equal data).
    """

    name = "full"
    needs = "indices"
    config_class = NoOptions

    def _select(self, ctx: SelectionContext) -> Selection:
        n = len(ctx.candidates)
        idx = torch.arange(n)
        diag = {"n_filtered": n, "ignores_budget": True}
        return Selection(idx, _uniform(n), torch.ones(n), diag)


register_selector("random", RandomSelector)
register_selector("loss", LossSelector)
register_selector("gradnorm", GradNormSelector)
register_selector("greats", GreatsSelector)
register_selector("cosine", CosineSelector)
register_selector("opus", OpusSelector)
register_selector("full", FullSelector)
