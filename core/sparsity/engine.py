"""One mask engine for every sparsity technique (gradual pruning and sparse training differ
only in policy and schedule).

Masks are bool buffers ``<param>_mask`` registered beside each target weight, so they
travel with the checkpoint and the model's own keys stay unchanged. They are applied in
place; there is no forward-time reparametrisation and no inference overhead:

- gradients are masked before the optimizer step and weights re-masked after it, both by
  multiplying the tensor's bits (viewed as integers) by the mask's bytes (viewed as uint8):
  a pruned slot becomes exactly +0.0 whatever it held, NaN and inf included, and a kept slot
  is untouched. On CPU this runs 3x faster than ``torch.where`` with a bool mask and needs
  no float copy of the mask;
- when a mask changes, every optimizer state tensor shaped like the parameter (SGD momentum,
  Adam moments, ...) is zeroed in the changed slots, and regrown weights start at zero (a
  non-finite gradient they still hold from their pruned past is dropped).

Sharded runs (FSDP2): parameters are DTensor shards (``Shard(0)``) and every mask is a
DTensor of the same layout (``ones_like`` of the parameter), which torch.distributed.checkpoint
saves sharded. Every operation here works on the local shards (``core.distributed.local``) with
no communication, except the counts an event reports (one all-reduce, one host sync per call).

Example:
    >>> engine = MaskEngine.attach_(model, {"fc.weight": model.fc.weight})   # or from a Selection
    >>> engine.set_masks_({"fc.weight": topk_mask(model.fc.weight.abs(), k)}, [optimizer])
    >>> ...  # each step: engine.mask_grads_(); optimizer.step(); engine.apply_()
    >>> engine.squash_()  # plain module, weights already zero where pruned
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..distributed import all_reduce_, group_of, is_sharded, local, scatter_like
from ..distributed import like as _like
from ..layers import LayerKind, as_rows, from_rows

__all__ = ["MaskEngine", "global_sum_tensor", "global_sums", "laid_out_like", "mask_name", "masked_bits_"]

_BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def masked_bits_(tensors: list[Tensor], masks: list[Tensor]) -> None:
    """Zero ``tensors`` where the bool ``masks`` are False, in place and NaN-safe (one foreach call).

    DTensors are worked on shard-local (a mask is laid out like its tensor): viewing a DTensor's
    bits as integers is not a DTensor op, and the local shards need no communication.
    """
    if tensors:
        torch._foreach_mul_([local(t).view(_BITS[t.dtype]) for t in tensors],
                            [local(m).view(torch.uint8) for m in masks])


def global_sums(tensors: list[Tensor]) -> list[int]:
    """Sum of each tensor over all its shards: one all-reduce and one host sync for the list
    (for events and reports, never per step). Whole tensors are summed locally: every rank
    holds all of them."""
    return global_sum_tensor(tensors).tolist() if tensors else []


def global_sum_tensor(tensors: list[Tensor]) -> Tensor:
    """:func:`global_sums` as an int64 tensor on the tensors' device, with no host sync (one
    all-reduce for sharded ones)."""
    sums = torch.stack([local(t).sum(dtype=torch.int64) for t in tensors])
    sharded = [i for i, t in enumerate(tensors) if is_sharded(t)]
    if sharded:
        part = all_reduce_(sums[sharded].contiguous(), group_of(tensors[sharded[0]]))
        sums[sharded] = part
    return sums


def laid_out_like(reference: Tensor, tensor: Tensor) -> Tensor:
    """``tensor`` laid out like ``reference``: itself when it already is (a DTensor, or both
    whole), else this rank's rows of the whole ``tensor`` as a DTensor like ``reference``
    (slicing, no communication: e.g. random masks every rank draws alike)."""
    if is_sharded(tensor) or not is_sharded(reference):
        return tensor
    if tensor.shape != reference.shape:
        raise ValueError(f"a whole tensor of shape {tuple(tensor.shape)} cannot be laid out like a parameter of "
                         f"shape {tuple(reference.shape)}: give it the parameter's shape.")
    return scatter_like(reference, tensor)


def mask_name(param_name: str) -> str:
    """Name of the mask buffer of ``param_name`` ("net.0.weight" -> "net.0.weight_mask")."""
    return f"{param_name}_mask"


class MaskEngine:
    """Bool masks beside target parameters, by parameter name.

    A tensor reachable under several names (tied weights) has one mask, registered as the
    ``<leaf>_mask`` buffer under every one of them: whatever finds a weight by any of its
    names (averaging, fake-quant layers, export) finds its mask too.

    Args:
        model: the module owning the parameters.
        params: target parameters by qualified name.
        kinds: layer kind per name (which axis holds the outputs); default ``[out, ...]``.
        aliases: other names of each target tensor (``Selection.aliases``).
    """

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], kinds: dict[str, LayerKind] | None = None,
                 aliases: dict[str, Iterable[str]] | None = None):
        self.model = model
        self.params = dict(params)
        self.kinds = dict(kinds or {})
        self.aliases = {n: [a for a in (aliases or {}).get(n, ()) if a != n] for n in self.params}
        self.masks: dict[str, Tensor] = {}
        for name, param in self.params.items():
            found = [m for m in map(self._buffer, self.names(name)) if m is not None]
            self.masks[name] = found[0] if found else torch.ones_like(param, dtype=torch.bool)
        self._tie()

    @classmethod
    def attach_(cls, model: nn.Module, params: dict[str, nn.Parameter], kinds: dict[str, LayerKind] | None = None,
                aliases: dict[str, Iterable[str]] | None = None) -> MaskEngine:
        """Register all-ones masks (or reuse existing ones) and return the engine."""
        return cls(model, params, kinds, aliases)

    def names(self, name: str) -> list[str]:
        """Every name of the target tensor ``name``, its own first."""
        return [name, *self.aliases[name]]

    def _owner(self, name: str) -> tuple[nn.Module, str]:
        owner, _, leaf = name.rpartition(".")
        return self.model.get_submodule(owner), f"{leaf}_mask"

    def _buffer(self, name: str) -> Tensor | None:
        module, key = self._owner(name)
        mask = module._buffers.get(key)
        return mask if mask is not None and mask.dtype == torch.bool else None

    def _tie(self) -> None:
        for name, mask in self.masks.items():
            for alias in self.names(name):
                module, key = self._owner(alias)
                if module._buffers.get(key) is not mask:
                    module._buffers.pop(key, None)
                    module.register_buffer(key, mask)

    def rebind_(self) -> None:
        """Re-read the mask buffers after a checkpoint or device move replaced them (and re-tie
        aliases: moving a module copies each owner's buffers separately)."""
        self.masks = {name: self._buffer(name) for name in self.params}
        self._tie()

    @property
    def buffer_names(self) -> list[str]:
        return [mask_name(a) for n in self.params for a in self.names(n)]

    def rows(self, name: str, tensor: Tensor) -> Tensor:
        """``tensor`` (shaped like parameter ``name``) viewed ``[out, in, ...]``."""
        kind = self.kinds.get(name)
        return tensor if kind is None else as_rows(tensor, kind)

    def from_rows(self, name: str, tensor: Tensor) -> Tensor:
        """Inverse of :meth:`rows`."""
        kind = self.kinds.get(name)
        return tensor if kind is None else from_rows(tensor, kind)

    @torch.no_grad()
    def apply_(self) -> None:
        """Zero the pruned weights (shard-local)."""
        masked_bits_([p.detach() for p in self.params.values()], list(self.masks.values()))

    @torch.no_grad()
    def mask_grads_(self, names: Iterable[str] | None = None) -> None:
        """Zero the gradients of pruned weights in place, NaN-safe (all targets, or ``names``)."""
        names = [n for n in (self.params if names is None else names) if self.params[n].grad is not None]
        masked_bits_([self.params[n].grad for n in names], [self.masks[n] for n in names])

    @torch.no_grad()
    def set_masks_(self, new: dict[str, Tensor], optimizers: Iterable[torch.optim.Optimizer] = ()) -> dict[str, int]:
        """Install new masks; reset optimizer state where they changed; returns changed counts.

        Masks may be DTensors laid out like their parameters, or whole tensors (every rank then
        takes its rows). All the work is shard-local; the counts cost one all-reduce per call.
        """
        changed_local = []
        states = [opt.state for opt in optimizers]
        for name, mask in new.items():
            param = self.params[name]
            old = local(self.masks[name])
            mask = local(laid_out_like(param, mask))
            if mask.device != old.device:  # a blocking copy from the host would synchronise
                mask = mask.to(old.device)
            changed = old ^ mask
            changed_local.append(changed)
            weight = local(param.detach())
            grown = mask & ~old
            weight.masked_fill_(grown, 0.0)  # regrown weights start at zero
            if param.grad is not None:  # ... and take no non-finite gradient from their pruned past
                grad = local(param.grad)
                grad.masked_fill_(grown & ~grad.isfinite(), 0.0)
            for state in states:  # optimizer state is laid out like the parameter (DTensors under FSDP2)
                for value in state.get(param, {}).values():
                    if isinstance(value, Tensor) and value.shape == param.shape and local(value).shape == weight.shape:
                        local(value).masked_fill_(changed, 0)
            old.copy_(mask)
        self.apply_()
        # whole-tensor counts on sharded params: sum the shards (one all-reduce for all layers)
        counts = global_sums([_like(self.params[n], c) for n, c in zip(new, changed_local)])
        return dict(zip(new, counts))

    def kept(self) -> dict[str, int]:
        """Kept weights per layer, over all shards (one all-reduce, one host sync)."""
        return dict(zip(self.masks, global_sums(list(self.masks.values()))))

    def sparsity_tensors(self) -> tuple[dict[str, Tensor], Tensor]:
        """:meth:`sparsity_report` as 0-dim float tensors on the masks' device, with no host sync
        (to log: Lightning reads them when its logger writes)."""
        kept = global_sum_tensor(list(self.masks.values())).float()
        per_layer = {n: 1.0 - k / self.masks[n].numel() for n, k in zip(self.masks, kept)}
        return per_layer, 1.0 - kept.sum() / max(sum(m.numel() for m in self.masks.values()), 1)

    def sparsity_report(self) -> tuple[dict[str, float], float]:
        """Per-layer and global sparsity of the masks (``numel`` of a DTensor is the whole tensor's)."""
        kept = self.kept()
        total = sum(m.numel() for m in self.masks.values())
        per_layer = {n: 1.0 - kept[n] / self.masks[n].numel() for n in kept}
        return per_layer, 1.0 - sum(kept.values()) / max(total, 1)

    @torch.no_grad()
    def squash_(self) -> dict[str, int]:
        """Apply the masks for good and remove the buffers (under every alias); returns non-zeros per layer."""
        self.apply_()
        for name in self.params:
            for alias in self.names(name):
                module, key = self._owner(alias)
                module._buffers.pop(key, None)
        nonzeros = dict(zip(self.params, global_sums([_like(p, local(p.detach()) != 0) for p in self.params.values()])))
        self.masks = {}
        self.params = {}
        return nonzeros
