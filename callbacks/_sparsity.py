"""What GradualPruning and DynamicSparseTraining share: one MaskEngine attached at setup.

- ``setup``: select the targets (logged: what is and is not sparsified), refuse weights another
  sparsity callback already owns, register the mask buffers (before Lightning restores a
  checkpoint, so a resume loads its masks into them) and keep them out of DDP's per-step
  buffer broadcast: masks change only at updates, from synchronised inputs, on every rank.
- ``on_fit_start``: re-bind the buffers the device move replaced; re-mask after the step of
  optimizers that may move an exact zero (see ``_ZERO_PRESERVING``).
- each optimizer step: the subclass's ``_update`` when due, then gradients are masked.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from ..core.sparsity import MaskEngine
from ..core.targets import Selection, Targets, select_targets
from ._strategy import refuse_sharded

__all__: list[str] = []

# With masked gradients and zeroed state these leave pruned weights at exactly 0 (a zero moment
# gives a zero update, decay of 0 is 0): re-masking after their step would be a redundant pass.
_ZERO_PRESERVING = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


class _Sparsity(Callback):
    """Base of the mask-owning callbacks; subclasses implement ``_update`` (and may add more)."""

    def __init__(self, targets: Targets | None) -> None:
        self.targets = targets or Targets()
        self.engine: MaskEngine | None = None
        self._modules: dict[str, torch.nn.Module] = {}
        self._hooks: list = []
        self._updated_at = -1  # one update per step even with several optimizers
        self._start = 0  # gradients are masked from this optimizer step on

    def _check(self, selection: Selection) -> None:
        """Subclass hook: reject targets the technique cannot handle (ValueError)."""

    def _init_masks(self, trainer: pl.Trainer) -> None:
        """Subclass hook: initial masks for a fresh fit (a resumed run overwrites them)."""

    def _due(self, step: int) -> bool:
        raise NotImplementedError

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        raise NotImplementedError

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.engine is not None:
            return
        refuse_sharded(self, trainer)
        selection = select_targets(pl_module, self.targets)
        self._check(selection)
        name = type(self).__name__
        for other in trainer.callbacks:
            if other is not self and isinstance(other, _Sparsity) and other.engine is not None:
                shared = sorted(set(other.engine.params) & set(selection.params))
                if shared:
                    raise ValueError(
                        f"{name} and {type(other).__name__} both target {shared}: one mask per weight. "
                        "Split the layers between them with `targets`, or use only one of them."
                    )
        rank_zero_info(f"{name}: {selection.report()}")
        self.engine = MaskEngine.attach_(pl_module, selection.params)
        self._modules = selection.modules
        ignored = set(getattr(pl_module, "_ddp_params_and_buffers_to_ignore", ()))
        pl_module._ddp_params_and_buffers_to_ignore = sorted(ignored | set(self.engine.buffer_names))
        if stage == "fit":
            self._init_masks(trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.engine is not None
        self.engine.rebind_()  # moving the module to its device replaced the buffers
        self._hooks = [
            opt.register_step_post_hook(lambda *_: self.engine.apply_())
            for opt in trainer.optimizers
            if type(opt) not in _ZERO_PRESERVING
        ]
        slow = [type(o).__name__ for o in trainer.optimizers if isinstance(o, (torch.optim.Adam, torch.optim.AdamW))
                and not o.defaults.get("fused") and pl_module.device.type == "cpu"]
        if slow:  # measured in benchmarks/pruning_overhead.py: Adam's step 11 -> 20 ms at 90% sparsity
            rank_zero_warn(f"{type(self).__name__}: torch's CPU {slow[0]} takes a slow path on the exact zeros that "
                           f"masks create (sqrt of zero moments); pass fused=True to {slow[0]} for a much faster step.")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # Gradients here are final (after accumulation and DDP's all-reduce) and still dense.
        assert self.engine is not None
        step = trainer.global_step
        if self._due(step) and self._updated_at != step:
            self._updated_at = step
            self._update(trainer, pl_module, step)
        if step >= self._start:
            self.engine.mask_grads_()

    def _log_density(self, pl_module: pl.LightningModule, prefix: str) -> tuple[dict[str, float], float]:
        """Log global and per-layer sparsity; returns them."""
        assert self.engine is not None
        per_layer, total = self.engine.sparsity_report()
        pl_module.log(f"{prefix}/sparsity", total, on_step=True, on_epoch=False)
        for name, value in per_layer.items():
            pl_module.log(f"{prefix}/sparsity/{name}", value, on_step=True, on_epoch=False)
        return per_layer, total
