"""From a fake-quant model to integers: exact integer weights + scales, and an int8 CPU model.

- ``export_int`` returns, per quantized layer, the integer weight and its scales such that
  ``dequantize(entry)`` equals the weight the fake-quant forward uses (up to float rounding).
  OFQ's "stat" grid has no zero level ((k + 1/2) steps): it is exported as the odd integers
  2k + 1 on half steps, which stays exact.
- ``to_int8_cpu_`` folds the fake-quantized weights into the latent ones, restores the plain
  classes and converts every ``nn.Linear`` to torch's dynamic int8 kernel (fbgemm/x86,
  per-channel weights, activations quantized per batch at run time). The module becomes an
  inference-only CPU model. torch marks these kernels deprecated in favour of torchao;
  they are still the fast int8 path on CPU without compilation.

Example:
    >>> ints = export_int(model)                 # {"fc": {"weight": int8 tensor, "scale": ...}}
    >>> torch.save(ints, "model.int.pt")
    >>> to_int8_cpu_(model)                       # now runs DynamicQuantizedLinear
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import full, is_sharded
from ..layers import KINDS, as_rows, from_rows, layer_kind
from .functional import grouped
from .modules import quant_modules, unprepare_

__all__ = ["dequantize", "export_int", "packed_bytes", "to_int8_cpu_"]


@torch.no_grad()
def export_int(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Integer weights and scales of every fake-quant layer whose quantization has started.

    Sharded (FSDP2) weights are all-gathered one layer at a time: a collective, so every rank
    calls it, and every rank gets the same whole result (save it from rank 0).
    """
    layers = quant_modules(model)
    if not layers:
        raise ValueError("the model has no fake-quant layers: prepare it (attach QuantizationAwareTraining) first.")
    out = {}
    for name, module in layers.items():
        wq = module.weight_quantizer
        if not wq.enabled:
            raise ValueError(f"{name}: its weight quantizer is not enabled (quantization has not started); "
                             "train past start_step or enable it before exporting.")
        kind = KINDS[module.target_name]
        w = as_rows(full(module.weight.detach()), kind)  # [out, in, ...]: scales are per output feature
        s = wq.step_scale(w)  # [rows, groups, 1]
        g = grouped(w, wq.granularity, wq.group_size)
        if wq.method == "ternary":
            q = torch.clamp((g / s).round(), -1, 1)
        elif wq.method == "binary":
            q = torch.where(g >= 0, 1.0, -1.0)
        else:
            q = grouped(wq.levels(w), wq.granularity, wq.group_size)
            if getattr(wq, "track", False) and bool(wq.frozen.any()):
                q = torch.where(grouped(wq.frozen, wq.granularity, wq.group_size), grouped(wq.level, wq.granularity,
                                wq.group_size).to(q.dtype), q)
            if wq.method == "stat":
                q, s = 2 * q + 1, s / 2
        mask = getattr(module, "weight_mask", None)
        if mask is not None:
            q = q * grouped(as_rows(full(mask), kind), wq.granularity, wq.group_size)
        dtype = torch.int8 if q.abs().max() <= 127 else torch.int16
        out[name] = {"weight": from_rows(q.reshape(w.shape), kind).to(dtype), "scale": s.clone(), "bits": wq.bits,
                     "method": wq.method, "granularity": wq.granularity, "group_size": wq.group_size,
                     "out_axis": kind.out_axis,
                     "bias": None if getattr(module, "bias", None) is None else full(module.bias.detach()).clone()}
    return out


def dequantize(entry: dict[str, Any]) -> Tensor:
    """The float weight an exported entry stands for, in the layer's own layout."""
    axis = entry.get("out_axis", 0)
    q = entry["weight"].movedim(axis, 0)  # [out, in, ...]
    rows = (grouped(q.float(), entry["granularity"], entry["group_size"]) * entry["scale"]).reshape(q.shape)
    return rows.movedim(0, axis)


def packed_bytes(entry: dict[str, Any]) -> int:
    """Storage of one exported weight with its integers packed at ``bits`` (ternary: 2, binary: 1),
    plus float32 scales and bias."""
    bits = {"ternary": 2, "binary": 1}.get(str(entry["bits"]), entry["bits"])
    if entry["method"] == "stat":
        bits = int(bits)  # 2k + 1 takes the same 2^b values as k
    extra = entry["scale"].numel() * 4 + (0 if entry["bias"] is None else entry["bias"].numel() * 4)
    return (entry["weight"].numel() * int(bits) + 7) // 8 + extra


@torch.no_grad()
def to_int8_cpu_(model: nn.Module) -> nn.Module:
    """Fold, unswap and convert every Linear-like layer to a dynamic int8 kernel, in place (CPU
    inference). Layers holding their weight transposed (Hugging Face ``Conv1D``) become
    ``nn.Linear`` first: torch's int8 kernel takes ``[out, in]`` weights."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    sharded = [n for n, m in quant_modules(model).items() if is_sharded(m.weight)]
    if sharded:
        raise ValueError(f"to_int8_cpu_ needs whole weights; {sharded[:3]} are FSDP2 shards. Call export_int(model) on "
                         "every rank (it gathers layer by layer), or load a full state dict into an unsharded model "
                         "prepared by the same QuantizationAwareTraining settings.")
    for name, module in unprepare_(model, fold=True).items():
        kind = layer_kind(module)[0]
        if kind.out_axis != 0 and module.weight.dim() == 2:
            linear = nn.Linear(module.weight.shape[0], module.weight.shape[1], bias=module.bias is not None)
            linear.weight.copy_(as_rows(module.weight, kind))
            if module.bias is not None:
                linear.bias.copy_(module.bias)
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner), leaf, linear)
    for module in model.modules():  # masks are folded into the weights already
        for key in [k for k in module._buffers if k.endswith("_mask")]:
            del module._buffers[key]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return quantize_dynamic(model.cpu().eval(), {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8,
                                inplace=True)
