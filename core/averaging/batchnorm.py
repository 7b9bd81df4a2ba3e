"""Recompute BatchNorm statistics for averaged weights.

Averaging weights does not average what BatchNorm has seen: the running mean and variance
of the last iterate do not belong to the averaged weights. SWA therefore ends with one
forward pass over training data in train mode with cumulative (momentum=None) statistics.

The pass runs eagerly even when the model was compiled: a cumulative average reads the
batch counter on the host (``1 / float(num_batches_tracked)``), which would break the graph
in every BatchNorm and recompile the training graph for momentum=None.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..compile import force_eager

__all__ = ["batchnorm_layers", "update_bn_"]


def batchnorm_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """BatchNorm layers that track running statistics."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def update_bn_(
    module: nn.Module,
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any],
    max_batches: int | None = None,
) -> int:
    """Reset and re-estimate every BatchNorm's running statistics; returns the batches seen.

    Args:
        module: the model, holding the weights whose statistics are wanted.
        batches: training batches (already on the module's device).
        forward: ``forward(module, batch)`` runs the model on one batch.
        max_batches: stop after this many batches (None: all of them).

    Example:
        >>> update_bn_(model, loader, lambda m, b: m(b[0]))
    """
    layers = batchnorm_layers(module)
    if not layers:
        return 0
    momenta = [bn.momentum for bn in layers]
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the pass
    was_training = module.training
    module.train()
    seen = 0
    try:
        with force_eager():
            for batch in batches:
                if max_batches is not None and seen >= max_batches:
                    break
                forward(module, batch)
                seen += 1
    finally:
        for bn, momentum in zip(layers, momenta):
            bn.momentum = momentum
        module.train(was_training)
    return seen

