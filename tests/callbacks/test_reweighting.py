"""SampleReweighting and DataPruning through a real Trainer: protocol, shorter epochs, DDP, resume."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lichtenberg.callbacks import DataPruning, SampleReweighting
from tests.cases import TinyData, TinyModel, flat_state

BASE = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, deterministic=True)


class PerSampleModel(TinyModel):
    """Returns per-sample losses: the opt-in of the protocol (no lichtenberg import)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y, reduction="none")


class MeanModel(TinyModel):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)


def fit(callbacks, model_cls, max_epochs=4, datamodule=None, **kwargs):
    L.seed_everything(0)
    model = model_cls()  # after seeding: every run starts from the same weights
    trainer = L.Trainer(callbacks=list(callbacks), max_epochs=max_epochs, **{**BASE, **kwargs})
    trainer.fit(model, datamodule=datamodule or TinyData())
    return trainer, model


class Seen(Callback):
    """Records the inputs of every training batch."""

    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append((trainer.current_epoch, batch[0].clone()))


def test_uniform_rule_equals_the_plain_mean_and_linupper_differs():
    _, plain = fit([], MeanModel)
    _, uniform = fit([SampleReweighting(rule="uniform", warmup_steps=0)], PerSampleModel)
    _, lin = fit([SampleReweighting(rule="linupper", warmup_steps=0)], PerSampleModel)
    for key, value in plain.state_dict().items():
        assert torch.allclose(uniform.state_dict()[key].float(), value.float(), atol=1e-6), key
    assert not torch.allclose(lin.net[0].weight, plain.net[0].weight)


def test_removing_the_callback_keeps_the_mean_via_weighted_loss_and_errors_otherwise():
    # TinyModel calls weighted_loss itself: without callbacks it is the plain mean.
    _, with_function = fit([], TinyModel)
    _, mean = fit([], MeanModel)
    for key, value in mean.state_dict().items():
        assert torch.allclose(with_function.state_dict()[key].float(), value.float(), atol=1e-6), key
    # A module returning per-sample losses needs the callback: without it training stops loudly.
    with pytest.raises(RuntimeError, match="scalar outputs"):
        fit([], PerSampleModel, max_epochs=1)
    # With the callback, a scalar loss is refused with what to return instead.
    with pytest.raises(ValueError, match=r"need per-sample losses.*reduction='none'"):
        fit([SampleReweighting(warmup_steps=0)], MeanModel, max_epochs=1)


def test_the_training_step_wrapper_is_removed_after_fit():
    _, model = fit([SampleReweighting(warmup_steps=0)], PerSampleModel, max_epochs=1)
    assert "training_step" not in vars(model)


def test_sequence_losses_with_a_token_mask_are_token_averaged():
    class SeqModel(TinyModel):
        def training_step(self, batch, batch_idx):
            x, y = batch
            token = nn.functional.cross_entropy(self(x), y, reduction="none")[:, None].expand(-1, 3).clone()
            mask = torch.ones_like(token)
            mask[:, 2] = 0
            token[:, 2] = 1e6  # masked tokens must not count
            return {"loss": token, "mask": mask}

    _, seq = fit([SampleReweighting(rule="uniform", warmup_steps=0)], SeqModel)
    _, plain = fit([], MeanModel)
    assert torch.allclose(seq.net[0].weight, plain.net[0].weight, atol=1e-6)


def test_data_pruning_shortens_epochs_and_anneals_to_full_data():
    seen = Seen()
    dp = DataPruning(ratio=0.5, anneal=0.25)
    trainer, _ = fit([dp, seen], PerSampleModel, max_epochs=8)
    per_epoch = [sum(b.shape[0] for e, b in seen.batches if e == epoch) for epoch in range(8)]
    assert per_epoch[0] == 96  # nothing scored yet: full data
    assert all(n < 96 for n in per_epoch[1:6]), per_epoch  # pruned epochs really are shorter
    assert per_epoch[6] == per_epoch[7] == 96  # the last 25% of epochs: full data
    assert dp.state_dict()["forwarded"] == sum(per_epoch)
    for epoch in range(8):  # no sample twice within an epoch
        xs = torch.cat([b for e, b in seen.batches if e == epoch])
        assert torch.unique(xs, dim=0).shape[0] == xs.shape[0]


def test_onecycle_lr_sized_from_estimated_stepping_batches_finishes():
    class OneCycle(PerSampleModel):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=self.trainer.estimated_stepping_batches)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    trainer, _ = fit([DataPruning(ratio=0.5)], OneCycle, max_epochs=6)
    assert trainer.estimated_stepping_batches == 12 * 6  # the full-data count: an upper bound
    assert trainer.global_step < 12 * 6


def test_static_mode_trains_the_hardest_subset_after_scoring():
    seen = Seen()
    dp = DataPruning(ratio=0.25, mode="static", score_epochs=2)
    fit([dp, seen], PerSampleModel, max_epochs=5)
    sizes = [sum(b.shape[0] for e, b in seen.batches if e == epoch) for epoch in range(5)]
    assert sizes[:2] == [96, 96] and sizes[2:] == [72, 72, 72]
    subsets = [torch.cat([b for e, b in seen.batches if e == epoch]) for epoch in (2, 4)]
    assert torch.equal(subsets[0][subsets[0][:, 0].argsort()], subsets[1][subsets[1][:, 0].argsort()])


def test_static_el2n_needs_logits_and_target():
    class Logits(TinyModel):
        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)
            return {"loss": nn.functional.cross_entropy(logits, y, reduction="none"), "logits": logits, "target": y}

    dp = DataPruning(ratio=0.5, mode="static", score="el2n", score_epochs=1)
    fit([dp], Logits, max_epochs=2)
    assert 0 <= float(dp.scores.min()) and float(dp.scores.max()) <= 2 ** 0.5 + 1e-6
    with pytest.raises(ValueError, match="needs 'logits' and 'target'"):
        fit([DataPruning(mode="static", score="el2n")], PerSampleModel, max_epochs=2)  # 1 epoch: never pruned


def test_mid_epoch_resume_with_pruning_active_is_bit_exact(tmp_path):
    def run(ckpt=None, crash_at=None):
        L.seed_everything(0)
        dp = DataPruning(ratio=0.5, anneal=0.25)
        callbacks = [dp, ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)]
        if crash_at is not None:
            class Crash(Callback):
                def on_train_batch_start(self, trainer, *args):
                    if trainer.global_step == crash_at:
                        raise RuntimeError("simulated crash")
            callbacks.append(Crash())
        trainer = L.Trainer(callbacks=callbacks, max_epochs=6, **{**BASE, "enable_checkpointing": True})
        model = PerSampleModel()
        trainer.fit(model, datamodule=TinyData(), ckpt_path=ckpt)
        return dp, model, trainer

    ref_dp, ref, ref_trainer = run()
    for f in tmp_path.glob("*.ckpt"):
        f.unlink()
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(crash_at=17)
    ckpts = {int(p.stem.split("step=")[1]): p for p in tmp_path.glob("*.ckpt")}
    step = max(s for s in ckpts if s <= 17)
    assert ckpts[step].stem.startswith("epoch=1") and step > 12  # mid-epoch 1 (12 steps in epoch 0), pruning active
    dp, resumed, trainer = run(ckpt=str(ckpts[step]))
    assert trainer.global_step == ref_trainer.global_step
    for key, value in ref.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    a, b = flat_state(dp.state_dict()), flat_state(ref_dp.state_dict())
    for key in b:
        assert (torch.equal(a[key], b[key]) if isinstance(b[key], torch.Tensor) else a[key] == b[key]), key


class Dump(Callback):
    """Per rank: the first two features of every training sample, by epoch (ddp_spawn pickles it)."""

    def __init__(self, path):
        self.path, self.rows = path, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows.append((trainer.current_epoch, batch[0][:, :2].clone()))

    def on_fit_end(self, trainer, pl_module):
        torch.save({"rows": self.rows, "steps": trainer.global_step}, f"{self.path}/rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_pruned_epochs_are_shorter_and_each_kept_sample_is_seen_once(tmp_path):
    trainer = L.Trainer(**{**BASE, "devices": 2}, strategy="ddp_spawn", max_epochs=4,
                        callbacks=[DataPruning(ratio=0.5, anneal=0.25), Dump(str(tmp_path))])
    L.seed_everything(0)
    trainer.fit(PerSampleModel(), datamodule=TinyData())
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["steps"] == r1["steps"] < 4 * 6  # full epochs would be 6 steps per rank
    for epoch in range(4):
        a = torch.cat([x for e, x in r0["rows"] if e == epoch])
        b = torch.cat([x for e, x in r1["rows"] if e == epoch])
        both = torch.cat([a, b])
        assert a.shape == b.shape  # equal shares
        assert torch.unique(both, dim=0).shape[0] == both.shape[0]  # disjoint, nothing twice
        if epoch in (1, 2):
            assert both.shape[0] < 96  # pruned epochs really are shorter under DDP, not padded back


@pytest.mark.slow
def test_ddp_mid_epoch_resume_with_pruning_is_exact(tmp_path):
    """Under DDP each rank scores its own share; a mid-epoch checkpoint must merge the shares
    first (rank 0 writes the file), or the next epoch's plan, hence the weights, would differ."""
    def run(ckpt=None, every=None):
        L.seed_everything(0)
        callbacks = [DataPruning(ratio=0.5, anneal=0.25)]
        if every:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=every, save_top_k=-1))
        trainer = L.Trainer(**{**BASE, "devices": 2, "enable_checkpointing": bool(every)}, strategy="ddp_spawn",
                            max_epochs=5, callbacks=callbacks)
        model = PerSampleModel()
        trainer.fit(model, datamodule=TinyData(), ckpt_path=ckpt)
        return model

    ref = run(every=1)
    ckpts = {int(p.stem.split("step=")[1]): p for p in tmp_path.glob("*.ckpt")}
    epoch = {s: int(p.stem.split("epoch=")[1].split("-")[0]) for s, p in ckpts.items()}
    # epoch 1 is pruned; a step followed by another of the same epoch is mid-epoch
    mid = min(s for s in ckpts if epoch[s] == 1 and epoch.get(s + 1) == 1 and epoch.get(s - 1) == 1)
    resumed = run(ckpt=str(ckpts[mid]))
    for key, value in ref.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


class NoBNModel(TinyModel):
    """No BatchNorm (its batch statistics differ between one batch of 16 and two of 8); ids in the output."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def training_step(self, batch, batch_idx):
        idx, (x, y) = batch
        return {"loss": nn.functional.cross_entropy(self(x), y, reduction="none"), "index": idx}


class IndexedData(L.LightningDataModule):
    def __init__(self, batch_size):
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self):
        from lichtenberg.core.reweighting import IndexedDataset

        data = TinyData()
        return DataLoader(IndexedDataset(TensorDataset(data.x[:16], data.y[:16])), batch_size=self.batch_size)


class SpyReweighting(SampleReweighting):
    """Saves the global batch's ids and weights of the first step, per rank."""

    def __init__(self, path: str):
        super().__init__(rule="linupper", temperature=0.5, warmup_steps=0)
        self.path = path

    def _weights(self, trainer, pl_module, losses, index):
        w = super()._weights(trainer, pl_module, losses, index)
        if trainer.global_step == 0:
            torch.save({"index": index.cpu(), "w": w.cpu()}, f"{self.path}/w{trainer.world_size}_{trainer.global_rank}.pt")
        return w


@pytest.mark.slow
def test_weights_are_identical_with_one_and_two_processes_on_the_same_global_batch(tmp_path):
    for devices, strategy, batch in ((1, "auto", 16), (2, "ddp_spawn", 8)):
        L.seed_everything(0)
        trainer = L.Trainer(**{**BASE, "devices": devices}, strategy=strategy, max_steps=1,
                            callbacks=[SpyReweighting(str(tmp_path))])
        trainer.fit(NoBNModel(), datamodule=IndexedData(batch))
    single = torch.load(tmp_path / "w1_0.pt")
    r0, r1 = torch.load(tmp_path / "w2_0.pt"), torch.load(tmp_path / "w2_1.pt")
    assert torch.equal(r0["index"], r1["index"]) and torch.equal(r0["w"], r1["w"])  # every rank: the same weights
    assert sorted(r0["index"].tolist()) == list(range(16))  # over the GLOBAL batch
    by_id = dict(zip(single["index"].tolist(), single["w"].tolist()))
    for i, w in zip(r0["index"].tolist(), r0["w"].tolist()):
        assert abs(by_id[i] - w) < 1e-5, i
    assert abs(float(r0["w"].mean()) - 1) < 1e-6 and float(r0["w"].std()) > 0.01


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: SampleReweighting(rule="harder"), "rule='harder' must be one of"),
        (lambda: SampleReweighting(temperature=0.0), r"temperature=0.0 must lie in \(0, 1000\]"),
        (lambda: SampleReweighting(temperature=-1.0), "temperature=-1.0"),
        (lambda: SampleReweighting(warmup_steps=-1), "warmup_steps=-1"),
        (lambda: DataPruning(ratio=1.0), r"ratio=1.0 must lie in \[0, 1\)"),
        (lambda: DataPruning(ratio=-0.1), "ratio=-0.1"),
        (lambda: DataPruning(anneal=1.5), "anneal=1.5"),
        (lambda: DataPruning(mode="dynamic"), "mode='dynamic'"),
        (lambda: DataPruning(score="grand"), "score='grand'"),
        (lambda: DataPruning(score_epochs=0), "score_epochs=0"),
    ],
)
def test_bad_input_raises_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_output_shapes_raise_with_what_to_return():
    class Matrix(TinyModel):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y, reduction="none")[:, None].expand(-1, 2)  # no mask

    with pytest.raises(ValueError, match=r"shape \[batch\] \(or \[batch, tokens\] with a mask\)"):
        fit([SampleReweighting(warmup_steps=0)], Matrix, max_epochs=1)
    with pytest.raises(ValueError, match="set Trainer\\(max_epochs=...\\)"):
        L.Trainer(callbacks=[DataPruning()], max_epochs=-1, max_steps=5, **BASE).fit(PerSampleModel(), datamodule=TinyData())


# -- SampleReweighting hardening -------------------------------------------------------------------
@pytest.mark.parametrize("arg, value", [
    ("rule", None), ("rule", 1), ("rule", ["linupper"]), ("temperature", float("nan")), ("temperature", float("inf")),
    ("temperature", True), ("temperature", "1.0"), ("temperature", None), ("temperature", [1.0]),
    ("warmup_steps", 10.0), ("warmup_steps", True), ("warmup_steps", "10"), ("warmup_steps", None),
    ("warmup_steps", float("nan")), ("warmup_steps", {"steps": 10}), ("gamma", float("nan")), ("gamma", False),
    ("gamma", "2"), ("gamma", None), ("gamma", -float("inf")),
], ids=repr)
def test_sample_reweighting_bad_arguments_are_a_value_error_naming_the_value(arg, value):
    # Before: NaN, inf and bools passed; strings, lists and None raised TypeError in a comparison.
    kwargs = {arg: value, "rule": "focal"} if arg == "gamma" else {arg: value}
    with pytest.raises(ValueError, match=f"{arg}={value!r}".replace("[", r"\[")):
        SampleReweighting(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(gamma=3.0), r"gamma=3.0.*rule='focal'"),
    (dict(rule="softmax", gamma=0.0), r"gamma=0.0.*rule='focal'"),
    (dict(rule="focal", temperature=2.0), r"temperature=2.0.*rule='focal'"),
    (dict(rule="uniform", temperature=0.5), r"temperature=0.5.*rule='uniform'"),
])
def test_sample_reweighting_contradictory_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SampleReweighting(**kwargs)
    SampleReweighting(rule="focal", gamma=3.0)  # the same values where they apply
    SampleReweighting(rule="softmax", temperature=2.0)


def test_a_warmup_as_long_as_the_run_raises_at_fit_start():
    # TinyData: 12 optimizer steps per epoch, 48 in 4 epochs (24 with accumulation 2).
    weighted = Seen()
    with pytest.raises(ValueError, match=r"warmup_steps=48.*48 optimizer steps"):
        fit([SampleReweighting(warmup_steps=48), weighted], PerSampleModel)
    with pytest.raises(ValueError, match=r"warmup_steps=24.*24 optimizer steps"):
        fit([SampleReweighting(warmup_steps=24), weighted], PerSampleModel, accumulate_grad_batches=2)
    assert weighted.batches == []  # raised before the first step
    rw = SampleReweighting(warmup_steps=47)
    fit([rw], PerSampleModel)
    assert rw.state_dict()["batches_weighted"] == 1  # the last step is weighted


def test_an_unknown_run_length_is_not_checked():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            data = TinyData()
            return iter(zip(data.x, data.y))

    rw = SampleReweighting(warmup_steps=10)
    L.seed_everything(0)
    L.Trainer(callbacks=[rw], max_epochs=2, **BASE).fit(PerSampleModel(), DataLoader(Stream(), batch_size=8))
    assert rw.state_dict()["batches_weighted"] == 2 * 12 - 10


def test_sample_reweighting_reused_for_a_second_fit_equals_a_fresh_instance():
    # Before: the weighted-batch counter carried over into the second fit's state (and checkpoints).
    shared = SampleReweighting(warmup_steps=4)
    for seed in (0, 1):
        L.seed_everything(seed)
        reused = PerSampleModel()
        L.Trainer(callbacks=[shared], max_epochs=2, **BASE).fit(reused, datamodule=TinyData())
        fresh_cb = SampleReweighting(warmup_steps=4)
        L.seed_everything(seed)
        fresh = PerSampleModel()
        L.Trainer(callbacks=[fresh_cb], max_epochs=2, **BASE).fit(fresh, datamodule=TinyData())
        for key, value in fresh.state_dict().items():
            assert torch.equal(reused.state_dict()[key], value), (seed, key)
        assert shared.state_dict() == fresh_cb.state_dict() and shared.state_dict()["batches_weighted"] == 20
