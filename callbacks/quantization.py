"""QuantizationAwareTraining: fake-quant weights and activations in training, integer export after.

The layer swap happens in ``setup``: before the optimizer is built (LSQ scales are
parameters the optimizer must see) and before a checkpoint is restored (keys match).
Everything the quantizers learn or observe is module state, so checkpoints carry it and a
resume is bit-exact; the callback itself only derives the mode from ``global_step``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from ..core.quantization import ACTIVATION_METHODS, ActivationQuantizer, WeightQuantizer, prepare_, quant_modules
from ..core.schedules import resolve_step
from ..core.targets import Targets, select_targets
from ._strategy import refuse_sharded
from ._summary import format_table

__all__ = ["QuantizationAwareTraining"]

_WEIGHT_METHODS = {"int": ("minmax", "lsq", "stat"), "ternary": ("stat",), "binary": ("ste", "reste")}
_RESTE_O_END = 3.0  # ReSTE's final exponent (the paper's default)
_FREEZE_THRESHOLD = 0.005  # oscillation EMA above which a weight is frozen (OFQ/Nagel et al. range)


def _kind(bits: Any) -> str:
    return bits if bits in ("ternary", "binary") else "int"


class QuantizationAwareTraining(Callback):
    """Train with fake-quantized weights and layer inputs, then export integers.

    Targets default to every ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Embedding``.
    The log says which layers are quantized and why the others are not. Attach
    GradualPruning / DynamicSparseTraining as well and the mask applies to the latent float
    weight first: pruned weights quantize to exactly zero.

    Args:
        weight_bits: 2..8, "ternary" (BitNet b1.58) or "binary" (or 1); None keeps weights float.
        activation_bits: 2..8 for the inputs of quantized layers; None keeps them float.
        weight_method: integer grids: "lsq" (learned scale, default), "minmax" or "stat" (OFQ's
            statistic scale, with oscillation tracking); binary: "reste" (default) or "ste".
        activation_method: "dynamic" (per token / tensor, default), "lsq", "lsq+" or "pact".
        granularity: weight scales per "tensor", per output "channel", or "group:N" (N inputs).
        targets: which layers (module types and name globs).
        start_step: optimizer step (int) or fraction of training (float) where quantization
            starts; before it training is float. Scales are initialised from the first
            quantized batch.
        freeze_step: step or fraction where weights that oscillate between two levels are
            frozen at their current level (integer grids; tracking is on when this is set).

    Example:
        >>> trainer = Trainer(callbacks=[QuantizationAwareTraining(weight_bits=4, activation_bits=8)])
        >>> ints = export_int(model)   # lichtenberg.core.quantization
    """

    def __init__(
        self,
        weight_bits: int | Literal["ternary", "binary"] | None = 8,
        activation_bits: int | None = 8,
        weight_method: Literal["minmax", "lsq", "stat", "ste", "reste"] | None = None,
        activation_method: Literal["dynamic", "lsq", "lsq+", "pact"] = "dynamic",
        granularity: str = "channel",
        targets: Targets | None = None,
        start_step: int | float = 0,
        freeze_step: int | float | None = None,
    ) -> None:
        weight_bits = "binary" if weight_bits == 1 else weight_bits  # 1 bit is binary
        for what, bits in (("weight_bits", weight_bits), ("activation_bits", activation_bits)):
            ok = bits is None or (isinstance(bits, int) and 2 <= bits <= 8) or (what == "weight_bits" and _kind(bits) != "int")
            if not ok:
                extra = ', "ternary", "binary"' if what == "weight_bits" else ""
                low = "1..8 (1 = binary)" if what == "weight_bits" else "2..8"
                raise ValueError(f"{what}={bits!r} must be an int in {low}{extra} or None (float).")
        if weight_bits is None and activation_bits is None:
            raise ValueError("weight_bits and activation_bits are both None: nothing to quantize.")
        allowed = _WEIGHT_METHODS[_kind(weight_bits)]
        if weight_method is not None and weight_method not in allowed:
            raise ValueError(f"weight_method={weight_method!r} does not apply to weight_bits={weight_bits!r}; use one of {allowed}.")
        if activation_method not in ACTIVATION_METHODS:
            raise ValueError(f"activation_method={activation_method!r} must be one of {ACTIVATION_METHODS}.")
        self.group_size = 128
        if granularity.startswith("group:") and granularity[6:].isdigit() and int(granularity[6:]) > 0:
            self.group_size = int(granularity[6:])
        elif granularity not in ("tensor", "channel"):
            raise ValueError(f"granularity={granularity!r} must be 'tensor', 'channel' or 'group:N' (e.g. 'group:64').")
        if isinstance(start_step, (int, float)) and isinstance(freeze_step, type(start_step)) and freeze_step <= start_step:
            raise ValueError(f"freeze_step={freeze_step} must come after start_step={start_step}.")
        self.weight_bits, self.activation_bits = weight_bits, activation_bits
        self.weight_method = weight_method or {"int": "lsq", "ternary": "stat", "binary": "reste"}[_kind(weight_bits)]
        self.activation_method, self.granularity = activation_method, granularity
        self.targets = targets or Targets(types=["Linear", "Conv1d", "Conv2d", "Embedding"])
        self.start_step, self.freeze_step = start_step, freeze_step
        self._layers: dict[str, torch.nn.Module] = {}
        self._start, self._freeze, self._total, self._frozen_at = 0, None, 1, -1
        self._enabled = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(weight_bits=self.weight_bits, activation_bits=self.activation_bits)

    # -- set-up --------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._layers:
            return
        refuse_sharded(self, trainer)
        selection = select_targets(pl_module, self.targets, allow_tied=True)
        modules = {name.rpartition(".")[0]: m for name, m in selection.modules.items()}
        if self.granularity.startswith("group:"):
            bad = [n for n, m in modules.items() if m.weight[0].numel() % self.group_size]
            if bad:
                raise ValueError(f"{bad}: fan-in not divisible by the group size {self.group_size}; exclude them "
                                 "or pick another granularity.")
        if self.activation_bits is not None and all(type(m).__name__ == "Embedding" for m in modules.values()):
            raise ValueError(f"activation_bits={self.activation_bits} but the targets {sorted(modules)} are all Embedding "
                             "layers, whose inputs are indices: set activation_bits=None or target Linear/Conv layers.")
        skipped = prepare_(modules, self._weight_quantizer, self._input_quantizer)
        self._layers = quant_modules(pl_module)
        lines = [f"{len(self._layers)} layers quantized: {', '.join(self._layers)}"]
        lines += [f"  not quantized: {n} ({why})" for n, why in {**selection.skipped, **skipped}.items()]
        rank_zero_info("QuantizationAwareTraining: " + "\n".join(lines))
        # Quantizer buffers are computed identically on every rank: no per-step DDP broadcast.
        names = [f"{n}.{q}.{b}" for n, m in self._layers.items() for q in ("weight_quantizer", "input_quantizer")
                 if getattr(m, q, None) is not None for b, _ in getattr(m, q).named_buffers()]
        ignored = set(getattr(pl_module, "_ddp_params_and_buffers_to_ignore", ()))
        pl_module._ddp_params_and_buffers_to_ignore = sorted(ignored | set(names))

    def _weight_quantizer(self, module: torch.nn.Module) -> torch.nn.Module:
        if self.weight_bits is None:
            return torch.nn.Identity()
        method = {"ste": "binary", "reste": "binary"}.get(self.weight_method, self.weight_method)
        method = "ternary" if self.weight_bits == "ternary" else method
        granularity = self.granularity.split(":")[0]
        track = self.weight_method == "stat" or self.freeze_step is not None
        return WeightQuantizer(module.weight.shape, self.weight_bits, method, granularity, self.group_size, track)

    def _input_quantizer(self, module: torch.nn.Module) -> torch.nn.Module | None:
        if self.activation_bits is None:
            return None
        return ActivationQuantizer(self.activation_bits, self.activation_method, per_token=type(module).__name__ == "Linear")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._total = max(int(trainer.estimated_stepping_batches), 1) if math.isfinite(trainer.estimated_stepping_batches) else 1
        self._start = resolve_step(self.start_step, trainer.estimated_stepping_batches, "start_step")
        if self._start > trainer.estimated_stepping_batches:
            raise ValueError(f"start_step={self.start_step} is step {self._start}, after the last optimizer step "
                             f"({int(trainer.estimated_stepping_batches)}): quantization would never start.")
        if self.freeze_step is not None:
            self._freeze = resolve_step(self.freeze_step, trainer.estimated_stepping_batches, "freeze_step")
            if self._freeze <= self._start:
                raise ValueError(f"freeze_step={self.freeze_step} (step {self._freeze}) must come after start_step "
                                 f"(step {self._start}).")
        self._set_mode(trainer.global_step)

    # -- training ------------------------------------------------------------------------
    def _set_mode(self, step: int) -> None:
        self._enabled = step >= self._start
        progress = min(step / self._total, 1.0)
        o = 1.0 + (1.0 - math.cos(math.pi * progress / 2)) * (_RESTE_O_END - 1.0) if self.weight_method == "reste" else 1.0
        for module in self._layers.values():
            module.weight_quantizer.enabled = self._enabled
            module.weight_quantizer.o = o
            if module.input_quantizer is not None:
                module.input_quantizer.enabled = self._enabled

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        self._set_mode(step)
        if self._freeze is not None and step == self._freeze and self._frozen_at != step:
            self._frozen_at = step
            frozen = sum(m.weight_quantizer.freeze_(_FREEZE_THRESHOLD) for m in self._unique_weight_quantizers()
                         if isinstance(m.weight_quantizer, WeightQuantizer))
            rank_zero_info(f"QuantizationAwareTraining: froze {frozen} oscillating weights at step {step}.")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set_mode(trainer.global_step)

    on_test_start = on_predict_start = on_validation_start

    def _unique_weight_quantizers(self) -> list[torch.nn.Module]:
        seen: dict[int, torch.nn.Module] = {}
        for module in self._layers.values():
            seen.setdefault(id(module.weight_quantizer), module)
        return list(seen.values())

    def statistics(self) -> dict[str, float]:
        """Oscillating (EMA above the threshold) and frozen shares of the tracked weights."""
        tracked = [m.weight_quantizer for m in self._unique_weight_quantizers() if getattr(m.weight_quantizer, "track", False)]
        total = sum(q.oscillation.numel() for q in tracked)
        if not total:
            return {}
        osc = sum(int((q.oscillation > _FREEZE_THRESHOLD).sum()) for q in tracked)
        return {"oscillating": osc / total, "frozen": sum(int(q.frozen.sum()) for q in tracked) / total}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for key, value in self.statistics().items():
            pl_module.log(f"qat/{key}", value, on_step=False, on_epoch=True)
        for name, module in self._layers.items():
            wq = module.weight_quantizer
            if isinstance(wq, WeightQuantizer) and self._enabled:
                pl_module.log(f"qat/scale/{name}", wq.step_scale(module.weight).mean(), on_step=False, on_epoch=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        wdesc = "float" if self.weight_bits is None else f"W{self.weight_bits} {self.weight_method} {self.granularity}"
        adesc = "float" if self.activation_bits is None else f"A{self.activation_bits} {self.activation_method}"
        rows = [(name, f"{type(m).__name__}  {wdesc}, {'-' if m.input_quantizer is None else adesc}")
                for name, m in self._layers.items()]
        rows.append(("quantization", f"{'on' if self._enabled else 'off'} (from optimizer step {self._start})"))
        rows += [(k + " weights", f"{v:.4f}") for k, v in self.statistics().items()]
        rank_zero_info(format_table("QuantizationAwareTraining summary", rows))

    def state_dict(self) -> dict[str, Any]:
        # Scales, observed ranges and oscillation statistics are module state (in the checkpoint).
        return {"frozen_at": self._frozen_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._frozen_at = int(state_dict["frozen_at"])
