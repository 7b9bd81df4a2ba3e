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
    >>> mask = scatter_like(param, whole_mask)                     # this rank's rows, no communication
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

__all__ = ["all_reduce_", "check_layout", "full", "group_of", "is_sharded", "like", "local", "scatter_like",
           "shard_dim", "shard_span", "shard_layers_"]


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


def shard_span(tensor: Tensor) -> tuple[int, int]:
    """(start, length) of this rank's block along the shard dim of ``tensor`` (torch.chunk's
    rule, which FSDP2 follows: rank r starts at r * ceil(n / w); the last may hold fewer or
    none); (0, size of dim 0) for a whole tensor."""
    if not isinstance(tensor, DTensor):
        return 0, tensor.shape[0]
    dim, world, rank = shard_dim(tensor), tensor.device_mesh.size(0), tensor.device_mesh.get_local_rank(0)
    n = tensor.shape[dim]
    start = min(rank * math.ceil(n / world), n)
    return start, min(start + math.ceil(n / world), n) - start


def shard_dim(tensor: Tensor) -> int:
    """The dim ``tensor`` is sharded along (0 for a whole or replicated tensor)."""
    placement = tensor.placements[0] if isinstance(tensor, DTensor) else None
    return placement.dim if isinstance(placement, Shard) else 0


def scatter_like(reference: Tensor, whole: Tensor) -> Tensor:
    """This rank's block of ``whole`` (shaped like ``reference``, the same on every rank), laid out
    like ``reference``: a DTensor slice with no communication, or ``whole`` on its device."""
    if not isinstance(reference, DTensor) or tuple(reference.placements) != (Shard(shard_dim(reference)),):
        return like(reference, whole.to(local(reference).device))
    start, length = shard_span(reference)
    return like(reference, whole.narrow(shard_dim(reference), start, length).contiguous().to(local(reference).device))


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


def shard_layers_(module: nn.Module, mesh: DeviceMesh) -> None:
    """FSDP2 for a module as a whole: ``fully_shard`` every submodule that holds parameters of
    its own, then ``module`` (which takes the rest). A weight tied between submodules (an
    embedding shared with the output head) is left to ``module``: FSDP2 shards a tensor once."""
    from torch.distributed.fsdp import fully_shard

    owners: dict[int, int] = {}
    for sub in module.modules():
        for p in sub.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    for sub in list(module.modules()):
        own = list(sub.parameters(recurse=False))
        if sub is not module and own and all(owners[id(p)] == 1 for p in own):
            fully_shard(sub, mesh=mesh)
    fully_shard(module, mesh=mesh)
