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

import gc
import os
import statistics
import sys
import tempfile
import time
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
from lichtenberg.core.distributed import local, shard_layers_
from lichtenberg.core.schedules import SparsitySchedule
from tests.sharded.launch import launch

__all__ = ["main", "run"]

WIDTHS = (512, 2048, 2048, 2048, 10)  # 9.5M parameters
QUICK_WIDTHS = (32, 64, 64, 10)  # --quick: the same code paths in seconds (read by both ranks from the env)


def _widths() -> tuple[int, ...]:
    return QUICK_WIDTHS if os.environ.get("LICHTENBERG_BENCH_QUICK") else WIDTHS


def _smoke_rank() -> None:
    """--quick: freeze the rank's objects (as harness.start does in the main process), so its exit does not
    collect torch and Lightning again (seconds per rank). Changes no result."""
    if os.environ.get("LICHTENBERG_BENCH_QUICK"):
        gc.freeze()
STEPS = 4
CALLBACKS = {  # name -> factory (fresh instance per fit)
    "EMA": lambda: EMA(decay=0.99),
    "SWA": lambda: SWA(start=1, interval="step", swa_lr=0.01),
    "GradualPruning": lambda: GradualPruning(sparsity=0.8, schedule=SparsitySchedule(start=1, end=3, every_n_steps=1)),
    "DynamicSparseTraining": lambda: DynamicSparseTraining(sparsity=0.8, schedule=SparsitySchedule(start=0, end=3, every_n_steps=2)),
    "QAT W8A8": lambda: QuantizationAwareTraining(weight_bits=8, activation_bits=8, start_step=1),
}


class Wide(L.LightningModule):
    def __init__(self, widths: tuple[int, ...] | None = None):
        super().__init__()
        widths = widths or _widths()
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])

    def configure_model(self):
        if self.device_mesh is None:
            return
        shard_layers_(self.net, self.device_mesh["data_parallel"])

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
        params = {local(p).untyped_storage().data_ptr() for n, p in pl_module.named_parameters() if "_quantizer." not in n}
        held: dict[int, int] = {}
        _storages(self.target, set(), held)
        for name, t in pl_module.state_dict(keep_vars=True).items():  # what it registered in the model
            if name.endswith(("_mask", "_ema", "_swa", "_rewind", "_ever", "_latent")) or "_quantizer." in name:
                storage = local(t).untyped_storage()
                held[storage.data_ptr()] = storage.nbytes()
        own = [p for n, p in pl_module.named_parameters() if "_quantizer." not in n]
        full = sum(p.numel() * p.element_size() for p in own)
        self.result = {"held_bytes": sum(v for k, v in held.items() if k not in params), "param_bytes_full": full,
                       "param_bytes_local": sum(local(p).untyped_storage().nbytes() for p in own)}


def memory(out: Path) -> None:
    from tests.sharded.common import save, strategy

    _smoke_rank()
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(32 * STEPS * 2, _widths()[0], generator=g),
                       torch.randint(0, 10, (32 * STEPS * 2,), generator=g))
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


class Counted:
    """Counts calls and payload bytes of torch.distributed's collectives while active."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor")

    def __enter__(self) -> "Counted":
        import torch.distributed as dist

        self.calls, self.bytes, self._saved = 0, 0, {n: getattr(dist, n) for n in self.NAMES}

        def wrap(fn):
            def counted(tensor, *args, **kwargs):
                self.calls += 1
                first = args[0] if fn.__name__ == "all_gather_into_tensor" else tensor  # the input is the 2nd arg
                items = first if isinstance(first, list) else [first]
                self.bytes += sum(t.numel() * t.element_size() for t in items if isinstance(t, torch.Tensor))
                return fn(tensor, *args, **kwargs)
            return counted

        for n, fn in self._saved.items():
            setattr(dist, n, wrap(fn))
        return self

    def __exit__(self, *exc) -> None:
        import torch.distributed as dist

        for n, fn in self._saved.items():
            setattr(dist, n, fn)


def _rules(weights: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
           drop: dict[str, int]):
    """name -> a callable running one event of that rule on these (sharded or whole) tensors."""
    from lichtenberg.core.sparsity import prune_masks
    from lichtenberg.core.sparsity.dst import drop_and_grow, growth_scores, random_scores, srigl_update

    scores = {n: w.abs() for n, w in weights.items()}
    rules = {f"prune {a}": (lambda a=a: prune_masks(scores, masks, 0.9, allocation=a))
             for a in ("uniform", "erk", "global", "global_floor", "lamp")}
    rules["prune 2:4"] = lambda: prune_masks(scores, masks, 0.5, nm=(2, 4))
    rules["RigL event"] = lambda: drop_and_grow(weights, masks, drop, {n: growth_scores(g) for n, g in grads.items()})
    rules["SET event"] = lambda: drop_and_grow(
        weights, masks, drop, {n: random_scores(w, torch.Generator().manual_seed(0)) for n, w in weights.items()})
    alive = {n: torch.ones(w.shape[0], dtype=torch.bool) for n, w in weights.items()}
    rules["SRigL event"] = lambda: [srigl_update(weights[n], grads[n], masks[n], alive[n], 0.3, 0.3) for n in weights]
    return rules


def communication(out: Path) -> None:
    """Every rule once on whole tensors (reference) and on shards; collectives counted and timed."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lichtenberg.core.distributed import full
    from lichtenberg.core.sparsity import topk_mask
    from tests.sharded.common import save

    _smoke_rank()
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    g = torch.Generator().manual_seed(0)
    widths = _widths()
    whole = {f"net.{i}.weight": torch.randn(b, a, generator=g) for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))}
    grads = {n: torch.randn(w.shape, generator=g) for n, w in whole.items()}
    masks = {n: topk_mask(w.abs(), w.numel() // 5) for n, w in whole.items()}  # 80% sparse, as mid-training
    shard = lambda d: {n: distribute_tensor(t, mesh, [Shard(0)]) for n, t in d.items()}  # noqa: E731
    numel = sum(w.numel() for w in whole.values())
    result: dict[str, Any] = {"numel": numel, "gather_bytes": numel * 4 * (mesh.size() - 1) / mesh.size()}
    drop = {n: int(0.3 * int(m.sum())) for n, m in masks.items()}  # RigL/SET: drop 30% of each layer's active
    sharded_rules = _rules(shard(whole), shard(grads), shard(masks), drop)
    for name, run_whole in _rules(whole, grads, masks, drop).items():
        times = []
        for _ in range(3):
            dist.barrier()
            with Counted() as counted:
                t0 = time.perf_counter()
                got = sharded_rules[name]()
                times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref = run_whole()
        whole_s = time.perf_counter() - t0
        flat = lambda r: r if isinstance(r, dict) else {str(i): x for i, x in enumerate(r)}  # noqa: E731
        got, ref = flat(got), flat(ref)
        same = all(torch.equal(full(a[0] if isinstance(a, tuple) else a).cpu(), b[0] if isinstance(b, tuple) else b)
                   for a, b in zip(got.values(), ref.values()))
        result[name] = {"calls": counted.calls, "bytes": counted.bytes, "sharded_s": statistics.median(times),
                        "whole_s": whole_s, "equal": same}
    # The alternative: gather every layer's scores to every rank (then select locally).
    sharded_scores = shard({n: w.abs() for n, w in whole.items()})
    times = []
    for _ in range(3):
        dist.barrier()
        with Counted() as counted:
            t0 = time.perf_counter()
            for t in sharded_scores.values():
                t.full_tensor()
            times.append(time.perf_counter() - t0)
    # full_tensor runs functional collectives, which Counted does not see: one all-gather per layer.
    result["gather all scores"] = {"calls": len(sharded_scores), "bytes": result["gather_bytes"],
                                   "sharded_s": statistics.median(times)}
    save(out, result)


def run(quick: bool) -> dict[str, Any]:
    if quick:
        os.environ["LICHTENBERG_BENCH_QUICK"] = "1"  # the ranks inherit it
    with tempfile.TemporaryDirectory() as tmp:
        got = launch("benchmarks.sharded", ["memory", "communication"], Path(tmp))
    ranks = got["memory"]
    return {"memory": {k: [r[k] for r in ranks] for k in ranks[0]}, "communication": got["communication"][0],
            "widths": QUICK_WIDTHS if quick else WIDTHS, "steps": STEPS}


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
    comm = results["communication"]
    crow = []
    for name, r in comm.items():
        if not isinstance(r, dict):
            continue
        crow.append([name, r["calls"], f"{r['bytes'] / 2**10:.1f}", f"{r['bytes'] / comm['gather_bytes']:.2e}",
                     f"{r['sharded_s'] * 1e3:.0f}", f"{r['whole_s'] * 1e3:.0f}" if "whole_s" in r else "",
                     {True: "yes", False: "NO"}.get(r.get("equal"), "")])
    ctable = harness.markdown_table(["event (90% sparsity, 4 layers)", "collectives", "payload KiB per rank",
                                     "/ gathering the scores", "sharded ms (median of 3)", "one process, whole (ms)",
                                     "mask = whole-tensor mask"], crow)
    params = sum(a * b + b for a, b in zip(results["widths"][:-1], results["widths"][1:])) / 1e6
    return ("## Sharded runs: per-rank memory of each callback and what mask selection communicates\n\n"
            f"A {params:.1f}M-parameter MLP (Linear {' -> '.join(map(str, results['widths']))}), 2 processes (gloo, "
            "CPU). Memory: every tensor each callback holds on a rank after a few steps, parameters excluded.\n\n"
            + table + "\n\nCommunication: one event of each selection rule on the same weights as FSDP2 shards, "
            f"collectives counted; gathering the float32 scores instead receives {comm['gather_bytes'] / 2**20:.1f} MiB "
            "per rank (last row: that gather, timed).\n\n" + ctable)


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
                 quick="a 7K-parameter MLP", threads=1)


if __name__ == "__main__":
    main()
