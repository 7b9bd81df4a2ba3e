"""DynamicSparseTraining: train sparse from step 0 (static, SET, RigL, GraNet, SRigL).

Same mask engine as GradualPruning. Masks are drawn at set-up from a generator seeded
identically on every rank; updates read the dense gradients in ``on_before_optimizer_step``
(after accumulation and DDP's all-reduce, before they are masked) and only on update steps.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from ..core.schedules import SparsitySchedule
from ..core.sparsity import (
    cosine_drop_fraction,
    drop_and_grow,
    erk_densities,
    fanin_masks,
    magnitude_score,
    prune_masks,
    random_masks,
    srigl_update,
)
from ..core.targets import Targets
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
        sparsity: fraction of the target weights that are zero, in [0, 1) (for "granet" the
            final one, reached at ``schedule.end`` along the cubic ramp).
        method: "static" (random masks, never updated), "set" (grow at random), "rigl" (grow
            by dense gradient), "granet" (gradual global magnitude pruning from
            ``schedule.initial`` to ``sparsity`` + RigL drop/grow) or "srigl" (RigL with a constant
            fan-in per neuron and neuron ablation).
        schedule: update frequency (``every_n_steps``, the papers' delta T = 100), ``start`` and
            ``end`` (updates stop there: 75% of training by default), and for "granet" the
            ramp ``kind`` and ``initial`` sparsity (0 = dense-to-sparse).
        drop_fraction: fraction of each layer's active weights replaced at the first update,
            in (0, 1); the papers use 0.3.
        allocation: per-layer densities, "erk" (Erdos-Renyi-Kernel) or "uniform".
        targets: which weights (default: weight of every Linear, Conv1d and Conv2d).
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
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity={sparsity} must lie in [0, 1): it is the fraction of weights that are zero.")
        if method not in _METHODS:
            raise ValueError(f"method={method!r} must be one of {', '.join(_METHODS)}.")
        if not 0.0 < drop_fraction < 1.0:
            raise ValueError(f"drop_fraction={drop_fraction} must lie in (0, 1); the papers use 0.3.")
        if allocation not in ("erk", "uniform"):
            raise ValueError(f"allocation={allocation!r} must be 'erk' or 'uniform'.")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma={gamma} must lie in [0, 1]; SRigL uses 0.3.")
        super().__init__(targets)
        self.sparsity, self.method, self.drop_fraction = sparsity, method, drop_fraction
        self.schedule = schedule or SparsitySchedule(kind="cubic", start=0, end=0.75, every_n_steps=100)
        if method == "granet" and self.schedule.initial > sparsity:
            raise ValueError(f"schedule initial={self.schedule.initial} exceeds sparsity={sparsity}: GraNet only prunes.")
        self.allocation, self.seed, self.gamma = allocation, seed, gamma
        self._generator = self._new_generator(None)
        self._end = 0
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
        assert self.engine is not None
        params = self.engine.params
        shapes = {n: p.shape for n, p in params.items()}
        start = self.schedule.initial if self.method == "granet" else self.sparsity
        if start > 0:
            if self.allocation == "erk":
                densities = erk_densities(shapes, 1.0 - start)
            else:
                densities = {n: 1.0 - start for n in shapes}
            draw = fanin_masks if self.method == "srigl" else random_masks
            masks = draw(shapes, densities, self._generator)
            self.engine.set_masks_({n: m.to(params[n].device) for n, m in masks.items()})
        self._ever = {n: m.clone() for n, m in self.engine.masks.items()}
        self._alive = {n: torch.ones(p.shape[0], dtype=torch.bool, device=p.device) for n, p in params.items()}
        density = {n: f"{float(m.float().mean()):.3f}" for n, m in self.engine.masks.items()}
        rank_zero_info(f"DynamicSparseTraining: {self.method}, initial densities {density}.")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        start, self._end = self.schedule.resolve(trainer.estimated_stepping_batches)
        self._first = start
        device = next(iter(self.engine.params.values())).device
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
        assert self.engine is not None
        params, masks = self.engine.params, self.engine.masks
        fraction = cosine_drop_fraction(step, self._first, self._end, self.drop_fraction)
        new = dict(masks)
        if self.method == "granet":
            target = self.schedule.value(step, self.sparsity, self._first, self._end)
            new = prune_masks({n: magnitude_score(p) for n, p in params.items()}, masks, target, "global")
        for name, param in params.items():
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            if self.method == "srigl":
                new[name], self._alive[name] = srigl_update(param, grad, masks[name], self._alive[name], fraction, self.gamma)
                continue
            n = round(fraction * int(new[name].sum()))
            if n == 0:
                continue
            if self.method == "set":
                scores = torch.rand(param.shape, generator=self._generator).to(param.device)
            else:
                scores = grad.abs()
            new[name] = drop_and_grow(param, new[name], n, scores)
        active = sum(int(m.sum()) for m in masks.values())
        changed = self.engine.set_masks_(new, trainer.optimizers)
        for name, mask in masks.items():
            self._ever[name] |= mask
        self._updates += 1
        self._churn = sum(changed.values()) / 2 / max(active, 1)  # replaced share of the active weights
        self._log_density(pl_module, "dst")
        pl_module.log("dst/churn", self._churn, on_step=True, on_epoch=False)
        pl_module.log("dst/itop", self.itop, on_step=True, on_epoch=False)
        pl_module.log("dst/drop_fraction", fraction, on_step=True, on_epoch=False)
        if self.method == "srigl":
            pl_module.log("dst/ablated", float(self.ablated), on_step=True, on_epoch=False)

    @property
    def itop(self) -> float:
        """In-time over-parameterisation: the fraction of target weights ever active."""
        total = sum(t.numel() for t in self._ever.values())
        return sum(int(t.sum()) for t in self._ever.values()) / max(total, 1)

    @property
    def ablated(self) -> int:
        """SRigL: output neurons ablated so far."""
        return sum(int((~a).sum()) for a in self._alive.values())

    # -- end of fit ------------------------------------------------------------------------
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.engine is not None
        per_layer, total = self.engine.sparsity_report()
        rows = [(n, f"{tuple(self.engine.params[n].shape)}  density {1 - s:.4f}") for n, s in per_layer.items()]
        rows += [
            ("global density", f"{1 - total:.4f} (target {1 - self.sparsity:.4f})"),
            ("mask updates", f"{self._updates} (last churn {self._churn:.4f})"),
            ("in-time over-parameterisation", f"{self.itop:.4f} of the weights were active at some point"),
        ]
        if self.method == "srigl":
            rows.append(("ablated neurons", str(self.ablated)))
        rank_zero_info(format_table(f"DynamicSparseTraining ({self.method}) summary", rows))

    def state_dict(self) -> dict[str, Any]:
        # Masks travel as model buffers; the generator, counters and ITOP / ablation state live here.
        return {
            "generator": self._generator.get_state(),
            "updates": self._updates,
            "churn": self._churn,
            "ever": dict(self._ever),
            "alive": dict(self._alive),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._generator.set_state(state_dict["generator"])
        self._updates, self._churn = int(state_dict["updates"]), float(state_dict["churn"])
        self._ever, self._alive = dict(state_dict["ever"]), dict(state_dict["alive"])
