"""What GradualPruning and DynamicSparseTraining share: one MaskEngine bound per fit.

- ``setup``: bind to the model right after its ``configure_model`` (layers built there are
  targets too) and before Lightning restores a checkpoint (a resume loads its masks into the
  buffers). Targets are logged; weights of unknown layer types and tied aliases a target drags
  along are warnings. Mask buffers are registered under every alias of a weight and kept out
  of DDP's per-step buffer broadcast: masks change only at updates, on every rank alike.
- ``on_fit_start``: re-bind the buffers the device move replaced; resolve the schedule (a
  setting that would never act is a ValueError); hook the optimizers.
- each optimizer step: the subclass's ``_update`` when due (dense, final gradients), then the
  gradients of pruned weights are zeroed at the last point before the step: an optimizer
  pre-step hook that runs after the module's own ``on_before_optimizer_step``, gradient
  clipping and any other callback (for Lightning's closure-driven steps, right after the
  closure). Where clipping reads the gradients they are masked before it too, so the clip
  norm counts kept weights only. Optimizers outside ``_ZERO_PRESERVING`` also re-mask the
  weights after their step.

Sharded runs (FSDP2, ModelParallelStrategy): targets are DTensor shards (``Shard(0)``, checked
at binding); masks and all per-weight state are DTensors of the same layout held as module
buffers, so torch.distributed.checkpoint saves and restores them with the model (Lightning
saves callback state from rank 0 alone). Every per-step operation is shard-local.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from ..core.distributed import check_layout, is_sharded, local
from ..core.sparsity import MaskEngine
from ..core.targets import Selection, Targets, select_targets
from ._base import _Base, after_configure_model, overrides
from ._strategy import check_strategy

__all__: list[str] = []

# With masked gradients and zeroed state these leave pruned weights at exactly 0 (a zero moment
# gives a zero update, decay of 0 is 0): re-masking after their step would be a redundant pass.
_ZERO_PRESERVING = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


class _Sparsity(_Base):
    """Base of the mask-owning callbacks; subclasses implement ``_due`` / ``_update`` (and may
    extend ``_reset``, ``_check``, ``_init_masks``, ``_resolve`` and ``_last_point``)."""

    _dense_latent = False  # True: the weights hold a dense latent copy around the step (SR-STE re-masks itself)

    def __init__(self, targets: Targets | None) -> None:
        if targets is not None and not isinstance(targets, Targets):
            raise ValueError(f"targets={targets!r} must be a Targets(types=..., include=..., exclude=...).")
        self.targets = targets or Targets()
        self.engine: MaskEngine | None = None
        self._modules: dict[str, torch.nn.Module] = {}
        self._hooks: list = []
        self._reset()

    def _reset(self) -> None:
        """Forget everything bound to an earlier fit (a new fit starts from the model as it is)."""
        self._updated_at = -1  # one update per step even with several optimizers
        self._start = 0  # gradients are masked from this optimizer step on
        self._mask_before_clip = False
        self._sharded = False  # FSDP2: per-weight state lives in module buffers (see _weight_buffers)
        self._on_meta = False  # bound to meta-device weights that the strategy materialises after binding

    # -- subclass hooks ----------------------------------------------------------------------
    def _check(self, selection: Selection) -> None:
        """Reject targets the technique cannot handle (ValueError)."""

    def _init_masks(self, trainer: pl.Trainer) -> None:
        """Initial masks for a fit (targets may carry masks already); a resume overwrites them."""

    def _rebind_values(self, trainer: pl.Trainer) -> None:
        """Bound to meta-device weights: start again from the materialised ones (before a restore)."""
        self._init_masks(trainer)

    def _resolve(self, trainer: pl.Trainer) -> None:
        """Turn the schedule into optimizer steps; ValueError for settings that would never act."""

    def _due(self, step: int) -> bool:
        raise NotImplementedError

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        raise NotImplementedError

    def needs_dense_gradients(self, step: int) -> bool:
        """SparseDDPStrategy's question: whether optimizer step ``step`` reads the averaged
        gradients of pruned weights: an update (it may grow by gradient, and regrown weights keep
        this step's gradient), SR-STE's dense latent weights, or a step before masking starts."""
        return self.engine is not None and (self._dense_latent or step < self._start or self._due(step))

    def _last_point(self, trainer: pl.Trainer, names: list[str]) -> None:
        """Right before the optimizer's math: zero the gradients of pruned weights."""
        if trainer.global_step >= self._start:
            self.engine.mask_grads_(names)

    # -- binding ---------------------------------------------------------------------------------
    def _bound_to(self, pl_module: pl.LightningModule) -> bool:
        if self.engine is None or self.engine.model is not pl_module:
            return False
        own = dict(pl_module.named_parameters(remove_duplicate=False))
        return all(own.get(n) is p for n, p in self.engine.params.items())

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(self, trainer)
        if stage != "fit" and self._bound_to(pl_module):
            return  # e.g. trainer.test right after fit
        if stage == "fit":
            self._reset()
        self.engine = None
        after_configure_model(pl_module, partial(self._bind, trainer, pl_module, stage))

    def _bind(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        selection = select_targets(pl_module, self.targets)
        for target, param in selection.params.items():
            check_layout(target, param)
        self._sharded = any(is_sharded(p) for p in selection.params.values())
        self._on_meta = stage == "fit" and any(local(p).is_meta for p in selection.params.values())
        self._check(selection)
        name = type(self).__name__
        mine = {id(p): n for n, p in selection.params.items()}
        for other in trainer.callbacks:
            if other is not self and isinstance(other, _Sparsity) and other._bound_to(pl_module):
                shared = sorted(mine[id(p)] for p in other.engine.params.values() if id(p) in mine)
                if shared:
                    raise ValueError(
                        f"{name} and {type(other).__name__} both target {shared}: one mask per weight. "
                        "Split the layers between them with `targets`, or use only one of them."
                    )
        rank_zero_info(f"{name}: {selection.report()}")
        for warning in selection.warnings(self.targets.types):
            rank_zero_warn(f"{name}: {warning}")
        self.engine = MaskEngine.attach_(pl_module, selection.params, selection.kinds, selection.aliases)
        self._modules = selection.modules
        ignored = set(getattr(pl_module, "_ddp_params_and_buffers_to_ignore", ()))
        pl_module._ddp_params_and_buffers_to_ignore = sorted(ignored | set(self.engine.buffer_names))
        if stage == "fit" and not self._on_meta:  # meta weights: once materialised, in on_fit_start
            self._init_masks(trainer)

    def _weight_buffers(self, suffix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Register per-weight state as ``<leaf>_<suffix>`` buffers beside each target (FSDP2):
        DCP saves and restores them sharded, where callback state would hold rank 0's shard."""
        assert self.engine is not None
        for name, tensor in tensors.items():
            owner, _, leaf = name.rpartition(".")
            module = self.engine.model.get_submodule(owner)
            module._buffers.pop(f"{leaf}_{suffix}", None)
            module.register_buffer(f"{leaf}_{suffix}", tensor)
        return dict(tensors)

    def _read_buffers(self, suffix: str) -> dict[str, torch.Tensor]:
        """The ``<leaf>_<suffix>`` buffers of the targets that have one (after a device move or restore)."""
        assert self.engine is not None
        found = {}
        for name in self.engine.params:
            owner, _, leaf = name.rpartition(".")
            buffer = self.engine.model.get_submodule(owner)._buffers.get(f"{leaf}_{suffix}")
            if buffer is not None:
                found[name] = buffer
        return found

    def _drop_buffers(self, suffix: str) -> None:
        assert self.engine is not None
        for name in self.engine.params:
            owner, _, leaf = name.rpartition(".")
            self.engine.model.get_submodule(owner)._buffers.pop(f"{leaf}_{suffix}", None)

    # -- fit -------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.engine is not None
        self.engine.rebind_()  # moving the module to its device replaced the buffers
        if self._on_meta:  # materialised since binding (to_empty): what was bound holds no values yet
            self._on_meta = False
            for mask in self.engine.masks.values():
                local(mask).fill_(True)
            self._rebind_values(trainer)
        self._resolve(trainer)
        self._mask_before_clip = bool(trainer.gradient_clip_val) or overrides(pl_module, "configure_gradient_clipping")
        own = {id(p): n for n, p in self.engine.params.items()}
        for opt in trainer.optimizers:
            names = [own[id(p)] for group in opt.param_groups for p in group["params"] if id(p) in own]
            if names:
                self._hooks.append(opt.register_step_pre_hook(partial(self._pre_step, trainer, names)))
            if names and type(opt) not in _ZERO_PRESERVING and not self._dense_latent:
                self._hooks.append(opt.register_step_post_hook(lambda *_: self.engine.apply_()))
        slow = [type(o).__name__ for o in trainer.optimizers if isinstance(o, (torch.optim.Adam, torch.optim.AdamW))
                and not o.defaults.get("fused") and pl_module.device.type == "cpu"]
        if slow:  # measured in benchmarks/pruning_overhead.py: Adam's step 11 -> 20 ms at 90% sparsity
            rank_zero_warn(f"{type(self).__name__}: torch's CPU {slow[0]} takes a slow path on the exact zeros that "
                           f"masks create (sqrt of zero moments); pass fused=True to {slow[0]} for a much faster step.")

    def _pre_step(self, trainer: pl.Trainer, names: list[str], optimizer: Any, args: tuple, kwargs: dict) -> Any:
        # Lightning steps with a closure that runs backward, the module's hooks and clipping
        # inside optimizer.step: the last point is right after it. Without one (AMP's scaler,
        # manual loops) the gradients are final already.
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self._last_point(trainer, names)
            return None

        def closure_then_mask() -> Any:
            out = closure()
            self._last_point(trainer, names)
            return out

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_mask}
        return (args[0], closure_then_mask, *args[2:]), kwargs

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
        if self._mask_before_clip and step >= self._start:
            self.engine.mask_grads_()

    def _log_density(self, pl_module: pl.LightningModule, prefix: str) -> None:
        """Log global and per-layer sparsity, as device tensors: the event waits for no count
        (Python floats would each be a host-to-device copy)."""
        assert self.engine is not None
        per_layer, total = self.engine.sparsity_tensors()
        pl_module.log(f"{prefix}/sparsity", total, on_step=True, on_epoch=False)
        for name, value in per_layer.items():
            pl_module.log(f"{prefix}/sparsity/{name}", value, on_step=True, on_epoch=False)

