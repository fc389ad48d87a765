"""The options of the selection step (``SelectionConfig``), shared by every entry point."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SelectionConfig:
    """The options of the selection step, shared by every entry point (``EngineConfig``,
    ``RunConfig``'s ``engine`` section, ``GradSiftConfig``): one set of defaults, validated
    here.

    Attributes:
        budget_per_step: k, at most this many candidates are trained on per step.
        target_batch_size: target examples per target gradient ``g_V``.
        target_refresh: draw a fresh target batch every this many steps.
        target_ema: average ``g_V`` over refreshes, ``ĝ_n = Σ_j β^{n−j}(1−β) g_j / (1−β^n)``
            (a bias-corrected exponential moving average, β = ``target_ema``; 0: the latest
            batch only). A larger effective target batch for the price of one: less noise in
            ``b``, a slightly stale direction.
        micro_batch_size: capture in chunks of this many examples (None: all at once).
        modules: module names to capture (None: every trainable module of a known kind).
        score_layers: truncated scoring (None: off). Score with the per-sample gradients of
            the top ``L`` transformer blocks only, plus the trainable modules above them
            (final norm, an untied head; a head tied to the input embedding is left out, its
            gradient includes the embedding's use below every block), among ``modules`` when
            given (``gradsift.blocks.top_layers``). The capture records no graph below block
            N−L, so its backward stops there; the update is then a second forward+backward of
            ``Σ_i w_i ℓ_i`` over the k selected only, into every trainable parameter (the
            same loss and weights as the update from the factors). The selection objective
            (``b``, ``K``, ``g_V`` and the optimizer state ``P``, ``m`` it reads) then covers
            the scored parameters only: it selects on the top of the model. Not supported
            under a launcher yet.
        target_with_candidates: when a fresh target batch is due, it rides in the
            candidates' forward+backward: one capture of B + n rows, split after, instead of
            a capture of its own. The same ``g_V``, ``K``, ``b`` and cross Gram (each row's
            gradient does not depend on its neighbours); one pass fewer, at the price of
            padding the target examples to the candidates' width. For a launch-bound GPU, where
            a pass costs its number of operations, not its tokens; on a CPU the separate pass
            over the short target examples is cheaper. Used when the candidates are one
            micro-batch, no parameter needs the retained graph, and not under a launcher;
            otherwise the target has its own pass.
    """

    budget_per_step: int = 4
    target_batch_size: int = 8
    target_refresh: int = 1
    target_ema: float = 0.0
    micro_batch_size: int | None = None
    modules: list[str] | None = None
    score_layers: int | None = None
    target_with_candidates: bool = False

    def __post_init__(self) -> None:
        for name in ("budget_per_step", "target_batch_size", "target_refresh"):
            check_positive(name, getattr(self, name))
        for name in ("micro_batch_size", "score_layers"):
            if getattr(self, name) is not None:
                check_positive(name, getattr(self, name))
        if not isinstance(self.target_with_candidates, bool):
            raise ValueError(f"target_with_candidates must be true or false, got "
                             f"{self.target_with_candidates!r}")
        if isinstance(self.target_ema, bool) or not isinstance(self.target_ema, int | float) \
                or not 0.0 <= self.target_ema < 1.0:
            raise ValueError(f"target_ema must be a number in [0, 1), got {self.target_ema!r}")
        if self.modules is not None and (
            isinstance(self.modules, str) or not all(isinstance(m, str) for m in self.modules)
        ):
            raise ValueError(f"modules must be a list of module names, got {self.modules!r}")


def check_positive(name: str, value: object) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

