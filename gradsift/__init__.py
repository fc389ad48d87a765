"""gradsift: online, optimizer-aware data selection for LLM fine-tuning (Filter-then-Weight)."""

from gradsift.capture import per_sample_grads, register_layer
from gradsift.factors import FactorizedGrads, LayerFactors
from gradsift.loss import per_sample_loss

__version__ = "0.1.0"

__all__ = [
    "FactorizedGrads",
    "LayerFactors",
    "per_sample_grads",
    "per_sample_loss",
    "register_layer",
]
