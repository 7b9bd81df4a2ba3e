"""Merging checkpoints: model soups of one run vs its best and last checkpoint vs EMA / SWA, and WiSE-FT.

(a) Soups. For every seed one run per task (the settings of ``averaging_quality``: SGD 0.05,
momentum 0.9, constant LR, batch 32, 20 epochs) keeps the raw weights of every epoch end and
carries lichtenberg's EMA and SWA, which never perturb training, so every variant of a seed
comes from the same trajectory. Variants: the last epoch; the best epoch by validation
accuracy; uniform soups (``lichtenberg.core.merging.merge``) of the last 5 and last 10 epochs;
the greedy soup (``greedy_soup``) over all epochs, scored by validation accuracy; EMA; SWA.
Single checkpoints keep their own BatchNorm statistics; every soup re-estimates them with one
pass over the training data, as ``lichtenberg merge --config`` does (SWA does its own pass).

(b) WiSE-FT. The last MNIST-1D checkpoint of (a) is the pre-trained model. It is fine-tuned
on a shifted MNIST-1D (``ShiftedMNIST1D``: every signal rolled by 4 of its 40 time steps, plus
Gaussian noise of sigma 0.5 on signals of std ~1; the same digits and labels), then
``merge([ft], "wise_ft", base=pre, alpha=a)`` for a in {0, 0.25, 0.5, 0.75, 1} is tested on
the original and on the shifted test set.

Settings were fixed before the first full run and are printed with the results.

Run from the repository root: ``python -m benchmarks.merging [--seeds 3] [--quick]``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import TensorDataset

from benchmarks import harness
from benchmarks.averaging_quality import BATCH, LR, SWA_START
from benchmarks.averaging_quality import TASKS as CLEAN_TASKS
from lichtenberg.callbacks import EMA, SWA
from lichtenberg.cli.data import DigitsDataModule, MNIST1DDataModule
from lichtenberg.cli.models import SmallCNN
from lichtenberg.core.averaging import update_bn_
from lichtenberg.core.merging import greedy_soup, merge

__all__ = ["ALPHAS", "SOUPS", "ShiftedMNIST1D", "main", "run"]

THREADS = 2
EMA_DECAY = 0.99
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
ROLL, NOISE = 4, 0.5  # the shift of the fine-tuning task
FT_EPOCHS, FT_LR = 5, 0.01  # fine-tuning: a few epochs at a fifth of the pre-training LR


def _noisy_digits(seed: int, quick: bool) -> tuple[L.LightningModule, L.LightningDataModule]:
    """The default recipe's setting: 20% of the training labels flipped (val/test clean). On clean
    digits every variant scores the same 98.15%, so averaging has nothing to show there."""
    model = SmallCNN(channels=32, lr=LR, optimizer="sgd", momentum=0.9)
    return model, DigitsDataModule(batch_size=BATCH, seed=seed, label_noise=0.2)


# name -> (builder, epochs, has BatchNorm): averaging_quality's tasks plus noisy digits
TASKS = {**CLEAN_TASKS, "digits SmallCNN, 20% noisy labels": (_noisy_digits, 20, True)}


class Snapshots(Callback):
    """The raw weights at every epoch end (no averaging callback has swapped anything in yet)."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


class ShiftedMNIST1D(MNIST1DDataModule):
    """MNIST-1D with every signal rolled by ``ROLL`` time steps and Gaussian noise of sigma ``NOISE`` added."""

    def _build(self) -> None:
        super()._build()
        noise = torch.Generator().manual_seed(10_000 + self.seed)
        for split in ("train_set", "val_set", "test_set"):
            x, y = getattr(self, split).tensors  # [N, 40], [N]
            shifted = torch.roll(x, ROLL, dims=1) + NOISE * torch.randn(x.shape, generator=noise)
            setattr(self, split, TensorDataset(shifted, y))


class Evaluator:
    """Loads a state into the run's model, re-estimates BatchNorm where asked, and validates or tests.

    ``bn_batches``: the batches of a BatchNorm re-estimate (None, a full run: the whole training split).
    """

    def __init__(self, model: L.LightningModule, dm: L.LightningDataModule, has_bn: bool,
                 bn_batches: int | None = None) -> None:
        self.model, self.dm, self.has_bn, self.bn_batches = model, dm, has_bn, bn_batches

    def load(self, state: dict[str, torch.Tensor], soup: bool) -> None:
        self.model.load_state_dict(state)
        if soup and self.has_bn:
            update_bn_(self.model, self.dm.train_dataloader(), lambda m, b: m(b[0]), max_batches=self.bn_batches)

    def val_acc(self, state: dict[str, torch.Tensor], soup: bool) -> float:
        self.load(state, soup)
        (out,) = harness.trainer().validate(self.model, datamodule=self.dm, verbose=False)
        return float(out["val_acc"])

    def test(self, state: dict[str, torch.Tensor], soup: bool) -> dict[str, float]:
        self.load(state, soup)
        return harness.evaluate(self.model, self.dm)


def _last_k(k: int) -> Callable[[dict], tuple[dict, bool, dict]]:
    def soup(r: dict) -> tuple[dict, bool, dict]:
        states = r["snapshots"][-k:]
        return (merge(states) if len(states) > 1 else states[0]), True, {"ingredients": len(states)}
    return soup


def _best(r: dict) -> tuple[dict, bool, dict]:
    i = max(range(len(r["val"])), key=r["val"].__getitem__)
    return r["snapshots"][i], False, {"epoch": i + 1}


def _greedy(r: dict) -> tuple[dict, bool, dict]:
    soup, chosen = greedy_soup(r["snapshots"], lambda s: r["evaluator"].val_acc(s, soup=True))
    return soup, True, {"ingredients": len(chosen), "epochs": sorted(i + 1 for i in chosen)}


# variant -> run record -> (state to test, is it a soup (re-estimate BatchNorm), extras)
SOUPS: dict[str, Callable[[dict], tuple[dict, bool, dict]]] = {
    "last epoch": lambda r: (r["snapshots"][-1], False, {}),
    "best epoch (by val acc)": _best,
    "uniform soup, last 5 epochs": _last_k(5),
    "uniform soup, last 10 epochs": _last_k(10),
    "greedy soup, all epochs (by val acc)": _greedy,
    f"EMA {EMA_DECAY}": lambda r: (r["ema"], False, {}),
    f"SWA start={SWA_START}": lambda r: (r["swa"], False, {}),
}


def train(task: str, seed: int, epochs: int, quick: bool) -> dict[str, Any]:
    """One run with epoch snapshots, EMA and SWA (SWA applies at the end, with its BatchNorm pass)."""
    builder, _, has_bn = TASKS[task]
    L.seed_everything(seed, verbose=False)
    model, dm = builder(seed, quick)
    snapshots, ema = Snapshots(), EMA(decay=EMA_DECAY)
    _, fit_s = harness.fit(model, dm, [snapshots, ema, SWA(start=SWA_START)], max_epochs=epochs)
    swa = {k: v.detach().clone() for k, v in model.state_dict().items()}  # the module holds SWA's weights
    evaluator = Evaluator(model, dm, has_bn, bn_batches=harness.SMOKE_TRAIN_BATCHES if quick else None)
    val = [evaluator.val_acc(s, soup=False) for s in snapshots.states]
    return {"snapshots": snapshots.states, "ema": ema.averaged_state_dict(), "swa": swa, "val": val,
            "evaluator": evaluator, "fit_s": fit_s, "model": model, "dm": dm}


def soups(r: dict, seed: int) -> dict[str, dict]:
    out = {}
    for name, pick in SOUPS.items():
        t0 = time.perf_counter()
        state, soup, extra = pick(r)
        out[name] = {"seed": seed, **r["evaluator"].test(state, soup), **extra, "merge_s": time.perf_counter() - t0}
    return out


def wise_ft(r: dict, seed: int, quick: bool) -> list[dict]:
    """Fine-tune the run's last checkpoint on the shifted task; test every alpha on both tasks."""
    pre = r["snapshots"][-1]
    original = r["dm"]
    shifted = ShiftedMNIST1D(num_samples=original.num_samples, batch_size=original.batch_size, seed=seed)
    L.seed_everything(seed, verbose=False)
    model = TASKS["MNIST-1D MLP"][0](seed, quick)[0]  # the pre-training architecture and optimizer ...
    model.lr = FT_LR  # ... at the fine-tuning LR
    model.load_state_dict(pre)
    harness.fit(model, shifted, [], max_epochs=1 if quick else FT_EPOCHS)
    ft = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows = []
    for alpha in ALPHAS:
        model.load_state_dict(merge([ft], "wise_ft", base=pre, alpha=alpha))
        rows.append({"seed": seed, "alpha": alpha, "original": harness.evaluate(model, original)["acc"],
                     "shifted": harness.evaluate(model, shifted)["acc"]})
    return rows


def run(seeds: int, quick: bool) -> dict[str, Any]:
    epochs = {t: (3 if quick else e) for t, (_, e, _) in TASKS.items()}
    results: dict[str, Any] = {
        "settings": {"seeds": list(range(seeds)), "epochs": epochs, "ema_decay": EMA_DECAY, "swa_start": SWA_START,
                     "shift": {"roll": ROLL, "noise_sigma": NOISE}, "fine_tune": {"epochs": 1 if quick else FT_EPOCHS,
                                                                                 "lr": FT_LR, "optimizer": "SGD 0.9"},
                     "alphas": list(ALPHAS)},
        "soups": {}, "wise_ft": [],
    }
    for task in TASKS:
        rows: dict[str, list[dict]] = {name: [] for name in SOUPS}
        for seed in range(seeds):
            r = train(task, seed, epochs[task], quick)
            for name, row in soups(r, seed).items():
                rows[name].append({**row, "val_by_epoch": r["val"]} if name == "last epoch" else row)
                print(f"[merging] {task} | seed {seed} | {name}: test acc {row['acc']:.4f}", flush=True)
            if task == "MNIST-1D MLP":
                results["wise_ft"] += wise_ft(r, seed, quick)
        results["soups"][task] = rows
    return results


def render(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        "## Merging checkpoints: model soups, EMA / SWA, WiSE-FT",
        "",
        f"{len(s['seeds'])} seeds; epochs: " + ", ".join(f"{t} {e}" for t, e in s["epochs"].items())
        + " (the settings of averaging_quality). Every variant of a seed comes from the same run: its epoch-end "
        f"checkpoints, and lichtenberg's EMA ({s['ema_decay']}) and SWA (start {s['swa_start']}) attached to it. "
        "Soups re-estimate BatchNorm statistics with one pass over the training data; single checkpoints keep "
        "their own. Test accuracy in %, mean ± std over seeds; Δ = paired difference to the last epoch.",
    ]
    for task, rows in results["soups"].items():
        last = {r["seed"]: r["acc"] for r in rows["last epoch"]}
        table = []
        for name, runs in rows.items():
            note = ""
            if runs and "ingredients" in runs[0] and name.startswith("greedy"):
                note = f"{harness.pm([r['ingredients'] for r in runs], 1.0, 1)} checkpoints kept"
            elif runs and "epoch" in runs[0]:
                note = "epochs " + ", ".join(str(r["epoch"]) for r in runs)
            d = [r["acc"] - last[r["seed"]] for r in runs]
            table.append([name, harness.pm([r["acc"] for r in runs]), "—" if name == "last epoch" else harness.pm(d),
                          harness.pm([r["loss"] for r in runs], 1.0, 3), note])
        lines += ["", f"### {task}", "",
                  harness.markdown_table(["variant", "test acc %", "Δ acc (pp)", "test loss", "notes"], table)]
    sh, ft = s["shift"], s["fine_tune"]
    lines += ["", "### WiSE-FT on MNIST-1D", "",
              f"Pre-trained: the last MNIST-1D checkpoint above. Fine-tuned {ft['epochs']} epochs ({ft['optimizer']}, "
              f"LR {ft['lr']}) on the shifted task (signals rolled by {sh['roll']} steps, Gaussian noise σ = "
              f"{sh['noise_sigma']}). alpha = 0 is the pre-trained model, 1 the fine-tuned one.", ""]
    table = []
    for alpha in s["alphas"]:
        runs = [r for r in results["wise_ft"] if r["alpha"] == alpha]
        table.append([f"{alpha:g}", harness.pm([r["original"] for r in runs]), harness.pm([r["shifted"] for r in runs]),
                      harness.pm([(r["original"] + r["shifted"]) / 2 for r in runs])])
    lines.append(harness.markdown_table(["alpha", "original test acc %", "shifted test acc %", "mean of both %"], table))
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()
    tasks = list(results["soups"])
    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(5 * (len(tasks) + 1), 3.6))
    for ax, task in zip(axes, tasks):
        rows = results["soups"][task]
        last = {r["seed"]: r["acc"] for r in rows["last epoch"]}
        names = [n for n in rows if n != "last epoch"]
        stats = [harness.mean_std([100 * (r["acc"] - last[r["seed"]]) for r in rows[n]]) for n in names]
        ax.barh(range(len(names)), [m for m, _ in stats], xerr=[sd for _, sd in stats], capsize=3)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(0, color="k", lw=0.8)
        ax.set_xlabel("Δ test accuracy vs last epoch (pp)")
        ax.set_title(task, fontsize=10)
    ax = axes[-1]
    alphas = results["settings"]["alphas"]
    means = [[harness.mean_std([100 * r[k] for r in results["wise_ft"] if r["alpha"] == a])[0] for a in alphas]
             for k in ("original", "shifted")]
    ax.plot(means[0], means[1], "o-")
    for a, x, y in zip(alphas, *means):
        ax.annotate(f"α={a:g}", (x, y), fontsize=8, textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("original test acc %")
    ax.set_ylabel("shifted test acc %")
    ax.set_title("WiSE-FT, MNIST-1D (mean over seeds)", fontsize=10)
    harness.save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    harness.main("merging", run, render, plot, "Δ accuracy of soups, EMA and SWA vs the last epoch; WiSE-FT curve",
                 argv, threads=THREADS, quick="1 seed, 3 epochs of 4 batches, small data, 1 fine-tuning epoch", seeds=3,
                 quick_seeds=lambda n: 1)


if __name__ == "__main__":
    main()
