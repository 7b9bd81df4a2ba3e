"""Step-time overhead of an EMA updated after EVERY optimizer step, inside a real Trainer.fit.

Variants, measured in the same run with interleaved fits:
- ``plain``: the Trainer with no averaging;
- ``EMA``: ``lichtenberg.callbacks.EMA(decay=0.999, every_n_steps=1)``;
- ``L-EMAWeightAveraging``: Lightning's ``EMAWeightAveraging(decay=0.999)`` (every step);
- ``foreach-lerp floor``: one bare ``torch._foreach_lerp_`` per step, the least any EMA costs.

Two models bracket the cost: a 6 x Linear(1024) MLP (few large tensors: the update is
memory-bound) and 250 x (Linear(16,16) + LayerNorm(16)) = 1,000 small tensors (per-tensor
overheads dominate). A step's time is the interval between consecutive
``on_train_batch_start`` calls, so it includes every hook of the step (the EMA update
included) and the batch fetch; each fit reports the median over its steps after a warm-up. glibc's allocator
is pinned first (``harness.pin_allocator``; see there why).

Run from the repository root: ``python -m benchmarks.ema_overhead`` (``--quick`` for a smoke run).
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
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks import harness
from lichtenberg.callbacks import EMA
from lichtenberg.core.averaging import AveragedWeights

__all__ = ["Regression", "StepTimer", "main", "mlp", "random_loader", "run", "tensor_bytes"]

THREADS = 2
DECAY = 0.999
MAX_FOREIGN = 0.1  # share of the 2 CPUs other processes may use during a kept round


class StepTimer(Callback):
    """Time (and minor page faults) per training step of one fit, after ``warmup`` steps."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.starts: list[float] = []
        self.faults: list[int] = []

    def _stamp(self) -> None:
        self.starts.append(time.perf_counter())
        self.faults.append(harness.minor_faults())

    def on_train_batch_start(self, *args: Any) -> None:
        self._stamp()

    def on_train_end(self, *args: Any) -> None:
        self._stamp()  # closes the last step

    def step_times(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])][self.warmup :]

    def step_faults(self) -> list[int]:
        return [b - a for a, b in zip(self.faults, self.faults[1:])][self.warmup :]


class ForeachLerpFloor(Callback):
    """The least an every-step EMA can cost: one bare ``torch._foreach_lerp_`` over the parameters.

    No warm-up, no buffers, no bookkeeping: the gap between this and ``EMA`` is what the
    callback's machinery costs; the gap between this and ``plain`` is the memory traffic.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.current = list(pl_module.parameters())
        self.averaged = [p.detach().clone() for p in self.current]

    @torch.no_grad()
    def on_train_batch_end(self, *args: Any) -> None:
        torch._foreach_lerp_(self.averaged, self.current, 1.0 - DECAY)


class Regression(L.LightningModule):
    """MSE on fixed random targets: the loss value is irrelevant, only the step's work is.

    ``optimizer``: ``"adam"`` (``Adam(lr=1e-4)``), ``"adam_fused"`` (the same with ``fused=True``,
    for ``pruning_overhead`` and ``dst_overhead``) or ``"sgd"`` (``SGD(lr=1e-3, momentum=0.9)``).
    """

    def __init__(self, net: nn.Module, optimizer: str) -> None:
        super().__init__()
        self.net = net
        self.optimizer = optimizer

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=1e-3, momentum=0.9)
        if self.optimizer == "adam_fused":
            return torch.optim.Adam(self.parameters(), lr=1e-4, fused=True)
        return torch.optim.Adam(self.parameters(), lr=1e-4)


def mlp(width: int) -> nn.Module:
    """6 x Linear(width), ReLU between: 12 tensors, 6.3 M parameters at width 1024."""
    layers: list[nn.Module] = []
    for i in range(6):
        layers += [nn.Linear(width, width)] + ([nn.ReLU()] if i < 5 else [])
    return nn.Sequential(*layers)


def many_small(blocks: int) -> nn.Module:
    """``blocks`` x (Linear(16,16) + LayerNorm(16)): 4 tensors per block."""
    return nn.Sequential(*(nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16)) for _ in range(blocks)))


def model_specs(quick: bool) -> dict[str, dict[str, Any]]:
    width, blocks = (256, 50) if quick else (1024, 250)
    return {
        f"MLP 6x{width}": dict(build=lambda: mlp(width), features=width, batch=128, optimizer="adam"),
        f"{blocks * 4} small tensors": dict(
            build=lambda: many_small(blocks), features=16, batch=32, optimizer="adam"
        ),
    }


def random_loader(n: int, features: int, batch: int) -> DataLoader:
    """``n`` random (input, target) pairs of ``features`` values each, drawn from a fixed seed, in order.

    Also the data of ``pruning_overhead``, ``dst_overhead`` and ``qat_overhead``.
    """
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(n, features, generator=g), torch.randn(n, features, generator=g))
    return DataLoader(data, batch_size=batch, shuffle=False)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def fit_once(spec: dict[str, Any], loader: DataLoader, callback: Callback | None, steps: int, warmup: int) -> dict:
    """One fit of a fresh, identically initialised model; returns its median step time and memory."""
    torch.manual_seed(0)
    module = Regression(spec["build"](), spec["optimizer"])
    timer = StepTimer(warmup)
    trainer = harness.trainer(
        max_steps=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=([callback] if callback is not None else []) + [timer],  # timer last
    )
    hook_times: list[float] = []
    if callback is not None:
        # Time the averaging hook itself, in place: immune to the run-to-run drift of the
        # rest of the step. Lightning looks hooks up on the instance, so this wrapper is called.
        callback.on_train_batch_end = harness.timed(callback.on_train_batch_end, hook_times)  # type: ignore[method-assign]
    gc.collect()  # start every fit with the same garbage, not the previous fit's
    trainer.fit(module, loader)
    times = timer.step_times()
    extra = 0
    if isinstance(callback, EMA):
        extra = tensor_bytes(callback.averaged.tensors.values())
    elif isinstance(callback, EMAWeightAveraging):
        avg = callback._average_model
        extra = tensor_bytes(list(avg.parameters()) + list(avg.buffers()))
    hook_s = statistics.median(hook_times[warmup:]) if hook_times else 0.0
    return {
        "median_s": statistics.median(times),
        "hook_s": hook_s,
        "faults": statistics.median(timer.step_faults()),
        "steps_timed": len(times),
        "avg_bytes": extra,
    }


def update_costs(spec: dict[str, Any], repeats: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds per averaging update alone, outside the Trainer, and minor page faults per update."""
    torch.manual_seed(0)
    net = spec["build"]()
    ours = AveragedWeights(net)
    ours.update_(1.0)  # first update copies; time the steady state
    theirs = AveragedModel(net, avg_fn=get_ema_avg_fn(DECAY), use_buffers=True)
    theirs.update_parameters(net)
    avgs = [t for t in ours.tensors.values() if t.is_floating_point()]
    curs = [ours._current[n] for n, t in ours.tensors.items() if t.is_floating_point()]
    faults: dict[str, list[float]] = {}

    def burst(label: str, fn: Callable[[], None], n: int = 20) -> Callable[[], float]:
        def call() -> float:
            samples = []
            f0 = harness.minor_faults()
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t0)
            faults.setdefault(label, []).append((harness.minor_faults() - f0) / n)
            return statistics.median(samples)

        return call

    floor, mine, lightning = (
        "torch._foreach_lerp_ (floor)",
        "EMA update (AveragedWeights.update_)",
        "Lightning (AveragedModel.update_parameters)",
    )
    with torch.no_grad():
        times = harness.interleaved(
            {
                floor: burst(floor, lambda: torch._foreach_lerp_(avgs, curs, 1 - DECAY)),
                mine: burst(mine, lambda: ours.update_(1 - DECAY)),
                lightning: burst(lightning, lambda: theirs.update_parameters(net)),
            },
            repeats,
        )
    return times, {k: harness.median(v) for k, v in faults.items()}


def run(quick: bool) -> dict[str, Any]:
    # Many short fits rather than few long ones: what differs between fits (memory layout)
    # varies more than the steps within a fit do.
    steps, warmup, repeats = (20, 5, 1) if quick else (40, 10, 16)
    pinned = harness.pin_allocator()
    results: dict[str, Any] = {
        "settings": dict(steps=steps, warmup=warmup, repeats=repeats, decay=DECAY, allocator_pinned=pinned),
        "models": {},
    }
    for name, spec in model_specs(quick).items():
        # one epoch covers the run: no epoch-boundary work in the steps
        loader = random_loader(steps * spec["batch"], spec["features"], spec["batch"])
        params = tensor_bytes(spec["build"]().parameters())
        n_tensors = len(list(spec["build"]().parameters()))
        disturbances: list[dict[str, Any]] = []
        extras: dict[str, list[dict]] = {}

        def variant(make: Callable[[], Callback | None]) -> Callable[[], tuple[float, dict]]:
            def call() -> tuple[float, dict]:
                out = fit_once(spec, loader, make(), steps, warmup)
                return out["median_s"], out

            return call

        print(f"[ema_overhead] {name}: {n_tensors} parameter tensors, {steps} steps x {repeats} fits per variant", flush=True)
        t0 = time.perf_counter()
        times = harness.interleaved(
            {
                "plain": variant(lambda: None),
                "EMA": variant(lambda: EMA(decay=DECAY, every_n_steps=1)),
                "L-EMAWeightAveraging": variant(lambda: EMAWeightAveraging(decay=DECAY)),
                "foreach-lerp floor": variant(ForeachLerpFloor),
            },
            repeats,
            max_foreign=MAX_FOREIGN,
            log=disturbances,
            extras=extras,
        )
        print(f"[ema_overhead]   fits took {time.perf_counter() - t0:.0f} s", flush=True)
        results["models"][name] = {
            "optimizer": spec["optimizer"],
            "batch": spec["batch"],
            "param_tensors": n_tensors,
            "param_bytes": params,
            "averaged_bytes": {v: e[-1]["avg_bytes"] for v, e in extras.items()},
            "step_s": times,
            "hook_s": {v: [x["hook_s"] for x in e] for v, e in extras.items()},
            "faults_per_step": {v: [x["faults"] for x in e] for v, e in extras.items()},
            "rows": harness.ratio_table(times, "plain"),
            **dict(zip(("update_s", "update_faults"), update_costs(spec, repeats))),
            "rounds": disturbances,
        }
    return results


def render(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        "## EMA overhead per training step",
        "",
        f"Median time per optimizer step inside `Trainer.fit` (CPU, {THREADS} torch threads), EMA decay "
        f"{s['decay']} updating after **every** optimizer step, Adam. {s['repeats']} interleaved fits per variant, "
        f"{s['steps']} steps each, the first {s['warmup']} skipped; a step is the interval between consecutive "
        "`on_train_batch_start` calls (all hooks and the batch fetch included). Ratio = median of the "
        "variant's per-fit medians / that of `plain`; in brackets the min–max of the per-round ratios "
        "(fits that ran next to each other). *foreach-lerp floor* is a 5-line callback doing one bare "
        "`torch._foreach_lerp_` over the parameters: the memory traffic any every-step EMA pays. "
        f"Rounds during which other processes used > {MAX_FOREIGN:.0%} of the CPUs were re-run. "
        + (
            "glibc malloc's mmap/trim thresholds were pinned (`harness.pin_allocator`): left adaptive, a fit "
            "fell at random into a mode where Adam's per-step temporaries were faulted in afresh every step "
            "(~12,000 page faults, +10 ms), whichever variant it ran. "
            if s.get("allocator_pinned")
            else "The allocator was NOT pinned (not glibc): fits may fall into a page-fault-per-step slow mode. "
        )
        + "Target: EMA ≤ 1.05×.",
        "",
    ]
    rows = []
    variants = ("EMA", "L-EMAWeightAveraging", "foreach-lerp floor")
    for name, m in results["models"].items():
        by = {r["variant"]: r for r in m["rows"]}
        plain = by["plain"]
        cells = [name, str(m["param_tensors"]), f"{plain['median'] * 1e3:.2f} [{plain['q1'] * 1e3:.2f}–{plain['q3'] * 1e3:.2f}]"]
        for v in variants:
            r = by[v]
            text = f"{r['ratio']:.3f}× ({r['ratio_min']:.2f}–{r['ratio_max']:.2f})"
            cells.append(f"**{text}**" if v == "EMA" else text)
        redone = sum(1 for x in m["rounds"] if not x["kept"])
        flagged = sum(1 for x in m["rounds"] if x["kept"] and x["disturbed"])
        cells.append(f"{redone}" + (f" ({flagged} kept disturbed)" if flagged else ""))
        rows.append(cells)
    lines.append(
        harness.markdown_table(
            ["model", "param tensors", "plain ms/step [IQR]", "EMA (lichtenberg)", "Lightning EMAWeightAveraging",
             "foreach-lerp floor", "rounds re-run"],
            rows,
        )
    )
    lines += [
        "",
        "The averaging hook (`on_train_batch_end`) timed in place during the same fits: median over fits of "
        "each fit's median, and as a share of the plain step. Less exposed to the fit-to-fit drift of the rest "
        "of the step, but blind to any slow-down the extra memory traffic causes elsewhere in the step. "
        "Page faults per step stay near 0 while the allocator is pinned (see above); thousands mean the "
        "step's temporaries were faulted in afresh.",
        "",
    ]
    rows = []
    for name, m in results["models"].items():
        plain = harness.median(m["step_s"]["plain"])
        for v in ("plain", *variants):
            faults = f"{harness.median(m['faults_per_step'][v]):.0f} (max {max(m['faults_per_step'][v]):.0f})"
            if v == "plain":
                rows.append([name, v, "—", "—", faults])
                continue
            hook = harness.median(m["hook_s"][v])
            rows.append([name, v, f"{hook * 1e3:.2f}", f"{hook / plain:.1%}", faults])
    lines.append(
        harness.markdown_table(
            ["model", "variant", "hook ms/step", "hook / plain step", "minor page faults / step (median over fits)"], rows
        )
    )
    lines += [
        "",
        "Cost of one averaging update alone (outside the Trainer, hot caches; median over interleaved bursts "
        "of 20). Lightning's `AveragedModel` computes `decay * avg + (1 - decay) * current` per tensor, "
        "allocating temporaries: where those are fresh pages each call (minor faults), the isolated figure "
        "exceeds the in-Trainer hook time above.",
        "",
    ]
    rows = []
    for name, m in results["models"].items():
        for v, vals in m["update_s"].items():
            rows.append([name, v, f"{harness.median(vals) * 1e3:.3f}", f"{m['update_faults'][v]:.0f}"])
    lines.append(harness.markdown_table(["model", "update", "ms / update", "minor page faults / update"], rows))
    lines += ["", "Memory held by the averaged copy (parameters alone for reference):", ""]
    rows = []
    for name, m in results["models"].items():
        mb = m["averaged_bytes"]
        rows.append(
            [name, f"{m['param_bytes'] / 2**20:.2f}", f"{mb.get('EMA', 0) / 2**20:.2f}", f"{mb.get('L-EMAWeightAveraging', 0) / 2**20:.2f}"]
        )
    lines.append(harness.markdown_table(["model", "params MiB", "EMA copies MiB", "Lightning AveragedModel MiB"], rows))
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()
    names = list(results["models"])
    variants = ("EMA", "L-EMAWeightAveraging", "foreach-lerp floor")
    labels = {"EMA": "EMA (lichtenberg)", "L-EMAWeightAveraging": "Lightning EMAWeightAveraging"}
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    width = 0.27
    for i, v in enumerate(variants):
        rows = [next(r for r in results["models"][n]["rows"] if r["variant"] == v) for n in names]
        x = [j + (i - 1) * width for j in range(len(names))]
        y = [r["ratio"] for r in rows]
        err = [[r["ratio"] - r["ratio_min"] for r in rows], [r["ratio_max"] - r["ratio"] for r in rows]]
        ax.bar(x, y, width, yerr=err, capsize=3, label=labels.get(v, v))
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(1.05, color="gray", ls="--", lw=0.8, label="1.05× target")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("step time / plain (median)")
    ax.set_title("EMA every step: training-step overhead (CPU)")
    top = max(r["ratio_max"] for n in names for r in results["models"][n]["rows"])
    ax.set_ylim(0, top + 0.35)  # room for the legend above the bars
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    harness.save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    harness.main("ema_overhead", run, render, plot, "EMA step-time ratios", argv, threads=THREADS,
                 quick="small models, few steps")


if __name__ == "__main__":
    main()
