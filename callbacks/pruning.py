"""GradualPruning: magnitude / activation-aware / gradient pruning on a step-level schedule.

Masks are bool buffers beside the weights (``lichtenberg.core.sparsity.MaskEngine``): they
are in every checkpoint, identical on every rank (computed from synchronised weights, norms
and gradients), and excluded from DDP's per-step buffer broadcast.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from ..core.schedules import SparsitySchedule
from ..core.sparsity import (
    Allocation,
    InputNorms,
    SRSTE,
    check_nm,
    gradient_score,
    magnitude_score,
    parse_pattern,
    prune_masks,
    wanda_score,
)
from ..core.targets import Selection, Targets
from ._sparsity import _Sparsity
from ._summary import format_table

__all__ = ["GradualPruning"]

_ALLOCATIONS = ("uniform", "global", "global_floor", "lamp", "erk")


class GradualPruning(_Sparsity):
    """Prune target weights to ``sparsity`` along a schedule (Zhu & Gupta's cubic by default).

    At every pruning event (optimizer-step based) new masks are computed from the scores,
    the budget is split across layers by ``allocation``, and optimizer state of newly pruned
    slots is zeroed. Between events gradients are masked before each optimizer step, which
    keeps pruned weights at exactly zero under SGD, Adam and AdamW; after the step of any
    other optimizer the weights are re-masked as well.

    Args:
        sparsity: final fraction of the target weights pruned, in [0, 1). For an N:M pattern
            it must equal 1 - N/M.
        schedule: when pruning happens (kind, start, end, every_n_steps, initial).
        score: "magnitude" |w|, "wanda" |w| * ||x|| (input norms collected on event steps
            only), or "gradient" |w * g|.
        allocation: how the budget is split across layers: "lamp" (default: global over
            scale-invariant LAMP scores, no layer collapses), "uniform" (Zhu & Gupta: every layer
            at the target), "global", "global_floor" (every layer keeps >= 1%) or "erk"; or an
            explicit {module-name glob: final sparsity} dict (unmatched layers get ``sparsity``).
        pattern: "unstructured", or "N:M" (e.g. "2:4": N kept of every M consecutive inputs).
        targets: which weights (default: weight of every Linear, Conv1d and Conv2d).
        rewind: lottery-ticket rewinding of surviving weights to their initial values at
            each event (off by default).
        make_permanent: remove the mask buffers at the end of fit (a plain module remains).
        sr_ste: SR-STE decay lambda for an N:M pattern (0 = off; the paper uses 2e-4). When on,
            the N:M mask is recomputed from a dense latent weight after every optimizer step
            from the schedule's start (one optimizer only; one extra float copy of the weights).

    Example:
        >>> trainer = Trainer(max_epochs=20, callbacks=[GradualPruning(sparsity=0.9)])
    """

    def __init__(
        self,
        sparsity: float = 0.5,
        schedule: SparsitySchedule | None = None,
        score: Literal["magnitude", "wanda", "gradient"] = "magnitude",
        allocation: Allocation | dict[str, float] = "lamp",
        pattern: str = "unstructured",
        targets: Targets | None = None,
        rewind: bool = False,
        make_permanent: bool = False,
        sr_ste: float = 0.0,
    ) -> None:
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity={sparsity} must lie in [0, 1): it is the fraction of weights removed.")
        if score not in ("magnitude", "wanda", "gradient"):
            raise ValueError(f"score={score!r} must be 'magnitude', 'wanda' or 'gradient'.")
        if isinstance(allocation, dict):
            bad = {k: v for k, v in allocation.items() if not 0.0 <= v < 1.0}
            if bad:
                raise ValueError(f"allocation {bad}: per-layer sparsities must lie in [0, 1).")
        elif allocation not in _ALLOCATIONS:
            raise ValueError(f"allocation={allocation!r} must be one of {', '.join(_ALLOCATIONS)}, or a dict.")
        self.nm = parse_pattern(pattern)
        if self.nm is not None and abs(sparsity - (1 - self.nm[0] / self.nm[1])) > 1e-9:
            raise ValueError(
                f"pattern={pattern!r} prunes {1 - self.nm[0] / self.nm[1]:g} of the weights, but sparsity={sparsity}: "
                f"set sparsity={1 - self.nm[0] / self.nm[1]:g}."
            )
        if sr_ste < 0 or (sr_ste and (self.nm is None or score != "magnitude")):
            raise ValueError(
                f"sr_ste={sr_ste} needs a decay >= 0 (paper: 2e-4), an N:M pattern (e.g. pattern='2:4') and "
                f"score='magnitude' (got pattern={pattern!r}, score={score!r})."
            )
        self.sparsity = sparsity
        self.sr_ste = sr_ste
        self.schedule = schedule or SparsitySchedule()
        self.score = score
        self.allocation = allocation
        self.pattern = pattern
        super().__init__(targets)
        self.rewind = rewind
        self.make_permanent = make_permanent
        self._end = 0
        self._norms: InputNorms | None = None
        self._initial: dict[str, torch.Tensor] = {}
        self._events = 0
        self._layer_final: dict[str, float] | None = None
        self._srste: SRSTE | None = None
        self._srste_state: dict[str, torch.Tensor] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(sparsity=self.sparsity, pattern=self.pattern)

    # -- set-up --------------------------------------------------------------------------
    def _check(self, selection: Selection) -> None:
        if self.nm is not None:
            for name, param in selection.params.items():
                check_nm(name, param.shape, self.nm[1])
        self._layer_final = self._per_layer_targets(selection.params)

    def _init_masks(self, trainer: pl.Trainer) -> None:
        if self.rewind and not self._initial:
            self._initial = {n: p.detach().clone() for n, p in self.engine.params.items()}

    def _per_layer_targets(self, params: dict[str, torch.nn.Parameter]) -> dict[str, float] | None:
        """Final sparsity per layer for an explicit allocation dict (first matching glob wins)."""
        if not isinstance(self.allocation, dict):
            return None
        owners = {n: n.rpartition(".")[0] for n in params}
        unused = [g for g in self.allocation if not any(fnmatch.fnmatchcase(o, g) for o in owners.values())]
        if unused:
            raise ValueError(f"allocation globs {unused} match no pruned module; targets are {sorted(owners.values())}.")
        return {
            n: next((v for g, v in self.allocation.items() if fnmatch.fnmatchcase(owner, g)), self.sparsity)
            for n, owner in owners.items()
        }

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self._end = self.schedule.resolve(trainer.estimated_stepping_batches)
        super().on_fit_start(trainer, pl_module)
        if self.sr_ste:
            for handle in self._hooks:  # the SR-STE step is followed by its own re-masking
                handle.remove()
            if len(trainer.optimizers) != 1:
                raise ValueError(f"sr_ste needs exactly one optimizer, got {len(trainer.optimizers)}: use sr_ste=0.")
            assert self.nm is not None and self.engine is not None
            self._srste = SRSTE(self.engine, *self.nm, decay=self.sr_ste)
            self._srste.load_state_dict(self._srste_state)
            self._hooks = [trainer.optimizers[0].register_step_post_hook(lambda *_: self._srste.after_step_())]
        rank_zero_info(f"GradualPruning: events at optimizer steps {self._start}..{self._end} every {self.schedule.every_n_steps}.")

    # -- training ------------------------------------------------------------------------
    def _due(self, step: int) -> bool:
        return self.schedule.is_event(step, self._start, self._end)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.score == "wanda" and self._norms is None and self._due(trainer.global_step):
            self._norms = InputNorms(self._modules).__enter__()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._srste is None:
            return super().on_before_optimizer_step(trainer, pl_module, optimizer)
        if trainer.global_step >= self._start:  # N:M from a dense latent weight, every step
            self._srste.before_step_()

    @torch.no_grad()
    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        assert self.engine is not None
        params = self.engine.params
        if self.score == "wanda" and self._norms is not None:
            self._norms.__exit__()
            norms = {n: trainer.strategy.reduce(v, reduce_op="sum") for n, v in self._norms.norms().items()}
            self._norms = None
            scores = {n: wanda_score(p, norms[n]) if n in norms else magnitude_score(p) for n, p in params.items()}
        elif self.score == "gradient":
            scores = {n: gradient_score(p) for n, p in params.items()}
        else:
            scores = {n: magnitude_score(p) for n, p in params.items()}
        target = self.schedule.value(step, self.sparsity, self._start, self._end)
        if self._layer_final is not None:  # explicit per-layer targets follow the schedule's progress
            progress = self.schedule.value(step, 1.0, self._start, self._end)
            layer_targets = {n: progress * final for n, final in self._layer_final.items()}
            masks = prune_masks(scores, self.engine.masks, layer_targets, nm=self.nm)
        else:
            masks = prune_masks(scores, self.engine.masks, target, self.allocation, self.nm)
        changed = self.engine.set_masks_(masks, trainer.optimizers)
        if self.rewind and self._initial:
            for name, param in params.items():
                param.copy_(self._initial[name] * self.engine.masks[name])
        self._events += 1
        self._log_density(pl_module, "pruning")
        pl_module.log("pruning/target", target, on_step=True, on_epoch=False)
        pl_module.log("pruning/changed", float(sum(changed.values())), on_step=True, on_epoch=False)

    # -- end of fit ------------------------------------------------------------------------
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.engine is not None
        per_layer, total = self.engine.sparsity_report()
        rows = [(n, f"{tuple(self.engine.params[n].shape)}  sparsity {s:.4f}") for n, s in per_layer.items()]
        rows += [("global sparsity", f"{total:.4f} (target {self.sparsity})"), ("pruning events", str(self._events))]
        if self.make_permanent:
            nonzeros = self.engine.squash_()
            pl_module._ddp_params_and_buffers_to_ignore = [
                n for n in getattr(pl_module, "_ddp_params_and_buffers_to_ignore", []) if not n.endswith("_mask")
            ]
            rows.append(("made permanent", f"{sum(nonzeros.values())} non-zeros left, mask buffers removed"))
        rank_zero_info(format_table("GradualPruning summary", rows))

    def state_dict(self) -> dict[str, Any]:
        # Masks travel as model buffers; only the rewind point and the event count live here.
        latent = self._srste.state_dict() if self._srste is not None else self._srste_state
        return {"events": self._events, "initial": dict(self._initial), "sr_ste_latent": latent}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._events = int(state_dict["events"])
        self._initial = dict(state_dict["initial"])
        self._srste_state = dict(state_dict.get("sr_ste_latent", {}))
