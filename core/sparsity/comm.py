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
Each step then costs a gather into a kept buffer, a zero fill and a scatter of the bucket: no
host sync and no allocation. At the
first bucket of each backward the mask buffers are compared with the ones seen last, by
identity and version counter (every in-place change bumps it; a change through ``.data``
would not be seen, nor a mask first registered on an unmasked weight until another mask
changes). A change is checked to be the same on every rank: one all-reduce of fingerprints
and one host sync per change, never per step. Masks must therefore change at the same step
on every rank, as every lichtenberg technique changes them: a change on one rank alone is a
collective mismatch (gloo stops with an error, NCCL waits for its timeout).

Example:
    >>> ddp = DistributedDataParallel(model)
    >>> state = MaskedAllReduce(model, ddp.process_group)
    >>> ddp.register_comm_hook(state, masked_allreduce_hook)
    >>> state.dense = step_reads_dense_gradients   # e.g. a RigL update step: send everything
"""

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["MaskedAllReduce", "check_same_masks", "mask_fingerprint", "masked_allreduce_hook"]

_ODD = 0x9E3779B97F4A7C15 - 2**64  # golden-ratio multiplier as a signed int64: spreads word positions


def mask_fingerprint(mask: Tensor) -> Tensor:
    """``[kept, hash]`` (int64, on the mask's device) of a bool mask: equal masks give equal
    fingerprints; a different mask almost surely not (each 8-entry word weighted by its position)."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    words = torch.cat([flat, flat.new_zeros(pad)]).view(torch.uint8).view(torch.int64)  # [n / 8]
    weights = torch.arange(1, words.numel() + 1, device=mask.device, dtype=torch.int64).mul_(_ODD)  # wraps
    return torch.stack([flat.sum(dtype=torch.int64), (words * weights).sum()])


def _memory_order(param: Tensor) -> list[int]:
    """The dimensions of ``param`` from outermost to innermost as DDP lays its gradient out in a
    bucket: by the parameter's own strides when it is dense and non-overlapping (channels_last
    stays channels_last), else contiguous."""
    order = sorted(range(param.dim()), key=param.stride, reverse=True)
    expected = 1
    for d in reversed(order):
        if param.size(d) != 1 and param.stride(d) != expected:
            return list(range(param.dim()))
        expected *= param.size(d)
    return order


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
        self._known: list[tuple[dict, str, Tensor, int]] | None = None  # (buffers, key, mask, version) seen last
        self._plans: dict[int, tuple[tuple[int, ...], "tuple[Tensor, Tensor] | None"]] = {}

    def _find(self, param: Tensor) -> tuple[dict, str, Tensor] | None:
        for buffers, key, _ in self._slots.get(id(param), ()):
            mask = buffers.get(key)
            if mask is not None and mask.dtype == torch.bool and mask.shape == param.shape:
                return buffers, key, mask
        return None

    def mask_of(self, param: Tensor) -> Tensor | None:
        """The mask of ``param`` (under any of its names), or None."""
        found = self._find(param)
        return None if found is None else found[2]

    def _found(self) -> dict[str, tuple[dict, str, Tensor]]:
        """(buffers, key, mask) of every parameter that has a mask, by the parameter's first name."""
        return {slots[0][2]: found for pid, slots in self._slots.items()
                if (found := self._find(self._params[pid])) is not None}

    def masks(self) -> dict[str, Tensor]:
        """Every parameter's mask, by the parameter's first name."""
        return {name: found[2] for name, found in self._found().items()}

    def refresh_(self) -> bool:
        """Notice a mask change (identity or version of a mask buffer): drop the cached index
        lists and check that every rank holds the same masks (RuntimeError otherwise). Returns
        whether something changed; when nothing did it only compares the known masks' versions."""
        if self._known is not None and all(buffers.get(key) is mask and mask._version == version
                                           for buffers, key, mask, version in self._known):
            return False
        found = self._found()
        self._known = [(buffers, key, mask, mask._version) for buffers, key, mask in found.values()]
        self._plans.clear()
        masks = {name: f[2] for name, f in found.items()}
        if masks and dist.get_world_size(self.group) > 1:
            check_same_masks(masks, self.group)
        return True

    def index(self, bucket: dist.GradBucket) -> tuple[Tensor, Tensor] | None:
        """Positions in ``bucket.buffer()`` of the entries to send and a buffer to pack them into
        (kept across steps: no allocation per step), or None to send the bucket whole (no
        parameter in it has a pruned entry)."""
        params = bucket.parameters()
        ids = tuple(map(id, params))
        plan = self._plans.get(bucket.index())
        if plan is not None and plan[0] == ids:  # DDP rebuilds its buckets once, after the first step
            return plan[1]
        buffer = bucket.buffer()
        parts, pruned = [], False
        for param, grad in zip(params, bucket.gradients()):
            start = (grad.data_ptr() - buffer.data_ptr()) // buffer.element_size()
            mask = self.mask_of(param)
            if mask is None or bool(mask.all()):
                parts.append((start, torch.arange(start, start + param.numel(), device=buffer.device)))
                continue
            in_memory = mask.permute(_memory_order(param)).reshape(-1).to(buffer.device)  # [numel], bucket order
            parts.append((start, in_memory.nonzero().squeeze(1).add_(start)))
            pruned = True
        # ascending positions (the gather streams through the bucket), without sorting them
        index = torch.cat([p for _, p in sorted(parts, key=lambda part: part[0])]) if pruned else None
        plan = None if index is None else (index, buffer.new_empty(index.numel()))
        self._plans[bucket.index()] = (ids, plan)
        self.builds += 1
        return plan

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
    plan = None if state.dense else state.index(bucket)
    state.dense_bytes += buffer.numel() * buffer.element_size()
    if plan is None:  # DDP's own arithmetic: times 1 / world size, then summed
        state.sent += buffer.numel() * buffer.element_size()
        work = dist.all_reduce(buffer.mul_(state.scale), group=state.group, async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])
    index, packed = plan  # the previous step's all-reduce of `packed` finished before this backward
    torch.index_select(buffer, 0, index, out=packed).mul_(state.scale)  # [kept]
    state.sent += packed.numel() * packed.element_size()
    work = dist.all_reduce(packed, group=state.group, async_op=True)

    def unpack(fut: torch.futures.Future) -> Tensor:
        return buffer.zero_().index_copy_(0, index, fut.value()[0])

    return work.get_future().then(unpack)
