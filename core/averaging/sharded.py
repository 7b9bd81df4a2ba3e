"""Averages of FSDP2 shards: module buffers beside their parameters, and resharding.

Under FSDP2 (``fully_shard``) each parameter is a DTensor holding this rank's rows; its
average is a DTensor of the same layout (1/world size of the bytes per rank, no collective
per update). torch.distributed.checkpoint saves the model's state shard by shard, but a
Lightning callback's state only from rank 0, so a sharded average must live in the model:
it is registered as a persistent buffer ``<leaf><suffix>`` on the parameter's owning module
(``net.0.weight`` -> ``net.0.weight_ema``) for as long as the fit runs.

FSDP2 keeps a root module's all-gathered parameters after a forward that no backward
follows (validation, a BatchNorm pass). Whoever writes into the shards then must reshard
first, or the next forward would reuse the stale gathered copy: see :func:`reshard_`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from ..distributed import is_sharded

try:  # public from torch 2.6 on
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover - older torch: no FSDP2 modules to reshard
    FSDPModule = ()  # type: ignore[assignment,misc]

__all__ = ["AVERAGE_SUFFIXES", "attach_buffers_", "detach_buffers_", "is_average_buffer", "read_buffers", "reshard_", "shard_view"]

# Suffixes of the buffers the averaging callbacks attach (Soup: its average and its kept
# snapshots, stacked); averaging never averages them.
AVERAGE_SUFFIXES = ("_ema", "_swa", "_soup", "_soup_kept")


def is_average_buffer(owner: nn.Module, leaf: str) -> bool:
    """Whether buffer ``leaf`` of ``owner`` is an average attached beside one of its parameters."""
    return any(leaf.endswith(s) and leaf[: -len(s)] in owner._parameters for s in AVERAGE_SUFFIXES)


def reshard_(module: nn.Module) -> None:
    """Free every all-gathered FSDP2 parameter of ``module`` and register the shards again.

    No communication; a no-op for modules that are not sharded. Call it before reading or
    writing parameters by name between forwards (FSDP2's root keeps its gathered parameters
    after a forward without backward, and would not see writes into the shards).
    """
    if FSDPModule == ():
        return
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _split(name: str) -> tuple[str, str]:
    owner, _, leaf = name.rpartition(".")
    return owner, leaf


def attach_buffers_(module: nn.Module, tensors: Mapping[str, Tensor], suffix: str) -> list[str]:
    """Register every sharded tensor of ``tensors`` (keyed by parameter name) as a persistent
    buffer ``<leaf><suffix>`` of the parameter's owner; returns the buffer names.

    Raises:
        ValueError: if such a buffer exists already (two averaging callbacks of one kind).
    """
    if suffix not in AVERAGE_SUFFIXES:
        raise ValueError(f"suffix={suffix!r} is not one of {AVERAGE_SUFFIXES}: averaging would average its own buffers.")
    added = []
    for name, tensor in tensors.items():
        if not is_sharded(tensor):
            continue
        owner_name, leaf = _split(name)
        owner = module.get_submodule(owner_name)
        if f"{leaf}{suffix}" in owner._buffers:
            detach_buffers_(module, added)
            raise ValueError(
                f"the model already has a buffer '{name}{suffix}': under FSDP2 each averaging callback keeps its "
                f"averages as '<parameter>{suffix}' buffers, so attach one callback of this kind per model."
            )
        owner.register_buffer(f"{leaf}{suffix}", tensor, persistent=True)
        added.append(f"{name}{suffix}")
    return added


def read_buffers(module: nn.Module, dtypes: Mapping[str, torch.dtype], suffix: str) -> dict[str, Tensor]:
    """The attached buffers of the parameters named in ``dtypes``, as they are now (a checkpoint
    load may have replaced the tensor objects), keyed by parameter name. A buffer whose dtype
    is not the one given (a precision plugin's ``module.to(dtype)`` cast it) is cast back and
    registered again."""
    out = {}
    for name, dtype in dtypes.items():
        owner_name, leaf = _split(name)
        owner = module.get_submodule(owner_name)
        tensor = owner._buffers[f"{leaf}{suffix}"]
        if tensor.dtype != dtype:
            tensor = tensor.to(dtype)
            owner.register_buffer(f"{leaf}{suffix}", tensor, persistent=True)
        out[name] = tensor
    return out


def detach_buffers_(module: nn.Module, buffer_names: Iterable[str]) -> None:
    """Unregister buffers attached by :func:`attach_buffers_` (missing ones are skipped)."""
    for name in buffer_names:
        owner_name, leaf = _split(name)
        try:
            owner = module.get_submodule(owner_name)
        except AttributeError:
            continue
        owner._buffers.pop(leaf, None)
        owner._non_persistent_buffers_set.discard(leaf)


@torch.no_grad()
def shard_view(tensor: Tensor) -> Tensor:
    """This rank's part of ``tensor`` as a plain tensor without autograd history, sharing its
    storage (in-place ops on it write the parameter or average)."""
    # ``.data`` of a whole tensor, as before sharding existed: no shared version counter.
    return tensor.detach().to_local() if is_sharded(tensor) else tensor.data
