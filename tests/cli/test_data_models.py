"""Data modules and demo models of ``lichtenberg.cli``: split invariants, corruption counts, shapes, training."""

import random

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI

from lichtenberg.cli.data import CharTextDataModule, DigitsDataModule, MNIST1DDataModule, _mnist1d
from lichtenberg.cli.models import MLP, DemoModule, SmallCNN, TinyTransformerLM

N_DIGITS = 1797


def _trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**defaults, **kwargs})


def _built(dm):
    dm.setup("fit")
    return dm


def _epoch_targets(dm) -> torch.Tensor:
    return torch.cat([y for _, y in dm.train_dataloader()])


@pytest.fixture(scope="module")
def clean_digits():
    return _built(DigitsDataModule())


# --------------------------------------------------------------------------- digits


def test_digits_split_sizes_cover_everything_once(clean_digits):
    dm = clean_digits
    idx = dm.split_indices
    assert (len(idx["train"]), len(idx["val"]), len(idx["test"])) == (1257, 270, 270)  # 270 = round(0.15 * 1797)
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == N_DIGITS
    everything = torch.cat([idx["train"], idx["val"], idx["test"]])
    assert torch.equal(everything.sort().values, torch.arange(N_DIGITS))  # disjoint and complete
    # Stratified: every class appears 26-28 times in a 270-image split.
    counts = torch.bincount(dm.val_set.tensors[1], minlength=10)
    assert counts.min() >= 26 and counts.max() <= 28


def test_digits_tensors_match_sklearn(clean_digits):
    from sklearn.datasets import load_digits

    x, y = clean_digits.val_set.tensors
    assert x.shape == (270, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() == 0.0 and x.max() == 1.0
    raw = load_digits()
    rows = clean_digits.split_indices["val"].numpy()
    np.testing.assert_allclose(x.view(270, 64).numpy(), raw.data[rows] / 16.0, rtol=0, atol=1e-7)
    assert np.array_equal(y.numpy(), raw.target[rows])
    assert not clean_digits.noisy_mask.any() and not clean_digits.duplicate_mask.any()


def test_digits_corruption_leaves_split_untouched(clean_digits):
    dm = _built(DigitsDataModule(label_noise=0.3, duplicate_fraction=0.2))
    for name in ("train", "val", "test"):
        assert torch.equal(dm.split_indices[name], clean_digits.split_indices[name])
    for corrupt, clean in ((dm.val_set, clean_digits.val_set), (dm.test_set, clean_digits.test_set)):
        assert all(torch.equal(a, b) for a, b in zip(corrupt.tensors, clean.tensors))
    assert torch.equal(dm.train_set.tensors[0][:1257], clean_digits.train_set.tensors[0])


def test_digits_label_noise_flips_exact_count(clean_digits):
    dm = _built(DigitsDataModule(label_noise=0.3))
    clean_y, noisy_y = clean_digits.train_set.tensors[1], dm.train_set.tensors[1]
    mask = dm.noisy_mask
    assert mask.dtype == torch.bool and mask.shape == (1257,)
    assert int(mask.sum()) == round(0.3 * 1257) == 377
    assert (noisy_y[mask] != clean_y[mask]).all()
    assert torch.equal(noisy_y[~mask], clean_y[~mask])
    assert noisy_y.min() >= 0 and noisy_y.max() <= 9
    # The wrong labels are spread over the other classes, not shifted to one neighbour.
    assert len(torch.unique((noisy_y[mask] - clean_y[mask]) % 10)) == 9


def test_digits_duplicates_are_exact_copies(clean_digits):
    dm = _built(DigitsDataModule(label_noise=0.2, duplicate_fraction=0.2))
    n_dup = round(0.2 * 1257)
    x, y = dm.train_set.tensors
    assert len(x) == 1257 + n_dup == len(dm.noisy_mask) == len(dm.duplicate_mask)
    assert int(dm.duplicate_mask.sum()) == n_dup and dm.duplicate_mask[1257:].all()
    # Each appended row is a distinct original row, label (noisy or not) included.
    dist = torch.cdist(x[1257:].flatten(1), x[:1257].flatten(1))  # [n_dup, 1257]
    source = dist.argmin(1)
    assert torch.all(dist.min(1).values == 0) and len(torch.unique(source)) == n_dup
    assert torch.equal(y[1257:], y[source])
    assert torch.equal(dm.noisy_mask[1257:], dm.noisy_mask[source])
    clean_y = clean_digits.train_set.tensors[1]
    assert torch.equal(dm.noisy_mask[:1257], y[:1257] != clean_y)


def test_digits_deterministic_per_seed():
    a = _built(DigitsDataModule(label_noise=0.2, duplicate_fraction=0.1, seed=3))
    b = _built(DigitsDataModule(label_noise=0.2, duplicate_fraction=0.1, seed=3))
    c = _built(DigitsDataModule(label_noise=0.2, duplicate_fraction=0.1, seed=4))
    assert all(torch.equal(u, v) for u, v in zip(a.train_set.tensors, b.train_set.tensors))
    assert torch.equal(a.noisy_mask, b.noisy_mask)
    order = _epoch_targets(a)
    assert torch.equal(order, _epoch_targets(b))
    assert torch.equal(order, _epoch_targets(a))  # a fresh loader replays the same order
    assert not torch.equal(a.split_indices["train"], c.split_indices["train"])
    assert not torch.equal(order, _epoch_targets(c))


def test_digits_loaders_shuffle_only_train(clean_digits):
    dm = clean_digits
    train = dm.train_dataloader()
    first = next(iter(train))[1]
    assert not torch.equal(first, dm.train_set.tensors[1][:64])
    assert sum(len(y) for _, y in train) == 1257  # drop_last=False
    assert torch.equal(torch.cat([y for _, y in dm.val_dataloader()]), dm.val_set.tensors[1])
    assert torch.equal(torch.cat([y for _, y in dm.predict_dataloader()]), dm.test_set.tensors[1])
    assert not dm.val_dataloader().persistent_workers
    train_set = dm.train_set
    dm.setup("test")
    assert dm.train_set is train_set  # setup is idempotent


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        (dict(val_fraction=0.0), "val_fraction=0.0"),
        (dict(test_fraction=1.5), "test_fraction=1.5"),
        (dict(val_fraction=0.5, test_fraction=0.5), "val_fraction \\+ test_fraction = 1.0"),
        (dict(label_noise=1.0), "label_noise=1.0"),
        (dict(duplicate_fraction=-0.1), "duplicate_fraction=-0.1"),
        (dict(batch_size=0), "batch_size=0"),
        (dict(val_fraction=0.0001), "val_fraction=0.0001, test_fraction=0.15 leave a split"),
        (dict(seed=-1), "seed=-1"),
        (dict(num_workers=-2), "num_workers=-2"),
    ],
)
def test_digits_rejects_bad_arguments(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        DigitsDataModule(**kwargs)


# --------------------------------------------------------------------------- MNIST-1D


def test_mnist1d_shapes_and_split():
    dm = _built(MNIST1DDataModule(num_samples=1000, val_fraction=0.2))
    x, y = dm.train_set.tensors
    assert x.shape == (640, 40) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(dm.val_set) == 160 and len(dm.test_set) == 200  # generator keeps 20% for test
    assert set(y.tolist()) == set(range(10))
    assert dm.num_features == 40 and dm.num_classes == 10


def test_mnist1d_deterministic_and_keeps_global_rng():
    _mnist1d.cache_clear()  # generate for real, twice: a cached copy would prove nothing
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    a = _built(MNIST1DDataModule(num_samples=500, seed=1))
    assert (np.random.rand(), random.random()) == (expected_np, expected_py)
    _mnist1d.cache_clear()
    b = _built(MNIST1DDataModule(num_samples=500, seed=1))
    c = _built(MNIST1DDataModule(num_samples=500, seed=2))
    assert torch.equal(a.train_set.tensors[0], b.train_set.tensors[0])
    assert torch.equal(_epoch_targets(a), _epoch_targets(b))
    assert not torch.equal(a.test_set.tensors[0], c.test_set.tensors[0])


def test_mnist1d_cache_hands_out_copies():
    a = _built(MNIST1DDataModule(num_samples=500, seed=1))
    a.test_set.tensors[0].zero_()  # a module that edits its data in place (the test split is not re-indexed)
    b = _built(MNIST1DDataModule(num_samples=500, seed=1))
    assert b.test_set.tensors[0].abs().sum() > 0


# --------------------------------------------------------------------------- character text


def test_char_text_windows_shift_by_one():
    dm = _built(CharTextDataModule(context_length=16, max_chars=5000, val_fraction=0.1))
    n_windows = 5000 // 17
    assert len(dm.train_set) + len(dm.val_set) == n_windows and len(dm.val_set) == round(0.1 * n_windows)
    assert dm.test_set is dm.val_set
    x, y = dm.train_set.tensors
    assert x.shape == y.shape == (n_windows - 29, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    text = CharTextDataModule.corpus()
    assert bytes(x[0].tolist()).decode() == text[:16]
    # Validation windows come after every train window in the text.
    assert bytes(dm.val_set.tensors[0][0].tolist()).decode() == text[17 * (n_windows - 29) :][:16]


def test_char_text_full_corpus_is_ascii():
    dm = _built(CharTextDataModule(max_chars=0))
    text = CharTextDataModule.corpus()
    assert any(ord(ch) >= 128 for ch in text)  # so the '?' replacement is exercised
    assert len(dm.train_set) + len(dm.val_set) == len(text) // 65
    tokens = torch.cat([dm.train_set.tensors[0], dm.val_set.tensors[0]])
    assert tokens.min() >= 0 and tokens.max() < dm.vocab_size == 128


def test_char_text_rejects_too_little_text():
    with pytest.raises(ValueError, match="max_chars=100"):
        CharTextDataModule(context_length=64, max_chars=100)


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize(
    "make_model, make_x, out_shape",
    [
        (MLP, lambda: torch.rand(5, 1, 8, 8), (5, 10)),
        (lambda: MLP(in_features=40, hidden=[32], dropout=0.1), lambda: torch.randn(5, 40), (5, 10)),
        (lambda: SmallCNN(channels=8), lambda: torch.rand(5, 1, 8, 8), (5, 10)),
        (
            lambda: TinyTransformerLM(context_length=16, d_model=32),
            lambda: torch.randint(0, 128, (5, 16)),
            (5, 16, 128),
        ),
    ],
    ids=["mlp-digits", "mlp-mnist1d", "cnn", "lm"],
)
def test_model_shapes_and_per_sample_loss(make_model, make_x, out_shape):
    torch.manual_seed(0)
    model, x = make_model(), make_x()
    assert isinstance(model, DemoModule)
    model.eval()  # dropout off, so two forwards agree
    logits = model(x)
    assert logits.shape == out_shape
    y = torch.randint(0, out_shape[-1], out_shape[:-1])
    losses = model.per_sample_loss((x, y))
    assert losses.shape == (5,)
    expected = F.cross_entropy(logits.reshape(-1, out_shape[-1]), y.reshape(-1), reduction="none").view(5, -1).mean(1)
    torch.testing.assert_close(losses, expected)
    losses.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_lm_head_is_tied_to_embedding():
    model = TinyTransformerLM()
    assert model.head.weight is model.tok_emb.weight
    names = [name for name, _ in model.named_parameters()]
    assert "head.weight" not in names and "tok_emb.weight" in names  # counted once
    with pytest.raises(ValueError, match="exceeds context_length=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize(
    "cls, kwargs, bad",
    [
        (MLP, dict(optimizer="rmsprop"), "optimizer='rmsprop'"),
        (SmallCNN, dict(lr=0.0), "lr=0.0"),
        (SmallCNN, dict(scheduler="step"), "scheduler='step'"),
        (TinyTransformerLM, dict(d_model=30, n_heads=4), "d_model=30"),
        (SmallCNN, dict(optimizer="sgd", fused=True), "fused=True only applies to optimizer='adam' or 'adamw'"),
        (MLP, dict(fused="yes"), "fused='yes' must be true, false or null"),
    ],
)
def test_models_reject_bad_arguments(cls, kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        cls(**kwargs)


@pytest.mark.parametrize("optimizer, cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
@pytest.mark.parametrize("fused", [None, True, False])
def test_fused_reaches_adam_only_when_asked(optimizer, cls, fused):
    model = MLP(in_features=40, hidden=[8], optimizer=optimizer, fused=fused)
    opt = model.configure_optimizers()
    assert type(opt) is cls
    assert opt.defaults["fused"] is fused  # None: torch's own default, untouched
    model(torch.randn(4, 40)).sum().backward()
    opt.step()  # the fused CPU kernel exists (torch >= 2.4)


def test_small_cnn_learns_digits_and_logs_exact_accuracy():
    L.seed_everything(0)
    dm, model = DigitsDataModule(), SmallCNN(channels=16, lr=1e-2)
    trainer = _trainer(max_steps=30)
    trainer.fit(model, dm)
    (metrics,) = trainer.validate(model, dm, verbose=False)
    assert metrics["val_acc"] > 0.5
    model.eval()
    with torch.no_grad():
        x, y = dm.val_set.tensors
        correct = (model(x).argmax(-1) == y).sum().item()
    assert metrics["val_acc"] == pytest.approx(correct / 270, abs=1e-6)  # whole set, not a mean of batch means
    predictions = torch.cat(trainer.predict(model, dm))
    assert predictions.shape == (270,) and predictions.dtype == torch.int64


def test_training_is_deterministic_and_cosine_reaches_zero():
    def run() -> tuple[torch.Tensor, L.Trainer]:
        L.seed_everything(0)
        model = MLP(in_features=40, hidden=[32], optimizer="sgd", lr=0.05, scheduler="cosine")
        trainer = _trainer(max_steps=12, limit_val_batches=0)
        trainer.fit(model, MNIST1DDataModule(num_samples=500, batch_size=32))
        return torch.cat([p.detach().flatten() for p in model.parameters()]), trainer

    weights, trainer = run()
    assert torch.equal(weights, run()[0])
    assert trainer.lr_scheduler_configs[0].interval == "step"
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_lm_loss_drops_with_adamw():
    L.seed_everything(0)
    dm = CharTextDataModule(context_length=32, max_chars=20_000, batch_size=16)
    model = TinyTransformerLM(context_length=32, d_model=32, n_layers=1, optimizer="adamw", lr=1e-2)
    trainer = _trainer(max_steps=40, limit_val_batches=4)
    (before,) = trainer.validate(model, dm, verbose=False)
    trainer.fit(model, dm)
    (after,) = trainer.validate(model, dm, verbose=False)
    assert before["val_loss"] == pytest.approx(np.log(128), abs=0.2)  # near-uniform at init
    assert after["val_loss"] < before["val_loss"] - 1.0
    assert isinstance(trainer.optimizers[0], torch.optim.AdamW)


# --------------------------------------------------------------------------- LightningCLI


@pytest.mark.parametrize(
    "model, model_args, data, data_args",
    [
        ("MLP", {"in_features": 40, "hidden": [32, 16]}, "MNIST1DDataModule", {"num_samples": 500}),
        ("SmallCNN", {"channels": 8, "optimizer": "sgd"}, "DigitsDataModule", {"label_noise": 0.1}),
        ("TinyTransformerLM", {"context_length": 32, "d_model": 32}, "CharTextDataModule", {"context_length": 32}),
    ],
)
def test_lightning_cli_builds_and_runs(model, model_args, data, data_args, monkeypatch):
    monkeypatch.setattr("sys.argv", ["lichtenberg"])  # args= must be the only source of options
    config = {
        "seed_everything": 0,
        "model": {"class_path": f"lichtenberg.cli.models.{model}", "init_args": model_args},
        "data": {"class_path": f"lichtenberg.cli.data.{data}", "init_args": data_args},
        "trainer": {"logger": False, "accelerator": "cpu", "fast_dev_run": True, "enable_progress_bar": False},
    }
    cli = LightningCLI(
        model_class=None,
        datamodule_class=None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=config,
        run=False,
        save_config_callback=None,
    )
    assert type(cli.model).__name__ == model and type(cli.datamodule).__name__ == data
    for key, value in model_args.items():
        assert cli.model.hparams[key] == value
    for key, value in data_args.items():
        assert cli.datamodule.hparams[key] == value
    cli.trainer.fit(cli.model, cli.datamodule)
    assert torch.isfinite(cli.trainer.callback_metrics["train_loss"])


def test_lightning_cli_rejects_unknown_optimizer(monkeypatch):
    monkeypatch.setattr("sys.argv", ["lichtenberg"])
    config = {
        "model": {"class_path": "lichtenberg.cli.models.SmallCNN", "init_args": {"optimizer": "rmsprop"}},
        "data": {"class_path": "lichtenberg.cli.data.DigitsDataModule"},
        "trainer": {"logger": False},
    }
    with pytest.raises(SystemExit):
        LightningCLI(None, None, subclass_mode_model=True, subclass_mode_data=True, args=config, run=False)
