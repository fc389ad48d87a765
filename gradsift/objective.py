"""The selection objective: alignment ``b``, interaction ``K`` and the ratio ``ρ`` (DESIGN.md §3).

For weights ``w ≥ 0`` on the candidates, the data part of Adam's next update moves the model
towards the target direction ``ĝ`` by the ratio

    ρ(w) = bᵀw / √(wᵀ K w),   b_i = ⟨g_i, P ĝ⟩,   K_ij = ⟨g_i, P g_j⟩   (curvature "adam")

or, with GREATS' identity curvature, ``K_ij = ⟨P g_i, P g_j⟩``. ``b`` never materializes a
per-sample gradient (``dot_dense`` against ``M = P ĝ``); the preconditioned ``K`` is exact, on
the materialize route of ``FactorizedGrads.gram``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from gradsift.factors import FactorizedGrads
from gradsift.optim_state import OptimizerState

logger = logging.getLogger(__name__)

CURVATURES = ("adam", "identity")


def target_direction(
    target_grad: Mapping[str, torch.Tensor],
    state: OptimizerState,
    momentum_correction: bool = False,
) -> dict[str, torch.Tensor]:
    """The direction ``ĝ`` the selected data's gradient should supply.

    ``ĝ = g_V``; with momentum correction ``ĝ = (g_V − β₁ m)/(1 − β₁)``, the data gradient
    that makes Adam's numerator ``β₁ m + (1−β₁) g`` equal ``g_V``.

    Args:
        target_grad: parameter name → mean gradient of the target batch (``g_V``).
        state: the optimizer state (``m``, ``β₁`` per parameter).
        momentum_correction: subtract what momentum already supplies.

    Returns:
        parameter name → float32 tensor. Without momentum in ``state`` (SGD, Adafactor) the
        correction is skipped, with a log message.
    """
    if not momentum_correction:
        return {n: g.float() for n, g in target_grad.items()}
    if state.momentum is None:
        logger.warning(
            "momentum_correction requested but %s exposes no Adam momentum; using g_V",
            state.optimizer or "the optimizer",
        )
        return {n: g.float() for n, g in target_grad.items()}
    out = {}
    for name, g in target_grad.items():
        beta1 = state.beta1.get(name, 0.0)
        if beta1 >= 1.0:
            raise ValueError(f"beta1 = {beta1} for {name!r}: momentum correction needs beta1 < 1")
        m = state.momentum.get(name)
        g = g.float()
        out[name] = g if m is None else (g - beta1 * m.to(g.device)) / (1.0 - beta1)
    return out


def alignment(
    cands: FactorizedGrads,
    target_dir: Mapping[str, torch.Tensor],
    precondition: Mapping[str, torch.Tensor] | None,
) -> torch.Tensor:
    """(B,) ``b_i = ⟨g_i, P ĝ⟩``, computed as ``dot_dense(P ⊙ ĝ)``.

    ``P = 1`` when ``precondition`` is None. No per-sample gradient is materialized.
    """
    if precondition is None:
        return cands.dot_dense(target_dir)
    dense = {}
    for name in cands.param_names:
        if name not in target_dir:
            raise KeyError(f"target direction has no entry for parameter {name!r}")
        g = target_dir[name].float()
        dense[name] = g * precondition[name].to(g.device)
    return cands.dot_dense(dense)


def interaction(
    cands: FactorizedGrads,
    precondition: Mapping[str, torch.Tensor] | None,
    curvature: str = "adam",
) -> torch.Tensor:
    """(B, B) interaction matrix between candidates.

    ``curvature="adam"``: ``K_ij = ⟨g_i, P g_j⟩`` (Adam's curvature model ``H ∝ P⁻¹``);
    ``curvature="identity"``: ``K_ij = ⟨P g_i, P g_j⟩`` (``H = I``). Plain ``⟨g_i, g_j⟩``
    when ``precondition`` is None.
    """
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    if precondition is None:
        return cands.gram()
    if curvature == "adam":
        return cands.gram(precondition=precondition)
    return cands.gram(precondition={n: precondition[n].float() ** 2 for n in cands.param_names})


def alignment_and_interaction(
    cands: FactorizedGrads,
    target_dir: Mapping[str, torch.Tensor],
    precondition: Mapping[str, torch.Tensor] | None,
    curvature: str = "adam",
    target_samples: FactorizedGrads | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(alignment, interaction, cross)`` from one pass over the candidates' factors.

    ``cross`` is (B, n_t) ``⟨g_i, P h_t⟩`` against the per-example gradients ``h_t`` of
    ``target_samples`` (None without them). The same numbers as ``alignment``,
    ``interaction`` and ``cands.gram(other=target_samples, precondition=P)``, but each large
    per-sample gradient is formed once for all three (``FactorizedGrads.products``).
    """
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    names = cands.param_names
    missing = [n for n in names if n not in target_dir]
    if missing:
        raise KeyError(f"target direction has no entry for parameter {missing[0]!r}")
    if precondition is None:
        dense, gram_p = {n: target_dir[n].float() for n in names}, None
    else:
        p = {n: precondition[n].float() for n in names}
        dense = {n: target_dir[n].float() * p[n].to(target_dir[n].device) for n in names}
        gram_p = p if curvature == "adam" else {n: p[n] ** 2 for n in names}
    out = cands.products(dense, gram_p, other=target_samples,
                         other_precondition=None if precondition is None else p)
    return out.dots, out.gram, out.cross


def target_sq_norm(
    target_dir: Mapping[str, torch.Tensor],
    precondition: Mapping[str, torch.Tensor] | None,
    names: list[str],
    curvature: str = "adam",
) -> float:
    """``ĝᵀ P ĝ`` (curvature "adam") or ``‖ĝ‖²`` (identity, or no ``precondition``).

    The normalizer of the cosine ``b_i / √(K_ii ĝᵀPĝ)`` in the matching metric.
    """
    total = 0.0
    for name in names:
        g = target_dir[name].float()
        if precondition is not None and curvature == "adam":
            # one product written, not two (g ⊙ g, then ⊙ P): in full fine-tuning a pass
            # over every parameter
            total += float((g * precondition[name].to(g.device)).mul_(g).sum())
        else:
            total += float((g * g).sum())
    return total
