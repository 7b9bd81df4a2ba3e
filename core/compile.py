"""What the core needs from torch.compile: running compiled code eagerly for a while.

Example:
    >>> with force_eager():   # hooks run, host reads are allowed: compiled modules run as Python
    ...     model(batch)
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["force_eager"]


def force_eager() -> contextlib.AbstractContextManager:
    """Compiled code runs as plain eager Python inside (torch >= 2.6; older: unchanged).

    For the rare steps that need what a compiled graph cannot give: forward hooks added after
    compiling (dynamo does not guard on hooks, so a compiled forward skips them) or a host read
    in every layer (SWA's cumulative BatchNorm statistics).
    """
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()
