"""Step-time overhead of DynamicSparseTraining at 90% sparsity, inside a real Trainer.fit, and the cost of an update.

Same model, data and protocol as ``pruning_overhead`` (6 x Linear(1024) MLP, batch 128, MSE to
random targets, glibc allocator pinned, interleaved fits, disturbed rounds re-run). Three
measurements:

(a) *between updates*: RigL at 90% (ERK masks drawn at set-up) with one update, at the
    second-to-last step (timed apart), so every timed step is a masked step without an update, vs the plain Trainer,
    under three optimizers: Adam (the default foreach implementation), ``Adam(fused=True)`` and
    SGD with momentum. Adam's ``sqrt`` meets the exact zeros of the pruned slots' state, which is
    several times slower on this CPU (see the ``pruning_overhead`` section).
(a') the same at batch 1024 (fused Adam and SGD): the masking pass is unchanged, the
    matmuls cost 8x more.
(b) *update steps*: RigL, SET, SRigL and GraNet updating every 10 steps (Adam); the time of an
    update step minus the median normal step of the same fit, the update itself timed in place
    (``_update``), and both amortised over the papers' delta T = 100.
(c) *growth with size*: the update policies (``drop_and_grow`` for SET and RigL,
    ``srigl_update``) and the mask install (``MaskEngine.set_masks_`` with Adam's two state
    tensors) timed on one square layer of growing width, interleaved; slope of log time vs log
    parameter count.

Run from the repository root: ``python -m benchmarks.dst_overhead`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import gc
import math
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
from torch import nn
from torch.utils.data import DataLoader

from benchmarks import harness
from benchmarks.ema_overhead import Regression, mlp, random_loader, tensor_bytes
from lichtenberg.callbacks import DynamicSparseTraining
from lichtenberg.core.schedules import SparsitySchedule
from lichtenberg.core.sparsity import MaskEngine, drop_and_grow, random_masks, srigl_update

__all__ = ["main", "run"]

THREADS = 2
SPARSITY = 0.9
MAX_FOREIGN = 0.1  # the foreign-load guard of the full run; --quick runs without it (a smoke run times nothing)
BATCH = 128
DROP_FRACTION = 0.3
OPTIMIZERS = ("Adam", "Adam fused", "SGD")  # (a)
BATCH_LARGE, OPTIMIZERS_LARGE = 1024, ("Adam fused", "SGD")  # (a'): same weights, 8x the matmul work per step
METHODS_B = ("rigl", "set", "srigl", "granet")  # (b)
EVERY_B = 10  # (b): updates at steps 10, 20, ... (many per fit); amortised over AMORTISE steps
AMORTISE = 100  # the papers' delta T
WIDTHS_C = (256, 362, 512, 724, 1024, 1448, 2048, 2896)  # (c): N = width^2, 65 k ... 8.4 M
FIT_FROM_C = 512  # (c): the slope is fitted from this width up (fixed per-call costs dominate below)
POLICIES_C = ("SET", "RigL", "SRigL", "install")


_OPT = {"Adam": "adam", "Adam fused": "adam_fused", "SGD": "sgd"}


class Probe(Callback):
    """Last in the list: stamps every step (with its global step), times the sparse work in place."""

    def __init__(self, dst: DynamicSparseTraining | None) -> None:
        self.dst = dst
        self.stamps: list[tuple[int, float]] = []
        self.mask_grads: list[float] = []
        self.updates: dict[int, float] = {}  # global step -> seconds of `_update`

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dst = self.dst
        if dst is None:
            return
        update = dst._update

        def timed_update(trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
            t0 = time.perf_counter()
            update(trainer, pl_module, step)
            self.updates[step] = time.perf_counter() - t0  # by step: update steps are told apart from the others

        dst.engine.mask_grads_ = harness.timed(dst.engine.mask_grads_, self.mask_grads)  # looked up at call time
        dst._update = timed_update

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.stamps.append((trainer.global_step, time.perf_counter()))

    def on_train_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.stamps.append((trainer.global_step, time.perf_counter()))

    def steps(self, warmup: int) -> list[tuple[int, float]]:
        """(global step, seconds) of every step after ``warmup``."""
        return [(a[0], b[1] - a[1]) for a, b in zip(self.stamps, self.stamps[1:])][warmup:]


def _dst(method: str, every: int, end: int) -> DynamicSparseTraining:
    sched = SparsitySchedule(kind="cubic", start=0, end=end, every_n_steps=every)
    return DynamicSparseTraining(SPARSITY, method, sched, drop_fraction=DROP_FRACTION)


def fit_once(width: int, loader: DataLoader, optimizer: str, make: Callable, steps: int, warmup: int) -> dict[str, Any]:
    torch.manual_seed(0)
    module = Regression(mlp(width), optimizer)
    dst = make()
    probe = Probe(dst)
    trainer = harness.trainer(max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0,
                              callbacks=([dst] if dst is not None else []) + [probe])
    gc.collect()
    faults = harness.minor_faults()
    trainer.fit(module, loader)
    faults = harness.minor_faults() - faults
    steps_s = probe.steps(warmup)
    normal = [t for s, t in steps_s if s not in probe.updates]
    out: dict[str, Any] = {
        "median_s": statistics.median(normal), "steps_timed": len(normal), "faults_per_step": faults / steps,
        "update_steps_s": {s: t for s, t in steps_s if s in probe.updates}, "update_s": dict(probe.updates),
        "mask_grads_s": statistics.median(probe.mask_grads[warmup:]) if len(probe.mask_grads) > warmup else 0.0,
    }
    if dst is not None:
        weights = sum(p.numel() for p in dst.engine.params.values())
        held = [*dst.engine.masks.values(), *dst._ever.values(), *dst._alive.values()]
        out |= {"bytes_extra": tensor_bytes(held), "weights": weights, "sparsity": dst.engine.sparsity_report()[1],
                "itop": dst.itop}
    return out


def between(width: int, steps: int, warmup: int, repeats: int, guard: float | None, batch: int = BATCH,
            optimizers: tuple[str, ...] = OPTIMIZERS) -> dict[str, Any]:
    """(a) plain vs RigL without updates, per optimizer, all variants interleaved."""
    loader = random_loader(steps * batch, width, batch)  # one epoch covers the run: no epoch-end work
    make: dict[str, tuple[str, Callable]] = {}
    for opt in optimizers:
        make[f"plain, {opt}"] = (_OPT[opt], lambda: None)
        # One update, at the second-to-last step (timed apart, out of the medians): an interval
        # that never fits in the run is refused as never acting.
        make[f"RigL, {opt}"] = (_OPT[opt], lambda: _dst("rigl", steps - 2, steps - 1))
    log: list[dict] = []
    extras: dict[str, list[dict]] = {}

    def call(optimizer: str, mk: Callable) -> Callable[[], tuple[float, dict]]:
        def go() -> tuple[float, dict]:
            out = fit_once(width, loader, optimizer, mk, steps, warmup)
            return out["median_s"], out

        return go

    times = harness.interleaved({k: call(*v) for k, v in make.items()}, repeats, max_foreign=guard, log=log,
                                extras=extras)
    rows = {opt: next(r for r in harness.ratio_table({k: times[k] for k in (f"plain, {opt}", f"RigL, {opt}")},
                                                      f"plain, {opt}") if r["variant"] == f"RigL, {opt}")
            for opt in optimizers}
    return {"steps": steps, "warmup": warmup, "repeats": repeats, "batch": batch, "step_s": times, "rows": rows,
            "plain_rows": harness.ratio_table({f"plain, {o}": times[f"plain, {o}"] for o in optimizers},
                                              f"plain, {optimizers[0]}"),
            "fits": {k: [{kk: vv for kk, vv in x.items() if kk not in ("median_s", "update_steps_s", "update_s")}
                         for x in e] for k, e in extras.items()},
            "rounds": log}


def updates(width: int, steps: int, warmup: int, repeats: int, guard: float | None) -> dict[str, Any]:
    """(b) plain vs each method updating every EVERY_B steps (Adam): normal steps, update steps, `_update`."""
    loader = random_loader(steps * BATCH, width, BATCH)
    make = {"plain": lambda: None, **{m: (lambda m=m: _dst(m, EVERY_B, steps - 1)) for m in METHODS_B}}  # end: the last step
    log: list[dict] = []
    extras: dict[str, list[dict]] = {}

    def call(mk: Callable) -> Callable[[], tuple[float, dict]]:
        def go() -> tuple[float, dict]:
            out = fit_once(width, loader, "adam", mk, steps, warmup)
            return out["median_s"], out

        return go

    times = harness.interleaved({k: call(v) for k, v in make.items()}, repeats, max_foreign=guard, log=log,
                                extras=extras)
    per: dict[str, Any] = {}
    plain = harness.median(times["plain"])
    for m in METHODS_B:
        fits = extras[m]
        extra = [t - f["median_s"] for f in fits for t in f["update_steps_s"].values()]  # update step - normal step
        upd = [t for f in fits for t in f["update_s"].values()]
        normal = harness.median(times[m])
        per[m] = {
            "normal_s": normal, "normal_ratio": normal / plain, "update_step_extra_s": extra, "update_s": upd,
            "updates_per_fit": len(fits[-1]["update_s"]),
            # a run of AMORTISE steps with one update: (AMORTISE - 1) normal steps + one update step
            "amortised_ratio": (AMORTISE * normal + harness.median(extra)) / (AMORTISE * plain),
            "update_in_steps": harness.median(extra) / plain,
        }
    return {"steps": steps, "warmup": warmup, "repeats": repeats, "every": EVERY_B, "step_s": times,
            "rows": harness.ratio_table(times, "plain"), "methods": per, "rounds": log}


def growth(widths: tuple[int, ...], repeats: int, iters: int, guard: float | None) -> dict[str, Any]:
    """(c) one square layer per width at 90%: the policies and the install, median of ``iters`` calls per round."""
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
    width = 256 if quick else 1024
    r_a, r_b, r_c = (2, 1, 2) if quick else (12, 4, 5)
    steps_b = 40 if quick else 120
    widths = WIDTHS_C[:4] if quick else WIDTHS_C
    guard = None if quick else MAX_FOREIGN
    res: dict[str, Any] = {"settings": dict(width=width, sparsity=SPARSITY, allocator_pinned=pinned, batch=BATCH,
                                            drop_fraction=DROP_FRACTION, widths=list(widths), fit_from=FIT_FROM_C,
                                            amortise=AMORTISE)}
    t0 = time.perf_counter()
    say = lambda msg: print(f"[dst_overhead] {time.perf_counter() - t0:4.0f} s  {msg}", flush=True)  # noqa: E731
    say(f"(a) between updates: 6x{width} MLP, 50 steps x {r_a} fits x {2 * len(OPTIMIZERS)} variants")
    res["between"] = between(width, 50, 12, r_a, guard)
    say(f"(a') between updates at batch {BATCH_LARGE}: 30 steps x {r_a // 2} fits x {2 * len(OPTIMIZERS_LARGE)} variants")
    res["between_large"] = between(width, 30, 8, max(r_a // 2, 1), guard, BATCH_LARGE, OPTIMIZERS_LARGE)
    say(f"(b) updates every {EVERY_B} steps: {steps_b} steps x {r_b} fits x {1 + len(METHODS_B)} variants")
    res["updates"] = updates(width, steps_b, 5, r_b, guard)
    say(f"(c) growth: widths {widths[0]}..{widths[-1]} x {r_c} rounds")
    res["growth"] = growth(widths, r_c, 3 if quick else 5, guard)
    say("done")
    return res


_NAMES = {"rigl": "RigL", "set": "SET", "srigl": "SRigL", "granet": "GraNet"}


def render(res: dict[str, Any]) -> str:
    s, a, b, c = res["settings"], res["between"], res["updates"], res["growth"]
    ms = lambda v: f"{v * 1e3:.2f}"  # noqa: E731
    ratio = lambda r: f"{r['ratio']:.3f}× ({r['ratio_min']:.2f}–{r['ratio_max']:.2f})"  # noqa: E731
    redone = lambda m: str(sum(1 for x in m["rounds"] if not x["kept"]))  # noqa: E731
    fit = {k: v[-1] for k, v in a["fits"].items()}
    plain_rows = {r["variant"]: r for r in a["plain_rows"]}
    rows_a = []
    for opt in OPTIMIZERS:
        p, d = f"plain, {opt}", f"RigL, {opt}"
        r = a["rows"][opt]
        ok = "meets" if r["ratio"] <= 1.05 else "misses"
        rows_a.append([opt, f"{ms(harness.median(a['step_s'][p]))}", f"{plain_rows[p]['ratio']:.3f}×",
                       ms(harness.median(a["step_s"][d])), f"**{ratio(r)}** ({ok})",
                       ms(harness.median([f["mask_grads_s"] for f in a["fits"][d]])),
                       f"{fit[p]['faults_per_step']:.0f} / {fit[d]['faults_per_step']:.0f}"])
    d0 = fit[f"RigL, {OPTIMIZERS[0]}"]
    a2 = res.get("between_large")
    rows_a2 = []
    for opt in (a2["rows"] if a2 else {}):
        p, d = f"plain, {opt}", f"RigL, {opt}"
        r = a2["rows"][opt]
        rows_a2.append([opt, ms(harness.median(a2["step_s"][p])), ms(harness.median(a2["step_s"][d])),
                        f"**{ratio(r)}** ({'meets' if r['ratio'] <= 1.05 else 'misses'})",
                        ms(harness.median([f["mask_grads_s"] for f in a2["fits"][d]]))])
    part_a2 = [] if not a2 else [
        f"**(a') Between updates at batch {a2['batch']}**: the same model, masks and protocol, {a2['repeats']} fits "
        f"per variant of {a2['steps']} steps (first {a2['warmup']} not timed); rounds re-run: {redone(a2)}. The "
        "masking pass costs the same as at batch 128; the matmuls cost 8× more, as in training with larger batches "
        "or longer sequences.",
        "",
        harness.markdown_table(["optimizer", "plain ms/step", "RigL ms/step", "RigL vs plain", "mask_grads_ ms"],
                               rows_a2),
        "",
    ]
    rows_b = [["plain", ms(harness.median(b["step_s"]["plain"])), "—", "—", "—", "—", "—"]]
    for m, v in b["methods"].items():
        rows_b.append([
            _NAMES[m], ms(v["normal_s"]), f"{v['normal_ratio']:.3f}×",
            f"{ms(harness.median(v['update_step_extra_s']))} [{ms(min(v['update_step_extra_s']))}–"
            f"{ms(max(v['update_step_extra_s']))}]",
            f"{ms(harness.median(v['update_s']))}", f"{v['update_in_steps']:.1f}", f"**{v['amortised_ratio']:.3f}×**"])
    rows_c = []
    for policy, v in c.items():
        rows_c.append([policy, *(ms(v["median_s"][str(w)]) for w in s["widths"]), f"**{v['slope']:.2f}**",
                       f"{v['slope_all']:.2f}", str(v["rounds_rerun"])])
    return "\n".join([
        "## Dynamic sparse training: overhead per step and cost of an update",
        "",
        f"6 × `Linear({s['width']})` MLP, batch {s['batch']}, MSE to random targets, CPU ({THREADS} torch threads), "
        f"`DynamicSparseTraining(sparsity={s['sparsity']})` on every Linear weight (ERK allocation; on six equal square "
        f"layers it is uniform), biases dense; protocol as `pruning_overhead` (interleaved fits, allocator pinned: "
        f"{'yes' if s['allocator_pinned'] else 'NO'}, rounds with > {MAX_FOREIGN:.0%} foreign CPU load re-run). "
        "Between updates the callback masks the gradients at the last point before the optimizer step (an "
        "optimizer pre-hook, after Lightning's closure; Adam and SGD keep exact zeros, so there is no re-masking pass "
        "after it). Ratios: median of the per-fit medians / plain with the same "
        "optimizer, in brackets the min–max of the per-round ratios. Target: ≤ 1.05× plain between updates.",
        "",
        f"**(a) Between updates**: RigL whose one update comes at the second-to-last step and is left out of the "
        f"timings (masks drawn at set-up); {a['repeats']} fits per variant of {a['steps']} steps (first {a['warmup']} not timed), the six "
        "variants interleaved. Optimizers: `Adam(lr=1e-4)` (PyTorch's default foreach implementation), "
        "`Adam(lr=1e-4, fused=True)`, `SGD(lr=1e-3, momentum=0.9)`. *plain vs Adam*: the plain Trainer's step with "
        f"this optimizer over the one with foreach Adam; *mask_grads_*: timed in place. Rounds re-run: {redone(a)}. "
        f"Extra memory held by the callback: {d0['bytes_extra'] / 2**20:.1f} MiB = "
        f"{d0['bytes_extra'] / d0['weights']:.2f} B per target weight (the bool masks, and the bool ever-active "
        "masks behind `itop`).",
        "",
        harness.markdown_table(["optimizer", "plain ms/step", "plain vs Adam", "RigL ms/step", "RigL vs plain",
                                "mask_grads_ ms", "page faults / step (plain / RigL)"], rows_a),
        "",
        "The Adam rows carry the cost documented in the `pruning_overhead` section: on this CPU `torch.sqrt` is "
        "several times slower on exact zeros, and after masking Adam's `exp_avg_sq` is exactly 0 in 90% of its "
        "slots (the engine also zeroes the state of every changed slot at an update). SGD's step has no `sqrt`.",
        "",
        *part_a2,
        f"**(b) Update steps** (Adam): each method updating every {b['every']} steps (`SparsitySchedule(\"cubic\", "
        f"start=0, end={b['steps']}, every_n_steps={b['every']})`, drop fraction {s['drop_fraction']} cosine-decayed; "
        f"{b['methods']['rigl']['updates_per_fit']} updates per fit), {b['repeats']} fits per variant of {b['steps']} "
        f"steps (first {b['warmup']} not timed), interleaved; re-run rounds: {redone(b)}. GraNet is dense-to-sparse "
        "(its masks start dense and its between-update steps are cheaper early on). *normal step*: median step "
        "without an update; *update step − normal*: each update step minus the median normal step of its fit, "
        "median [min–max] over all updates; *`_update`*: the callback's update timed in place (policy, mask install "
        f"with the optimizer-state reset, logging); *in steps*: the update's extra time in plain steps; *amortised "
        f"over ΔT = {s['amortise']}*: ({s['amortise']} × normal step + update extra) / ({s['amortise']} × plain step).",
        "",
        harness.markdown_table(["method", "normal step ms", "vs plain", "update step − normal ms",
                                "`_update` ms", "in steps", f"amortised over ΔT = {s['amortise']}"], rows_b),
        "",
        f"**(c) Growth with size**: one square layer `Linear(w, w)` at {s['sparsity']:.0%}, drop fraction "
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
    a, b, c = res["between"], res["updates"], res["growth"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    ax = axes[0]
    labels, vals, lo, hi = [], [], [], []
    for opt in OPTIMIZERS:
        r = a["rows"][opt]
        labels.append(f"between\n{opt}")
        vals.append(r["ratio"]), lo.append(r["ratio"] - r["ratio_min"]), hi.append(r["ratio_max"] - r["ratio"])
    large = res.get("between_large", {}).get("rows", {})
    for opt, r in large.items():
        labels.append(f"between\n{opt}\nbatch {res['between_large']['batch']}")
        vals.append(r["ratio"]), lo.append(r["ratio"] - r["ratio_min"]), hi.append(r["ratio_max"] - r["ratio"])
    for m, v in b["methods"].items():
        labels.append(f"{_NAMES[m]}\namortised")
        vals.append(v["amortised_ratio"]), lo.append(0), hi.append(0)
    ax.bar(range(len(vals)), vals, yerr=[lo, hi], capsize=3, color=["tab:blue"] * len(OPTIMIZERS) + ["tab:cyan"] * len(large) + ["tab:green"] * len(b["methods"]))
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(1.05, color="gray", ls="--", lw=0.8, label="1.05× target")
    ax.set_xticks(range(len(vals)), labels, fontsize=7)
    ax.set_ylabel("step time / plain")
    ax.set_title(f"6×Linear({res['settings']['width']}) at {SPARSITY:.0%}: per-step overhead", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[1]
    for policy, v in c.items():
        ws = sorted(v["median_s"], key=int)
        ax.loglog([int(w) ** 2 for w in ws], [v["median_s"][w] * 1e3 for w in ws], marker="o", label=f"{policy} (slope {v['slope']:.2f})")
    ax.set_xlabel("parameters of the layer (N)")
    ax.set_ylabel("ms per update of the layer")
    ax.set_title("update cost vs layer size", fontsize=10)
    ax.legend(fontsize=8)
    harness.save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    harness.main("dst_overhead", run, render, plot, "DST step-time ratios and update cost", argv, threads=THREADS,
                 quick="small model, few fits")


if __name__ == "__main__":
    main()
