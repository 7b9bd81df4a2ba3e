"""DataPruning against real projects: the user's sampler, the pytorch_lightning namespace, per-sample
outputs of the wrong length, resumes on other data, settings that never prune, bad arguments and
one instance reused for several fits."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, TensorDataset, WeightedRandomSampler

from lichtenberg.callbacks import DataPruning, SampleReweighting
from lichtenberg.callbacks import _per_sample
from lichtenberg.core.reweighting import IndexedDataset
from tests.cases import TRAINER, EpochShuffle, TinyData, TinyModel, flat_state

X, Y = TinyData().x, TinyData().y  # 96 distinct rows


def ids_of(x: torch.Tensor) -> list[int]:
    """Dataset ids of a batch's rows (every row of X is distinct)."""
    return (x[:, None, :] == X[None]).all(-1).float().argmax(1).tolist()


class Ids(Callback):
    """The dataset ids of every training batch, by epoch."""

    def __init__(self):
        self.epochs: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x = batch[1][0] if isinstance(batch[0], torch.Tensor) and batch[0].dim() == 1 else batch[0]
        self.epochs.setdefault(trainer.current_epoch, []).extend(ids_of(x))


class PerSample(TinyModel):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y, reduction="none")


class Data(L.LightningDataModule):
    """TinyData's rows with a chosen sampler (or shuffle) and size."""

    def __init__(self, sampler=None, n: int = 96, shuffle: bool = False, indexed: bool = False):
        super().__init__()
        self.sampler, self.n, self.shuffle, self.indexed = sampler, n, shuffle, indexed

    def train_dataloader(self):
        ds = TensorDataset(X[: self.n], Y[: self.n])
        ds = IndexedDataset(ds) if self.indexed else ds
        return DataLoader(ds, batch_size=8, sampler=self.sampler, shuffle=self.shuffle)


def fit(callbacks, datamodule=None, model=None, max_epochs=4, seed=0, ckpt_path=None, loader=None, **kwargs):
    L.seed_everything(seed)
    model = model or PerSample
    model = model if isinstance(model, nn.Module) else model()  # built after seeding: the same start weights
    kwargs = {**TRAINER, "max_epochs": max_epochs, **kwargs}
    if any(isinstance(cb, ModelCheckpoint) for cb in callbacks):
        kwargs["enable_checkpointing"] = True
    trainer = L.Trainer(callbacks=list(callbacks), **kwargs)
    if loader is not None:
        trainer.fit(model, loader, ckpt_path=ckpt_path)
    else:
        trainer.fit(model, datamodule=datamodule or TinyData(), ckpt_path=ckpt_path)
    return trainer, model


def is_subsequence(part: list[int], whole: list[int]) -> bool:
    it = iter(whole)
    return all(any(p == w for w in it) for p in part)


# -- 1. the user's sampler ------------------------------------------------------------------------
def test_a_weighted_sampler_is_respected_in_its_order_with_repeats():
    # Before: DataPruning replaced any sampler by its own uniform shuffle, so the ids the weights
    # exclude (48..95) were trained on and the repeats of sampling with replacement were lost.
    weights = torch.cat([torch.ones(48), torch.zeros(48)])

    def sampler():
        return WeightedRandomSampler(weights, num_samples=96, replacement=True, generator=torch.Generator().manual_seed(5))

    ids, dp = Ids(), DataPruning(ratio=0.5, anneal=0.25)
    fit([dp, ids], Data(sampler()), max_epochs=4)  # one sampler: its generator advances each epoch
    reference = sampler()
    draws = [list(reference) for _ in range(4)]
    assert ids.epochs[0] == draws[0]  # the full epoch: the sampler's order, repeats included
    assert len(set(draws[0])) < 96
    for epoch in (1, 2):
        assert all(i < 48 for i in ids.epochs[epoch])
        assert is_subsequence(ids.epochs[epoch], draws[epoch]) and len(ids.epochs[epoch]) < 96, epoch
    assert ids.epochs[3] == draws[3]  # annealed: the full draw again
    assert dp.state_dict()["forwarded"] == sum(len(v) for v in ids.epochs.values())


def test_a_sampler_with_set_epoch_gives_its_epoch_order():
    # TinyData's EpochShuffle: each epoch is the sampler's own order for that epoch (set_epoch
    # first), pruned epochs keep a subsequence of it. Before: DataPruning's own shuffle.
    ids = Ids()
    fit([DataPruning(ratio=0.5, anneal=0.25), ids], TinyData(), max_epochs=4)
    orders = []
    for epoch in range(4):
        s = EpochShuffle(96)
        s.set_epoch(epoch)
        orders.append(list(s))
    assert ids.epochs[0] == orders[0] and ids.epochs[3] == orders[3]
    for epoch in (1, 2):
        assert is_subsequence(ids.epochs[epoch], orders[epoch]) and len(ids.epochs[epoch]) < 96


def test_sequential_and_shuffled_loaders_keep_their_meaning():
    seq, shuf = Ids(), Ids()
    fit([DataPruning(ratio=0.5, anneal=0.25), seq], Data(shuffle=False), max_epochs=4)
    fit([DataPruning(ratio=0.5, anneal=0.25), shuf], Data(shuffle=True), max_epochs=4)
    for epoch in range(4):
        assert seq.epochs[epoch] == sorted(seq.epochs[epoch])
        assert len(set(shuf.epochs[epoch])) == len(shuf.epochs[epoch])  # a permutation of the kept ids
    assert shuf.epochs[0] != sorted(shuf.epochs[0])


def _ddp_stub(loader, world_size=2):
    """What DataPruning.setup reads of a Trainer, for a DDP world without spawning processes."""
    source = SimpleNamespace(instance=loader, name="train_dataloader", is_module=lambda: False)
    return SimpleNamespace(world_size=world_size, global_rank=0, max_epochs=4, current_epoch=0,
                           reload_dataloaders_every_n_epochs=0, callbacks=[],
                           strategy=SimpleNamespace(root_device=torch.device("cpu")),
                           fit_loop=SimpleNamespace(_data_source=source))


def test_under_ddp_a_sampler_without_set_epoch_is_refused_with_the_fix():
    ds = TensorDataset(X, Y)
    loader = DataLoader(ds, batch_size=8, sampler=WeightedRandomSampler(torch.ones(96), 96))
    with pytest.raises(ValueError, match=r"WeightedRandomSampler.*set_epoch.*shuffle=True"):
        DataPruning().setup(_ddp_stub(loader), PerSample(), "fit")
    ok = DataLoader(ds, batch_size=8, sampler=EpochShuffle(96))  # seeded per epoch: the same order on every rank
    DataPruning().setup(_ddp_stub(ok), PerSample(), "fit")


def test_a_rank_split_distributed_sampler_is_refused_with_the_fix():
    ds = TensorDataset(X, Y)
    loader = DataLoader(ds, batch_size=8, sampler=DistributedSampler(ds, num_replicas=2, rank=0))
    with pytest.raises(ValueError, match=r"DistributedSampler.*num_replicas=2.*whole dataset"):
        fit([DataPruning()], loader=loader, max_epochs=3)


# -- 2. the pytorch_lightning namespace -----------------------------------------------------------
def _pl_project(pl, owner: str):
    """A project written against ``pytorch_lightning``: its Trainer, module and datamodule."""

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y, reduction="none")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def loader():
        return DataLoader(TensorDataset(X, Y), batch_size=8, sampler=EpochShuffle(96))

    class DataModule(pl.LightningDataModule):
        def train_dataloader(self):
            return loader()

    if owner == "module":
        Module.train_dataloader = lambda self: loader()
        return Module, None
    return Module, DataModule


@pytest.mark.parametrize("owner", ["module", "datamodule"])
def test_a_pytorch_lightning_project_is_pruned_like_a_lightning_one(owner):
    # Before: "DataPruning needs one map-style torch DataLoader ...; got Module": the loader's owner
    # was only recognised as a lightning.pytorch LightningModule / LightningDataModule.
    pl = pytest.importorskip("pytorch_lightning")
    runs = {}
    for name, ns in (("pytorch_lightning", pl), ("lightning", L.pytorch)):
        module_cls, dm_cls = _pl_project(ns, owner)
        ns.seed_everything(0)
        model, ids, dp = module_cls(), Ids(), DataPruning(ratio=0.5, anneal=0.25)
        trainer = ns.Trainer(callbacks=[dp, ids], max_epochs=4, **TRAINER)
        trainer.fit(model, datamodule=dm_cls() if dm_cls else None)
        runs[name] = (model, ids, dp)
        owner_instance = model if dm_cls is None else trainer.datamodule
        assert "train_dataloader" not in vars(owner_instance)  # unwrapped after fit
    model, ids, dp = runs["pytorch_lightning"]
    assert len(ids.epochs[0]) == 96 and len(ids.epochs[1]) < 96  # really pruned
    ref_model, ref_ids, ref_dp = runs["lightning"]
    assert ids.epochs == ref_ids.epochs
    for key, value in ref_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


# -- 3. per-sample outputs that do not match the batch ----------------------------------------------
class TwoViews(TinyModel):
    """Two augmented views per sample, concatenated: 2B losses for B samples."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        views = torch.cat([x, x + 0.01])
        return nn.functional.cross_entropy(self(views), torch.cat([y, y]), reduction="none")


def test_two_views_per_sample_are_refused_with_both_lengths_and_the_fix():
    # Before: accepted; the 16 losses were scored as ids of this batch and the next one.
    with pytest.raises(ValueError, match=r"16 per-sample losses for a batch of 8 samples.*views"):
        fit([DataPruning()], model=TwoViews, max_epochs=3)
    with pytest.raises(ValueError, match=r"16 per-sample losses for a batch of 8 samples"):
        fit([SampleReweighting(warmup_steps=0), DataPruning()], model=TwoViews, max_epochs=3)


class WithIndex(TinyModel):
    """Returns the batch's dataset ids, optionally transformed (a wrong numbering)."""

    def __init__(self, transform=lambda idx: idx):
        super().__init__()
        self.transform = transform

    def training_step(self, batch, batch_idx):
        idx, (x, y) = batch
        return {"loss": nn.functional.cross_entropy(self(x), y, reduction="none"), "index": self.transform(idx)}


def test_a_correct_index_trains_exactly_like_no_index():
    _, with_index = fit([DataPruning(ratio=0.5, anneal=0.25)], Data(EpochShuffle(96), indexed=True), WithIndex)

    class NoIndex(WithIndex):
        def training_step(self, batch, batch_idx):
            idx, (x, y) = batch
            return nn.functional.cross_entropy(self(x), y, reduction="none")

    _, without = fit([DataPruning(ratio=0.5, anneal=0.25)], Data(EpochShuffle(96), indexed=True), NoIndex)
    for key, value in without.state_dict().items():
        assert torch.equal(with_index.state_dict()[key], value), key


@pytest.mark.parametrize("transform, message", [
    (lambda idx: idx[:-1], r"index.*7.*8 losses"),  # one id short
    (lambda idx: torch.cat([idx, idx]), r"index.*16.*8 losses"),
    (lambda idx: idx.float(), r"index.*dtype torch.float32"),
    (lambda idx: idx.tolist(), r"index.*got a list"),
    (lambda idx: torch.arange(idx.numel()), r"index.*not the dataset ids"),  # positions in the batch
    (lambda idx: idx + 96, r"index.*not the dataset ids"),  # outside the dataset
])
def test_a_wrong_index_is_refused_at_the_first_step(transform, message):
    # Before: wrong numbering scored the wrong samples silently (or an IndexError, or a TypeError
    # deep in torch), at whichever step first went out of range.
    steps = Steps()
    with pytest.raises(ValueError, match=message):
        fit([DataPruning(ratio=0.5, anneal=0.25), steps], Data(EpochShuffle(96), indexed=True),
            lambda: WithIndex(transform))
    assert steps.started == 1


class Steps(Callback):
    def __init__(self):
        self.started = 0

    def on_train_batch_start(self, *args):
        self.started += 1


class HostSyncs:
    """Counts tensor -> host conversions made inside ``weighted_loss`` (each is a sync on a GPU)."""

    NAMES = ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, monkeypatch):
        self.count, self.active = 0, False
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(original))
        inner = _per_sample.weighted_loss
        monkeypatch.setattr(_per_sample, "weighted_loss", self._around(inner))

    def _counting(self, original):
        def method(tensor, *args, **kwargs):
            self.count += self.active
            return original(tensor, *args, **kwargs)
        return method

    def _around(self, inner):
        def weighted_loss(pl_module, *args, **kwargs):
            # the first step of an epoch may check the module's ids once
            self.active = pl_module.trainer.fit_loop.epoch_loop.batch_idx > 0
            try:
                return inner(pl_module, *args, **kwargs)
            finally:
                self.active = False
        return weighted_loss


@pytest.mark.parametrize("model", [PerSample, WithIndex], ids=["plan ids", "module ids"])
def test_no_host_sync_inside_a_step(model, monkeypatch):
    syncs = HostSyncs(monkeypatch)
    data = Data(EpochShuffle(96), indexed=model is WithIndex)
    fit([DataPruning(ratio=0.5, anneal=0.25), SampleReweighting(warmup_steps=0)], data, model, max_epochs=3)
    assert syncs.count == 0


# -- 4. resuming on other data ----------------------------------------------------------------------
@pytest.mark.parametrize("passed", ["loader", "datamodule"])
@pytest.mark.parametrize("trained, resumed", [(96, 64), (80, 96)])
def test_resuming_on_a_dataset_of_another_size_is_a_clear_error(tmp_path, passed, trained, resumed):
    # Before, with a DataLoader passed to fit: an IndexError a few batches in (64), or silently
    # never training the new samples (a larger set).
    def data(size):
        if passed == "loader":
            return dict(loader=DataLoader(TensorDataset(X[:size], Y[:size]), batch_size=8, shuffle=True))
        return dict(datamodule=Data(n=size, shuffle=True))

    fit([DataPruning(), ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)], max_epochs=3, **data(trained))
    (ckpt,) = tmp_path.glob("epoch=1-*.ckpt")
    steps = Steps()
    with pytest.raises(ValueError, match=rf"{trained} samples.*dataset has {resumed}"):
        fit([DataPruning(), steps], max_epochs=4, ckpt_path=str(ckpt), **data(resumed))
    assert steps.started == 0


# -- 5. settings that never prune -------------------------------------------------------------------
@pytest.mark.parametrize("make, epochs, message", [
    (lambda: DataPruning(mode="static", score_epochs=3), 3, r"score_epochs=3.*max_epochs=3"),
    (lambda: DataPruning(mode="static", score_epochs=4), 3, r"score_epochs=4.*max_epochs=3"),
    (lambda: DataPruning(anneal=0.5), 3, r"anneal=0.5.*max_epochs=3.*no epoch"),
    (lambda: DataPruning(anneal=0.25), 2, r"anneal=0.25.*max_epochs=2.*anneal <= 0"),
    (lambda: DataPruning(anneal=0.0), 1, r"max_epochs=1.*max_epochs >= 2"),
])
def test_settings_that_never_prune_raise_at_fit_start(make, epochs, message):
    steps = Steps()
    with pytest.raises(ValueError, match=message):
        fit([make(), steps], max_epochs=epochs)
    assert steps.started == 0


@pytest.mark.parametrize("make, epochs, pruned", [
    (lambda: DataPruning(mode="static", score_epochs=2), 3, 2),
    (lambda: DataPruning(anneal=0.0), 2, 1),
    (lambda: DataPruning(anneal=1 / 3), 3, 1),
])
def test_the_smallest_settings_that_prune_are_accepted_and_do_prune(make, epochs, pruned):
    ids = Ids()
    fit([make(), ids], max_epochs=epochs)
    assert len(ids.epochs[pruned]) < 96 and len(ids.epochs[0]) == 96


# -- 6. constructor arguments -----------------------------------------------------------------------
BAD = [
    ("ratio", math.nan), ("ratio", math.inf), ("ratio", True), ("ratio", "0.5"), ("ratio", [0.5]), ("ratio", None),
    ("ratio", {"a": 1}), ("anneal", math.nan), ("anneal", -math.inf), ("anneal", False), ("anneal", "0.1"),
    ("anneal", None), ("mode", None), ("mode", 1), ("mode", ["static"]), ("score", None), ("score", 0),
    ("score_epochs", 2.0), ("score_epochs", True), ("score_epochs", "2"), ("score_epochs", math.nan),
    ("score_epochs", None), ("seed", 1.0), ("seed", True), ("seed", "0"), ("seed", None), ("seed", -1),
    ("seed", [0]),
]


@pytest.mark.parametrize("arg, value", BAD, ids=lambda v: repr(v))
def test_bad_arguments_are_a_value_error_naming_the_value(arg, value):
    # Before: NaN and bools passed, strings and lists raised TypeError deep in a comparison.
    kwargs = {arg: value}
    if arg == "score_epochs":
        kwargs["mode"] = "static"
    with pytest.raises(ValueError, match=rf"{arg}={value!r}".replace("[", r"\[").replace("(", r"\(")):
        DataPruning(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(score="el2n"), r"score='el2n'.*mode='static'"),
    (dict(score_epochs=2), r"score_epochs=2.*mode='static'"),
    (dict(mode="static", anneal=0.25), r"anneal=0.25.*mode='infobatch'"),
])
def test_contradictory_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DataPruning(**kwargs)


def test_good_arguments_are_kept_as_given():
    dp = DataPruning(ratio=0, mode="static", score="el2n", score_epochs=2, seed=3)
    assert (dp.ratio, dp.mode, dp.score, dp.score_epochs, dp.seed) == (0.0, "static", "el2n", 2, 3)
    assert DataPruning(anneal=1).anneal == 1.0


# -- 7. one instance, several fits -----------------------------------------------------------------
def test_a_k_fold_loop_with_one_instance_equals_fresh_instances():
    # Before: the second fold started from the first fold's scores and plan (and with another
    # fold size: "holds scores for 96 samples but the dataset has 80").
    folds = [Data(n=96, shuffle=True), Data(n=80, shuffle=True), Data(n=96, shuffle=True)]
    shared = DataPruning(ratio=0.5, anneal=0.25)
    for i, data in enumerate(folds):
        _, reused = fit([shared], data, seed=i)
        fresh = DataPruning(ratio=0.5, anneal=0.25)
        _, ref = fit([fresh], data, seed=i)
        for key, value in ref.state_dict().items():
            assert torch.equal(reused.state_dict()[key], value), (i, key)
        a, b = flat_state(shared.state_dict()), flat_state(fresh.state_dict())
        assert a.keys() == b.keys()
        for key in b:
            assert torch.equal(a[key], b[key]) if isinstance(b[key], torch.Tensor) else a[key] == b[key], (i, key)


def test_a_loader_passed_to_fit_is_rebound_each_fit():
    shared = DataPruning(ratio=0.5, anneal=0.25)
    for n in (96, 64):
        loader = DataLoader(TensorDataset(X[:n], Y[:n]), batch_size=8, shuffle=True)
        ids = Ids()
        fit([shared, ids], loader=loader)
        assert len(ids.epochs[0]) == n and len(ids.epochs[1]) < n
        assert shared.scores.numel() == n


def test_a_fit_that_raised_leaves_nothing_bound_for_the_next():
    # Lightning calls no teardown after an exception: before, the wrapped train_dataloader stayed
    # on the old datamodule and the next fit was not pruned at all.
    class Boom(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                raise RuntimeError("boom")

    shared, old = DataPruning(ratio=0.5, anneal=0.25), TinyData()
    model = PerSample()
    with pytest.raises(RuntimeError, match="boom"):
        fit([shared, Boom()], old, model)
    assert "train_dataloader" not in vars(old) and "training_step" not in vars(model)
    _, reused = fit([shared], TinyData())
    _, ref = fit([DataPruning(ratio=0.5, anneal=0.25)], TinyData())
    for key, value in ref.state_dict().items():
        assert torch.equal(reused.state_dict()[key], value), key


def test_the_step_wrapper_is_removed_with_two_per_sample_callbacks():
    # Before: each callback left the removal to the other, so neither removed it.
    _, model = fit([SampleReweighting(warmup_steps=0), DataPruning()], model=TinyModel, max_epochs=3)
    assert "training_step" not in vars(model)
    fit([], model=model, max_epochs=1)  # a plain fit of the same module: the plain mean


class Stream(IterableDataset):
    def __iter__(self):
        return iter(zip(X, Y))


def test_iterable_data_is_refused_with_what_is_needed():
    with pytest.raises(ValueError, match="map-style"):
        fit([DataPruning()], loader=DataLoader(Stream(), batch_size=8), max_epochs=3)


class EpochWeighted(WeightedRandomSampler):
    """Draws with replacement, seeded from the epoch: the same repeats on every rank."""

    def set_epoch(self, epoch: int) -> None:
        self.generator = torch.Generator().manual_seed(100 + epoch)


class RankDump(Callback):
    def __init__(self, path):
        self.path, self.ids = path, Ids()

    def on_train_batch_start(self, *args):
        self.ids.on_train_batch_start(*args)

    def on_fit_end(self, trainer, pl_module):
        dp = next(cb for cb in trainer.callbacks if isinstance(cb, DataPruning))
        params = {k: v.detach() for k, v in pl_module.named_parameters()}  # BatchNorm statistics stay per rank
        torch.save({"ids": self.ids.epochs, "state": dp.state_dict(), "model": params},
                   f"{self.path}/rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_with_a_repeating_sampler_splits_its_order_and_ranks_agree(tmp_path):
    # A sampler that repeats ids can put one id on both ranks: the per-epoch score merge averages
    # the ranks' scores there instead of adding them, and every rank plans the same epoch.
    sampler = EpochWeighted(torch.linspace(0.1, 1, 96), num_samples=96, replacement=True)
    trainer = L.Trainer(**{**TRAINER, "devices": 2}, strategy="ddp_spawn", max_epochs=4,
                        callbacks=[DataPruning(ratio=0.5, anneal=0.25), RankDump(str(tmp_path))])
    L.seed_everything(0)
    trainer.fit(PerSample(), datamodule=Data(sampler))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    sampler.set_epoch(0)
    order = list(sampler)
    assert r0["ids"][0] == order[0::2] and r1["ids"][0] == order[1::2]  # the full epoch, split by rank
    for epoch in (1, 2):
        sampler.set_epoch(epoch)
        both = [i for pair in zip(r0["ids"][epoch], r1["ids"][epoch]) for i in pair]
        assert len(both) < 96 and is_subsequence(both, list(sampler)), epoch
    a, b = flat_state(r0["state"]), flat_state(r1["state"])
    for key in a:
        assert torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key], key
    for key, value in r0["model"].items():
        assert torch.equal(r1["model"][key], value), key


def test_an_id_scored_on_two_ranks_merges_to_the_mean():
    # Two ranks that both scored ids 0 and 2 (a repeating sampler) with the same losses: the
    # all-reduce sums them, the merge must divide by the number of ranks that wrote each id.
    # Before: the sum, i.e. twice the loss.
    dp = DataPruning()
    dp._trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(reduce=lambda t, reduce_op: 2 * t))
    dp.scores, dp.seen = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([False, True, False])
    dp._touched = torch.tensor([True, False, True])
    dp._merge()
    assert torch.equal(dp.scores, torch.tensor([1.0, 2.0, 3.0])) and bool(dp.seen.all())
