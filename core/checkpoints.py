"""From a lichtenberg checkpoint to the plain module's state dict, in one call.

A checkpoint written while sparsity or QAT callbacks were attached holds more than the plain
module: ``<param>_mask`` buffers (under every alias of a tied weight) and the fake-quant
layers' quantizer state. ``plain_state_dict`` applies the masks to their weights and drops
both, so the result loads into the module without lichtenberg with ``strict=True``. The
weights are the latent float weights (QAT's fake-quantized values come from
``unprepare_(model, fold=True)`` or ``export_int`` on a prepared model). With ``averaged`` the
EMA / SWA averages stored in the callback state replace the raw weights they average (tied
aliases included, still on the masks).

Example:
    >>> state = plain_state_dict(torch.load("last.ckpt", weights_only=False), averaged="EMA")
    >>> MyModule().load_state_dict(state, strict=True)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["plain_state_dict"]

_QUANTIZER_PARTS = (".weight_quantizer.", ".input_quantizer.")


def _identity(t: Tensor) -> tuple:
    """Tensors that are one tied parameter share storage, offset, shape and strides."""
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride()


@torch.no_grad()
def plain_state_dict(checkpoint: Mapping[str, Any], averaged: str | None = None) -> dict[str, Tensor]:
    """The plain module's state dict from a Lightning checkpoint (or a module state dict).

    Args:
        checkpoint: a loaded Lightning checkpoint (``torch.load(path, weights_only=False)``) or a
            module state dict.
        averaged: "EMA" or "SWA": take the weights from that callback's averages (the checkpoint
            must hold exactly one such callback state).
    """
    state = checkpoint.get("state_dict", checkpoint)
    masks = {k[: -len("_mask")]: v for k, v in state.items()
             if k.endswith("_mask") and isinstance(v, Tensor) and v.dtype == torch.bool and k[: -len("_mask")] in state}
    out = {k: v.clone() for k, v in state.items()
           if not (k[: -len("_mask")] in masks and k.endswith("_mask")) and not any(p in k for p in _QUANTIZER_PARTS)}
    if averaged is not None:
        _load_averages(out, checkpoint, averaged)
    for name, mask in masks.items():
        out[name].mul_(mask)
    return out


def _load_averages(out: dict[str, Tensor], checkpoint: Mapping[str, Any], averaged: str) -> None:
    found = [v for k, v in (checkpoint.get("callbacks") or {}).items() if isinstance(k, str) and k.startswith(averaged + "{")]
    if len(found) != 1:
        raise ValueError(f"averaged={averaged!r}: the checkpoint holds {len(found)} {averaged} callback states, not one; "
                         "pass 'EMA' or 'SWA' as attached when it was written.")
    aliases: dict[tuple, list[str]] = {}
    for key, value in checkpoint["state_dict"].items():
        aliases.setdefault(_identity(value), []).append(key)
    for name, average in found[0]["tensors"].items():
        if any(p in name for p in _QUANTIZER_PARTS):
            continue  # averaged quantizer scales belong to the fake-quant layers, not the plain module
        if name not in out:
            raise ValueError(f"the {averaged} state averages {name!r}, which the model state does not hold.")
        for alias in aliases[_identity(checkpoint["state_dict"][name])]:
            out[alias] = average.to(out[alias].dtype).clone()
