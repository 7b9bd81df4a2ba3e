"""Averaged copies of a module's tensors, paired by name, and the two update rules.

EMA and SWA are one in-place op with different weights: ``avg <- lerp(avg, current, w)``,
``w = 1 - decay_t`` for EMA and ``w = 1 / (n + 1)`` for SWA's running mean. Floating
tensors (parameters and buffers such as BatchNorm statistics) are averaged with one
``torch._foreach_lerp_`` call per (device, dtype) group; integer buffers
(``num_batches_tracked``) are copied, never averaged. Tensors are paired by their
qualified name, so re-registering a parameter (as ``torch.nn.utils.prune`` does) cannot
mis-pair them the way a positional zip does.

A tensor the model re-initialises mid-run (QAT's scales when quantization starts) has its
average restarted by :meth:`AveragedWeights.restart_`: it is set to the current value, and the
update weight of that tensor is computed from the updates since the restart (``update_`` takes
the weight as a function of that count), as if averaging had begun there.

Sharded parameters (FSDP2 DTensors) get DTensor averages of the same layout, created and
updated on the local shards only (no communication per update); :meth:`AveragedWeights.full_state_dict`
gathers whole tensors for an export. Where they are saved is the caller's choice
(``lichtenberg.core.averaging.sharded`` attaches them to the model as buffers).

Example:
    >>> model = torch.nn.Linear(4, 2)
    >>> avg = AveragedWeights(model)
    >>> for step in range(10):
    ...     ...  # optimizer step
    ...     avg.update_(1.0 - ema_decay(avg.num_updates, 0.99))
    >>> avg.copy_to_()  # ship the averaged weights
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from ..distributed import full, is_sharded, like
from .sharded import is_average_buffer, shard_view

__all__ = ["AveragedWeights", "averageable_tensors", "ema_decay", "ema_update_", "load_tensors_", "swa_update_"]


def ema_decay(num_updates: int, decay: float, warmup_gamma: float = 1.0, warmup_power: float | None = 2 / 3) -> float:
    """Decay used by EMA update number ``num_updates`` (0-based).

    With warm-up (timm / ema-pytorch): ``min(decay, 1 - (1 + t / gamma) ** -power)``.
    The first update (t = 0) always has decay 0, i.e. it initialises the average with the
    current weights, so an average started late never blends in the initial weights.

    Args:
        num_updates: number of updates already applied.
        decay: the asymptotic decay in (0, 1).
        warmup_gamma: time scale of the warm-up, in updates.
        warmup_power: warm-up exponent (2/3 for short runs, 3/4 for long ones); None disables it.
    """
    if num_updates == 0:
        return 0.0
    if warmup_power is None:
        return decay
    return min(decay, 1.0 - (1.0 + num_updates / warmup_gamma) ** -warmup_power)


@torch.no_grad()
def ema_update_(averaged: list[Tensor], current: list[Tensor], decay: float) -> None:
    """``averaged <- decay * averaged + (1 - decay) * current``, in place, one foreach call."""
    torch._foreach_lerp_(averaged, current, 1.0 - decay)


@torch.no_grad()
def swa_update_(averaged: list[Tensor], current: list[Tensor], num_averaged: int) -> None:
    """Running equal mean: after the call ``averaged`` is the mean of ``num_averaged + 1`` snapshots."""
    torch._foreach_lerp_(averaged, current, 1.0 / (num_averaged + 1))


def averageable_tensors(module: nn.Module) -> dict[str, Tensor]:
    """Parameters and persistent buffers of ``module`` by qualified name (tied tensors once).

    Bool buffers (sparsity masks) are structure, not state to average, and are left out, and
    so are averages attached beside parameters (``<name>_ema``, ``<name>_swa``).
    """
    out = dict(module.named_parameters())
    for name, buf in module.named_buffers():
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        if leaf not in owner._non_persistent_buffers_set and buf.dtype != torch.bool and not is_average_buffer(owner, leaf):
            out[name] = buf
    return out


def _mask_of(module: nn.Module, names: list[str]) -> Tensor | None:
    """The bool ``<name>_mask`` buffer beside a tensor under any of its ``names`` (tied aliases),
    if a sparsity technique attached one."""
    for name in names:
        owner, _, leaf = name.rpartition(".")
        mask = module.get_submodule(owner)._buffers.get(f"{leaf}_mask")
        if mask is not None and mask.dtype == torch.bool:
            return mask
    return None


def _aliases(module: nn.Module) -> dict[int, list[str]]:
    """Every name of every parameter, by tensor identity (tied weights have several)."""
    names: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return names


def _resolve(module: nn.Module, name: str) -> Tensor:
    owner_name, _, leaf = name.rpartition(".")
    try:
        owner = module.get_submodule(owner_name)
    except AttributeError:
        owner = None
    tensor = None if owner is None else owner._parameters.get(leaf, owner._buffers.get(leaf))
    if tensor is None:
        raise ValueError(
            f"'{name}' is averaged but is no longer a parameter or buffer of the model (a reparametrisation "
            "such as torch.nn.utils.prune renames it to '<name>_orig'). Average the model it was set up with, "
            "or make such reparametrisations permanent first (lichtenberg's pruning masks in place and keeps names)."
        )
    return tensor


def _average_dtype(dtype: torch.dtype) -> torch.dtype:
    # Averages of half-precision weights are kept in float32: a 0.9999 decay underflows in bf16.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class AveragedWeights:
    """Name-keyed averaged copies of a module's floating tensors (integer buffers copied).

    A sharded tensor (FSDP2 DTensor) gets a DTensor average of its layout, beside it: the
    rank's memory is that of its shard, and every operation here works on local shards.

    Args:
        module: the model to average; its current values initialise the copies.
        device: where the copies live; None keeps each beside its tensor ("cpu" offloads;
            not for sharded tensors).
        names: which tensors to track; default every parameter and persistent buffer.
    """

    def __init__(self, module: nn.Module, device: str | torch.device | None = None, names: Iterable[str] | None = None):
        self.device = None if device is None else torch.device(device)
        self.num_updates = 0
        self.tensors: dict[str, Tensor] = {}
        self.buffer_names: set[str] = set()
        # name -> num_updates when its average restarted (absent: averaged from the first update).
        self.restarted: dict[str, int] = {}
        self.add_(module, names)

    def add_(self, module: nn.Module, names: Iterable[str] | None = None) -> list[str]:
        """Start tracking tensors not tracked yet (e.g. created in ``configure_model``); returns their names."""
        found = averageable_tensors(module) if names is None else {n: _resolve(module, n) for n in names}
        params = {n for n, _ in module.named_parameters()}
        new = [n for n in found if n not in self.tensors]
        self.buffer_names |= {n for n in new if n not in params}
        for name in new:
            t = found[name].detach()
            dtype = _average_dtype(t.dtype) if t.is_floating_point() else t.dtype
            if is_sharded(t):
                if self.device is not None:
                    raise ValueError(f"device={self.device} for the sharded tensor '{name}': averages of FSDP2 shards "
                                     "stay beside their shards (already 1/world size of the memory); pass device=None.")
                self.tensors[name] = like(t, shard_view(t).to(dtype, copy=True))
            else:
                self.tensors[name] = t.to(self.device or t.device, dtype, copy=True)
        self.bind_(module)
        return new

    def bind_(self, module: nn.Module) -> None:
        """Resolve the module's tensors by name and group them for the foreach updates.

        Call again whenever parameters may have been re-registered or moved to another device.
        """
        current = {name: _resolve(module, name) for name in self.tensors}
        self._current = current
        # Averages written into a sparse model stay on its current masks, found under every alias.
        aliases = _aliases(module)
        masks = {name: _mask_of(module, aliases.get(id(current[name]), [name])) for name in self.tensors}
        self._masks = {n: m for n, m in masks.items() if m is not None}
        # Every foreach list below holds local shards (the tensors themselves when not sharded).
        self._masked = ([shard_view(current[n]) for n in self._masks], [shard_view(m) for m in self._masks.values()])
        for name, avg in self.tensors.items():
            if is_sharded(avg) != is_sharded(current[name]):
                raise ValueError(f"'{name}' is {'' if is_sharded(current[name]) else 'not '}sharded but its average "
                                 "is not laid out alike: bind averages to the model they were made from.")
        self._group()

    def _group(self) -> None:
        """The foreach lists of ``update_``: one per (device, dtype, restart) of the floating
        tensors, the ones needing a conversion, and the integer buffers (copied)."""
        self._groups: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
        self._casts: dict[int, list[tuple[Tensor, Tensor]]] = {}
        self._copies: tuple[list[Tensor], list[Tensor]] = ([], [])
        for name, avg in self.tensors.items():
            cur, avg = shard_view(self._current[name]), shard_view(avg)
            since = self.restarted.get(name, 0)
            if not avg.is_floating_point():
                self._copies[0].append(avg)
                self._copies[1].append(cur)
            elif cur.device == avg.device and cur.dtype == avg.dtype:
                avgs, curs = self._groups.setdefault((avg.device, avg.dtype, since), ([], []))
                avgs.append(avg)
                curs.append(cur)
            else:
                self._casts.setdefault(since, []).append((avg, cur))
        self._since = sorted({0, *self.restarted.values()})

    def bound_to(self, module: nn.Module) -> bool:
        """Whether the copies are bound to ``module``'s own tensors (the same objects, by name)."""
        try:
            return all(_resolve(module, name) is t for name, t in self._current.items())
        except ValueError:
            return False

    def update_(self, weight: float | Callable[[int], float]) -> None:
        """``avg <- avg + w * (current - avg)`` for floating tensors; integer buffers copied.

        Args:
            weight: ``w`` for every tensor, or a function giving ``w`` from the number of updates
                a tensor's average has had (``num_updates``, or the updates since its
                :meth:`restart_`): what an averaging rule with a warm-up or a count needs.

        One ``torch._foreach_lerp_`` per (device, dtype) group and one ``torch._foreach_copy_``
        for the integer buffers (a restarted tensor's group is one more): nothing is allocated
        and nothing waits for the device.
        """
        n = self.num_updates
        w = {s: weight(n - s) for s in self._since} if callable(weight) else dict.fromkeys(self._since, weight)
        # Grad mode is switched by hand: the no_grad decorator costs ~2 us a call, a third of
        # the lerp itself on a small model (docs/averaging.md, "Per-step cost").
        enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            for (_, _, since), (avgs, curs) in self._groups.items():
                torch._foreach_lerp_(avgs, curs, w[since])
            for since, casts in self._casts.items():  # different device or dtype: one conversion each, then one lerp
                avgs = [a for a, _ in casts]
                torch._foreach_lerp_(avgs, [c.to(a.device, a.dtype, non_blocking=True) for a, c in casts], w[since])
            if self._copies[0]:
                torch._foreach_copy_(self._copies[0], self._copies[1])
        finally:
            torch._C._set_grad_enabled(enabled)
        self.num_updates += 1

    def names_of(self, tensors: Iterable[Tensor]) -> list[str]:
        """The names under which the bound module's ``tensors`` (the objects themselves) are averaged."""
        wanted = {id(t) for t in tensors}
        return [name for name, t in self._current.items() if id(t) in wanted]

    @torch.no_grad()
    def restart_(self, names: Iterable[str]) -> None:
        """Restart the averages of ``names`` from the bound tensors' current values.

        Each average is set to the current value and its update count restarts: the next
        :meth:`update_` passes 0 to the weight function for it (both EMA's and SWA's first
        update then copy), so the tensor is averaged as if averaging had begun now. For a
        tensor the model (re)initialised mid-run, such as a quantization scale when
        quantization starts: the values it held before belong to no model that trained.
        Call it at the event, not per step (it regroups the foreach lists).
        """
        names = [n for n in names if n in self.tensors]
        load_tensors_({n: self.tensors[n] for n in names}, {n: self._current[n] for n in names})
        if self.num_updates:  # before the first update every tensor counts from 0 already
            self.restarted.update(dict.fromkeys(names, self.num_updates))
            self._group()

    @torch.no_grad()
    def copy_to_(self) -> None:
        """Write the averages into the bound module (zeroed where a sparsity mask prunes)."""
        load_tensors_(self._current, self.tensors)
        if self._masked[0]:
            torch._foreach_mul_(*self._masked)

    def snapshot(self) -> dict[str, Tensor]:
        """Clones of the bound module's current values of every tracked tensor (shard-local
        clones, laid out like their tensors, for sharded ones)."""
        return {name: like(t, shard_view(t).clone()) for name, t in self._current.items()}

    @torch.no_grad()
    def restore_(self, snapshot: Mapping[str, Tensor]) -> None:
        """Write a :meth:`snapshot` back into the bound module."""
        load_tensors_(self._current, snapshot)

    def to_(self, device: str | torch.device) -> None:
        """Move the copies (unless a fixed ``device`` was given); call :meth:`bind_` afterwards."""
        if self.device is None:  # sharded averages already sit beside their shards
            self.tensors = {n: t if is_sharded(t) else t.to(device) for n, t in self.tensors.items()}

    def state_dict(self) -> dict:
        return {"num_updates": self.num_updates, "tensors": dict(self.tensors), "restarted": dict(self.restarted)}

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, Tensor]:
        """Whole copies of the averages, by name, zeroed where a sparsity mask prunes: an export
        helper. Sharded averages are all-gathered (a collective: call it on every rank, not per step).
        """
        out = {}
        for name, avg in self.tensors.items():
            whole = full(avg).detach().clone()
            mask = getattr(self, "_masks", {}).get(name)
            out[name] = whole if mask is None else whole * full(mask).to(whole.device)
        return out

    @torch.no_grad()
    def load_state_dict(self, state: Mapping) -> dict[str, Tensor]:
        """Load counters and copies; returns the entries whose names are not tracked (yet)."""
        self.num_updates = int(state["num_updates"])
        self.restarted = {n: int(s) for n, s in state.get("restarted", {}).items() if n in self.tensors}
        self._group()
        unknown = {}
        for name, value in state["tensors"].items():
            if name in self.tensors:
                load_tensors_(self.tensors, {name: value})
            else:
                unknown[name] = value
        return unknown


@torch.no_grad()
def load_tensors_(dst: Mapping[str, Tensor], src: Mapping[str, Tensor]) -> None:
    """Copy ``src[name]`` into ``dst[name]`` for every name of ``src``, grouped into foreach copies.

    Sharded tensors are copied shard to shard (both must be laid out alike).
    """
    groups: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
    for name, s in src.items():
        d = dst[name]
        if is_sharded(d) != is_sharded(s):
            raise ValueError(f"'{name}': cannot copy a {'' if is_sharded(s) else 'non-'}sharded tensor into a "
                             f"{'' if is_sharded(d) else 'non-'}sharded one; load state saved under the same strategy.")
        d, s = shard_view(d), shard_view(s)
        if s.device != d.device or s.dtype != d.dtype:
            s = s.to(d.device, d.dtype)
        dl, sl = groups.setdefault((d.device, d.dtype), ([], []))
        dl.append(d)
        sl.append(s)
    for dl, sl in groups.values():
        torch._foreach_copy_(dl, sl)
