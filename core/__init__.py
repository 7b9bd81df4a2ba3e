"""Torch-only math of every lichtenberg technique. This package never imports lightning."""

from . import averaging

__all__ = ["averaging"]
