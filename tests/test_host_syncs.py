"""No host sync in a training step: every callback of ``tests/cases.py``, counted step by step.

Why: on an accelerator the host runs ahead of the device, queueing kernels. Anything that
needs a value the device computed (``t.item()``, ``bool(t)``, an op whose output size
depends on the values) or a blocking copy makes the host wait until the queue has drained;
the kernels behind it are launched only afterwards, so the device idles for the launch
latency of every one of them (QAT with 2 syncs per layer ran at 2.65x a plain step on an
H200). This machine has no accelerator, so the test counts the places that would sync:

- ``SYNC_OPS``: ATen ops that read device memory on the host (seen by a TorchDispatchMode);
- ``D2H``: Python-level reads of a tensor's values (``tolist``, ``numpy``, ``cpu``): on a
  CPU tensor they dispatch no ATen op, so a TorchFunctionMode counts them;
- ``H2D``: a tensor built from host data for a device (``torch.tensor(x, device=...)``,
  ``cpu_tensor.to(device)`` without ``non_blocking``): on CUDA a blocking copy from pageable
  memory synchronises the stream. On a CPU-only machine a host tensor and a device tensor
  are both CPU tensors, so every explicit device move of a CPU tensor counts, a no-op
  ``.to(device)`` of a tensor already there included: move state once per fit, not per step.

Each fit is cut into windows, one per training step (``StepWindows``): a window opens in
the first callback's ``on_train_batch_start`` and closes at the next batch's, so it holds the
whole step (every callback hook of the batch, forward, backward, the optimizer step with its
hooks, the after-step hooks, Lightning's step-end logging and the prefetch of the next
batch); on an epoch's last batch it closes after the last callback's ``on_train_batch_end``
(validation and the epoch's end are not a step). A fit without callbacks gives Lightning's
own syncs (the baseline: its per-step batch transfer); a callback may add none on a
steady-state step. Event steps (mask updates) and logging steps may sync, within the
documented bounds of ``EVENT_BOUND`` and ``LOGGING_BOUND``.
"""

from __future__ import annotations

import collections
import functools
import sys
from typing import Any, NamedTuple

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from lichtenberg.callbacks import EMA, SWA, QuantizationAwareTraining
from lichtenberg.callbacks._sparsity import _Sparsity
from tests.cases import CASES, EPOCHS, TRAINER, TinyData, TinyModel

aten = torch.ops.aten

# ATen ops that make the host wait for the device, and why.
SYNC_OPS = {
    aten._local_scalar_dense: "item(), bool(t), int(t), float(t), `if t:`, f'{t}': the value is read on the host",
    aten.is_nonzero: "bool(t) of a one-element tensor",
    aten.nonzero: "output size depends on the values (also torch.where(cond), argwhere)",
    aten.masked_select: "output size depends on the mask",
    aten._unique2: "torch.unique: output size depends on the values",
    aten.unique_dim: "torch.unique(dim=...): output size depends on the values",
    aten.unique_consecutive: "output size depends on the values",
    aten.equal: "torch.equal returns a Python bool",
    aten.bincount: "output size is max + 1",
    aten.repeat_interleave: "with tensor repeats and no output_size, the output size is repeats.sum()",
    aten.index: "t[bool_mask]: the mask is turned into indices (nonzero)",
    aten.index_put_: "t[bool_mask] = v: likewise",
    aten._index_put_impl_: "likewise",
}
_BOOL_INDEXED = {aten.index, aten.index_put_, aten._index_put_impl_}
D2H = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.__array__}
H2D_FACTORIES = {torch.tensor, torch.as_tensor, torch.asarray}

LOG_EVERY = 5  # Trainer(log_every_n_steps): logging steps occur in the fit
# Extra syncs a callback may add on its event steps, with the two target layers of TinyModel:
# - a mask update: the engine's counts, one device-to-host list for all layers each (pruning:
#   the allocation's budgets and the changed slots; RigL: the active weights, the drop counts
#   and the changed slots), and one host-to-device copy per logged Python float (pruning: the
#   target and the changed count; RigL: churn and drop fraction). Sparsities and ITOP are
#   logged as device tensors;
# - QAT's start step: the quantizers' scales are initialised from data (4 per layer);
# - an SWA snapshot at an epoch's end: its two logged floats.
EVENT_BOUND = {"GradualPruning": 4, "DynamicSparseTraining": 5, "QuantizationAwareTraining": 8, "SWA": 2}
# On logging steps (every log_every_n_steps): one host-to-device copy per logged Python float.
LOGGING_BOUND = {"EMA": 2}


def _bool_index(indices: Any) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


class SyncOps(TorchDispatchMode):
    """Counts ``SYNC_OPS`` into ``counts`` (key: the op)."""

    def __init__(self, counts: collections.Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = func.overloadpacket
        if op in SYNC_OPS:
            if op in _BOOL_INDEXED:
                counted = _bool_index(args[1])
            elif op is aten.repeat_interleave:
                counted = isinstance(args[0 if func is aten.repeat_interleave.Tensor else 1], torch.Tensor) \
                    and kwargs.get("output_size") is None
            else:
                counted = True
            if counted:
                self.counts[str(op)] += 1
        return func(*args, **kwargs)


def _device_move(args: tuple, kwargs: dict) -> bool:
    """Whether a ``Tensor.to`` call names a device (not only a dtype) and blocks."""
    if kwargs.get("non_blocking") or any(a is True for a in args[1:]):
        return False
    return "device" in kwargs or any(isinstance(a, (str, torch.device, torch.Tensor)) for a in args[1:])


# Lightning moves every logged value (and its torchmetrics state) to the module's device: on an
# accelerator a logged tensor is there already (a no-op), and a logged Python float is counted
# where it becomes a tensor (torch.tensor(value, device=...)).
_LOGGED_VALUE_MOVES = ("logger_connector", "torchmetrics")


def _moves_a_logged_value(depth: int = 12) -> bool:
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        if any(part in frame.f_code.co_filename for part in _LOGGED_VALUE_MOVES):
            return True
        frame = frame.f_back
    return False


class Transfers(TorchFunctionMode):
    """Counts reads of tensor values on the host (``D2H``) and tensors built from host data for a
    device (``H2D``), at the Python level where CPU tensors dispatch no ATen op."""

    def __init__(self, counts: collections.Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in D2H:
            self.counts[f"D2H {func.__name__}"] += 1
        elif func in H2D_FACTORIES and kwargs.get("device") is not None:
            self.counts[f"H2D torch.{func.__name__}"] += 1
        elif (func is torch.Tensor.to and _device_move(args, kwargs) and args[0].device.type == "cpu"
              and not _moves_a_logged_value()):
            self.counts["H2D Tensor.to"] += 1
        return func(*args, **kwargs)


class Counting:
    """Context manager: both counters at once, into one Counter."""

    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()
        self._modes = [Transfers(self.counts), SyncOps(self.counts)]

    def __enter__(self) -> collections.Counter:
        for mode in self._modes:
            mode.__enter__()
        return self.counts

    def __exit__(self, *exc: Any) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


def position(trainer: L.Trainer, batch_idx: int) -> str:
    """Where a step sits: Lightning's own work differs at the first step, an epoch's first batch
    and its last batch (where the window closes early)."""
    if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
        return "last"
    return "fit start" if trainer.global_step == 0 else "epoch start" if batch_idx == 0 else "middle"


class Window(NamedTuple):
    step: int  # trainer.global_step when the step started
    epoch: int
    where: str  # its ``position``
    counts: collections.Counter


class StepWindows:
    """One window per training step (see the module docstring), in ``steps``."""

    def __init__(self) -> None:
        self.steps: list[Window] = []
        self._open: Counting | None = None

    def open(self, trainer: L.Trainer, batch_idx: int) -> None:
        self.close()
        self._open = Counting()
        where = position(trainer, batch_idx)
        self.steps.append(Window(trainer.global_step, trainer.current_epoch, where, self._open.__enter__()))

    def close(self) -> None:
        if self._open is not None:
            self._open.__exit__(None, None, None)
            self._open = None

    def callbacks(self, between: list[Callback]) -> list[Callback]:
        """``between`` with an opener before them and a closer after them."""
        windows = self

        class Opener(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                windows.open(trainer, batch_idx)

            def on_train_end(self, trainer, pl_module):
                windows.close()

            def on_exception(self, trainer, pl_module, exception):
                windows.close()

        class Closer(Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if windows.steps and windows.steps[-1].where == "last":
                    windows.close()

        return [Opener(), *between, Closer()]


def counted_fit(callbacks: list[Callback]) -> list[Window]:
    """Seeded fit of TinyModel on TinyData with ``callbacks``; the counts of every step."""
    windows = StepWindows()
    L.seed_everything(0)
    trainer = L.Trainer(callbacks=windows.callbacks(callbacks), max_epochs=EPOCHS,
                        **{**TRAINER, "log_every_n_steps": LOG_EVERY})
    trainer.fit(TinyModel(), datamodule=TinyData())
    return windows.steps


@functools.cache
def baseline() -> dict[str, collections.Counter]:
    """What a step of a plain fit counts (Lightning's own), by ``position``: the same at every
    step of a position."""
    plain: dict[str, collections.Counter] = {}
    for w in counted_fit([]):
        assert plain.setdefault(w.where, w.counts) == w.counts, f"the baseline differs between {w.where} steps"
    return plain


def added(callbacks: list[Callback]) -> list[Window]:
    """A counted fit with ``callbacks``: per step, the syncs they added to the baseline."""
    plain = baseline()
    return [w._replace(counts=w.counts - plain[w.where]) for w in counted_fit(callbacks)]


@functools.cache
def case_fit(name: str) -> tuple[Callback, list[tuple[str, Window]]]:
    """One counted fit per case: the callback and, per step, its ``kind`` and the syncs it added."""
    (case,) = [c for c in CASES if c.name == name]
    cb = case.make()
    return cb, [(kind(cb, w), w) for w in added([cb])]


def kind(cb: Callback, w: Window) -> str:
    """"event" (a mask update, QAT's start, an epoch's SWA snapshot), "logging" (Lightning's
    logging steps, every LOG_EVERY-th) or "steady"."""
    if isinstance(cb, _Sparsity) and cb._due(w.step):
        return "event"
    if isinstance(cb, QuantizationAwareTraining) and w.step == cb._start:
        return "event"
    if isinstance(cb, SWA) and w.where == "last" and cb._due_after_epoch(w.epoch, w.step + 1):
        return "event"
    return "logging" if (w.step + 1) % LOG_EVERY == 0 else "steady"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_steady_state_step_adds_no_host_sync(case):
    _, steps = case_fit(case.name)
    found = {w.step: dict(w.counts) for k, w in steps if k == "steady" and w.counts}
    assert len(steps) > 20 and not found, f"{case.name} adds host syncs to steady-state steps: {found}"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_event_and_logging_steps_sync_within_their_bound(case):
    cb, steps = case_fit(case.name)
    report = {k: [sum(w.counts.values()) for kw, w in steps if kw == k] for k in ("event", "logging")}
    print(f"\n{case.name}: syncs added per event step {report['event']}, per logging step {report['logging']}")
    assert max(report["event"], default=0) <= EVENT_BOUND.get(case.name, 0), report
    assert max(report["logging"], default=0) <= LOGGING_BOUND.get(case.name, 0), report
    if isinstance(cb, (_Sparsity, QuantizationAwareTraining, SWA)):
        assert report["event"], "the fit must have event steps"


class InjectedSync(Callback):
    """A per-step hook with one sync of each kind the counters see."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        weight = pl_module.net[0].weight.detach()
        if bool(weight.any()):  # _local_scalar_dense
            weight.tolist()  # D2H tolist
        torch.tensor(0.5, device=pl_module.device)  # H2D torch.tensor
        weight[weight > 0].sum()  # a bool-mask index


def test_the_counters_catch_an_injected_sync():
    want = {"aten._local_scalar_dense": 1, "D2H tolist": 1, "H2D torch.tensor": 1, "aten.index": 1}
    steps = added([InjectedSync()])
    assert len(steps) > 20 and all(dict(w.counts) == want for w in steps), steps[:3]


class AllOps(TorchDispatchMode):
    """Counts every ATen op dispatched (by overload)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


class OpsPerCall:
    """Wraps one hook of a callback instance: records, per call, the step, every ATen op
    dispatched and the syncs."""

    def __init__(self, owner: Any, name: str) -> None:
        self.calls: list[tuple[int, collections.Counter, collections.Counter]] = []
        method = getattr(owner, name)

        @functools.wraps(method)
        def counted(trainer, *args, **kwargs):
            with Counting() as syncs, AllOps() as ops:
                out = method(trainer, *args, **kwargs)
            self.calls.append((trainer.global_step, ops.ops, syncs))
            return out

        setattr(owner, name, counted)  # on the instance: Lightning calls this one


def test_an_ema_update_is_one_foreach_lerp_per_group_and_nothing_else():
    # The per-step hook at its floor (docs/averaging.md, "Per-step cost"): one _foreach_lerp_ per
    # (device, dtype) group, the integer buffers copied; no allocation, no host sync, and
    # logging (a host-to-device copy per logged float) only on logging steps.
    ema = EMA(decay=0.9, start_step=1)
    hook = OpsPerCall(ema, "on_train_batch_end")
    L.seed_everything(0)
    trainer = L.Trainer(callbacks=[ema], max_epochs=1, **{**TRAINER, "log_every_n_steps": LOG_EVERY})
    trainer.fit(TinyModel(), datamodule=TinyData())
    floor = {"aten._foreach_lerp_.Scalar": len(ema.averaged._groups), "aten._foreach_copy_.default": 1}
    updates = [(step, ops, syncs) for step, ops, syncs in hook.calls if step > 1]
    assert len(updates) == ema.averaged.num_updates == 11
    for step, ops, syncs in updates:
        if step % LOG_EVERY:
            assert ops == floor and not syncs, (step, ops, syncs)
        else:  # a logging step: the update, then the logged floats
            assert all(ops[op] == n for op, n in floor.items()) and sum(syncs.values()) <= LOGGING_BOUND["EMA"], (step, ops)
