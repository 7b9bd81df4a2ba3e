"""SampleReweighting: per-sample loss weights over the global batch (Sow et al., ICLR 2025)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor

from ..core.checks import check_choice, check_int, check_real
from ..core.reweighting import RULES, effective_sample_size, focal_weights, loss_weights, weight_entropy
from ._base import never_acts, run_length
from ._per_sample import _PerSample
from ._summary import format_table

__all__ = ["SampleReweighting"]

_ALL_RULES = (*RULES, "focal")


class SampleReweighting(_PerSample):
    """Weight each sample's loss by a function of where it sits in the global batch's losses.

    The module returns per-sample losses from ``training_step`` (see
    ``lichtenberg.callbacks.weighted_loss``); the weights have mean 1 over the global batch,
    carry no gradient and are identical on every rank.

    Args:
        rule: "linupper" (default: up-weight all but the easiest, flat for the hardest half),
            "quadratic" (favour medium losses), "extremes" (favour both tails), "uniform",
            "softmax" (favour high losses: KL-regularised DRO), "softmin" (favour low losses),
            or "focal" ((1 - p)^gamma with p = exp(-loss)).
        temperature: r of softmax(f(x) / r) (the paper: 1.0); large means near uniform. Not for
            "focal" or "uniform".
        warmup_steps: optimizer steps of uniform weighting first (the paper: 1000); must be
            shorter than the run.
        gamma: focal exponent (rule "focal" only).

    Example:
        >>> trainer = Trainer(callbacks=[SampleReweighting(rule="linupper", warmup_steps=200)])
    """

    def __init__(self, rule: str = "linupper", temperature: float = 1.0, warmup_steps: int = 1000,
                 gamma: float = 2.0) -> None:
        self.rule = check_choice("SampleReweighting rule", rule, _ALL_RULES)
        # Beyond 1000 the weights are within 0.2% of uniform (f(x) spans [0, 2]): the rule would not act.
        self.temperature = check_real("SampleReweighting temperature", temperature, low=0.0, high=1000.0, low_open=True,
                                      fix="the paper uses 1.0; near 1000 the weights are uniform (rule='uniform')")
        self.warmup_steps = check_int("SampleReweighting warmup_steps", warmup_steps, low=0,
                                      fix="optimizer steps of uniform weights first; the paper uses 1000")
        # (1 - p)^gamma underflows to 0 for every sample long before gamma = 1000 (then uniform weights).
        self.gamma = check_real("SampleReweighting gamma", gamma, low=0.0, high=100.0,
                                fix="the focal exponent, typically 2.0")
        # A setting the chosen rule ignores is a mistake the run would hide.
        if self.gamma != 2.0 and rule != "focal":
            raise ValueError(f"SampleReweighting gamma={gamma!r} only acts with rule='focal' (got rule={rule!r}): "
                             "drop gamma or use rule='focal'.")
        if self.temperature != 1.0 and rule in ("focal", "uniform"):
            raise ValueError(f"SampleReweighting temperature={temperature!r} has no effect with rule={rule!r}: drop "
                             "temperature or pick a softmax rule (linupper, quadratic, extremes, softmax, softmin).")
        self._reset()

    def _reset(self) -> None:
        self._batches_weighted = 0
        self._weighting = self._log_now = False  # decided per batch, before the training step
        self._on: Tensor | None = None  # _weighting on the device, for a compiled training_step
        self._last: Tensor | None = None  # this batch's weights, logged after the step

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._on = torch.zeros((), dtype=torch.bool, device=pl_module.device)
        total = run_length(trainer)  # None: Lightning cannot know it (then nothing to check)
        if total and self.warmup_steps >= total:
            never_acts(
                trainer,
                f"SampleReweighting warmup_steps={self.warmup_steps} >= the {total} optimizer steps of this fit, so "
                f"no sample would ever be weighted: lower warmup_steps (e.g. {total // 10}, 10% of the run)."
            )

    @property
    def state_key(self) -> str:
        return self._generate_state_key(rule=self.rule)

    # The weights are computed inside the module's training_step (which the user may have
    # compiled): what depends on the step is decided before it, logging happens after it.
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        weighting = trainer.global_step >= self.warmup_steps and self.rule != "uniform"
        if self._on is not None and weighting != self._weighting:
            self._on.fill_(weighting)  # a kernel with the value as its argument: no copy, no sync
        self._weighting = weighting
        # Logging every step cost ~1 ms/step (benchmarks/reweighting_overhead): the first weighted
        # step, then on the Trainer's logging cadence.
        self._log_now = self._batches_weighted == 0 or (trainer.global_step + 1) % max(trainer.log_every_n_steps, 1) == 0
        self._last = None

    def _weights(self, trainer: pl.Trainer, pl_module: pl.LightningModule, losses: Tensor,
                 index: Tensor | None) -> Tensor | None:
        if self.rule == "uniform":
            return None
        if torch.compiler.is_compiling() and self._on is not None:
            # Traced into a compiled training_step: select on the device flag, so the end of
            # the warm-up reuses the graph (a Python branch would be a guard, and a recompile).
            # Weights of 1 give exactly the plain mean.
            w = torch.where(self._on, self._rule_weights(losses), 1.0)
        elif self._weighting:
            w = self._rule_weights(losses)
        else:
            return None
        self._last = w
        return w

    def _rule_weights(self, losses: Tensor) -> Tensor:
        if self.rule == "focal":
            return focal_weights(losses, self.gamma)
        return loss_weights(losses, self.rule, self.temperature)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        w, self._last = self._last, None
        if w is None or not self._weighting:
            return
        self._batches_weighted += 1
        if self._log_now:
            pl_module.log("reweight/ess", effective_sample_size(w), on_step=True, on_epoch=False)
            pl_module.log("reweight/entropy", weight_entropy(w), on_step=True, on_epoch=False)
            pl_module.log("reweight/max_weight", w.max(), on_step=True, on_epoch=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rows = [("rule", f"{self.rule} (temperature {self.temperature})"),
                ("weighted batches", f"{self._batches_weighted} (uniform for the first {self.warmup_steps} optimizer steps)")]
        ess = trainer.callback_metrics.get("reweight/ess")
        if isinstance(ess, torch.Tensor):
            rows.append(("last logged effective sample size", f"{float(ess):.3f} of the batch"))
        rank_zero_info(format_table("SampleReweighting summary", rows))

    def _state(self) -> dict[str, Any]:
        return {"batches_weighted": self._batches_weighted}

    def _load_state(self, state: dict[str, Any]) -> None:
        self._batches_weighted = int(state["batches_weighted"])
