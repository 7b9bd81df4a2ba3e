"""Weight quantizers, and the on/off switch every quantizer shares.

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

Activation quantizers are in ``.activations``; both share the switch below.

No host syncs and no recompiles: what changes during training (on/off, ReSTE's exponent) is
mirrored into 0-dim tensor buffers (not saved). Eager forwards branch on the Python value (no
work while off); under torch.compile the forward reads only the tensors and selects with
``torch.where``, so switching quantization on at ``start_step`` reuses the compiled graph.
Weight scales are initialised by ``initialize_`` outside the forward (the callback calls it
when quantization starts). The data-initialised activation methods (lsq, lsq+, pact) observe
their first quantized batch in eager code: under torch.compile that costs graph breaks and
recompiles at the start step and the step after, then none.

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
from .functional import EPS, binarize, grad_scale, grouped, lsq_quantize, qrange, round_ste, straight_through, ternarize

__all__ = ["WeightQuantizer", "WEIGHT_METHODS"]

WEIGHT_METHODS = ("minmax", "lsq", "stat", "ternary", "binary")
_EPS = EPS


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


class _Switch(nn.Module):
    """``enabled`` as a Python flag (eager branches on it) mirrored into a 0-dim buffer (compiled
    graphs select on it, so flipping it never recompiles). The buffer is written only when the
    flag changes: a kernel launch per change, not per step."""

    def _init_switch(self) -> None:
        self._enabled = False
        self.register_buffer("_on", torch.tensor(False), persistent=False)

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        if bool(value) != self._enabled:
            self._enabled = bool(value)
            self._on.fill_(self._enabled)


class WeightQuantizer(_Switch):
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
        self._init_switch()
        self._o_value = 1.0
        self.register_buffer("_o", torch.tensor(1.0), persistent=False)  # ReSTE's exponent, set by the callback
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

    @property
    def o(self) -> float:
        """ReSTE's exponent (binary weights): 1 is the plain STE."""
        return self._o_value

    @o.setter
    def o(self, value: float) -> None:
        if value != self._o_value:
            self._o_value = value
            self._o.fill_(value)

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
        if torch.compiler.is_compiling():  # no Python state read: see the module docstring
            return torch.where(self._on, self._quantize(w), w)
        if not self.enabled:
            return _untouched(self, w)
        if not self._ready:
            self.initialize_(w)
        return self._quantize(w)

    def _quantize(self, w: Tensor) -> Tensor:
        if self.method == "ternary":
            return ternarize(w, self.step_scale(w).expand_as(grouped(w, self.granularity, self.group_size)).reshape(w.shape))
        if self.method == "binary":
            s = self.step_scale(w).expand_as(grouped(w, self.granularity, self.group_size)).reshape(w.shape)
            return binarize(w, s, self._o)
        if self.method == "lsq" and not self.track:
            return self._lsq(w)
        g = grouped(w, self.granularity, self.group_size)
        if self.method == "lsq":
            s = grad_scale(local(self.scale).abs().clamp_min(_EPS), 1.0 / math.sqrt(g.shape[-1] * self.qmax))
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

    def _lsq(self, w: Tensor) -> Tensor:
        """LSQ in one autograd node; the weight keeps its layout where the scale can broadcast
        against it (per tensor, per output row), saving the reshapes."""
        scale = local(self.scale)  # [rows, groups, 1]
        factor = 1.0 / math.sqrt(w.numel() // (scale.shape[0] * scale.shape[1]) * self.qmax)  # 1 / sqrt(N Q_P)
        if self.granularity == "group":
            g = grouped(w, self.granularity, self.group_size)
            return lsq_quantize(g, scale, self.qmin, self.qmax, factor).reshape(w.shape)
        shape = (scale.shape[0],) + (1,) * (w.dim() - 1)  # [rows, 1, ...] or all ones
        return lsq_quantize(w, scale.view(shape), self.qmin, self.qmax, factor)

    @torch.no_grad()
    def initialize_(self, w: Tensor) -> None:
        """LSQ's initial scale and the tracker's first levels from ``w`` (rows), once per run;
        a no-op when the state was initialised (or loaded) already. Call it outside a compiled
        forward, before quantization starts: it reads a buffer on the host."""
        if not bool(self.initialized):
            if self.method == "lsq":
                g = grouped(w.detach(), self.granularity, self.group_size)
                local(self.scale).copy_(2 * g.abs().mean(-1, keepdim=True) / math.sqrt(self.qmax))
            if self.track:
                self.level.copy_(self.levels(w))
            self.initialized.fill_(True)
        if self.track and self._any_frozen is None:
            self._any_frozen = bool(self.frozen.any())
        self._ready = True

    def _track(self, q: Tensor) -> Tensor:
        """Update the oscillation EMA (training steps only); frozen weights keep their level."""
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                level = q.detach().to(torch.int16)
                step = (level - self.level).sign().to(torch.int8)
                keep = self.frozen
                if torch.compiler.is_compiling():  # compiled forwards run this before the start step too: no effect then
                    step = step * self._on
                    keep = keep | ~self._on
                flipped = (step != 0) & (step == -self.direction)
                before = self.oscillation.clone() if torch.compiler.is_compiling() else None
                self.oscillation.mul_(0.99).add_(flipped.float(), alpha=0.01)
                if before is not None:
                    self.oscillation.copy_(torch.where(self._on, self.oscillation, before))
                self.direction.copy_(torch.where(step != 0, step, self.direction))
                self.level.copy_(torch.where(keep, self.level, level))
        if torch.compiler.is_compiling() or self._any_frozen:  # compiled: select always, no flag to guard on
            q = torch.where(self.frozen, self.level.to(q.dtype), q)
        return q

    @torch.no_grad()
    def freeze_(self, threshold: float = 0.005) -> int:
        """Pin weights oscillating more often than ``threshold`` to their current level."""
        if not self.track:
            return 0
        self.frozen |= self.oscillation > threshold
        frozen = int(self.frozen.sum())
        self._any_frozen = frozen > 0
        return frozen

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)
        self._ready = self._any_frozen = None
