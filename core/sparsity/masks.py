"""Mask selection: keep the k highest scores, or the N highest of every M consecutive inputs.

Selection is O(N) with ``kthvalue`` (never a full sort), deterministic and free of host
syncs: among scores equal to the threshold, the lowest flat indices are kept. Every rank computing a mask from
the same scores therefore gets the same mask. A NaN score ranks below every number (an
overflowing gradient never wins a slot, and exactly ``k`` entries are always kept).

FSDP2 DTensor shards are accepted and give the same mask, laid out like the scores
(``lichtenberg.core.sparsity.sharded``: threshold bisection, nothing gathered).

Example:
    >>> mask = topk_mask(weight.abs(), k=weight.numel() // 10)   # 90% sparse
    >>> mask24 = nm_mask(weight.abs(), n=2, m=4)                    # 2:4 along the input dim
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..distributed import is_sharded, like, local
from ..layers import LayerKind, as_rows
from . import sharded

__all__ = ["check_nm", "check_sharded_nm", "nm_mask", "parse_pattern", "topk_mask"]


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """Bool mask of ``scores``' shape keeping exactly ``k`` entries: the largest, ties by lowest index.

    A DTensor gives a DTensor mask laid out alike: 5 small all-reduces, nothing gathered."""
    n = scores.numel()
    if not 0 <= k <= n:
        raise ValueError(f"cannot keep k={k} of {n} entries.")
    if is_sharded(scores):
        (keep,), _ = sharded.select([scores], [k])
        return like(scores, keep)
    flat = scores.reshape(-1)
    if k == 0:
        return torch.zeros_like(flat, dtype=torch.bool).view_as(scores)
    if k == n:
        return torch.ones_like(flat, dtype=torch.bool).view_as(scores)
    flat = _nan_lowest(flat)
    # The (n - k + 1)-th smallest value is the k-th largest: the keep threshold.
    threshold = flat.kthvalue(n - k + 1).values
    keep = flat > threshold
    # Of the entries equal to the threshold, the first `missing` by flat index: counted on the
    # device (a cumulative sum, int32 unless that could overflow), not by listing them, which
    # would wait for the device twice.
    ties = flat == threshold
    missing = k - keep.sum()
    keep |= ties & (ties.cumsum(0, dtype=torch.int32 if n < 2**31 else torch.int64) <= missing)
    return keep.view_as(scores)


def _nan_lowest(scores: Tensor) -> Tensor:
    """Scores as float with NaN as -inf: comparisons with NaN are all False, so a NaN left in
    would make a threshold keep fewer than k entries."""
    scores = scores.float()
    return torch.where(scores.isnan(), float("-inf"), scores)


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"2:4"`` -> (2, 4). Raises ValueError otherwise."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(x) for x in pattern.split(":"))
    except ValueError:
        raise ValueError(f"pattern={pattern!r} must be 'unstructured' or 'N:M' such as '2:4'.") from None
    if not 0 < n <= m:
        raise ValueError(f"pattern={pattern!r}: N:M needs 0 < N <= M (N kept of every M); e.g. '2:4'.")
    return n, m


def check_nm(name: str, shape: torch.Size, m: int) -> None:
    """N:M groups run along the input dimension(s) of a ``[out, in, ...]`` shape (see
    ``lichtenberg.core.layers.as_rows``): their size must be a multiple of M."""
    fan_in = int(torch.Size(shape[1:]).numel()) if len(shape) > 1 else int(shape[0])
    if fan_in % m:
        raise ValueError(
            f"{name} has {fan_in} inputs per output, not divisible by M={m}: exclude it from the "
            "targets or use an unstructured pattern."
        )


def check_sharded_nm(name: str, param: Tensor, kind: LayerKind | None, m: int) -> None:
    """:func:`check_nm`, and for an FSDP2 shard of a layer whose inputs are split over ranks
    (Hugging Face ``Conv1D``, ``[in, out]``) that every shard boundary falls on a group of M.

    Call it at setup with the parameter in its own layout. Raises ValueError naming the fix.
    """
    rows = param if kind is None else as_rows(param, kind)
    check_nm(name, rows.shape, m)
    if not is_sharded(rows):
        return
    _, _, world, dim = sharded.mesh_of(rows)
    if not sharded.nm_local_ok(rows.shape, dim, world, m):
        chunk = math.ceil(rows.shape[dim] / world)
        raise ValueError(
            f"{name} ({'?' if kind is None else kind.name}, weight {tuple(param.shape)}) is sharded by FSDP2 over "
            f"{world} ranks into blocks of {chunk} input rows, not a multiple of M={m}, so N:M groups would straddle "
            f"ranks: give it a number of inputs whose ceil(in / {world}) is a multiple of {m}, exclude it from the "
            "targets, or use an unstructured pattern."
        )


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep the ``n`` largest of every ``m`` consecutive entries along the flattened input dims
    of ``[out, in, ...]`` scores (give other layouts as ``as_rows`` views).

    A DTensor is computed on the local shard (no communication): rows are local for Shard(0);
    for Shard(1) (a Conv1D rows view) the shard boundaries must fall on groups
    (:func:`check_sharded_nm`)."""
    if is_sharded(scores):
        _, _, world, dim = sharded.mesh_of(scores)
        if not sharded.nm_local_ok(scores.shape, dim, world, m):
            raise ValueError(f"N:M with M={m} on scores {tuple(scores.shape)} sharded along dim {dim}: groups straddle "
                             "ranks (see check_sharded_nm).")
        part = local(scores)
        keep = nm_mask(part, n, m) if part.numel() else torch.zeros_like(part, dtype=torch.bool)
        return like(scores, keep)
    rows = scores.reshape(scores.shape[0], -1) if scores.dim() > 1 else scores.reshape(1, -1)
    groups = rows.reshape(rows.shape[0], -1, m)  # [out, in/m, m]
    # A stable descending sort of a 4- or 8-wide group is cheap and breaks ties by position.
    order = _nan_lowest(groups).argsort(dim=-1, descending=True, stable=True)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return keep.reshape(scores.shape)
