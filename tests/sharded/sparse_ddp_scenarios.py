"""SparseDDPStrategy against strategy="ddp" (2 processes, gloo): each scenario fits the same
seeded run under both and saves weights, optimizer state, callback state and, per step, what
the strategy sent and the largest gradient of a pruned weight right after the all-reduce."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from lichtenberg.callbacks import EMA, DynamicSparseTraining, GradualPruning, QuantizationAwareTraining
from lichtenberg.core.schedules import SparsitySchedule
from lichtenberg.plugins import SparseDDPStrategy
from tests.cases import EPOCHS, Crash, TinyData
from tests.sharded.common import save
from tests.zoo import Wrapped
from tests.zoo import data as zoo_data

PRUNE = dict(kind="cubic", start=0.1, end=0.6, every_n_steps=4)
DST = dict(start=0, end=0.75, every_n_steps=4)


class Net(L.LightningModule):
    """Three masked Linear layers, unmasked biases and a LayerNorm; optionally a layer the loss
    never uses (find_unused_parameters)."""

    def __init__(self, optimizer: str = "sgd", unused: bool = False, compiled: bool = False, tied: bool = False):
        super().__init__()
        self.optimizer = optimizer
        self.net = nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                                 nn.Linear(32, 4))
        if tied:  # one weight used by two layers (one mask under both names, one DDP gradient)
            self.net.insert(4, nn.Linear(32, 32))
            self.net.insert(5, nn.ReLU())
            self.net[4].weight = self.net[3].weight
        if compiled:  # aot_eager traces the backward too; the DDP hooks still see every gradient
            self.net = torch.compile(self.net, backend="aot_eager")
        self.spare = nn.Linear(4, 4) if unused else None

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=0.01, fused=True)
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class Record(Callback):
    """Per optimizer step, after the all-reduce and before any masking: whether the strategy sent
    the buckets whole, its byte counts, and the largest |gradient| of a pruned weight."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        masks = {n: b for n, b in pl_module.named_buffers() if n.endswith("_mask")}
        params = dict(pl_module.named_parameters())
        grads = {n: params[n[:-5]].grad for n in masks}
        pruned = max((float(grads[n][~m].abs().max()) for n, m in masks.items() if (~m).any() and grads[n] is not None),
                     default=None)
        comm = getattr(trainer.strategy, "comm", None)
        self.steps.append({"step": trainer.global_step, "pruned_grad": pruned,
                           "dense": None if comm is None else comm.dense,
                           "sent": None if comm is None else comm.sent,
                           "dense_bytes": None if comm is None else comm.dense_bytes})


class Manual(Net):
    """Net with manual optimization: ``manual_backward`` and the optimizer's step in training_step."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        x, y = batch
        self.manual_backward(nn.functional.cross_entropy(self(x), y))
        opt.step()


def fit(strategy: DDPStrategy, callbacks: list, model_kwargs: dict | None = None, ckpt_path: str | None = None,
        model_cls: type = Net, loader: Any = None, **kwargs: Any) -> tuple[L.Trainer, L.LightningModule]:
    L.seed_everything(0)
    model = model_cls(**(model_kwargs or {}))
    kwargs = {"max_epochs": EPOCHS, "logger": False,
              "enable_checkpointing": any(isinstance(c, ModelCheckpoint) for c in callbacks), **kwargs}
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, enable_progress_bar=False,
                        enable_model_summary=False, deterministic=True, callbacks=callbacks, **kwargs)
    data = {"datamodule": TinyData()} if loader is None else {"train_dataloaders": loader()}
    trainer.fit(model, ckpt_path=ckpt_path, **data)
    return trainer, model


def _run(trainer: L.Trainer, model: L.LightningModule, record: Record) -> dict[str, Any]:
    opt = trainer.optimizers[0]
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer": {n: {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
                      for n, p in model.named_parameters() if p in opt.state},
        "callbacks": {type(c).__name__: c.state_dict() for c in trainer.callbacks
                      if isinstance(c, (GradualPruning, DynamicSparseTraining, EMA, QuantizationAwareTraining))},
        "steps": record.steps,
        "global_step": trainer.global_step,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "masks": [(m.numel(), int(m.sum())) for c in trainer.callbacks  # one per tensor, tied ones once
                  if isinstance(c, (GradualPruning, DynamicSparseTraining)) for m in c.engine.masks.values()],
        "due": [s for c in trainer.callbacks if isinstance(c, (GradualPruning, DynamicSparseTraining))
                for s in range(trainer.global_step) if c._due(s) or s < c._start],
        "totals": dict(getattr(trainer.strategy, "totals", {})),
    }


def _both(out: Path, make_callbacks, model_kwargs: dict | None = None, ddp_kwargs: dict | None = None,
          **kwargs: Any) -> None:
    """The same seeded fit under DDPStrategy and SparseDDPStrategy (same DDP arguments)."""
    runs = {}
    for name, cls in (("ddp", DDPStrategy), ("sparse", SparseDDPStrategy)):
        record = Record()
        trainer, model = fit(cls(**(ddp_kwargs or {})), [*make_callbacks(), record], model_kwargs, **kwargs)
        runs[name] = _run(trainer, model, record)
    save(out, runs)


def pruning(out: Path) -> None:
    _both(out, lambda: [GradualPruning(sparsity=0.8, schedule=SparsitySchedule(**PRUNE))])


def pruning_by_gradient(out: Path) -> None:
    _both(out, lambda: [GradualPruning(sparsity=0.8, score="gradient", schedule=SparsitySchedule(**PRUNE))])


def rigl(out: Path) -> None:  # several buckets; Adam
    _both(out, lambda: [DynamicSparseTraining(sparsity=0.8, method="rigl", schedule=SparsitySchedule(**DST))],
          model_kwargs={"optimizer": "adam"}, ddp_kwargs={"bucket_cap_mb": 0.002})


def set_growth(out: Path) -> None:  # grows at random: the update step still sends everything
    _both(out, lambda: [DynamicSparseTraining(sparsity=0.8, method="set", schedule=SparsitySchedule(**DST))])


def accumulation(out: Path) -> None:
    _both(out, lambda: [DynamicSparseTraining(sparsity=0.8, method="rigl", schedule=SparsitySchedule(**DST))],
          accumulate_grad_batches=2, max_epochs=2 * EPOCHS)


def bf16_mixed(out: Path) -> None:
    _both(out, lambda: [GradualPruning(sparsity=0.8, schedule=SparsitySchedule(**PRUNE))], precision="bf16-mixed")


def bf16_true(out: Path) -> None:  # bf16 parameters: bf16 gradient buckets
    _both(out, lambda: [DynamicSparseTraining(sparsity=0.8, method="rigl", schedule=SparsitySchedule(**DST))],
          precision="bf16-true")


def compose(out: Path) -> None:  # + QAT's learned scales (dense) and EMA; gradients as bucket views
    _both(out, lambda: [GradualPruning(sparsity=0.8, schedule=SparsitySchedule(**PRUNE)),
                        QuantizationAwareTraining(weight_bits=4, activation_bits=8, start_step=0.2), EMA(decay=0.9)],
          ddp_kwargs={"gradient_as_bucket_view": True})


def unused(out: Path) -> None:
    _both(out, lambda: [DynamicSparseTraining(sparsity=0.8, method="rigl", schedule=SparsitySchedule(**DST))],
          model_kwargs={"unused": True}, ddp_kwargs={"find_unused_parameters": True})


def compiled(out: Path) -> None:
    _both(out, lambda: [DynamicSparseTraining(sparsity=0.8, method="rigl", schedule=SparsitySchedule(**DST))],
          model_kwargs={"compiled": True})


def static_graph(out: Path) -> None:
    _both(out, lambda: [GradualPruning(sparsity=0.8, schedule=SparsitySchedule(**PRUNE))],
          ddp_kwargs={"static_graph": True})


def tied(out: Path) -> None:
    _both(out, lambda: [DynamicSparseTraining(sparsity=0.8, method="rigl", schedule=SparsitySchedule(**DST))],
          model_kwargs={"tied": True})


def manual(out: Path) -> None:
    _both(out, lambda: [DynamicSparseTraining(sparsity=0.8, method="rigl", schedule=SparsitySchedule(**DST))],
          model_cls=Manual)


def gpt2(out: Path) -> None:  # Hugging Face Conv1D weights ([in, out]) and a tied embedding / head, Adam
    _both(out, lambda: [GradualPruning(sparsity=0.8, schedule=SparsitySchedule(**PRUNE))],
          model_cls=Wrapped, model_kwargs={"kind": "gpt2"}, loader=lambda: zoo_data("gpt2"), max_epochs=6)


def conv(out: Path) -> None:  # BatchNorm (broadcast by DDP), a depthwise conv, convolutions without bias
    _both(out, lambda: [DynamicSparseTraining(sparsity=0.8, method="rigl", schedule=SparsitySchedule(**DST))],
          model_cls=Wrapped, model_kwargs={"kind": "conv"}, loader=lambda: zoo_data("conv"), max_epochs=6)


def clipped(out: Path) -> None:  # the clip norm counts kept weights only, under both strategies
    _both(out, lambda: [GradualPruning(sparsity=0.8, schedule=SparsitySchedule(**PRUNE))], gradient_clip_val=0.05)


class AsksDense(Net):
    """A LightningModule that takes part in the protocol itself: every third step dense."""

    def needs_dense_gradients(self, step: int) -> bool:
        return step % 3 == 0


def module_asks(out: Path) -> None:
    _both(out, lambda: [DynamicSparseTraining(sparsity=0.8, method="static")], model_cls=AsksDense)


def sr_ste(out: Path) -> None:  # dense latent weights: every step dense
    _both(out, lambda: [GradualPruning(sparsity=0.5, pattern="2:4", sr_ste=2e-4, schedule=SparsitySchedule(**PRUNE))])


def crash_resume(out: Path) -> None:
    def callbacks():
        return [DynamicSparseTraining(sparsity=0.8, method="rigl", schedule=SparsitySchedule(**DST)),
                EMA(decay=0.9)]

    _, ref = fit(SparseDDPStrategy(), callbacks())
    ckpt_dir = out / "ckpt"
    try:
        fit(SparseDDPStrategy(), callbacks() + [Crash(2), ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1)])
    except RuntimeError as err:
        assert "simulated crash" in str(err), err
    (ckpt,) = ckpt_dir.glob("epoch=1-*.ckpt")
    record = Record()
    trainer, resumed = fit(SparseDDPStrategy(), callbacks() + [record], ckpt_path=str(ckpt))
    save(out, {"ref": {k: v.clone() for k, v in ref.state_dict().items()},
               "resumed": {k: v.clone() for k, v in resumed.state_dict().items()},
               "steps": record.steps, "totals": dict(trainer.strategy.totals)})


class Disagree(Callback):
    """Masks that differ between ranks: after the first step, each rank flips another entry."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1:
            mask = pl_module.net[3].weight_mask
            mask[0, trainer.global_rank] = ~mask[0, trainer.global_rank]


def mismatch(out: Path) -> None:
    try:
        fit(SparseDDPStrategy(), [DynamicSparseTraining(sparsity=0.8, method="static"), Disagree()])
    except RuntimeError as err:
        save(out, {"message": str(err)})
        return
    save(out, {"message": None})


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def no_masks(out: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = Record()
        trainer, model = fit(SparseDDPStrategy(), [record])
    _, plain = fit(DDPStrategy(), [])
    save(out, {"warnings": [str(w.message) for w in caught], "model": model.state_dict(),
               "plain": plain.state_dict(), "totals": dict(trainer.strategy.totals)})


class Unowned(Net):
    """Masks registered by hand, with no callback that masks the gradients."""

    def __init__(self):
        super().__init__()
        self.net[3].register_buffer("weight_mask", torch.rand(32, 32, generator=torch.Generator().manual_seed(0)) > 0.5)
        self._ddp_params_and_buffers_to_ignore = ["net.3.weight_mask"]


def unowned(out: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = fit(SparseDDPStrategy(), [], model_cls=Unowned)
    save(out, {"warnings": [str(w.message) for w in caught], "totals": dict(trainer.strategy.totals)})


def logged(out: Path) -> None:
    handler = Capture()
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    try:
        trainer, _ = fit(SparseDDPStrategy(), [DynamicSparseTraining(sparsity=0.9, method="rigl",
                                                                     schedule=SparsitySchedule(**DST))],
                         logger=CSVLogger(out, name="csv", version=dist.get_rank()), log_every_n_steps=1)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    metrics = out / "csv" / f"version_{dist.get_rank()}" / "metrics.csv"
    save(out, {"lines": handler.lines, "totals": dict(trainer.strategy.totals),
               "csv": metrics.read_text() if metrics.exists() else None})


SCENARIOS = ["pruning", "pruning_by_gradient", "rigl", "set_growth", "accumulation", "bf16_mixed", "bf16_true",
             "compose", "unused", "compiled", "static_graph", "tied", "manual", "gpt2", "conv", "clipped",
             "module_asks", "sr_ste",
             "crash_resume", "mismatch", "no_masks", "unowned", "logged"]
