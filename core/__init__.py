"""Torch-only math of every lichtenberg technique. This package never imports lightning."""

from . import averaging, schedules, sparsity, targets

__all__ = ["averaging", "schedules", "sparsity", "targets"]
