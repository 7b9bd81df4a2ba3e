"""Torch-only math of every lichtenberg technique. This package never imports lightning."""

from . import averaging, layers, schedules, sparsity, targets
from .checkpoints import load_checkpoint, plain_state_dict
from .compression import decompress_state_dict

__all__ = ["averaging", "decompress_state_dict", "layers", "load_checkpoint", "plain_state_dict", "schedules", "sparsity", "targets"]
