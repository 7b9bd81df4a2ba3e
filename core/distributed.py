"""Shard-local tensor helpers: one code path for whole tensors and FSDP2's DTensor shards.

Under FSDP2 (``fully_shard``, Lightning's ``ModelParallelStrategy``) every parameter is a
DTensor sharded along dim 0 over a 1-D data-parallel mesh; rank r holds rows
``[r * ceil(n / w), ...)`` and the last ranks may hold fewer rows (or none). Everything
lichtenberg keeps per weight (masks, averages) is a DTensor of the same layout, so
elementwise work runs on the local shards with no communication, and
torch.distributed.checkpoint saves and shards it with the model. On whole tensors every
helper here is the identity or a no-op, so callers never branch on the strategy.

Example:
    >>> w = local(param)                        # the rank's rows (the tensor itself if not sharded)
    >>> mask = like(param, torch.ones_like(w, dtype=torch.bool))   # a DTensor laid out like param
    >>> counts = all_reduce_(local_counts, group_of(param))        # summed over the shards
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard

__all__ = ["all_reduce_", "check_layout", "full", "group_of", "is_sharded", "like", "local", "row_offset"]


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (a shard of a bigger tensor)."""
    return isinstance(tensor, DTensor)


def local(tensor: Tensor) -> Tensor:
    """This rank's part of ``tensor`` (a view sharing its storage); ``tensor`` itself if whole."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full(tensor: Tensor) -> Tensor:
    """The whole tensor (an all-gather for a DTensor: for exports and tests, not per step)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def like(reference: Tensor, local_tensor: Tensor) -> Tensor:
    """``local_tensor`` (this rank's rows) as a tensor laid out like ``reference``: a DTensor with
    its mesh, placements and global shape when ``reference`` is sharded, else itself."""
    if not isinstance(reference, DTensor):
        return local_tensor
    shape = reference.shape if local_tensor.dim() == reference.dim() else None
    return DTensor.from_local(local_tensor, reference.device_mesh, reference.placements, run_check=False,
                              shape=shape, stride=None if shape is None else _contiguous_stride(shape))


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= size
    return tuple(reversed(stride))


def group_of(tensor: Tensor) -> dist.ProcessGroup | None:
    """The process group a reduction over ``tensor``'s shards runs on (None: not sharded)."""
    return tensor.device_mesh.get_group(0) if isinstance(tensor, DTensor) else None


def row_offset(tensor: Tensor) -> int:
    """Index of this rank's first row (dim 0) in the whole tensor; 0 if not sharded."""
    if not isinstance(tensor, DTensor):
        return 0
    world, rank = tensor.device_mesh.size(0), tensor.device_mesh.get_local_rank(0)
    chunk = math.ceil(tensor.shape[0] / world)  # torch.chunk's rule, which FSDP2 follows
    return min(rank * chunk, tensor.shape[0])


def all_reduce_(tensor: Tensor, group: dist.ProcessGroup | None, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    """Reduce ``tensor`` in place over ``group`` (a no-op for None) and return it."""
    if group is not None:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def check_layout(name: str, tensor: Tensor) -> None:
    """ValueError unless ``tensor`` is whole, FSDP2's layout (Shard(0) over a 1-D mesh) or
    replicated over a 1-D mesh (QAT's learned scales): tensor-parallel placements split rows
    differently and are not supported. (A column-wise tensor-parallel weight on a 1-D mesh is
    also Shard(0): it cannot be told apart here; docs/distributed.md says tensor_parallel_size=1.)"""
    if isinstance(tensor, DTensor) and (tensor.device_mesh.ndim != 1
                                        or tuple(tensor.placements) not in ((Shard(0),), (Replicate(),))):
        raise ValueError(
            f"{name} is laid out as {tuple(tensor.placements)} over a {tensor.device_mesh.ndim}-D mesh; lichtenberg "
            "supports FSDP2's Shard(0) over the data-parallel mesh only (ModelParallelStrategy with tensor_parallel_size=1)."
        )
