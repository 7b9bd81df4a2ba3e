"""LightningDataModules over small data sets that ship with installed packages.

Nothing here downloads: digits come with scikit-learn, MNIST-1D is generated
procedurally and the text corpus is CPython's own ``pydoc_data``. Every split,
corruption and shuffle is derived from ``seed`` alone, so two modules built with
the same arguments yield the same batches in the same order.
"""

from __future__ import annotations

import functools
import random

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DigitsDataModule", "MNIST1DDataModule", "CharTextDataModule"]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_common(batch_size: int, seed: int, num_workers: int) -> None:
    _check(batch_size >= 1, f"batch_size={batch_size} must be >= 1; pass a positive batch size.")
    _check(seed >= 0, f"seed={seed} must be >= 0; pass a non-negative integer seed.")
    _check(num_workers >= 0, f"num_workers={num_workers} must be >= 0; use 0 to load in the main process.")


def _check_fraction(name: str, value: float) -> None:
    _check(0.0 < value < 1.0, f"{name}={value} must lie strictly between 0 and 1; pass e.g. 0.1.")


class _TensorDataModule(LightningDataModule):
    """Shared loader plumbing: subclasses fill ``train_set``/``val_set``/``test_set`` in ``_build``."""

    def __init__(self, batch_size: int, seed: int, num_workers: int) -> None:
        super().__init__()
        _check_common(batch_size, seed, num_workers)
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def prepare_data(self) -> None:
        """Nothing to download: the data is embedded or generated."""

    def setup(self, stage: str | None = None) -> None:
        """Build every split once; later calls (one per trainer stage) are no-ops."""
        if self.train_set is None:
            self._build()

    def _build(self) -> None:
        raise NotImplementedError

    def _loader(self, dataset: TensorDataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a dataloader.")
        # A fresh generator per call keeps the shuffle order a pure function of the seed.
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=False,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


def _stratified_order(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random permutation in which every prefix holds the classes in about their overall proportion.

    Each sample gets the key (rank within its class + 0.5) / class size; sorting by it
    interleaves the classes, so cutting the order anywhere gives exact split sizes that
    are still stratified, without the minimum-size rules of sklearn's splitter.
    """
    perm = rng.permutation(len(y))
    key = np.empty(len(y))
    for c in np.unique(y):
        where = np.flatnonzero(y[perm] == c)
        key[where] = (np.arange(len(where)) + 0.5) / len(where)
    return perm[np.argsort(key, kind="stable")]


class DigitsDataModule(_TensorDataModule):
    """scikit-learn's 8x8 handwritten digits (1797 images), with optional train-set corruption.

    Samples are ``x`` float32 ``[1, 8, 8]`` in [0, 1] and ``y`` int64 in [0, 10). The
    train/val/test split depends only on ``seed``, so runs with different corruption
    levels are evaluated on exactly the same clean val/test images.

    After ``setup()``, ``noisy_mask`` and ``duplicate_mask`` (bool, one entry per train
    sample, duplicates included) mark flipped labels and appended copies; a duplicate
    of a flipped sample is flagged in both. ``split_indices`` maps ``train``/``val``/``test``
    to the rows of ``load_digits()`` each split holds (train without its duplicates).

    Args:
        batch_size: Samples per batch for every loader.
        val_fraction: Share of all images held out for validation, in (0, 1).
        test_fraction: Share of all images held out for testing, in (0, 1).
        label_noise: Share of train labels replaced by a different random class, in [0, 1).
        duplicate_fraction: Share of train samples appended again as exact copies, in [0, 1].
        seed: Seeds the split, the corruption and the train shuffle.
        num_workers: DataLoader worker processes.
    """

    num_classes = 10
    num_features = 64
    num_samples = 1797

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        label_noise: float = 0.0,
        duplicate_fraction: float = 0.0,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, seed, num_workers)
        _check_fraction("val_fraction", val_fraction)
        _check_fraction("test_fraction", test_fraction)
        _check(
            val_fraction + test_fraction < 1.0,
            f"val_fraction + test_fraction = {val_fraction + test_fraction} leaves no train data; "
            "keep the sum below 1.",
        )
        _check(
            0.0 <= label_noise < 1.0,
            f"label_noise={label_noise} must be in [0, 1); e.g. 0.2 flips 20% of train labels.",
        )
        _check(
            0.0 <= duplicate_fraction <= 1.0,
            f"duplicate_fraction={duplicate_fraction} must be in [0, 1]; e.g. 0.1 appends 10% of train samples again.",
        )
        n_val, n_test = round(val_fraction * self.num_samples), round(test_fraction * self.num_samples)
        _check(
            min(n_val, n_test, self.num_samples - n_val - n_test) >= 1,
            f"val_fraction={val_fraction}, test_fraction={test_fraction} leave a split of {self.num_samples} "
            "images empty; use fractions of at least 0.01 that sum below 0.99.",
        )
        self.save_hyperparameters()
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.label_noise = label_noise
        self.duplicate_fraction = duplicate_fraction
        self.noisy_mask: torch.Tensor | None = None
        self.duplicate_mask: torch.Tensor | None = None
        self.split_indices: dict[str, torch.Tensor] = {}

    def _build(self) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.from_numpy(digits.data / 16.0).float().view(-1, 1, 8, 8)  # [N, 1, 8, 8]
        y = torch.from_numpy(digits.target).long()  # [N]
        n_test, n_val = round(self.test_fraction * len(y)), round(self.val_fraction * len(y))

        # Separate streams per purpose so corruption settings never move the split.
        order = torch.from_numpy(_stratified_order(digits.target, np.random.default_rng(self.seed)))
        test_idx, val_idx, train_idx = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
        self.split_indices = {"train": train_idx, "val": val_idx, "test": test_idx}
        x_train, y_train = x[train_idx], y[train_idx].clone()
        n_train = len(train_idx)

        noise_rng = np.random.default_rng([self.seed, 1])
        flip = torch.from_numpy(noise_rng.choice(n_train, size=round(self.label_noise * n_train), replace=False))
        # Adding 1..C-1 modulo C picks uniformly among the *other* classes.
        shift = torch.from_numpy(noise_rng.integers(1, self.num_classes, size=len(flip)))
        y_train[flip] = (y_train[flip] + shift) % self.num_classes
        noisy = torch.zeros(n_train, dtype=torch.bool)
        noisy[flip] = True

        dup_rng = np.random.default_rng([self.seed, 2])
        n_dup = round(self.duplicate_fraction * n_train)
        dup = torch.from_numpy(dup_rng.choice(n_train, size=n_dup, replace=False))
        self.noisy_mask = torch.cat([noisy, noisy[dup]])
        self.duplicate_mask = torch.arange(n_train + n_dup) >= n_train
        self.train_set = TensorDataset(torch.cat([x_train, x_train[dup]]), torch.cat([y_train, y_train[dup]]))
        self.val_set = TensorDataset(x[val_idx], y[val_idx])
        self.test_set = TensorDataset(x[test_idx], y[test_idx])


class MNIST1DDataModule(_TensorDataModule):
    """MNIST-1D (Greydanus, 2020): procedurally generated 1-D digit signals of length 40.

    The generator's own 80/20 split gives the test set; ``val_fraction`` of its train
    part becomes the validation set. Samples are ``x`` float32 ``[40]`` and ``y`` int64.

    Args:
        num_samples: Total signals generated (rounded down to a multiple of 10), >= 50.
        batch_size: Samples per batch for every loader.
        val_fraction: Share of the generated train part held out for validation, in (0, 1).
        seed: Seeds generation, the train/val split and the train shuffle.
        num_workers: DataLoader worker processes.
    """

    num_classes = 10
    num_features = 40

    def __init__(
        self,
        num_samples: int = 4000,
        batch_size: int = 128,
        val_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, seed, num_workers)
        _check(num_samples >= 50, f"num_samples={num_samples} is too small to split; pass at least 50 (default 4000).")
        _check_fraction("val_fraction", val_fraction)
        self.save_hyperparameters()
        self.num_samples = num_samples
        self.val_fraction = val_fraction

    def _build(self) -> None:
        x, y, x_test, y_test = (t.clone() for t in _mnist1d(self.num_samples, self.seed))  # nobody edits the cache
        perm = torch.from_numpy(np.random.default_rng(self.seed).permutation(len(y)))
        n_val = min(max(1, round(self.val_fraction * len(y))), len(y) - 1)  # both splits non-empty
        val_idx, train_idx = perm[:n_val], perm[n_val:]
        self.train_set = TensorDataset(x[train_idx], y[train_idx])
        self.val_set = TensorDataset(x[val_idx], y[val_idx])
        self.test_set = TensorDataset(x_test, y_test)


# Generating 4000 signals takes seconds, more than a short fit: a process that builds the same
# data twice (a sweep, the summary's evaluations, the test suite) generates it once.
@functools.lru_cache(maxsize=4)
def _mnist1d(num_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MNIST-1D's ``x [0.8 N, 40]``, ``y [0.8 N]``, ``x_test [0.2 N, 40]``, ``y_test [0.2 N]``."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    # make_dataset reseeds the global `random` and numpy RNGs; put them back so
    # building data does not perturb anything else seeded by the user.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return (torch.from_numpy(d["x"]).float(), torch.from_numpy(d["y"]).long(),
            torch.from_numpy(d["x_test"]).float(), torch.from_numpy(d["y_test"]).long())


class CharTextDataModule(_TensorDataModule):
    """Character-level language modelling on the Python documentation topics (``pydoc_data``).

    Text is ASCII-encoded (other characters become ``?``) and cut into non-overlapping
    windows of ``context_length + 1`` tokens; each gives ``x = window[:-1]`` and
    ``y = window[1:]``, both int64 ``[context_length]``. The last ``val_fraction`` of the
    windows (by position, so no text leaks across) is the validation set, which also
    serves as test set.

    Args:
        context_length: Tokens per input sequence.
        batch_size: Sequences per batch for every loader.
        val_fraction: Share of windows, taken from the end of the text, for validation, in (0, 1).
        max_chars: Keep only the first ``max_chars`` characters; 0 keeps all (~465k).
        seed: Seeds the train shuffle.
        num_workers: DataLoader worker processes.
    """

    vocab_size = 128

    def __init__(
        self,
        context_length: int = 64,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        max_chars: int = 200_000,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, seed, num_workers)
        _check(context_length >= 1, f"context_length={context_length} must be >= 1; pass e.g. 64.")
        _check_fraction("val_fraction", val_fraction)
        _check(
            max_chars == 0 or max_chars >= 2 * (context_length + 1),
            f"max_chars={max_chars} cannot hold a train and a val window of {context_length + 1} tokens; "
            f"pass 0 (all text) or at least {2 * (context_length + 1)}.",
        )
        self.save_hyperparameters()
        self.context_length = context_length
        self.val_fraction = val_fraction
        self.max_chars = max_chars

    @staticmethod
    def corpus() -> str:
        """The full text: every pydoc topic, in sorted key order."""
        from pydoc_data.topics import topics

        return "".join(topics[key] for key in sorted(topics))

    def _build(self) -> None:
        text = self.corpus()
        if self.max_chars:
            text = text[: self.max_chars]
        # 'replace' maps each non-ASCII character to one b'?', keeping one token per char.
        tokens = torch.frombuffer(bytearray(text.encode("ascii", errors="replace")), dtype=torch.uint8).long()
        window = self.context_length + 1
        n_windows = len(tokens) // window
        windows = tokens[: n_windows * window].view(n_windows, window)  # [W, T + 1]
        n_val = max(1, round(self.val_fraction * n_windows))
        _check(
            n_windows - n_val >= 1,
            f"{n_windows} windows of {window} tokens leave no train data; lower val_fraction or context_length.",
        )
        train, val = windows[: n_windows - n_val], windows[n_windows - n_val :]
        self.train_set = TensorDataset(train[:, :-1].contiguous(), train[:, 1:].contiguous())
        self.val_set = TensorDataset(val[:, :-1].contiguous(), val[:, 1:].contiguous())
        self.test_set = self.val_set
