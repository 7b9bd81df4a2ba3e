"""Robustness of per-sample loss reweighting: test accuracy under label noise and near-duplicates, over seeds.

For every seed, each reweighting rule trains the same model from the same initialisation on
the same corrupted training set for the same number of steps, then is tested on the CLEAN
test split; accuracy is compared with the uniform (plain mean) run of the same seed.

Two corruptions, run separately on both tasks:
- *label noise 30%*: 30% of the training labels replaced by a different, uniformly drawn class
  (symmetric noise);
- *near-duplicates 50%*: 50% of the training samples appended again as near-copies (each copy
  jittered by Gaussian noise of 5% of the inputs' std), so a third of the enlarged set are copies.

``DigitsDataModule`` has both knobs (``label_noise``; ``duplicate_fraction`` appends EXACT
copies, so the benchmark adds the jitter to the rows its ``duplicate_mask`` flags).
``MNIST1DDataModule`` has neither: ``CorruptedMNIST1D`` below applies the same scheme (the same
seeded draws as ``DigitsDataModule``) to its training split. Val/test stay clean.

Rules: ``uniform`` (the baseline: no callback, the plain mean), and ``SampleReweighting`` with
``linupper``, ``quadratic``, ``extremes``, ``softmax`` (KL-regularised DRO), ``softmin`` and
``focal``. Temperature 1.0 (the paper's) and gamma 2 for focal; the paper's warm-up of 1000
uniform steps is scaled to 10% of our much shorter runs.

Settings were fixed before the first full run and are printed with the results.

Run from the repository root: ``python -m benchmarks.reweighting_quality [--seeds 3] [--quick]``.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning as L
import numpy as np
import torch
from torch.utils.data import TensorDataset

from benchmarks import harness
from lichtenberg.callbacks import SampleReweighting
from lichtenberg.cli.data import DigitsDataModule, MNIST1DDataModule
from lichtenberg.cli.models import MLP, SmallCNN

__all__ = ["CorruptedMNIST1D", "NearDuplicateDigits", "RULES", "SETTINGS", "TASKS", "main", "run"]

# One torch thread, not the protocol's two: this benchmark times nothing, and on the shared 2-core machine a
# second OpenMP thread made each fit up to 40x slower whenever another process was running (its threads spin
# at every barrier while the other one is descheduled). Accuracy does not depend on it.
THREADS = 1
LR, MOMENTUM, BATCH, EPOCHS = 0.05, 0.9, 32, 30  # SGD, cosine LR to 0 over the run
TEMPERATURE = 1.0  # the paper's r
GAMMA = 2.0  # focal
WARMUP_SHARE = 0.1  # uniform weights for the first 10% of the optimizer steps (the paper: 1000 steps)
LABEL_NOISE = 0.3
DUPLICATES = 0.5
JITTER = 0.05  # near-duplicate noise, as a share of the training inputs' std
MNIST1D_SAMPLES = 4000  # 2,560 train / 800 test
QUICK_BATCHES = 10  # --quick: batches per epoch, so the 10% warm-up is one step and ends inside the run
RULES = ("uniform", "linupper", "quadratic", "extremes", "softmax", "softmin", "focal")
CLEAR_PP = 0.5  # a rule "helps" / "hurts" when every seed's Δ has the same sign and |mean Δ| >= this


def _corrupt(x: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int, label_noise: float,
             duplicate_fraction: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """DigitsDataModule's corruption, draw for draw: flip labels, then append exact copies."""
    n = len(y)
    y = y.clone()
    noise_rng = np.random.default_rng([seed, 1])
    flip = torch.from_numpy(noise_rng.choice(n, size=round(label_noise * n), replace=False))
    shift = torch.from_numpy(noise_rng.integers(1, num_classes, size=len(flip)))
    y[flip] = (y[flip] + shift) % num_classes  # uniformly among the OTHER classes
    noisy = torch.zeros(n, dtype=torch.bool)
    noisy[flip] = True
    dup_rng = np.random.default_rng([seed, 2])
    dup = torch.from_numpy(dup_rng.choice(n, size=round(duplicate_fraction * n), replace=False))
    return (torch.cat([x, x[dup]]), torch.cat([y, y[dup]]), torch.cat([noisy, noisy[dup]]),
            torch.arange(n + len(dup)) >= n)


def _jitter_(x: torch.Tensor, rows: torch.Tensor, jitter: float, seed: int, lo: float | None = None,
             hi: float | None = None) -> None:
    """Turn the flagged exact copies into near-copies: add N(0, (jitter * std(x))^2) noise in place."""
    if jitter <= 0 or not bool(rows.any()):
        return
    g = torch.Generator().manual_seed(seed * 1009 + 3)
    noise = torch.randn(x[rows].shape, generator=g) * (jitter * float(x.std()))
    z = x[rows] + noise
    x[rows] = z.clamp(lo, hi) if lo is not None else z


class NearDuplicateDigits(DigitsDataModule):
    """``DigitsDataModule`` whose appended copies are jittered into near-copies (pixels stay in [0, 1])."""

    def __init__(self, jitter: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.jitter = jitter

    def _build(self) -> None:
        super()._build()
        x, y = self.train_set.tensors
        x = x.clone()
        _jitter_(x, self.duplicate_mask, self.jitter, self.seed, 0.0, 1.0)
        self.train_set = TensorDataset(x, y)


class CorruptedMNIST1D(MNIST1DDataModule):
    """``MNIST1DDataModule`` with DigitsDataModule's ``label_noise`` / ``duplicate_fraction`` on the train split
    (the same seeded draws), plus ``jitter`` on the copies; ``noisy_mask`` / ``duplicate_mask`` after setup."""

    def __init__(self, label_noise: float = 0.0, duplicate_fraction: float = 0.0, jitter: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.label_noise, self.duplicate_fraction, self.jitter = label_noise, duplicate_fraction, jitter
        self.noisy_mask: torch.Tensor | None = None
        self.duplicate_mask: torch.Tensor | None = None

    def _build(self) -> None:
        super()._build()
        x, y = self.train_set.tensors
        x, y, self.noisy_mask, self.duplicate_mask = _corrupt(x, y, self.num_classes, self.seed, self.label_noise,
                                                              self.duplicate_fraction)
        _jitter_(x, self.duplicate_mask, self.jitter, self.seed)
        self.train_set = TensorDataset(x, y)


# setting -> (label_noise, duplicate_fraction, jitter)
SETTINGS: dict[str, tuple[float, float, float]] = {
    "clean": (0.0, 0.0, 0.0),  # reference: uniform only
    f"label noise {LABEL_NOISE:.0%}": (LABEL_NOISE, 0.0, 0.0),
    f"near-duplicates {DUPLICATES:.0%}": (0.0, DUPLICATES, JITTER),
}


def _digits(seed: int, quick: bool, noise: float, dup: float, jitter: float):
    model = SmallCNN(channels=32, lr=LR, optimizer="sgd", momentum=MOMENTUM, scheduler="cosine")
    return model, NearDuplicateDigits(batch_size=BATCH, seed=seed, label_noise=noise, duplicate_fraction=dup,
                                      jitter=jitter)


def _mnist1d(seed: int, quick: bool, noise: float, dup: float, jitter: float):
    model = MLP(in_features=40, hidden=[256, 256], lr=LR, optimizer="sgd", momentum=MOMENTUM, scheduler="cosine")
    return model, CorruptedMNIST1D(num_samples=400 if quick else MNIST1D_SAMPLES, batch_size=BATCH, seed=seed,
                                   label_noise=noise, duplicate_fraction=dup, jitter=jitter)


TASKS: dict[str, Callable] = {"digits SmallCNN": _digits, "MNIST-1D MLP": _mnist1d}


def make_callbacks(rule: str, warmup_steps: int) -> list:
    if rule == "uniform":
        return []  # the plain mean: the demo models' weighted_loss without any callback
    return [SampleReweighting(rule=rule, temperature=TEMPERATURE, warmup_steps=warmup_steps, gamma=GAMMA)]


@torch.no_grad()
def _train_fit(model: L.LightningModule, dm: L.LightningDataModule) -> dict[str, float]:
    """The tested model (eval mode) on its own training split: accuracy on the given labels and, for the
    flipped samples, the share predicted as their WRONG given label (memorised noise)."""
    model.eval()
    x, y = dm.train_set.tensors
    pred = torch.cat([model(xb).argmax(-1) for xb in x.split(512)])
    out = {"train_acc": float((pred == y).float().mean())}
    noisy = getattr(dm, "noisy_mask", None)
    if noisy is not None and bool(noisy.any()):
        out["noisy_memorised"] = float((pred[noisy] == y[noisy]).float().mean())
        out["clean_train_acc"] = float((pred[~noisy] == y[~noisy]).float().mean())
    return out


def fit_and_test(task: str, setting: str, rule: str, seed: int, epochs: int, quick: bool) -> dict[str, Any]:
    L.seed_everything(seed, verbose=False)
    model, dm = TASKS[task](seed, quick, *SETTINGS[setting])
    dm.setup("fit")
    steps = math.ceil(len(dm.train_set) / BATCH) * epochs
    if quick:
        steps = min(steps, QUICK_BATCHES * epochs)
    warmup = round(WARMUP_SHARE * steps)
    callbacks = make_callbacks(rule, warmup)
    limits = {"limit_train_batches": QUICK_BATCHES} if quick else {}
    try:
        trainer, fit_s = harness.fit(model, dm, callbacks, max_epochs=epochs, **limits)
    except Exception as exc:  # a crash is a result
        return harness.crash_record(exc)
    out = {"fit_s": fit_s, "steps": trainer.global_step, "warmup_steps": warmup,
           "n_train": len(dm.train_set), **harness.evaluate(model, dm), **_train_fit(model, dm)}  # clean test labels
    ess = trainer.callback_metrics.get("reweight/ess")
    if isinstance(ess, torch.Tensor):
        out["last_ess"] = float(ess)
    return out


def run(seeds: int, quick: bool) -> dict[str, Any]:
    epochs = 1 if quick else EPOCHS
    rules = ("uniform", "linupper", "softmin") if quick else RULES
    results: dict[str, Any] = {
        "settings": dict(seeds=list(range(seeds)), threads=THREADS, optimizer=f"SGD momentum {MOMENTUM}, cosine LR to 0 (per step)",
                         lr=LR, batch=BATCH, epochs=epochs, temperature=TEMPERATURE, gamma=GAMMA,
                         warmup_share=WARMUP_SHARE, label_noise=LABEL_NOISE, duplicates=DUPLICATES, jitter=JITTER,
                         mnist1d_samples=MNIST1D_SAMPLES, rules=list(rules), clear_pp=CLEAR_PP),
        "tasks": {},
    }
    for task in TASKS:
        results["tasks"][task] = {}
        for setting in SETTINGS:
            runs: dict[str, list[dict]] = {}
            t0 = time.perf_counter()
            for seed in range(seeds):
                for rule in ("uniform",) if setting == "clean" else rules:
                    r = fit_and_test(task, setting, rule, seed, epochs, quick)
                    runs.setdefault(rule, []).append({"seed": seed, **r})
                    status = r.get("error") or f"test acc {r['acc']:.4f}, train acc {r['train_acc']:.4f}, {r['fit_s']:.1f} s"
                    print(f"[reweighting_quality] {task} | {setting} | seed {seed} | {rule}: {status}", flush=True)
            results["tasks"][task][setting] = {"runs": runs, "seconds": time.perf_counter() - t0}
    return results


def summarise(setting: dict[str, Any]) -> dict[str, dict[str, Any]]:
    base = {r["seed"]: r["acc"] for r in setting["runs"]["uniform"] if "acc" in r}
    out = {}
    for rule, runs in setting["runs"].items():
        ok = [r for r in runs if "acc" in r]
        d = [r["acc"] - base[r["seed"]] for r in ok if r["seed"] in base]
        out[rule] = {
            "acc": [r["acc"] for r in ok],
            "loss": [r["loss"] for r in ok],
            "train_acc": [r["train_acc"] for r in ok],
            "noisy_memorised": [r["noisy_memorised"] for r in ok if "noisy_memorised" in r],
            "last_ess": [r["last_ess"] for r in ok if "last_ess" in r],
            "d_acc": d,
            "verdict": verdict(d) if rule != "uniform" else "baseline",
            "errors": sorted({r["error"] for r in runs if "error" in r}),
        }
    return out


def verdict(deltas: list[float]) -> str:
    """'helps' / 'hurts' when every seed's paired Δ has the same sign and |mean| >= CLEAR_PP points."""
    if not deltas:
        return "n/a"
    m = 100 * sum(deltas) / len(deltas)
    if all(d > 0 for d in deltas) and m >= CLEAR_PP:
        return "helps"
    if all(d < 0 for d in deltas) and m <= -CLEAR_PP:
        return "hurts"
    return "no clear effect"


def _warmup_example(results: dict[str, Any]) -> str:
    for task, settings in results["tasks"].items():
        for setting, t in settings.items():
            r = next((r for runs in t["runs"].values() for r in runs if "steps" in r), None)
            if r:
                return f"e.g. {r['warmup_steps']:,} of {r['steps']:,} on {task}, {setting}"
    return "no run finished"


def render(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        "## Sample reweighting: robustness to label noise and near-duplicates",
        "",
        f"{len(s['seeds'])} seeds (each sets the initialisation, the split, the corruption and the shuffle, shared "
        f"by all rules of the seed); {s.get('threads', THREADS)} torch thread (this benchmark times nothing; on the "
        "shared 2-core machine a second OpenMP thread made fits up to 40× slower whenever another process ran). "
        f"{s['optimizer']}, lr {s['lr']}, batch {s['batch']}, {s['epochs']} epochs. "
        "digits: `SmallCNN(channels=32)` on `DigitsDataModule` (1,257 clean train / 270 test images); MNIST-1D: "
        f"`MLP(in_features=40, hidden=[256, 256])` on `MNIST1DDataModule(num_samples={s['mnist1d_samples']})` "
        "(2,560 clean train / 800 test). Corruptions (train split only; tests use the CLEAN test labels): "
        f"*label noise {s['label_noise']:.0%}*: that share of train labels replaced by a uniformly drawn *other* "
        f"class; *near-duplicates {s['duplicates']:.0%}*: that share of the train samples appended again (the "
        f"enlarged set is 1/3 copies), each copy jittered by Gaussian noise of {s['jitter']:.0%} of the inputs' std "
        "(`DigitsDataModule(duplicate_fraction=...)` appends exact copies; the benchmark adds the jitter). "
        "`MNIST1DDataModule` has no corruption knobs: the benchmark applies DigitsDataModule's scheme (the same "
        "seeded draws) to its train split, so both tasks get both settings. "
        f"Rules: `SampleReweighting(rule, temperature={s['temperature']}, warmup_steps=…, gamma={s['gamma']})`; "
        f"the paper's warm-up of 1000 uniform steps is scaled to {s['warmup_share']:.0%} of each run's optimizer "
        f"steps ({_warmup_example(results)}); *uniform* is the plain mean (no callback). Accuracy in %, "
        "mean ± std over seeds; Δ = paired difference to the uniform run of the same seed (pp); *seeds Δ > 0*: "
        "on how many seeds the rule beat uniform; *verdict*: **helps** / **hurts** when all seeds' Δ share the sign "
        f"and |mean Δ| ≥ {s['clear_pp']} pp, else *no clear effect* (declared before the run); *noisy labels "
        "memorised*: share of the flipped train samples the final model predicts as their wrong given label; "
        "*last ESS*: Kish effective sample size of the last batch's weights, as a share of the batch.",
    ]
    findings = []
    for task, settings in results["tasks"].items():
        clean = summarise(settings["clean"])["uniform"] if "clean" in settings else None
        for setting, t in settings.items():
            if setting == "clean":
                continue
            summ = summarise(t)
            lines += ["", f"### {task}, {setting}", ""]
            rows = []
            if clean and clean["acc"]:
                rows.append(["uniform on clean data (reference)", harness.pm(clean["acc"]), "—", "—", "—",
                             harness.pm(clean["train_acc"]), "—", "—"])
            for rule, v in summ.items():
                if not v["acc"]:
                    rows.append([rule, f"**error:** {'; '.join(v['errors'])}", "", "", "", "", "", ""])
                    continue
                err = f" (errors: {'; '.join(v['errors'])})" if v["errors"] else ""
                base = rule == "uniform"
                rows.append([
                    ("uniform (baseline)" if base else rule) + err,
                    harness.pm(v["acc"]),
                    "—" if base else harness.pm(v["d_acc"]),
                    "—" if base else f"{sum(d > 0 for d in v['d_acc'])}/{len(v['d_acc'])}",
                    "—" if base else (f"**{v['verdict']}**" if v["verdict"] in ("helps", "hurts") else v["verdict"]),
                    harness.pm(v["train_acc"]),
                    harness.pm(v["noisy_memorised"]) if v["noisy_memorised"] else "—",
                    f"{harness.mean_std(v['last_ess'])[0]:.2f}" if v["last_ess"] else "—",
                ])
            lines.append(harness.markdown_table(
                ["rule", "test acc %", "Δ vs uniform (pp)", "seeds Δ > 0", "verdict", "train acc % (given labels)",
                 "noisy labels memorised %", "last ESS"], rows))
            helps = [r for r, v in summ.items() if v["verdict"] == "helps"]
            hurts = [r for r, v in summ.items() if v["verdict"] == "hurts"]
            ranked = sorted((r for r in summ if r != "uniform" and summ[r]["d_acc"]),
                            key=lambda r: -sum(summ[r]["d_acc"]) / len(summ[r]["d_acc"]))
            best = ranked[0] if ranked else None
            best_txt = (f"; largest mean Δ: {best} ({100 * sum(summ[best]['d_acc']) / len(summ[best]['d_acc']):+.2f} pp)"
                        if best else "")
            findings.append(f"- **{task}, {setting}**: helps: {', '.join(helps) or 'none'}; hurts: "
                            f"{', '.join(hurts) or 'none'}{best_txt}.")
    lines += ["", "### Which rule helps where (computed from the tables above)", "", *findings]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()
    panels = [(task, setting, t) for task, ss in results["tasks"].items() for setting, t in ss.items() if setting != "clean"]
    cols = 2
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(10, 3.2 * rows_n), squeeze=False)
    for ax, (task, setting, t) in zip(axes.flat, panels):
        summ = summarise(t)
        names = [r for r in summ if r != "uniform" and summ[r]["d_acc"]]
        stats = [harness.mean_std([d * 100 for d in summ[n]["d_acc"]]) for n in names]
        colors = ["tab:green" if summ[n]["verdict"] == "helps" else "tab:red" if summ[n]["verdict"] == "hurts"
                  else "tab:gray" for n in names]
        ax.barh(range(len(names)), [m for m, _ in stats], xerr=[sd for _, sd in stats], color=colors, capsize=3)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(0, color="k", lw=0.8)
        ax.set_xlabel("Δ test accuracy vs uniform (pp)")
        ax.set_title(f"{task}, {setting}", fontsize=10)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("Loss reweighting vs the plain mean (green: helps, red: hurts, gray: no clear effect)", fontsize=10)
    harness.save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    harness.main("reweighting_quality", run, render, plot, "Δ accuracy of each reweighting rule vs uniform", argv,
                 threads=THREADS, quick="1 seed, 1 epoch of 10 batches, 3 rules, small data", seeds=3, quick_seeds=lambda n: 1)


if __name__ == "__main__":
    main()
