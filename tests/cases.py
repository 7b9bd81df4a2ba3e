"""The contract registry: every public callback with a canonical config.

``tests/test_contract.py`` runs the generic tests over ``CASES`` (fit, state round-trip,
crash-resume bit-exact, 2-process DDP, pairwise composition, bf16 / accumulation, CLI YAML).
A new callback is not done until it has a ``Case`` here.

Everything here is importable at module level because ``ddp_spawn`` pickles it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from lichtenberg.callbacks import (
    EMA,
    SWA,
    DataPruning,
    DynamicSparseTraining,
    GradualPruning,
    QuantizationAwareTraining,
    SampleReweighting,
    Soup,
    weighted_loss,
)
from lichtenberg.core.quantization import quant_modules
from lichtenberg.core.schedules import SparsitySchedule
from lichtenberg.core.sparsity import erk_densities

__all__ = ["CASES", "INCOMPATIBLE", "TRAINER", "Case", "fit_tiny", "active", "EpochShuffle", "TinyData", "TinyModel", "StateDump", "Crash", "flat_state"]

STEPS_PER_EPOCH = 12  # 96 samples / batch 8
EPOCHS = 4


def _averaging_updates(cb, trainer) -> int:
    """Updates EMA / SWA must have made, derived from the trainer's step counts."""
    steps, per_epoch = trainer.global_step, trainer.global_step // trainer.max_epochs
    if isinstance(cb, EMA):
        return sum(1 for s in range(1, steps + 1) if s > cb.start_step and s % cb.every_n_steps == 0)
    start = int(cb.start * steps)
    return sum(1 for e in range(trainer.max_epochs) if (e + 1) * per_epoch > start)


def check_averaging(cb, trainer, model) -> None:
    state = cb.state_dict()
    assert state["num_updates"] == _averaging_updates(cb, trainer) > 0
    assert cb.raw_weights is not None, "after fit the module holds the averaged weights"
    for name, tensor in model.state_dict().items():
        if name in state["tensors"]:
            assert torch.equal(tensor, state["tensors"][name].to(tensor.dtype)), name
    assert any(not torch.equal(p, cb.raw_weights[n]) for n, p in model.named_parameters()), "average == last iterate"


def check_pruning(cb, trainer, model) -> None:
    assert trainer.global_step >= cb._end, "the schedule must have finished"
    masks, params = cb.engine.masks, cb.engine.params
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round((1 - cb.sparsity) * total)  # global (LAMP): exact
    for name, param in params.items():
        assert (param[~masks[name]] == 0).all(), f"{name}: a pruned weight is non-zero"
    events = [t for t in range(trainer.global_step) if cb.schedule.is_event(t, cb._start, cb._end)]
    assert cb.state_dict()["events"] == len(events) > 1


def check_dst(cb, trainer, model) -> None:
    masks, params = cb.engine.masks, cb.engine.params
    shapes = {n: p.shape for n, p in params.items()}
    densities = erk_densities(shapes, 1 - cb.sparsity)
    for name, param in params.items():
        assert int(masks[name].sum()) == round(densities[name] * param.numel()), f"{name}: density drifted"
        assert (param[~masks[name]] == 0).all(), f"{name}: a masked weight is non-zero"
    due = [t for t in range(trainer.global_step) if cb._due(t)]
    assert cb.state_dict()["updates"] == len(due) > 1
    assert cb.itop > 1 - cb.sparsity, "RigL must have explored weights beyond its initial mask"


def check_qat(cb, trainer, model) -> None:
    layers = quant_modules(model)
    assert set(layers) == {"net.0", "net.3"}
    for name, layer in layers.items():
        wq, aq = layer.weight_quantizer, layer.input_quantizer
        assert wq.enabled and aq.enabled and bool(wq.initialized) and bool(aq.initialized), name
        assert not torch.equal(wq.scale, torch.ones_like(wq.scale)), f"{name}: LSQ scale never initialised"
        rows = layer.quantized_weight().detach().reshape(layer.weight.shape[0], -1)
        assert all(r.unique().numel() <= 2**cb.weight_bits for r in rows), f"{name}: more levels than 2^bits"
    assert trainer.global_step >= cb._start > 0


def check_reweighting(cb, trainer, model) -> None:
    batches = trainer.global_step * trainer.accumulate_grad_batches
    assert cb.state_dict()["batches_weighted"] == batches - cb.warmup_steps * trainer.accumulate_grad_batches > 0
    ess = trainer.callback_metrics["reweight/ess"]
    assert 0 < float(ess) < 1.0, "linupper weights are not uniform"


def check_data_pruning(cb, trainer, model) -> None:
    full = 96 * trainer.max_epochs
    state = cb.state_dict()
    assert state["forwarded"] < 0.9 * full, "the pruned epochs must be shorter"
    assert bool(state["seen"].all()) and trainer.global_step < STEPS_PER_EPOCH * trainer.max_epochs


def check_soup(cb, trainer, model) -> None:
    state = cb.state_dict()
    per_epoch = trainer.global_step // trainer.max_epochs
    candidates = sum(1 for e in range(trainer.max_epochs) if (e + 1) * per_epoch > cb._start_step)
    assert state["candidates"] == candidates > cb.keep == len(state["slots"]), (state["candidates"], state["slots"])
    assert torch.isfinite(state["scores"]).all() and len(state["scores"]) == cb.keep
    kept, order = state["kept"], [s["slot"] for s in state["slots"]]
    assert [s["step"] for s in state["slots"]] == sorted(s["step"] for s in state["slots"]), "kept oldest first"
    for name, param in model.named_parameters():  # the module holds the mean of the kept snapshots, exactly
        expected = kept[name][order[0]].clone()
        for slot in order[1:]:
            expected += kept[name][slot]
        expected /= len(order)
        assert torch.equal(param.detach(), expected.to(param.dtype)) and torch.equal(state["tensors"][name], expected), name
    assert cb.raw_weights is not None and cb._bn_seen == trainer.num_training_batches, "BatchNorm re-estimated"


def active(cb) -> bool:
    """Whether a callback did anything during fit (for pairwise runs)."""
    if isinstance(cb, GradualPruning):
        return cb.state_dict()["events"] > 0
    if isinstance(cb, DynamicSparseTraining):
        return cb.state_dict()["updates"] > 0
    if isinstance(cb, QuantizationAwareTraining):
        return cb._enabled
    if isinstance(cb, SampleReweighting):
        return cb.state_dict()["batches_weighted"] > 0
    if isinstance(cb, DataPruning):
        return cb.state_dict()["forwarded"] < STEPS_PER_EPOCH * 8 * EPOCHS  # fewer samples than full epochs
    return cb.state_dict()["num_updates"] > 0


@dataclasses.dataclass(frozen=True)
class Case:
    """A public callback, its canonical init args (YAML-able), and what fit must show."""

    cls: type
    init_args: dict[str, Any]
    check: Callable[[Callback, L.Trainer, L.LightningModule], None]
    builders: dict[str, type] = dataclasses.field(default_factory=dict)  # dataclass-typed args
    full_epochs: bool = True  # False: the callback shortens epochs (fewer optimizer steps)

    @property
    def name(self) -> str:
        return self.cls.__name__

    def value(self, key: str) -> Any:
        """The Python value of one init arg (dicts for dataclass args are built)."""
        raw = self.init_args[key]
        return self.builders[key](**raw) if key in self.builders else raw

    def make(self) -> Callback:
        return self.cls(**{k: self.value(k) for k in self.init_args})

    def __str__(self) -> str:  # readable pytest ids
        return self.name


CASES = [
    Case(EMA, {"decay": 0.9, "start_step": 3, "every_n_steps": 2}, check_averaging),
    Case(SWA, {"start": 0.25, "every_n": 1, "interval": "epoch", "swa_lr": 0.05}, check_averaging),
    Case(
        GradualPruning,
        {"sparsity": 0.75, "schedule": {"kind": "cubic", "start": 0.1, "end": 0.6, "every_n_steps": 4}, "allocation": "lamp"},
        check_pruning,
        {"schedule": SparsitySchedule},
    ),
    Case(
        DynamicSparseTraining,
        {"sparsity": 0.75, "method": "rigl", "schedule": {"start": 0, "end": 0.75, "every_n_steps": 4}},
        check_dst,
        {"schedule": SparsitySchedule},
    ),
]

CASES.append(
    Case(
        QuantizationAwareTraining,
        {"weight_bits": 4, "activation_bits": 8, "weight_method": "lsq", "activation_method": "lsq", "start_step": 0.1},
        check_qat,
    )
)

CASES += [
    Case(SampleReweighting, {"rule": "linupper", "temperature": 0.5, "warmup_steps": 6}, check_reweighting),
    Case(DataPruning, {"ratio": 0.5, "anneal": 0.25, "mode": "infobatch", "seed": 1}, check_data_pruning, full_epochs=False),
    # Top-k by val_loss (continuous: the third candidate replaces one), so ranks must agree on decisions.
    Case(Soup, {"keep": 2, "monitor": "val_loss", "mode": "min", "start": 0.25, "offload_to_cpu": False}, check_soup),
]

# Pairs that cannot share a model: the second callback's setup raises ValueError matching the value.
INCOMPATIBLE = {("GradualPruning", "DynamicSparseTraining"): "both target"}


class EpochShuffle(Sampler[int]):
    """Shuffles with a seed derived from the epoch, so a resumed run sees the same order."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class TinyData(L.LightningDataModule):
    def __init__(self, batch_size: int = 8):
        super().__init__()
        self.batch_size = batch_size
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(96, 8, generator=g)
        self.y = (self.x[:, :4].argmax(1) + (self.x[:, 4] > 1).long()) % 4

    def train_dataloader(self):
        ds = TensorDataset(self.x, self.y)
        return DataLoader(ds, batch_size=self.batch_size, sampler=EpochShuffle(len(ds)))

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.x[:32], self.y[:32]), batch_size=16)

    test_dataloader = val_dataloader


class TinyModel(L.LightningModule):
    """Linear + BatchNorm (float and integer buffers) + SGD momentum + a step LR schedule."""

    def __init__(self, lr: float = 0.1):
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        # The documented one-liner: weighted by SampleReweighting / DataPruning, the plain mean otherwise.
        loss = weighted_loss(self, nn.functional.cross_entropy(self(x), y, reduction="none"))
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y), sync_dist=True)
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), sync_dist=True)

    test_step = validation_step

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)}


TRAINER = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
               enable_checkpointing=False, deterministic=True)


def fit_tiny(callbacks, model=None, max_epochs=3, **kwargs):
    """Seeded fit of ``model`` (default: a fresh TinyModel) on TinyData; returns (trainer, model)."""
    L.seed_everything(0)
    model = model or TinyModel()
    trainer = L.Trainer(callbacks=list(callbacks), max_epochs=max_epochs, **{**TRAINER, **kwargs})
    trainer.fit(model, datamodule=TinyData())
    return trainer, model


class Crash(Callback):
    """Simulates a crash at the start of an epoch (after the previous epoch's checkpoint)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


class StateDump(Callback):
    """Writes every callback's state and the model weights per rank (DDP test)."""

    def __init__(self, path: str):
        self.path = path

    def on_fit_end(self, trainer, pl_module):
        states = {type(cb).__name__: cb.state_dict() for cb in trainer.callbacks if type(cb) in {c.cls for c in CASES}}
        torch.save({"callbacks": states, "model": pl_module.state_dict()}, f"{self.path}/rank{trainer.global_rank}.pt")


def flat_state(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts/lists of tensors and scalars flattened to ``{dotted.key: value}``."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(flat_state(v, f"{prefix}{k}."))
        return out
    if isinstance(obj, (list, tuple)):
        return flat_state(dict(enumerate(obj)), prefix)
    return {prefix.rstrip("."): obj}
