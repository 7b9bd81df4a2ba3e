"""Weight averaging callbacks: EMA (exponential moving average) and SWA (equal running mean).

Both keep name-keyed averaged copies beside training (machinery in ``_averaging.py``, math in
``lichtenberg.core.averaging``); they differ only in when they update and with what weight.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from ..core.averaging import ema_decay
from ..core.checks import check_choice, check_int, check_real
from ..core.schedules import resolve_step
from ._base import never_acts, run_length
from ._averaging import _Averaging

__all__ = ["EMA", "SWA"]


class EMA(_Averaging):
    """Exponential moving average of the weights, updated after optimizer steps.

    ``avg <- decay_t * avg + (1 - decay_t) * weights`` with the warm-up users know from timm
    and ema-pytorch, ``decay_t = min(decay, 1 - (1 + t / warmup_gamma) ** -warmup_power)``,
    ``t`` the number of updates so far (the first update copies the weights). Floating
    parameters and buffers are averaged with one foreach call; integer buffers are copied.
    Validation and test run on the averaged weights, checkpoints hold both (the raw ones as
    the model state, so resuming continues training), and at the end of fit the module holds
    the averaged weights.

    Args:
        decay: asymptotic decay per update, in (0, 1); horizon ~ every_n_steps / (1 - decay) steps.
        warmup_power: warm-up exponent (2/3 for short runs, 3/4 for long ones); None disables it.
        warmup_gamma: warm-up time scale, in updates.
        start_step: optimizer steps to train before the first update.
        every_n_steps: update after every n-th optimizer step.
        offload_to_cpu: keep the averages in host memory (saves accelerator memory, costs a copy per update).
        evaluate_averaged: run validation and test on the averaged weights.
        apply_at_end: leave the averaged weights in the module when fit ends.

    Example:
        >>> trainer = Trainer(max_epochs=10, callbacks=[EMA(decay=0.999)])
        >>> trainer.fit(model)  # validation used the EMA weights; model now holds them
    """

    name = "ema"

    def __init__(
        self,
        decay: float = 0.999,
        warmup_power: float | None = 2 / 3,
        warmup_gamma: float = 1.0,
        start_step: int = 0,
        every_n_steps: int = 1,
        offload_to_cpu: bool = False,
        evaluate_averaged: bool = True,
        apply_at_end: bool = True,
    ) -> None:
        decay = check_real("EMA decay", decay, low=0.0, high=1.0, low_open=True, high_open=True,
                           fix="typical values are 0.999 to 0.9999")
        if warmup_power is not None:
            warmup_power = check_real("EMA warmup_power", warmup_power, low=0.0, low_open=True,
                                      fix="2/3 or 3/4, or None for no warm-up")
        warmup_gamma = check_real("EMA warmup_gamma", warmup_gamma, low=0.0, low_open=True, fix="1.0 is the usual value")
        if warmup_power is None and warmup_gamma != 1.0:
            raise ValueError(f"EMA warmup_gamma={warmup_gamma} has no effect with warmup_power=None: drop one of them.")
        start_step = check_int("EMA start_step", start_step, low=0, fix="0 averages from the first step")
        every_n_steps = check_int("EMA every_n_steps", every_n_steps, low=1, fix="1 updates after every optimizer step")
        super().__init__(evaluate_averaged, apply_at_end, offload_to_cpu)
        self.decay = decay
        self.warmup_power = warmup_power
        self.warmup_gamma = warmup_gamma
        self.start_step = start_step
        self.every_n_steps = every_n_steps

    @property
    def state_key(self) -> str:
        return self._generate_state_key(decay=self.decay, start_step=self.start_step, every_n_steps=self.every_n_steps)

    def current_decay(self) -> float:
        """Decay the next update will use."""
        assert self.averaged is not None
        return ema_decay(self.averaged.num_updates, self.decay, self.warmup_gamma, self.warmup_power)

    def _weight(self, updates: int) -> float:
        return 1.0 - ema_decay(updates, self.decay, self.warmup_gamma, self.warmup_power)

    def _due_after_step(self, step: int) -> bool:
        return step > self.start_step and step % self.every_n_steps == 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        total = run_length(trainer)
        first = (self.start_step // self.every_n_steps + 1) * self.every_n_steps
        if total is not None and first > total:
            never_acts(trainer, f"EMA start_step={self.start_step}, every_n_steps={self.every_n_steps}: the first update "
                       f"would follow optimizer step {first}, but training stops at step {total}: start earlier, update "
                       "more often or train longer.")
            return
        updates = 0 if total is None else (total - first) // self.every_n_steps + 1
        final = ema_decay(updates - 1, self.decay, self.warmup_gamma, self.warmup_power) if updates else 1.0
        if updates >= 3 and final < 0.5:  # the default warm-up passes 0.5 at the third update; under it: the last weights
            never_acts(trainer, f"EMA warmup_gamma={self.warmup_gamma}, warmup_power={self.warmup_power}: the warm-up keeps "
                       f"the decay at or below {final:.3g} for all {updates} updates of this run, so the average would be "
                       "the last weights: lower warmup_gamma (1.0 is usual), set warmup_power: null, or train longer.")

    def _summary_rows(self) -> list[tuple[str, str]]:
        rows = [("decay (target / last)", f"{self.decay} / {self.current_decay():.6f}")]
        horizon = 1.0 / max(1.0 - self.current_decay(), 1e-12)
        if self.averaged is not None and self.averaged.num_updates and horizon < 0.5 / (1.0 - self.decay):
            # timm's warm-up reaches 0.999 only after ~30k updates: say so rather than surprise.
            rows.append(("note", f"the warm-up kept the averaging horizon at {horizon:.0f} updates, under half "
                                 f"of decay {self.decay}'s; for short runs lower `decay` or set `warmup_power: null`"))
        return rows


class SWA(_Averaging):
    """Stochastic weight averaging: the equal running mean of snapshots taken late in training.

    From ``start`` on, a snapshot is added after every ``every_n``-th epoch (or optimizer
    step). The user's LR scheduler is never replaced; ``swa_lr`` optionally holds the learning
    rate constant from ``start`` on. When fit ends, BatchNorm statistics are recomputed for the
    averaged weights with one explicit pass over the training data (``bn_forward`` runs each
    batch; override it for batches that are not ``(inputs, ...)`` tuples), then the module
    holds the averaged weights.

    Args:
        start: when averaging starts: a float in [0, 1) is a fraction of the run's optimizer
            steps (needs max_steps or max_epochs), an int >= 0 an optimizer step.
        every_n: add a snapshot after every n-th ``interval``.
        interval: "epoch" or "step".
        swa_lr: if set, the learning rate of every param group from ``start`` on.
        bn_batches: training batches for the BatchNorm pass (None: one epoch, 0: skip it).
        offload_to_cpu: keep the average in host memory.
        evaluate_averaged: run validation and test on the averaged weights.
        apply_at_end: recompute BatchNorm and leave the averaged weights in the module.

    Example:
        >>> trainer = Trainer(max_epochs=20, callbacks=[SWA(start=0.75)])
    """

    name = "swa"

    def __init__(
        self,
        start: int | float = 0.75,
        every_n: int = 1,
        interval: Literal["epoch", "step"] = "epoch",
        swa_lr: float | None = None,
        bn_batches: int | None = None,
        offload_to_cpu: bool = False,
        evaluate_averaged: bool = True,
        apply_at_end: bool = True,
    ) -> None:
        if isinstance(start, float):
            start = check_real("SWA start", start, low=0.0, high=1.0, high_open=True,
                               fix="a float is a fraction of training; pass an int for an optimizer step")
        else:
            start = check_int("SWA start", start, low=0, fix="an int is an optimizer step; a float in [0, 1) a fraction")
        every_n = check_int("SWA every_n", every_n, low=1)
        interval = check_choice("SWA interval", interval, ("epoch", "step"))
        if swa_lr is not None:
            swa_lr = check_real("SWA swa_lr", swa_lr, low=0.0, high=100.0, low_open=True,
                                fix="a learning rate such as 0.05, or None to keep the user's schedule")
        if bn_batches is not None:
            bn_batches = check_int("SWA bn_batches", bn_batches, low=0, fix="0 skips the pass, None uses one epoch")
            if not apply_at_end:
                raise ValueError(f"SWA bn_batches={bn_batches} has no effect with apply_at_end=False (the BatchNorm "
                                 "pass runs when the average is applied): drop one of them.")
        super().__init__(evaluate_averaged, apply_at_end, offload_to_cpu)
        self.start = start
        self.every_n = every_n
        self.interval = interval
        self.swa_lr = swa_lr
        self.bn_batches = bn_batches
        self._start_step = start if isinstance(start, int) else 0
        self._bn_seen = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(start=self.start, every_n=self.every_n, interval=self.interval)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        total = run_length(trainer)
        self._start_step = resolve_step(self.start, total, "SWA start") if isinstance(self.start, float) else self.start
        if total is not None and self._start_step >= total:
            never_acts(trainer, f"SWA start={self.start} is optimizer step {self._start_step}, but training ends at step "
                       f"{total}: start earlier or train longer.")
        elif total is not None and not self._updates_in(trainer, total):
            never_acts(trainer, f"SWA every_n={self.every_n} {self.interval}(s) from optimizer step {self._start_step} "
                       f"never adds a snapshot in this run ({total} steps, max_epochs={trainer.max_epochs}): lower every_n "
                       "or train longer.")
        if self.apply_at_end and self.bn_batches != 0:
            self._check_bn_forward(pl_module, "pass bn_batches=0")
        rank_zero_info(f"SWA: averaging from optimizer step {self._start_step}, every {self.every_n} {self.interval}(s).")

    def _updates_in(self, trainer: pl.Trainer, total: int) -> bool:
        """Whether any snapshot falls within a run of ``total`` optimizer steps."""
        if self.interval == "step":
            return (self._start_step // self.every_n + 1) * self.every_n <= total
        batches, epochs = trainer.num_training_batches, trainer.max_epochs
        if not epochs or epochs < 0 or not math.isfinite(batches):
            return True  # epoch length unknown: nothing to check
        per_epoch = max(1, math.ceil(batches / trainer.accumulate_grad_batches))
        epochs = min(epochs, math.ceil(total / per_epoch))
        return any((e + 1) % self.every_n == 0 and min((e + 1) * per_epoch, total) > self._start_step for e in range(epochs))

    def _weight(self, updates: int) -> float:
        return 1.0 / (updates + 1)

    def _due_after_step(self, step: int) -> bool:
        return self.interval == "step" and step > self._start_step and step % self.every_n == 0

    def _due_after_epoch(self, epoch: int, step: int) -> bool:
        return self.interval == "epoch" and step > self._start_step and (epoch + 1) % self.every_n == 0

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.swa_lr is not None and trainer.global_step >= self._start_step:
            for group in optimizer.param_groups:
                group["lr"] = self.swa_lr

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync_buffers(trainer)
        if self._applies and self._hold_averaged(pl_module):
            self._bn_seen = self._bn_pass(trainer, pl_module, self.bn_batches)

    def _summary_rows(self) -> list[tuple[str, str]]:
        return [("start step", str(self._start_step)), ("BatchNorm pass batches", str(self._bn_seen))]
