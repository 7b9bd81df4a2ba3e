"""GradualPruning through a real Trainer: schedule tracking, zeros that stay zero, export."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lichtenberg.callbacks import GradualPruning
from lichtenberg.core.schedules import SparsitySchedule
from lichtenberg.core.targets import Targets
from tests.cases import TRAINER as BASE
from tests.cases import TinyData, TinyModel, fit_tiny as fit

SCHEDULE = SparsitySchedule(kind="cubic", start=4, end=28, every_n_steps=4)



class Recorder(Callback):
    """After every optimizer step: per-layer sparsity of the masks and of the weights."""

    def __init__(self, pruning: GradualPruning):
        self.pruning, self.steps = pruning, []

    def on_train_batch_end(self, trainer, pl_module, *args):
        engine = self.pruning.engine
        masks = {n: 1 - m.float().mean().item() for n, m in engine.masks.items()}
        zeros_off_mask = all(bool((p[~engine.masks[n]] == 0).all()) for n, p in engine.params.items())
        self.steps.append((trainer.global_step, masks, zeros_off_mask))


def test_sparsity_follows_the_schedule_at_every_event_and_nowhere_else():
    gp = GradualPruning(sparsity=0.8, schedule=SCHEDULE, allocation="uniform")
    rec = Recorder(gp)
    fit([gp, rec])
    sizes = {n: m.numel() for n, m in gp.engine.masks.items()}
    previous = None
    for step, per_layer, zeros in rec.steps:
        event = step - 1  # pruning happens before optimizer step `event + 1`
        target = SCHEDULE.value(event, 0.8, 4, 28)
        for name, got in per_layer.items():
            assert abs(got - target) * sizes[name] <= 1.0 + 1e-9, (step, name, got, target)  # ±1 weight
        if previous is not None and not SCHEDULE.is_event(event, 4, 28):
            assert per_layer == previous, f"masks changed outside an event at step {step}"
        assert zeros
        previous = per_layer
    assert rec.steps[-1][1] == {n: 1 - round(0.2 * s) / s for n, s in sizes.items()}  # final target exact


@pytest.mark.parametrize(
    "optimizer, clip",
    [("sgd_momentum", None), ("adam", None), ("adam_fused", None), ("adamw_wd", None), ("sgd_momentum", 0.01),
     ("adamax", None)],
)
def test_pruned_weights_stay_exactly_zero(optimizer, clip):
    class Model(TinyModel):
        def configure_optimizers(self):
            params = self.parameters()
            if optimizer == "adam":
                return torch.optim.Adam(params, lr=0.05)
            if optimizer == "adam_fused":  # the fast CPU path the warning recommends
                return torch.optim.Adam(params, lr=0.05, fused=True)
            if optimizer == "adamw_wd":
                return torch.optim.AdamW(params, lr=0.05, weight_decay=0.5)
            if optimizer == "adamax":  # not known to preserve zeros: re-masked after its step
                return torch.optim.Adamax(params, lr=0.05, weight_decay=1e-3)
            return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3)

    gp = GradualPruning(sparsity=0.7, schedule=SCHEDULE, allocation="global")
    rec = Recorder(gp)
    fit([gp, rec], model=Model(), gradient_clip_val=clip)
    assert all(zeros for _, _, zeros in rec.steps)
    assert sum(1 - v for v in rec.steps[-1][1].values()) < 2  # really sparse at the end


def test_nan_gradient_in_a_pruned_slot_does_not_reach_the_weight():
    class Poison(Callback):
        def on_after_backward(self, trainer, pl_module):
            if trainer.global_step > 10:
                w = pl_module.net[0].weight
                w.grad[~pl_module.net[0].weight_mask] = float("nan")

    gp = GradualPruning(sparsity=0.5, schedule=SparsitySchedule(kind="one_shot", start=2))
    _, model = fit([gp, Poison()])
    assert torch.isfinite(model.net[0].weight).all()
    assert (model.net[0].weight[~model.net[0].weight_mask] == 0).all()


def test_targets_are_reported_and_checkpoints_load_with_and_without_lichtenberg(tmp_path, caplog):
    gp = GradualPruning(sparsity=0.5, schedule=SCHEDULE, targets=Targets(types=["Linear"], exclude=["net.3"]))
    with caplog.at_level("INFO"):
        trainer, model = fit([gp])
    assert "1 parameters selected: net.0.weight" in caplog.text
    assert "not selected: net.3.weight (excluded by 'net.3')" in caplog.text
    path = tmp_path / "pruned.ckpt"
    trainer.save_checkpoint(path)
    # Fresh module + callback: mask keys match, masks restored.
    fresh_gp = GradualPruning(sparsity=0.5, schedule=SCHEDULE, targets=Targets(types=["Linear"], exclude=["net.3"]))
    fresh = TinyModel()
    L.Trainer(callbacks=[fresh_gp], **BASE).validate(fresh, datamodule=TinyData(), ckpt_path=path, verbose=False)
    assert torch.equal(fresh.net[0].weight_mask, model.net[0].weight_mask)
    # Squashed: a plain module without lichtenberg loads the weights.
    nonzeros = gp.engine.squash_()
    assert nonzeros == {"net.0.weight": int(model.net[0].weight.count_nonzero())} == {"net.0.weight": 64}
    plain = TinyModel()
    plain.load_state_dict(model.state_dict())  # strict


def test_make_permanent_leaves_a_plain_module():
    gp = GradualPruning(sparsity=0.5, schedule=SCHEDULE, make_permanent=True)  # default allocation: LAMP (global)
    _, model = fit([gp])
    assert not any(k.endswith("_mask") for k in model.state_dict())
    nonzero = int(model.net[0].weight.count_nonzero()) + int(model.net[3].weight.count_nonzero())
    assert nonzero == round(0.5 * (128 + 64))


def test_rewind_is_off_by_default_and_rewinds_survivors_when_on():
    L.seed_everything(0)
    init = TinyModel().net[0].weight.detach().clone()  # fit() seeds identically: the same init
    gp = GradualPruning(sparsity=0.5, schedule=SparsitySchedule(kind="one_shot", start=30), rewind=True)
    rec = []

    class AfterEvent(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 30:
                rec.append(pl_module.net[0].weight.detach().clone())

    fit([gp, AfterEvent()])
    mask = gp.engine.masks["net.0.weight"]
    torch.testing.assert_close(rec[0][mask], init[mask])
    assert not torch.equal(rec[0][mask], gp.engine.params["net.0.weight"][mask])  # trained on after
    assert GradualPruning().rewind is False


class IgnoredByDDP(Callback):
    """Saves, per rank, which buffers DDP was told not to broadcast (module level: ddp_spawn pickles it)."""

    def __init__(self, path):
        self.path = path

    def on_train_start(self, trainer, pl_module):
        ignored = set(trainer.strategy.model.parameters_to_ignore)
        torch.save(sorted(ignored), f"{self.path}/ignored{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_does_not_broadcast_masks_every_step(tmp_path):
    gp = GradualPruning(sparsity=0.5, schedule=SCHEDULE)
    trainer = L.Trainer(callbacks=[gp, IgnoredByDDP(str(tmp_path))], max_epochs=5, strategy="ddp_spawn",
                        **{**BASE, "devices": 2})
    trainer.fit(TinyModel(), datamodule=TinyData())
    for rank in (0, 1):
        assert torch.load(tmp_path / f"ignored{rank}.pt") == ["net.0.weight_mask", "net.3.weight_mask"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sparsity": 1.0}, "sparsity=1.0 must lie in"),
        ({"sparsity": -0.1}, "sparsity=-0.1"),
        ({"pattern": "5:4"}, "0 < N <= M"),
        ({"pattern": "2:4", "sparsity": 0.7}, "set sparsity=0.5"),
        ({"allocation": "random"}, "allocation='random'"),
        ({"allocation": {"net.0": 1.5}}, "per-layer sparsities must lie in"),
        ({"score": "taylor"}, "score='taylor'"),
    ],
)
def test_bad_input_raises_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        GradualPruning(**kwargs)


def test_bad_schedule_and_targets_raise_before_training():
    with pytest.raises(ValueError, match="after end"):
        SparsitySchedule(start=20, end=10)
    model = TinyModel()
    before = model.net[0].weight.detach().clone()
    with pytest.raises(ValueError, match="match no module"):
        fit([GradualPruning(targets=Targets(include=["encoder.*"]))], model=model)
    with pytest.raises(ValueError, match="net.4.weight has 4 inputs per output, not divisible by M=8"):
        fit([GradualPruning(sparsity=0.5, pattern="4:8", schedule=SCHEDULE)], model=_odd_model())
    with pytest.raises(ValueError, match="training stops at step 36"):
        fit([GradualPruning(schedule=SparsitySchedule(start=10, end=100))])
    assert torch.equal(model.net[0].weight, before)


def _odd_model():
    model = TinyModel()
    model.net.append(torch.nn.Linear(4, 4))  # 4 inputs per output: no 4:8 groups
    return model


@pytest.mark.parametrize("score", ["wanda", "gradient"])
def test_activation_and_gradient_scores_through_the_trainer(score):
    magnitude = GradualPruning(sparsity=0.6, schedule=SCHEDULE, allocation="uniform")
    fit([magnitude])
    gp = GradualPruning(sparsity=0.6, schedule=SCHEDULE, score=score, allocation="uniform")
    _, model = fit([gp])
    assert all(not m._forward_pre_hooks for m in model.modules()), "input-norm hooks live only around events"
    for name, mask in gp.engine.masks.items():
        assert int(mask.sum()) == round(0.4 * mask.numel())
        assert (gp.engine.params[name][~mask] == 0).all()
    assert any(not torch.equal(gp.engine.masks[n], magnitude.engine.masks[n]) for n in gp.engine.masks)


def test_explicit_per_layer_sparsity_dict():
    gp = GradualPruning(sparsity=0.5, schedule=SCHEDULE, allocation={"net.0": 0.9})
    rec = Recorder(gp)
    fit([gp, rec])
    final = rec.steps[-1][1]
    assert final["net.0.weight"] == 1 - round(0.1 * 128) / 128  # the dict's 0.9
    assert final["net.3.weight"] == 0.5  # unmatched: `sparsity`
    halfway = [per for step, per, _ in rec.steps if step - 1 == 16][0]  # cubic progress at event 16
    progress = SCHEDULE.value(16, 1.0, 4, 28)
    assert abs(halfway["net.0.weight"] - 0.9 * progress) * 128 <= 1
    with pytest.raises(ValueError, match=r"allocation globs \['enc\*'\] match no pruned module"):
        fit([GradualPruning(schedule=SCHEDULE, allocation={"enc*": 0.5})])


class NMRecorder(Callback):
    """After every optimizer step: masks, and whether every 4-group of each weight keeps exactly 2."""

    def __init__(self, pruning: GradualPruning):
        self.pruning, self.masks, self.exact = pruning, [], []

    def on_train_batch_end(self, trainer, pl_module, *args):
        engine = self.pruning.engine
        self.masks.append({n: m.clone() for n, m in engine.masks.items()})
        self.exact.append(all(bool(((p != 0).reshape(-1, 4).sum(1) == 2).all()) for p in engine.params.values()))


def test_sr_ste_recomputes_the_nm_mask_every_step_from_a_dense_latent_weight():
    schedule = SparsitySchedule(kind="one_shot", start=4)
    fixed = GradualPruning(sparsity=0.5, pattern="2:4", schedule=schedule)
    srste = GradualPruning(sparsity=0.5, pattern="2:4", schedule=schedule, sr_ste=2e-4)
    (rec_fixed, rec_srste) = NMRecorder(fixed), NMRecorder(srste)
    fit([fixed, rec_fixed])
    _, model = fit([srste, rec_srste])
    assert all(rec_srste.exact[4:]) and all(rec_fixed.exact[4:])  # exactly 2 of 4 after every step from the start

    def flips(rec):
        return sum(any(not torch.equal(a[n], b[n]) for n in a) for a, b in zip(rec.masks[4:], rec.masks[5:]))

    assert flips(rec_fixed) == 0  # plain N:M: masks fixed at the event
    assert flips(rec_srste) > 0  # SR-STE: pruned weights can come back
    latent = srste._srste.latent
    for name, param in srste.engine.params.items():  # the parameter is the masked latent weight
        mask = srste.engine.masks[name]
        assert torch.equal(param, torch.where(mask, latent[name], 0.0))
        assert (latent[name][~mask] != 0).any()


def test_sr_ste_resumes_bit_exactly(tmp_path):
    from tests.test_contract import assert_same, crash_and_resume

    def make():
        return [GradualPruning(sparsity=0.5, pattern="2:4", schedule=SparsitySchedule(kind="one_shot", start=4), sr_ste=1e-2)]

    (ref_cb,), ref, (cb,), resumed = crash_and_resume(make, tmp_path)
    assert_same(resumed.state_dict(), ref.state_dict(), "final weights and masks")
    assert_same(cb.state_dict(), ref_cb.state_dict(), "latent weights")
    assert cb.state_dict()["sr_ste_latent"]


def test_sr_ste_bad_input():
    with pytest.raises(ValueError, match="needs a decay >= 0.*N:M pattern"):
        GradualPruning(sparsity=0.5, sr_ste=2e-4)
    with pytest.raises(ValueError, match="score='magnitude'"):
        GradualPruning(sparsity=0.5, pattern="2:4", score="wanda", sr_ste=2e-4)
