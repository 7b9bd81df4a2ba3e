"""Activation quantizers: fake-quantize the input of a quantized layer.

- ``dynamic``: asymmetric min/max per token (Linear) or per tensor (conv), every forward.
- ``lsq``: learned scale; signed or unsigned as the data observed at initialisation.
- ``lsq+``: learned scale and offset (asymmetric).
- ``pact``: learned clipping level alpha (symmetric if the observed inputs had negatives).

Initial values are observed on the first quantized batch and averaged over DDP ranks. That
one-off observation reads the batch's sign on the host, so it is eager code even in a
compiled forward (see ``.quantizers`` for the switch every quantizer shares).

Example:
    >>> aq = ActivationQuantizer(8)          # dynamic, per token
    >>> aq.enabled = True
    >>> y = F.linear(aq(x), weight, bias)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..distributed import local
from .functional import EPS as _EPS
from .functional import dynamic_quantize, grad_scale, lsq_quantize, qrange, round_ste
from .quantizers import _all_reduce_, _Switch, _untouched

__all__ = ["ACTIVATION_METHODS", "ActivationQuantizer"]

ACTIVATION_METHODS = ("dynamic", "lsq", "lsq+", "pact")


class ActivationQuantizer(_Switch):
    """Fake-quantizes a layer's input (identity until ``enabled``).

    Args:
        bits: integer bits (2..8).
        method: one of ``ACTIVATION_METHODS``.
        per_token: for "dynamic", one scale per row of the last dimension (Linear inputs).
    """

    def __init__(self, bits: int, method: str = "dynamic", per_token: bool = True) -> None:
        super().__init__()
        self.bits, self.method, self.per_token = bits, method, per_token
        self._init_switch()
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
        if torch.compiler.is_compiling():  # no Python state read, but for the one-off observation
            if self._signed is None and self.method != "dynamic" and not self.enabled:
                return _untouched(self, x)  # observe the first quantized batch, not an earlier one
            return torch.where(self._on, self._quantize(x), x)
        if not self.enabled:
            return _untouched(self, x)
        return self._quantize(x)

    def _quantize(self, x: Tensor) -> Tensor:
        if self.method == "dynamic":  # the range covers every input, so the STE is the identity
            return dynamic_quantize(x, self.bits, self.per_token)
        if self._signed is None:
            self._observe(x)
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
        return lsq_quantize(x, scale, qmin, qmax, g)

    @torch.compiler.disable
    def _observe(self, x: Tensor) -> None:
        """First quantized batch: initial scales from it (once per run; eager even in a compiled
        forward, as it reads the observed sign on the host and all-reduces across ranks)."""
        if not bool(self.initialized):
            self._init(x.detach())
        self._signed = bool(self.signed)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)
        self._signed = None
