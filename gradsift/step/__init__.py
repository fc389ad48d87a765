"""The selection step, written once (DESIGN.md §5): capture → ``ĝ`` → select → ``.grad``.

``SelectionStep.run`` takes the collated micro-batches of the ``B`` candidates and

1. captures every per-sample gradient in factorized form (one forward + one backward);
   a selector that reads less pays less (``Selector.needs``): ``indices`` (random) selects
   before any pass over the B, ``losses`` (loss) after a no-grad forward over them, and both
   then train on the chosen k with one ordinary forward+backward over the k only
   (``gradsift.step.no_grads``); with ``score_layers`` (truncated scoring) only the
   top blocks are captured, the backward stops below them (``gradsift.blocks``), and step 4
   is a forward+backward over the k selected (as with ``second_pass``);
2. computes the target gradient ``g_V`` on a fresh target batch every ``target_refresh`` calls
   (keeping the per-example factors for selectors that read them);
3. builds the ``SelectionContext`` from the optimizer's state and lets the selector choose
   indices and weights;
4. writes ``Σ_i w_i ∇ℓ_i`` (times ``grad_scale``) into ``.grad``: ``(w ⊙ D)ᵀ A`` per captured
   layer, a backward through the retained graph for any other trainable parameter.

Stepping the optimizer, clipping and logging stay with the caller: ``OnlineTrainer`` (a plain
loop) and ``GradSiftTrainer`` (inside ``transformers.Trainer``) both call this step and
nothing else of capture, target or selection.

Under a launcher (an initialized process group of N > 1 ranks) the same step runs on every
rank over that rank's slice of the candidates, and the ranks share one selection
(``gradsift.distributed``): ``g_V`` and the weighted gradient are all-reduced, the candidates'
gradients exchanged (``exact`` or ``sketch``), and every rank selects the same indices and
weights over the global batch. Without one, nothing changes.

Modules: ``selection_step`` (``SelectionStep``: the step in one process, the target
gradient, the state), ``ranks`` (the step on one rank of N), ``no_grads`` (selectors that
read no gradients), ``config`` (``SelectionConfig``), ``result`` (``StepResult``).
"""

from gradsift.step.config import SelectionConfig, check_positive
from gradsift.step.result import StepResult
from gradsift.step.selection_step import SelectionStep

__all__ = ["SelectionConfig", "SelectionStep", "StepResult", "check_positive"]
