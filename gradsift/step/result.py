"""What one selection step did (``StepResult``): the candidates, the selection, the
weights of the update and where the time went."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradsift.factors import FactorizedGrads
from gradsift.select import Selection


@dataclass
class StepResult:
    """What one selection step did.

    Under a launcher every field is global: ``candidates`` are the B gathered candidates
    (``scope: local``: their losses only) and ``indices`` count in the global batch, ranks in
    order.

    Attributes:
        candidates: the candidates' factorized gradients (``candidates.losses``: (B,) losses).
        selection: the selector's indices, weights, scores and diagnostics.
        weights: (B,) float32 weight of every candidate (0 outside the selection).
        timing: seconds spent in ``capture``, ``target``, ``selection`` and ``update``.
        local: this rank's slice of the global batch (``slice(0, B)`` in one process).
        exchanged_bytes: bytes this rank sent in the step's collectives (0 in one process).
    """

    candidates: FactorizedGrads
    selection: Selection
    weights: torch.Tensor
    timing: dict[str, float]
    local: slice | None = None
    exchanged_bytes: int = 0

    @property
    def train_loss(self) -> float:
        """``Σ_i w_i ℓ_i``, the loss the update descends (over the selected candidates: the
        others' losses may not have been computed)."""
        chosen = self.weights != 0
        losses = self.candidates.losses.detach().float().cpu()
        return float((self.weights[chosen] * losses[chosen]).sum())

    @property
    def candidate_loss(self) -> float:
        """Mean loss of the candidates whose loss was computed (every one, unless the selector
        reads only indices: then the selected ones, a uniform sample of the B for ``random``)."""
        losses = self.candidates.losses.detach().float().cpu()
        known = ~torch.isnan(losses)
        return float(losses[known].mean()) if bool(known.any()) else float("nan")
