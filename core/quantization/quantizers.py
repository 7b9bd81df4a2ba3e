"""Quantizer modules: one for a weight tensor, one for a layer's input activations.

Weights (symmetric, per tensor / output channel / group of inputs):
- ``minmax``: scale = max|w| / Q_P, recomputed every forward (plain STE).
- ``lsq``: learned scale (LSQ), initialised to 2 mean|w| / sqrt(Q_P) when quantization starts.
- ``stat``: OFQ's statistic scale 2 mean|w| per group, recomputed and not learned, on a grid
  without a zero level: ((round(n w / s - 1/2) + 1/2) / n) s, n = 2^(b-1).
- ``ternary``: BitNet b1.58, absmean scale, levels {-s, 0, s}.
- ``binary``: sign(w) mean|w| with ReSTE's backward (``o`` rises from 1, the plain STE).

Oscillation tracking (optional, integer grids): the integer level of every weight is kept;
a change of level that reverses the direction of the previous change is an oscillation,
and its EMA (momentum 0.01, as OFQ) is kept per weight. ``freeze_`` pins weights whose
oscillation EMA exceeds a threshold to their current level (Nagel et al., 2022).

Activations (the input of a quantized layer):
- ``dynamic``: asymmetric min/max per token (Linear) or per tensor (conv), every forward.
- ``lsq``: learned scale; signed or unsigned as the data observed at initialisation.
- ``lsq+``: learned scale and offset (asymmetric).
- ``pact``: learned clipping level alpha (symmetric if the observed inputs had negatives).
Initial values are observed on the first quantized batch and averaged over DDP ranks.

Example:
    >>> wq = WeightQuantizer(linear.weight.shape, bits=4, method="lsq")
    >>> wq.enabled = True
    >>> y = F.linear(x, wq(linear.weight), linear.bias)
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..distributed import local
from .functional import binarize, grad_scale, grouped, lsq_quantize, qrange, round_ste, straight_through, ternarize

__all__ = ["ActivationQuantizer", "WeightQuantizer", "WEIGHT_METHODS", "ACTIVATION_METHODS"]

WEIGHT_METHODS = ("minmax", "lsq", "stat", "ternary", "binary")
ACTIVATION_METHODS = ("dynamic", "lsq", "lsq+", "pact")
_EPS = 1e-8


def _untouched(module: nn.Module, x: Tensor) -> Tensor:
    """``x`` unchanged, but wired to the module's parameters with a zero gradient: before
    quantization starts, DDP must still see every parameter take part in the loss."""
    params = list(module.parameters(recurse=False))
    if params and torch.is_grad_enabled():
        return x + sum(local(p).sum() for p in params) * 0.0
    return x


def _all_reduce_(t: Tensor, op: str = "mean") -> Tensor:
    """Average (or max) ``t`` over the default process group, if there is one."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            t /= dist.get_world_size()
    return t


class WeightQuantizer(nn.Module):
    """Fake-quantizes one weight tensor (identity until ``enabled``).

    Args:
        shape: the weight's shape as rows ``[out, in, ...]`` (``lichtenberg.core.layers.as_rows``):
            scales and tracking buffers are sized from it, "channel" means output feature.
        bits: integer bits (2..8), or "ternary" / "binary".
        method: one of ``WEIGHT_METHODS``; ternary and binary imply theirs.
        granularity: "tensor", "channel" (per output row) or "group" (of ``group_size`` inputs).
        group_size: inputs per group for "group".
        track: keep oscillation statistics (needed by ``freeze_``).
    """

    def __init__(self, shape: torch.Size, bits: int | str, method: str, granularity: str = "channel",
                 group_size: int = 128, track: bool = False) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.bits, self.method, self.granularity, self.group_size = bits, method, granularity, group_size
        self.enabled, self.o = False, 1.0  # set by the callback; o: ReSTE's exponent
        self._ready = self._any_frozen = None  # Python mirrors of buffers: no host sync per forward
        self.integer = isinstance(bits, int)
        if self.integer:
            self.qmin, self.qmax = qrange(bits, signed=True)
        groups = grouped(torch.empty(shape, device="meta"), granularity, group_size).shape
        self.register_buffer("initialized", torch.tensor(False))
        if method == "lsq":
            self.scale = nn.Parameter(torch.ones(groups[0], groups[1], 1))
        self.track = track and self.integer
        if self.track:
            self.register_buffer("level", torch.zeros(shape, dtype=torch.int16))
            self.register_buffer("direction", torch.zeros(shape, dtype=torch.int8))
            self.register_buffer("oscillation", torch.zeros(shape))
            self.register_buffer("frozen", torch.zeros(shape, dtype=torch.bool))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, method={self.method}, granularity={self.granularity}"

    @property
    def spec(self) -> dict:
        """What defines this quantizer's grid (two quantizers with equal specs are interchangeable)."""
        return {"shape": list(self.shape), "bits": self.bits, "method": self.method, "granularity": self.granularity,
                "group_size": self.group_size, "track": self.track}

    def step_scale(self, w: Tensor) -> Tensor:
        """The current scale, shaped [rows, groups, 1] (for "stat": the step s / n)."""
        g = grouped(w.detach(), self.granularity, self.group_size)
        if self.method == "lsq":
            return local(self.scale).detach().abs().clamp_min(_EPS)
        if self.method == "minmax":
            return g.abs().amax(-1, keepdim=True).clamp_min(_EPS) / self.qmax
        if self.method == "stat":
            return 2 * g.abs().mean(-1, keepdim=True).clamp_min(_EPS) / 2 ** (self.bits - 1)
        return g.abs().mean(-1, keepdim=True).clamp_min(_EPS)  # ternary, binary

    def levels(self, w: Tensor) -> Tensor:
        """Integer levels of ``w`` on the current grid (stat: level k means (k + 1/2) steps)."""
        g = grouped(w.detach(), self.granularity, self.group_size)
        s = self.step_scale(w)
        if self.method == "stat":
            q = (g / s - 0.5).round().clamp(self.qmin, self.qmax)
        else:
            q = (g / s).round().clamp(self.qmin, self.qmax)
        return q.reshape(w.shape)

    def forward(self, w: Tensor) -> Tensor:
        if not self.enabled:
            return _untouched(self, w)
        if self.method == "ternary":
            return ternarize(w, self.step_scale(w).expand_as(grouped(w, self.granularity, self.group_size)).reshape(w.shape))
        if self.method == "binary":
            s = self.step_scale(w).expand_as(grouped(w, self.granularity, self.group_size)).reshape(w.shape)
            return binarize(w, s, self.o)
        g = grouped(w, self.granularity, self.group_size)
        if not self._ready:
            self._start(w, g)
        if self.method == "lsq":
            s = local(self.scale).abs().clamp_min(_EPS)
            if not self.track:
                return lsq_quantize(g, s, self.qmin, self.qmax, 1.0 / math.sqrt(g.shape[-1] * self.qmax)).reshape(w.shape)
            s = grad_scale(s, 1.0 / math.sqrt(g.shape[-1] * self.qmax))
        else:
            s = self.step_scale(w)
        if self.method == "minmax" and not self.track:  # |w| / s <= Q_P: nothing clips, the STE is the identity
            with torch.no_grad():
                q = (g / s).round_().clamp_(self.qmin, self.qmax).mul_(s)
            return straight_through(w, q.reshape(w.shape))
        offset = 0.5 if self.method == "stat" else 0.0
        q = round_ste(torch.clamp(g / s - offset, self.qmin, self.qmax))  # [rows, groups, size]; LSQ clips, then rounds
        if self.track:
            q = self._track(q.reshape(w.shape)).reshape(q.shape)
        return ((q + offset) * s).reshape(w.shape)

    @torch.no_grad()
    def _start(self, w: Tensor, g: Tensor) -> None:
        """First quantized forward: LSQ's initial scale, the tracker's first levels."""
        if not self.initialized:
            if self.method == "lsq":
                local(self.scale).copy_(2 * g.abs().mean(-1, keepdim=True) / math.sqrt(self.qmax))
            if self.track:
                self.level.copy_(self.levels(w))
            self.initialized.fill_(True)
        self._ready = True

    def _track(self, q: Tensor) -> Tensor:
        """Update the oscillation EMA (training steps only); frozen weights keep their level."""
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                level = q.detach().to(torch.int16)
                step = (level - self.level).sign().to(torch.int8)
                flipped = (step != 0) & (step == -self.direction)
                self.oscillation.mul_(0.99).add_(flipped.float(), alpha=0.01)
                self.direction.copy_(torch.where(step != 0, step, self.direction))
                self.level.copy_(torch.where(self.frozen, self.level, level))
        if self._any_frozen is None:
            self._any_frozen = bool(self.frozen.any())
        if self._any_frozen:
            q = torch.where(self.frozen, self.level.to(q.dtype), q)
        return q

    @torch.no_grad()
    def freeze_(self, threshold: float = 0.005) -> int:
        """Pin weights oscillating more often than ``threshold`` to their current level."""
        if not self.track:
            return 0
        self.frozen |= self.oscillation > threshold
        self._any_frozen = None
        return int(self.frozen.sum())

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)
        self._ready = self._any_frozen = None


class ActivationQuantizer(nn.Module):
    """Fake-quantizes a layer's input (identity until ``enabled``).

    Args:
        bits: integer bits (2..8).
        method: one of ``ACTIVATION_METHODS``.
        per_token: for "dynamic", one scale per row of the last dimension (Linear inputs).
    """

    def __init__(self, bits: int, method: str = "dynamic", per_token: bool = True) -> None:
        super().__init__()
        self.bits, self.method, self.per_token = bits, method, per_token
        self.enabled = False
        self._signed: bool | None = None  # Python mirror of the buffer: no host sync per forward
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("signed", torch.tensor(False))
        if method in ("lsq", "lsq+", "pact"):
            self.scale = nn.Parameter(torch.ones(()))  # pact: the clipping level alpha
        if method == "lsq+":
            self.zero_point = nn.Parameter(torch.zeros(()))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, method={self.method}"

    @property
    def spec(self) -> dict:
        """What defines this quantizer's grid."""
        return {"bits": self.bits, "method": self.method, "per_token": self.per_token}

    @torch.no_grad()
    def _init(self, x: Tensor) -> None:
        signed = _all_reduce_((x.min() < 0).float(), "max") > 0
        self.signed.copy_(signed)
        qmin, qmax = qrange(self.bits, bool(signed))
        scale = local(self.scale)
        if self.method == "lsq":
            scale.copy_(_all_reduce_(2 * x.abs().mean() / math.sqrt(qmax)))
        elif self.method == "pact":
            scale.copy_(_all_reduce_(x.abs().amax(), "max"))
        else:  # lsq+: asymmetric over the observed range
            lo, hi = _all_reduce_(x.min()), _all_reduce_(x.max())
            s = ((hi - lo) / (2**self.bits - 1)).clamp_min(_EPS)
            scale.copy_(s)
            local(self.zero_point).copy_(-lo / s)
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return _untouched(self, x)
        if self.method == "dynamic":
            with torch.no_grad():  # the range covers every input, so the STE is the identity
                rows = x.reshape(-1, x.shape[-1]) if self.per_token else x.reshape(1, -1)
                # zero stays exactly representable; amin + amax beat aminmax along a dim on CPU (4x)
                lo, hi = rows.amin(-1, keepdim=True).clamp_(max=0), rows.amax(-1, keepdim=True).clamp_(min=0)
                s = ((hi - lo) / (2**self.bits - 1)).clamp_min(_EPS)
                z = (-lo / s).round()
                q = (rows / s).add_(z).round_().clamp_(0, 2**self.bits - 1).sub_(z).mul_(s)
            return straight_through(x, q.reshape(x.shape))
        if self._signed is None:
            if not self.initialized:
                self._init(x)
            self._signed = bool(self.signed)
        qmin, qmax = qrange(self.bits, self._signed)
        scale = local(self.scale)  # a replicated DTensor under FSDP2 (see .sharded)
        if self.method == "pact":
            alpha = scale
            y = torch.minimum(torch.maximum(x, -alpha if self._signed else torch.zeros_like(alpha)), alpha)
            s = alpha.detach().clamp_min(_EPS) / qmax
            return round_ste(y / s) * s
        g = 1.0 / math.sqrt(max(x[0].numel(), 1) * qmax)
        if self.method == "lsq+":
            s = grad_scale(scale, g).abs().clamp_min(_EPS)
            qmin, qmax = 0, 2**self.bits - 1
            z = round_ste(grad_scale(local(self.zero_point), g))
            return (round_ste(torch.clamp(x / s + z, qmin, qmax)) - z) * s
        return lsq_quantize(x, scale.abs().clamp_min(_EPS), qmin, qmax, g)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)
        self._signed = None
