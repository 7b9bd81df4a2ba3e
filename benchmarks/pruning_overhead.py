"""Pruning events amortised over a gradual run, and where the time of a masked step goes.

The per-step overhead between pruning events (``GradualPruning`` beside Lightning's
``ModelPruning``, both at 90%) is measured by ``benchmarks.overhead``. This script adds:

(a) *amortised over a gradual run*: ``overhead``'s MLP (4 x Linear(512), batch 128, fused Adam)
    for 300 steps in 50-step epochs; ours prunes on the cubic schedule at steps 50, 100, ..., 250,
    ModelPruning at the ends of epochs 1-4 to the same sparsities. Mean time over all steps
    (events and epoch ends included) vs plain, and the time of one event, timed in place.
(b) *where the time goes*: each phase of a step of a 6 x Linear(1024) MLP timed outside the
    Trainer (forward + backward, ``mask_grads_``, ``Adam.step``, ``apply_``), plain vs masked,
    masked with Adam's ``exp_avg_sq`` of the pruned slots nudged off exact zeros (the default CPU
    Adam's ``sqrt`` is several times slower on them), and plain vs masked with fused Adam.

OpenMP's wait policy is left at its default here (unlike ``pruning_quality``, which sets
``OMP_WAIT_POLICY=PASSIVE``): in an A/B of the between-events step time at full size (6 fits per
variant, processes run default / PASSIVE / PASSIVE / default on a quiet machine) PASSIVE made
every step ~20% slower (plain 41.5 vs 31.8-34.4 ms) and moved the default-Adam ratio of ours
(1.31-1.32x vs 1.38-1.40x); the fused-Adam ratios stayed close (1.11-1.15x vs 1.11-1.16x). Since
it changes what is measured, it is not set.

Run from the repository root: ``python -m benchmarks.pruning_overhead`` (``--quick`` for a smoke run).
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

from benchmarks import harness
from benchmarks.overhead import LinearLikePruning, Settings, Variant, measure, mlp, models
from lichtenberg.callbacks import GradualPruning
from lichtenberg.core.schedules import SparsitySchedule
from lichtenberg.core.sparsity import MaskEngine, topk_mask

__all__ = ["main", "run"]

THREADS = 2
SPARSITY = 0.9
MAX_FOREIGN = 0.1
OURS, THEIRS = "GradualPruning", "L-ModelPruning"
PHASES = ("forward+backward", "mask_grads_", "Adam step", "apply_", "float-mask mul (ref.)")
FUSED = ", fused Adam"  # suffix of the setups with torch.optim.Adam(fused=True)


def amortised(quick: bool) -> dict[str, Any]:
    """(a) plain vs ours vs ModelPruning on the same cubic ramp; events timed in place."""
    steps, epoch, repeats = (60, 20, 1) if quick else (300, 50, 4)
    cfg = Settings(steps=steps, epoch=epoch, warmup=5, repeats=repeats)
    sched = SparsitySchedule(kind="cubic", start=epoch, end=steps - epoch, every_n_steps=epoch)
    events: dict[str, list[float]] = {OURS: [], THEIRS: []}

    def amount(e: int) -> float:  # ModelPruning: the share of the REMAINING weights pruned at the end of epoch e
        now, before = (sched.value(epoch * (k + 1), SPARSITY, epoch, steps - epoch) for k in (e, e - 1))
        return (now - before) / (1.0 - before) if now > before else 0.0

    def ours() -> list:
        cb = GradualPruning(SPARSITY, sched)
        cb._update = harness.timed(cb._update, events[OURS])  # the callback looks it up at call time
        return [cb]

    def theirs() -> list:
        cb = LinearLikePruning(amount)
        cb.apply_pruning = harness.timed(cb.apply_pruning, events[THEIRS])
        return [cb]

    m = measure(models("cpu", quick)[0], [Variant("plain"), Variant(OURS, ours), Variant(THEIRS, theirs)], cfg)
    means = {k: [statistics.fmean(dt for step, _, dt in f["intervals"] if step >= cfg.warmup) for f in fits]
             for k, fits in m["fits"].items()}
    return {"steps": steps, "epoch": epoch, "warmup": cfg.warmup, "repeats": repeats, "steady_rows": m["rows"],
            "mean_s": means, "mean_rows": harness.ratio_table(means, "plain"), "events_s": events,
            "errors": m["errors"], "rounds_rerun": sum(1 for x in m["rounds"] if not x["kept"])}


def decompose(width: int, repeats: int, iters: int = 12) -> dict[str, dict[str, list[float]]]:
    """Seconds per phase of a step outside the Trainer, plain vs masked, in interleaved bursts.

    ``masked``: GradualPruning's engine after a one-shot 90% event before the first step (Adam's
    state of pruned slots stays exactly 0). ``masked, state 1e-30``: the same with Adam's
    ``exp_avg_sq`` of pruned slots set to 1e-30 after the first step (identical updates), to
    isolate what ``sqrt`` on exact zeros costs inside ``Adam.step``. ``plain`` / ``masked`` + FUSED
    (added later): the same with ``Adam(fused=True)``.
    """
    x, y = torch.randn(128, width), torch.randn(128, width)

    def setup(masked: bool, nudge: bool, fused: bool = False) -> Callable[[], tuple[float, dict]]:
        torch.manual_seed(0)
        net = mlp(width, 6).net
        opt = torch.optim.Adam(net.parameters(), lr=1e-4, fused=fused or None)
        params = {n: p for n, p in net.named_parameters() if n.endswith("weight")}
        eng = MaskEngine.attach_(net, params) if masked else None
        if eng is not None:
            eng.set_masks_({n: topk_mask(p.detach().abs(), round((1 - SPARSITY) * p.numel())) for n, p in params.items()}, [opt])
            fmasks = [m.to(torch.float32) for m in eng.masks.values()]

        def fwd_bwd() -> None:
            opt.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()

        def float_mul() -> None:  # reference only: apply_'s work with float32 masks
            with torch.no_grad():
                torch._foreach_mul_(list(params.values()), fmasks)

        work = [fwd_bwd, *((eng.mask_grads_, opt.step, eng.apply_, float_mul) if eng else (None, opt.step, None, None))]
        phases: dict[str, list[float]] = {}

        def burst() -> tuple[float, dict]:
            for _ in range(iters):
                t = [time.perf_counter()]
                for fn in work:
                    if fn is not None:
                        fn()
                    t.append(time.perf_counter())
                if nudge and not phases:  # after the first step, once Adam's state exists
                    for n, p in params.items():
                        opt.state[p]["exp_avg_sq"].masked_fill_(~eng.masks[n], 1e-30)
                for k, a, b in zip(PHASES, t, t[1:]):
                    phases.setdefault(k, []).append(b - a)
            return t[-2] - t[0], phases

        return burst

    extras: dict[str, list] = {}
    harness.interleaved(
        {"plain": setup(False, False), "masked": setup(True, False), "masked, state 1e-30": setup(True, True),
         "plain" + FUSED: setup(False, False, True), "masked" + FUSED: setup(True, False, True)},
        repeats, max_foreign=MAX_FOREIGN, extras=extras,
    )
    return {k: {ph: v[iters // 2 :] for ph, v in e[-1].items()} for k, e in extras.items()}



def run(quick: bool) -> dict[str, Any]:
    pinned = harness.pin_allocator()
    width, r_d = (256, 2) if quick else (1024, 8)
    t0 = time.perf_counter()
    say = lambda msg: print(f"[pruning_overhead] {time.perf_counter() - t0:4.0f} s  {msg}", flush=True)  # noqa: E731
    say("(a) amortised over a gradual run")
    res: dict[str, Any] = {"settings": dict(width=width, sparsity=SPARSITY, allocator_pinned=pinned, batch=128),
                           "gradual": amortised(quick)}
    say(f"(b) where the time goes: 6x{width} MLP outside the Trainer x {r_d} bursts")
    res["phases"] = decompose(width, r_d)
    say("done")
    return res


def render(res: dict[str, Any]) -> str:
    s, b, ph = res["settings"], res["gradual"], res["phases"]
    ms = lambda v: f"{v * 1e3:.2f}"  # noqa: E731
    ratio = lambda r: f"{r['ratio']:.3f}× ({r['ratio_min']:.2f}–{r['ratio_max']:.2f})"  # noqa: E731
    steady, mean = ({r["variant"]: r for r in rows} for rows in (b["steady_rows"], b["mean_rows"]))
    rows = []
    for v in ("plain", OURS, THEIRS):
        if v in b["errors"]:
            rows.append([v, f"error: {b['errors'][v]['error']}", "", "", "", ""])
            continue
        ev = b["events_s"].get(v, [])
        rows.append([v, ms(mean[v]["median"]), "—" if v == "plain" else ratio(mean[v]),
                     "—" if v == "plain" else ratio(steady[v]), f"{len(ev) / b['repeats']:.0f}",
                     f"{ms(harness.median(ev))} [{ms(max(ev))}]" if ev else "—"])
    return "\n".join([
        "## Pruning: events amortised over a gradual run, and where a masked step's time goes",
        "",
        f"CPU, {THREADS} torch threads; the step-time overhead between events is in the `overhead` section. "
        f"**(a) Amortised**: `overhead`'s MLP (4 × `Linear(512)`, batch {s['batch']}, `Adam(fused=True)`), "
        f"{b['repeats']} interleaved fits per variant of {b['steps']} steps in {b['epoch']}-step epochs (first "
        f"{b['warmup']} not timed). Ours: cubic 0 → {s['sparsity']:.0%} at steps {b['epoch']}, {2 * b['epoch']}, …, "
        f"{b['steps'] - b['epoch']} (the first event at 0%); Lightning's `ModelPruning` (l1, per layer, the same "
        "layers): the same sparsities at the ends of the epochs before (callable `amount` = share of the remaining "
        "weights). *Mean step*: all steps, events and epoch ends included; *steady*: median step inside an epoch; "
        f"*ms / event*: median [max] over all events, timed in place. Rounds re-run: {b['rounds_rerun']}.",
        "",
        harness.markdown_table(["variant", "mean step ms", "mean vs plain", "steady vs plain", "events / fit",
                                "ms / event"], rows),
        "",
        f"**(b) Where the time goes**: 6 × `Linear({s['width']})` MLP, batch {s['batch']}, {s['sparsity']:.0%} of each "
        "weight pruned, outside the Trainer; median ms per phase over interleaved bursts. *masked*: our `MaskEngine` "
        "after a one-shot event before the first step, so Adam's state of the pruned slots is exactly 0, as after any "
        "event (the engine zeroes the state of newly pruned slots). *masked, state 1e-30*: the same with Adam's "
        "`exp_avg_sq` of pruned slots set to 1e-30 after the first step: identical (zero) updates, but `Adam.step`'s "
        "`sqrt` no longer meets exact zeros. *fused Adam*: `Adam(lr=1e-4, fused=True)`. *apply_*: timed for "
        "reference; with Adam the callback does not run it, so the *step total* (forward+backward + mask_grads_ + "
        "Adam step) leaves it out. *float-mask mul*: apply_'s work done with float32 masks instead of bool ones, for "
        "reference (in no variant's step).",
        "",
        harness.markdown_table(
            ["setup", *PHASES, "step total"],
            [[k, *("—" if k.startswith("plain") and n not in ("forward+backward", "Adam step") else ms(harness.median(v[n]))
                   for n in PHASES), ms(sum(harness.median(v[n]) for n in PHASES[:3]))] for k, v in ph.items()],
        ),
    ])


def plot(res: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()
    ph = res["phases"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    bottom = [0.0] * len(ph)
    for phase in PHASES[:3]:  # the phases of a step with Adam (apply_ does not run)
        y = [harness.median(v[phase]) * 1e3 if phase in v else 0.0 for v in ph.values()]
        ax.bar(range(len(ph)), y, 0.6, bottom=bottom, label=phase)
        bottom = [a + b for a, b in zip(bottom, y)]
    ax.set_xticks(range(len(ph)), list(ph), fontsize=7, rotation=15)
    ax.set_ylabel("ms per step (median per phase)")
    ax.set_title(f"Where a masked step's time goes (CPU, 6×Linear({res['settings']['width']}), {SPARSITY:.0%})",
                 fontsize=10)
    ax.legend(fontsize=8)
    harness.save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    harness.main("pruning_overhead", run, render, plot, "pruning event cost and step phases", argv, threads=THREADS,
                 quick="small model, few fits")


if __name__ == "__main__":
    main()
