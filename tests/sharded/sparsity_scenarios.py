"""GradualPruning and DynamicSparseTraining under FSDP2 (2 processes, gloo), each against the
same seeded DDP run: final weights and masks, optimizer state right after a mask change,
masks and per-weight state through a distributed checkpoint, and no gather or host sync in
the per-step path between events. Hidden width 15: uneven shards (8 and 7 rows)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.tensor._redistribute as redistribute
from lightning.pytorch.callbacks import Callback
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.tensor import DTensor

from lichtenberg.callbacks import DynamicSparseTraining, GradualPruning
from lichtenberg.core.distributed import full, is_sharded, like, local
from lichtenberg.core.schedules import SparsitySchedule
from lichtenberg.core.sparsity import export_sparse_
from lichtenberg.core.targets import Targets
from tests.sharded.common import ShardedTinyModel, crash_resume, fit, save, snapshot

PRUNE = dict(kind="cubic", start=0.1, end=0.6, every_n_steps=4)
DST = dict(start=0, end=0.75, every_n_steps=4)


class Probe(Callback):
    """At the first event that changes masks (a cubic ramp's first event prunes nothing): the
    masks before and after, and SGD's momentum right after the change (locally, and whole for
    comparing strategies)."""

    def __init__(self, cb: Any) -> None:
        self.cb, self.record, self.prev = cb, None, {}
        self.count = 2 if isinstance(cb, GradualPruning) and cb.nm is None else 1

    def _counter(self) -> int:
        return self.cb._events if isinstance(self.cb, GradualPruning) else self.cb._updates

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.prev = {n: local(m).clone() for n, m in self.cb.engine.masks.items()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.record is not None or self._counter() != self.count:
            return
        engine, state = self.cb.engine, optimizer.state
        rec = {"step": trainer.global_step, "local": {}, "whole": {}}
        for name, param in engine.params.items():
            momentum = state[param]["momentum_buffer"]
            before, after = self.prev[name], local(engine.masks[name]).clone()
            rec["local"][name] = (before.cpu(), after.cpu(), local(momentum).detach().cpu().clone())
            rec["whole"][name] = (full(like(param, before)).cpu().clone(), full(engine.masks[name]).cpu().clone(),
                                  full(momentum).detach().cpu().clone())
        self.record = rec


def _shapes(model) -> dict[str, tuple]:
    return {n: tuple(local(p).shape) for n, p in model.named_parameters()}


def _compare(make, out, export: bool = False) -> None:
    result = {}
    for kind in ("ddp", "fsdp2"):
        cb = make()
        probe = Probe(cb)
        trainer, model = fit(kind, [cb, probe])
        result[kind] = {"model": snapshot(model), "probe": probe.record, "step": trainer.global_step,
                        "local_shapes": _shapes(model), "sharded": any(is_sharded(p) for p in model.parameters()),
                        "buffers": sorted(k for k, _ in model.named_buffers())}
        if isinstance(cb, DynamicSparseTraining):
            result[kind].update(itop=cb.itop, updates=cb._updates, alive={n: a.cpu() for n, a in cb._alive.items()})
        else:
            result[kind].update(events=cb._events)
        if export:
            report = export_sparse_(model)
            result[kind]["export"] = report
            result[kind]["exported"] = snapshot(model)
    save(out, result)


def _pruning(allocation: str, **kw: Any):
    return lambda: GradualPruning(sparsity=0.75, schedule=SparsitySchedule(**PRUNE), allocation=allocation, **kw)


def pruning_global(out):
    _compare(_pruning("global"), out, export=True)


def pruning_lamp(out):
    _compare(_pruning("lamp", rewind=True), out)


def pruning_erk(out):
    _compare(_pruning("erk"), out)


def pruning_uniform(out):
    _compare(_pruning("uniform", score="wanda"), out)


def pruning_nm(out):
    # net.0 is Linear(8, 15): out axis 0, 8 inputs per row in groups of 4, rows split 8 / 7
    _compare(lambda: GradualPruning(sparsity=0.5, pattern="2:4", schedule=SparsitySchedule(**PRUNE),
                                    targets=Targets(include=["net.0"])), out)


def pruning_permanent(out):
    _compare(_pruning("lamp", make_permanent=True), out)


def _dst(method: str):
    return lambda: DynamicSparseTraining(sparsity=0.75, method=method, schedule=SparsitySchedule(**DST))


def dst_set(out):
    _compare(_dst("set"), out)


def dst_rigl(out):
    _compare(_dst("rigl"), out)


def dst_srigl(out):
    _compare(_dst("srigl"), out)


def dst_granet(out):
    _compare(lambda: DynamicSparseTraining(sparsity=0.75, method="granet",
                                           schedule=SparsitySchedule(kind="cubic", start=0, end=0.75, every_n_steps=4,
                                                                     initial=0.5)), out)


def _dcp_keys(ckpt_dir) -> list[str]:
    (ckpt,) = ckpt_dir.glob("epoch=1-*.ckpt")
    return sorted(FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)


def _resume(make, out) -> None:
    ref, ref_cbs, resumed, cbs = crash_resume("fsdp2", lambda: [make()], out)
    keys = _dcp_keys(out / "ckpt") if dist.get_rank() == 0 else None
    state = {k: v for k, v in cbs[0].state_dict().items() if k != "config"}
    save(out, {"ref": snapshot(ref), "resumed": snapshot(resumed), "dcp_keys": keys, "state": state,
               "ref_state": {k: v for k, v in ref_cbs[0].state_dict().items() if k != "config"}})


def resume_pruning_lamp(out):
    _resume(_pruning("lamp", rewind=True), out)


def resume_rigl(out):
    _resume(_dst("rigl"), out)


def _srste():
    return GradualPruning(sparsity=0.5, pattern="2:4", sr_ste=2e-4, targets=Targets(include=["net.0"]))


def pruning_srste(out):
    _compare(_srste, out)


def resume_srste(out):
    _resume(_srste, out)


class RMSpropModel(ShardedTinyModel):
    """An optimizer outside the zero-preserving ones: the weights are re-masked after each step too."""

    def configure_optimizers(self):
        return torch.optim.RMSprop(self.parameters(), lr=0.01)


class _Counter:
    """Counts collectives and host syncs while one of our per-step hooks runs on a non-event step."""

    def __init__(self) -> None:
        self.inside, self.due, self.calls, self.hooks, self.at_events = 0, False, {}, 0, {}

    def wrap(self, owner: Any, name: str, counted: bool) -> tuple:
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if counted and self.inside:  # at events they are allowed (and show that the patch counts)
                calls = self.at_events if self.due else self.calls
                calls[name] = calls.get(name, 0) + 1
            if counted:
                return original(*args, **kwargs)
            self.inside += 1
            self.hooks += not self.due
            try:
                return original(*args, **kwargs)
            finally:
                self.inside -= 1
        setattr(owner, name, wrapper)
        return owner, name, original


@contextmanager
def _counting(counter: _Counter):
    from lichtenberg.callbacks._sparsity import _Sparsity
    from lichtenberg.core.sparsity import MaskEngine

    undo = [counter.wrap(_Sparsity, "_last_point", False), counter.wrap(_Sparsity, "on_before_optimizer_step", False),
            counter.wrap(MaskEngine, "apply_", False), counter.wrap(MaskEngine, "mask_grads_", False)]
    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor"):
        undo.append(counter.wrap(dist, name, True))
    undo += [counter.wrap(DTensor, "full_tensor", True), counter.wrap(DTensor, "redistribute", True),
             counter.wrap(redistribute, "redistribute_local_tensor", True)]
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "cpu"):
        undo.append(counter.wrap(torch.Tensor, name, True))
    try:
        yield
    finally:
        for owner, name, original in reversed(undo):
            setattr(owner, name, original)


class _Due(Callback):
    def __init__(self, counter: _Counter, cbs: list) -> None:
        self.counter, self.cbs = counter, cbs

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.counter.due = any(cb._due(trainer.global_step) for cb in self.cbs)


def no_gather_between_events(out):
    counter = _Counter()
    cbs = [GradualPruning(sparsity=0.75, schedule=SparsitySchedule(**PRUNE), targets=Targets(include=["net.0"])),
           DynamicSparseTraining(sparsity=0.75, method="rigl", schedule=SparsitySchedule(**DST),
                                 targets=Targets(include=["net.3"]))]
    with _counting(counter):
        trainer, model = fit("fsdp2", [*cbs, _Due(counter, cbs)], model_cls=RMSpropModel)
    save(out, {"calls": counter.calls, "at_events": counter.at_events, "hooks": counter.hooks, "events": cbs[0]._events, "updates": cbs[1]._updates,
               "steps": trainer.global_step})


SCENARIOS = ["pruning_global", "pruning_lamp", "pruning_erk", "pruning_uniform", "pruning_nm", "pruning_permanent",
             "dst_set", "dst_rigl", "dst_srigl", "dst_granet", "resume_pruning_lamp", "resume_rigl", "pruning_srste", "resume_srste",
             "no_gather_between_events"]


class MetaModel(ShardedTinyModel):
    """Built on the meta device: FSDP2 shards it in configure_model, where the callbacks bind, and
    Lightning materialises it afterwards (``to_empty`` + ``reset_parameters``)."""

    def __init__(self, lr: float = 0.1):
        with torch.device("meta"):
            super().__init__(lr)


def meta_init(out):
    result = {}
    for name, cb in (("pruning", _pruning("lamp", rewind=True)()), ("dst", _dst("rigl")())):
        trainer, model = fit("fsdp2", [cb], model_cls=MetaModel)
        extra = {"events": cb._events} if name == "pruning" else {"updates": cb._updates, "itop": cb.itop}
        result[name] = {"model": snapshot(model), "kept": cb.engine.kept(), **extra}
    save(out, result)


SCENARIOS.append("meta_init")
