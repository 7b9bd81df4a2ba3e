"""Strategies the weight-touching callbacks support today."""

from __future__ import annotations

import lightning.pytorch as pl

__all__: list[str] = []

_SHARDED = ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy", "XLAFSDPStrategy")


def refuse_sharded(callback: object, trainer: pl.Trainer) -> None:
    """ValueError for sharded strategies: masks, averages and fake-quant swaps assume whole tensors."""
    strategy = type(trainer.strategy).__name__
    if strategy in _SHARDED:
        raise ValueError(
            f"{type(callback).__name__} does not support the sharded strategy {strategy} yet; "
            "use strategy='ddp' (or a single device)."
        )
