"""Lightning callbacks: thin adapters from Trainer time to ``lichtenberg.core`` calls."""

from .averaging import EMA, SWA
from .pruning import GradualPruning
from .quantization import QuantizationAwareTraining
from .sparse_training import DynamicSparseTraining

__all__ = ["EMA", "DynamicSparseTraining", "GradualPruning", "QuantizationAwareTraining", "SWA"]
