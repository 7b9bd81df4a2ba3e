"""Step-time overhead of SampleReweighting and DataPruning vs the plain mean, inside a real Trainer.fit.

Variants, measured in the same run with interleaved fits (rotating start; rounds during which
other processes used more than ``MAX_FOREIGN`` of the CPUs are re-run):
- ``plain``: the demo model's ``training_step`` with no callback (``weighted_loss`` = ``losses.mean()``);
- ``SampleReweighting``: ``SampleReweighting("linupper", warmup_steps=0)``: weights on every step,
  its three logs on the Trainer's ``log_every_n_steps`` cadence (default 50);
- ``SampleReweighting, no logs``: the same callback with its ``pl_module.log`` calls removed (a
  benchmark-only subclass): what the logging costs;
- ``inline loss_weights (floor)``: no callback; the module computes
  ``(loss_weights(losses, "linupper") * losses).mean()`` itself, the least any per-batch
  loss weighting costs;
- ``DataPruning``: ``DataPruning(ratio=0.5, anneal=0.125)``: time per forwarded batch (its
  pruned epochs have fewer batches; that saving is ``data_pruning``'s subject, not this one's).

Models: the digits ``SmallCNN(channels=32)`` and the MNIST-1D ``MLP(40 -> 256 -> 256 -> 10)``
from ``lichtenberg.cli.models``, Adam, batch 64, in-memory random inputs and labels. A step's
time is the interval between consecutive ``on_train_batch_start`` calls (every hook and the
batch fetch included); intervals that straddle an epoch end (dataloader reload, DataPruning's
plan) are timed separately; each fit reports the median over its steps after a warm-up. The
callbacks' own work (``_weights`` / ``_observe`` / ``_global_index``) is also timed in place.
glibc's allocator is pinned (``harness.pin_allocator``).

Run from the repository root: ``python -m benchmarks.reweighting_overhead`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import gc
import statistics
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
from torch.utils.data import DataLoader, TensorDataset

from benchmarks import harness
from lichtenberg.callbacks import DataPruning, SampleReweighting
from lichtenberg.cli.models import MLP, SmallCNN
from lichtenberg.core.reweighting import effective_sample_size, loss_weights, weight_entropy

__all__ = ["main", "run"]

THREADS = 2
BATCH = 64
RULE = "linupper"
MAX_FOREIGN = 0.1
TARGET = 1.02  # SampleReweighting vs plain
PLAIN, RW, RW_NOLOG, FLOOR, DP = ("plain", "SampleReweighting", "SampleReweighting, no logs",
                                  "inline loss_weights (floor)", "DataPruning")


class QuietReweighting(SampleReweighting):
    """SampleReweighting without its ``pl_module.log`` calls (benchmark only)."""

    def _weights(self, trainer, pl_module, losses, index):
        if trainer.global_step < self.warmup_steps or self.rule == "uniform":
            return None
        self._batches_weighted += 1
        return loss_weights(losses, self.rule, self.temperature)


class _Inline:
    """The floor: per-batch LinUpper weights computed in the module, no callback, no protocol."""

    def training_step(self, batch, batch_idx):
        losses, _ = self._losses_and_logits(batch)
        loss = (loss_weights(losses, RULE) * losses).mean()
        self.log("train_loss", loss, prog_bar=True)
        return loss


class InlineCNN(_Inline, SmallCNN):
    pass


class InlineMLP(_Inline, MLP):
    pass


def model_specs(quick: bool) -> dict[str, dict[str, Any]]:
    return {
        "digits SmallCNN(32)": dict(build=lambda inline: (InlineCNN if inline else SmallCNN)(channels=32, lr=1e-3),
                                    shape=(1, 8, 8)),
        "MNIST-1D MLP 40-256-256-10": dict(
            build=lambda inline: (InlineMLP if inline else MLP)(in_features=40, hidden=[256, 256], lr=1e-3),
            shape=(40,)),
    }


def variants() -> dict[str, Callable[[], Callback | None]]:
    return {
        PLAIN: lambda: None,
        RW: lambda: SampleReweighting(RULE, warmup_steps=0),
        RW_NOLOG: lambda: QuietReweighting(RULE, warmup_steps=0),
        FLOOR: lambda: None,  # the module does it
        DP: lambda: DataPruning(ratio=0.5, anneal=0.125),
    }


class Probe(Callback):
    """Last in the list: stamps every step with its epoch; times the per-sample callback's work in place."""

    def __init__(self, callback: Callback | None) -> None:
        self.stamps: list[tuple[int, float]] = []
        self.work: list[float] = []  # per step: seconds spent in the callback's per-sample methods
        if callback is not None:  # weighted_loss looks these up on the instance: the wrappers are what it calls
            for name in ("_weights", "_observe", "_global_index"):
                setattr(callback, name, self._timed(getattr(callback, name)))

    def _timed(self, fn: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.work[-1] += time.perf_counter() - t0
            return out

        return wrapper

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.stamps.append((trainer.current_epoch, time.perf_counter()))
        self.work.append(0.0)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.stamps.append((-1, time.perf_counter()))  # closes the last step (not timed: train-end work)

    def split(self, warmup: int) -> tuple[list[float], list[float], list[float]]:
        """(within-epoch step times after ``warmup`` steps, intervals that straddle an epoch end, work per step)."""
        within, straddle, work = [], [], []
        for i, ((e0, t0), (e1, t1)) in enumerate(zip(self.stamps, self.stamps[1:])):
            if i < warmup or e1 < 0:
                continue
            if e0 == e1:
                within.append(t1 - t0)
                work.append(self.work[i])
            else:
                straddle.append(t1 - t0)
        return within, straddle, work


def fit_once(spec: dict[str, Any], loader: DataLoader, name: str, epochs: int, warmup: int) -> dict[str, Any]:
    torch.manual_seed(0)
    module = spec["build"](name == FLOOR)
    callback = variants()[name]()
    probe = Probe(callback)
    trainer = harness.trainer(max_epochs=epochs, limit_val_batches=0, num_sanity_val_steps=0,
                              callbacks=([callback] if callback else []) + [probe])
    gc.collect()
    t0 = time.perf_counter()
    trainer.fit(module, loader)
    fit_s = time.perf_counter() - t0
    within, straddle, work = probe.split(warmup)
    return {
        "median_s": statistics.median(within),
        "straddle_s": statistics.median(straddle) if straddle else float("nan"),
        "work_s": statistics.median(work),
        "steps": trainer.global_step,
        "steps_timed": len(within),
        "fit_s": fit_s,
    }


def isolated_costs(repeats: int, n: int = 2000) -> dict[str, float]:
    """Seconds per call outside the Trainer, batch of BATCH losses (median of interleaved bursts)."""
    losses = torch.rand(BATCH) * 3
    w = loss_weights(losses, RULE)

    def burst(fn: Callable[[], Any]) -> Callable[[], float]:
        def call() -> float:
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            return (time.perf_counter() - t0) / n

        return call

    times = harness.interleaved({
        "losses.mean()": burst(lambda: losses.mean()),
        f"loss_weights({RULE!r})": burst(lambda: loss_weights(losses, RULE)),
        "ESS + entropy + max (the logged values)": burst(
            lambda: (effective_sample_size(w), weight_entropy(w), w.max())),
    }, repeats)
    return {k: harness.median(v) for k, v in times.items()}


def run(quick: bool) -> dict[str, Any]:
    epochs, per_epoch, warmup, repeats = (3, 8, 3, 1) if quick else (4, 25, 10, 16)  # 3: DataPruning prunes epoch 1
    pinned = harness.pin_allocator()
    results: dict[str, Any] = {
        "settings": dict(epochs=epochs, batches_per_epoch=per_epoch, warmup=warmup, repeats=repeats, batch=BATCH,
                         rule=RULE, allocator_pinned=pinned, max_foreign=MAX_FOREIGN, target=TARGET),
        "models": {},
    }
    for name, spec in model_specs(quick).items():
        g = torch.Generator().manual_seed(1)
        n = per_epoch * BATCH
        data = TensorDataset(torch.rand(n, *spec["shape"], generator=g), torch.randint(0, 10, (n,), generator=g))
        loader = DataLoader(data, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(2))
        rounds: list[dict] = []
        extras: dict[str, list[dict]] = {}

        def variant(v: str) -> Callable[[], tuple[float, dict]]:
            def call() -> tuple[float, dict]:
                out = fit_once(spec, loader, v, epochs, warmup)
                return out["median_s"], out

            return call

        print(f"[reweighting_overhead] {name}: {epochs} epochs x {per_epoch} batches, {repeats} fits per variant", flush=True)
        t0 = time.perf_counter()
        times = harness.interleaved({v: variant(v) for v in variants()}, repeats,
                                    max_foreign=None if quick else MAX_FOREIGN, log=rounds, extras=extras)
        print(f"[reweighting_overhead]   fits took {time.perf_counter() - t0:.0f} s", flush=True)
        results["models"][name] = {
            "step_s": times,
            "rows": harness.ratio_table(times, PLAIN),
            "straddle_s": {v: [x["straddle_s"] for x in e] for v, e in extras.items()},
            "work_s": {v: [x["work_s"] for x in e] for v, e in extras.items()},
            "steps": {v: e[-1]["steps"] for v, e in extras.items()},
            "rounds": rounds,
        }
    results["isolated_s"] = isolated_costs(3 if quick else 9, 200 if quick else 2000)
    return results


def render(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        "## Sample reweighting and data pruning: overhead per training step",
        "",
        f"Median time per optimizer step inside `Trainer.fit` (CPU, {THREADS} torch threads), Adam, batch {s['batch']}, "
        f"in-memory random inputs and labels. {s['repeats']} interleaved fits per variant, {s['epochs']} epochs of "
        f"{s['batches_per_epoch']} batches each (fewer for DataPruning's pruned epochs), the first {s['warmup']} steps "
        "skipped; a step is the interval between consecutive `on_train_batch_start` calls (every hook and the batch "
        "fetch included), and intervals that straddle an epoch end are left out (see the second table). Ratio = "
        "median of the variant's per-fit medians / that of `plain`; in brackets the min–max of the per-round ratios. "
        f"*SampleReweighting*: `SampleReweighting(\"{s['rule']}\", warmup_steps=0)` (weights every step, logs ESS, "
        "entropy and max weight on the first weighted step and then every `log_every_n_steps` = 50 steps); *no "
        "logs*: the same without its three `pl_module.log` calls (a "
        "benchmark-only subclass); *floor*: no callback, the module computes `(loss_weights(losses, \"linupper\") * "
        "losses).mean()` itself; *DataPruning*: `DataPruning(ratio=0.5, anneal=0.125)`, time per forwarded batch. "
        f"Rounds during which other processes used > {s['max_foreign']:.0%} of the CPUs were re-run"
        + ("; glibc malloc's thresholds pinned (`harness.pin_allocator`)." if s.get("allocator_pinned") else ".")
        + f" Target: SampleReweighting ≤ {s['target']}×.",
        "",
    ]
    names = (RW, RW_NOLOG, FLOOR, DP)
    rows = []
    for model, m in results["models"].items():
        by = {r["variant"]: r for r in m["rows"]}
        p = by[PLAIN]
        cells = [model, f"{p['median'] * 1e3:.2f} [{p['q1'] * 1e3:.2f}–{p['q3'] * 1e3:.2f}]"]
        for v in names:
            r = by[v]
            text = f"{r['ratio']:.3f}× ({r['ratio_min']:.2f}–{r['ratio_max']:.2f})"
            cells.append(f"**{text}**" if v == RW else text)
        cells.append("yes" if by[RW]["ratio"] <= s["target"] else "**no**")
        redone = sum(1 for x in m["rounds"] if not x["kept"])
        flagged = sum(1 for x in m["rounds"] if x["kept"] and x["disturbed"])
        cells.append(f"{redone}" + (f" ({flagged} kept disturbed)" if flagged else ""))
        rows.append(cells)
    lines.append(harness.markdown_table(
        ["model", "plain ms/step [IQR]", RW, RW_NOLOG, FLOOR, "DataPruning (per forwarded batch)",
         f"SampleReweighting ≤ {s['target']}×", "rounds re-run"], rows))
    lines += [
        "",
        "The callbacks' own work per step, timed in place during the same fits (`_weights` + `_observe` + "
        "`_global_index`, called from `weighted_loss`; SampleReweighting's `_weights` includes its logging), and the "
        "interval that straddles an epoch end (the next epoch's dataloader set-up; for DataPruning the reload "
        "Lightning does every epoch and the epoch's plan), both medians over fits; optimizer steps of one fit.",
        "",
    ]
    rows = []
    for model, m in results["models"].items():
        plain = harness.median(m["step_s"][PLAIN])
        for v in (PLAIN, *names):
            work = harness.median(m["work_s"][v])
            straddle = harness.median([x for x in m["straddle_s"][v] if x == x] or [float("nan")])
            rows.append([model, v, "—" if v in (PLAIN, FLOOR) else f"{work * 1e3:.3f} ({work / plain:.1%} of a plain step)",
                         f"{straddle * 1e3:.1f}", str(m["steps"][v])])
    lines.append(harness.markdown_table(
        ["model", "variant", "callback work ms/step", "epoch-end interval ms", "optimizer steps"], rows))
    lines += ["", f"Cost of the pieces alone (outside the Trainer, batch of {s['batch']} losses; median of interleaved "
              "bursts):", ""]
    lines.append(harness.markdown_table(["operation", "µs / call"],
                                        [[k, f"{v * 1e6:.1f}"] for k, v in results["isolated_s"].items()]))
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()
    names = list(results["models"])
    vs = (RW, RW_NOLOG, FLOOR, DP)
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    width = 0.2
    for i, v in enumerate(vs):
        rows = [next(r for r in results["models"][n]["rows"] if r["variant"] == v) for n in names]
        x = [j + (i - 1.5) * width for j in range(len(names))]
        y = [r["ratio"] for r in rows]
        err = [[r["ratio"] - r["ratio_min"] for r in rows], [r["ratio_max"] - r["ratio"] for r in rows]]
        ax.bar(x, y, width, yerr=err, capsize=3, label=v)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(TARGET, color="gray", ls="--", lw=0.8, label=f"{TARGET}× target")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("step time / plain (median)")
    ax.set_title("Per-step overhead of per-sample weighting (CPU)")
    top = max(r["ratio_max"] for n in names for r in results["models"][n]["rows"])
    ax.set_ylim(0, top + 0.4)
    ax.legend(fontsize=7, loc="upper left", ncol=3)
    harness.save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    harness.main("reweighting_overhead", run, render, plot, "reweighting / data pruning step-time ratios", argv,
                 threads=THREADS, quick="few steps, one fit per variant")


if __name__ == "__main__":
    main()
