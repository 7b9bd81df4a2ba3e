"""Weight averaging math: EMA and SWA updates on name-keyed copies, BatchNorm re-estimation."""

from .batchnorm import batchnorm_layers, update_bn_
from .weights import AveragedWeights, averageable_tensors, ema_decay, ema_update_, load_tensors_, swa_update_

__all__ = [
    "AveragedWeights",
    "averageable_tensors",
    "batchnorm_layers",
    "ema_decay",
    "ema_update_",
    "load_tensors_",
    "swa_update_",
    "update_bn_",
]
