"""AdamW's next update as an exact function of the selection weights, and the weights that
make it decrease a target loss the most.

The ``ρ`` objective freezes Adam's preconditioner ``P`` at its current value. Early in a run,
and whenever one step's gradient is large against the running ``v``, the step the optimizer
actually takes is different: the new gradient enters ``v`` as well. With the selected
per-sample gradients ``g_i`` and weights ``w`` on the simplex (``g(w) = Σ w_i g_i``, clipped to
``max_grad_norm`` when given), the next update is

    Δ(w) = −η m̂'/(√v̂' + ε),   m' = β₁ m + (1−β₁) g(w),   v' = β₂ v + (1−β₂) g(w)²,

with the bias corrections of step ``t+1`` (AdamW's decoupled decay does not depend on ``w``
and is left out). Its first-order effect on a loss with gradient ``ĝ`` is the predicted
decrease ``u(w) = −⟨ĝ, Δ(w)⟩``; ``best_weights`` maximizes ``u`` over the simplex by
exponentiated-gradient ascent, and ``shrink_weights`` moves the result back towards uniform
as far as the target batch's per-example decreases support it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from gradsift.optim_state import OptimizerState


class NextStep:
    """``Δ(w)`` for dense per-sample gradients of the selected candidates.

    Args:
        per_sample: parameter name → (n, *shape) per-sample gradients.
        state: the optimizer state (``m``, ``β₁``, ``η`` and Adam's ``moments``).
        max_grad_norm: the clipping the update will get (None: no clipping).

    Raises:
        ValueError: the state has no Adam moments (another optimizer).
    """

    def __init__(self, per_sample: Mapping[str, torch.Tensor], state: OptimizerState,
                 max_grad_norm: float | None = None):
        if state.moments is None or state.momentum is None:
            raise ValueError(f"the next-step model needs Adam's moments; "
                             f"{state.optimizer or 'this optimizer'} has none")
        self.per_sample = {n: g.float() for n, g in per_sample.items()}  # float64 per use
        self.state = state
        self.max_grad_norm = max_grad_norm
        self.n = next(iter(self.per_sample.values())).shape[0] if self.per_sample else 0

    def combine(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """``g(w) = Σ_i w_i g_i`` as a batch of one, before clipping."""
        w = w.double()
        return {n: torch.tensordot(w.to(g.device), g.double(), dims=1)[None] for n, g in
                self.per_sample.items()}

    def updates(self, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``Δ`` for each of ``J`` gradients (name → (J, *shape)), each clipped on its own."""
        grads = {n: g.double() for n, g in grads.items()}
        if self.max_grad_norm is not None:
            sq = sum((g * g).flatten(1).sum(1).cpu() for g in grads.values())
            scale = torch.clamp(self.max_grad_norm / (torch.sqrt(sq) + 1e-6), max=1.0)
            grads = {n: g * scale.to(g.device).view(-1, *[1] * (g.dim() - 1))
                     for n, g in grads.items()}
        out = {}
        st = self.state
        for name, g in grads.items():
            mom = st.moments[name]  # type: ignore[index]
            beta1, t = st.beta1[name], mom.step + 1
            m = beta1 * st.momentum[name].double() + (1.0 - beta1) * g  # type: ignore[index]
            out[name] = -st.lr[name] * (m / (1.0 - beta1**t)) / mom.next_denominator(g)
        return out

    def update(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """``Δ(w)`` per parameter (float64, differentiable in ``w``)."""
        return {n: d[0] for n, d in self.updates(self.combine(w)).items()}

    def decreases(self, grads: Mapping[str, torch.Tensor],
                  direction: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``−⟨ĝ, Δ⟩`` for each of ``J`` gradients (name → (J, *shape)): (J,) float64."""
        total = None
        for name, d in self.updates(grads).items():
            dot = (direction[name].double().to(d.device) * d).flatten(1).sum(1).cpu()
            total = -dot if total is None else total - dot
        assert total is not None
        return total

    def decrease(self, w: torch.Tensor, direction: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``u(w) = −⟨ĝ, Δ(w)⟩`` for ``direction = ĝ`` (a 0-d float64 tensor)."""
        return self.decreases(self.combine(w), direction)[0]

    def greedy_subset(self, direction: Mapping[str, torch.Tensor], eligible: list[int],
                      k: int) -> list[int]:
        """Forward selection of ``k`` of the ``eligible`` samples: each round adds the one
        whose uniform mean with the chosen gives the largest ``u`` (all tried at once)."""
        chosen: list[int] = []
        total = {n: torch.zeros_like(g[0], dtype=torch.float64)
                 for n, g in self.per_sample.items()}
        for m in range(min(k, len(eligible))):
            rest = [j for j in eligible if j not in chosen]
            index = torch.as_tensor(rest)
            trial = {n: (total[n] + g[index.to(g.device)].double()) / (m + 1)
                     for n, g in self.per_sample.items()}
            j = rest[int(torch.argmax(self.decreases(trial, direction)))]
            chosen.append(j)
            total = {n: total[n] + g[j] for n, g in self.per_sample.items()}
        return chosen


def _ascend(f: Callable[[torch.Tensor], torch.Tensor], w0: torch.Tensor,
            iters: int) -> tuple[torch.Tensor, float]:
    """Exponentiated-gradient ascent of ``f`` on the simplex with a backtracking step."""
    w = w0.clone()
    w.requires_grad_(True)
    value = f(w)
    (grad,) = torch.autograd.grad(value, w)
    best, w = float(value.detach()), w.detach()
    alpha = 1.0
    for _ in range(iters):
        centred = grad - (grad * w).sum()
        scale = float(centred.abs().max())
        if scale <= 0.0 or alpha < 1e-4:
            break
        trial = w * torch.exp(alpha * centred / scale)
        trial = (trial / trial.sum()).detach().requires_grad_(True)
        value = f(trial)
        if float(value.detach()) > best:
            (grad,) = torch.autograd.grad(value, trial)
            best, w, alpha = float(value.detach()), trial.detach(), alpha * 1.5
        else:
            alpha *= 0.5
    return w, best


def best_weights(model: NextStep, direction: Mapping[str, torch.Tensor],
                 iters: int = 20) -> tuple[torch.Tensor, float]:
    """The simplex weights maximizing ``u(w)``, and ``u`` there.

    Ascent from uniform; each vertex (training on one sample alone) is compared too, since
    the ascent cannot reach the boundary exactly.
    """
    n = model.n
    uniform = torch.full((n,), 1.0 / n, dtype=torch.float64)
    if n <= 1:
        return uniform, float(model.decrease(uniform, direction))

    def f(w: torch.Tensor) -> torch.Tensor:
        return model.decrease(w, direction)

    w, best = _ascend(f, uniform, iters)
    with torch.no_grad():
        for i in range(n):
            vertex = torch.zeros(n, dtype=torch.float64)
            vertex[i] = 1.0
            value = float(f(vertex))
            if value > best:
                w, best = vertex, value
    return w, best


def shrink_weights(model: NextStep, w_best: torch.Tensor,
                   per_example_dot: Callable[[Mapping[str, torch.Tensor]], torch.Tensor]
                   ) -> tuple[torch.Tensor, float]:
    """``w_unif + s (w_best − w_unif)``, ``s = d̄²/(d̄² + se²)`` (0 when ``d̄ ≤ 0``).

    ``d_t = u_t(w_best) − u_t(w_unif)`` is the gain per target example ``t``, with
    ``u_t(w) = −⟨g_t, Δ(w)⟩``; ``per_example_dot(M)`` returns ``⟨g_t, M⟩`` for every ``t``.
    """
    n = model.n
    uniform = torch.full((n,), 1.0 / n, dtype=torch.float64)
    with torch.no_grad():
        diff = {name: a - b for (name, a), b in zip(
            model.update(uniform).items(), model.update(w_best).values(), strict=True)}
        d = per_example_dot({k: v.float() for k, v in diff.items()}).double().cpu()
    if d.numel() < 2:
        return uniform, 0.0
    mean, se2 = float(d.mean()), float(d.var(unbiased=True)) / d.numel()
    s = mean * mean / (mean * mean + se2) if mean > 0.0 and mean * mean + se2 > 0.0 else 0.0
    w = uniform + s * (w_best.double() - uniform)
    return w / w.sum(), s
