"""Fused fake-quant on GPUs: the eager autograd nodes of ``.functional`` compiled by torch.compile.

Eager, LSQ's forward and backward are 10 kernels and a dynamic input's 15, each a launch that
a GPU finishes faster than the host issues the next: per quantized layer that is launch
latency, not arithmetic. Compiled by inductor, the same code becomes a few fused kernels
(one per reduction and one elementwise pass in each direction) with the same values: the
autograd nodes have no host sync and no data-dependent branch, so they trace whole.

Used for CUDA tensors outside a compiled region (inside one, the user's compile already fuses
them) when triton is importable; the eager nodes stay the reference and the fallback. A
compile that fails warns once and falls back to eager for the rest of the process. Set
``LICHTENBERG_FUSED_QUANT=0`` to keep the eager path. Shapes are dynamic and LSQ's gradient
factor is passed as a tensor, so layers of every size share one graph per tensor rank.

Example:
    >>> fn = fused(_LSQ.apply, x)        # the compiled function for CUDA tensors, else None
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["DEVICES", "fused", "fused_enabled"]

DEVICES = ("cuda",)  # where fusing pays; tests add "cpu" with a cheap backend
BACKEND = "inductor"
_compiled: dict[Callable, Callable] = {}
_failed: set[Callable] = set()
_factors: dict[tuple, Tensor] = {}
_TRITON: bool | None = None


def fused_enabled(x: Tensor) -> bool:
    """Whether ``x``'s fake-quant runs compiled: on a fusing device, outside a compiled region."""
    if x.device.type not in DEVICES or torch.compiler.is_compiling():
        return False
    if os.environ.get("LICHTENBERG_FUSED_QUANT", "1") == "0":
        return False
    return BACKEND != "inductor" or x.device.type == "cpu" or _has_triton()


def _has_triton() -> bool:
    global _TRITON
    if _TRITON is None:
        _TRITON = importlib.util.find_spec("triton") is not None
    return _TRITON


def fused(fn: Callable, x: Tensor) -> Callable | None:
    """``fn`` compiled (once per process) if ``x`` qualifies and compiling has not failed, else None."""
    if not fused_enabled(x) or fn in _failed:  # the device check first: a compiled caller never hashes fn
        return None
    compiled = _compiled.get(fn)
    if compiled is None:
        compiled = _compiled[fn] = torch.compile(fn, backend=BACKEND, dynamic=True, fullgraph=True)
    return _guarded(fn, compiled)


def _guarded(fn: Callable, compiled: Callable) -> Callable:
    def run(*args):
        try:
            return compiled(*args)
        except Exception as error:  # noqa: BLE001 - any compiler failure: the eager node is exact
            _failed.add(fn)
            warnings.warn(f"lichtenberg: fused fake-quant failed to compile ({type(error).__name__}: {error}); "
                          "using the eager path (set LICHTENBERG_FUSED_QUANT=0 to skip the attempt).", stacklevel=3)
            return fn(*args)

    return run


def factor(value: float, like: Tensor) -> Tensor:
    """A cached 0-dim tensor of ``value`` on ``like``'s device: a compiled graph specialises on a
    Python float (a recompile per layer width), not on a tensor's value."""
    key = (value, like.device)
    t = _factors.get(key)
    if t is None:
        t = _factors[key] = torch.tensor(value, device=like.device)
    return t
