"""The Filter-then-Weight selector and its ablations (``ftw``, ``ftw-nnls``,
``ftw-filter-only``, ``ftw-weight-only``, ``ftw-sgd``).

Source: F. Wang et al., "Two-Stage Optimizer-Aware Online Data Selection for Large Language
Models", 2026, arXiv 2604.00001; the objective is DESIGN.md §3: ``b_i = ⟨g_i, P ĝ⟩``,
``K_ij = ⟨g_i, P g_j⟩``, maximize ``ρ = bᵀw / √(wᵀKw)`` over ``|S| ≤ k``, ``w ≥ 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gradsift.objective import (
    CURVATURES,
    alignment_and_interaction,
    target_direction,
    target_sq_norm,
)
from gradsift.optim_state import next_step_preconditioner
from gradsift.select.base import (
    Selection,
    SelectionContext,
    Selector,
    SelectorConfig,
    register_selector,
)
from gradsift.select.ftw import (
    PER_TARGET_SUBSETS,
    SUBSETS,
    WEIGHTINGS,
    alignment_ratio,
    ftw_solve,
)
from gradsift.select.next_step import NextStep, best_weights, shrink_weights
from gradsift.select.target_noise import (
    ALIGNMENTS,
    denoised_alignment,
    target_agreement,
    target_snr,
)

GEOMETRIES = ("adam", "adam-next", "sgd")
# "next-step": the weights that maximize the decrease predicted from Adam's exact next
# update (gradsift.select.next_step), shrunk towards uniform by the target batch's evidence.
SELECTOR_WEIGHTINGS = (*WEIGHTINGS, "next-step")
# "next-step": greedy forward selection on the same predicted decrease (uniform weights);
# "snr": per step "greedy" where the target batch's b carries signal (target_snr >= 1), else "topk"
SELECTOR_SUBSETS = (*SUBSETS, "next-step", "snr")
# the subsets that read the per-target-example alignments B_ti
READS_TARGET_ROWS = (*PER_TARGET_SUBSETS, "snr")


@dataclass
class FTWConfig(SelectorConfig):
    """Options of Filter-then-Weight.

    Attributes:
        curvature: ``"adam"`` (``K = ⟨g_i, P g_j⟩``) or ``"identity"`` (``⟨P g_i, P g_j⟩``).
        momentum_correction: target ``ĝ = (g_V − β₁ m)/(1−β₁)`` instead of ``g_V``.
        min_cosine: drop candidates whose cosine with ``ĝ`` in the matching metric is lower.
        geometry: ``"adam-next"`` (default: the ``P`` of the step about to be taken,
            ``1/(√v̂' + ε)`` with ``v' = β₂ v + (1−β₂) g_V²``, the target gradient standing in
            for the update's; where ``v̂' = 0``, fresh coordinates, the mean ``v̂'`` of the
            tensor's others: ``optim_state.next_step_preconditioner``; Adam/AdamW only, others
            fall back to ``adam``), ``"adam"``
            (``P`` from the optimizer's state: where ``v`` is still zero, LoRA's ``A`` before
            its first nonzero gradient, it is ``1/ε``) or ``"sgd"`` (``P = 1``).
        subset: ``"greedy"`` (redundancy-aware, on ``ρ`` at the NNLS weights), ``"uniform"``
            (on ``ρ`` at uniform weights: the mean gradient's cosine with ``ĝ``), ``"topk"`` by
            alignment, ``"validated"`` (greedy when it beats the top-``k`` on held-out target
            examples, two-fold; otherwise the top-``k``: ``gradsift.select.ftw``),
            ``"residual"`` (greedy on the residual alignment ``r_j`` itself: matching pursuit,
            where a larger gradient counts for more), ``"debiased"`` (greedy on ``ρ`` net of
            the target batch's noise, ``(ρ̂² − tr(K_A⁻¹Σ_A))/ρ̂``; stops where the target
            examples stop agreeing and fills up by ``b``), ``"snr"`` (per step: ``greedy``
            where the target batch's ``b`` carries at least as much signal as noise,
            ``target_snr ≥ 1``, the top-``k`` by ``b`` where it carries less;
            ``gradsift.select.target_noise.target_snr``), or
            ``"next-step"``
            (greedy on the decrease predicted from Adam's exact next update, among the
            candidates with ``b_i > 0``; materializes all ``B`` per-sample gradients; Adam/AdamW
            only, others fall back to ``greedy``).
        weighting: ``"nnls"`` (maximize ``ρ``), ``"uniform"``, ``"shrink"`` (uniform moved
            towards NNLS by the evidence of the target batch; ``gradsift.select.ftw``), or
            ``"next-step"`` (maximize the target loss decrease predicted from Adam's exact next
            update, ``gradsift.select.next_step``, shrunk the same way; Adam/AdamW only, others
            fall back to ``shrink``; materializes the ``k`` selected per-sample gradients).
        alignment: the ``b`` the subset is chosen on: ``"mean"`` (as measured) or
            ``"posterior"`` (each candidate's cosine with ``ĝ`` shrunk towards 0 by its noise
            over the target examples, empirical Bayes;
            ``gradsift.select.target_noise.denoised_alignment``). Scores stay the measured ``b``.
        fill: top a subset smaller than ``k`` up with the next candidates by alignment
            (``uniform`` and ``shrink`` only: NNLS gives them no weight).
        crossfit: choose the subset on the target examples of even position and fit the
            weights (``shrink``, ``nnls``) on the odd ones, so the weights are not fitted to
            the noise that chose the rows (needs 4 target examples; fewer: all, with a note).
        temperature: > 0 draws each greedy addition, ``p ∝ exp((gain/max gain − 1)/τ)``
            (stochastic subsets, ``subset: greedy`` only; the selector's generator draws).
        norm_clip: > 0 clips every candidate's gradient to this multiple of the batch's median
            norm in the metric before selecting, and trains on the clipped gradients (outlier
            gradients cannot dominate ``K`` or the update). 0: off.
        ridge: relative ridge of the NNLS Cholesky factor.
        tol: relative gain in ``ρ²`` below which no further candidate is added.
        swap_evals: NNLS fits spent on 1-swap polishing (None: automatic, small problems).
        next_step_max_bytes: the dense per-sample gradients the ``next-step`` options may hold
            (float32; ``B`` × trainable parameters for the subset, ``k`` × for the weights);
            above it they fall back to ``greedy`` / ``shrink``, with a note.
    """

    curvature: str = "adam"
    momentum_correction: bool = False
    min_cosine: float = 0.0
    geometry: str = "adam-next"
    subset: str = "greedy"
    weighting: str = "shrink"
    alignment: str = "mean"
    ridge: float = 1e-9
    tol: float = 1e-6
    swap_evals: int | None = None
    next_step_max_bytes: int = 4 << 30
    fill: bool = True
    crossfit: bool = False
    temperature: float = 0.0
    norm_clip: float = 0.0

    def __post_init__(self) -> None:
        if self.curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {self.curvature!r}")
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"geometry must be one of {GEOMETRIES}, got {self.geometry!r}")
        if self.subset not in SELECTOR_SUBSETS:
            raise ValueError(f"subset must be one of {SELECTOR_SUBSETS}, got {self.subset!r}")
        if self.weighting not in SELECTOR_WEIGHTINGS:
            raise ValueError(f"weighting must be one of {SELECTOR_WEIGHTINGS}, "
                             f"got {self.weighting!r}")
        if self.alignment not in ALIGNMENTS:
            raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {self.alignment!r}")
        if not isinstance(self.fill, bool):
            raise ValueError(f"fill must be a bool, got {self.fill!r}")
        if not isinstance(self.momentum_correction, bool):
            raise ValueError(
                f"momentum_correction must be a bool, got {self.momentum_correction!r}"
            )
        if not -1.0 <= self.min_cosine < 1.0:
            raise ValueError(f"min_cosine must be in [-1, 1), got {self.min_cosine}")
        if not 0.0 <= self.ridge < 1.0:
            raise ValueError(f"ridge must be in [0, 1), got {self.ridge}")
        if not 0.0 <= self.tol < 1.0:
            raise ValueError(f"tol must be in [0, 1), got {self.tol}")
        if not isinstance(self.next_step_max_bytes, int) or self.next_step_max_bytes < 0:
            raise ValueError(f"next_step_max_bytes must be an int >= 0, "
                             f"got {self.next_step_max_bytes!r}")
        if self.swap_evals is not None and self.swap_evals < 0:
            raise ValueError(f"swap_evals must be >= 0 or None, got {self.swap_evals}")
        if not isinstance(self.crossfit, bool):
            raise ValueError(f"crossfit must be a bool, got {self.crossfit!r}")
        if self.crossfit and self.subset in READS_TARGET_ROWS:
            raise ValueError(f"crossfit and subset {self.subset!r} both use the target batch's "
                             "examples to correct for its noise: use one of them")
        if self.crossfit and self.weighting not in ("shrink", "nnls"):
            raise ValueError(f"crossfit fits the weights on half the target batch: it needs "
                             f"weighting 'shrink' or 'nnls', got {self.weighting!r}")
        _check_nonnegative("temperature", self.temperature)
        if self.temperature > 0.0 and self.subset != "greedy":
            raise ValueError(f"temperature draws the greedy additions: it needs subset "
                             f"'greedy', got {self.subset!r}")
        _check_nonnegative("norm_clip", self.norm_clip)
        if self.norm_clip > 0.0 and "next-step" in (self.subset, self.weighting):
            raise ValueError("norm_clip works on b and K: it cannot be combined with the "
                             "next-step subset or weighting")


def _check_nonnegative(name: str, value: object) -> None:
    """A number ``>= 0`` (0: off); a bool is not a number here."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and value >= 0.0):
        raise ValueError(f"{name} must be a number >= 0 (0: off), got {value!r}")


class FTWSelector(Selector):
    """Filter-then-Weight (Wang et al., 2026, arXiv 2604.00001), DESIGN.md §4.

    Computes ``b`` and ``K`` in the configured geometry and hands them to
    ``gradsift.select.ftw.ftw_solve``. May select fewer than ``k`` when fewer candidates
    are useful (aligned with the target and not redundant); the note says why.
    Scores are the alignments ``b``.
    """

    name = "ftw"
    needs_target = True
    needs_grads = True
    config_class = FTWConfig

    @property
    def needs_target_samples(self) -> bool:
        cfg: FTWConfig = self.config  # type: ignore[assignment]
        return (cfg.weighting in ("shrink", "next-step") or cfg.alignment != "mean"
                or cfg.crossfit or cfg.subset in READS_TARGET_ROWS)

    def _select(self, ctx: SelectionContext) -> Selection:
        cfg: FTWConfig = self.config  # type: ignore[assignment]
        cands, state = ctx.candidates, ctx.optimizer_state
        names = cands.param_names
        precondition, n_fresh = None, 0
        assert ctx.target_grad is not None
        next_p = cfg.geometry == "adam-next" and state.moments is not None
        if next_p:
            assert state.moments is not None
            precondition, n_fresh = next_step_preconditioner(
                state.moments, ctx.target_grad, names)
        elif cfg.geometry != "sgd":
            missing = [n for n in names if n not in state.preconditioner]
            if missing:
                raise ValueError(f"optimizer state has no preconditioner for {missing[:5]}")
            precondition = {n: state.preconditioner[n] for n in names}
        g_hat = target_direction(
            {n: ctx.target_grad[n] for n in names}, state, cfg.momentum_correction
        )
        # ĝᵀPĝ: the cosines' normalizer (min_cosine filters on them; they are logged)
        tsq = target_sq_norm(g_hat, precondition, names, cfg.curvature)
        weighting = cfg.weighting
        exact = cfg.geometry != "sgd" and state.moments is not None and (
            state.momentum is not None)
        dense = 4 * sum(ctx.target_grad[n].numel() for n in names)  # bytes per sample
        fits = {"subset": len(cands) * dense <= cfg.next_step_max_bytes,
                "weighting": ctx.k * dense <= cfg.next_step_max_bytes}
        too_big = [o for o in ("subset", "weighting")
                   if getattr(cfg, o) == "next-step" and exact and not fits[o]]
        if too_big:
            diagnostics_note = (f"next-step {'/'.join(too_big)} would hold "
                                f"{len(cands) * dense / 2**30:.1f} GiB of dense gradients "
                                f"(next_step_max_bytes {cfg.next_step_max_bytes / 2**30:.1f} "
                                f"GiB): used greedy/shrink")
        exact_subset = exact and fits["subset"]
        exact = exact and fits["weighting"]
        next_step = weighting == "next-step" and exact
        if weighting == "next-step":
            weighting = "uniform" if next_step else "shrink"
        subset = "greedy" if cfg.subset == "next-step" else cfg.subset
        # b, K and (for shrink, or a denoised b) the cross Gram with the target examples
        per_example = (weighting == "shrink" or cfg.alignment != "mean" or cfg.crossfit
                       or subset in READS_TARGET_ROWS)
        b, kmat, cross = alignment_and_interaction(
            cands, g_hat, precondition, cfg.curvature,
            ctx.target_samples if per_example else None)
        per_target = None
        if per_example and ctx.target_samples is not None:
            # B_ti = ⟨g_i, P g_t⟩ per target example t; their mean is (up to the momentum
            # shift common to every t) b, their spread is the noise of b.
            assert cross is not None
            cross = cross.T
            scale = 1.0
            if cfg.momentum_correction and state.momentum is not None:
                beta1 = max((state.beta1.get(n, 0.0) for n in names), default=0.0)
                scale = 1.0 / (1.0 - beta1)
            per_target = b[None, :] + (cross - cross.mean(dim=0, keepdim=True)) * scale
        snr = None
        if subset == "snr":
            # with fewer than 2 target examples the noise is unknown: the greedy subset
            rows = per_target.shape[0] if per_target is not None else 0
            snr = target_snr(per_target) if rows >= 2 else math.inf
            subset = "greedy" if snr >= 1.0 else "topk"
        b_subset, shrunk = b, 1.0
        subset_rows, weight_rows, b_weights = per_target, per_target, None
        if cfg.crossfit and per_target is not None and per_target.shape[0] >= 4:
            # rows by even / odd target example: one half for each stage
            subset_rows, weight_rows = per_target[0::2], per_target[1::2]
            b_subset, b_weights = subset_rows.mean(dim=0), weight_rows.mean(dim=0)
        if subset_rows is not None and cfg.alignment != "mean":
            norms = kmat.diagonal().clamp_min(0.0).sqrt()
            b_subset, shrunk = denoised_alignment(subset_rows, cfg.alignment, norms)
            b_subset = b_subset.to(b.dtype)
        res = ftw_solve(
            b_subset,
            kmat,
            ctx.k,
            min_cosine=cfg.min_cosine,
            target_sq_norm=tsq,
            subset=subset,
            weighting=weighting,
            ridge=cfg.ridge,
            tol=cfg.tol,
            swap_evals=cfg.swap_evals,
            fill=cfg.fill,
            target_align=weight_rows if weighting == "shrink" else (
                per_target if subset in PER_TARGET_SUBSETS else None),
            weight_align=b_weights,
            temperature=cfg.temperature,
            generator=ctx.generator,
            norm_clip=cfg.norm_clip,
        )
        diagnostics = {
            "rho": res.rho,
            "n_filtered": res.n_filtered,
            "n_finite": res.n_finite,
            "n_positive": res.n_positive,
            "geometry": cfg.geometry if next_p or cfg.geometry != "adam-next" else "adam",
            "curvature": cfg.curvature if precondition is not None else "identity",
            "n_uninitialized": len(set(names) & set(state.uninitialized)),
            "n_fresh": n_fresh,
            "cosines": [round(c, 6) if math.isfinite(c) else None
                        for c in res.cosines.tolist()],
        }
        indices, weights = res.indices, res.weights
        model = None
        if cfg.subset == "next-step" and exact_subset:
            eligible = [i for i, v in enumerate(b.tolist()) if v > 0.0 and math.isfinite(v)]
            if eligible:
                model = NextStep(cands.materialize(), state, ctx.max_grad_norm)
                chosen = sorted(model.greedy_subset(_direction(ctx), eligible, ctx.k))
                indices = torch.as_tensor(chosen, dtype=torch.int64)
                model = NextStep({n: g[indices.to(g.device)]
                                  for n, g in model.per_sample.items()}, state,
                                 ctx.max_grad_norm)
                weights = torch.full((len(chosen),), 1.0 / len(chosen))
        if next_step and indices.numel() > 1:
            weights, extra = _next_step_weights(ctx, indices, model)
            diagnostics.update(extra, rho=alignment_ratio(b, kmat, indices, weights))
        if too_big:
            diagnostics["note_next_step"] = diagnostics_note
        elif "next-step" in (cfg.weighting, cfg.subset) and not exact:
            diagnostics["note_next_step"] = "next-step needs Adam's moments: used greedy/shrink"
        if res.shrink is not None:
            diagnostics["shrink"] = res.shrink
        if snr is not None:
            diagnostics["target_snr"] = snr if math.isfinite(snr) else None
            diagnostics["subset_used"] = subset
        if res.validation is not None:  # subset "validated": which rule held out better
            diagnostics["validation"] = res.validation
            diagnostics["subset_used"] = "greedy" if res.validation > 0.0 else "topk"
        if cfg.norm_clip > 0.0:
            diagnostics["n_clipped"] = res.n_clipped
        if cfg.crossfit and b_weights is None:
            diagnostics["note_crossfit"] = "crossfit needs 4 target examples: fitted on all"
        if cfg.alignment != "mean":
            diagnostics["alignment_shrink"] = shrunk
        if per_target is not None and per_target.shape[0] > 1:
            diagnostics["target_agreement"] = target_agreement(per_target)
        if res.note:
            diagnostics["note"] = res.note
        return Selection(
            indices=indices,
            weights=weights,
            scores=b.detach().float(),
            diagnostics=diagnostics,
        )


def _direction(ctx: SelectionContext) -> dict[str, torch.Tensor]:
    assert ctx.target_grad is not None
    return {n: ctx.target_grad[n] for n in ctx.candidates.param_names}


def _next_step_weights(ctx: SelectionContext, indices: torch.Tensor, model: NextStep | None
                       ) -> tuple[torch.Tensor, dict[str, float]]:
    """Weights on ``indices`` from Adam's exact next step (``gradsift.select.next_step``)."""
    if model is None:
        model = NextStep(ctx.candidates.select(indices).materialize(), ctx.optimizer_state,
                         ctx.max_grad_norm)
    direction = _direction(ctx)
    w_best, _ = best_weights(model, direction)
    s = 0.0
    w = torch.full_like(w_best, 1.0 / len(w_best))
    if ctx.target_samples is not None and len(ctx.target_samples) > 1:
        w, s = shrink_weights(model, w_best, ctx.target_samples.dot_dense)
    with torch.no_grad():
        predicted = float(model.decrease(w, direction))
    return w.float(), {"next_step_shrink": s, "predicted_decrease": predicted}


# The ablations are configurations of the one selector (Wang et al., 2026): each fixes one
# option of FTW's defaults and keeps the rest.
register_selector("ftw", FTWSelector)
register_selector("ftw-nnls", FTWSelector, weighting="nnls")  # ρ-maximizing weights
register_selector("ftw-filter-only", FTWSelector, weighting="uniform")  # the subset alone
register_selector("ftw-weight-only", FTWSelector, subset="topk")  # top-k by b, FTW's weights
register_selector("ftw-sgd", FTWSelector, geometry="sgd")  # P = 1
# Adam's exact next step: for the weights alone, and for the subset and the weights
register_selector("ftw-next-step-weights", FTWSelector, weighting="next-step")
register_selector("ftw-next-step", FTWSelector, subset="next-step", weighting="next-step")
