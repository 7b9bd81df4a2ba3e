"""Sharded runs: what each callback holds per rank under DDP and FSDP2, and what each mask
selection rule communicates per event, beside gathering the full weights.

Two processes (gloo, CPU), a ~10M-parameter MLP (4 Linear layers) that shards itself under
``ModelParallelStrategy``. *Memory*: after a few steps with each callback, every tensor the
callback holds on a rank (reachable from the callback object, plus the buffers and quantizer
state it registered in the model), counted by its local storage bytes once, parameters
excluded, on both ranks; ratio to the model's full parameter bytes. *Communication*: each
rule of ``lichtenberg.core.sparsity`` run on the same weights as DTensor shards, with
``torch.distributed``'s collectives counted (calls, bytes sent per rank) and timed (median of
5), beside the bytes a rank receives to gather the whole float32 scores instead.

Run from the repository root: ``python -m benchmarks.sharded`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks import harness
from lichtenberg.callbacks import EMA, SWA, DynamicSparseTraining, GradualPruning, QuantizationAwareTraining
from lichtenberg.core.distributed import local
from lichtenberg.core.schedules import SparsitySchedule
from tests.sharded.launch import launch

__all__ = ["main", "run"]

WIDTHS = (512, 2048, 2048, 2048, 10)  # 9.5M parameters
STEPS = 4
CALLBACKS = {  # name -> factory (fresh instance per fit)
    "EMA": lambda: EMA(decay=0.99),
    "SWA": lambda: SWA(start=1, interval="step", swa_lr=0.01),
    "GradualPruning": lambda: GradualPruning(sparsity=0.8, schedule=SparsitySchedule(start=1, end=3, every_n_steps=1)),
    "DynamicSparseTraining": lambda: DynamicSparseTraining(sparsity=0.8, schedule=SparsitySchedule(start=0, end=3, every_n_steps=2)),
    "QAT W8A8": lambda: QuantizationAwareTraining(weight_bits=8, activation_bits=8, start_step=1),
}


class Wide(L.LightningModule):
    def __init__(self, widths: tuple[int, ...] = WIDTHS):
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])

    def configure_model(self):
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _storages(obj: Any, seen_objs: set[int], out: dict[int, int]) -> None:
    """Local storage bytes of every tensor reachable from ``obj`` (modules and trainers not entered)."""
    if id(obj) in seen_objs or isinstance(obj, (nn.Module, L.Trainer, type)):
        return
    seen_objs.add(id(obj))
    if isinstance(obj, torch.Tensor):
        storage = local(obj).untyped_storage()
        out[storage.data_ptr()] = storage.nbytes()
    elif isinstance(obj, dict):
        for v in obj.values():
            _storages(v, seen_objs, out)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            _storages(v, seen_objs, out)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("lichtenberg"):
        _storages(vars(obj), seen_objs, out)


class Probe(Callback):
    """At the last step: bytes the callback before it holds on this rank."""

    def __init__(self, target: Callback):
        self.target = target
        self.result: dict[str, float] = {}

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step < STEPS:
            return
        params = {local(p).untyped_storage().data_ptr() for p in pl_module.parameters()}
        held: dict[int, int] = {}
        _storages(self.target, set(), held)
        for name, t in pl_module.state_dict(keep_vars=True).items():  # what it registered in the model
            if name.endswith(("_mask", "_ema", "_swa", "_rewind")) or "_quantizer." in name:
                storage = local(t).untyped_storage()
                held[storage.data_ptr()] = storage.nbytes()
        full = sum(p.numel() * p.element_size() for p in pl_module.parameters())
        self.result = {"held_bytes": sum(v for k, v in held.items() if k not in params), "param_bytes_full": full,
                       "param_bytes_local": sum(local(p).untyped_storage().nbytes() for p in pl_module.parameters())}


def memory(out: Path) -> None:
    from tests.sharded.common import save, strategy

    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(32 * STEPS * 2, WIDTHS[0], generator=g), torch.randint(0, 10, (32 * STEPS * 2,), generator=g))
    result: dict[str, dict[str, Any]] = {}
    for name, make in CALLBACKS.items():
        for kind in ("ddp", "fsdp2"):
            cb = make()
            probe = Probe(cb)
            L.seed_everything(0)
            trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy(kind), max_steps=STEPS, logger=False,
                                enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                                num_sanity_val_steps=0, callbacks=[cb, probe])
            trainer.fit(Wide(), train_dataloaders=DataLoader(ds, batch_size=32))
            result[f"{name}/{kind}"] = probe.result
    save(out, result)


def run(quick: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        got = launch("benchmarks.sharded", ["memory"], Path(tmp))
    ranks = got["memory"]
    return {"memory": {k: [r[k] for r in ranks] for k in ranks[0]}, "widths": WIDTHS, "steps": STEPS}


def render(results: dict[str, Any]) -> str:
    rows = []
    for key, per_rank in results["memory"].items():
        name, kind = key.split("/")
        full = per_rank[0]["param_bytes_full"]
        held = [r["held_bytes"] for r in per_rank]
        rows.append([name, kind.upper(), f"{full / 2**20:.1f}", " / ".join(f"{h / 2**20:.2f}" for h in held),
                     " / ".join(f"{h / full:.3f}" for h in held)])
    table = harness.markdown_table(["callback", "strategy", "parameters (MiB, full)", "held per rank (MiB, rank 0 / 1)",
                                    "held / full parameter bytes"], rows)
    return ("## Sharded runs: per-rank memory of each callback, DDP vs FSDP2\n\n"
            f"A {sum(a * b + b for a, b in zip(results['widths'][:-1], results['widths'][1:])) / 1e6:.1f}M-parameter MLP, "
            "2 processes (gloo), after a few steps with each callback.\n\n" + table)


def plot(results: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()
    names = sorted({k.split("/")[0] for k in results["memory"]})
    fig, ax = plt.subplots(figsize=(7, 3))
    for i, kind in enumerate(("ddp", "fsdp2")):
        vals = [results["memory"][f"{n}/{kind}"][0]["held_bytes"] / results["memory"][f"{n}/{kind}"][0]["param_bytes_full"]
                for n in names]
        ax.bar([j + 0.4 * i for j in range(len(names))], vals, width=0.4, label=kind.upper())
    ax.set_xticks([j + 0.2 for j in range(len(names))], names, fontsize=8)
    ax.set_ylabel("held per rank / parameter bytes")
    ax.legend()
    harness.save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    harness.main("sharded", run, render, plot, "per-rank memory of each callback, DDP vs FSDP2", argv,
                 quick="the same (it is short)", threads=1)


if __name__ == "__main__":
    main()
