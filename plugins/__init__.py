"""Trainer plugins and strategies: only where a callback cannot reach.

Importing this package registers the strategy names ``"sparse_ddp"`` and ``"sparse_ddp_spawn"``.
"""

from .sparse_ddp import SparseDDPStrategy

__all__ = ["SparseDDPStrategy"]
