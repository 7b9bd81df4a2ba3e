"""The sharded contract column: for every registered callback (``tests/cases.py``), a run
under FSDP2, the same run under DDP, and a crash-resume through a distributed checkpoint."""

from __future__ import annotations

from typing import Any

from tests.cases import CASES, flat_state
from tests.sharded.common import crash_resume, fit, save, snapshot

CASE = {c.name: c for c in CASES}


def _state(cb: Any) -> dict[str, Any]:
    state = flat_state(cb.state_dict())
    raw = getattr(cb, "raw_weights", None)
    if raw is not None:
        state.update(flat_state({k: v.detach().cpu() for k, v in raw.items()}, "raw_weights."))
    return {k: (v.detach().cpu().clone() if hasattr(v, "detach") else v) for k, v in state.items()}


def run_case(name: str, out) -> None:
    result = {}
    for kind in ("ddp", "fsdp2"):
        cb = CASE[name].make()
        trainer, model = fit(kind, [cb])
        result[kind] = {"model": snapshot(model), "state": _state(cb), "step": trainer.global_step}
    ref, ref_cbs, resumed, cbs = crash_resume("fsdp2", lambda: [CASE[name].make()], out)
    result["ref"], result["resumed"] = snapshot(ref), snapshot(resumed)
    result["ref_state"], result["resumed_state"] = _state(ref_cbs[0]), _state(cbs[0])
    save(out, result)


def plain(out) -> None:
    """The plain Trainer: FSDP2 vs DDP and crash-resume, the baseline every callback must keep."""
    result = {}
    for kind in ("ddp", "fsdp2"):
        ref, _, resumed, _ = crash_resume(kind, lambda: [], out / kind)
        result[kind] = (snapshot(ref), snapshot(resumed))
    save(out, result)


def __getattr__(name: str):  # case_<Name> for every registered callback
    if name.startswith("case_") and name[5:] in CASE:
        return lambda out: run_case(name[5:], out)
    raise AttributeError(name)


def _composition():
    from lichtenberg.callbacks import EMA, GradualPruning, QuantizationAwareTraining
    from lichtenberg.core.schedules import SparsitySchedule

    return [GradualPruning(sparsity=0.75, schedule=SparsitySchedule(start=2, end=22, every_n_steps=4), allocation="lamp"),
            QuantizationAwareTraining(weight_bits=4, activation_bits=8, start_step=6), EMA(decay=0.9)]


def composition(out) -> None:
    """GradualPruning + QAT + EMA: FSDP2 vs DDP, DCP crash-resume, and the plain averaged state
    dict exported from the sharded checkpoint directory vs from DDP's checkpoint file."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lichtenberg.core import plain_state_dict

    result = {}
    for kind in ("ddp", "fsdp2"):
        cbs = _composition()
        trainer, model = fit(kind, cbs + [ModelCheckpoint(dirpath=out / f"last-{kind}", save_last=True)])
        result[kind] = {"model": snapshot(model), "state": {type(c).__name__: _state(c) for c in cbs}}
        trainer.strategy.barrier()
        result[kind]["export"] = plain_state_dict(out / f"last-{kind}" / "last.ckpt", averaged="EMA")
    ref, ref_cbs, resumed, cbs = crash_resume("fsdp2", _composition, out)
    result["ref"], result["resumed"] = snapshot(ref), snapshot(resumed)
    result["ref_state"] = {type(c).__name__: _state(c) for c in ref_cbs}
    result["resumed_state"] = {type(c).__name__: _state(c) for c in cbs}
    save(out, result)


def data_parallel_mesh(out) -> None:
    """The per-sample callbacks on a mesh of 1 data-parallel x 2 tensor-parallel ranks: both ranks
    hold the same batches (one replica), so each run equals the single-device run."""
    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy

    from tests.cases import TRAINER, TinyData
    from tests.sharded.common import ShardedTinyModel

    result = {}
    for name in ("SampleReweighting", "DataPruning"):
        for kind in ("mesh", "single"):
            cb = CASE[name].make()
            L.seed_everything(0)
            model = ShardedTinyModel()
            if kind == "mesh":
                strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
                # The loader as given on both ranks (one replica; Lightning's sampler would reorder it).
                trainer = L.Trainer(**{**TRAINER, "devices": 2}, strategy=strategy, max_epochs=3, callbacks=[cb],
                                    use_distributed_sampler=False)
            else:
                trainer = L.Trainer(**TRAINER, max_epochs=3, callbacks=[cb])
            trainer.fit(model, datamodule=TinyData())
            result[f"{name}/{kind}"] = {"model": snapshot(model), "state": _state(cb), "step": trainer.global_step}
    save(out, result)


def averaging_per_step(out) -> None:
    """EMA (every step) and SWA (every step) under FSDP2: collectives and host syncs counted
    while their per-step hook runs (updates are shard-local: there must be none)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from lichtenberg.callbacks import EMA, SWA
    from lichtenberg.callbacks._averaging import _Averaging

    calls: dict[str, int] = {}
    inside = [0, 0]  # depth, hook calls

    def wrap(owner, name, counted):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if counted:
                if inside[0]:
                    calls[name] = calls.get(name, 0) + 1
                return original(*args, **kwargs)
            inside[0] += 1
            inside[1] += 1
            try:
                return original(*args, **kwargs)
            finally:
                inside[0] -= 1
        setattr(owner, name, wrapper)
        return owner, name, original

    undo = [wrap(_Averaging, "on_train_batch_end", False)]
    undo += [wrap(dist, n, True) for n in ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast",
                                           "reduce_scatter_tensor")]
    undo += [wrap(DTensor, n, True) for n in ("full_tensor", "redistribute")]
    undo += [wrap(torch.Tensor, n, True) for n in ("item", "tolist", "__bool__", "__int__", "__float__", "cpu")]
    try:
        cbs = [EMA(decay=0.9), SWA(start=0.25, interval="step", swa_lr=0.05)]
        trainer, _ = fit("fsdp2", cbs, log_every_n_steps=1000)
    finally:
        for owner, name, original in reversed(undo):
            setattr(owner, name, original)
    save(out, {"calls": calls, "hooks": inside[1], "updates": [c.averaged.num_updates for c in cbs],
               "steps": trainer.global_step})
