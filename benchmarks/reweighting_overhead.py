"""What SampleReweighting's per-step logs cost, beside the least any per-batch loss weighting costs.

The step-time overhead of ``SampleReweighting`` and ``DataPruning`` vs the plain mean is
measured by ``benchmarks.overhead``; this script splits SampleReweighting's:
- ``plain``: the demo model's ``training_step`` with no callback (``weighted_loss`` = ``losses.mean()``);
- ``SampleReweighting``: ``SampleReweighting("linupper", warmup_steps=0)``: weights on every step,
  its three logs on the Trainer's ``log_every_n_steps`` cadence (default 50);
- ``SampleReweighting, no logs``: the same callback with its ``pl_module.log`` calls removed (a
  benchmark-only subclass): what the logging costs;
- ``inline loss_weights (floor)``: no callback; the module computes
  ``(loss_weights(losses, "linupper") * losses).mean()`` itself.

Models and protocol: ``overhead``'s (the MLP and the digits CNN, fused Adam, interleaved fits,
median step per fit). Also the pieces alone, outside the Trainer.

Run from the repository root: ``python -m benchmarks.reweighting_overhead`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from benchmarks import harness
from benchmarks.overhead import Settings, Variant, measure, models
from lichtenberg.callbacks import SampleReweighting
from lichtenberg.core.reweighting import effective_sample_size, loss_weights, weight_entropy

__all__ = ["main", "run"]

THREADS = 2
BATCH = 64
RULE = "linupper"
TARGET = 1.02  # SampleReweighting vs plain
PLAIN, RW, RW_NOLOG, FLOOR = "plain", "SampleReweighting", "SampleReweighting, no logs", "inline loss_weights (floor)"


class QuietReweighting(SampleReweighting):
    """SampleReweighting without its ``pl_module.log`` calls (benchmark only)."""

    def _weights(self, trainer, pl_module, losses, index):
        if trainer.global_step < self.warmup_steps or self.rule == "uniform":
            return None
        self._batches_weighted += 1
        return loss_weights(losses, self.rule, self.temperature)


def inline(module: nn.Module) -> None:
    """The floor: the demo module's ``training_step`` with per-batch LinUpper weights computed in place."""

    def training_step(batch: Any, batch_idx: int) -> torch.Tensor:
        losses, _ = module._losses_and_logits(batch)
        loss = (loss_weights(losses, RULE) * losses).mean()
        module.log("train_loss", loss, prog_bar=True)
        return loss

    module.training_step = training_step  # Lightning calls it through the instance


VARIANTS = [Variant(PLAIN), Variant(RW, lambda: [SampleReweighting(RULE, warmup_steps=0)], target=TARGET),
            Variant(RW_NOLOG, lambda: [QuietReweighting(RULE, warmup_steps=0)]), Variant(FLOOR, prepare=inline)]


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
    cfg = Settings(steps=12, epoch=4, warmup=5, repeats=1) if quick else Settings(steps=100, epoch=25, warmup=10,
                                                                                  repeats=16)
    pinned = harness.pin_allocator()
    results: dict[str, Any] = {"settings": {**vars(cfg), "rule": RULE, "allocator_pinned": pinned, "target": TARGET},
                               "models": {}}
    for model in models("cpu", quick)[:2]:  # the MLP and the CNN
        print(f"[reweighting_overhead] {model.name}: {cfg.repeats} fits per variant", flush=True)
        m = measure(model, VARIANTS, cfg)
        results["models"][model.name] = {"rows": m["rows"], "errors": m["errors"],
                                         "rounds_rerun": sum(1 for x in m["rounds"] if not x["kept"])}
    results["isolated_s"] = isolated_costs(3 if quick else 9, 200 if quick else 2000)
    return results


def render(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        "## Sample reweighting: what its logs cost",
        "",
        f"`overhead`'s protocol (CPU, {THREADS} torch threads, `Adam(fused=True)`, random data): {s['repeats']} "
        f"interleaved fits per variant of {s['steps']} steps in {s['epoch']}-batch epochs, the first {s['warmup']} "
        "steps, the last two and the steps that cross an epoch end not timed; ratio = median of the per-fit median "
        "steps / plain's, in brackets the min–max of the per-round ratios. *SampleReweighting*: "
        f"`SampleReweighting(\"{s['rule']}\", warmup_steps=0)` (weights every step, logs ESS, entropy and max weight on "
        "the first weighted step and then every `log_every_n_steps` = 50 steps); *no logs*: the same without its "
        "three `pl_module.log` calls (a benchmark-only subclass); *floor*: no callback, the module computes "
        f"`(loss_weights(losses, \"linupper\") * losses).mean()` itself. Target: SampleReweighting ≤ {s['target']}×. "
        "The overhead of every technique (DataPruning included) is in the `overhead` section.",
        "",
    ]
    rows = []
    for model, m in results["models"].items():
        by = {r["variant"]: r for r in m["rows"]}
        p = by.get(PLAIN)
        cells = [model, f"{p['median'] * 1e3:.2f} [{p['q1'] * 1e3:.2f}–{p['q3'] * 1e3:.2f}]" if p else "error"]
        for v in (RW, RW_NOLOG, FLOOR):
            r = by.get(v)
            text = f"{r['ratio']:.3f}× ({r['ratio_min']:.2f}–{r['ratio_max']:.2f})" if r else \
                f"error: {m['errors'].get(v, {}).get('error', '?')}"
            cells.append(f"**{text}**" if v == RW and r and r["ratio"] > s["target"] else text)
        rows.append([*cells, str(m["rounds_rerun"])])
    lines.append(harness.markdown_table(["model", "plain ms/step [IQR]", RW, RW_NOLOG, FLOOR, "rounds re-run"], rows))
    lines += ["", f"The pieces alone (outside the Trainer, batch of {BATCH} losses; median of interleaved bursts):", ""]
    lines.append(harness.markdown_table(["operation", "µs / call"],
                                        [[k, f"{v * 1e6:.1f}"] for k, v in results["isolated_s"].items()]))
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()
    names = list(results["models"])
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for i, v in enumerate((RW, RW_NOLOG, FLOOR)):
        rows = [next((r for r in results["models"][n]["rows"] if r["variant"] == v), None) for n in names]
        ok = [j for j, r in enumerate(rows) if r]
        ax.bar([j + (i - 1) * 0.27 for j in ok], [rows[j]["ratio"] for j in ok], 0.27, capsize=3, label=v,
               yerr=[[rows[j]["ratio"] - rows[j]["ratio_min"] for j in ok],
                     [rows[j]["ratio_max"] - rows[j]["ratio"] for j in ok]])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(TARGET, color="gray", ls="--", lw=0.8, label=f"{TARGET}× target")
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel("step time / plain (median)")
    ax.set_title("Per-step cost of per-sample weighting and its logs (CPU)")
    ax.legend(fontsize=7)
    harness.save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    harness.main("reweighting_overhead", run, render, plot, "reweighting step-time ratios", argv,
                 threads=THREADS, quick="few steps, one fit per variant")


if __name__ == "__main__":
    main()
