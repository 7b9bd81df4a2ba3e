"""What EMA and SWA share: averaged copies beside training, evaluation and shipping on them.

Lifecycle (see docs/design.md):
- ``setup`` of a fit: copies of every parameter and persistent buffer of the model as it is,
  keyed by name, made right after the module's ``configure_model`` (its layers included) and
  before Lightning restores a checkpoint, so a resumed run loads its averages into them.
  Nothing of an earlier fit is kept: a reused instance starts from the model's current weights.
- ``on_fit_start``: move the copies next to the weights (or keep them on the CPU), bind by name.
- after each optimizer step (or epoch) the subclass says whether to update and with what weight.
- validation / test swap the averages in and the raw weights back out.
- ``on_train_end`` leaves the averaged weights in the module (shippable); checkpoints always
  store the RAW weights as the model state, so a resume continues training from them.

With several averaging callbacks attached, only the last one that evaluates (and the last
one that applies at the end) swaps weights; the others keep their averages in their state.

Other callbacks that change the model talk to every averaging callback through two helpers
(they may look at ``trainer.callbacks``; ``core`` never does):
- ``track_added(trainer, module)``: the model gained tensors after the averaging callbacks
  bound (QAT's quantizer scales): averaging ones bound earlier average them too, so the
  averaged set does not depend on the order of ``callbacks``;
- ``restart_averages(trainer, tensors)``: those tensors were (re)initialised just now (QAT's
  scales when quantization starts): each average of them restarts from the current value, as
  if averaging had begun there (``_Averaging.restart_``, the one override point). Call it at the
  event, before the step's updates, on every rank alike; the restarts are callback state.

Under FSDP2 (ModelParallelStrategy) the average of a sharded parameter is a DTensor of its
layout, updated and swapped shard to shard. Callback state is saved by rank 0 alone, so
these live in the model during a fit, as persistent buffers ``net.0.weight_ema`` (``_swa``)
that torch.distributed.checkpoint saves and restores, removed at teardown. FSDP2 leaves
buffers whole: the averages of BatchNorm statistics stay in the callback state, rank 0's,
as under DDP. See docs/averaging.md, "Sharded runs".
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from ..core.averaging import (
    AveragedWeights,
    attach_buffers_,
    batchnorm_layers,
    detach_buffers_,
    load_tensors_,
    read_buffers,
    reshard_,
    update_bn_,
)
from ..core.checks import check_bool
from ..core.distributed import check_layout, full, is_sharded
from ._base import _Base, after_configure_model, overrides
from ._strategy import check_strategy, is_fsdp2
from ._summary import format_table

__all__: list[str] = []


def averaging_callbacks(trainer: pl.Trainer) -> list[_Averaging]:
    """The averaging callbacks of ``trainer`` (EMA, SWA, Soup, subclasses), in their order."""
    return [cb for cb in trainer.callbacks if isinstance(cb, _Averaging)]


def track_added(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """The model gained parameters or buffers after binding (before a checkpoint restore): every
    averaging callback bound already starts averaging them from their current values."""
    for cb in averaging_callbacks(trainer):
        cb.track_(pl_module)


def restart_averages(trainer: pl.Trainer, tensors: Iterable[torch.Tensor]) -> None:
    """``tensors`` of the model were (re)initialised just now: every averaging callback restarts
    their averages from their current values (see ``_Averaging.restart_``). Pass the module's
    tensor objects (tied aliases resolve by identity); call it at the event, never per step."""
    tensors = list(tensors)
    for cb in averaging_callbacks(trainer):
        cb.restart_(tensors)


class _Averaging(_Base):
    """Base of the averaging callbacks. Subclasses override ``_weight`` and the two ``_due_*`` (and
    ``restart_`` / ``track_`` when they keep more than the averages, as Soup does)."""

    name = "averaging"
    _resume_free = ("offload_to_cpu", "evaluate_averaged", "apply_at_end")

    def __init__(self, evaluate_averaged: bool, apply_at_end: bool, offload_to_cpu: bool) -> None:
        self.evaluate_averaged = check_bool(f"{type(self).__name__} evaluate_averaged", evaluate_averaged)
        self.apply_at_end = check_bool(f"{type(self).__name__} apply_at_end", apply_at_end)
        self.offload_to_cpu = check_bool(f"{type(self).__name__} offload_to_cpu", offload_to_cpu)
        self.averaged: AveragedWeights | None = None
        self._last_step = 0  # global_step when updates were last considered
        self._raw: dict[str, torch.Tensor] | None = None  # raw weights while the module holds averages
        self._held_for_eval = False
        self._pending: dict[str, Any] = {}  # state loaded before any binding, applied at the next one
        self._evaluates = evaluate_averaged
        self._applies = apply_at_end
        self._attached: list[str] = []  # model buffers holding sharded averages (FSDP2)
        self._dtypes: dict[str, torch.dtype] = {}  # of the sharded averages, by parameter name

    # -- the override points -------------------------------------------------------------
    def _weight(self, updates: int) -> float:
        """Interpolation weight (``avg += w * (current - avg)``) of an average's update after
        ``updates`` earlier ones (counted from its restart for a restarted tensor)."""
        raise NotImplementedError

    def _due_after_step(self, step: int) -> bool:
        return False

    def _due_after_epoch(self, epoch: int, step: int) -> bool:
        return False

    def _summary_rows(self) -> list[tuple[str, str]]:
        return []

    # -- set-up ----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(self, trainer)
        if is_fsdp2(trainer) and self.offload_to_cpu:
            raise ValueError(f"{type(self).__name__} offload_to_cpu=True under ModelParallelStrategy: averages of FSDP2 "
                             "shards stay beside them (1/world size of the memory per rank); set offload_to_cpu=False.")
        peers = [cb for cb in trainer.callbacks if isinstance(cb, _Averaging)]
        self._evaluates = self.evaluate_averaged and self is [c for c in peers if c.evaluate_averaged][-1]
        self._applies = self.apply_at_end and self is [c for c in peers if c.apply_at_end][-1]
        if (self.evaluate_averaged and not self._evaluates) or (self.apply_at_end and not self._applies):
            rank_zero_info(
                f"{type(self).__name__}: another averaging callback later in `callbacks` swaps its "
                "weights in for evaluation / at the end; this one keeps its average in its state."
            )
        reshard_(pl_module)  # FSDP2 after a forward: the shards are what the averages are bound to
        if stage != "fit" and self.averaged is not None and self.averaged.bound_to(pl_module):
            return  # e.g. trainer.test right after fit: the module may hold the averages already
        self.averaged, self._raw, self._held_for_eval = None, None, False
        after_configure_model(pl_module, partial(self._bind, pl_module))

    def _bind(self, pl_module: pl.LightningModule) -> None:
        reshard_(pl_module)  # bind the shards, not a gathered copy
        self.averaged = AveragedWeights(pl_module, device="cpu" if self.offload_to_cpu else None)
        self._dtypes, self._attached = {}, []
        self._attach(pl_module, list(self.averaged.tensors))
        if self._pending:
            self._load_state(self._pending)

    def _attach(self, pl_module: pl.LightningModule, names: list[str]) -> None:
        """Under FSDP2: the averages of ``names`` that are sharded become model buffers."""
        assert self.averaged is not None
        sharded = {n: self.averaged.tensors[n] for n in names if is_sharded(self.averaged.tensors[n])}
        for name, tensor in sharded.items():
            check_layout(name, tensor)
        self._dtypes.update({n: t.dtype for n, t in sharded.items()})
        self._attached += attach_buffers_(pl_module, sharded, f"_{self.name}")

    # -- tensors other callbacks add or re-initialise (see the module docstring) ---------------
    def track_(self, pl_module: pl.LightningModule) -> list[str]:
        """Start averaging the model's tensors this callback does not average yet (added by a
        callback that bound after it); returns their names. Before the checkpoint restore only."""
        if self.averaged is None or not self.averaged.bound_to(pl_module):
            return []
        reshard_(pl_module)
        new = self.averaged.add_(pl_module)
        self._attach(pl_module, new)
        return new

    def restart_(self, tensors: Iterable[torch.Tensor]) -> list[str]:
        """Restart the averages of ``tensors`` (objects of the bound module) from their current
        values, as if this callback had started averaging them now; returns their names.

        EMA and SWA: the next update copies them, then EMA's warm-up and SWA's count go on from
        the restart (``AveragedWeights.restart_``). While the module holds the averages (a
        validation) the current value is the model's new one: the raw weights to restore take it.
        """
        if self.averaged is None:
            return []
        names = self.averaged.names_of(tensors)
        if not names:
            return []
        self.averaged.restart_(names)
        if self._raw is not None:
            load_tensors_(self._raw, {n: self.averaged._current[n] for n in names})
        return names

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # The averages stay with this callback (and in the module if applied); the model loses the keys.
        detach_buffers_(pl_module, self._attached)
        self._attached = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.averaged is not None
        reshard_(pl_module)
        if self._attached:  # a checkpoint load may have replaced the buffers, a precision plugin cast them
            self.averaged.tensors.update(read_buffers(pl_module, self._dtypes, f"_{self.name}"))
        if not self.offload_to_cpu:
            self.averaged.to_(pl_module.device)
        self.averaged.bind_(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning restores global_step only after on_fit_start; from here on it is final.
        self._last_step = trainer.global_step

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Re-resolve by name: another callback may have re-registered parameters since.
        assert self.averaged is not None
        reshard_(pl_module)
        self.averaged.bind_(pl_module)

    # -- updates ---------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step  # counts optimizer steps, so gradient accumulation is handled
        if step > self._last_step:
            self._last_step = step
            if self._due_after_step(step):
                self._update(trainer, pl_module, step)
        # Epoch updates happen on the epoch's last batch, not in on_train_epoch_end: Lightning
        # validates (and ModelCheckpoint saves) before that hook, so a checkpoint would miss them.
        if batch_idx + 1 == trainer.num_training_batches and self._due_after_epoch(trainer.current_epoch, step):
            self._update(trainer, pl_module, step, on_step=False)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if math.isinf(trainer.num_training_batches) and self._due_after_epoch(trainer.current_epoch, step):
            self._update(trainer, pl_module, step, on_step=False)  # iterable data of unknown length

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, on_step: bool = True) -> None:
        assert self.averaged is not None
        weight = self._weight(self.averaged.num_updates)
        self.averaged.update_(self._weight)  # restarted tensors get the weight of their own count
        # Lightning's log() costs ~0.1 ms, and each logged float is a host-to-device copy (a sync
        # on CUDA): only pay it when the logger will write.
        if not on_step or step % max(trainer.log_every_n_steps, 1) == 0:
            pl_module.log(f"{self.name}/weight", weight, on_step=on_step, on_epoch=not on_step)
            pl_module.log(f"{self.name}/updates", float(self.averaged.num_updates), on_step=on_step, on_epoch=not on_step)

    # -- evaluation and shipping -----------------------------------------------------------
    def _hold_averaged(self, pl_module: pl.LightningModule) -> bool:
        """Put the averages into the module, keeping the raw weights; False if nothing to put."""
        if self._raw is not None or self.averaged is None or self.averaged.num_updates == 0:
            return False
        reshard_(pl_module)  # FSDP2 would otherwise go on using a gathered copy of the raw weights
        self._raw = self.averaged.snapshot()
        self.averaged.copy_to_()
        return True

    def _release_averaged(self, pl_module: pl.LightningModule) -> None:
        assert self.averaged is not None and self._raw is not None
        reshard_(pl_module)  # drop the gathered averages that evaluation left behind
        self.averaged.restore_(self._raw)
        self._raw = None

    def _sync_buffers(self, trainer: pl.Trainer) -> None:
        """Make every rank hold rank 0's buffer averages.

        Parameters are identical on every rank under DDP, but BatchNorm statistics are not:
        DDP re-broadcasts rank 0's buffers only at the next forward. Rank 0's are the canonical
        ones, so their averages are broadcast -- only when the averages are used, not every step.
        """
        if trainer.world_size > 1 and self.averaged is not None and self.averaged.buffer_names:
            tensors = self.averaged.tensors
            received = trainer.strategy.broadcast({n: tensors[n] for n in sorted(self.averaged.buffer_names)}, src=0)
            load_tensors_(tensors, received)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync_buffers(trainer)
        if self._evaluates:
            self._held_for_eval = self._hold_averaged(pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._held_for_eval:
            self._release_averaged(pl_module)
            self._held_for_eval = False

    on_test_epoch_start = on_validation_epoch_start
    on_test_epoch_end = on_validation_epoch_end

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync_buffers(trainer)
        if self._applies:
            self._hold_averaged(pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.averaged is not None
        rows = [("updates", str(self.averaged.num_updates)), ("tensors averaged", str(len(self.averaged.tensors)))]
        rows += self._summary_rows()
        if self._raw is not None:
            held = "these averaged weights"
        elif self.apply_at_end and not self._applies:
            held = "the weights of a later averaging callback"
        else:
            held = "the raw training weights"
        rows.append(("module now holds", held))
        rank_zero_info(format_table(f"{type(self).__name__} summary", rows))

    # -- BatchNorm re-estimation (SWA, Soup) -------------------------------------------------
    def bn_forward(self, pl_module: pl.LightningModule, batch: Any) -> None:
        """Run the model on one training batch for the BatchNorm pass (override for other batch types)."""
        pl_module(batch[0] if isinstance(batch, (list, tuple)) else batch)

    def _check_bn_forward(self, pl_module: pl.LightningModule, skip: str) -> None:
        """At fit start: ValueError if the BatchNorm pass would call a module that defines no forward."""
        if batchnorm_layers(pl_module) and type(self).bn_forward is _Averaging.bn_forward and not overrides(pl_module, "forward"):
            name = type(self).__name__
            raise ValueError(
                f"{name} re-estimates BatchNorm statistics at the end with `bn_forward`, which calls the module, but "
                f"{type(pl_module).__name__} defines no forward: override {name}.bn_forward(pl_module, batch) to run your "
                f"layers, or {skip} to skip the pass."
            )

    def _bn_pass(self, trainer: pl.Trainer, pl_module: pl.LightningModule, max_batches: int | None) -> int:
        """Re-estimate BatchNorm statistics for the averages the module holds, over ``max_batches``
        training batches (None: one epoch, 0: none), and store them as the buffers' averages;
        returns the batches seen. Under DDP / FSDP2 the per-rank statistics are averaged."""
        assert self.averaged is not None
        layers = batchnorm_layers(pl_module)
        if not layers or max_batches == 0:
            return 0
        precision = trainer.precision_plugin
        batches = (precision.convert_input(trainer.strategy.batch_to_device(b)) for b in trainer.train_dataloader)
        try:
            with precision.forward_context():  # the dtype and autocast the training forward ran under
                seen = update_bn_(pl_module, batches, lambda m, b: self.bn_forward(m, b), max_batches)
        except BaseException:  # leave the module as training left it: raw weights and their statistics
            self._release_averaged(pl_module)
            raise
        reshard_(pl_module)  # FSDP2: drop the copies the pass gathered; the shards hold the averages
        buffers = {n: b for n, b in pl_module.named_buffers() if n in self.averaged.tensors}
        with torch.no_grad():
            for bn in layers:  # each rank saw its own shard: agree on the mean statistics
                for stat in (bn.running_mean, bn.running_var):
                    if stat is not None:
                        stat.copy_(trainer.strategy.reduce(stat.clone(), reduce_op="mean"))
        load_tensors_(self.averaged.tensors, {n: buffers[n] for n in buffers})
        return seen

    @property
    def raw_weights(self) -> dict[str, torch.Tensor] | None:
        """The training weights while the module holds the averaged ones (after fit), else None.

        Whole tensors: under FSDP2 they are gathered (a collective: read it on every rank).
        """
        return None if self._raw is None else {n: full(t) for n, t in self._raw.items()}

    def averaged_state_dict(self) -> dict[str, torch.Tensor]:
        """The averages as whole tensors by name (zero where a sparsity mask prunes): an export helper.

        Averages of half-precision parameters are float32 (``load_state_dict`` casts them).
        Under FSDP2 every sharded average is all-gathered: call it on every rank, once, not per step.
        """
        if self.averaged is None:
            raise ValueError(f"{type(self).__name__}.averaged_state_dict() before any fit: there are no averages yet.")
        return self.averaged.full_state_dict()

    # -- checkpointing ---------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # The model state of a checkpoint is always the RAW weights, so resuming trains on
        # from them even when it was saved while the averages were swapped in.
        if self._raw is None:
            return
        assert self.averaged is not None
        if self._attached:  # FSDP2: the state is a (possibly offloaded) copy; pair by name
            checkpoint["state_dict"] = {k: self._raw[k].clone() if k in self._raw else v
                                        for k, v in checkpoint["state_dict"].items()}
            return
        by_storage = {t.data_ptr(): n for n, t in self.averaged._current.items()}
        state = dict(checkpoint["state_dict"])
        for key, value in state.items():
            name = by_storage.get(value.data_ptr())
            if name is not None:
                state[key] = self._raw[name].clone()
        checkpoint["state_dict"] = state

    def _state(self) -> dict[str, Any]:
        if self.averaged is None:  # loaded but not bound yet
            return dict(self._pending)
        state = self.averaged.state_dict()
        # Sharded averages are saved with the model (buffers); rank 0's shards alone would be wrong.
        state["tensors"] = {n: t for n, t in state["tensors"].items() if not is_sharded(t)}
        return state

    def _load_state(self, state_dict: dict[str, Any]) -> None:
        self._raw = None  # the model was (re)loaded with raw weights
        self._held_for_eval = False
        if self.averaged is None:
            self._pending = dict(state_dict)
            return
        self._pending = {}
        unknown = self.averaged.load_state_dict(state_dict)
        if unknown:
            raise ValueError(
                f"{type(self).__name__}: the checkpoint holds averages of {sorted(unknown)[:5]}, which this model "
                "does not have; resume with the model the checkpoint was trained with."
            )
