"""Compact safetensors files of sparse and quantized weights, and back to the plain state dict.

``compress_state_dict(state, quantized)`` turns a plain state dict (``plain_state_dict``) and,
for a QAT model, its integer export (``export_int``) into safetensors tensors plus string
metadata; ``decompress_state_dict(path)`` reads the file back with nothing else. Layout
(format version 1; docs/export.md has the details and the differences from compressed-tensors,
whose names it follows), per key ``k`` of the state dict:

- ``dense``: ``k`` as is (biases, norms, buffers, weights that would not shrink).
- ``bitmask`` (a floating tensor of >= 2 dims, where smaller): ``k.bitmask`` (uint8, element i
  is bit i % 8 of byte i // 8 of the row-major tensor; ``[rows, cols / 8]`` when cols % 8 == 0,
  else flat; no ``k.row_offsets``), ``k.compressed`` (non-zero values, own dtype), ``k.shape``.
  Zeros are ``v == 0``: a -0.0 comes back as +0.0.
- ``packed`` (a quantized weight): ``k_packed`` (uint8 stream of ``bits``-bit codes
  ``(q - offset) / stride``, lowest bits first, the layer's own layout flat), ``k_scale``
  (``[rows, groups]``), ``k_shape``, and ``k_zero_point`` if the export has one.
- ``packed_bitmask`` (a quantized weight that is also sparse, where smaller, and always for
  pruned binary / OFQ "stat" weights, whose grids have no zero): ``k_bitmask`` marks the
  non-zero integers, ``k_packed`` holds only their codes.
- ``alias``: a tied weight is stored once, under its first key; the others come back as the
  same tensor object.

Metadata: ``format`` = "pt", ``lichtenberg.format_version`` and ``lichtenberg.layout`` (JSON:
key -> format, dtype, and for packed weights bits, offset, stride, method, granularity,
group_size, out_axis).

Example:
    >>> save_compressed("model.safetensors", plain_state_dict(ckpt), quantized=export_int(model))
    >>> MyModule().load_state_dict(decompress_state_dict("model.safetensors"), strict=True)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from .checkpoints import _BESIDE, _QUANTIZER_PARTS, _identity, plain_state_dict

__all__ = ["FORMAT_VERSION", "compress_state_dict", "decompress_state_dict", "save_compressed"]

FORMAT_VERSION = 1
_VERSION_KEY, _LAYOUT_KEY = "lichtenberg.format_version", "lichtenberg.layout"
_ENTRY_KEYS = ("weight", "scale", "bits", "granularity", "group_size")


def _pack(codes: Tensor, bits: int) -> Tensor:
    """Unsigned codes (< 2**bits) into a flat uint8 stream; code i fills bits [i*bits, (i+1)*bits)."""
    codes = codes.reshape(-1)
    if 8 % bits == 0:  # whole codes per byte
        per = 8 // bits
        codes = torch.cat([codes.to(torch.uint8), codes.new_zeros(-codes.numel() % per, dtype=torch.uint8)])
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        return (codes.view(-1, per) << shifts).sum(-1, dtype=torch.int32).to(torch.uint8)  # [bytes]
    stream = ((codes.to(torch.int32)[:, None] >> torch.arange(bits)) & 1).reshape(-1)  # [n * bits] bits
    stream = torch.cat([stream, stream.new_zeros(-stream.numel() % 8)])
    return (stream.view(-1, 8) << torch.arange(8)).sum(-1).to(torch.uint8)  # [bytes]


def _unpack(data: Tensor, bits: int, n: int) -> Tensor:
    """The first ``n`` codes of ``_pack``'s stream, as int32."""
    data = data.reshape(-1)
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        return ((data[:, None] >> shifts) & (2**bits - 1)).reshape(-1)[:n].to(torch.int32)  # [n]
    stream = ((data.to(torch.int32)[:, None] >> torch.arange(8)) & 1).reshape(-1)[: n * bits]
    return (stream.view(n, bits) << torch.arange(bits)).sum(-1).to(torch.int32)  # [n]


def _grid(entry: Mapping[str, Any]) -> tuple[int, int, int]:
    """(bits, offset, stride) such that an exported integer is ``offset + stride * code``."""
    bits, method = entry["bits"], entry.get("method")
    if bits == "binary" or method == "binary":
        return 1, -1, 2  # {-1, +1}
    if bits == "ternary" or method == "ternary":
        return 2, -1, 1  # {-1, 0, +1}
    bits = int(bits)
    if method == "stat":  # OFQ's zero-free grid, exported as the odd integers 2k + 1
        return bits, 1 - 2**bits, 2
    return bits, -(2 ** (bits - 1)), 1


def _beside(key: str, state: Mapping[str, Tensor]) -> bool:
    """A mask / average / rewind buffer kept beside a weight (``plain_state_dict`` drops them)."""
    return any(key.endswith(suffix) and key[: -len(suffix)] in state for suffix in _BESIDE)


def _dtype_name(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _canonical(state: Mapping[str, Tensor], ties: Iterable[Iterable[str]]) -> dict[str, str]:
    """Each key -> the first key of its tensor: by shared storage, then by the ``ties`` groups."""
    order = {k: i for i, k in enumerate(state)}
    first: dict[tuple, str] = {}
    head = {}
    for key, value in state.items():
        if value.numel() == 0:  # empty tensors may share a null storage without being tied
            head[key] = key
            continue
        head[key] = first.setdefault((*_identity(value), value.dtype), key)
    for group in ties:
        group = list(group)
        missing = [k for k in group if k not in state]
        if missing:
            raise ValueError(f"ties: {missing} are not keys of the state dict; name tied tensors by their keys.")
        heads = {head[k] for k in group}
        target = min(heads, key=order.__getitem__)
        for key in group:
            if not (state[key].shape == state[target].shape and state[key].dtype == state[target].dtype
                    and torch.equal(state[key], state[target])):
                raise ValueError(f"ties: {key!r} differs from {target!r}: not one tensor; drop it from ties.")
        for key, h in head.items():
            if h in heads:
                head[key] = target
    return head


def _sparse(key: str, value: Tensor) -> tuple[dict, dict[str, Tensor]] | None:
    """Bitmask + values, or None where that is not smaller than the dense tensor."""
    flat = value.detach().reshape(-1)  # [n]
    keep = flat != 0
    nnz, n = int(keep.sum()), flat.numel()
    if (n + 7) // 8 + nnz * flat.element_size() + 8 * value.dim() >= n * flat.element_size():
        return None
    bitmask = _pack(keep, 1)
    if value.dim() >= 2 and value.shape[-1] % 8 == 0:  # compressed-tensors' per-row shape, same bytes
        bitmask = bitmask.view(-1, value.shape[-1] // 8)
    parts = {f"{key}.bitmask": bitmask, f"{key}.compressed": flat[keep], f"{key}.shape": torch.tensor(value.shape)}
    return {"format": "bitmask", "dtype": _dtype_name(value)}, parts


def _quantized(key: str, value: Tensor, entry: Mapping[str, Any]) -> tuple[dict, dict[str, Tensor]]:
    """Packed integer codes (+ a bitmask where the weight is sparse and that is smaller)."""
    lacking = [k for k in _ENTRY_KEYS if k not in entry]
    if lacking:
        raise ValueError(f"quantized entry of {key!r} lacks {lacking}; pass the entries export_int(model) returns.")
    q = entry["weight"].detach().cpu()
    if q.is_floating_point() or tuple(q.shape) != tuple(value.shape):
        raise ValueError(f"quantized entry of {key!r}: integer weight {q.dtype} {tuple(q.shape)} does not stand for "
                         f"the state's {tuple(value.shape)} tensor; pass export_int's entries of this model.")
    bits, offset, stride = _grid(entry)
    flat = q.reshape(-1).to(torch.int32)  # [n]
    codes = flat - offset
    on_grid = (codes % stride == 0) & (codes >= 0) & (codes < stride * 2**bits)
    nonzero = flat != 0
    if not bool(on_grid[nonzero].all()):
        bad = flat[nonzero & ~on_grid].unique()[:4].tolist()
        raise ValueError(f"{key}: integers {bad} are off the {entry['bits']}-bit {entry.get('method')} grid; "
                         "pass export_int's entries unchanged.")
    n, nnz = flat.numel(), int(nonzero.sum())
    masked = not bool(on_grid.all()) or (n + 7) // 8 + (nnz * bits + 7) // 8 < (n * bits + 7) // 8
    scale = entry["scale"].detach().cpu()
    parts = {f"{key}_shape": torch.tensor(q.shape), f"{key}_scale": scale.reshape(scale.shape[0], -1).clone()}
    if masked:
        parts[f"{key}_bitmask"] = _pack(nonzero, 1)
        codes = codes[nonzero]
    parts[f"{key}_packed"] = _pack(codes // stride, bits)
    if entry.get("zero_point") is not None:
        parts[f"{key}_zero_point"] = entry["zero_point"].detach().cpu().clone()
    record = {"format": "packed_bitmask" if masked else "packed", "dtype": _dtype_name(value), "bits": bits,
              "offset": offset, "stride": stride, "method": entry.get("method"), "granularity": entry["granularity"],
              "group_size": entry["group_size"], "out_axis": entry.get("out_axis", 0)}
    return record, parts


def _same_entry(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return torch.equal(a["weight"], b["weight"]) and torch.equal(a["scale"], b["scale"]) and _grid(a) == _grid(b)


@torch.no_grad()
def compress_state_dict(state: Mapping[str, Tensor], quantized: Mapping[str, Mapping[str, Any]] | None = None, *,
                        sparse: bool | Collection[str] = True,
                        ties: Iterable[Iterable[str]] = ()) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The safetensors tensors and string metadata of a compact file (see the module docstring).

    Args:
        state: the plain module's state dict (``plain_state_dict``): whole tensors, masks applied. A
            sparse or QAT model's own state dict is made plain here (its ties kept).
        quantized: ``export_int(model)`` of the QAT model (module name -> entry); each entry's
            integers and scales replace ``<module>.weight`` of ``state``.
        sparse: which floating tensors may be stored as bitmask + values where that is smaller:
            True (every one of >= 2 dims), False (none), or a collection of keys.
        ties: groups of keys that are one tensor although ``state`` holds copies (``plain_state_dict``
            clones each key); keys sharing storage are tied without being listed.

    Example:
        >>> tensors, metadata = compress_state_dict(plain_state_dict(ckpt), export_int(model))
        >>> safetensors.torch.save_file(tensors, "model.safetensors", metadata)
    """
    bad = [k for k, v in state.items() if not isinstance(v, Tensor) or getattr(v, "placements", None) is not None]
    if bad:
        raise ValueError(f"{bad[:3]} are not whole tensors; safetensors stores tensors only: gather sharded ones "
                         "(load_checkpoint does) and drop other values first.")
    if any(any(p in k for p in _QUANTIZER_PARTS) or _beside(k, state) for k in state):  # a lichtenberg model's own
        shared = _canonical(state, ())  # plain_state_dict clones each key: keep the ties it would lose
        state = plain_state_dict(state)
        groups = [[k for k, h in shared.items() if h == head and k in state] for head in set(shared.values())]
        ties = [*ties, *(g for g in groups if len(g) > 1)]
    head = _canonical(state, ties)
    entries: dict[str, Mapping[str, Any]] = {}
    for module, entry in (quantized or {}).items():
        key = f"{module}.weight" if module else "weight"
        if key not in state:
            raise ValueError(f"quantized layer {module!r}: {key!r} is not in the state dict; export both from one model.")
        if head[key] in entries and not _same_entry(entries[head[key]], entry):
            raise ValueError(f"{key!r} is tied to {head[key]!r} but their quantized entries differ; export tied layers "
                             "with one shared quantizer.")
        entries[head[key]] = entry
    tensors: dict[str, Tensor] = {}
    layout: dict[str, dict] = {}
    storages: set[int] = set()
    for key, value in state.items():
        if head[key] != key:
            layout[key] = {"format": "alias", "of": head[key], "dtype": _dtype_name(value)}
            continue
        value = value.detach().cpu()
        found = None
        if key in entries:
            found = _quantized(key, value, entries[key])
        elif value.is_floating_point() and (sparse and value.dim() >= 2 if isinstance(sparse, bool) else key in sparse):
            found = _sparse(key, value)
        record, parts = found or ({"format": "dense", "dtype": _dtype_name(value)}, {key: value.contiguous()})
        for name, part in parts.items():
            if name in tensors:
                raise ValueError(f"{key!r} would be stored as {name!r}, which another key already takes; rename one.")
            ptr = part.untyped_storage().data_ptr()
            tensors[name] = part.clone() if ptr in storages and part.numel() else part  # safetensors: no shared memory
            storages.add(ptr)
        layout[key] = record
    layout_json = json.dumps(layout, separators=(",", ":"))  # compact: the header is part of a small file's size
    metadata = {"format": "pt", _VERSION_KEY: str(FORMAT_VERSION), _LAYOUT_KEY: layout_json}
    return tensors, metadata


def save_compressed(path: str | os.PathLike, state: Mapping[str, Tensor],
                    quantized: Mapping[str, Mapping[str, Any]] | None = None, **options: Any) -> int:
    """Write ``compress_state_dict(state, quantized, **options)`` to ``path``; returns the file's bytes.

    Example:
        >>> save_compressed("model.safetensors", plain_state_dict("last.ckpt"))
    """
    from safetensors.torch import save_file

    tensors, metadata = compress_state_dict(state, quantized, **options)
    save_file(tensors, os.fspath(path), metadata)
    return os.path.getsize(path)


def _dequantize(q: Tensor, scale: Tensor, zero_point: Tensor | None, record: Mapping[str, Any]) -> Tensor:
    """``export``'s ``dequantize`` (same ops, so bit-identical), with an optional zero point."""
    rows = q.movedim(record["out_axis"], 0).float()  # [out, in, ...]
    if record["granularity"] == "tensor":
        g = rows.reshape(1, 1, -1)
    elif record["granularity"] == "channel":
        g = rows.reshape(rows.shape[0], -1).unsqueeze(1)
    else:
        g = rows.reshape(rows.shape[0], -1, record["group_size"])  # [rows, groups, group_size]
    if zero_point is not None:
        g = g - zero_point.reshape(scale.shape)
    return (g * scale).reshape(rows.shape).movedim(0, record["out_axis"])


def decompress_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The plain module's state dict from a file ``save_compressed`` wrote (tied keys: one tensor).

    Args:
        path: the ``.safetensors`` file.

    Example:
        >>> model.load_state_dict(decompress_state_dict("model.safetensors"), strict=True)
    """
    from safetensors import safe_open

    with safe_open(os.fspath(path), "pt") as f:
        metadata = f.metadata() or {}
        if _LAYOUT_KEY not in metadata:
            raise ValueError(f"{path}: no {_LAYOUT_KEY!r} metadata, so not a lichtenberg compressed file; read a plain "
                             "safetensors file with safetensors.torch.load_file.")
        if int(metadata.get(_VERSION_KEY, 0)) > FORMAT_VERSION:
            raise ValueError(f"{path}: format version {metadata[_VERSION_KEY]} is newer than this lichtenberg's "
                             f"({FORMAT_VERSION}); upgrade lichtenberg to read it.")
        t = {name: f.get_tensor(name) for name in f.keys()}
    out: dict[str, Tensor] = {}
    for key, record in json.loads(metadata[_LAYOUT_KEY]).items():
        fmt = record["format"]
        if fmt == "alias":
            out[key] = out[record["of"]]
        elif fmt == "dense":
            out[key] = t[key]
        elif fmt == "bitmask":
            shape = t[f"{key}.shape"].tolist()
            keep = _unpack(t[f"{key}.bitmask"], 1, math.prod(shape)).bool()
            values = t[f"{key}.compressed"]
            out[key] = values.new_zeros(keep.shape).masked_scatter_(keep, values).view(shape)
        elif fmt in ("packed", "packed_bitmask"):
            shape, name = t[f"{key}_shape"].tolist(), f"{key}_packed"
            n, bits, offset, stride = math.prod(shape), record["bits"], record["offset"], record["stride"]
            if fmt == "packed":
                q = _unpack(t[name], bits, n) * stride + offset
            else:
                keep = _unpack(t[f"{key}_bitmask"], 1, n).bool()
                kept = _unpack(t[name], bits, int(keep.sum())) * stride + offset  # [nnz]
                q = torch.zeros(n, dtype=torch.int32).masked_scatter_(keep, kept)
            scale = t[f"{key}_scale"].unsqueeze(-1)  # [rows, groups, 1]
            weight = _dequantize(q.view(shape), scale, t.get(f"{key}_zero_point"), record)
            out[key] = weight.to(getattr(torch, record["dtype"]))
        else:
            raise ValueError(f"{path}: {key!r} has format {fmt!r}, unknown to this lichtenberg; upgrade lichtenberg.")
    return out
