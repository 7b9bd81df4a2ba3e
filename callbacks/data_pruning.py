"""DataPruning: InfoBatch-style dynamic data pruning (or a static Data Diet subset) that really
shortens the epoch, on one process and under DDP.

How it attaches (see docs/reweighting.md):
- the training DataLoader is rebuilt around a ``PlanSampler`` (a DistributedSampler, so
  Lightning does not wrap it in its padding sampler): each rank iterates a disjoint, equally
  long share of the epoch's kept ids;
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
from torch.utils.data import DataLoader, SequentialSampler

from ..core.reweighting import PlanSampler, el2n_scores, infobatch_plan, static_keep
from ._per_sample import _PerSample
from ._summary import format_table

__all__ = ["DataPruning"]


class DataPruning(_PerSample):
    """Train each epoch on fewer samples, chosen from their recent losses.

    Args:
        ratio: InfoBatch's prune ratio r: the share of the below-mean-loss samples dropped
            each epoch (kept ones are up-weighted by 1 / (1 - r)); for "static", the share of
            the whole dataset dropped. In [0, 1).
        anneal: final fraction of the epochs trained on the full data (InfoBatch: 0.125).
        mode: "infobatch" (dynamic, per epoch) or "static" (Data Diet: score during the first
            ``score_epochs`` epochs, then keep the hardest 1 - ratio for the rest).
        score: static mode's score: "loss" (the latest per-sample loss) or "el2n" (needs
            "logits" and "target" in the training_step dict).
        score_epochs: static mode: epochs of full-data training that produce the scores.
        seed: seed of the keep/drop draws and of the shuffle (same on every rank; the plan of
            epoch e depends only on the scores and (seed, e)).

    Example:
        >>> trainer = Trainer(max_epochs=40, callbacks=[DataPruning(ratio=0.5)])
    """

    _global_losses = False  # the weights come from the plan; scores are merged per epoch

    def __init__(self, ratio: float = 0.5, anneal: float = 0.125, mode: Literal["infobatch", "static"] = "infobatch",
                 score: Literal["loss", "el2n"] = "loss", score_epochs: int = 1, seed: int = 0) -> None:
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"ratio={ratio} must lie in [0, 1): it is the share of samples pruned.")
        if not 0.0 <= anneal <= 1.0:
            raise ValueError(f"anneal={anneal} must lie in [0, 1]: the final share of epochs on full data.")
        if mode not in ("infobatch", "static"):
            raise ValueError(f"mode={mode!r} must be 'infobatch' or 'static'.")
        if score not in ("loss", "el2n"):
            raise ValueError(f"score={score!r} must be 'loss' or 'el2n'.")
        if score_epochs < 1:
            raise ValueError(f"score_epochs={score_epochs} must be >= 1.")
        self.ratio, self.anneal, self.mode, self.score, self.score_epochs, self.seed = ratio, anneal, mode, score, score_epochs, seed
        self.scores: Tensor | None = None  # [N] latest score per item
        self.seen: Tensor | None = None  # [N] bool
        self._touched: Tensor | None = None  # [N] bool: scored by this rank since the last merge (DDP)
        self._plan: tuple[int, Tensor, Tensor] | None = None  # (epoch, ordered ids, weight per item)
        self._static_ids: Tensor | None = None
        self._forwarded = self._skip_batches = self._batch_idx = 0
        self._started, self._shuffle, self._batch_size = False, True, 1
        self._restore: tuple | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(ratio=self.ratio, mode=self.mode)

    # -- set-up: own the training sampler ---------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or self._restore is not None:
            return
        if not trainer.max_epochs or trainer.max_epochs < 1:
            raise ValueError("DataPruning plans per epoch and anneals over epochs: set Trainer(max_epochs=...).")
        self._trainer = trainer
        source = getattr(trainer.fit_loop, "_data_source", None)
        if source is None or not hasattr(source, "instance"):
            raise RuntimeError("DataPruning cannot find Lightning's training data source (unsupported Lightning version).")
        instance = source.instance
        if isinstance(instance, (pl.LightningModule, pl.LightningDataModule)):
            original = getattr(instance, source.name)
            setattr(instance, source.name, lambda: self._wrap(original()))  # this instance only
            self._restore = ("attr", instance, source.name, trainer.reload_dataloaders_every_n_epochs)
        else:
            source.instance = self._wrap(instance)
            self._restore = ("loader", source, instance, trainer.reload_dataloaders_every_n_epochs)
        trainer.reload_dataloaders_every_n_epochs = 1

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if stage != "fit" or self._restore is None:
            return
        kind, owner, key, reload = self._restore
        if kind == "attr":
            delattr(owner, key)
        else:
            owner.instance = key
        trainer.reload_dataloaders_every_n_epochs = reload
        self._restore, self._started = None, False

    def _wrap(self, loader: Any) -> DataLoader:
        if not isinstance(loader, DataLoader) or loader.batch_size is None or not hasattr(loader.dataset, "__len__"):
            raise ValueError("DataPruning needs one map-style torch DataLoader with a batch_size (no custom "
                             f"batch_sampler, no IterableDataset) as the training data; got {type(loader).__name__}.")
        n = len(loader.dataset)
        if self.scores is None:  # on the device the losses will come from
            device = self._trainer.strategy.root_device
            self.scores, self.seen = torch.zeros(n, device=device), torch.zeros(n, dtype=torch.bool, device=device)
            self._touched = torch.zeros_like(self.seen)
        elif self.scores.numel() != n:
            raise ValueError(f"DataPruning holds scores for {self.scores.numel()} samples but the dataset has {n}.")
        self._shuffle = not isinstance(loader.sampler, SequentialSampler)
        self._batch_size = loader.batch_size
        trainer = self._trainer
        sampler = PlanSampler(loader.dataset, self._ids, lambda: trainer.current_epoch, trainer.world_size,
                              trainer.global_rank, skip=lambda: self._skip_batches * self._batch_size)
        return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                          collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                          timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                          persistent_workers=loader.persistent_workers, prefetch_factor=loader.prefetch_factor)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        device = pl_module.device
        if self.scores is not None:
            self.scores, self.seen = self.scores.to(device), self.seen.to(device)
            self._touched = torch.zeros_like(self.seen)
        if self._plan is not None:
            self._plan = (self._plan[0], self._plan[1], self._plan[2].to(device))

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
        if not self._started:
            return torch.arange(n)
        if self._plan is None or self._plan[0] != epoch:
            weights = torch.ones(n)
            if self.mode == "infobatch" and epoch < math.floor((1.0 - self.anneal) * self._trainer.max_epochs + 1e-9):
                ids, weights = infobatch_plan(self.scores, self.seen, self.ratio, self._generator(epoch, 0))
            elif self.mode == "static" and epoch >= self.score_epochs:
                if self._static_ids is None:
                    scores = torch.where(self.seen, self.scores, float("-inf")).cpu()
                    self._static_ids = static_keep(scores, 1.0 - self.ratio)
                ids = self._static_ids
            else:
                ids = torch.arange(n)
            if self._shuffle:
                ids = ids[torch.randperm(ids.numel(), generator=self._generator(epoch, 1))]
            # Equal shares per rank; and no last batch of a single sample (BatchNorm cannot train on
            # it): then each rank leaves its last sample for a later epoch.
            per_rank = ids.numel() // self._trainer.world_size
            per_rank -= 1 if per_rank > 1 and per_rank % self._batch_size == 1 else 0
            ids = ids[: per_rank * self._trainer.world_size]
            self._plan = (epoch, ids, weights.to(self.scores.device))
            if epoch < self._trainer.max_epochs:  # Lightning may read the loader once more after the last epoch
                rank_zero_info(f"DataPruning: epoch {epoch} trains on {ids.numel()} of {n} samples ({ids.numel() / n:.1%}).")
        return self._plan[1]

    # -- per step ----------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch_idx = batch_idx

    def _global_index(self, trainer: pl.Trainer, batch_size: int) -> Tensor:
        ids = self._ids(trainer.current_epoch)
        world = trainer.world_size
        usable = ids.numel() // world * world
        start = self._batch_idx * self._batch_size
        parts = [ids[r:usable:world][start:start + batch_size] for r in range(world)]
        return torch.cat(parts).to(self.scores.device)

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
        self._forwarded += index.numel() * trainer.world_size  # every rank forwards an equal share

    def _merge(self) -> None:
        """Give every rank the scores all ranks wrote since the last merge (a collective).

        The ranks' shares are disjoint, so a sum of masked scores is exact.
        """
        trainer = self._trainer
        if trainer.world_size < 2 or self._touched is None or self.scores is None:
            return
        mask = trainer.strategy.reduce(self._touched.float(), reduce_op="sum") > 0
        values = trainer.strategy.reduce(self.scores * self._touched, reduce_op="sum")
        self.scores = torch.where(mask, values, self.scores)
        self.seen |= mask
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

    def state_dict(self) -> dict[str, Any]:
        # Lightning builds a checkpoint on every rank, so a mid-epoch one can merge first (and
        # resume exactly); the end-of-epoch merge then finds the same scores.
        if self._started:
            self._merge()
        plan = None if self._plan is None else (self._plan[0], self._plan[1], self._plan[2].cpu())
        return {"scores": None if self.scores is None else self.scores.cpu(), "seen": None if self.seen is None else self.seen.cpu(),
                "plan": plan, "static_ids": self._static_ids, "forwarded": self._forwarded}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scores, self.seen = state_dict["scores"], state_dict["seen"]
        plan = state_dict["plan"]
        self._plan = None if plan is None else (int(plan[0]), plan[1], plan[2])
        self._static_ids, self._forwarded = state_dict["static_ids"], int(state_dict["forwarded"])
