"""What a DynamicSparseTraining update costs, amortised over the papers' interval, and how it grows with size.

The per-step overhead between updates (RigL at 90%) is measured by ``benchmarks.overhead``.
This script adds:

(a) *update steps*: ``overhead``'s MLP (4 x Linear(512), batch 128, fused Adam) with RigL, SET,
    SRigL and GraNet at 90% updating every 10 steps; the time of an update step minus the median
    normal step of the same fit, the update itself timed in place (``_update``), and both
    amortised over the papers' delta T = 100.
(b) *growth with size*: the update policies (``drop_and_grow`` for SET and RigL,
    ``srigl_update``) and the mask install (``MaskEngine.set_masks_`` with Adam's two state
    tensors) timed on one square layer of growing width, interleaved; slope of log time vs log
    parameter count.

Run from the repository root: ``python -m benchmarks.dst_overhead`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import math
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
from benchmarks.overhead import Settings, Variant, measure, models
from lichtenberg.callbacks import DynamicSparseTraining
from lichtenberg.core.schedules import SparsitySchedule
from lichtenberg.core.sparsity import MaskEngine, drop_and_grow, random_masks, srigl_update

__all__ = ["main", "run"]

THREADS = 2
SPARSITY = 0.9
MAX_FOREIGN = 0.1  # the foreign-load guard of the full run; --quick runs without it (a smoke run times nothing)
DROP_FRACTION = 0.3
METHODS = {"rigl": "RigL", "set": "SET", "srigl": "SRigL", "granet": "GraNet"}  # (a)
EVERY = 10  # (a): updates at steps 10, 20, ... (many per fit); amortised over AMORTISE steps
AMORTISE = 100  # the papers' delta T
WIDTHS_C = (256, 362, 512, 724, 1024, 1448, 2048, 2896)  # (b): N = width^2, 65 k ... 8.4 M
FIT_FROM_C = 512  # (b): the slope is fitted from this width up (fixed per-call costs dominate below)
POLICIES_C = ("SET", "RigL", "SRigL", "install")


def updates(quick: bool) -> dict[str, Any]:
    """(a) plain vs each method updating every EVERY steps: normal steps, update steps, `_update` in place."""
    steps, repeats = (40, 1) if quick else (120, 4)
    cfg = Settings(steps=steps, epoch=steps, warmup=5, repeats=repeats)  # one epoch: no epoch-end work
    timed: dict[str, list[float]] = {m: [] for m in METHODS}

    def dst(method: str) -> Callable[[], list]:
        def make() -> list:
            cb = DynamicSparseTraining(SPARSITY, method, SparsitySchedule(kind="cubic", start=0, end=steps - 1,
                                                                          every_n_steps=EVERY),
                                       drop_fraction=DROP_FRACTION)
            cb._update = harness.timed(cb._update, timed[method])  # the callback looks it up at call time
            return [cb]

        return make

    m = measure(models("cpu", quick)[0], [Variant("plain"), *(Variant(k, dst(k)) for k in METHODS)], cfg)
    due = {s for s in range(1, steps - 1) if s % EVERY == 0}  # the update steps: (start, end), every EVERY

    def normal(fit: dict) -> float:
        return harness.median([dt for s, _, dt in fit["intervals"] if s >= cfg.warmup and s not in due])

    plain = harness.median([normal(f) for f in m["fits"]["plain"]])
    per: dict[str, Any] = {}
    for k in m["fits"].keys() - {"plain"}:
        fits = m["fits"][k]
        extra = [dt - normal(f) for f in fits for s, _, dt in f["intervals"] if s in due]  # update step - normal step
        norm = harness.median([normal(f) for f in fits])
        per[k] = {"normal_s": norm, "normal_ratio": norm / plain, "update_step_extra_s": extra, "update_s": timed[k],
                  "updates_per_fit": len(timed[k]) // repeats,
                  # a run of AMORTISE steps with one update: (AMORTISE - 1) normal steps + one update step
                  "amortised_ratio": (AMORTISE * norm + harness.median(extra)) / (AMORTISE * plain),
                  "update_in_steps": harness.median(extra) / plain}
    return {"steps": steps, "warmup": cfg.warmup, "repeats": repeats, "every": EVERY, "plain_s": plain,
            "methods": per, "errors": m["errors"], "rounds_rerun": sum(1 for x in m["rounds"] if not x["kept"])}


def growth(widths: tuple[int, ...], repeats: int, iters: int, guard: float | None) -> dict[str, Any]:
    """(b) one square layer per width at 90%: the policies and the install, median of ``iters`` calls per round."""
    out: dict[str, Any] = {}
    for policy in POLICIES_C:
        calls = {}
        for w in widths:
            g = torch.Generator().manual_seed(w)
            lin = nn.Linear(w, w, bias=False)
            weight, grad = lin.weight.detach(), torch.randn(w, w, generator=g)
            mask = random_masks({"w": weight.shape}, {"w": 1 - SPARSITY}, g)["w"]
            n = round(DROP_FRACTION * int(mask.sum()))
            alive = torch.ones(w, dtype=torch.bool)
            if policy == "SET":
                fn = lambda weight=weight, mask=mask, n=n, g=g: drop_and_grow(weight, mask, n, torch.rand(weight.shape, generator=g))
            elif policy == "RigL":
                fn = lambda weight=weight, mask=mask, n=n, grad=grad: drop_and_grow(weight, mask, n, grad.abs())
            elif policy == "SRigL":
                fn = lambda weight=weight, mask=mask, grad=grad, alive=alive: srigl_update(
                    weight, grad, mask, alive, DROP_FRACTION, 0.3)
            else:  # install: alternate between two masks (the changed slots of weight and both Adam moments reset)
                opt = torch.optim.Adam(lin.parameters(), lr=1e-4)
                lin.weight.grad = grad.clone()
                opt.step()
                engine = MaskEngine.attach_(lin, {"weight": lin.weight})
                other = drop_and_grow(weight, mask, n, grad.abs())
                state = {"i": 0}

                def fn(engine=engine, masks=(mask, other), opt=opt, state=state) -> None:
                    state["i"] += 1
                    engine.set_masks_({"weight": masks[state["i"] % 2]}, [opt])

            def burst(fn: Callable = fn) -> float:
                ts = []
                for _ in range(iters):
                    t0 = time.perf_counter()
                    fn()
                    ts.append(time.perf_counter() - t0)
                return harness.median(ts)

            burst()  # warm-up
            calls[str(w)] = burst
        log: list[dict] = []
        times = harness.interleaved(calls, repeats, max_foreign=guard, log=log)
        med = {w: harness.median(v) for w, v in times.items()}  # by str(width): the same after a JSON round trip
        out[policy] = {"times": times, "median_s": med, "slope_all": _slope(med, min(widths)),
                       "slope": _slope(med, FIT_FROM_C), "rounds_rerun": sum(1 for x in log if not x["kept"])}
    return out


def _slope(med: dict[str, float], from_width: int) -> float:
    """Least-squares slope of log(seconds) on log(parameters), widths >= ``from_width``."""
    pts = [(int(w) ** 2, t) for w, t in med.items() if int(w) >= from_width]
    if len(pts) < 2:
        return float("nan")
    return statistics.linear_regression([math.log(n) for n, _ in pts], [math.log(t) for _, t in pts]).slope


def run(quick: bool) -> dict[str, Any]:
    pinned = harness.pin_allocator()
    widths = WIDTHS_C[:4] if quick else WIDTHS_C
    t0 = time.perf_counter()
    say = lambda msg: print(f"[dst_overhead] {time.perf_counter() - t0:4.0f} s  {msg}", flush=True)  # noqa: E731
    res: dict[str, Any] = {"settings": dict(sparsity=SPARSITY, allocator_pinned=pinned, drop_fraction=DROP_FRACTION,
                                            widths=list(widths), fit_from=FIT_FROM_C, amortise=AMORTISE)}
    say(f"(a) updates every {EVERY} steps")
    res["updates"] = updates(quick)
    say(f"(b) growth: widths {widths[0]}..{widths[-1]}")
    res["growth"] = growth(widths, 2 if quick else 5, 3 if quick else 5, None if quick else MAX_FOREIGN)
    say("done")
    return res


def render(res: dict[str, Any]) -> str:
    s, b, c = res["settings"], res["updates"], res["growth"]
    ms = lambda v: f"{v * 1e3:.2f}"  # noqa: E731
    rows_b = [["plain", ms(b["plain_s"]), "—", "—", "—", "—", "—"]]
    for m, v in b["methods"].items():
        rows_b.append([
            METHODS[m], ms(v["normal_s"]), f"{v['normal_ratio']:.3f}×",
            f"{ms(harness.median(v['update_step_extra_s']))} [{ms(min(v['update_step_extra_s']))}–"
            f"{ms(max(v['update_step_extra_s']))}]",
            f"{ms(harness.median(v['update_s']))}", f"{v['update_in_steps']:.1f}", f"**{v['amortised_ratio']:.3f}×**"])
    rows_b += [[METHODS[m], f"error: {e['error']}", "", "", "", "", ""] for m, e in b["errors"].items()]
    rows_c = []
    for policy, v in c.items():
        rows_c.append([policy, *(ms(v["median_s"][str(w)]) for w in s["widths"]), f"**{v['slope']:.2f}**",
                       f"{v['slope_all']:.2f}", str(v["rounds_rerun"])])
    return "\n".join([
        "## Dynamic sparse training: cost of an update",
        "",
        f"CPU, {THREADS} torch threads, `DynamicSparseTraining(sparsity={s['sparsity']})` on every Linear weight (ERK "
        "allocation), biases dense; the step-time overhead between updates is in the `overhead` section.",
        "",
        f"**(a) Update steps**: `overhead`'s MLP (4 × `Linear(512)`, batch 128, `Adam(fused=True)`), each method "
        f"updating every {b['every']} steps (`SparsitySchedule(\"cubic\", start=0, end={b['steps'] - 1}, "
        f"every_n_steps={b['every']})`, drop fraction {s['drop_fraction']} cosine-decayed; "
        f"{next(iter(b['methods'].values()), {}).get('updates_per_fit', '?')} updates per fit), {b['repeats']} fits "
        f"per variant of {b['steps']} steps (first {b['warmup']} not timed), interleaved; rounds re-run: "
        f"{b['rounds_rerun']}. GraNet is dense-to-sparse (its masks start dense and its between-update steps are "
        "cheaper early on). *normal step*: median step without an update; *update step − normal*: each update step "
        "minus the median normal step of its fit, median [min–max] over all updates; *`_update`*: the callback's update "
        "timed in place (policy, mask install with the optimizer-state reset, logging); *in steps*: the update's extra "
        f"time in plain steps; *amortised over ΔT = {s['amortise']}*: ({s['amortise']} × normal step + update extra) / "
        f"({s['amortise']} × plain step).",
        "",
        harness.markdown_table(["method", "normal step ms", "vs plain", "update step − normal ms",
                                "`_update` ms", "in steps", f"amortised over ΔT = {s['amortise']}"], rows_b),
        "",
        f"**(b) Growth with size**: one square layer `Linear(w, w)` at {s['sparsity']:.0%}, drop fraction "
        f"{s['drop_fraction']}; *SET*: uniform scores + `drop_and_grow`; *RigL*: `drop_and_grow` with |grad|; *SRigL*: "
        "`srigl_update` (per-row sort for the constant fan-in); *install*: `MaskEngine.set_masks_` of a mask that "
        "differs in 2 × 30% of the active slots, resetting Adam's two moments there. Median ms over "
        f"{len(next(iter(c.values()))['times'][str(s['widths'][0])])} interleaved rounds (each the median of a burst); "
        f"*slope*: least squares of log time on log N (N = w²) for w ≥ {s['fit_from']} (*all*: every width); "
        "1 = linear in the parameter count.",
        "",
        harness.markdown_table(["update", *(f"w={w} ({w * w / 1e6:.2f} M)" for w in s["widths"]), "slope",
                                "slope (all)", "rounds re-run"], rows_c),
    ])


def plot(res: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()
    b, c = res["updates"], res["growth"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    ax = axes[0]
    ax.bar(range(len(b["methods"])), [v["amortised_ratio"] for v in b["methods"].values()], color="tab:green")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(b["methods"])), [METHODS[m] for m in b["methods"]])
    ax.set_ylabel(f"step time / plain, amortised over ΔT = {AMORTISE}")
    ax.set_title(f"update steps at {SPARSITY:.0%}, amortised", fontsize=10)
    ax = axes[1]
    for policy, v in c.items():
        ws = sorted(v["median_s"], key=int)
        ax.loglog([int(w) ** 2 for w in ws], [v["median_s"][w] * 1e3 for w in ws], marker="o",
                  label=f"{policy} (slope {v['slope']:.2f})")
    ax.set_xlabel("parameters of the layer (N)")
    ax.set_ylabel("ms per update of the layer")
    ax.set_title("update cost vs layer size", fontsize=10)
    ax.legend(fontsize=8)
    harness.save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    harness.main("dst_overhead", run, render, plot, "DST update cost", argv, threads=THREADS,
                 quick="small model, few fits")


if __name__ == "__main__":
    main()
