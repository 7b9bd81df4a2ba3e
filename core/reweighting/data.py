"""Data plumbing for data pruning: an index-carrying dataset and a plan-driven sampler.

``PlanSampler`` is a ``DistributedSampler`` subclass, so Lightning does not wrap it in its
padding ``DistributedSamplerWrapper``. Each epoch it asks ``plan(epoch)`` for the ordered ids
to train on, trims them to a multiple of the number of replicas, and gives rank r every
r-th id: the shares are disjoint, equally long (DDP ranks stay in step) and nothing is
padded back. ``skip`` drops the first ids of the rank's share (a mid-epoch resume).

``sampler_order`` reads one epoch of a user's sampler as ids, so a plan can keep the user's
order (and its repeats) instead of replacing the sampler.

Example:
    >>> sampler = PlanSampler(dataset, plan=lambda epoch: kept_ids, num_replicas=2, rank=0)
    >>> loader = DataLoader(dataset, batch_size=32, sampler=sampler)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler, Sampler

__all__ = ["IndexedDataset", "PlanSampler", "sampler_order"]


def sampler_order(sampler: Sampler, epoch: int, n: int) -> Tensor:
    """The ids ``sampler`` yields in ``epoch`` (``set_epoch(epoch)`` first, when it has one), in order.

    Raises:
        ValueError: the sampler yields something other than ids in [0, n).
    """
    if callable(getattr(sampler, "set_epoch", None)):
        sampler.set_epoch(epoch)
    name = type(sampler).__name__
    try:
        order = torch.tensor([int(i) for i in sampler], dtype=torch.long)
    except (TypeError, ValueError) as err:
        raise ValueError(f"the training sampler ({name}) must yield integer dataset ids; {err}.") from None
    if order.numel() and (int(order.min()) < 0 or int(order.max()) >= n):
        raise ValueError(f"the training sampler ({name}) yields ids outside the dataset's [0, {n}): build it over the "
                         "training dataset itself.")
    return order


class IndexedDataset(Dataset):
    """Wraps a map-style dataset: item i becomes ``(i, dataset[i])``."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]


class PlanSampler(DistributedSampler):
    """Samples this rank's share of ``plan(epoch())`` (see the module docstring).

    Args:
        dataset: the map-style dataset (its length bounds the ids).
        plan: epoch -> 1-D tensor of item ids in the order to visit them.
        epoch: callable giving the current epoch (the Trainer's, not ``set_epoch``'s).
        num_replicas: world size.
        rank: this process's rank.
        skip: callable giving how many ids of this rank's share to skip (mid-epoch resume).
    """

    def __init__(self, dataset: Any, plan: Callable[[int], Tensor], epoch: Callable[[], int], num_replicas: int = 1,
                 rank: int = 0, skip: Callable[[], int] = lambda: 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=True)
        self.plan, self.current_epoch, self.skip = plan, epoch, skip

    def share(self) -> list[int]:
        ids = self.plan(self.current_epoch())
        usable = len(ids) // self.num_replicas * self.num_replicas
        return ids[self.rank:usable:self.num_replicas].tolist()

    def __iter__(self):  # a generator: the plan is read when iteration starts, not when iter() is called
        yield from self.share()[self.skip():]

    def __len__(self) -> int:
        return len(self.share())
