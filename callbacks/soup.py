"""Soup: the uniform average of the weights at k epoch ends of a run (the last k, or the k best by
a metric): a "model soup" of one run, offline SWA for any run. ``_Averaging`` gives the validation
swaps, the checkpoints' raw model state, the end-of-fit swap and summary. The snapshots are one
``[keep, *shape]`` stack per averaged tensor in the callback state (under FSDP2 a DTensor buffer
``<param>_soup_kept`` sharded like the parameter). The soup is recomputed from them at each change,
by the rules of ``core.merging.merge(kept, "uniform")`` but in place on the local shards (merge
builds new whole states and syncs per tensor): no running sum drifts, a resume is bit-identical.
A tensor whose average was restarted (QAT's scales when quantization starts) is the mean of the
snapshots taken after the restart only, and keeps its restart value until there is one.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

from ..core.averaging import attach_buffers_, load_tensors_, read_buffers, reshard_
from ..core.averaging.sharded import shard_view
from ..core.checks import check_choice, check_int, check_real
from ..core.distributed import is_sharded
from ..core.schedules import resolve_step
from ._averaging import _Averaging
from ._base import never_acts, run_length

__all__ = ["Soup"]

MAX_KEEP = 1000
_KEPT = "_soup_kept"  # suffix of the buffers holding sharded stacks (FSDP2)


def _stack(like: Tensor, keep: int) -> Tensor:
    """``keep`` zero slots shaped like ``like`` along a new leading dim; for a DTensor, a DTensor
    sharded like it (shard dim moved one up): slot i of the local stack is this rank's part of
    snapshot i."""
    local = shard_view(like)
    stack = torch.zeros((keep, *local.shape), dtype=local.dtype, device=local.device)
    if not is_sharded(like):
        return stack
    placements = [Shard(p.dim + 1) if isinstance(p, Shard) else p for p in like.placements]
    shape = torch.Size((keep, *like.shape))
    return DTensor.from_local(stack, like.device_mesh, placements, run_check=False, shape=shape,
                              stride=torch.empty(shape, device="meta").stride())


class Soup(_Averaging):
    """Uniform average of the weights at k epoch ends: the last k, or the k best by a metric.

    From ``start`` on, the weights after every ``every_n_epochs``-th epoch are a candidate.
    Without ``monitor`` the last ``keep`` candidates are kept (a window sliding over the run);
    with it the ``keep`` best: a candidate replaces the worst kept one when strictly better
    (the oldest of equally bad ones goes; NaN ranks last), scored when the validation that ends
    its epoch ends, with the metric averaged over ranks so every rank decides alike. When fit
    ends the module holds the mean of the kept snapshots, on the current sparsity masks, with
    BatchNorm statistics re-estimated over one epoch like SWA's (``bn_forward`` runs a batch;
    a subclass may set ``bn_batches``, 0 to skip). Fewer than ``keep`` snapshots is a warning.

    Args:
        keep: snapshots kept and averaged, in [1, 1000]; each is one more copy of the weights.
        monitor: None keeps the last ``keep``; the name of a metric logged in validation
            (``self.log("val_acc", acc, sync_dist=True)``) keeps the ``keep`` best by it.
        mode: with ``monitor``, "max" (an accuracy) or "min" (a loss); required then, refused without.
        every_n_epochs: a candidate after every n-th epoch.
        start: no candidate before it: a float in [0, 1) is a fraction of the run's optimizer
            steps, an int an optimizer step (as SWA's).
        offload_to_cpu: keep the snapshots and the soup in host memory.
        evaluate_averaged: validate the soup; None: yes without ``monitor``, no with it (the
            metric must score each epoch's own weights, so True is refused with ``monitor``).
        apply_at_end: leave the soup in the module when fit ends.

    Example:
        >>> trainer = Trainer(max_epochs=30, callbacks=[Soup(keep=5, start=0.5)])
        >>> trainer = Trainer(max_epochs=30, callbacks=[Soup(keep=5, monitor="val_acc", mode="max")])
    """

    name = "soup"
    bn_batches: int | None = None  # batches of the end-of-fit BatchNorm pass (None: one epoch, 0: none)

    def __init__(
        self,
        keep: int = 5,
        monitor: str | None = None,
        mode: Literal["max", "min"] | None = None,
        every_n_epochs: int = 1,
        start: int | float = 0.5,
        offload_to_cpu: bool = True,
        evaluate_averaged: bool | None = None,
        apply_at_end: bool = True,
    ) -> None:
        keep = check_int("Soup keep", keep, low=1, high=MAX_KEEP, fix="the number of epoch snapshots to average, e.g. 5")
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ValueError(f"Soup monitor={monitor!r} must name a metric logged in validation, such as 'val_acc', "
                             "or be None to keep the last `keep` snapshots.")
        if mode is not None:
            mode = check_choice("Soup mode", mode, ("max", "min"))
        if (monitor is None) != (mode is None):
            raise ValueError(f"Soup mode={mode!r} with monitor={monitor!r}: " + (
                "say which is better, mode='max' (an accuracy) or mode='min' (a loss)." if mode is None else
                "mode has no effect without a metric to rank by (the last `keep` are kept); name one or drop mode."))
        every_n_epochs = check_int("Soup every_n_epochs", every_n_epochs, low=1, fix="1 takes a candidate every epoch")
        if isinstance(start, float):
            start = check_real("Soup start", start, low=0.0, high=1.0, high_open=True,
                               fix="a float is a fraction of training; pass an int for an optimizer step")
        else:
            start = check_int("Soup start", start, low=0, fix="an int is an optimizer step; a float in [0, 1) a fraction")
        if evaluate_averaged is True and monitor is not None:
            raise ValueError(f"Soup evaluate_averaged=True with monitor={monitor!r}: validation would score the soup, "
                             "not the epoch's weights the metric ranks; pass evaluate_averaged=False (or None).")
        super().__init__(monitor is None if evaluate_averaged is None else evaluate_averaged, apply_at_end, offload_to_cpu)
        self.keep, self.monitor, self.mode, self.every_n_epochs, self.start = keep, monitor, mode, every_n_epochs, start
        self._start_step = start if isinstance(start, int) else 0
        self._kept: dict[str, Tensor] = {}  # name -> [keep, *shape] stack of snapshots
        self._kept_dtypes: dict[str, torch.dtype] = {}  # of the sharded stacks (FSDP2 buffers)
        self._slots: list[dict[str, Any]] = []  # the kept snapshots, oldest first: slot, epoch, step, score
        self._candidates = 0  # epochs offered to the soup in this fit
        self._bn_seen = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(keep=self.keep, monitor=self.monitor, every_n_epochs=self.every_n_epochs,
                                        start=self.start)

    def _bind(self, pl_module: pl.LightningModule) -> None:
        pending, self._pending = self._pending, {}  # loaded once the stacks exist
        super()._bind(pl_module)
        assert self.averaged is not None
        self._kept = {n: _stack(t, self.keep) for n, t in self.averaged.tensors.items()}
        sharded = {n: t for n, t in self._kept.items() if is_sharded(t)}
        self._kept_dtypes = {n: t.dtype for n, t in sharded.items()}
        self._attached += attach_buffers_(pl_module, sharded, _KEPT)
        self._slots, self._candidates = [], 0
        if pending:
            self._load_state(pending)

    def track_(self, pl_module: pl.LightningModule) -> list[str]:
        new = super().track_(pl_module)
        if not new:
            return new
        assert self.averaged is not None
        stacks = {n: _stack(self.averaged.tensors[n], self.keep) for n in new}  # snapshot slots for them too
        self._kept.update(stacks)
        sharded = {n: t for n, t in stacks.items() if is_sharded(t)}
        self._kept_dtypes.update({n: t.dtype for n, t in sharded.items()})
        self._attached += attach_buffers_(pl_module, sharded, _KEPT)
        return new

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        others = [type(c).__name__ for c in trainer.callbacks if isinstance(c, _Averaging) and c is not self
                  and c.evaluate_averaged]
        if self.monitor is not None and others:
            rank_zero_warn(f"Soup monitor={self.monitor!r} ranks the weights validation ran on, but {others[-1]} "
                           "validates its average: set evaluate_averaged=False there to rank this run's own weights.")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self._kept_dtypes:  # a checkpoint load may have replaced the buffers, a precision plugin cast them
            self._kept.update(read_buffers(pl_module, self._kept_dtypes, _KEPT))
        if not self.offload_to_cpu:
            self._kept = {n: t if is_sharded(t) else t.to(pl_module.device) for n, t in self._kept.items()}
        total = run_length(trainer)
        self._start_step = resolve_step(self.start, total, "Soup start") if isinstance(self.start, float) else self.start
        epochs = self._candidate_epochs(trainer, total)
        if epochs == []:
            never_acts(trainer, f"Soup start={self.start} (optimizer step {self._start_step}), every_n_epochs="
                       f"{self.every_n_epochs}: no epoch of this run ({total} steps, max_epochs={trainer.max_epochs}) "
                       "ends after the start; start earlier, lower every_n_epochs or train longer.")
        check_val = trainer.check_val_every_n_epoch
        if self.monitor is not None and (trainer.limit_val_batches == 0 or not check_val or self.every_n_epochs % check_val):
            raise ValueError(f"Soup monitor={self.monitor!r} scores each candidate when its epoch's validation ends, but "
                             f"check_val_every_n_epoch={check_val}, limit_val_batches={trainer.limit_val_batches} and "
                             f"every_n_epochs={self.every_n_epochs} leave some without: validate every candidate epoch.")
        if self.apply_at_end and self.bn_batches != 0:
            self._check_bn_forward(pl_module, "subclass Soup with bn_batches = 0")
        what = f"the {self.keep} best by {self.monitor} ({self.mode})" if self.monitor else f"the last {self.keep}"
        count = "" if epochs is None else f"; {len(epochs)} candidate epoch(s) in this run"
        rank_zero_info(f"Soup: averaging {what} of the weights after every {self.every_n_epochs} epoch(s) from "
                       f"optimizer step {self._start_step}{count}.")

    def _candidate_epochs(self, trainer: pl.Trainer, total: int | None) -> list[int] | None:
        """The epochs of this run that end with a candidate; None when the epoch length is unknown."""
        batches, epochs = trainer.num_training_batches, trainer.max_epochs
        if total is None or not epochs or epochs < 0 or not math.isfinite(batches):
            return None
        per_epoch = max(1, math.ceil(batches / trainer.accumulate_grad_batches))
        return [e for e in range(min(epochs, math.ceil(total / per_epoch)))
                if (e + 1) % self.every_n_epochs == 0 and min((e + 1) * per_epoch, total) > self._start_step]

    # -- candidates ------------------------------------------------------------------------
    def _due_after_epoch(self, epoch: int, step: int) -> bool:
        return self.monitor is None and step > self._start_step and (epoch + 1) % self.every_n_epochs == 0

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, on_step: bool = True) -> None:
        self._add(trainer, pl_module, None)  # the last batch of a due epoch (_Averaging.on_train_batch_end)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is None or trainer.state.fn != "fit":
            return
        if trainer.sanity_checking:  # a missing metric is a ValueError before the first training batch
            self._metric(trainer)
            return
        epoch, step = trainer.current_epoch, trainer.global_step
        # The validation that ends the epoch scores it (not one within it: val_check_interval < 1).
        if (trainer.fit_loop.epoch_loop.batch_progress.is_last_batch and step > self._start_step
                and (epoch + 1) % self.every_n_epochs == 0):
            self._add(trainer, pl_module, float(trainer.strategy.reduce(self._metric(trainer), reduce_op="mean")))

    def _metric(self, trainer: pl.Trainer) -> Tensor:
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            raise ValueError(f"Soup monitor={self.monitor!r} is not a logged metric (logged: {sorted(metrics)}): log it "
                             f"in validation, e.g. self.log({self.monitor!r}, value, sync_dist=True), or monitor one of those.")
        return torch.as_tensor(metrics[self.monitor]).detach().float().clone()  # reduce() works in place

    def _rank(self, score: float) -> float:
        """Larger is better; NaN is the worst."""
        return -math.inf if math.isnan(score) else score if self.mode == "max" else -score

    @torch.no_grad()
    def _add(self, trainer: pl.Trainer, pl_module: pl.LightningModule, score: float | None) -> None:
        """Offer the current weights: into a free slot, else in place of the oldest (last k) or of
        the worst kept one if strictly better (top k); then recompute the soup."""
        assert self.averaged is not None
        self._candidates += 1
        if len(self._slots) < self.keep:
            slot = min(set(range(self.keep)) - {s["slot"] for s in self._slots})
        elif score is None:
            slot = self._slots[0]["slot"]
        else:
            worst = min(self._slots, key=lambda s: self._rank(s["score"]))  # the oldest of equally bad ones
            if self._rank(score) <= self._rank(worst["score"]):
                return
            slot = worst["slot"]
        self._slots = [s for s in self._slots if s["slot"] != slot]
        self._slots.append({"slot": slot, "epoch": trainer.current_epoch, "step": trainer.global_step, "score": score,
                            "update": self.averaged.num_updates})  # tells snapshots from before a restart
        reshard_(pl_module)  # FSDP2 after validation: read the shards, not a gathered copy
        current = self.averaged._current
        load_tensors_({n: shard_view(t)[slot] for n, t in self._kept.items()}, {n: shard_view(current[n]) for n in self._kept})
        names = sorted(self.averaged.buffer_names)
        if trainer.world_size > 1 and names:  # BatchNorm statistics differ per rank: keep rank 0's, as DDP does
            received = trainer.strategy.broadcast({n: shard_view(self._kept[n])[slot].clone() for n in names}, src=0)
            load_tensors_({n: shard_view(self._kept[n])[slot] for n in names}, received)
        self._recompute()
        self.averaged.num_updates += 1

    @torch.no_grad()
    def _recompute(self) -> None:
        """The soup, in place and shard-local: the kept snapshots' sum, oldest first, over their number
        (for a restarted tensor, of those taken since its restart; none: it keeps its restart value).
        Integer buffers come from the oldest, as in ``core.merging.merge(kept, "uniform")``."""
        assert self.averaged is not None
        order, tensors, restarted = [s["slot"] for s in self._slots], self.averaged.tensors, self.averaged.restarted
        update = {s["slot"]: s["update"] for s in self._slots}
        floats = [n for n, t in tensors.items() if t.is_floating_point()]
        for since in sorted({restarted.get(n, 0) for n in floats}):
            names, slots = [n for n in floats if restarted.get(n, 0) == since], [s for s in order if update[s] >= since]
            if not slots:
                continue
            out, stacks = [shard_view(tensors[n]) for n in names], [shard_view(self._kept[n]) for n in names]
            torch._foreach_copy_(out, [s[slots[0]] for s in stacks])
            for slot in slots[1:]:
                torch._foreach_add_(out, [s[slot] for s in stacks])
            torch._foreach_div_(out, float(len(slots)))
        load_tensors_({n: shard_view(tensors[n]) for n in tensors if n not in floats},
                      {n: shard_view(self._kept[n])[order[0]] for n in tensors if n not in floats})

    # -- the end and the state -------------------------------------------------------------
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync_buffers(trainer)
        if len(self._slots) < self.keep:
            rank_zero_warn(f"Soup(keep={self.keep}) got {len(self._slots)} snapshot(s) ({self._candidates} candidate "
                           f"epoch(s) after optimizer step {self._start_step}, every {self.every_n_epochs}): the soup "
                           f"averages {len(self._slots)}. Train longer, start earlier or lower keep.")
        if self._applies and self._hold_averaged(pl_module):
            self._bn_seen = self._bn_pass(trainer, pl_module, self.bn_batches)

    def _summary_rows(self) -> list[tuple[str, str]]:
        kept = ", ".join(f"{s['epoch']}" + ("" if s["score"] is None else f" ({s['score']:.4g})") for s in self._slots)
        return [("kept epochs" + (f" ({self.monitor})" if self.monitor else ""), kept or "none"),
                ("candidates / start step", f"{self._candidates} / {self._start_step}"),
                ("BatchNorm pass batches", str(self._bn_seen))]

    def _state(self) -> dict[str, Any]:
        state = super()._state()
        if self.averaged is None:  # loaded but not bound yet: the pending state as loaded
            return state
        # Sharded stacks are saved with the model (buffers); rank 0's shards alone would be wrong.
        state["kept"] = {n: t for n, t in self._kept.items() if not is_sharded(t)}
        state["slots"] = [{k: s[k] for k in ("slot", "epoch", "step", "update")} for s in self._slots]
        if self.monitor is not None:  # a tensor: compared to float tolerance across strategies, exact on resume
            state["scores"] = torch.tensor([s["score"] for s in self._slots], dtype=torch.float64)
        state["candidates"] = self._candidates
        return state

    def _load_state(self, state_dict: dict[str, Any]) -> None:
        if self.averaged is None:
            super()._load_state(state_dict)  # kept whole until the next binding
            return
        super()._load_state({k: v for k, v in state_dict.items() if k not in ("kept", "slots", "scores", "candidates")})
        kept = state_dict.get("kept", {})
        unknown = sorted(set(kept) - set(self._kept))
        if unknown:
            raise ValueError(f"Soup: the checkpoint holds snapshots of {unknown[:5]}, which this model does not have; "
                             "resume with the model the checkpoint was trained with.")
        load_tensors_(self._kept, kept)
        scores = state_dict.get("scores")
        self._slots = [{"update": 0, **s, "score": None if scores is None else float(scores[i])}  # no restarts before
                       for i, s in enumerate(state_dict.get("slots", []))]
        self._candidates = int(state_dict.get("candidates", 0))
