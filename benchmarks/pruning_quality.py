"""Test accuracy of pruned models over seeds: gradual vs one-shot magnitude pruning vs Lightning's ModelPruning.

For every seed, each variant trains the same model from the same initialisation on the same
data for the same number of steps (Adam, cosine LR), then is tested; accuracy is compared with
the dense run of the same seed. Pruning targets are GradualPruning's defaults (the weight of
every Linear and Conv layer, first conv and classifier included) for every variant; the
sparsity the tested model really has is counted from its zero weights.

Variants at each sparsity: ``GradualPruning`` with a cubic schedule from 10% to 60% of training
(uniform allocation); the same callback one-shot at 60% of training, then fine-tuned; and
Lightning's ``ModelPruning`` (l1_unstructured, per layer, lottery ticket off) following the same
cubic ramp at epoch ends. At the highest sparsity the layer allocations are compared.

Settings were fixed before the first full run and are printed with the results.

Added after the first full run (which missed the target: -1.23 pp on digits, -6.58 pp on
MNIST-1D), declared here before they were run over seeds, identical for every seed and
reported whatever they give. The first run tested the claim outside the conditions its
sources state: Zhu & Gupta (2017) prune large, over-parameterised models, and the
MNIST-1D ``MLP(40 -> 256 -> 256 -> 10)`` is not one (it ends its 30 epochs below 90% train
accuracy, dense); and uniform allocation prunes the first layer (40 inputs, or 9 weights per
first-conv filter) and the classifier to 90% as well, which common practice avoids (keep
them dense, or a layer-adaptive allocation such as LAMP, Lee et al. 2021). Two additions:

- ``gradual 90% lamp`` on every task: the same gradual run with ``allocation="lamp"``, still
  90% of all target weights (the 95% allocation rows are unchanged);
- a third task, *MNIST-1D wide MLP*: ``MLP(40 -> 1024 -> 1024 -> 10)`` on the same data and
  settings, with dense and the 90% variants only (gradual, one-shot, ModelPruning, gradual LAMP).

Train accuracy (of the tested model, on its training split) is reported beside test
accuracy: it shows whether a model has capacity to spare.

OpenMP threads wait passively (``OMP_WAIT_POLICY=PASSIVE`` unless set): on a shared machine
spinning threads slowed the fits many times over; the policy changes no number, only the time.

Run from the repository root: ``python -m benchmarks.pruning_quality [--seeds 3] [--quick]``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Before torch loads OpenMP. On a shared 2-core machine, spinning OpenMP threads made these small
# fits 7-25x slower whenever another process was busy (a 10-epoch MLP fit: 28-42 s spinning, 4.0 s
# passive, same accuracy). The wait policy changes no result, only the wall time.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelPruning

from benchmarks import harness
from lichtenberg.callbacks import GradualPruning
from lichtenberg.cli.data import DigitsDataModule, MNIST1DDataModule
from lichtenberg.cli.models import MLP, SmallCNN
from lichtenberg.core.schedules import SparsitySchedule
from lichtenberg.core.targets import Targets, select_targets

__all__ = ["TASKS", "digits_task", "evaluate_sparse", "main", "mnist1d_task", "run", "sparsity_of", "train_accuracy"]

THREADS = 2
LR, BATCH, EPOCHS = 1e-3, 64, 30  # Adam, cosine annealing to 0 over the run
START, END, EVERY = 0.1, 0.6, 10  # pruning ramp (fractions of training) and steps between events
SPARSITIES = (0.5, 0.8, 0.9, 0.95)
ALLOCATIONS = ("global", "global_floor", "lamp", "erk")  # compared with uniform at max(SPARSITIES)
TARGET = 0.9  # the claim: gradual magnitude at 90% within 1 point of dense
# Added after the first full run (see the module docstring):
TARGET_ALLOCATION = "lamp"  # `gradual 90% lamp` on every task
WIDE_HIDDEN = [1024, 1024]  # the over-parameterised MNIST-1D task; it runs the TARGET variants only


def digits_task(seed: int, quick: bool) -> tuple[L.LightningModule, L.LightningDataModule]:
    """``SmallCNN(channels=32)`` on digits, Adam with the cosine LR (``qat_quality`` trains the same)."""
    return SmallCNN(channels=32, lr=LR, optimizer="adam", scheduler="cosine"), DigitsDataModule(batch_size=BATCH, seed=seed)


def mnist1d_task(seed: int, quick: bool) -> tuple[L.LightningModule, L.LightningDataModule]:
    """``MLP(40 -> 256 -> 256 -> 10)`` on MNIST-1D, Adam with the cosine LR (``qat_quality`` trains the same)."""
    model = MLP(in_features=40, hidden=[256, 256], lr=LR, optimizer="adam", scheduler="cosine")
    # --quick: 600 samples, 6 batches of training data (qat_quality's 1-epoch smoke run starts QAT at step 1)
    return model, MNIST1DDataModule(num_samples=600 if quick else 4000, batch_size=BATCH, seed=seed)


def _mnist1d_wide(seed: int, quick: bool) -> tuple[L.LightningModule, L.LightningDataModule]:
    model = MLP(in_features=40, hidden=WIDE_HIDDEN, lr=LR, optimizer="adam", scheduler="cosine")
    return model, MNIST1DDataModule(num_samples=600 if quick else 4000, batch_size=BATCH, seed=seed)


TASKS: dict[str, Callable] = {"digits SmallCNN": digits_task, "MNIST-1D MLP": mnist1d_task,
                              "MNIST-1D wide MLP": _mnist1d_wide}
ADDED_TASKS = ("MNIST-1D wide MLP",)  # added after the first full run


def _model_pruning(model: L.LightningModule, sparsity: float, epochs: int) -> ModelPruning:
    """Lightning's pruning on the same cubic ramp, one event per epoch end (amount = share of what remains)."""
    sched = SparsitySchedule(kind="cubic", start=START, end=END, every_n_steps=1)
    first, last = sched.resolve(epochs)

    def amount(epoch: int) -> float:  # called at the end of epoch `epoch`, i.e. after epoch + 1 epochs
        now, before = (sched.value(k, sparsity, first, last) for k in (epoch + 1, epoch))
        return (now - before) / (1.0 - before) if now > before else 0.0

    modules = select_targets(model, Targets()).modules.values()
    return ModelPruning(
        "l1_unstructured", parameters_to_prune=[(m, "weight") for m in modules], amount=amount,
        use_lottery_ticket_hypothesis=False, use_global_unstructured=False, verbose=0,
    )


def variants(quick: bool, task: str = "") -> dict[str, tuple[float, Callable]]:
    """name -> (sparsity, make(model, epochs) -> callbacks); built fresh for every fit."""
    gradual = SparsitySchedule(kind="cubic", start=START, end=END, every_n_steps=EVERY)
    one_shot = SparsitySchedule(kind="one_shot", start=END)
    added = task in ADDED_TASKS
    out: dict[str, tuple[float, Callable]] = {"dense": (0.0, lambda m, e: [])}
    for s in (TARGET,) if added else SPARSITIES[-1:] if quick else SPARSITIES:
        out[f"gradual {s:.0%}"] = (s, lambda m, e, s=s: [GradualPruning(s, gradual, allocation="uniform")])
        out[f"one-shot {s:.0%}"] = (s, lambda m, e, s=s: [GradualPruning(s, one_shot, allocation="uniform")])
        out[f"Lightning ModelPruning {s:.0%}"] = (s, lambda m, e, s=s: [_model_pruning(m, s, e)])
    if not added:
        s = SPARSITIES[-1]
        for a in ALLOCATIONS[:1] if quick else ALLOCATIONS:
            out[f"gradual {s:.0%} {a}"] = (s, lambda m, e, a=a, s=s: [GradualPruning(s, gradual, allocation=a)])
    # added after the first full run: the target sparsity with a layer-adaptive allocation
    out[f"gradual {TARGET:.0%} {TARGET_ALLOCATION}"] = (
        TARGET, lambda m, e: [GradualPruning(TARGET, gradual, allocation=TARGET_ALLOCATION)])
    return out


def sparsity_of(model: L.LightningModule) -> tuple[float, dict[str, float]]:
    """Share of exact zeros over the target weights, overall and per layer (what the tested model holds)."""
    params = select_targets(model, Targets()).params
    per = {n: float((p == 0).sum()) / p.numel() for n, p in params.items()}
    total = sum(float((p == 0).sum()) for p in params.values()) / sum(p.numel() for p in params.values())
    return total, per


@torch.no_grad()
def train_accuracy(model: L.LightningModule, dm: L.LightningDataModule, chunk: int = 512) -> float:
    """Accuracy of the tested model (eval mode) on the training split it was fitted on, ``chunk`` samples a forward."""
    model.eval()
    x, y = dm.train_set.tensors
    return float(sum((model(xb).argmax(-1) == yb).sum() for xb, yb in zip(x.split(chunk), y.split(chunk)))) / len(y)


def evaluate_sparse(model: L.LightningModule, dm: L.LightningDataModule, chunk: int = 512) -> dict[str, Any]:
    """Test accuracy and loss, train accuracy and sparsity (overall and per layer) of what the module holds."""
    out: dict[str, Any] = harness.evaluate(model, dm)
    total, per = sparsity_of(model)
    return {**out, "train_acc": train_accuracy(model, dm, chunk), "sparsity": total, "layers": per}


def fit_and_test(task: str, seed: int, make: Callable, epochs: int, quick: bool) -> dict[str, Any]:
    L.seed_everything(seed, verbose=False)
    model, dm = TASKS[task](seed, quick)
    callbacks = make(model, epochs)
    try:
        trainer, fit_s = harness.fit(model, dm, callbacks, max_epochs=epochs)
    except Exception as exc:  # a crash is a result
        return harness.crash_record(exc)
    out = {"fit_s": fit_s, "steps": trainer.global_step, **evaluate_sparse(model, dm)}
    for cb in callbacks:
        if isinstance(cb, GradualPruning):
            out["mask_sparsity"] = cb.engine.sparsity_report()[1]
            out["events"] = cb._events
    return out


def run(seeds: int, quick: bool) -> dict[str, Any]:
    epochs = 2 if quick else EPOCHS
    results: dict[str, Any] = {
        "settings": dict(seeds=list(range(seeds)), optimizer="Adam, cosine LR to 0", lr=LR, batch=BATCH, epochs=epochs,
                         ramp=[START, END], every_n_steps=EVERY, sparsities=list(SPARSITIES), target=TARGET,
                         target_allocation=TARGET_ALLOCATION, wide_hidden=WIDE_HIDDEN, added_tasks=list(ADDED_TASKS)),
        "tasks": {},
    }
    for task in TASKS:
        runs: dict[str, list[dict]] = {}
        t0 = time.perf_counter()
        for seed in range(seeds):
            for name, (target, make) in variants(quick, task).items():
                r = fit_and_test(task, seed, make, epochs, quick)
                runs.setdefault(name, []).append({"seed": seed, "target": target, **r})
                status = r.get("error") or f"acc {r['acc']:.4f}, sparsity {r['sparsity']:.4f}, {r['fit_s']:.1f} s"
                print(f"[pruning_quality] {task} | seed {seed} | {name}: {status}", flush=True)
        results["tasks"][task] = {"runs": runs, "seconds": time.perf_counter() - t0}
    return results


def summarise(task: dict[str, Any]) -> dict[str, dict[str, Any]]:
    dense = {r["seed"]: r["acc"] for r in task["runs"]["dense"] if "acc" in r}
    out = {}
    for name, runs in task["runs"].items():
        ok = [r for r in runs if "acc" in r]
        out[name] = {
            "target": runs[0]["target"],
            "acc": [r["acc"] for r in ok],
            "train_acc": [r["train_acc"] for r in ok],
            "d_acc": [r["acc"] - dense[r["seed"]] for r in ok if r["seed"] in dense],
            "sparsity": [r["sparsity"] for r in ok],
            "max_layer": [max(r["layers"].values()) for r in ok],
            "first_layer": [next(iter(r["layers"].values())) for r in ok],
            "errors": sorted({r["error"] for r in runs if "error" in r}),
        }
    return out


def _target_line(summ: dict[str, dict[str, Any]], name: str, what: str) -> list[str]:
    g = summ.get(name)
    if not g or not g["d_acc"]:
        return []
    m, sd = harness.mean_std([d * 100 for d in g["d_acc"]])
    ok = "holds" if m >= -1.0 else "does **not** hold"
    return ["", f"Target *gradual magnitude at {TARGET:.0%} within 1 point of dense*{what}: Δ = {m:+.2f} ± {sd:.2f} pp, {ok}."]


def render(results: dict[str, Any]) -> str:
    s = results["settings"]
    top = f"{s['sparsities'][-1]:.0%}"
    tgt = f"{s.get('target', TARGET):.0%}"
    alloc = s.get("target_allocation", TARGET_ALLOCATION)
    wide = s.get("wide_hidden", WIDE_HIDDEN)
    lines = [
        "## Pruning: test accuracy vs sparsity",
        "",
        f"{len(s['seeds'])} seeds (each sets the initialisation, the split and the shuffle, shared by all variants of "
        f"the seed). {s['optimizer']}, lr {s['lr']}, batch {s['batch']}, {s['epochs']} epochs; digits: `SmallCNN(channels=32)` "
        "on `DigitsDataModule` (1,257 train / 270 test); MNIST-1D: `MLP(in_features=40, hidden=[256, 256])` on "
        "`MNIST1DDataModule(num_samples=4000)` (2,560 train / 800 test); MNIST-1D wide: "
        f"`MLP(in_features=40, hidden={wide})` on the same data. Targets (all variants): the weight of every "
        "Linear/Conv layer, first conv (1 input channel, 9 weights per filter) and classifier included; biases and "
        f"BatchNorm stay dense. *gradual*: `GradualPruning(s, SparsitySchedule(\"cubic\", start={s['ramp'][0]}, "
        f"end={s['ramp'][1]}, every_n_steps={s['every_n_steps']}), score=\"magnitude\", allocation=\"uniform\")`; "
        f"*one-shot*: the same callback with `kind=\"one_shot\", start={s['ramp'][1]}`, then fine-tuned for the rest "
        "of the run; *Lightning ModelPruning*: `ModelPruning(\"l1_unstructured\", parameters_to_prune=<same layers>, "
        "use_lottery_ticket_hypothesis=False, use_global_unstructured=False)` with a callable `amount` that follows the same cubic ramp at epoch "
        "ends (per layer). Accuracy in %, mean ± std over seeds; *train acc*: the tested model on its own training "
        "split; Δ = paired difference in test accuracy to the dense run of the same "
        "seed (pp); *sparsity* = share of exact zeros over the target weights of the tested model (mean over seeds); "
        "*first layer*: sparsity of the first layer's weight (mean over seeds); *sparsest layer*: the highest "
        "per-layer sparsity over layers and seeds (100% = a layer pruned away entirely).",
        "",
        f"**Added after the first full run** (2026-11-22: −1.23 pp on digits, −6.58 pp on MNIST-1D, target missed on "
        "both), declared before running them over seeds, the same for every seed, and reported whatever they gave: "
        f"(1) `gradual {tgt} {alloc}`, the gradual run with `allocation=\"{alloc}\"` (Lee et al., 2021), on every "
        f"task, still {tgt} of all target weights; (2) the task *MNIST-1D wide MLP* ({wide} hidden), with dense and "
        f"the {tgt} variants only. Why: the first run tested the claim outside the conditions its sources state. Zhu & "
        "Gupta (2017) prune large, over-parameterised models, and the 256-wide MLP is not one (the dense model does "
        "not fit its training split: see *train acc*); and uniform allocation also prunes the first layer (40 inputs; "
        "9 weights per first-conv filter) and the classifier to the full sparsity, which common practice avoids by "
        "keeping them dense or by a layer-adaptive allocation such as LAMP (used here, since keeping the first layer "
        "and classifier dense cannot reach 90% overall on the 256-wide MLP: they hold 16% of its weights).",
    ]
    for task, t in results["tasks"].items():
        summ = summarise(t)
        added = task in s.get("added_tasks", ADDED_TASKS)
        lines += ["", f"### {task}" + (" (added after the first full run)" if added else ""), ""]
        rows = []
        for name, v in summ.items():
            if not v["acc"]:
                rows.append([name, f"**error:** {'; '.join(v['errors'])}", "", "", "", "", ""])
                continue
            err = f" (errors: {'; '.join(v['errors'])})" if v["errors"] else ""
            dense = name == "dense"
            rows.append([
                name + err, harness.pm(v["acc"]), harness.pm(v["train_acc"]) if v.get("train_acc") else "—",
                "—" if dense else harness.pm(v["d_acc"]),
                "—" if dense else f"{harness.mean_std(v['sparsity'])[0]:.2%}",
                "—" if dense else f"{harness.mean_std(v['first_layer'])[0]:.1%}",
                "—" if dense else f"{max(v['max_layer']):.1%}",
            ])
        lines.append(harness.markdown_table(
            ["variant", "test acc %", "train acc %", "Δ vs dense (pp)", "sparsity", "first layer sparsity",
             "sparsest layer"], rows))
        lines += _target_line(summ, f"gradual {tgt}", " (uniform allocation, as first declared)")
        lines += _target_line(summ, f"gradual {tgt} {alloc}", f" with `allocation=\"{alloc}\"` (added after the first run)")
    lines += ["", f"A target *holds* when the mean Δ over seeds is ≥ −1.00 pp. Rows `gradual {top} <allocation>` compare "
              f"layer allocations at {top} (`gradual {top}` is uniform)."]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()
    tasks = results["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.6), squeeze=False)
    for ax, (task, t) in zip(axes[0], tasks.items()):
        summ = summarise(t)
        dm, dsd = harness.mean_std([a * 100 for a in summ["dense"]["acc"]])
        ax.axhspan(dm - dsd, dm + dsd, color="gray", alpha=0.25)
        ax.axhline(dm, color="gray", lw=1, label="dense")
        ax.axhline(dm - 1, color="gray", lw=0.8, ls=":", label="dense − 1 pp")
        series = (("gradual", "tab:blue", "%"), ("one-shot", "tab:green", "%"),
                  ("Lightning ModelPruning", "tab:orange", "%"), ("gradual", "tab:purple", " lamp"))
        for prefix, color, suffix in series:
            rows = [(v["target"] * 100, *harness.mean_std([a * 100 for a in v["acc"]])) for n, v in summ.items()
                    if n.startswith(prefix + " ") and n.endswith(suffix) and n.count(" ") == prefix.count(" ") + suffix.count(" ") + 1
                    and v["acc"]]
            if rows:
                x, y, e = zip(*sorted(rows))
                ax.errorbar(x, y, yerr=e, marker="o" if suffix == "%" else "*", capsize=3, color=color,
                            label=prefix + (", LAMP" if suffix != "%" else ""))
        ax.set_xlim(45, 98)  # the same axis for every task (the added task has 90% only)
        ax.set_xlabel("sparsity of the Linear/Conv weights (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(task, fontsize=10)
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle("Magnitude pruning: accuracy vs sparsity (mean ± std over seeds)", fontsize=10)
    harness.save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    harness.main("pruning_quality", run, render, plot, "accuracy vs sparsity", argv, threads=THREADS,
                 quick="1 seed, 2 epochs of 4 batches, few variants", seeds=3,
                 quick_seeds=lambda n: 1 if n == 3 else n)  # --quick: one seed unless --seeds says otherwise


if __name__ == "__main__":
    main()
