"""Soup through a real Trainer: the exact mean of the kept snapshots, last k and top k, on masks and
tied weights, integer buffers, BatchNorm, resume, host syncs, and its refusals. (The generic
contract, DDP and FSDP2 included, runs its registered top-k case.)"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lichtenberg.callbacks import SWA, GradualPruning, Soup
from lichtenberg.core import plain_state_dict
from lichtenberg.core.averaging import update_bn_
from lichtenberg.core.schedules import SparsitySchedule
from tests.cases import TinyData, TinyModel, fit_tiny
from tests.test_contract import crash_and_resume
from tests.test_host_syncs import added

EPOCHS = 4  # 12 optimizer steps each


class Snapshots(Callback):
    """The module's tensors (and the monitored metric) where Soup takes its candidates: the last
    batch of an epoch, or the validation that ends it."""

    def __init__(self, after_validation: bool = False):
        self.after_validation, self.taken, self.scores = after_validation, [], []

    def _take(self, pl_module):
        self.taken.append({k: v.detach().clone() for k, v in pl_module.state_dict().items() if not k.endswith("_mask")})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.after_validation and batch_idx + 1 == trainer.num_training_batches:
            self._take(pl_module)

    def on_validation_end(self, trainer, pl_module):
        if self.after_validation and not trainer.sanity_checking:
            self._take(pl_module)
            self.scores.append(float(trainer.callback_metrics["val_loss"]))


def mean(states, name):
    """The soup's definition: the sum of the kept snapshots, oldest first, over their number."""
    total = states[0][name].clone()
    for state in states[1:]:
        total += state[name]
    return total / len(states)


def test_last_k_ends_with_the_exact_mean_of_the_last_k_snapshots(tmp_path):
    soup, seen = Soup(keep=3, start=0.0), Snapshots()
    _, model = fit_tiny([seen, soup, ModelCheckpoint(dirpath=tmp_path, save_last=True)], max_epochs=EPOCHS,
                        enable_checkpointing=True)
    assert len(seen.taken) == EPOCHS and [s["epoch"] for s in soup.state_dict()["slots"]] == [1, 2, 3]
    last = seen.taken[-3:]
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), mean(last, name)), name
        assert torch.equal(soup.raw_weights[name], seen.taken[-1][name])  # the last iterate is kept
    # The checkpoint holds the raw weights as the model state and the soup in Soup's state.
    ckpt = tmp_path / "last.ckpt"
    assert torch.equal(torch.load(ckpt, weights_only=False)["state_dict"]["net.0.weight"], seen.taken[-1]["net.0.weight"])
    assert torch.equal(plain_state_dict(ckpt, averaged="Soup")["net.0.weight"], mean(last, "net.0.weight"))


def test_top_k_keeps_the_best_by_the_monitor_and_averages_them_oldest_first():
    L.seed_everything(0)
    soup, seen = Soup(keep=2, monitor="val_loss", mode="min", start=0.0), Snapshots(after_validation=True)
    _, model = fit_tiny([seen, soup], model=TinyModel(lr=0.3), max_epochs=EPOCHS)
    best = sorted(sorted(range(EPOCHS), key=lambda e: seen.scores[e])[:2])
    assert best != [2, 3], f"the run must make top-2 differ from last-2: {seen.scores}"
    state = soup.state_dict()
    assert [s["epoch"] for s in state["slots"]] == best and state["candidates"] == EPOCHS
    assert state["scores"].tolist() == [seen.scores[e] for e in best]
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), mean([seen.taken[e] for e in best], name)), name


class Tied(TinyModel):
    """A hidden layer whose weight is also ``alias.weight`` (one tensor, two names)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                                 nn.Linear(16, 4))
        self.alias = nn.Linear(16, 16)
        self.alias.weight = self.net[3].weight

    def forward(self, x):
        h = torch.relu(self.net[3](self.net[:3](x)))
        return self.net[5](torch.relu(self.alias(h)))


def test_soup_of_a_pruned_model_with_tied_weights_lies_on_the_final_mask_under_both_names():
    # Masks grow until step 30: the first snapshots are denser than the final mask.
    prune = GradualPruning(sparsity=0.75, schedule=SparsitySchedule(start=0, end=30, every_n_steps=6))
    soup, seen = Soup(keep=3, start=0.0), Snapshots()
    L.seed_everything(0)
    _, model = fit_tiny([prune, seen, soup], model=Tied(), max_epochs=EPOCHS)
    assert model.alias.weight is model.net[3].weight, "the tie survives the swap"
    for name, param in model.named_parameters():
        mask = dict(model.named_buffers()).get(f"{name}_mask")
        expected = mean(seen.taken[-3:], name) * (1 if mask is None else mask)
        assert torch.equal(param.detach(), expected), name
        if mask is not None:
            assert (param[~mask] == 0).all() and (seen.taken[0][name][~mask] != 0).any(), name


def test_integer_buffers_are_the_oldest_snapshots_not_averaged_and_batchnorm_is_re_estimated():
    # apply_at_end=False: the soup stays in the state, as averaged (no BatchNorm pass).
    kept = Soup(keep=2, start=0.0, apply_at_end=False)
    _, model = fit_tiny([kept], max_epochs=EPOCHS)
    tensors = kept.state_dict()["tensors"]
    assert tensors["net.1.num_batches_tracked"].dtype == torch.int64 and int(tensors["net.1.num_batches_tracked"]) == 36
    assert kept.raw_weights is None and int(model.net[1].num_batches_tracked) == 48  # the module kept its weights
    # apply_at_end=True: one pass over the training data recomputes the statistics for the soup.
    soup = Soup(keep=2, start=0.0)
    _, model = fit_tiny([soup], max_epochs=EPOCHS)
    fresh = TinyModel()
    fresh.load_state_dict(model.state_dict())
    loader = TinyData().train_dataloader()
    loader.sampler.set_epoch(EPOCHS - 1)  # the pass ran after the last epoch: the same batches
    update_bn_(fresh, [x for x, _ in loader], lambda m, x: m(x))
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(model.net[1], name), getattr(fresh.net[1], name), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(getattr(model.net[1], name), tensors[f"net.1.{name}"]), "the averages were replaced"
    assert soup._bn_seen == 12 and torch.equal(soup.state_dict()["tensors"]["net.1.running_mean"], model.net[1].running_mean)


def test_last_k_crash_resume_is_bit_exact(tmp_path):
    (ref_cb,), ref, (cb,), resumed = crash_and_resume(lambda: [Soup(keep=2, start=0.0)], tmp_path)
    assert cb.state_dict()["candidates"] == EPOCHS
    for name, value in ref.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    for key in ("tensors", "kept"):
        for name, value in ref_cb.state_dict()[key].items():
            assert torch.equal(cb.state_dict()[key][name], value), (key, name)


def test_last_k_adds_no_host_sync_to_any_training_step():
    soup = Soup(keep=2, start=0.25)
    steps = added([soup])
    assert soup.state_dict()["num_updates"] == 3 and len(steps) == 12 * EPOCHS
    assert not {w.step: dict(w.counts) for w in steps if w.counts}


def test_a_run_too_short_for_keep_warns_how_many_it_got():
    soup = Soup(keep=5, start=0.0)
    with pytest.warns(UserWarning, match=r"Soup\(keep=5\) got 2 snapshot\(s\).*averages 2"):
        fit_tiny([soup], max_epochs=2)
    assert len(soup.state_dict()["slots"]) == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"keep": 0}, r"Soup keep=0 must be in \[1, 1000\]"),
    ({"keep": 2.0}, r"Soup keep=2.0 must be an int"),
    ({"monitor": "val_acc"}, r"mode=None with monitor='val_acc'.*mode='max'"),
    ({"mode": "max"}, r"mode='max' with monitor=None: mode has no effect"),
    ({"monitor": "val_acc", "mode": "best"}, r"Soup mode='best' must be one of 'max', 'min'"),
    ({"monitor": "val_acc", "mode": "max", "evaluate_averaged": True}, r"evaluate_averaged=True with monitor='val_acc'"),
    ({"every_n_epochs": 0}, r"Soup every_n_epochs=0 must be >= 1"),
    ({"start": 1.0}, r"Soup start=1.0 must lie in \[0, 1\)"),
], ids=["keep0", "keep-float", "no-mode", "mode-alone", "bad-mode", "evaluate-top", "every0", "start1"])
def test_bad_arguments_are_one_line_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        Soup(**kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs, trainer, message", [
    ({"monitor": "val_accuracy", "mode": "max"}, {}, r"monitor='val_accuracy' is not a logged metric \(logged: "
                                                     r"\['val_acc', 'val_loss'\]\)"),
    ({"monitor": "val_accuracy", "mode": "max"}, {"num_sanity_val_steps": 0}, r"'val_accuracy' is not a logged metric"),
    ({"monitor": "val_acc", "mode": "max"}, {"check_val_every_n_epoch": 2}, r"check_val_every_n_epoch=2.*every_n_epochs=1"),
    ({"start": 48}, {}, r"Soup start=48 \(optimizer step 48\), every_n_epochs=1: no epoch"),
], ids=["missing-metric", "missing-metric-no-sanity-check", "validation-too-rare", "never-acts"])
def test_settings_that_cannot_work_are_value_errors(kwargs, trainer, message):
    with pytest.raises(ValueError, match=message):
        fit_tiny([Soup(**kwargs)], max_epochs=EPOCHS, **trainer)


def test_last_k_with_room_for_every_candidate_is_swa_of_the_same_epochs():
    soup, swa = Soup(keep=10, start=0.25, apply_at_end=False), SWA(start=0.25, apply_at_end=False)
    with pytest.warns(UserWarning, match="got 3 snapshot"):
        fit_tiny([soup], max_epochs=EPOCHS)
    fit_tiny([swa], max_epochs=EPOCHS)
    assert soup.averaged.num_updates == swa.averaged.num_updates == 3
    for name, value in swa.averaged.tensors.items():
        if value.is_floating_point():
            torch.testing.assert_close(soup.averaged.tensors[name], value, rtol=1e-5, atol=1e-6)
