"""gradsift: online, optimizer-aware data selection for LLM fine-tuning (Filter-then-Weight)."""

from gradsift import select
from gradsift.capture import per_sample_grads, register_layer
from gradsift.engine import EngineConfig, OnlineTrainer
from gradsift.factors import FactorizedGrads, LayerFactors
from gradsift.loss import per_sample_loss
from gradsift.optim_state import OptimizerState, adam_preconditioner, read_optimizer_state

__version__ = "0.1.0"

__all__ = [
    "EngineConfig",
    "FactorizedGrads",
    "LayerFactors",
    "OnlineTrainer",
    "OptimizerState",
    "adam_preconditioner",
    "per_sample_grads",
    "per_sample_loss",
    "read_optimizer_state",
    "register_layer",
    "select",
]
