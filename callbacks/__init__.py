"""Lightning callbacks: thin adapters from Trainer time to ``lichtenberg.core`` calls."""

from .averaging import EMA, SWA

__all__ = ["EMA", "SWA"]
