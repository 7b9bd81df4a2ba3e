"""Fake-quant layers and the prepare / unprepare pair that swaps them in and out.

``prepare_`` changes the class of each target ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` /
``nn.Embedding`` in place to its fake-quant subclass and attaches quantizer submodules.
The module object, its Parameters, hooks and any other reference to it stay the same:
tied weights stay one tensor, an optimizer built before or after still holds the right
parameters, and nothing is copied. ``unprepare_`` restores the class and removes the
quantizers (``fold=True`` first writes the fake-quantized weights into the latent ones).

Only these exact classes are swapped: a user subclass has its own forward, which a swap
would silently replace, so it is reported instead. A weight with a ``weight_mask`` buffer
(set by the sparsity callbacks) is multiplied by it after quantization: the mask applies
to the latent float weight and pruned weights quantize to exactly zero on every grid.

Example:
    >>> report = prepare_(model, {"fc": model.fc}, lambda m: WeightQuantizer(m.weight.shape, 8, "lsq"),
    ...                   lambda m: ActivationQuantizer(8))
    >>> unprepare_(model, fold=True)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["QUANT_CLASSES", "QuantConv1d", "QuantConv2d", "QuantEmbedding", "QuantLinear", "prepare_", "quant_modules", "unprepare_"]


class _Quant:
    """Shared by the fake-quant layers: quantized weight (then masked) and input."""

    weight: nn.Parameter
    weight_quantizer: nn.Module
    input_quantizer: nn.Module | None

    def quantized_weight(self) -> Tensor:
        w = self.weight_quantizer(self.weight)
        mask = getattr(self, "weight_mask", None)
        return w * mask if mask is not None else w

    def quantized_input(self, x: Tensor) -> Tensor:
        return self.input_quantizer(x) if self.input_quantizer is not None else x


class QuantLinear(nn.Linear, _Quant):
    target_name = "Linear"

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)


class QuantConv1d(nn.Conv1d, _Quant):
    target_name = "Conv1d"

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)


class QuantConv2d(nn.Conv2d, _Quant):
    target_name = "Conv2d"

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)


class QuantEmbedding(nn.Embedding, _Quant):
    target_name = "Embedding"

    def forward(self, x: Tensor) -> Tensor:
        return F.embedding(x, self.quantized_weight(), self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)


QUANT_CLASSES: dict[type, type] = {nn.Linear: QuantLinear, nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d,
                                   nn.Embedding: QuantEmbedding}
_PLAIN = {v: k for k, v in QUANT_CLASSES.items()}


def prepare_(
    modules: dict[str, nn.Module],
    weight_quantizer: Callable[[nn.Module], nn.Module],
    input_quantizer: Callable[[nn.Module], nn.Module | None],
) -> dict[str, str]:
    """Swap each module in place for its fake-quant class; returns {name: why not} for the rest.

    Modules that share one weight Parameter (tied embedding and output head) share one
    weight quantizer, so the tied weight has one grid.
    """
    skipped: dict[str, str] = {}
    by_weight: dict[int, nn.Module] = {}
    for name, module in modules.items():
        cls = QUANT_CLASSES.get(type(module))
        if cls is None:
            skipped[name] = (f"{type(module).__name__} is not one of {', '.join(c.__name__ for c in QUANT_CLASSES)} "
                             "exactly (a subclass keeps its own forward)")
            continue
        wq = by_weight.get(id(module.weight)) or weight_quantizer(module)
        by_weight[id(module.weight)] = wq
        module.__class__ = cls
        module.weight_quantizer = wq
        module.input_quantizer = None if cls is QuantEmbedding else input_quantizer(module)
    return skipped


def quant_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The fake-quant layers of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if type(m) in _PLAIN}


@torch.no_grad()
def unprepare_(model: nn.Module, fold: bool = False) -> dict[str, nn.Module]:
    """Restore the plain classes; with ``fold`` the latent weights become the quantized ones."""
    layers = quant_modules(model)
    if not layers:
        raise ValueError("the model has no fake-quant layers: prepare it (attach QuantizationAwareTraining) first.")
    if fold:  # all weights first: a tied weight must be quantized from its latent values once
        folded = {id(m.weight): (m.weight, m.quantized_weight().detach().clone()) for m in layers.values()}
        for weight, value in folded.values():
            weight.copy_(value)
    for module in layers.values():
        module.__class__ = _PLAIN[type(module)]
        del module.weight_quantizer
        del module.input_quantizer
    return layers
