"""Mask-aware gradient all-reduce for DistributedDataParallel: only kept weights' gradients travel.

Every rank holds the same masks (the ``<leaf>_mask`` bool buffers the mask engine registers
beside each weight), so the entries of a gradient bucket whose mask is True can be gathered
into a short buffer, all-reduced and written back, with zeros in the pruned slots. Each kept
entry gets exactly what DDP's dense all-reduce computes for it: every rank's gradient times
1 / world size, summed over the ranks (bit-identical with 2 ranks; with more, the collective
may add in another order, as it may for another bucket size). Parameters without a mask go
whole.

Costs. An index list per bucket (int64 positions of the kept entries, in memory order) is
built the first time the bucket is reduced after a mask changed (one host sync) and cached.
Each step then costs a gather, a zero fill and a scatter of the bucket, no host sync. A mask
change is noticed from the buffers' identity and version counters (every in-place change
bumps them; a change through ``.data`` would not be seen) at the first bucket of each
backward, and is then checked to be the same on every rank: one all-reduce of fingerprints
and one host sync per change, never per step.

Example:
    >>> ddp = DistributedDataParallel(model)
    >>> state = MaskedAllReduce(model, ddp.process_group)
    >>> ddp.register_comm_hook(state, masked_allreduce_hook)
    >>> state.dense = step_reads_dense_gradients   # e.g. a RigL update step: send everything
"""


import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["MaskedAllReduce", "mask_fingerprint", "masked_allreduce_hook"]

_ODD = 0x9E3779B97F4A7C15 - 2**64  # golden-ratio multiplier as a signed int64: spreads word positions


def mask_fingerprint(mask: Tensor) -> Tensor:
    """``[kept, hash]`` (int64, on the mask's device) of a bool mask: equal masks give equal
    fingerprints; a different mask almost surely not (each 8-entry word weighted by its position)."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    words = torch.cat([flat, flat.new_zeros(pad)]).view(torch.uint8).view(torch.int64)  # [n / 8]
    weights = torch.arange(1, words.numel() + 1, device=mask.device, dtype=torch.int64).mul_(_ODD)  # wraps
    return torch.stack([flat.sum(dtype=torch.int64), (words * weights).sum()])


def _bucket_strides(param: Tensor) -> tuple[int, ...]:
    """How DDP lays the gradient of ``param`` out in its bucket: with the parameter's own strides
    when it is dense and non-overlapping (channels_last stays channels_last), else contiguous."""
    expected = 1
    for d in sorted(range(param.dim()), key=param.stride):
        if param.size(d) != 1 and param.stride(d) != expected:
            return torch.empty(param.shape, device="meta").stride()
        expected *= param.size(d)
    return param.stride()


class MaskedAllReduce:
    """State of :func:`masked_allreduce_hook`: where each parameter's mask lives, the cached
    index lists, and byte counts.

    Args:
        model: the module DDP wraps; masks are its ``<leaf>_mask`` bool buffers shaped like ``<leaf>``.
        process_group: DDP's process group (default: the whole world).

    Attributes:
        dense: while True, buckets are all-reduced whole (set it for steps that read the
            averaged gradients of pruned weights, e.g. a RigL update).
        sent: bytes this rank put into all-reduces since the counts were last reset.
        dense_bytes: what dense DDP would have put into them.
        builds: index lists built so far (one per bucket after each mask change).
    """

    def __init__(self, model: nn.Module, process_group: dist.ProcessGroup | None = None) -> None:
        self.group = process_group
        self.scale = 1.0 / dist.get_world_size(process_group)
        self.dense = False
        self.sent = self.dense_bytes = self.builds = 0
        # per parameter (by identity): every (buffers dict, key, name) where its mask may live
        self._slots: dict[int, list[tuple[dict, str, str]]] = {}
        self._params: dict[int, Tensor] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            owner, _, leaf = name.rpartition(".")
            self._slots.setdefault(id(param), []).append((model.get_submodule(owner)._buffers, f"{leaf}_mask", name))
            self._params[id(param)] = param
        self._stamp: tuple | None = None
        self._plans: dict[int, tuple[tuple[int, ...], "Tensor | None"]] = {}

    def mask_of(self, param: Tensor) -> Tensor | None:
        """The mask of ``param`` (under any of its names), or None."""
        for buffers, key, _ in self._slots.get(id(param), ()):
            mask = buffers.get(key)
            if mask is not None and mask.dtype == torch.bool and mask.shape == param.shape:
                return mask
        return None

    def masks(self) -> dict[str, Tensor]:
        """Every parameter's mask, by the parameter's first name."""
        found = {}
        for pid, slots in self._slots.items():
            mask = self.mask_of(self._params[pid])
            if mask is not None:
                found[slots[0][2]] = mask
        return found

    def refresh_(self) -> bool:
        """Notice a mask change (identity or version of any mask buffer): drop the cached index
        lists and check that every rank holds the same masks (RuntimeError otherwise). Cheap
        when nothing changed; returns whether something did."""
        masks = self.masks()
        stamp = tuple((n, id(m), m._version) for n, m in masks.items())
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        self._plans.clear()
        if masks and dist.get_world_size(self.group) > 1:
            check_same_masks(masks, self.group)
        return True

    def index(self, bucket: dist.GradBucket) -> Tensor | None:
        """Positions in ``bucket.buffer()`` of the entries to send, or None to send it whole
        (no parameter in the bucket has a pruned entry)."""
        params = bucket.parameters()
        ids = tuple(map(id, params))
        plan = self._plans.get(bucket.index())
        if plan is not None and plan[0] == ids:  # DDP rebuilds its buckets once, after the first step
            return plan[1]
        buffer = bucket.buffer()
        positions = torch.arange(buffer.numel(), device=buffer.device)  # [bucket]
        parts, pruned = [], False
        for param, grad in zip(params, bucket.gradients()):
            start = (grad.data_ptr() - buffer.data_ptr()) // buffer.element_size()
            where = positions.as_strided(param.shape, _bucket_strides(param), start)  # bucket position of each entry
            mask = self.mask_of(param)
            if mask is None or bool(mask.all()):
                parts.append(where.reshape(-1))
            else:
                parts.append(where[mask.to(where.device)])
                pruned = True
        index = torch.cat(parts).sort().values if pruned else None  # memory order: the gather streams
        self._plans[bucket.index()] = (ids, index)
        self.builds += 1
        return index

    def reset_counts(self) -> tuple[int, int]:
        """(sent, dense_bytes) since the last reset, and start counting again."""
        counts = self.sent, self.dense_bytes
        self.sent = self.dense_bytes = 0
        return counts


def check_same_masks(masks: dict[str, Tensor], group: dist.ProcessGroup | None = None) -> None:
    """RuntimeError naming the first mask that differs between ranks (one all-reduce, one host sync)."""
    prints = torch.stack([mask_fingerprint(m) for m in masks.values()])  # [masks, 2]
    both = torch.cat([prints, ~prints])  # max of ~x is ~min of x: one all-reduce gives both ends
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    high, low = both[: len(masks)], ~both[len(masks):]
    for name, hi, lo in zip(masks, high.tolist(), low.tolist()):
        if hi != lo:
            kept = f"{lo[0]} to {hi[0]} kept entries" if hi[0] != lo[0] else "the same count, other positions"
            raise RuntimeError(
                f"the mask of {name!r} differs between ranks ({kept}): a masked all-reduce would average "
                "mismatched entries. Masks must be identical on every rank: compute them from synchronised "
                "values, or draw them from a generator seeded alike on every rank."
            )


def masked_allreduce_hook(state: MaskedAllReduce, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP communication hook: average the bucket's kept entries across ranks, zero the pruned ones.

    Register with ``ddp.register_comm_hook(MaskedAllReduce(model), masked_allreduce_hook)``.
    """
    if bucket.index() == 0:  # buckets are reduced in order: once per backward
        state.refresh_()
    buffer = bucket.buffer()  # [bucket], flat gradients of the bucket's parameters
    index = None if state.dense else state.index(bucket)
    state.dense_bytes += buffer.numel() * buffer.element_size()
    if index is None:  # DDP's own arithmetic: times 1 / world size, then summed
        state.sent += buffer.numel() * buffer.element_size()
        work = dist.all_reduce(buffer.mul_(state.scale), group=state.group, async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])
    packed = buffer.index_select(0, index).mul_(state.scale)  # [kept]
    state.sent += packed.numel() * packed.element_size()
    work = dist.all_reduce(packed, group=state.group, async_op=True)

    def unpack(fut: torch.futures.Future) -> Tensor:
        return buffer.zero_().index_copy_(0, index, fut.value()[0])

    return work.get_future().then(unpack)
