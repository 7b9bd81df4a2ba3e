"""DynamicSparseTraining through a real Trainer: exact densities, zeros, regrowth, ITOP, DDP, resume."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lichtenberg.callbacks import DynamicSparseTraining
from lichtenberg.core.schedules import SparsitySchedule
from tests.cases import TRAINER as BASE
from tests.cases import StateDump, TinyData, TinyModel, fit_tiny

SCHEDULE = SparsitySchedule(kind="cubic", start=0, end=0.75, every_n_steps=4)  # 48 steps: updates at 4..32
GRANET = SparsitySchedule(kind="cubic", start=0, end=0.75, every_n_steps=4, initial=0.5)


def make_model(optimizer):
    class Model(TinyModel):
        def configure_optimizers(self):
            params = self.parameters()
            if optimizer == "adam":
                return torch.optim.Adam(params, lr=0.02)
            if optimizer == "adamw_wd":
                return torch.optim.AdamW(params, lr=0.02, weight_decay=0.5)
            return torch.optim.SGD(params, lr=0.1, momentum=0.9)

    return Model()


def fit(callbacks, model=None, **kwargs):
    return fit_tiny(callbacks, model, max_epochs=4, **kwargs)


class Probe(Callback):
    """Placed after the DST callback: sees each update right after it, and every finished step."""

    def __init__(self, dst: DynamicSparseTraining):
        self.dst, self.before, self.grown, self.counts, self.zeros, self.fanins = dst, None, 0, [], [], []
        self.alive = []

    def on_train_batch_start(self, trainer, pl_module, *args):
        self.before = {n: m.clone() for n, m in self.dst.engine.masks.items()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        engine = self.dst.engine
        for name, mask in engine.masks.items():
            grown = mask & ~self.before[name]
            if grown.any():
                self.grown += int(grown.sum())
                param = engine.params[name]
                assert (param[grown] == 0).all(), f"{name}: a regrown weight is not zero"
                for value in optimizer.state.get(param, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == param.shape:
                        assert (value[grown] == 0).all(), f"{name}: optimizer state of a regrown slot not reset"

    def on_train_batch_end(self, trainer, pl_module, *args):
        engine = self.dst.engine
        self.counts.append({n: int(m.sum()) for n, m in engine.masks.items()})
        self.zeros.append(all(bool((p[~engine.masks[n]] == 0).all()) for n, p in engine.params.items()))
        self.fanins.append({n: set(m.reshape(m.shape[0], -1).sum(1)[self.dst._alive[n]].tolist()) for n, m in engine.masks.items()})
        self.alive.append({n: int(a.sum()) for n, a in self.dst._alive.items()})


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam", "adamw_wd"])
@pytest.mark.parametrize("method", ["static", "set", "rigl", "granet", "srigl"])
def test_densities_zeros_and_regrowth_after_every_step(method, optimizer):
    dst = DynamicSparseTraining(0.75, method, GRANET if method == "granet" else SCHEDULE)
    probe = Probe(dst)
    fit([dst, probe], model=make_model(optimizer))
    assert all(probe.zeros), "a masked weight became non-zero"
    sizes = {n: m.numel() for n, m in dst.engine.masks.items()}
    if method in ("static", "set", "rigl"):  # per-layer counts fixed at the initial (ERK) allocation
        assert all(c == probe.counts[0] for c in probe.counts)
    if method == "granet":  # global count follows the cubic ramp from 50% to 75%, exact at each step
        for step, counts in enumerate(probe.counts):  # counts[i]: after optimizer step i
            target = GRANET.value(step, 0.75, 0, 36)
            assert sum(counts.values()) == round((1 - target) * sum(sizes.values())), (step, counts)
        assert probe.counts[-1] != probe.counts[0]
    if method == "srigl":
        assert all(len(f) == 1 for step in probe.fanins for f in step.values()), "fan-in differs between neurons"
        # constant fan-in k' = budget // alive: the layer's budget, less the remainder (< alive) after an ablation
        for counts, alive in zip(probe.counts, probe.alive):
            assert all(probe.counts[0][n] - alive[n] < c <= probe.counts[0][n] for n, c in counts.items()), counts
    if method == "static":
        assert probe.grown == 0
    else:
        assert probe.grown > 0 and dst._updates > 0


def test_itop_grows_for_dynamic_methods_and_is_constant_for_static():
    itop = {}
    for method in ["static", "set", "rigl", "granet"]:
        dst = DynamicSparseTraining(0.75, method, GRANET if method == "granet" else SCHEDULE)
        fit([dst])
        itop[method] = dst.itop
    assert itop["static"] == pytest.approx(0.25, abs=0.01)
    assert itop["set"] > 0.3 and itop["rigl"] > 0.3
    assert itop["granet"] > 0.5 + 0.1  # beyond its initial 50% mask


def test_rigl_grows_where_the_dense_gradient_is_largest():
    class Spy(Callback):
        def __init__(self, dst):
            self.dst, self.checked = dst, 0

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 4:  # first update: the DST callback ran just before this
                for name, param in self.dst.engine.params.items():
                    grown = self.dst.engine.masks[name] & ~self.before[name]
                    candidates = ~self.before[name]
                    g = param.grad.abs()
                    # every grown slot's |grad| is at least that of any inactive slot left out
                    left_out = candidates & ~grown
                    if grown.any() and left_out.any():
                        assert g[grown].min() >= g[left_out].max()
                        self.checked += 1

        def on_train_batch_start(self, trainer, pl_module, *args):
            self.before = {n: m.clone() for n, m in self.dst.engine.masks.items()}

    dst = DynamicSparseTraining(0.75, "rigl", SCHEDULE)
    spy = Spy(dst)
    fit([dst, spy])
    assert spy.checked == 2


def test_dense_gradient_is_read_before_masking_and_not_kept():
    dst = DynamicSparseTraining(0.75, "rigl", SCHEDULE)
    trainer, model = fit([dst])
    # no dense-gradient copy lives in the callback: its state is masks' bookkeeping only
    assert set(dst.state_dict()) == {"generator", "updates", "churn", "ever", "alive", "config"}
    for name, param in dst.engine.params.items():
        assert param.grad is None or (param.grad[~dst.engine.masks[name]] == 0).all()


@pytest.mark.parametrize("method", ["set", "srigl", "granet"])
def test_crash_resume_is_bit_exact(method, tmp_path):
    from tests.test_contract import assert_same, crash_and_resume

    schedule = GRANET if method == "granet" else SCHEDULE
    (ref_cb,), ref, (cb,), resumed = crash_and_resume(lambda: [DynamicSparseTraining(0.75, method, schedule)], tmp_path)
    assert_same(resumed.state_dict(), ref.state_dict(), "final weights and masks")
    assert_same(cb.state_dict(), ref_cb.state_dict(), "generator, ITOP and ablation state")
    assert cb._updates == ref_cb._updates > 4


@pytest.mark.slow
@pytest.mark.parametrize("method", ["set", "rigl"])
def test_ddp_masks_identical_on_both_ranks(method, tmp_path):
    dst = DynamicSparseTraining(0.75, method, SCHEDULE)
    trainer = L.Trainer(**{**BASE, "devices": 2}, strategy="ddp_spawn", max_epochs=4, callbacks=[dst, StateDump(str(tmp_path))])
    L.seed_everything(0)
    trainer.fit(TinyModel(), datamodule=TinyData())
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    masks = [k for k in r0["model"] if k.endswith("_mask")]
    assert masks and r0["callbacks"]["DynamicSparseTraining"]["updates"] == 4  # 24 steps per rank: 4, 8, 12, 16
    for key in masks:
        assert torch.equal(r0["model"][key], r1["model"][key]), key
    assert torch.equal(r0["callbacks"]["DynamicSparseTraining"]["generator"], r1["callbacks"]["DynamicSparseTraining"]["generator"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "prune"}, "method='prune' must be one of"),
        ({"sparsity": 1.0}, "sparsity=1.0 must lie in"),
        ({"sparsity": -0.5}, "sparsity=-0.5"),
        ({"drop_fraction": 0.0}, "drop_fraction=0.0 must lie in"),
        ({"drop_fraction": 1.0}, "drop_fraction=1.0"),
        ({"allocation": "global"}, "allocation='global' must be"),
        ({"method": "granet", "sparsity": 0.5, "schedule": SparsitySchedule(initial=0.8)}, "GraNet only prunes"),
    ],
)
def test_bad_input_raises_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DynamicSparseTraining(**kwargs)


def test_bad_schedule_raises_before_training():
    with pytest.raises(ValueError, match="every_n_steps=0 must be >= 1"):
        DynamicSparseTraining(schedule=SparsitySchedule(every_n_steps=0))
    with pytest.raises(ValueError, match="start=0.8 is after end=0.5"):
        DynamicSparseTraining(schedule=SparsitySchedule(start=0.8, end=0.5))
    with pytest.raises(ValueError, match="training stops at step 48"):
        fit([DynamicSparseTraining(schedule=SparsitySchedule(start=0, end=100))])


def test_cpu_adam_without_fused_gets_a_hint():
    with pytest.warns(UserWarning, match="pass fused=True to Adam"):
        fit([DynamicSparseTraining(0.75, "static", SCHEDULE)], model=make_model("adam"))
