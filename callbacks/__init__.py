"""Lightning callbacks: thin adapters from Trainer time to ``lichtenberg.core`` calls."""

from ._per_sample import weighted_loss
from .averaging import EMA, SWA
from .data_pruning import DataPruning
from .pruning import GradualPruning
from .quantization import QuantizationAwareTraining
from .reweighting import SampleReweighting
from .soup import Soup
from .sparse_training import DynamicSparseTraining

__all__ = [
    "EMA",
    "DataPruning",
    "DynamicSparseTraining",
    "GradualPruning",
    "QuantizationAwareTraining",
    "SWA",
    "SampleReweighting",
    "Soup",
    "weighted_loss",
]
