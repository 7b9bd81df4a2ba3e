"""DynamicSparseTraining: train sparse from step 0 (static, SET, RigL, GraNet, SRigL).

Same mask engine as GradualPruning. Masks are drawn when a fit binds to a model that has
none yet (a model that already carries masks keeps them), from a generator seeded
identically on every rank; updates read the dense gradients in ``on_before_optimizer_step``
(after accumulation and DDP's all-reduce, before they are masked) and only on update steps.
Non-finite gradients never become growth scores.

Under FSDP2 the masks and the ever-active record are DTensor buffers (``<leaf>_mask``,
``<leaf>_ever``) saved by the distributed checkpoint; random draws are whole tensors every
rank draws alike and keeps its rows of; RigL reads its reduce-scattered gradient shard.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from ..core.checks import check_choice, check_int, check_real
from ..core.distributed import local
from ..core.schedules import SparsitySchedule
from ..core.sparsity import (
    cosine_drop_fraction,
    drop_and_grow,
    erk_densities,
    fanin_masks,
    growth_scores,
    magnitude_score,
    prune_masks,
    random_masks,
    random_scores,
    srigl_update,
)
from ..core.sparsity.engine import global_sum_tensor, global_sums
from ..core.targets import Targets
from ._base import never_acts, run_length
from ._sparsity import _Sparsity
from ._summary import format_table

__all__ = ["DynamicSparseTraining"]

_METHODS = ("static", "set", "rigl", "granet", "srigl")


class DynamicSparseTraining(_Sparsity):
    """Sparse training from scratch: fixed random masks, or masks that drop and regrow weights.

    Updates happen every ``schedule.every_n_steps`` optimizer steps in (start, end); the drop
    fraction decays from ``drop_fraction`` to 0 on a cosine over [start, end]. Grown weights
    start at zero and the optimizer state of every changed slot is reset.

    Args:
        sparsity: fraction of the target weights that are zero, in (0, 1) (for "granet" the
            final one, reached at ``schedule.end`` along the cubic ramp).
        method: "static" (random masks, never updated), "set" (grow at random), "rigl" (grow
            by dense gradient), "granet" (gradual global magnitude pruning from
            ``schedule.initial`` to ``sparsity`` + RigL drop/grow) or "srigl" (RigL with a constant
            fan-in per neuron and neuron ablation).
        schedule: update frequency (``every_n_steps``, the papers' delta T = 100), ``start`` and
            ``end`` (updates stop there: 75% of training by default), and for "granet" the
            ramp ``kind`` and ``initial`` sparsity (0 = dense-to-sparse). At least one update
            must fit between start and end.
        drop_fraction: fraction of each layer's active weights replaced at the first update,
            in (0, 1); the papers use 0.3.
        allocation: per-layer densities, "erk" (Erdos-Renyi-Kernel) or "uniform".
        targets: which weights (default: weight of every Linear, Conv1d/2d/3d and Hugging Face
            Conv1D).
        seed: seed of the mask generator (same on every rank; its state is checkpointed).
        gamma: SRigL's saliency threshold for neuron ablation (the paper: 0.3).

    Example:
        >>> trainer = Trainer(callbacks=[DynamicSparseTraining(sparsity=0.9, method="rigl")])
    """

    def __init__(
        self,
        sparsity: float = 0.9,
        method: Literal["static", "set", "rigl", "granet", "srigl"] = "rigl",
        schedule: SparsitySchedule | None = None,
        drop_fraction: float = 0.3,
        allocation: Literal["erk", "uniform"] = "erk",
        targets: Targets | None = None,
        seed: int = 0,
        gamma: float = 0.3,
    ) -> None:
        self.sparsity = check_real("DynamicSparseTraining sparsity", sparsity, low=0.0, high=1.0, low_open=True,
                                   high_open=True, fix="it is the fraction of weights that are zero, e.g. 0.9")
        self.method = check_choice("DynamicSparseTraining method", method, _METHODS)
        self.drop_fraction = check_real("DynamicSparseTraining drop_fraction", drop_fraction, low=0.0, high=1.0,
                                        low_open=True, high_open=True, fix="the papers use 0.3")
        self.allocation = check_choice("DynamicSparseTraining allocation", allocation, ("erk", "uniform"))
        self.gamma = check_real("DynamicSparseTraining gamma", gamma, low=0.0, high=1.0, fix="SRigL uses 0.3")
        self.seed = check_int("DynamicSparseTraining seed", seed, low=0, high=2**63 - 1)
        if method == "static" and drop_fraction != 0.3:
            raise ValueError(f"drop_fraction={drop_fraction} has no effect with method='static' (masks never change).")
        if method != "srigl" and gamma != 0.3:
            raise ValueError(f"gamma={gamma} is SRigL's ablation threshold and has no effect with method={method!r}.")
        if schedule is not None and not isinstance(schedule, SparsitySchedule):
            raise ValueError(f"schedule={schedule!r} must be a SparsitySchedule(start=..., end=..., every_n_steps=...).")
        self.schedule = schedule or SparsitySchedule(kind="cubic", start=0, end=0.75, every_n_steps=100)
        if method == "granet" and self.schedule.initial > sparsity:
            raise ValueError(f"schedule initial={self.schedule.initial} exceeds sparsity={sparsity}: GraNet only prunes.")
        super().__init__(targets)

    def _reset(self) -> None:
        super()._reset()
        self._generator = self._new_generator(None)
        self._end = self._first = 0
        self._ever: dict[str, torch.Tensor] = {}  # in-time over-parameterisation: ever active
        self._alive: dict[str, torch.Tensor] = {}  # SRigL: neurons not ablated
        self._updates, self._churn = 0, 0.0

    def _new_generator(self, state: torch.Tensor | None) -> torch.Generator:
        generator = torch.Generator().manual_seed(self.seed)
        if state is not None:
            generator.set_state(state)
        return generator

    # ddp_spawn pickles callbacks with torch.multiprocessing, which cannot send a torch.Generator
    # (nor a temporary tensor, whose shared memory is freed before the child maps it): send bytes.
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_generator": self._generator.get_state().numpy().tobytes()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._generator = self._new_generator(torch.frombuffer(bytearray(state["_generator"]), dtype=torch.uint8))

    @property
    def state_key(self) -> str:
        return self._generate_state_key(sparsity=self.sparsity, method=self.method)

    # -- set-up --------------------------------------------------------------------------
    def _init_masks(self, trainer: pl.Trainer) -> None:
        engine = self.engine
        assert engine is not None
        rows = {n: engine.rows(n, p) for n, p in engine.params.items()}  # [out, in, ...]
        shapes = {n: r.shape for n, r in rows.items()}
        start = self.schedule.initial if self.method == "granet" else self.sparsity
        if start > 0:
            if self.allocation == "erk":
                densities = erk_densities(shapes, 1.0 - start)
            else:
                densities = {n: 1.0 - start for n in shapes}
            draw = fanin_masks if self.method == "srigl" else random_masks
            masks = draw(shapes, densities, self._generator, like=rows)  # drawn whole, each rank keeps its rows
            # a model that already carries sparse masks (a second fit, a sparse checkpoint) keeps them;
            # all-ones masks (new, or attached by a validate before this fit) are drawn
            dense = [n for n, k in engine.kept().items() if k == engine.masks[n].numel()]
            engine.set_masks_({n: engine.from_rows(n, masks[n]) for n in dense})
        self._ever = {n: m.clone() for n, m in engine.masks.items()}
        if self._sharded:  # DTensor shards: DCP restores them, callback state would hold rank 0's
            self._weight_buffers("ever", self._ever)
        self._alive = {n: torch.ones(r.shape[0], dtype=torch.bool, device=local(r).device) for n, r in rows.items()}
        density = {n: f"{k / engine.masks[n].numel():.3f}" for n, k in engine.kept().items()}
        rank_zero_info(f"DynamicSparseTraining: {self.method}, initial densities {density}.")

    def _rebind_values(self, trainer: pl.Trainer) -> None:
        self._generator = self._new_generator(None)  # the draws a run bound to real weights makes
        super()._rebind_values(trainer)

    def _resolve(self, trainer: pl.Trainer) -> None:
        self._first, self._end = self.schedule.resolve(run_length(trainer), squeeze=bool(trainer.fast_dev_run))
        every = self.schedule.every_n_steps
        if self.method != "static" and self._first + every >= self._end:
            never_acts(
                trainer,
                f"DynamicSparseTraining({self.method!r}) would never update its masks: schedule "
                f"start={self.schedule.start}, end={self.schedule.end}, every_n_steps={every}: the first update is at "
                f"step {self._first + every} (start {self._first} + every_n_steps {every}), but updates stop at step "
                f"{self._end}. Set schedule.every_n_steps <= {max(self._end - self._first - 1, 1)} or train longer "
                "(or use method='static')."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        device = local(next(iter(self.engine.params.values()))).device
        if self._sharded:  # the device move or a restore replaced the buffers
            self._ever = self._read_buffers("ever")
        self._ever = {n: t.to(device) for n, t in self._ever.items()}
        self._alive = {n: t.to(device) for n, t in self._alive.items()}

    # -- training ------------------------------------------------------------------------
    def _due(self, step: int) -> bool:
        if self.method == "static":
            return False
        if self.method == "granet" and step == self._end:  # the ramp's last prune, no regrowth
            return True
        return self._first < step < self._end and (step - self._first) % self.schedule.every_n_steps == 0

    @torch.no_grad()
    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        engine = self.engine
        assert engine is not None
        params, masks = engine.params, engine.masks
        fraction = cosine_drop_fraction(step, self._first, self._end, self.drop_fraction)
        new = dict(masks)
        if self.method == "granet":
            target = self.schedule.value(step, self.sparsity, self._first, self._end)
            new = prune_masks({n: magnitude_score(p) for n, p in params.items()}, masks, target, "global")
        kept = dict(zip(new, global_sums(list(new.values()))))  # one all-reduce for all layers
        grow: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        for name, param in params.items():
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            if self.method == "srigl":  # constant fan-in: along the inputs of [out, in, ...] rows
                mask, self._alive[name] = srigl_update(engine.rows(name, param), engine.rows(name, grad),
                                                       engine.rows(name, masks[name]), self._alive[name], fraction,
                                                       self.gamma)
                new[name] = engine.from_rows(name, mask)
                continue
            n = round(fraction * kept[name])
            if n:  # SET: the whole draw on every rank (identical), each keeps its rows
                grow[name] = random_scores(param, self._generator) if self.method == "set" else growth_scores(grad)
                counts[name] = n
        if counts:  # all layers at once: one set of collectives per update under FSDP2
            new.update(drop_and_grow({n: params[n] for n in counts}, {n: new[n] for n in counts}, counts, grow))
        # weights active before the update (for the churn); without GraNet's prune, `kept` counted them
        active = sum((engine.kept() if self.method == "granet" else kept).values())
        changed = engine.set_masks_(new, trainer.optimizers)
        for name, mask in masks.items():
            local(self._ever[name]).logical_or_(local(mask))
        self._updates += 1
        self._churn = sum(changed.values()) / 2 / max(active, 1)  # replaced share of the active weights
        self._log_density(pl_module, "dst")
        pl_module.log("dst/churn", self._churn, on_step=True, on_epoch=False)
        pl_module.log("dst/itop", self._itop_tensor().float(), on_step=True, on_epoch=False)
        pl_module.log("dst/drop_fraction", fraction, on_step=True, on_epoch=False)
        if self.method == "srigl":
            pl_module.log("dst/ablated", float(self.ablated), on_step=True, on_epoch=False)

    @property
    def itop(self) -> float:
        """In-time over-parameterisation: the fraction of target weights ever active."""
        return float(self._itop_tensor()) if self._ever else 0.0

    def _itop_tensor(self) -> torch.Tensor:
        """:attr:`itop` on the masks' device (no host sync: to log)."""
        total = sum(t.numel() for t in self._ever.values())
        return global_sum_tensor(list(self._ever.values())).sum().double() / max(total, 1)

    @property
    def ablated(self) -> int:
        """SRigL: output neurons ablated so far."""
        return sum(int((~a).sum()) for a in self._alive.values())

    # -- end of fit ------------------------------------------------------------------------
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        engine = self.engine
        assert engine is not None
        per_layer, total = engine.sparsity_report()
        rows = [(" = ".join(engine.names(n)), f"{tuple(engine.params[n].shape)}  density {1 - s:.4f}")
                for n, s in per_layer.items()]
        rows += [
            ("global density", f"{1 - total:.4f} (target {1 - self.sparsity:.4f})"),
            ("mask updates", f"{self._updates} (last churn {self._churn:.4f})"),
            ("in-time over-parameterisation", f"{self.itop:.4f} of the weights were active at some point"),
        ]
        if self.method == "srigl":
            rows.append(("ablated neurons", str(self.ablated)))
        rank_zero_info(format_table(f"DynamicSparseTraining ({self.method}) summary", rows))

    def _state(self) -> dict[str, Any]:
        # Masks travel as model buffers; the generator, counters and ITOP / ablation state live here.
        return {
            "generator": self._generator.get_state(),
            "updates": self._updates,
            "churn": self._churn,
            "ever": {} if self._sharded else dict(self._ever),  # FSDP2: in `<leaf>_ever` buffers
            "alive": dict(self._alive),
        }

    def _load_state(self, state_dict: dict[str, Any]) -> None:
        self._generator.set_state(state_dict["generator"])
        self._updates, self._churn = int(state_dict["updates"]), float(state_dict["churn"])
        self._alive = dict(state_dict["alive"])
        if self.engine is not None and self.engine.params:  # ModelParallelStrategy restores after on_fit_start
            device = local(next(iter(self.engine.params.values()))).device
            self._alive = {n: t.to(device) for n, t in self._alive.items()}
        if not self._sharded:
            self._ever = dict(state_dict["ever"])
