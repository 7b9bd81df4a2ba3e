"""What one EMA update costs alone, outside the Trainer: ours vs Lightning's AveragedModel vs a bare foreach lerp.

The step-time overhead of an every-step EMA inside ``Trainer.fit``, beside Lightning's
``EMAWeightAveraging``, is measured by ``benchmarks.overhead`` (rows EMA and
L-EMAWeightAveraging); this script decomposes it. Updates, interleaved in bursts on hot caches:
- ``torch._foreach_lerp_`` over the parameters: the memory traffic any EMA pays (the floor);
- ``AveragedWeights.update_``: what ``lichtenberg.callbacks.EMA`` runs after a step;
- ``AveragedModel.update_parameters`` with ``get_ema_avg_fn``: what Lightning's callback runs.

Two networks bracket the cost: a 6 x Linear(1024) MLP (few large tensors: memory-bound) and
250 x (Linear(16,16) + LayerNorm(16)) = 1,000 small tensors (per-tensor overheads dominate).
Also the bytes each average holds, and the minor page faults per update (fresh temporaries).

Run from the repository root: ``python -m benchmarks.ema_overhead`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn

from benchmarks import harness
from benchmarks.overhead import mlp
from lichtenberg.core.averaging import AveragedWeights

__all__ = ["main", "run"]

THREADS = 2
DECAY = 0.999
FLOOR, OURS, THEIRS = ("torch._foreach_lerp_ (floor)", "EMA update (AveragedWeights.update_)",
                       "Lightning (AveragedModel.update_parameters)")


def many_small(blocks: int) -> nn.Module:
    """``blocks`` x (Linear(16,16) + LayerNorm(16)): 4 tensors per block."""
    return nn.Sequential(*(nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16)) for _ in range(blocks)))


def networks(quick: bool) -> dict[str, Callable[[], nn.Module]]:
    width, blocks = (256, 50) if quick else (1024, 250)
    return {f"MLP 6x{width}": lambda: mlp(width, 6).net, f"{blocks * 4} small tensors": lambda: many_small(blocks)}


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def update_costs(build: Callable[[], nn.Module], repeats: int) -> dict[str, Any]:
    """Seconds per update (interleaved bursts of 20, median per burst), minor page faults per update, bytes held."""
    torch.manual_seed(0)
    net = build()
    ours = AveragedWeights(net)
    ours.update_(1.0)  # the first update copies; time the steady state
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

    with torch.no_grad():
        times = harness.interleaved({
            FLOOR: burst(FLOOR, lambda: torch._foreach_lerp_(avgs, curs, 1 - DECAY)),
            OURS: burst(OURS, lambda: ours.update_(1 - DECAY)),
            THEIRS: burst(THEIRS, lambda: theirs.update_parameters(net)),
        }, repeats)
    return {"update_s": times, "faults": {k: harness.median(v) for k, v in faults.items()},
            "tensors": len(list(net.parameters())), "param_bytes": tensor_bytes(net.parameters()),
            "held_bytes": {OURS: tensor_bytes(ours.tensors.values()),
                           THEIRS: tensor_bytes([*theirs.parameters(), *theirs.buffers()])}}


def run(quick: bool) -> dict[str, Any]:
    pinned = harness.pin_allocator()
    repeats = 2 if quick else 16
    return {"settings": dict(repeats=repeats, decay=DECAY, allocator_pinned=pinned),
            "models": {name: update_costs(build, repeats) for name, build in networks(quick).items()}}


def render(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        "## EMA: cost of one averaging update",
        "",
        f"One update alone, outside the Trainer (CPU, {THREADS} torch threads, hot caches, decay {s['decay']}): "
        f"median over {s['repeats']} interleaved bursts of 20. Lightning's `AveragedModel` computes `decay * avg + "
        "(1 - decay) * current` per tensor, allocating temporaries: where those are fresh pages every call (minor "
        "faults), it pays for them. The step-time overhead inside `Trainer.fit` is in the `overhead` section.",
        "",
    ]
    rows = []
    for name, m in results["models"].items():
        for v, vals in m["update_s"].items():
            rows.append([f"{name} ({m['tensors']} tensors)", v, f"{harness.median(vals) * 1e3:.3f}",
                         f"{harness.median(vals) / harness.median(m['update_s'][FLOOR]):.2f}×", f"{m['faults'][v]:.0f}"])
    lines.append(harness.markdown_table(["model", "update", "ms / update", "vs floor", "minor page faults / update"], rows))
    lines += ["", "Memory held by the average (the parameters alone for reference):", ""]
    rows = [[name, f"{m['param_bytes'] / 2**20:.2f}", *(f"{m['held_bytes'][v] / 2**20:.2f}" for v in (OURS, THEIRS))]
            for name, m in results["models"].items()]
    lines.append(harness.markdown_table(["model", "params MiB", "EMA copies MiB", "Lightning AveragedModel MiB"], rows))
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()
    names = list(results["models"])
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for i, v in enumerate((FLOOR, OURS, THEIRS)):
        y = [harness.median(results["models"][n]["update_s"][v]) * 1e3 for n in names]
        ax.bar([j + (i - 1) * 0.27 for j in range(len(names))], y, 0.27, label=v)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("ms per update (median)")
    ax.set_title("One EMA update alone (CPU)")
    ax.legend(fontsize=7)
    harness.save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    harness.main("ema_overhead", run, render, plot, "EMA update cost", argv, threads=THREADS,
                 quick="small networks, two bursts each")


if __name__ == "__main__":
    main()
