"""DataPruning: InfoBatch-style dynamic data pruning (or a static Data Diet subset) that really
shortens the epoch, on one process and under DDP.

How it attaches (see docs/reweighting.md):
- the training DataLoader is rebuilt around a ``PlanSampler`` (a DistributedSampler, so
  Lightning does not wrap it in its padding sampler): each rank iterates a disjoint, equally
  long share of the epoch's kept ids. The order is the user's: a sequential loader stays
  sequential, ``shuffle=True`` becomes DataPruning's seeded shuffle, and any other sampler is
  iterated each epoch (``set_epoch`` first) with the pruned ids left out;
- ``trainer.reload_dataloaders_every_n_epochs`` is set to 1, so Lightning re-reads the
  (shorter) length every epoch; the first load of a run is full length, so
  ``trainer.estimated_stepping_batches`` read at set-up is the full-data count on a fresh run
  and on a resumed one alike (an upper bound: LR schedules sized from it never overrun);
- the batch's dataset ids come from the plan (no index needed from the module). Each rank
  scores its own share; the shares are merged once per epoch (and before a checkpoint), so a
  step has no collective besides DDP's own. Scores, plan and counters are in the callback
  state (exact resume, also mid-epoch).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from ..core.checks import check_choice, check_int, check_real
from ..core.reweighting import PlanSampler, el2n_scores, infobatch_plan, sampler_order, static_keep
from ._base import never_acts
from ._per_sample import _PerSample
from ._strategy import data_parallel
from ._summary import format_table

__all__ = ["DataPruning"]


class DataPruning(_PerSample):
    """Train each epoch on fewer samples, chosen from their recent losses.

    Args:
        ratio: InfoBatch's prune ratio r: the share of the below-mean-loss samples dropped
            each epoch (kept ones are up-weighted by 1 / (1 - r)); for "static", the share of
            the whole dataset dropped. In [0, 1).
        anneal: "infobatch" only: final fraction of the epochs trained on the full data
            (InfoBatch: 0.125). It must leave an epoch after the first to prune.
        mode: "infobatch" (dynamic, per epoch) or "static" (Data Diet: score during the first
            ``score_epochs`` epochs, then keep the hardest 1 - ratio for the rest).
        score: "static" only: "loss" (the latest per-sample loss) or "el2n" (needs "logits"
            and "target" in the training_step dict).
        score_epochs: "static" only: epochs of full-data training that produce the scores
            (fewer than ``max_epochs``).
        seed: seed (>= 0) of the keep/drop draws and of the ``shuffle=True`` order (same on
            every rank; the plan of epoch e depends only on the scores and (seed, e)).

    Example:
        >>> trainer = Trainer(max_epochs=40, callbacks=[DataPruning(ratio=0.5)])
    """

    _global_losses = False  # the weights come from the plan; scores are merged per epoch

    def __init__(self, ratio: float = 0.5, anneal: float = 0.125, mode: Literal["infobatch", "static"] = "infobatch",
                 score: Literal["loss", "el2n"] = "loss", score_epochs: int = 1, seed: int = 0) -> None:
        self.ratio = check_real("DataPruning ratio", ratio, low=0.0, high=1.0, high_open=True,
                                fix="the share of samples pruned, e.g. 0.5")
        self.anneal = check_real("DataPruning anneal", anneal, low=0.0, high=1.0,
                                 fix="the final share of epochs on full data, e.g. 0.125")
        self.mode = check_choice("DataPruning mode", mode, ("infobatch", "static"))
        self.score = check_choice("DataPruning score", score, ("loss", "el2n"))
        self.score_epochs = check_int("DataPruning score_epochs", score_epochs, low=1)
        self.seed = check_int("DataPruning seed", seed, low=0, high=2**32 - 1,
                              fix="it is mixed with the epoch into one 64-bit generator seed")
        # A setting the chosen mode ignores is a mistake the run would hide.
        for name, value, default, used_by in (("score", score, "loss", "static"), ("score_epochs", score_epochs, 1, "static"),
                                              ("anneal", self.anneal, 0.125, "infobatch")):
            if value != default and mode != used_by:
                raise ValueError(f"DataPruning {name}={value!r} only acts with mode={used_by!r} (got mode={mode!r}): "
                                 f"drop {name} or use mode={used_by!r}.")
        if self.ratio == 0 and self.anneal != 0.125:
            raise ValueError(f"DataPruning anneal={anneal!r} has no effect with ratio={self.ratio!r} (no epoch is pruned, "
                             "so none is annealed): drop anneal, or set ratio > 0 (e.g. 0.5).")
        self._binding: tuple | None = None  # what setup replaced, to put back
        self._trainer: pl.Trainer | None = None
        self._reset()

    def _reset(self) -> None:
        self.scores: Tensor | None = None  # [N] latest score per item
        self.seen: Tensor | None = None  # [N] bool
        self._touched: Tensor | None = None  # [N] bool: scored by this rank since the last merge (DDP)
        self._plan: tuple[int, Tensor, Tensor] | None = None  # (epoch, ordered ids, weight per item)
        self._plan_rows: Tensor | None = None  # the plan's ids as [replicas, share], on the scores' device
        self._batch_ids: Tensor | None = None  # this step's global batch ids, on the scores' device
        self._module_index: Tensor | None = None  # ids a compiled step returned, checked after it
        self._observed = False  # whether this step's losses were scored
        self._static_ids: Tensor | None = None
        self._forwarded = self._skip_batches = self._batch_idx = 0
        self._started, self._from_checkpoint, self._index_checked = False, False, -1
        self._order, self._sampler, self._batch_size, self._n = "shuffle", None, 1, None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(ratio=self.ratio, mode=self.mode)

    # -- set-up: own the training sampler ---------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._unbind()  # what a fit that raised left bound (Lightning calls no teardown then)
        super().setup(trainer, pl_module, stage)
        self._check_epochs(trainer)
        self._trainer = trainer
        source = getattr(trainer.fit_loop, "_data_source", None)
        if source is None or not hasattr(source, "instance"):
            raise RuntimeError("DataPruning cannot find Lightning's training data source (unsupported Lightning version).")
        instance, reload = source.instance, trainer.reload_dataloaders_every_n_epochs
        # Lightning's own answer, in the Trainer's namespace (lightning.pytorch or pytorch_lightning).
        if source.is_module() if callable(getattr(source, "is_module", None)) else not isinstance(instance, DataLoader):
            original, previous = getattr(instance, source.name), vars(instance).get(source.name)
            setattr(instance, source.name, lambda: self._wrap(original()))  # this instance only
            self._binding = (trainer, "attr", instance, source.name, previous, reload)
        else:
            source.instance = self._wrap(instance)
            self._binding = (trainer, "loader", source, instance, None, reload)
        trainer.reload_dataloaders_every_n_epochs = 1

    def _check_epochs(self, trainer: pl.Trainer) -> None:
        """Refuse a run in which no epoch would be pruned."""
        max_epochs = trainer.max_epochs
        if not max_epochs or max_epochs < 1:
            raise ValueError("DataPruning plans per epoch and anneals over epochs: set Trainer(max_epochs=...).")
        if self.mode == "static" and self.score_epochs >= max_epochs:
            never_acts(trainer, f"DataPruning(mode='static') scores during the first score_epochs={self.score_epochs} "
                       f"epochs but max_epochs={max_epochs}, so no epoch trains on the kept subset: use score_epochs < "
                       "max_epochs.")
        if self.mode == "infobatch" and self._pruned_until(max_epochs) < 2:  # epoch 0 has no scores yet
            fixes = [f"anneal <= {math.floor((1 - 2 / max_epochs) * 1000) / 1000:g}"] if max_epochs >= 2 else []
            if self.anneal < 1:
                epochs = max(2, math.ceil(2 / (1 - self.anneal) - 1e-9))
                while self._pruned_until(epochs) < 2:
                    epochs += 1
                fixes.append(f"max_epochs >= {epochs}")
            never_acts(trainer, f"DataPruning anneal={self.anneal!r} with max_epochs={max_epochs} leaves no epoch to "
                       "prune (epoch 0 scores every sample, the last anneal share trains on full data): use "
                       f"{' or '.join(fixes) or 'a smaller anneal'}.")

    def _pruned_until(self, max_epochs: int) -> int:
        """InfoBatch prunes the epochs before this one."""
        return math.floor((1.0 - self.anneal) * max_epochs + 1e-9)

    def _unbind(self) -> None:
        if self._binding is None:
            return
        trainer, kind, owner, key, previous, reload = self._binding
        if kind == "attr":
            if previous is None:
                vars(owner).pop(key, None)
            else:
                setattr(owner, key, previous)
        else:
            owner.instance = key
        trainer.reload_dataloaders_every_n_epochs = reload
        self._binding, self._started = None, False

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if stage == "fit":
            self._unbind()

    def _wrap(self, loader: Any) -> DataLoader:
        if not isinstance(loader, DataLoader) or loader.batch_size is None or not hasattr(loader.dataset, "__len__"):
            raise ValueError("DataPruning needs one map-style torch DataLoader with a batch_size (no custom "
                             f"batch_sampler, no IterableDataset) as the training data; got {type(loader).__name__}.")
        trainer, n = self._trainer, len(loader.dataset)
        replicas, rank = data_parallel(trainer)
        self._order = self._order_of(loader.sampler, n, replicas)
        self._sampler, self._batch_size = loader.sampler, loader.batch_size
        if self.scores is None:  # on the device the losses will come from
            device = trainer.strategy.root_device
            self.scores, self.seen = torch.zeros(n, device=device), torch.zeros(n, dtype=torch.bool, device=device)
            self._touched = torch.zeros_like(self.seen)
        elif self.scores.numel() != n:
            raise ValueError(self._size_message(self.scores.numel(), n))
        self._n = n
        sampler = PlanSampler(loader.dataset, self._ids, lambda: trainer.current_epoch, replicas, rank, skip=lambda: self._skip_batches * self._batch_size)
        return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                          collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                          timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                          persistent_workers=loader.persistent_workers, prefetch_factor=loader.prefetch_factor)

    @staticmethod
    def _order_of(sampler: Any, n: int, world_size: int) -> str:
        """How an epoch's kept ids are ordered: "sequential", "shuffle" (ours, seeded) or "sampler" (the user's)."""
        if isinstance(sampler, DistributedSampler) and sampler.num_replicas > 1:
            raise ValueError(f"DataPruning splits each epoch across ranks itself, but the training DataLoader's "
                             f"DistributedSampler keeps 1/{sampler.num_replicas} of it (num_replicas="
                             f"{sampler.num_replicas}): give the DataLoader a sampler over the whole dataset "
                             "(e.g. shuffle=True).")
        if type(sampler) is SequentialSampler:
            return "sequential"
        if type(sampler) is RandomSampler and not sampler.replacement and sampler.num_samples == n:
            return "shuffle"
        if world_size > 1 and not callable(getattr(sampler, "set_epoch", None)):
            raise ValueError(f"DataPruning iterates the training sampler on every rank, and a {type(sampler).__name__} "
                             "without set_epoch(epoch) cannot be shown to give each rank the same order: add a "
                             "set_epoch that seeds its draws from the epoch, or use shuffle=True (DataPruning's "
                             "seeded shuffle).")
        return "sampler"

    def _size_message(self, held: int, n: int) -> str:
        if self._from_checkpoint:
            return (f"DataPruning: the checkpoint holds scores for {held} samples but the training dataset has {n}: "
                    "resume on the checkpoint's dataset, or start a new fit (without ckpt_path) for another one.")
        return (f"DataPruning: the training dataset had {held} samples and now has {n}: it scores samples by index "
                "and needs the same dataset every epoch of a fit.")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._to_device(pl_module.device)

    def _to_device(self, device: torch.device) -> None:
        if self.scores is not None:
            self.scores, self.seen = self.scores.to(device), self.seen.to(device)
            self._touched = torch.zeros_like(self.seen)
        if self._plan is not None:
            self._plan = (self._plan[0], self._plan[1], self._plan[2].to(device))
        self._lay_out_plan()

    def _lay_out_plan(self) -> None:
        """Row r of ``_plan_rows`` is replica r's share of the plan, on the scores' device: a step's
        global-batch ids are then one slice of it, with no host-to-device copy (which would
        synchronise the stream on CUDA) per step. Made when a plan is drawn or moved."""
        if self._plan is None or self.scores is None or self._trainer is None:
            self._plan_rows = None
            return
        ids, replicas = self._plan[1], data_parallel(self._trainer)[0]
        usable = ids.numel() // replicas * replicas
        self._plan_rows = ids[:usable].reshape(-1, replicas).t().contiguous().to(self.scores.device)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Set-up read the full-length loader (estimated_stepping_batches); from now on each
        # epoch's loader follows the plan. A mid-epoch resume skips the batches already done.
        self._started = True
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        self._skip_batches = progress.ready if trainer.fit_loop.restarted_mid_epoch else 0  # Lightning resumes at batch `ready`
        trainer.fit_loop._last_train_dl_reload_epoch = float("-inf")  # re-read the loader before the first epoch

    # -- the plan ----------------------------------------------------------------------------
    def _generator(self, epoch: int, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 7919 + salt)

    def _ids(self, epoch: int) -> Tensor:
        """Ordered ids of ``epoch``'s plan (the full data before training starts)."""
        assert self.scores is not None
        n = self.scores.numel()
        if not self._started:  # only its length is read (estimated_stepping_batches)
            full = len(self._sampler) if self._order == "sampler" and hasattr(self._sampler, "__len__") else n
            return torch.arange(full) % n
        if self._plan is None or self._plan[0] != epoch:
            weights = torch.ones(n)
            if self.mode == "infobatch" and epoch < self._pruned_until(self._trainer.max_epochs):
                ids, weights = infobatch_plan(self.scores, self.seen, self.ratio, self._generator(epoch, 0))
            elif self.mode == "static" and epoch >= self.score_epochs:
                if self._static_ids is None:
                    scores = torch.where(self.seen, self.scores, float("-inf")).cpu()
                    self._static_ids = static_keep(scores, 1.0 - self.ratio)
                ids = self._static_ids
            else:
                ids = torch.arange(n)
            if self._order == "shuffle":
                ids = ids[torch.randperm(ids.numel(), generator=self._generator(epoch, 1))]
            elif self._order == "sampler":  # the user's order (repeats included), pruned ids left out
                kept = torch.zeros(n, dtype=torch.bool)
                kept[ids] = True
                order = sampler_order(self._sampler, epoch, n)
                ids = order[kept[order]]
            # Equal shares per rank; and no last batch of a single sample (BatchNorm cannot train on
            # it): then each rank leaves its last sample for a later epoch.
            replicas = data_parallel(self._trainer)[0]
            per_rank = ids.numel() // replicas
            per_rank -= 1 if per_rank > 1 and per_rank % self._batch_size == 1 else 0
            ids = ids[: per_rank * replicas]
            self._plan = (epoch, ids, weights.to(self.scores.device))
            self._lay_out_plan()
            if epoch < self._trainer.max_epochs:  # Lightning may read the loader once more after the last epoch
                rank_zero_info(f"DataPruning: epoch {epoch} trains on {ids.numel()} of {n} samples ({ids.numel() / n:.1%}).")
        return self._plan[1]

    # -- per step ----------------------------------------------------------------------------
    # The training step (which the user may have compiled) reads tensors only: everything that
    # depends on the batch's position is decided here, before it, so no guard of a compiled
    # step sees a batch index or an epoch; counting and deferred checks come after it.
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch_idx = batch_idx
        self._ids(trainer.current_epoch)  # the epoch's plan (drawn when its loader started)
        assert self._plan_rows is not None
        start = batch_idx * self._batch_size
        # replicas' batches in rank order; a copy, not a view: a compiled step would guard on the
        # size of the view's base (the epoch's plan), and recompile when an epoch is shorter
        self._batch_ids = self._plan_rows[:, start:start + self._batch_size].reshape(-1).clone()
        self._module_index, self._observed = None, False

    def _check_batch(self, trainer: pl.Trainer, losses: Tensor, index: Tensor | None) -> None:
        size = self._batch_ids.numel() // data_parallel(trainer)[0]  # this rank's batch, from the plan: no host sync
        if losses.numel() != size:
            raise ValueError(f"DataPruning: training_step returned {losses.numel()} per-sample losses for a batch of {size} "
                             "samples: return one loss per sample in batch order (e.g. average augmented views per "
                             "sample: losses.view(views, -1).mean(0)).")
        if index is None:
            return
        if torch.compiler.is_compiling():
            self._module_index = index  # compared after the step, outside the compiled region
        else:
            self._check_index(trainer, index)

    def _check_index(self, trainer: pl.Trainer, index: Tensor) -> None:
        """The module's ids against the plan's, once per epoch (comparing values is a host sync)."""
        if self._index_checked == trainer.current_epoch:
            return
        self._index_checked = trainer.current_epoch
        (world, rank), ids = data_parallel(trainer), self._plan[1]
        share, start = ids.numel() // world, self._batch_idx * self._batch_size
        drawn = ids[rank:share * world:world][start:start + index.numel()]
        got = index.detach().long().cpu()
        if not torch.equal(got, drawn):
            raise ValueError(f"DataPruning: training_step's 'index' {got[:4].tolist()}... is not the dataset ids "
                             f"{drawn[:4].tolist()}... of the batch its sampler drew: return each sample's index in "
                             "the training dataset, or no index (DataPruning knows the ids).")

    def _global_index(self, trainer: pl.Trainer, batch_size: int) -> Tensor:
        return self._batch_ids

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._observed:
            self._forwarded += self._batch_ids.numel()  # every replica forwards an equal share
        if self._module_index is not None:
            index, self._module_index = self._module_index, None
            self._check_index(trainer, index)

    def _weights(self, trainer: pl.Trainer, pl_module: pl.LightningModule, losses: Tensor,
                 index: Tensor | None) -> Tensor | None:
        assert self._plan is not None and index is not None
        return self._plan[2][index] if self.ratio > 0 else None

    def _observe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, losses: Tensor, index: Tensor | None,
                 extra: dict[str, Tensor]) -> None:
        assert index is not None and self.scores is not None
        values = losses
        if self.mode == "static" and self.score == "el2n":
            if "logits" not in extra or "target" not in extra:
                raise ValueError("DataPruning(score='el2n') needs 'logits' and 'target' in the dict training_step "
                                 "returns (besides the per-sample 'loss').")
            values = el2n_scores(extra["logits"], extra["target"])
        self.scores[index] = values.to(self.scores.dtype)
        self.seen[index] = True
        if self._touched is not None:
            self._touched[index] = True
        self._observed = True  # counted after the step

    def _merge(self) -> None:
        """Give every rank the scores all ranks wrote since the last merge (a collective).

        The ranks' shares are disjoint unless the user's sampler repeats an id: an id scored on
        several ranks gets the mean of their scores (exactly the score when one rank wrote it).
        """
        trainer = self._trainer
        if trainer is None or trainer.world_size < 2 or self._touched is None or self.scores is None:
            return
        count = trainer.strategy.reduce(self._touched.float(), reduce_op="sum")
        values = trainer.strategy.reduce(self.scores * self._touched, reduce_op="sum")
        self.scores = torch.where(count > 0, values / count.clamp_min(1), self.scores)
        self.seen |= count > 0
        self._touched.zero_()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._merge()  # before the next epoch's plan is drawn
        self._skip_batches = 0
        if self._plan is not None and self.scores is not None:
            pl_module.log("data_pruning/kept_fraction", self._plan[1].numel() / self.scores.numel(), on_epoch=True)
        pl_module.log("data_pruning/forwarded", float(self._forwarded), on_epoch=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n = 0 if self.scores is None else self.scores.numel()
        full = n * trainer.current_epoch
        rows = [("mode", f"{self.mode} (ratio {self.ratio}, anneal {self.anneal})"),
                ("samples forwarded", f"{self._forwarded} of {full} for full epochs ({self._forwarded / max(full, 1):.1%})")]
        rank_zero_info(format_table("DataPruning summary", rows))

    def _state(self) -> dict[str, Any]:
        # Lightning builds a checkpoint on every rank, so a mid-epoch one can merge first (and
        # resume exactly); the end-of-epoch merge then finds the same scores.
        if self._started:
            self._merge()
        plan = None if self._plan is None else (self._plan[0], self._plan[1], self._plan[2].cpu())
        return {"scores": None if self.scores is None else self.scores.cpu(), "seen": None if self.seen is None else self.seen.cpu(),
                "plan": plan, "static_ids": self._static_ids, "forwarded": self._forwarded}

    def _load_state(self, state: dict[str, Any]) -> None:
        scores = state["scores"]
        self._from_checkpoint = True
        if scores is not None and self._n is not None and scores.numel() != self._n:  # a loader handed to fit
            raise ValueError(self._size_message(scores.numel(), self._n))
        self.scores, self.seen = scores, state["seen"]
        plan = state["plan"]
        self._plan = None if plan is None else (int(plan[0]), plan[1], plan[2])
        self._static_ids, self._forwarded = state["static_ids"], int(state["forwarded"])
        if self._binding is not None:  # some strategies restore after on_fit_start
            self._to_device(self._trainer.strategy.root_device)
