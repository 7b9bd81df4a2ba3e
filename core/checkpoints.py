"""From a lichtenberg checkpoint to the plain module's state dict, in one call.

A checkpoint written while sparsity or QAT callbacks were attached holds more than the plain
module: ``<param>_mask`` buffers (under every alias of a tied weight) and the fake-quant
layers' quantizer state. ``plain_state_dict`` applies the masks to their weights and drops
both, so the result loads into the module without lichtenberg with ``strict=True``. The
weights are the latent float weights (QAT's fake-quantized values come from
``unprepare_(model, fold=True)`` or ``export_int`` on a prepared model). With ``averaged`` the
EMA / SWA averages stored in the callback state replace the raw weights they average (tied
aliases included, still on the masks).

A sharded run (``ModelParallelStrategy(save_distributed_checkpoint=True)``) writes a
directory instead of a file: torch.distributed.checkpoint (DCP) shards of the model and
optimizer state plus Lightning's ``meta.pt`` (callback states, loops). ``load_checkpoint``
reads either into one whole checkpoint dict, in a single process with no process group, so
``plain_state_dict`` and ``lichtenberg export`` work on both. Sharded runs keep averages as
``<param>_ema`` / ``<param>_swa`` buffers beside the weights (so DCP shards them); they are
dropped from the plain state dict, and used for ``averaged``.

Example:
    >>> state = plain_state_dict("checkpoints/last.ckpt", averaged="EMA")   # a file or a DCP directory
    >>> MyModule().load_state_dict(state, strict=True)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["load_checkpoint", "plain_state_dict"]

_QUANTIZER_PARTS = (".weight_quantizer.", ".input_quantizer.")
_BESIDE = {"_mask": None, "_ema": "EMA", "_swa": "SWA", "_soup": "Soup", "_soup_kept": None, "_rewind": None, "_ever": None,
           "_latent": None}  # kept beside weights


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A Lightning checkpoint as one dict of whole CPU tensors: a ``.ckpt`` file, or the
    directory a sharded run writes (DCP shards + ``meta.pt``), read without a process group."""
    path = Path(path)
    if not path.is_dir():
        return torch.load(path, map_location="cpu", weights_only=False)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(path)
    entries = reader.read_metadata().state_dict_metadata
    # Only the model: optimizer states need their optimizer to be rebuilt (resume with the Trainer).
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in entries.items()
             if k.startswith("state_dict.") and isinstance(m, TensorStorageMetadata)}
    dcp.load(state, storage_reader=reader, no_dist=True)
    meta = path / "meta.pt"
    checkpoint = torch.load(meta, map_location="cpu", weights_only=False) if meta.exists() else {}
    checkpoint["state_dict"] = {k[len("state_dict."):]: v for k, v in state.items()}
    return checkpoint


def _identity(t: Tensor) -> tuple:
    """Tensors that are one tied parameter share storage, offset, shape and strides."""
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride()


@torch.no_grad()
def plain_state_dict(checkpoint: Mapping[str, Any] | str | os.PathLike, averaged: str | None = None) -> dict[str, Tensor]:
    """The plain module's state dict from a Lightning checkpoint (or a module state dict).

    Args:
        checkpoint: a loaded Lightning checkpoint (``torch.load(path, weights_only=False)``), a
            module state dict, or the path of a checkpoint file or sharded checkpoint directory.
        averaged: "EMA", "SWA" or "Soup": take the weights from that callback's averages (the
            checkpoint must hold exactly one such callback state).
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = load_checkpoint(checkpoint)
    state = checkpoint.get("state_dict", checkpoint)
    beside = {k: suffix for k in state for suffix in _BESIDE
              if k.endswith(suffix) and k[: -len(suffix)] in state and isinstance(state[k], Tensor)}
    masks = {k[: -len("_mask")]: state[k] for k, suffix in beside.items() if suffix == "_mask" and state[k].dtype == torch.bool}
    out: dict[str, Any] = {}
    copies: dict[tuple, Tensor] = {}  # one copy per tied parameter: its aliases stay one tensor
    for k, v in state.items():
        if k in beside or any(p in k for p in _QUANTIZER_PARTS):
            continue
        if not isinstance(v, Tensor) or v.numel() == 0:  # empty tensors may share a null data pointer
            out[k] = v.clone() if isinstance(v, Tensor) else v
        else:
            out[k] = copies.setdefault(_identity(v), v.clone())
    if averaged is not None:
        buffers = {k[: -len(s)]: state[k] for k, s in beside.items() if _BESIDE[s] == averaged}
        _load_averages(out, state, checkpoint, averaged, buffers)
    for name, mask in masks.items():
        out[name].mul_(mask)  # a tied weight's aliases carry the same mask: applying it twice is a no-op
    return out


def _load_averages(out: dict[str, Tensor], state: Mapping[str, Tensor], checkpoint: Mapping[str, Any], averaged: str,
                   buffers: dict[str, Tensor]) -> None:
    found = [v for k, v in (checkpoint.get("callbacks") or {}).items() if isinstance(k, str) and k.startswith(averaged + "{")]
    if len(found) > 1 or not (found or buffers):
        raise ValueError(f"averaged={averaged!r}: the checkpoint holds {len(found)} {averaged} callback states, not one; "
                         "pass 'EMA' or 'SWA' as attached when it was written.")
    aliases: dict[tuple, list[str]] = {}
    for key, value in state.items():
        aliases.setdefault(_identity(value), []).append(key)
    # A sharded run keeps weight averages as buffers (and may keep buffer averages in its state).
    averages = {**((found[0].get("tensors") or {}) if found else {}), **buffers}
    for name, average in averages.items():
        if any(p in name for p in _QUANTIZER_PARTS):
            continue  # averaged quantizer scales belong to the fake-quant layers, not the plain module
        if name not in out:
            raise ValueError(f"the {averaged} state averages {name!r}, which the model state does not hold.")
        copy = average.to(out[name].dtype).clone()
        for alias in aliases[_identity(state[name])]:
            out[alias] = copy
