"""EMA and SWA through a real Trainer: what users rely on beyond the generic contract."""

from __future__ import annotations

import types

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelPruning
from torch import nn

from lichtenberg.callbacks import EMA, SWA
from lichtenberg.core.averaging import update_bn_
from tests.cases import TinyData, TinyModel

BASE = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, deterministic=True)


def fit(callbacks=(), model=None, max_epochs=3, **kwargs):
    L.seed_everything(0)
    model = model or TinyModel()
    trainer = L.Trainer(callbacks=list(callbacks), max_epochs=max_epochs, **{**BASE, **kwargs})
    trainer.fit(model, datamodule=TinyData())
    return trainer, model


class WeightsSeenByValidation(Callback):
    """Records the weights the model has while validation batches run, and right after."""

    def __init__(self):
        self.during, self.after = [], []

    def on_validation_batch_start(self, trainer, pl_module, *args):
        if not trainer.sanity_checking:
            self.during.append(pl_module.net[0].weight.detach().clone())

    def on_train_batch_start(self, trainer, pl_module, *args):
        if self.during and len(self.after) < len(self.during):
            self.after.append(pl_module.net[0].weight.detach().clone())


def test_ema_does_not_perturb_training_and_validation_sees_the_average():
    _, plain = fit()
    seen = WeightsSeenByValidation()
    ema = EMA(decay=0.9)
    fit([ema, seen])
    # The raw trajectory is bit-identical to training without EMA.
    for name, value in plain.state_dict().items():
        assert torch.equal(ema.raw_weights[name], value), name
    # Validation ran on averaged weights, and training resumed from the raw ones.
    assert len(seen.during) >= 2
    assert not torch.equal(seen.during[0], seen.after[0])
    assert torch.equal(seen.during[-1], ema.averaged.tensors["net.0.weight"])


def test_evaluate_averaged_false_validates_raw_weights():
    seen = WeightsSeenByValidation()
    ema = EMA(decay=0.9, evaluate_averaged=False, apply_at_end=False)
    _, model = fit([ema, seen])
    assert ema.raw_weights is None
    assert not torch.equal(model.net[0].weight, ema.averaged.tensors["net.0.weight"])
    assert torch.equal(seen.during[0], seen.after[0])


def test_checkpoint_after_fit_stores_raw_weights_and_test_from_it_uses_the_average(tmp_path):
    ema = EMA(decay=0.9)
    trainer, model = fit([ema])
    path = tmp_path / "after_fit.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    for name, raw in ema.raw_weights.items():
        assert torch.equal(ckpt["state_dict"][name], raw), "model state must be the raw weights"
    # A fresh module + callback evaluates the average from the checkpoint.
    fresh_ema = EMA(decay=0.9)
    tester = L.Trainer(callbacks=[fresh_ema], **BASE)
    result = tester.test(TinyModel(), datamodule=TinyData(), ckpt_path=path, verbose=False)
    expected = L.Trainer(**BASE).test(model, datamodule=TinyData(), verbose=False)  # model holds the average
    assert result[0]["val_acc"] == pytest.approx(expected[0]["val_acc"])
    assert result[0]["val_loss"] == pytest.approx(expected[0]["val_loss"])
    assert fresh_ema.averaged.num_updates == ema.averaged.num_updates


def test_checkpoint_loads_into_a_plain_module_without_lichtenberg(tmp_path):
    trainer, _ = fit([EMA(decay=0.9)], max_epochs=1)
    path = tmp_path / "c.ckpt"
    trainer.save_checkpoint(path)
    TinyModel.load_from_checkpoint(path)  # strict key match: no extra or missing keys


def test_start_and_interval_count_optimizer_steps():
    ema = EMA(decay=0.9, start_step=10, every_n_steps=4)
    trainer, _ = fit([ema])  # 36 steps
    assert ema.averaged.num_updates == len([s for s in range(11, 37) if s % 4 == 0])


def test_ema_logs_its_weight_and_update_count():
    trainer, _ = fit([EMA(decay=0.9)], log_every_n_steps=1)
    assert trainer.callback_metrics["ema/updates"] == 36
    assert 0 < trainer.callback_metrics["ema/weight"] < 1


def test_offloaded_average_is_identical():
    a, b = EMA(decay=0.9), EMA(decay=0.9, offload_to_cpu=True)
    fit([a])
    fit([b])
    for name in a.averaged.tensors:
        assert torch.equal(a.averaged.tensors[name], b.averaged.tensors[name])


def test_two_emas_keep_separate_state():
    fast, slow = EMA(decay=0.5), EMA(decay=0.99)
    assert fast.state_key != slow.state_key
    _, model = fit([fast, slow])
    assert not torch.equal(fast.averaged.tensors["net.0.weight"], slow.averaged.tensors["net.0.weight"])
    assert torch.equal(model.net[0].weight, slow.averaged.tensors["net.0.weight"])  # the later one ships


def test_layers_built_in_configure_model_are_averaged():
    class Late(TinyModel):
        def configure_model(self):
            if not hasattr(self, "extra"):
                self.extra = nn.Linear(4, 4)

        def forward(self, x):
            return self.extra(self.net(x))

    ema = EMA(decay=0.9)
    fit([ema], model=Late())
    assert "extra.weight" in ema.averaged.tensors and ema.averaged.num_updates == 36


def test_torch_prune_reparametrisation_gives_a_clear_error_not_a_shape_crash():
    # Lightning's EMAWeightAveraging crashes here with a broadcast-shape error (positional zip).
    with pytest.raises(ValueError, match="no longer a parameter or buffer"):
        fit([ModelPruning("l1_unstructured", amount=0.5, use_lottery_ticket_hypothesis=False), EMA(decay=0.9)])


class LrLog(Callback):
    def __init__(self):
        self.lrs = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])


def test_swa_never_replaces_the_users_scheduler_unless_asked():
    plain_log, swa_log, swa_lr_log = LrLog(), LrLog(), LrLog()
    fit([plain_log])
    fit([SWA(start=0.5), swa_log])
    assert swa_log.lrs == plain_log.lrs  # StepLR's decay untouched
    fit([SWA(start=0.5, swa_lr=0.01), swa_lr_log])  # SWA's hook runs first, then the logger's
    start = 18  # 0.5 * 36 steps
    assert swa_lr_log.lrs[:start] == plain_log.lrs[:start]
    assert all(lr == 0.01 for lr in swa_lr_log.lrs[start:])


def test_swa_recomputes_batchnorm_for_the_averaged_weights():
    swa = SWA(start=0.3, interval="step", every_n=3)
    _, model = fit([swa])
    bn = model.net[1]
    got = bn.running_mean.clone(), bn.running_var.clone()
    loader = TinyData().train_dataloader()
    loader.sampler.set_epoch(2)  # the pass ran after the last (third) epoch: same batches
    update_bn_(model, [x for x, _ in loader], lambda m, x: m(x))
    torch.testing.assert_close(got[0], bn.running_mean)
    torch.testing.assert_close(got[1], bn.running_var)
    skip = SWA(start=0.3, interval="step", every_n=3, bn_batches=0)
    _, skipped = fit([skip])
    assert not torch.allclose(skipped.net[1].running_mean, got[0])  # averaged stats, not recomputed


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: EMA(decay=1.0), "decay=1.0 must lie in"),
        (lambda: EMA(decay=0.0), "decay=0.0 must lie in"),
        (lambda: EMA(decay=-0.5), "decay=-0.5"),
        (lambda: EMA(warmup_power=0.0), "warmup_power=0.0"),
        (lambda: EMA(warmup_gamma=0.0), "warmup_gamma=0.0"),
        (lambda: EMA(start_step=-1), "start_step=-1"),
        (lambda: EMA(every_n_steps=0), "every_n_steps=0"),
        (lambda: SWA(start=1.0), "start=1.0"),
        (lambda: SWA(start=-3), "start=-3"),
        (lambda: SWA(every_n=0), "every_n=0"),
        (lambda: SWA(interval="batch"), "interval='batch'"),
        (lambda: SWA(swa_lr=0.0), "swa_lr=0.0"),
        (lambda: SWA(bn_batches=-1), "bn_batches=-1"),
    ],
)
def test_bad_input_raises_value_error_at_construction(make, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        make()


@pytest.mark.parametrize("start", [36, 500])
def test_swa_start_after_the_end_fails_before_any_step(start):
    model = TinyModel()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"start={start} is optimizer step {start}, but training ends at step 36"):
        fit([SWA(start=start)], model=model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_summary_warns_when_the_warmup_hides_the_decay():
    short = EMA(decay=0.999)
    fit([short])  # 36 updates: the warm-up keeps the horizon near 10 updates
    notes = [v for k, v in short._summary_rows() if k == "note"]
    assert notes and "under half of decay 0.999's" in notes[0]
    fine = EMA(decay=0.5)
    fit([fine])
    assert not [v for k, v in fine._summary_rows() if k == "note"]


class NoForward(TinyModel):
    """A module that calls its layers in training_step and defines no forward of its own."""

    forward = L.LightningModule.forward

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        pass


class Steps(Callback):
    def __init__(self):
        self.batches = 0

    def on_train_batch_start(self, *args):
        self.batches += 1


def test_swa_without_forward_or_bn_forward_fails_at_fit_start():
    # Before: the whole run trained, then the BatchNorm pass crashed in nn.Module's forward.
    steps = Steps()
    with pytest.raises(ValueError, match="bn_forward"):
        fit([SWA(start=0.5), steps], model=NoForward())
    assert steps.batches == 0
    fit([SWA(start=0.5, bn_batches=0)], model=NoForward())  # no BatchNorm pass: nothing to run

    class WithBNForward(SWA):
        def bn_forward(self, pl_module, batch):
            pl_module.net(batch[0])

    _, model = fit([WithBNForward(start=0.5)], model=NoForward())
    assert model.net[1].num_batches_tracked > 0


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_swa_batchnorm_pass_under_true_half_precision(precision):
    # Before: the pass fed float32 batches to the half-precision model and crashed after the
    # whole run, leaving the module with averaged weights and reset statistics.
    swa = SWA(start=0.3, interval="step", every_n=3)
    _, model = fit([swa], precision=precision)
    bn = model.net[1]
    assert bn.running_mean.dtype == model.net[0].weight.dtype != torch.float32
    assert int(bn.num_batches_tracked) == 12  # one epoch of 12 batches, cumulative statistics
    assert torch.isfinite(bn.running_var.float()).all() and not torch.equal(bn.running_var, torch.ones_like(bn.running_var))


def test_a_failing_batchnorm_pass_leaves_the_raw_weights():
    class Broken(SWA):
        def bn_forward(self, pl_module, batch):
            raise RuntimeError("bad batch")

    swa = Broken(start=0.3, interval="step", every_n=3)
    model = TinyModel()
    with pytest.raises(RuntimeError, match="bad batch"):
        fit([swa], model=model)
    assert swa.raw_weights is None  # the module was given its raw weights back
    assert not torch.equal(model.net[0].weight, swa.averaged.tensors["net.0.weight"])
    assert not torch.equal(model.net[1].running_var, torch.ones(16))  # statistics not left reset


def test_averaged_state_dict_is_a_whole_copy_of_the_averages():
    ema = EMA(decay=0.9)
    with pytest.raises(ValueError, match=r"averaged_state_dict\(\) before any fit"):
        ema.averaged_state_dict()
    _, model = fit([ema], max_epochs=1)
    out = ema.averaged_state_dict()
    assert set(out) == set(model.state_dict())  # every parameter and persistent buffer
    for name, value in out.items():
        assert torch.equal(value, ema.averaged.tensors[name]) and value is not ema.averaged.tensors[name], name
    # The module holds the averages after fit, so the export loads back into it unchanged.
    for name, value in model.state_dict().items():
        assert torch.equal(value, out[name].to(value.dtype)), name


class ModelParallelStrategy:  # stand in for Lightning's: only its name is checked
    pass


@pytest.mark.parametrize("cls", [EMA, SWA])
def test_offload_to_cpu_under_fsdp2_is_refused_naming_the_fix(cls):
    trainer = types.SimpleNamespace(strategy=ModelParallelStrategy(), callbacks=[], world_size=2)
    with pytest.raises(ValueError, match="offload_to_cpu=True under ModelParallelStrategy.*set offload_to_cpu=False"):
        cls(offload_to_cpu=True).setup(trainer, TinyModel(), "fit")


def test_without_sharded_parameters_nothing_is_attached_to_the_model():
    # DDP and single device keep every average in the callback (and its checkpoint state).
    ema = EMA(decay=0.9)
    _, model = fit([ema], max_epochs=1)
    assert ema._attached == [] and not any(k.endswith("_ema") for k in model.state_dict())
    assert set(ema.state_dict()["tensors"]) == set(model.state_dict())
