"""QuantizationAwareTraining: fake-quant weights and activations in training, integer export after.

The layer swap happens in ``setup``: before the optimizer is built (LSQ scales are
parameters the optimizer must see) and before a checkpoint is restored (keys match).
Everything the quantizers learn or observe is module state, so checkpoints carry it and a
resume is bit-exact; the callback itself only derives the mode from ``global_step``.
Under FSDP2 the swap follows ``fully_shard``: learned scales are replicated DTensors whose
gradients this callback averages once per step (``lichtenberg.core.quantization.sharded``).
With EMA / SWA / Soup attached, the quantizers' tensors are averaged too, restarted when
quantization starts (placeholders before it): see ``_averaging.restart_averages``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from ..core.checks import check_choice, check_step
from ..core.distributed import check_layout, full
from ..core.layers import KINDS, LayerKind, as_rows, layer_kind
from ..core.quantization import ACTIVATION_METHODS, ActivationQuantizer, WeightQuantizer, prepare_, quant_modules
from ..core.quantization.modules import _Quant
from ..core.quantization.sharded import average_gradients_, replicate_quantizers_
from ..core.schedules import resolve_step
from ..core.targets import Targets, select_targets
from ._averaging import restart_averages, track_added
from ._base import _Base, after_configure_model, never_acts, run_length
from ._strategy import check_strategy
from ._summary import format_table

__all__ = ["QuantizationAwareTraining"]

_WEIGHT_METHODS = {"int": ("minmax", "lsq", "stat"), "ternary": ("stat",), "binary": ("ste", "reste")}
_RESTE_O_END = 3.0  # ReSTE's final exponent (the paper's default)
_FREEZE_THRESHOLD = 0.005  # oscillation EMA above which a weight is frozen (OFQ/Nagel et al. range)


def _kind(bits: Any) -> str:
    return bits if bits in ("ternary", "binary") else "int"


class QuantizationAwareTraining(_Base):
    """Train with fake-quantized weights and layer inputs, then export integers.

    Targets default to every ``nn.Linear``, ``nn.Conv1d/2d/3d``, Hugging Face ``Conv1D`` and
    ``nn.Embedding``; every module holding a target weight under another name (a tied output
    head) is quantized with it, by the same quantizer. The log says which layers are quantized
    and why the others are not; layers that cannot be (unknown types, subclasses with their
    own forward) are warnings. Attach
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
        if weight_bits == 1 and type(weight_bits) is int:
            weight_bits = "binary"  # 1 bit is binary
        for what, bits in (("weight_bits", weight_bits), ("activation_bits", activation_bits)):
            ok = bits is None or (type(bits) is int and 2 <= bits <= 8) or (what == "weight_bits" and bits in ("ternary", "binary"))
            if not ok:
                extra = ', "ternary", "binary"' if what == "weight_bits" else ""
                low = "1..8 (1 = binary)" if what == "weight_bits" else "2..8"
                raise ValueError(f"{what}={bits!r} must be an int in {low}{extra} or None (float).")
        if weight_bits is None and activation_bits is None:
            raise ValueError("weight_bits and activation_bits are both None: nothing to quantize.")
        allowed = _WEIGHT_METHODS[_kind(weight_bits)]
        if weight_method is not None and (weight_bits is None or not any(weight_method == m for m in allowed)):
            use = "weight_method=None" if weight_bits is None else f"one of {allowed}"
            raise ValueError(f"weight_method={weight_method!r} does not apply to weight_bits={weight_bits!r}; use {use}.")
        check_choice("activation_method", activation_method, ACTIVATION_METHODS)
        if activation_bits is None and activation_method != "dynamic":
            raise ValueError(f"activation_method={activation_method!r} has no effect with activation_bits=None: "
                             "drop it or set activation_bits.")
        self.group_size = 128
        if not isinstance(granularity, str):
            raise ValueError(f"granularity={granularity!r} must be 'tensor', 'channel' or 'group:N' (e.g. 'group:64').")
        if granularity.startswith("group:") and granularity[6:].isdigit() and int(granularity[6:]) > 0:
            self.group_size = int(granularity[6:])
        elif granularity not in ("tensor", "channel"):
            raise ValueError(f"granularity={granularity!r} must be 'tensor', 'channel' or 'group:N' (e.g. 'group:64').")
        if weight_bits is None and granularity != "channel":
            raise ValueError(f"granularity={granularity!r} has no effect with weight_bits=None: drop it or set weight_bits.")
        if targets is not None and not isinstance(targets, Targets):
            raise ValueError(f"targets={targets!r} must be a Targets(types=..., include=..., exclude=...).")
        start_step = check_step("start_step", start_step)
        if freeze_step is not None:
            freeze_step = check_step("freeze_step", freeze_step)
            if _kind(weight_bits) != "int":
                raise ValueError(f"freeze_step={freeze_step} pins integer levels; weight_bits={weight_bits!r} has "
                                 "none: drop freeze_step or use weight_bits 2..8.")
        if isinstance(freeze_step, type(start_step)) and freeze_step <= start_step:
            raise ValueError(f"freeze_step={freeze_step} must come after start_step={start_step}.")
        self.weight_bits, self.activation_bits = weight_bits, activation_bits
        self.weight_method = weight_method or {"int": "lsq", "ternary": "stat", "binary": "reste"}[_kind(weight_bits)]
        self.activation_method, self.granularity = activation_method, granularity
        self.targets = targets or Targets(types=["Linear", "Conv1d", "Conv2d", "Conv3d", "Conv1D", "Embedding"])
        self.start_step, self.freeze_step = start_step, freeze_step
        self._layers: dict[str, torch.nn.Module] = {}
        self._load_hook: Any = None
        self._reset()

    def _reset(self) -> None:
        """Forget the model of an earlier fit (its layers stay prepared; their state is module state)."""
        self._layers, self._replicated = {}, []
        self._start, self._freeze, self._total, self._frozen_at = 0, None, 1, -1
        self._enabled = False
        self._restarted = False  # whether averaging callbacks restarted the quantizers' averages (see _set_mode)
        self._waiting: list[str] = []  # layers whose input scales are still to observe a batch, then restart

    @property
    def state_key(self) -> str:
        return self._generate_state_key(weight_bits=self.weight_bits, activation_bits=self.activation_bits)

    # -- set-up --------------------------------------------------------------------------
    def _bound_to(self, pl_module: pl.LightningModule) -> bool:
        if not self._layers:
            return False
        own = dict(pl_module.named_modules())
        return all(own.get(n) is m for n, m in self._layers.items())

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(self, trainer)
        if self._load_hook is None:
            self._load_hook = pl_module.register_load_state_dict_pre_hook(self._check_loaded_quantizers)
        if stage != "fit" and self._bound_to(pl_module):
            return
        self._reset()
        after_configure_model(pl_module, partial(self._bind, pl_module, trainer))

    def _bind(self, pl_module: pl.LightningModule, trainer: pl.Trainer) -> None:
        selection = select_targets(pl_module, self.targets)
        # One quantizer per tensor: every module holding a target weight (tied aliases) is swapped.
        modules = {name.rpartition(".")[0]: m for name, m in selection.modules.items()}
        for others in selection.aliases.values():
            modules.update({name.rpartition(".")[0]: m for name, m in others.items()})
        for name, module in modules.items():
            check_layout(f"{name}.weight", module.weight)
        if self.granularity.startswith("group:"):
            bad = [n for n, m in modules.items() if m.weight.shape[1:].numel() % self.group_size]
            if bad:
                raise ValueError(f"{bad}: fan-in not divisible by the group size {self.group_size}; exclude them "
                                 "or pick another granularity.")
        if self.activation_bits is not None and all(layer_kind(m)[0].features is None for m in modules.values()):
            raise ValueError(f"activation_bits={self.activation_bits} but the targets {sorted(modules)} are all Embedding "
                             "layers, whose inputs are indices: set activation_bits=None or target Linear/Conv layers.")
        for name, module in modules.items():  # a model prepared by an earlier fit keeps its quantizers ...
            if isinstance(module, _Quant) and not self._same_quantizers(module):  # ... if they are ours
                raise ValueError(f"{name} is already fake-quantized with other settings ({module.weight_quantizer.extra_repr()}): "
                                 "call lichtenberg.core.quantization.unprepare_(model) first, or use the same settings.")
        skipped = prepare_(modules, self._weight_quantizer, self._input_quantizer)
        self._layers = {n: m for n, m in quant_modules(pl_module).items() if n in modules}
        self._replicated = replicate_quantizers_(self._layers)  # FSDP2 only: see core.quantization.sharded
        lines = [f"{len(self._layers)} layers quantized: {', '.join(self._layers)}"]
        lines += [f"  not quantized: {n} ({why})" for n, why in selection.skipped.items()]
        rank_zero_info("QuantizationAwareTraining: " + "\n".join(lines))
        warnings = [f"{n} is not quantized: {why}" for n, why in skipped.items()] + selection.warnings(self.targets.types)
        for warning in warnings:
            rank_zero_warn(f"QuantizationAwareTraining: {warning}")
        # Quantizer buffers are computed identically on every rank: no per-step DDP broadcast.
        names = [f"{n}.{q}.{b}" for n, m in self._layers.items() for q in ("weight_quantizer", "input_quantizer")
                 if getattr(m, q, None) is not None for b, _ in getattr(m, q).named_buffers()]
        ignored = set(getattr(pl_module, "_ddp_params_and_buffers_to_ignore", ()))
        pl_module._ddp_params_and_buffers_to_ignore = sorted(ignored | set(names))
        track_added(trainer, pl_module)  # averaging callbacks bound before the swap average the scales too

    def _check_loaded_quantizers(self, module: torch.nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        """A checkpoint of other quantizers (LSQ instead of dynamic inputs, other scale shapes) is
        refused by name before torch's key or shape errors; other bits with the same tensors are
        caught by the callback state's config."""
        own = module.state_dict()
        for name in self._layers:
            for part, args in (("weight_quantizer", "weight_bits / weight_method / granularity"),
                               ("input_quantizer", "activation_bits / activation_method")):
                head = f"{name}.{part}."
                mine = {k: tuple(v.shape) for k, v in own.items() if k.startswith(head)}
                saved = {k[len(prefix):]: tuple(v.shape) for k, v in state_dict.items() if k.startswith(prefix + head)}
                if mine != saved and saved:
                    raise ValueError(
                        f"QuantizationAwareTraining: the checkpoint was trained with other settings ({args}): its "
                        f"{name}.{part} holds {sorted(saved)}, this run's {sorted(mine) or 'nothing'}. Resume with the "
                        "checkpoint's settings, or start a new fit from its weights to change them."
                    )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None

    def _same_quantizers(self, module: torch.nn.Module) -> bool:
        kind = KINDS[module.target_name]
        wanted = self._weight_quantizer(module, kind)
        ours = getattr(wanted, "spec", None) == getattr(module.weight_quantizer, "spec", None)
        wanted_in = self._input_quantizer(module) if kind.features is not None else None
        return ours and getattr(wanted_in, "spec", None) == getattr(module.input_quantizer, "spec", None)

    def _weight_quantizer(self, module: torch.nn.Module, kind: LayerKind) -> torch.nn.Module:
        if self.weight_bits is None:
            return torch.nn.Identity()
        method = {"ste": "binary", "reste": "binary"}.get(self.weight_method, self.weight_method)
        method = "ternary" if self.weight_bits == "ternary" else method
        granularity = self.granularity.split(":")[0]
        track = self.weight_method == "stat" or self.freeze_step is not None
        return WeightQuantizer(as_rows(module.weight, kind).shape, self.weight_bits, method, granularity, self.group_size,
                               track)

    def _input_quantizer(self, module: torch.nn.Module) -> torch.nn.Module | None:
        if self.activation_bits is None:
            return None
        per_token = layer_kind(module)[0].features == -1  # Linear-like: one range per token
        return ActivationQuantizer(self.activation_bits, self.activation_method, per_token=per_token)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = run_length(trainer)
        self._total = max(total or 1, 1)
        self._start = resolve_step(self.start_step, total, "start_step")
        if total is not None and self._start >= total:
            never_acts(trainer, f"start_step={self.start_step} is step {self._start}, after the last optimizer step "
                       f"({total - 1}): quantization would never start.")
        if self.freeze_step is not None:
            self._freeze = resolve_step(self.freeze_step, total, "freeze_step")
            if self._freeze <= self._start:
                raise ValueError(f"freeze_step={self.freeze_step} (step {self._freeze}) must come after start_step "
                                 f"(step {self._start}).")
            if total is not None and self._freeze >= total:
                never_acts(trainer, f"freeze_step={self.freeze_step} is step {self._freeze}, but training stops at step "
                           f"{total}: nothing would be frozen. Freeze earlier or train longer.")
        self._set_mode(trainer.global_step)

    # -- training ------------------------------------------------------------------------
    def _set_mode(self, step: int, trainer: pl.Trainer | None = None) -> None:
        """Switch the quantizers on or off (tensor mirrors written only on a change) and, when on,
        initialise weight scales here, outside the forward: a compiled forward never branches on it.
        When quantization starts in a fit (``trainer`` given: global_step is final) the averaging
        callbacks restart the averages of the quantizers' tensors, whose earlier values were
        placeholders no trained model used; input scales once they observed their first batch."""
        self._enabled = step >= self._start
        progress = min(step / self._total, 1.0)
        o = 1.0 + (1.0 - math.cos(math.pi * progress / 2)) * (_RESTE_O_END - 1.0) if self.weight_method == "reste" else 1.0
        for module in self._layers.values():
            wq = module.weight_quantizer
            if self._enabled and isinstance(wq, WeightQuantizer) and not wq._ready:  # once per run (and after a load)
                wq.initialize_(as_rows(full(module.weight), KINDS[module.target_name]))  # FSDP2: one gather, all ranks
            wq.enabled = self._enabled
            wq.o = o
            if module.input_quantizer is not None:
                module.input_quantizer.enabled = self._enabled
        if trainer is not None and self._enabled and not self._restarted and trainer.state.fn == "fit":
            self._restarted = True  # callback state: a resume past this point does not restart again
            restart_averages(trainer, (p for m in self._unique_weight_quantizers() for p in m.weight_quantizer.parameters()))
            self._waiting = [n for n, m in self._layers.items() if m.input_quantizer is not None
                             and any(True for _ in m.input_quantizer.parameters())]
            self._restart_observed(trainer)

    def _restart_observed(self, trainer: pl.Trainer, *args: Any) -> None:
        """Restart the averages of the input scales that observed their first quantized batch (a
        Python flag, no sync); called before the step's averaging updates and after validation batches
        (quantization may start at a validation, before the averages held for it are swapped out)."""
        done = [n for n in self._waiting if self._layers[n].input_quantizer._signed is not None]
        if done:
            self._waiting = [n for n in self._waiting if n not in done]
            restart_averages(trainer, (p for n in done for p in self._layers[n].input_quantizer.parameters()))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        self._set_mode(step, trainer)
        if self._freeze is not None and step == self._freeze and self._frozen_at != step:
            self._frozen_at = step
            frozen = sum(m.weight_quantizer.freeze_(_FREEZE_THRESHOLD) for m in self._unique_weight_quantizers()
                         if isinstance(m.weight_quantizer, WeightQuantizer))
            rank_zero_info(f"QuantizationAwareTraining: froze {frozen} oscillating weights at step {step}.")

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        average_gradients_(self._replicated)  # before the module's hook and clipping, as DDP's average
        self._restart_observed(trainer)

    on_validation_batch_end = _restart_observed

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set_mode(trainer.global_step, trainer)

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
                rows = as_rows(full(module.weight), KINDS[module.target_name])  # FSDP2: a gather per epoch
                pl_module.log(f"qat/scale/{name}", wq.step_scale(rows).mean(), on_step=False, on_epoch=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        wdesc = "float" if self.weight_bits is None else f"W{self.weight_bits} {self.weight_method} {self.granularity}"
        adesc = "float" if self.activation_bits is None else f"A{self.activation_bits} {self.activation_method}"
        rows = [(name, f"{type(m).__name__}  {wdesc}, {'-' if m.input_quantizer is None else adesc}")
                for name, m in self._layers.items()]
        rows.append(("quantization", f"{'on' if self._enabled else 'off'} (from optimizer step {self._start})"))
        rows += [(k + " weights", f"{v:.4f}") for k, v in self.statistics().items()]
        rank_zero_info(format_table("QuantizationAwareTraining summary", rows))

    def _state(self) -> dict[str, Any]:
        # Scales, observed ranges and oscillation statistics are module state (in the checkpoint).
        return {"frozen_at": self._frozen_at, "restarted": self._restarted, "waiting": list(self._waiting)}

    def _load_state(self, state_dict: dict[str, Any]) -> None:
        self._frozen_at = int(state_dict["frozen_at"])
        self._restarted, self._waiting = bool(state_dict.get("restarted")), list(state_dict.get("waiting", []))
