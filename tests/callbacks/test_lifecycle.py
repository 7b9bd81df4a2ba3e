"""One fit, one binding: callbacks reused across fits and Trainers, layers built in
``configure_model``, resumes with other settings, run lengths Lightning cannot know."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lichtenberg.callbacks import EMA, SWA, DynamicSparseTraining, GradualPruning, QuantizationAwareTraining
from lichtenberg.core.quantization import quant_modules
from lichtenberg.core.schedules import SparsitySchedule
from tests.cases import CASES, EPOCHS, TRAINER, Crash, TinyData, TinyModel, flat_state

BY_NAME = {c.name: c for c in CASES}


def fit(callbacks, model, ckpt_path=None, max_epochs=EPOCHS, seed=0, **kwargs):
    """Seeded fit; ``model`` is a module, or a class built after seeding."""
    L.seed_everything(seed)
    model = model() if isinstance(model, type) else model
    kwargs = {**TRAINER, "max_epochs": max_epochs, **kwargs}
    if any(isinstance(cb, ModelCheckpoint) for cb in callbacks):
        kwargs["enable_checkpointing"] = True
    trainer = L.Trainer(callbacks=list(callbacks), **kwargs)
    trainer.fit(model, datamodule=TinyData(), ckpt_path=ckpt_path)
    return trainer, model


def same(a, b) -> bool:
    fa, fb = flat_state(a), flat_state(b)
    if fa.keys() != fb.keys():
        return False
    return all(torch.equal(fa[k], fb[k]) if isinstance(fa[k], torch.Tensor) else fa[k] == fb[k] for k in fa)


class StartWeights(Callback):
    """The module's tensors when training starts (after every set-up and restore)."""

    def on_train_start(self, trainer, pl_module):
        self.weights = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                        for k, v in pl_module.state_dict().items()}


# -- one instance, several fits -------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_callbacks_list_built_once_for_a_sweep_equals_fresh_instances(case):
    # A k-fold / sweep loop that builds its callbacks list once: each fit must behave exactly as
    # with a fresh instance (before: no masks / no fake-quant on the second model, or an average
    # seeded from the first model and the first model's raw weights written into the second).
    shared = case.make()
    for seed in (0, 1):
        _, reused = fit([shared], TinyModel, seed=seed, max_epochs=3)
        fresh_cb = case.make()
        _, fresh = fit([fresh_cb], TinyModel, seed=seed, max_epochs=3)
        assert same(reused.state_dict(), fresh.state_dict()), f"fit {seed}: model differs from a fresh callback's"
        assert same(shared.state_dict(), fresh_cb.state_dict()), f"fit {seed}: callback state differs"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_second_fit_of_the_same_model_starts_from_its_current_weights(case):
    # e.g. model.load_state_dict(best) between two fits: before, EMA/SWA wrote their stale raw
    # snapshot over it and DynamicSparseTraining drew new random masks over the trained ones.
    cb = case.make()
    _, model = fit([cb], TinyModel, max_epochs=3)
    best = {k: (v * 0.5 if v.is_floating_point() else v.clone()) if isinstance(v, torch.Tensor) else v
            for k, v in model.state_dict().items()}
    model.load_state_dict(best)
    start = StartWeights()
    fit([cb, start], model, max_epochs=3)
    assert same(start.weights, best)


def test_ema_of_a_second_fit_averages_that_fit_only():
    ema = EMA(decay=0.9)
    fit([ema], TinyModel, max_epochs=1)
    fit([ema], TinyModel, max_epochs=1, seed=1)
    assert ema.averaged.num_updates == 12


def test_make_permanent_then_a_second_fit_prunes_again():
    gp = GradualPruning(sparsity=0.75, schedule=SparsitySchedule(start=2, end=8, every_n_steps=2), make_permanent=True)
    _, model = fit([gp], TinyModel, max_epochs=1)
    assert not any(k.endswith("_mask") for k in model.state_dict())
    _, model = fit([gp], model, max_epochs=1)  # before: torch.cat(): expected a non-empty list
    assert not any(k.endswith("_mask") for k in model.state_dict())
    weights = [model.net[0].weight, model.net[3].weight]
    assert sum(int((w == 0).sum()) for w in weights) == round(0.75 * sum(w.numel() for w in weights))


def test_make_permanent_leaves_a_last_checkpoint_that_loads_into_the_plain_module(tmp_path):
    gp = GradualPruning(sparsity=0.75, schedule=SparsitySchedule(start=2, end=8, every_n_steps=2), make_permanent=True)
    fit([gp, ModelCheckpoint(dirpath=tmp_path, save_last=True)], TinyModel, max_epochs=2)
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    plain = TinyModel()
    plain.load_state_dict(state, strict=True)  # before: unexpected keys net.0.weight_mask, ...
    assert int((plain.net[0].weight == 0).sum()) > 0


def test_make_permanent_run_resumes_bit_exactly(tmp_path):
    def cbs():
        return [GradualPruning(sparsity=0.75, schedule=SparsitySchedule(start=2, end=40, every_n_steps=4),
                               make_permanent=True)]

    _, ref = fit(cbs(), TinyModel)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(cbs() + [Crash(2), ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)], TinyModel)
    (ckpt,) = tmp_path.glob("epoch=1-*.ckpt")
    _, resumed = fit(cbs(), TinyModel, ckpt_path=str(ckpt))
    assert same(resumed.state_dict(), ref.state_dict())


# -- layers built in configure_model ----------------------------------------------------------
class LateHead(TinyModel):
    """Builds its head in configure_model (as FSDP users do)."""

    def configure_model(self):
        if not hasattr(self, "head"):
            self.head = nn.Linear(4, 4)

    def forward(self, x):
        return self.head(self.net(x))


@pytest.mark.parametrize("name", ["GradualPruning", "DynamicSparseTraining", "QuantizationAwareTraining", "EMA"])
def test_layers_built_in_configure_model_are_targeted(name, caplog):
    cb = BY_NAME[name].make()
    with caplog.at_level("INFO"):
        trainer, model = fit([cb], LateHead)
    if name == "QuantizationAwareTraining":
        assert "head" in quant_modules(model) and model.head.weight_quantizer.enabled
        assert "head" in caplog.text
    elif name == "EMA":
        assert "head.weight" in cb.averaged.tensors
    else:
        assert "head.weight" in cb.engine.params and "head.weight" in caplog.text
        mask = model.head.weight_mask
        assert 0 < int(mask.sum()) < mask.numel() and (model.head.weight[~mask] == 0).all()


@pytest.mark.parametrize("name", ["GradualPruning", "DynamicSparseTraining", "QuantizationAwareTraining", "EMA"])
def test_configure_model_layers_resume_bit_exactly(name, tmp_path):
    _, ref = fit([BY_NAME[name].make()], LateHead)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit([BY_NAME[name].make(), Crash(2), ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)], LateHead)
    (ckpt,) = tmp_path.glob("epoch=1-*.ckpt")
    _, resumed = fit([BY_NAME[name].make()], LateHead, ckpt_path=str(ckpt))
    assert same(resumed.state_dict(), ref.state_dict())


# -- resuming with other settings --------------------------------------------------------------
CHANGED = {  # one setting in the state key, one outside it
    "EMA": [{"decay": 0.95}, {"warmup_power": None}],
    "SWA": [{"start": 0.5}, {"swa_lr": 0.01}],
    "GradualPruning": [{"sparsity": 0.5}, {"allocation": "uniform"}],
    "DynamicSparseTraining": [{"sparsity": 0.5}, {"drop_fraction": 0.2}],
    "QuantizationAwareTraining": [{"weight_bits": 8}, {"activation_method": "dynamic"}],
    "SampleReweighting": [{"rule": "quadratic"}, {"temperature": 2.0}],
    "DataPruning": [{"ratio": 0.3}, {"seed": 2}],
}


@pytest.mark.parametrize("change", [(n, c) for n, cs in CHANGED.items() for c in cs], ids=lambda p: f"{p[0]}-{p[1]}")
def test_resuming_with_other_settings_is_a_clear_error(change, tmp_path):
    name, changed = change
    case = BY_NAME[name]
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit([case.make(), Crash(2), ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)], TinyModel)
    (ckpt,) = tmp_path.glob("epoch=1-*.ckpt")
    other = case.cls(**{**{k: case.value(k) for k in case.init_args}, **changed})
    key = next(iter(changed))
    with pytest.raises(ValueError, match=f"other settings.*{key}"):
        fit([other], TinyModel, ckpt_path=str(ckpt))


# -- run lengths Lightning cannot know ---------------------------------------------------------
class Stream(IterableDataset):
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for _ in range(48):
            x = torch.randn(8, generator=g)
            yield x, x[:4].argmax()


@pytest.mark.parametrize("make", [
    lambda: GradualPruning(sparsity=0.5),
    lambda: DynamicSparseTraining(sparsity=0.5, schedule=SparsitySchedule(start=0, end=0.5, every_n_steps=2)),
    lambda: QuantizationAwareTraining(start_step=0.5),
    lambda: SWA(start=0.5),
])
def test_fractions_of_an_unknown_run_length_ask_for_max_steps(make):
    # An IterableDataset with max_epochs only: Lightning estimates -1 steps. Before: "training
    # ends at step -1" (or a schedule at step 0).
    trainer = L.Trainer(callbacks=[make()], max_epochs=2, **{k: v for k, v in TRAINER.items()})
    with pytest.raises(ValueError, match="max_steps"):
        trainer.fit(TinyModel(), DataLoader(Stream(), batch_size=8))


class TwoOptimizers(TinyModel):
    """Manual optimization with two optimizers (GAN-style): global_step counts both."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        for opt in self.optimizers():
            opt.zero_grad()
            self.manual_backward(nn.functional.cross_entropy(self(x), y))
            opt.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.net[:2].parameters(), lr=0.1), torch.optim.SGD(self.net[2:].parameters(), lr=0.1)]


def test_fraction_schedules_span_the_whole_run_under_manual_optimization():
    gp = GradualPruning(sparsity=0.5, schedule=SparsitySchedule(start=0.1, end=0.6, every_n_steps=2))
    trainer, _ = fit([gp], TwoOptimizers, max_epochs=2)
    assert trainer.global_step == 48  # 24 batches x 2 optimizers
    assert gp._end == round(0.6 * 48)  # before: 14, i.e. 30% of the run


def test_a_pytorch_lightning_project_with_configure_model_layers():
    # Lightning's is_overridden knows one namespace: on a pytorch_lightning module it raised
    # "Expected a parent" inside the configure_model binding.
    import pytorch_lightning as PL

    class Module(PL.LightningModule):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(8, 16)

        def configure_model(self):
            if not hasattr(self, "head"):
                self.head = nn.Linear(16, 4)

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    gp, qat, ema = (GradualPruning(sparsity=0.5, schedule=SparsitySchedule(start=0, end=10, every_n_steps=2)),
                    QuantizationAwareTraining(), EMA(decay=0.9))
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    model = Module()
    PL.Trainer(callbacks=[gp, qat, ema], max_epochs=2, **TRAINER).fit(
        model, DataLoader(torch.utils.data.TensorDataset(x, x[:, :4].argmax(1)), batch_size=8))
    assert "head.weight" in gp.engine.params and "head" in quant_modules(model) and "head.weight" in ema.averaged.tensors
    assert (model.head.weight[~model.head.weight_mask] == 0).all()


def test_a_validate_before_fit_leaves_the_fit_its_initial_masks():
    # validate binds the callback too (all-ones masks, so a sparse checkpoint's keys match); the
    # fit that follows must still draw DynamicSparseTraining's initial masks.
    dst = BY_NAME["DynamicSparseTraining"].make()
    model = TinyModel()
    L.Trainer(callbacks=[dst], **TRAINER).validate(model, datamodule=TinyData(), verbose=False)
    fit([dst], model)
    masks = dst.engine.masks.values()
    assert sum(int(m.sum()) for m in masks) < 0.3 * sum(m.numel() for m in masks)
