"""Layer kinds: what makes a weight "Linear-like", in one table.

Every technique that cares about a weight's axes reads this table: target selection, N:M
groups (along the inputs), Wanda's input norms, SRigL's fan-in, per-channel quantization
scales, fake-quant forwards and integer exports. A kind says which weight axis holds the
outputs, where a layer's input keeps its features, and how to run the layer with another
weight. A new layer type is one :func:`register_layer_kind` call.

Classes are matched along the MRO by ``module.qualname``, so subclasses (timm's ``Linear``,
``nn.MultiheadAttention``'s ``out_proj``) count as their base kind, and classes of packages
lichtenberg never imports (Hugging Face's GPT-2 ``Conv1D``, weight ``[in, out]``) are known
without importing them.

Example:
    >>> kind = layer_kind(model.transformer.h[0].attn.c_attn)   # Conv1D, out_axis=1
    >>> w = as_rows(module.weight, kind)                          # [out, in] view
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["KINDS", "LayerKind", "as_rows", "from_rows", "layer_kind", "register_layer_kind"]


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """How one layer type holds its weight.

    Args:
        name: the kind's name, as used in ``Targets.types`` ("Linear", "Conv1D", ...).
        out_axis: the weight axis of the output features (0 for ``[out, in, ...]``, 1 for
            Hugging Face's ``Conv1D`` ``[in, out]``); every other axis is an input axis.
        features: the axis of the layer's *input* tensor that holds the input features (-1
            for Linear-like, 1 for convolutions, None when inputs are indices).
        forward: ``forward(module, x, weight)`` runs the layer on ``x`` with ``weight`` given
            as rows ``[out, ...]`` (see :func:`as_rows`); None if it cannot be fake-quantized.
    """

    name: str
    out_axis: int = 0
    features: int | None = -1
    forward: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None


def _linear(module: nn.Module, x: Tensor, w: Tensor) -> Tensor:
    return F.linear(x, w, module.bias)


def _conv(module: nn.Module, x: Tensor, w: Tensor) -> Tensor:
    return module._conv_forward(x, w, module.bias)


def _embedding(module: nn.Module, x: Tensor, w: Tensor) -> Tensor:
    return F.embedding(x, w, module.padding_idx, module.max_norm, module.norm_type, module.scale_grad_by_freq,
                       module.sparse)


KINDS: dict[str, LayerKind] = {}
_BY_CLASS: dict[str, str] = {}  # "module.QualName" -> kind name


def register_layer_kind(class_path: str, kind: LayerKind) -> None:
    """Teach every technique a layer type: ``class_path`` is "package.module.ClassName"."""
    KINDS[kind.name] = kind
    _BY_CLASS[class_path] = kind.name


register_layer_kind("torch.nn.modules.linear.Linear", LayerKind("Linear", 0, -1, _linear))
register_layer_kind("torch.nn.modules.conv.Conv1d", LayerKind("Conv1d", 0, 1, _conv))
register_layer_kind("torch.nn.modules.conv.Conv2d", LayerKind("Conv2d", 0, 1, _conv))
register_layer_kind("torch.nn.modules.conv.Conv3d", LayerKind("Conv3d", 0, 1, _conv))
register_layer_kind("torch.nn.modules.sparse.Embedding", LayerKind("Embedding", 0, None, _embedding))
# Hugging Face GPT-2 family: y = x @ W + b with W [in, out], i.e. F.linear with W^T.
register_layer_kind("transformers.pytorch_utils.Conv1D", LayerKind("Conv1D", 1, -1, _linear))


def layer_kind(module: nn.Module) -> tuple[LayerKind, bool] | None:
    """The kind of ``module`` and whether its class IS the kind's class (not a subclass).

    A fake-quant layer counts as the layer it replaced (its class declares ``target_name``).
    """
    cls = type(module)
    replaced = getattr(cls, "target_name", None)
    if replaced is not None:
        return KINDS[replaced], True
    for i, base in enumerate(cls.__mro__):
        name = _BY_CLASS.get(f"{base.__module__}.{base.__qualname__}")
        if name is not None:
            return KINDS[name], i == 0
    return None


def as_rows(weight: Tensor, kind: LayerKind) -> Tensor:
    """``weight`` viewed with the output axis first, ``[out, in, ...]`` (no copy)."""
    return weight if kind.out_axis == 0 else weight.movedim(kind.out_axis, 0)


def from_rows(rows: Tensor, kind: LayerKind) -> Tensor:
    """Inverse of :func:`as_rows`: a ``[out, ...]`` tensor back in the layer's own layout."""
    return rows if kind.out_axis == 0 else rows.movedim(0, kind.out_axis)
