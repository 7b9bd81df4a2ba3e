"""Does weight averaging help? Test accuracy of EMA / SWA vs the last iterate, over seeds.

For every seed, each variant trains the same model from the same initialisation on the same
data for the same number of steps (a constant, fairly high SGD learning rate and small
batches: the regime where the last iterate is noisy and averaging should pay), then is
tested. Our callbacks leave the averaged weights in the module and keep the raw ones in
``raw_weights``, so each EMA/SWA run is tested twice: averaged, and its own last iterate.
Lightning's EMAWeightAveraging and StochasticWeightAveraging run side by side; their last
iterate is captured by a snapshot callback placed before them where possible. A peer that
crashes is recorded in the table, not hidden.

Settings were fixed before the first full run and are printed with the results.

Run from the repository root: ``python -m benchmarks.averaging_quality [--seeds 3] [--quick]``.
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
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, StochasticWeightAveraging

from benchmarks import harness
from lichtenberg.callbacks import EMA, SWA
from lichtenberg.cli.data import DigitsDataModule, MNIST1DDataModule
from lichtenberg.cli.models import MLP, SmallCNN

__all__ = ["TASKS", "main", "run"]

THREADS = 2
LR = 0.05  # SGD, momentum 0.9, constant: high enough that the last iterate bounces
BATCH = 32
SWA_START = 0.75  # both SWAs average the epochs of the last quarter


class RawSnapshot(Callback):
    """Keeps the module's state when training ends, before a later callback swaps averages in."""

    state: dict[str, torch.Tensor] | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def _digits(seed: int, quick: bool) -> tuple[L.LightningModule, L.LightningDataModule]:
    model = SmallCNN(channels=32, lr=LR, optimizer="sgd", momentum=0.9)
    return model, DigitsDataModule(batch_size=BATCH, seed=seed)


def _mnist1d(seed: int, quick: bool) -> tuple[L.LightningModule, L.LightningDataModule]:
    model = MLP(in_features=40, hidden=[256, 256], lr=LR, optimizer="sgd", momentum=0.9)
    return model, MNIST1DDataModule(num_samples=200 if quick else 6000, batch_size=BATCH, seed=seed)


# name -> (builder, epochs, has BatchNorm)
TASKS: dict[str, tuple[Callable, int, bool]] = {
    "digits SmallCNN": (_digits, 20, True),
    "MNIST-1D MLP": (_mnist1d, 20, False),
}


def _lightning_ema(decay: float) -> EMAWeightAveraging:
    cb = EMAWeightAveraging(decay=decay)
    cb.nominal_decay = decay  # Lightning keeps it only inside its avg_fn closure
    return cb


def variants(has_bn: bool) -> dict[str, Callable[[], list[Callback]]]:
    """Callback lists per variant; built fresh for every fit."""
    out: dict[str, Callable[[], list[Callback]]] = {
        "last iterate (plain)": lambda: [],
        "EMA 0.99": lambda: [EMA(decay=0.99)],
        "EMA 0.999": lambda: [EMA(decay=0.999)],
        "SWA": lambda: [SWA(start=SWA_START)],
    }
    if has_bn:
        out["SWA bn_batches=0"] = lambda: [SWA(start=SWA_START, bn_batches=0)]
    out |= {
        "Lightning EMAWeightAveraging 0.99": lambda: [RawSnapshot(), _lightning_ema(0.99)],
        "Lightning EMAWeightAveraging 0.999": lambda: [RawSnapshot(), _lightning_ema(0.999)],
        # swa_lrs = the training LR, so SWALR's annealing keeps the LR constant like ours.
        "Lightning StochasticWeightAveraging": lambda: [
            StochasticWeightAveraging(swa_lrs=LR, swa_epoch_start=SWA_START, annealing_epochs=1)
        ],
    }
    return out


def fit_and_test(task: str, seed: int, make_callbacks: Callable[[], list[Callback]], epochs: int, quick: bool) -> dict:
    """One training run; returns test metrics of the final module and of its raw last iterate (if known)."""
    L.seed_everything(seed, verbose=False)
    model, dm = TASKS[task][0](seed, quick)
    callbacks = make_callbacks()
    try:
        trainer, fit_s = harness.fit(model, dm, callbacks, max_epochs=epochs)
    except Exception as exc:  # a peer that crashes is a result
        return harness.crash_record(exc)
    out: dict[str, Any] = {"fit_s": fit_s, "steps": trainer.global_step, "final": harness.evaluate(model, dm)}
    raw = None
    for cb in callbacks:
        if isinstance(cb, EMA):
            out["decay_at_end"] = cb.current_decay()
        elif isinstance(cb, EMAWeightAveraging):
            out["decay_at_end"] = cb.nominal_decay  # no warm-up: constant
        if isinstance(cb, (EMA, SWA)):
            raw = cb.raw_weights
        elif isinstance(cb, RawSnapshot):
            raw = cb.state
    out["_final_state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if raw is not None:
        out["_raw_state"] = raw
        model.load_state_dict(raw, strict=False)
        out["raw"] = harness.evaluate(model, dm)
    return out


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference over the floating tensors both states hold."""
    keys = [k for k in a if k in b and a[k].is_floating_point()]
    return max((float((a[k] - b[k]).abs().max()) for k in keys), default=float("nan"))


def run(seeds: int, quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {
        "settings": {
            "seeds": list(range(seeds)),
            "optimizer": "SGD momentum 0.9, constant LR",
            "lr": LR,
            "batch": BATCH,
            "epochs": {t: (2 if quick else e) for t, (_, e, _) in TASKS.items()},
            "swa_start": SWA_START,
        },
        "tasks": {},
    }
    for task, (_, epochs, has_bn) in TASKS.items():
        epochs = 2 if quick else epochs
        runs: dict[str, list[dict]] = {}
        t0 = time.perf_counter()
        for seed in range(seeds):
            plain_state = None
            for name, make in variants(has_bn).items():
                r = fit_and_test(task, seed, make, epochs, quick)
                final_state, raw_state = r.pop("_final_state", None), r.pop("_raw_state", None)
                if name == "last iterate (plain)":
                    plain_state = final_state
                elif raw_state is not None and plain_state is not None:
                    # 0.0 means the callback did not perturb training at all.
                    r["raw_vs_plain_max_diff"] = _max_diff(raw_state, plain_state)
                runs.setdefault(name, []).append({"seed": seed, **r})
                if "error" in r:
                    status = r["error"]
                else:
                    status = f"test acc {r['final']['acc']:.4f}" + (f", raw {r['raw']['acc']:.4f}" if "raw" in r else "")
                print(f"[averaging_quality] {task} | seed {seed} | {name}: {status}", flush=True)
        results["tasks"][task] = {"epochs": epochs, "runs": runs, "seconds": time.perf_counter() - t0}
    return results


def summarise(results: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per task and variant: accuracies, losses, and paired differences vs the plain run of the same seed."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for task, t in results["tasks"].items():
        plain = {r["seed"]: r["final"] for r in t["runs"]["last iterate (plain)"] if "final" in r}
        out[task] = {}
        for name, runs in t["runs"].items():
            ok = [r for r in runs if "final" in r]
            out[task][name] = {
                "acc": [r["final"]["acc"] for r in ok],
                "loss": [r["final"]["loss"] for r in ok],
                "d_acc": [r["final"]["acc"] - plain[r["seed"]]["acc"] for r in ok if r["seed"] in plain],
                "d_loss": [r["final"]["loss"] - plain[r["seed"]]["loss"] for r in ok if r["seed"] in plain],
                "decay_at_end": [r["decay_at_end"] for r in ok if "decay_at_end" in r],
                "raw_acc": [r["raw"]["acc"] for r in ok if "raw" in r],
                "raw_diff": [r["raw_vs_plain_max_diff"] for r in ok if "raw_vs_plain_max_diff" in r],
                "errors": sorted({r["error"] for r in runs if "error" in r}),
            }
    return out


def render(results: dict[str, Any]) -> str:
    s = results["settings"]
    summary = summarise(results)
    lines = [
        "## Weight averaging: test quality vs the last iterate",
        "",
        f"{len(s['seeds'])} seeds (each seed sets the initialisation, the data split and the shuffle; all "
        "variants of a seed share them). "
        f"{s['optimizer']} {s['lr']}, batch {s['batch']}, no LR decay, epochs: "
        + ", ".join(f"{t} {e}" for t, e in s["epochs"].items())
        + f". SWA averages one snapshot per epoch from {s['swa_start']:.0%} of training (ours: `SWA(start=0.75)`, "
        "BatchNorm recomputed with one pass over the training data; Lightning: "
        f"`StochasticWeightAveraging(swa_lrs={s['lr']}, swa_epoch_start=0.75, annealing_epochs=1)`, i.e. the LR "
        "stays constant). EMA updates after every optimizer step; ours has the timm warm-up "
        "`min(decay, 1 - (1 + t)^(-2/3))`, Lightning's has none. Accuracy in %, mean ± std over seeds; "
        "Δ = paired difference to the plain run of the same seed (mean ± std over seeds); *raw last iterate* = "
        "the same run's training weights tested without the average; *raw weights vs plain run*: those raw "
        "weights compared with the plain run's final weights (identical = the callback did not perturb "
        "training). *EMA decay at the last update*: ours ramps up through its warm-up, so a short run may "
        "never reach the nominal decay.",
    ]
    for task, variants_ in summary.items():
        lines += ["", f"### {task}", ""]
        rows = []
        for name, v in variants_.items():
            if v["errors"] and not v["acc"]:
                rows.append([name, f"**error:** {'; '.join(v['errors'])}", "", "", "", "", "", ""])
                continue
            first = name.startswith("last iterate")
            bitwise = ""
            if v["raw_diff"]:
                worst = max(v["raw_diff"])
                bitwise = "identical" if worst == 0 else f"max diff {worst:.1e}"
            decay = f"{min(v['decay_at_end']):.4f}" if v["decay_at_end"] else ""
            error = f" (errors: {'; '.join(v['errors'])})" if v["errors"] else ""
            rows.append(
                [
                    name + error,
                    harness.pm(v["acc"]),
                    "—" if first else harness.pm(v["d_acc"]),
                    harness.pm(v["loss"], 1.0, 3),
                    "—" if first else harness.pm(v["d_loss"], 1.0, 3),
                    harness.pm(v["raw_acc"]),
                    bitwise,
                    decay,
                ]
            )
        lines.append(
            harness.markdown_table(
                ["variant", "test acc %", "Δ acc (pp)", "test loss", "Δ loss", "raw last iterate acc %",
                 "raw weights vs plain run", "EMA decay at the last update"],
                rows,
            )
        )
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()
    summary = summarise(results)
    tasks = list(summary)
    metrics = (("d_acc", 100.0, "Δ test accuracy (pp)"), ("d_loss", 1.0, "Δ test loss"))
    fig, axes = plt.subplots(len(tasks), 2, figsize=(10, 3.4 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        names = [n for n, v in summary[task].items() if not n.startswith("last iterate") and v["d_acc"]]
        colors = ["tab:orange" if n.startswith("Lightning") else "tab:blue" for n in names]
        for ax, (key, scale, label) in zip(row, metrics):
            stats = [harness.mean_std([d * scale for d in summary[task][n][key]]) for n in names]
            ax.barh(range(len(names)), [m for m, _ in stats], xerr=[sd for _, sd in stats], color=colors, capsize=3)
            ax.set_yticks(range(len(names)), [n.replace("Lightning ", "L. ") for n in names], fontsize=8)
            ax.invert_yaxis()
            ax.axvline(0, color="k", lw=0.8)
            ax.set_xlabel(f"{label} vs last iterate")
            ax.set_title(task, fontsize=10)
    fig.suptitle("Weight averaging vs the last iterate (blue: lichtenberg, orange: Lightning)", fontsize=10)
    harness.save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    harness.main("averaging_quality", run, render, plot, "Δ accuracy vs last iterate", argv, threads=THREADS,
                 quick="1 seed, 2 epochs of 4 batches, small data", seeds=3,
                 quick_seeds=lambda n: 1 if n == 3 else n)  # --quick: one seed unless --seeds says otherwise


if __name__ == "__main__":
    main()
