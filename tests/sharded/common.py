"""What the sharded scenarios share: a TinyModel that shards itself in ``configure_model``
(hidden width 15: uneven shards at world size 2), fits under FSDP2 or DDP, crash-resume
through distributed checkpoints, and whole-tensor snapshots to compare across runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch import nn

from lichtenberg.core.distributed import full, shard_layers_
from tests.cases import EPOCHS, Crash, TinyData, TinyModel

__all__ = ["HIDDEN", "ShardedTinyModel", "crash_resume", "fit", "save", "snapshot", "strategy"]

HIDDEN = 15


class ShardedTinyModel(TinyModel):
    """TinyModel with an odd hidden width; shards every layer and the net under FSDP2."""

    def __init__(self, lr: float = 0.1):
        super().__init__(lr)
        self.net = nn.Sequential(nn.Linear(8, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 4))

    def configure_model(self):
        if self.device_mesh is None:  # DDP / single device
            return
        shard_layers_(self.net, self.device_mesh["data_parallel"])

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # FSDP2 leaves buffers per rank (each rank's BatchNorm statistics of its own batches, and a
        # checkpoint keeps one rank's); DDP broadcasts rank 0's before each forward. Do it after each,
        # so the two strategies and a resumed run hold the same statistics.
        if self.device_mesh is not None:
            bn = self.net[1]
            for buffer in (bn.running_mean, bn.running_var, bn.num_batches_tracked):  # not our sharded _ema/_swa
                torch.distributed.broadcast(buffer, src=0)


def strategy(kind: str):
    if kind == "fsdp2":
        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=True)
    return DDPStrategy()


def fit(kind: str, callbacks: list, ckpt_path: str | None = None, model_cls: type = ShardedTinyModel,
        **kwargs: Any) -> tuple[L.Trainer, L.LightningModule]:
    """Seeded fit of a fresh model on TinyData, 2 ranks."""
    L.seed_everything(0)
    model = model_cls()
    kwargs = {"max_epochs": EPOCHS, "enable_checkpointing": any(isinstance(c, ModelCheckpoint) for c in callbacks),
              **kwargs}
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy(kind), logger=False, enable_progress_bar=False,
                        enable_model_summary=False, deterministic=True, callbacks=callbacks, **kwargs)
    trainer.fit(model, datamodule=TinyData(), ckpt_path=ckpt_path)
    return trainer, model


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every state tensor, whole (gathered from the shards), on CPU."""
    return {k: full(v).detach().cpu().clone() for k, v in model.state_dict().items()}


def crash_resume(kind: str, make_callbacks, out: Path, **kwargs: Any):
    """(uninterrupted model, its callbacks, resumed model, its callbacks): a crash at the start of
    epoch 2, resumed from the end-of-epoch-1 checkpoint (a DCP directory under FSDP2)."""
    ref_cbs = make_callbacks()
    _, ref = fit(kind, ref_cbs, **kwargs)
    ckpt_dir = out / "ckpt"
    try:
        fit(kind, make_callbacks() + [Crash(2), ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1)], **kwargs)
    except RuntimeError as err:
        assert "simulated crash" in str(err), err
    else:
        raise AssertionError("the crash did not happen")
    (ckpt,) = ckpt_dir.glob("epoch=1-*.ckpt")
    cbs = make_callbacks()
    _, resumed = fit(kind, cbs, ckpt_path=str(ckpt), **kwargs)
    return ref, ref_cbs, resumed, cbs


def save(out: Path, obj: Any) -> None:
    torch.save(obj, out / f"rank{torch.distributed.get_rank()}.pt")
