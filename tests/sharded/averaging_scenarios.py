"""EMA and SWA under FSDP2 (2 ranks, gloo): memory per rank, equivalence with DDP (uneven
shards, bf16 parameters), shard-local evaluation swaps, SWA's BatchNorm pass, the gathered
export, and crash-resume through a distributed checkpoint. Each scenario saves per-rank
results; ``test_averaging.py`` asserts on them."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lichtenberg.callbacks import EMA, SWA
from lichtenberg.core.distributed import full, is_sharded, local
from tests.sharded.common import HIDDEN, ShardedTinyModel, crash_resume, fit, save

EMA_ARGS = {"decay": 0.9, "start_step": 3, "every_n_steps": 2}
SWA_ARGS = {"start": 0.25, "every_n": 1, "interval": "epoch", "swa_lr": 0.05}
MAKE = {"EMA": lambda: EMA(**EMA_ARGS), "SWA": lambda: SWA(**SWA_ARGS)}


class Model(ShardedTinyModel):
    """ShardedTinyModel whose per-batch BatchNorm broadcast skips sharded buffers (the averages
    attached beside BatchNorm's weight and bias are DTensors; a c10d broadcast cannot take them)."""

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.device_mesh is not None:
            for buffer in self.net[1].buffers():
                if not is_sharded(buffer):
                    torch.distributed.broadcast(buffer, src=0)


class LayerNormModel(Model):
    """No BatchNorm: every tensor is a sharded parameter (the memory bound covers all averages)."""

    def __init__(self, lr: float = 0.1):
        super().__init__(lr)
        self.net = nn.Sequential(nn.Linear(8, HIDDEN), nn.LayerNorm(HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 4))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        pass


class BF16Model(Model):
    """Parameters in bf16, cast before sharding (FSDP2) or before DDP wraps the model."""

    def configure_model(self):
        self.to(torch.bfloat16)
        super().configure_model()

    def forward(self, x):
        return self.net(x.to(torch.bfloat16)).float()


class Probe(Callback):
    """Shard-local checks on each rank: validation sees the averages, training the raw weights;
    averaged buffers in the model during fit; validation losses; gathered averages per epoch."""

    def __init__(self, averaging):
        self.cb = averaging
        self.raw: dict | None = None
        self.val_is_average, self.train_is_raw, self.val_loss = [], [], []
        self.buffers_during_fit: list[str] = []
        self.at_start: dict = {}
        self.at_epoch_end: dict = {}

    def _gathered(self):
        return {"num_updates": self.cb.averaged.num_updates,
                "averages": {n: full(t).detach().cpu().clone() for n, t in self.cb.averaged.tensors.items()}}

    def on_train_start(self, trainer, pl_module):  # after the restore of a resumed run
        self.at_start = self._gathered()

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.raw = {n: local(p.detach()).clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0 and self.raw is not None:
            self.train_is_raw.append(all(torch.equal(local(p.detach()), self.raw[n])
                                         for n, p in pl_module.named_parameters()))

    def on_validation_batch_start(self, trainer, pl_module, *args):
        if trainer.sanity_checking or self.cb.averaged.num_updates == 0:
            return
        avg = self.cb.averaged.tensors
        self.val_is_average.append(all(torch.equal(local(p.detach()), local(avg[n]).to(p.dtype))
                                       for n, p in pl_module.named_parameters()))

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.val_loss.append(float(trainer.callback_metrics["val_loss"]))

    def on_train_epoch_end(self, trainer, pl_module):
        self.buffers_during_fit = sorted(k for k in pl_module.state_dict() if k.endswith(("_ema", "_swa")))
        self.at_epoch_end[trainer.current_epoch] = self._gathered()


def _held_bytes(cb) -> dict[str, int]:
    """Bytes of this rank's part of every average the callback holds (local shards, measured)."""
    tensors = cb.averaged.tensors
    size = {n: local(t).numel() * local(t).element_size() for n, t in tensors.items()}
    return {"all": sum(size.values()), "params": sum(size[n] for n in tensors if n not in cb.averaged.buffer_names)}


def _run(kind: str, name: str, model_cls=Model) -> dict:
    cb = MAKE[name]()
    probe = Probe(cb)
    trainer, model = fit(kind, [cb, probe], model_cls=model_cls)
    params = dict(model.named_parameters())
    return {
        "held_bytes": _held_bytes(cb),
        "param_bytes": sum(p.numel() * p.element_size() for p in params.values()),  # whole (global) shapes
        "sharded": {n: is_sharded(t) for n, t in cb.averaged.tensors.items()},
        "dtypes": {n: (cb.averaged.tensors[n].dtype, p.dtype) for n, p in params.items()},
        "export": {k: v.cpu() for k, v in cb.averaged_state_dict().items()},
        "model": {k: full(v).detach().cpu().clone() for k, v in model.state_dict().items()},
        "raw": {k: v.cpu() for k, v in cb.raw_weights.items()},
        "state_tensors": sorted(cb.state_dict()["tensors"]),
        "num_updates": cb.averaged.num_updates,
        "bn_seen": getattr(cb, "_bn_seen", None),
        "probe": {"val_is_average": probe.val_is_average, "train_is_raw": probe.train_is_raw,
                  "val_loss": probe.val_loss, "buffers_during_fit": probe.buffers_during_fit},
        "step": trainer.global_step,
    }


def equivalence(out: Path) -> None:
    """EMA and SWA on the BatchNorm model (uneven shards) under DDP and FSDP2."""
    save(out, {f"{name}-{kind}": _run(kind, name) for name in MAKE for kind in ("ddp", "fsdp2")})


def memory(out: Path) -> None:
    """Bytes held per rank on a model whose every tensor is sharded, under DDP and FSDP2."""
    save(out, {f"{name}-{kind}": _run(kind, name, LayerNormModel) for name in MAKE for kind in ("ddp", "fsdp2")})


def bf16(out: Path) -> None:
    """EMA of bf16 parameters under DDP and FSDP2."""
    save(out, {kind: _run(kind, "EMA", BF16Model) for kind in ("ddp", "fsdp2")})


def resume(out: Path) -> None:
    """Crash at the start of epoch 2, resume from the end-of-epoch-1 DCP checkpoint, per callback."""
    from torch.distributed.checkpoint import FileSystemReader

    result = {}
    for name, make in MAKE.items():
        probes = []

        def callbacks():
            cb = make()
            probes.append(Probe(cb))
            return [cb, probes[-1]]

        ref, ref_cbs, resumed, cbs = crash_resume("fsdp2", callbacks, out / name, model_cls=Model)
        ckpt = next((out / name / "ckpt").glob("epoch=1-*.ckpt"))
        crashed = probes[1]
        result[name] = {
            "saved": crashed.at_epoch_end[1], "restored": probes[2].at_start,
            "ref_end": probes[0].at_epoch_end, "resumed_end": probes[2].at_epoch_end,
            "ref_export": {k: v.cpu() for k, v in ref_cbs[0].averaged_state_dict().items()},
            "resumed_export": {k: v.cpu() for k, v in cbs[0].averaged_state_dict().items()},
            "ref_model": {k: full(v).detach().cpu().clone() for k, v in ref.state_dict().items()},
            "resumed_model": {k: full(v).detach().cpu().clone() for k, v in resumed.state_dict().items()},
            "ckpt_keys": sorted(FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata),
        }
    save(out, result)
