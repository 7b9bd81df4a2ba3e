"""Which strategies the weight-touching callbacks run under.

Single device, DDP (every flavour) and FSDP2 (Lightning's ``ModelParallelStrategy``, with
``fully_shard`` applied in the module's ``configure_model``) are supported; see
docs/distributed.md. FSDP1 (``FSDPStrategy``) hides parameters in flat buffers and DeepSpeed
in its own partitions, so a callback would see neither the weights nor their layout.
"""

from __future__ import annotations

import lightning.pytorch as pl

__all__: list[str] = []

_SUPPORTED = "a single device, DDP (strategy='ddp') or FSDP2 (ModelParallelStrategy, fully_shard in configure_model)"


def check_strategy(callback: object, trainer: pl.Trainer) -> None:
    """ValueError for a strategy the callback cannot see weights through, naming what works."""
    strategy = type(trainer.strategy).__name__
    if strategy == "FSDPStrategy":
        raise ValueError(
            f"{type(callback).__name__} does not support FSDPStrategy (FSDP1: parameters live in flat buffers); "
            "use ModelParallelStrategy (FSDP2) and call fully_shard in configure_model, see docs/distributed.md."
        )
    if strategy in ("DeepSpeedStrategy", "XLAFSDPStrategy", "XLAStrategy"):
        raise ValueError(f"{type(callback).__name__} does not support {strategy}; supported: {_SUPPORTED}.")


def data_parallel(trainer: pl.Trainer) -> tuple[int, int]:
    """(replicas, rank) of data parallelism: the world under DDP; the data-parallel dimension of
    the device mesh under ModelParallelStrategy, whose tensor-parallel ranks share each batch."""
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
    return int(kwargs.get("num_replicas", trainer.world_size)), int(kwargs.get("rank", trainer.global_rank))


def is_fsdp2(trainer: pl.Trainer) -> bool:
    """Whether the run shards parameters as FSDP2 DTensors (ModelParallelStrategy)."""
    return type(trainer.strategy).__name__ == "ModelParallelStrategy"

