"""Weight averaging math: EMA and SWA updates on name-keyed copies, BatchNorm re-estimation,
and the buffers that hold averages of FSDP2 shards."""

from .batchnorm import batchnorm_layers, update_bn_
from .sharded import AVERAGE_SUFFIXES, attach_buffers_, detach_buffers_, read_buffers, reshard_
from .weights import AveragedWeights, averageable_tensors, ema_decay, ema_update_, load_tensors_, swa_update_

__all__ = [
    "AVERAGE_SUFFIXES",
    "AveragedWeights",
    "attach_buffers_",
    "averageable_tensors",
    "batchnorm_layers",
    "detach_buffers_",
    "ema_decay",
    "ema_update_",
    "load_tensors_",
    "read_buffers",
    "reshard_",
    "swa_update_",
    "update_bn_",
]
