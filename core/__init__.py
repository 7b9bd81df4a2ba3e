"""Torch-only math of every lichtenberg technique. This package never imports lightning."""

from . import averaging, layers, schedules, sparsity, targets
from .checkpoints import plain_state_dict

__all__ = ["averaging", "layers", "plain_state_dict", "schedules", "sparsity", "targets"]
