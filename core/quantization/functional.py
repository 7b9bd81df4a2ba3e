"""Fake-quantization math: integer grids, straight-through estimators, group views.

Every quantizer here is "quantize then dequantize" in float, differentiable by a
straight-through estimator (STE):

- ``fake_quantize`` clamps ``x / s + z`` to the integer range and rounds with an STE. The
  gradient to ``x`` is 1 inside the clip range and 0 outside. Because the scale enters
  the graph, the gradient to a learned scale is LSQ's, ``round(v) - v`` inside and the
  clip bound outside (Esser et al., 2020), with no hand-written backward.
- ``lsq_quantize`` is the same forward and the same gradients as ``fake_quantize`` with a
  learned scale (no offset), written as one autograd node of 10 kernels with no host sync:
  on CPU it runs ~2x faster than the composed version, whose clamp and division backward
  dominate a QAT step; torch.compile traces it whole (no graph break).
- ``dynamic_quantize`` is the min/max asymmetric grid of a layer's input, per token or per
  tensor, in one autograd node with an identity backward.
- ``straight_through`` returns a value computed without autograd and passes the gradient to
  the input unchanged: for grids that cover their input by construction (min/max scales),
  where the STE's clip mask would be all ones.
- ``ternarize`` (BitNet b1.58) and ``binarize`` (sign, with ReSTE's backward) are the
  1.58- and 1-bit cases.

Example:
    >>> qmin, qmax = qrange(4, signed=True)                  # -8, 7
    >>> w_q = fake_quantize(w, scale, torch.zeros(()), qmin, qmax)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .fused import factor as fused_factor
from .fused import fused

EPS = 1e-8  # smallest scale: an all-zero group still divides by something

__all__ = [
    "EPS",
    "binarize",
    "dynamic_quantize",
    "fake_quantize",
    "grad_scale",
    "grouped",
    "lsq_quantize",
    "qrange",
    "reste_power",
    "round_ste",
    "straight_through",
    "ternarize",
]


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a ``bits``-bit grid: [-2^(b-1), 2^(b-1) - 1] or [0, 2^b - 1]."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def round_ste(x: Tensor) -> Tensor:
    """round(x) forward, identity backward."""
    return x + (x.round() - x).detach()


def grad_scale(x: Tensor, scale: float) -> Tensor:
    """x forward, gradient multiplied by ``scale`` (LSQ's step-size gradient scaling)."""
    scaled = x * scale
    return (x - scaled).detach() + scaled


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """``(clamp(round(x / scale + z), qmin, qmax) - z) * scale`` with an STE through the rounding.

    ``scale`` and ``zero_point`` broadcast against ``x``; ``zero_point`` is rounded (with an
    STE) so the grid is exactly an integer grid and exports without error.
    """
    z = round_ste(zero_point)
    v = torch.clamp(x / scale + z, qmin, qmax)
    return (round_ste(v) - z) * scale


class _LSQ(torch.autograd.Function):
    """clamp(round(x / s), qmin, qmax) * s with s = max(|p|, eps) and LSQ's gradients (Esser et al., 2020).

    d/dx is 1 where qmin <= x / s <= qmax, else 0. d/dp is round(x / s) - x / s inside and the
    clip bound outside, times ``grad_factor`` and sign(p), summed over the dimensions ``p``
    broadcasts on. Branch-free and without host syncs (a GPU's launch queue never stalls, and
    torch.compile traces it whole): 10 kernels forward and backward together. The clip mask is
    a float 0/1 tensor because bool masks are the slowest elementwise passes on CPU.
    """

    @staticmethod
    def forward(ctx, x: Tensor, p: Tensor, qmin: int, qmax: int, grad_factor: float) -> Tensor:  # type: ignore[override]
        s = p.abs().clamp_min_(EPS)
        v = x / s
        q = v.clamp(qmin, qmax)
        inside = torch.eq(v, q, out=torch.empty_like(v))
        q.round_()  # clip then round: equal to round then clip on an integer grid
        d_s = torch.addcmul(q, v, inside, value=-1.0)  # d q s / d s: inside round(v) - v, outside the bound
        # d s / d p = sign(p) where |p| >= eps; below it p / eps (a dead scale can still recover)
        ctx.save_for_backward(inside, d_s, (p / s).mul_(grad_factor))
        return q.mul_(s)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None, None, None]:  # type: ignore[override]
        inside, d_s, factor = ctx.saved_tensors
        return grad * inside, (grad * d_s).sum_to_size(factor.shape).mul_(factor), None, None, None


def lsq_quantize(x: Tensor, scale: Tensor, qmin: int, qmax: int, grad_factor: float = 1.0) -> Tensor:
    """``clamp(round(x / s), qmin, qmax) * s`` with ``s = max(|scale|, 1e-8)``; gradients as
    ``fake_quantize`` with a zero offset, the scale's multiplied by ``grad_factor`` (LSQ's
    1 / sqrt(N Q_P)). ``scale`` broadcasts against ``x``.
    """
    compiled = fused(_LSQ.apply, x)  # CUDA: a few fused kernels (see .fused)
    if compiled is not None:
        return compiled(x, scale, qmin, qmax, fused_factor(grad_factor, x))
    return _LSQ.apply(x, scale, qmin, qmax, grad_factor)


class _Dynamic(torch.autograd.Function):
    """Asymmetric min/max fake-quant of ``x`` per row of its last dimension (or per tensor),
    identity backward: the range covers every input, so the STE's clip mask is all ones."""

    @staticmethod
    def forward(ctx, x: Tensor, bits: int, per_row: bool) -> Tensor:  # type: ignore[override]
        top = 2**bits - 1
        lo, hi = (x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)) if per_row else (x.amin(), x.amax())
        lo.clamp_(max=0)  # zero stays exactly representable
        hi.clamp_(min=0)
        s = hi.sub_(lo).div_(top).clamp_min_(EPS)  # [..., 1]
        zn = lo.div_(s).round_()  # minus the zero point: round is odd, so this is exactly -round(-lo / s)
        return (x / s).sub_(zn).round_().clamp_(0, top).add_(zn).mul_(s)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        return grad, None, None


def dynamic_quantize(x: Tensor, bits: int, per_row: bool = True) -> Tensor:
    """``(clamp(round(x / s + z), 0, 2^b - 1) - z) * s`` with s, z from the min/max of each row of
    the last dimension (``per_row``) or of the whole tensor, the range widened to hold 0;
    gradient to ``x`` unchanged. No host sync, 15 kernels, none in the backward."""
    compiled = fused(_Dynamic.apply, x)
    return compiled(x, bits, per_row) if compiled is not None else _Dynamic.apply(x, bits, per_row)


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, value: Tensor) -> Tensor:  # type: ignore[override]
        return value

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


def straight_through(x: Tensor, value: Tensor) -> Tensor:
    """``value`` forward (computed from ``x`` without autograd); gradient to ``x`` unchanged."""
    return _StraightThrough.apply(x, value.detach())


def grouped(x: Tensor, granularity: str, group_size: int) -> Tensor:
    """View a weight as [rows, groups, group_size] so that scales of shape [rows, groups, 1]
    broadcast: one group for "tensor" (rows = 1), the whole row for "channel"."""
    if granularity == "tensor":
        return x.reshape(1, 1, -1)
    rows = x.reshape(x.shape[0], -1)  # [out, fan_in]
    if granularity == "channel":
        return rows.unsqueeze(1)
    return rows.reshape(rows.shape[0], -1, group_size)


def ternarize(w: Tensor, scale: Tensor) -> Tensor:
    """BitNet b1.58: ``clamp(round(w / s), -1, 1) * s`` forward, identity backward (s detached)."""
    s = scale.detach()
    q = torch.clamp((w / s).round(), -1, 1) * s
    return w + (q - w).detach()


class _ReSTEBinarize(torch.autograd.Function):
    """sign(x) forward; backward the derivative of sign(x)|x|^(1/o), 0 beyond ``t``."""

    @staticmethod
    def forward(ctx, x: Tensor, o: float | Tensor, t: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.o, ctx.t = o, t  # o may be a 0-dim tensor: it changes every step, a compiled graph must not guard on it
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * reste_power(x, ctx.o, ctx.t), None, None


def reste_power(x: Tensor, o: float | Tensor, t: float, knee: float = 0.1) -> Tensor:
    """ReSTE's surrogate derivative: (1/o)|x|^((1-o)/o) on (knee, t], the secant slope
    knee^(1/o) / knee below the knee (no singularity at 0), 0 beyond t. o = 1 is the plain
    (clipped) STE. ``o`` is a float or a 0-dim tensor."""
    a = x.abs()
    power = a.clamp_min(knee).pow((1.0 - o) / o) / o
    secant = (torch.pow(knee, 1.0 / o) if isinstance(o, Tensor) else math.pow(knee, 1.0 / o)) / knee
    return torch.where(a > t, 0.0, torch.where(a > knee, power, secant)).to(x.dtype)


def binarize(w: Tensor, scale: Tensor, o: float | Tensor = 1.0, t: float = 1.5) -> Tensor:
    """``sign(w) * s`` with s detached; ReSTE backward on w / s (o = 1: clipped STE)."""
    s = scale.detach()
    return _ReSTEBinarize.apply(w / s, o, t) * s
