"""Lightning callbacks: thin adapters from Trainer time to ``lichtenberg.core`` calls."""

from .averaging import EMA, SWA
from .pruning import GradualPruning

__all__ = ["EMA", "GradualPruning", "SWA"]
