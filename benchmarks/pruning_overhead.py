"""Step-time and memory overhead of GradualPruning at 90% sparsity, inside a real Trainer.fit.

Same model, data and protocol as ``ema_overhead`` (6 x Linear(1024) MLP, batch 128, Adam, MSE
to random targets, glibc allocator pinned, interleaved fits, disturbed rounds re-run). Two
measurements, each with three variants (plain, ours, Lightning's) in the same run:

(a) *between pruning events*: ``GradualPruning`` with a one-shot schedule at step 0, so every
    timed step runs with 90% masks and no event; Lightning's ``ModelPruning`` (l1_unstructured,
    lottery ticket off) prunes to 90% at the end of the first short epoch, then never again.
    All variants share the same 10-step epochs; steps that straddle an epoch end are not timed.
    The three variants run twice, interleaved in the same rounds: with the default
    ``torch.optim.Adam(lr=1e-4)`` (single-tensor on CPU) and with ``Adam(lr=1e-4, fused=True)``;
    each is compared with the plain Trainer under the same optimizer. The fused set was added
    in a later session, after the first full run: the decomposition below showed that the
    default CPU Adam takes a slow path on the exact zeros of pruned slots (``sqrt`` of zero
    second moments), which inflated ours, and GradualPruning now tells CPU users to pass
    ``fused=True``; fused Adam is immune. The fused rows answer how far ours is from plain, and
    from its floor (plain + one masking pass, ``MaskEngine.mask_grads_`` timed in place), once
    that quirk is out of the way.
(b) *amortised over a gradual run*: 300 steps in 50-step epochs; ours prunes on the cubic
    schedule at steps 50, 100, ..., 250, ModelPruning at the ends of epochs 1-4 to the same
    sparsities. Mean time over all steps (events included), and the time of one event.

The masking work of ours (``engine.mask_grads_`` / ``engine.apply_``) and the forward
pre-hooks of ModelPruning are timed in place during the same fits. Outside the Trainer, each
phase of a step is timed (plain vs masked, default vs fused Adam).

OpenMP's wait policy is left at its default here (unlike ``pruning_quality``, which sets
``OMP_WAIT_POLICY=PASSIVE``): in an A/B of (a) at full size (6 fits per variant, processes run
default / PASSIVE / PASSIVE / default on a quiet machine) PASSIVE made every step ~20% slower
(plain 41.5 vs 31.8-34.4 ms) and moved the default-Adam ratio of ours (1.31-1.32x vs
1.38-1.40x); the fused-Adam ratios stayed close (1.11-1.15x vs 1.11-1.16x). Since it changes
what is measured, it is not set.

Run from the repository root: ``python -m benchmarks.pruning_overhead`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelPruning
from torch import nn
from torch.utils.data import DataLoader

from benchmarks import harness
from benchmarks.ema_overhead import Regression, mlp, random_loader, tensor_bytes
from lichtenberg.callbacks import GradualPruning
from lichtenberg.core.schedules import SparsitySchedule
from lichtenberg.core.sparsity import MaskEngine, topk_mask

__all__ = ["main", "run"]

THREADS = 2
SPARSITY = 0.9
MAX_FOREIGN = 0.1
OURS, THEIRS = "GradualPruning", "L-ModelPruning"
PHASES = ("forward+backward", "mask_grads_", "Adam step", "apply_", "float-mask mul (ref.)")
FUSED = ", fused Adam"  # suffix of the variants / setups with torch.optim.Adam(fused=True) (added later)


class Probe(Callback):
    """Last in the list: stamps every step, times the pruning work in place, reads the memory.

    ``times`` come back as (batch_idx of the step, seconds); a step whose next stamp is in a new
    epoch (or the end of fit) straddles an epoch end.
    """

    def __init__(self, pruner: Callback | None, last_step: int) -> None:
        self.pruner, self.last_step = pruner, last_step
        self.stamps: list[tuple[int, float]] = []
        self.hook: dict[str, list[float]] = {"mask_grads_": [], "apply_": [], "pre_hooks": [], "event": []}
        self.bytes_extra = 0
        self.targets = 0
        self.sparsity = float("nan")
        self._pre: float | None = None  # pre-hook seconds of the current step, once hooks exist

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        p = self.pruner
        if isinstance(p, GradualPruning):  # the optimizer post-hook looks engine.apply_ up at call time
            p.engine.mask_grads_ = harness.timed(p.engine.mask_grads_, self.hook["mask_grads_"])
            p.engine.apply_ = harness.timed(p.engine.apply_, self.hook["apply_"])
            p._update = harness.timed(p._update, self.hook["event"])
        elif isinstance(p, ModelPruning):
            p.apply_pruning = harness.timed(p.apply_pruning, self.hook["event"])

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if isinstance(self.pruner, ModelPruning):
            self._wrap_pre_hooks(pl_module)
        if trainer.global_step == self.last_step:
            self._read_memory(pl_module)
        self.stamps.append((batch_idx, time.perf_counter()))

    def on_train_end(self, *args: Any) -> None:
        self.stamps.append((0, time.perf_counter()))

    def _wrap_pre_hooks(self, pl_module: L.LightningModule) -> None:
        """Time torch.prune's forward pre-hooks by swapping each new hook's class for a timed subclass
        (not a wrapper function: the next event and ``make_pruning_permanent`` must still see a
        ``BasePruningMethod``)."""
        from torch.nn.utils.prune import BasePruningMethod

        if self._pre is not None:
            self.hook["pre_hooks"].append(self._pre)  # the previous step's forward
            self._pre = 0.0
        for h in (h for m in pl_module.modules() for h in m._forward_pre_hooks.values()):
            if isinstance(h, BasePruningMethod) and not getattr(h, "_timed", False):
                base, probe, self._pre = type(h), self, self._pre or 0.0

                def call(hook: Any, module: nn.Module, inputs: Any, _base: type = base) -> None:
                    t0 = time.perf_counter()
                    _base.__call__(hook, module, inputs)
                    probe._pre += time.perf_counter() - t0

                h.__class__ = type(f"Timed{base.__name__}", (base,), {"__call__": call, "_timed": True})

    def _read_memory(self, pl_module: L.LightningModule) -> None:
        """Bytes held by the Linear layers beyond weight + bias, and the sparsity of the weights in use."""
        extra, targets, zeros = 0, 0, 0
        for m in pl_module.modules():
            if not isinstance(m, nn.Linear):
                continue
            held = {id(t): t for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]}
            held |= {id(v): v for v in vars(m).values() if isinstance(v, torch.Tensor)}  # a materialised weight
            extra += tensor_bytes(held.values()) - tensor_bytes([m.weight, m.bias])
            targets += m.weight.numel()
            zeros += int((m.weight == 0).sum())
        self.bytes_extra, self.targets, self.sparsity = extra, targets, zeros / targets

    def step_times(self, warmup: int) -> tuple[list[float], list[float]]:
        """(steady: steps within an epoch, all: every step) after ``warmup`` steps."""
        steps = [(b[0] != 0, b[1] - a[1]) for a, b in zip(self.stamps, self.stamps[1:])][warmup:]
        return [t for inside, t in steps if inside], [t for _, t in steps]


def fit_once(build: Callable, loader: DataLoader, make: Callable, steps: int, warmup: int, optimizer: str) -> dict:
    torch.manual_seed(0)
    module = Regression(build(), optimizer)
    pruner = make()
    probe = Probe(pruner, steps - 1)
    trainer = harness.trainer(max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0,
                              callbacks=([pruner] if pruner is not None else []) + [probe])
    gc.collect()
    trainer.fit(module, loader)
    steady, every = probe.step_times(warmup)
    hooks = {k: statistics.median(v[warmup:]) if len(v) > warmup else 0.0 for k, v in probe.hook.items() if k != "event"}
    if isinstance(pruner, GradualPruning):
        hooks["mask buffers B"] = tensor_bytes(pruner.engine.masks.values())
    return {
        "median_s": statistics.median(steady), "mean_all_s": statistics.fmean(every), "steps_timed": len(steady),
        "hooks_s": hooks, "events_s": probe.hook["event"], "bytes_extra": probe.bytes_extra,
        "targets": probe.targets, "sparsity": probe.sparsity,
    }


def variants(epoch: int, steps: int, gradual: bool, fused: bool = False) -> dict[str, tuple[str, Callable[[], Callback | None]]]:
    """name -> (optimizer, callback factory). (a) ``gradual=False``: ours one-shot at step 0, ModelPruning
    at the end of epoch 0. (b) the same cubic ramp for both: ours at steps epoch, 2 epoch, ..., steps - epoch;
    ModelPruning at those epoch ends. ``fused``: ``Adam(fused=True)``, names suffixed with ``FUSED``."""
    sched = SparsitySchedule(kind="cubic", start=epoch, end=steps - epoch, every_n_steps=epoch)

    def amount(e: int) -> float:  # ModelPruning: fraction of the REMAINING weights pruned at the end of epoch e
        if not gradual:
            return SPARSITY if e == 0 else 0.0
        now, before = (sched.value(epoch * (k + 1), SPARSITY, epoch, steps - epoch) for k in (e, e - 1))
        return (now - before) / (1.0 - before) if now > before else 0.0

    opt, tag = ("adam_fused", FUSED) if fused else ("adam", "")
    return {
        "plain" + tag: (opt, lambda: None),
        OURS + tag: (opt, lambda: GradualPruning(SPARSITY, sched if gradual else SparsitySchedule(kind="one_shot", start=0, end=0),
                                                 allocation="uniform")),
        THEIRS + tag: (opt, lambda: ModelPruning("l1_unstructured", amount=amount, parameter_names=["weight"], verbose=0,
                                                 use_lottery_ticket_hypothesis=False, use_global_unstructured=False)),
    }


def _by_baseline(values: dict[str, list[float]]) -> list[dict[str, Any]]:
    """Ratio rows, each variant against the plain run with the same optimizer (``plain`` / ``plain`` + FUSED)."""
    rows = []
    for tag in ("", FUSED):
        group = {k: v for k, v in values.items() if k.endswith(FUSED) == bool(tag)}
        if group:
            rows += harness.ratio_table(group, "plain" + tag)
    return rows


def measure(width: int, steps: int, epoch: int, warmup: int, repeats: int, make: dict) -> dict[str, Any]:
    loader = random_loader(epoch * 128, width, 128)  # one epoch's data, seen again every epoch
    log: list[dict] = []
    extras: dict[str, list[dict]] = {}

    def call(optimizer: str, make: Callable) -> Callable[[], tuple[float, dict]]:
        def go() -> tuple[float, dict]:
            out = fit_once(lambda: mlp(width), loader, make, steps, warmup, optimizer)
            return out["median_s"], out

        return go

    times = harness.interleaved(
        {k: call(*v) for k, v in make.items()}, repeats, max_foreign=MAX_FOREIGN, log=log, extras=extras
    )
    means = {k: [x["mean_all_s"] for x in e] for k, e in extras.items()}
    return {
        "steps": steps, "epoch": epoch, "warmup": warmup, "repeats": repeats,
        "step_s": times, "rows": _by_baseline(times),
        "mean_s": means, "mean_rows": _by_baseline(means),
        "fits": {k: [{kk: vv for kk, vv in x.items() if kk != "median_s"} for x in e] for k, e in extras.items()},
        "rounds": log,
    }


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
        net = mlp(width)
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
    warnings.filterwarnings("ignore", ".*slow path on the exact zeros.*")  # the default-Adam rows mean to take it
    pinned = harness.pin_allocator()
    width = 256 if quick else 1024
    (r_a, r_b, r_d), (steps_b, epoch_b) = ((2, 1, 2), (100, 20)) if quick else ((16, 4, 8), (300, 50))
    res: dict[str, Any] = {"settings": dict(width=width, sparsity=SPARSITY, allocator_pinned=pinned, batch=128)}
    t0 = time.perf_counter()
    say = lambda msg: print(f"[pruning_overhead] {time.perf_counter() - t0:4.0f} s  {msg}", flush=True)  # noqa: E731
    say(f"(a) between events: 6x{width} MLP, 50 steps in 10-step epochs x {r_a} fits, default and fused Adam")
    res["between"] = measure(width, 50, 10, 12, r_a, variants(10, 50, False) | variants(10, 50, False, fused=True))
    say(f"(b) gradual: {steps_b} steps x {r_b} fits")
    res["gradual"] = measure(width, steps_b, epoch_b, 5, r_b, variants(epoch_b, steps_b, True))
    say(f"decomposition outside the Trainer x {r_d} bursts")
    res["phases"] = decompose(width, r_d)
    say("done")
    return res


def floor(a: dict[str, Any], tag: str) -> dict[str, Any]:
    """Plain + ours' in-place ``mask_grads_`` time (medians), as seconds and vs plain; ours vs that floor,
    with the min–max of the per-round ratios (round i: ours_i / (plain_i + mask_grads_i))."""
    plain, ours = a["step_s"]["plain" + tag], a["step_s"][OURS + tag]
    mg = [f["hooks_s"]["mask_grads_"] for f in a["fits"][OURS + tag]]
    floor_s = harness.median(plain) + harness.median(mg)
    pairs = [o / (p + m) for o, p, m in zip(ours, plain, mg)]
    return {"floor_s": floor_s, "floor_ratio": floor_s / harness.median(plain),
            "ours_vs_floor": {"ratio": harness.median(ours) / floor_s, "ratio_min": min(pairs), "ratio_max": max(pairs)}}


def render(res: dict[str, Any]) -> str:
    s, a, b, ph = res["settings"], res["between"], res["gradual"], res["phases"]
    ra, rb, mb = ({r["variant"]: r for r in rows} for rows in (a["rows"], b["rows"], b["mean_rows"]))
    ms = lambda v: f"{v * 1e3:.2f}"  # noqa: E731
    ratio = lambda r: f"{r['ratio']:.3f}× ({r['ratio_min']:.2f}–{r['ratio_max']:.2f})"  # noqa: E731
    redone = lambda m: str(sum(1 for x in m["rounds"] if not x["kept"]))  # noqa: E731
    tags = [t for t in ("", FUSED) if "plain" + t in ra]
    hook = {v + t: {k: harness.median([f["hooks_s"][k] for f in a["fits"][v + t]]) for k in ("mask_grads_", "apply_", "pre_hooks")}
            for v in (OURS, THEIRS) for t in tags}
    ev = {v: [t for f in b["fits"][v] for t in f["events_s"]] for v in (OURS, THEIRS)}
    n_ev = {v: len(b["fits"][v][-1]["events_s"]) for v in (OURS, THEIRS)}
    mem = {v: a["fits"][v][-1] for v in hook}
    fl = {t: floor(a, t) for t in tags}

    def rows_a(t: str) -> list[list[str]]:
        p, o, m = "plain" + t, OURS + t, THEIRS + t
        base = [p, f"{ms(ra[p]['median'])} [{ms(ra[p]['q1'])}–{ms(ra[p]['q3'])}]", "—", "—", "—", "0", "0", "—"]
        ours = [o, ms(ra[o]["median"]), f"**{ratio(ra[o])}**",
                f"mask_grads_ {ms(hook[o]['mask_grads_'])} + apply_ {ms(hook[o]['apply_'])}",
                f"{ms(fl[t]['floor_s'])} = {fl[t]['floor_ratio']:.3f}×; ours / floor {ratio(fl[t]['ours_vs_floor'])}"]
        theirs = [m, ms(ra[m]["median"]), ratio(ra[m]), f"pre-hooks {ms(hook[m]['pre_hooks'])}", "—"]
        for row, v in ((ours, o), (theirs, m)):
            row += [f"{mem[v]['bytes_extra'] / 2**20:.1f}", f"{mem[v]['bytes_extra'] / mem[v]['targets']:.2f}",
                    f"{min(f['sparsity'] for f in a['fits'][v]):.4f}"]
        return [base, ours, theirs]

    fused_text = []
    if FUSED in tags:
        pf, of = "plain" + FUSED, OURS + FUSED
        cross = harness.ratio_table({"plain": a["step_s"]["plain"], pf: a["step_s"][pf]}, "plain")[1]
        fused_text = [
            "",
            f"*Fused Adam* (the `{FUSED.strip(', ')}` rows, added in a later session after the first full run; same settings as "
            "the other rows): the same three variants with `torch.optim.Adam(lr=1e-4, fused=True)`, interleaved in the "
            "same rounds, each against the plain run with the same optimizer. Added because the decomposition below shows "
            "the default CPU Adam (single-tensor) taking a slow path on the exact zeros of pruned slots, which inflates ours; "
            "fused Adam is immune, and GradualPruning now tells CPU users to pass `fused=True`. The plain step with fused "
            f"Adam: {ms(ra[pf]['median'])} ms ({cross['ratio']:.3f}× the default Adam's plain step). With fused Adam, "
            f"GradualPruning costs {ra[of]['ratio']:.3f}× plain between events (target ≤ 1.05×: "
            f"{'met' if ra[of]['ratio'] <= 1.05 else 'not met'}); its floor, plain + one masking pass (`mask_grads_` "
            f"timed in place, {ms(hook[of]['mask_grads_'])} ms), is {fl[FUSED]['floor_ratio']:.3f}×, so ours is "
            f"{ms(ra[of]['median'] - fl[FUSED]['floor_s'])} ms per step above its floor.",
        ]
    return "\n".join([
        "## Pruning overhead per training step",
        "",
        f"6 × `Linear({s['width']})` MLP, batch {s['batch']}, Adam, MSE to random targets, CPU ({THREADS} torch threads), "
        f"{s['sparsity']:.0%} of each Linear weight pruned (biases dense); protocol as `ema_overhead` (interleaved fits, "
        f"allocator pinned: {'yes' if s['allocator_pinned'] else 'NO'}, rounds with > {MAX_FOREIGN:.0%} foreign CPU load "
        "re-run). Ours masks the gradients before each optimizer step (`mask_grads_`: one foreach multiply of the "
        "gradients' bit patterns by the bool masks, NaN-safe) and re-masks the weights after it only for optimizers that "
        "could move an exact zero (not SGD, Adam or AdamW, so `apply_` does not run here); Lightning's "
        "`ModelPruning(\"l1_unstructured\", parameter_names=[\"weight\"], "
        "use_lottery_ticket_hypothesis=False, use_global_unstructured=False)` (torch.nn.utils.prune) keeps "
        "`weight_orig` and a float mask and recomputes `weight = weight_orig * mask` in a forward pre-hook on every "
        "forward. Ratios: median of the per-fit medians / plain, in brackets the min–max of the per-round ratios. "
        "Target: ours ≤ 1.05× plain between events.",
        "",
        f"**(a) Between pruning events**: {a['repeats']} fits per variant of {a['steps']} steps in {a['epoch']}-step "
        f"epochs; ours prunes one-shot at step 0, ModelPruning at the end of epoch 0; the first {a['warmup']} steps and "
        "the steps that straddle an epoch end are not timed. Optimizer: `torch.optim.Adam(lr=1e-4)` (the default, "
        "single-tensor on CPU) and, in the fused rows, the same with `fused=True`; *vs plain*: against the plain run "
        "with the same optimizer. *Work*: the pruning code timed in place in the same fits "
        "(ModelPruning: its 6 pre-hooks; their backward is not timed). *Floor*: plain + ours' in-place `mask_grads_` "
        "time, what ours would cost if masking were its only cost; *ours / floor*: per-round min–max in brackets. "
        "*Extra memory*: bytes the Linear layers hold beyond weight + bias at the last step; *sparsity*: zeros of the "
        f"weights the forward uses. Rounds re-run: {redone(a)}.",
        "",
        harness.markdown_table(
            ["variant", "ms/step [IQR]", "vs plain", "work ms/step", "floor: plain + mask_grads_", "extra MiB",
             "extra B / weight", "sparsity"],
            [r for t in tags for r in rows_a(t)],
        ),
        *fused_text,
        "",
        f"**(b) Amortised over a gradual run**: {b['repeats']} fits per variant of {b['steps']} steps in {b['epoch']}-step "
        f"epochs (first {b['warmup']} not timed). Ours: cubic 0 → {s['sparsity']:.0%} at steps {b['epoch']}, "
        f"{2 * b['epoch']}, …, {b['steps'] - b['epoch']} ({n_ev[OURS]} events, the first at 0%); ModelPruning: the "
        f"same sparsities at the ends of epochs 1–{n_ev[THEIRS]} (callable `amount` = share of the remaining weights). "
        "*Mean step*: all steps, events and epoch ends included; *steady*: median step inside an epoch; "
        "*ms / event*: median [max] over all events. Re-run rounds: " + redone(b) + ".",
        "",
        harness.markdown_table(
            ["variant", "mean step ms", "mean vs plain", "steady vs plain", "events", "ms / event", "final sparsity"],
            [[v, ms(harness.median(b["mean_s"][v])), "—" if v == "plain" else ratio(mb[v]),
              "—" if v == "plain" else ratio(rb[v]), str(n_ev.get(v, 0)),
              f"{ms(harness.median(ev[v]))} [{ms(max(ev[v]))}]" if ev.get(v) else "—",
              "—" if v == "plain" else f"{min(f['sparsity'] for f in b['fits'][v]):.4f}"] for v in ("plain", OURS, THEIRS)],
        ),
        "",
        "**Where the time goes** (outside the Trainer, same model and batch; median ms per phase over interleaved "
        "bursts). *masked*: our `MaskEngine` after a one-shot 90% event before the first step, so Adam's state of the "
        "pruned slots is exactly 0, as after any event (the engine zeroes the state of newly pruned slots). *masked, "
        "state 1e-30*: the same with Adam's `exp_avg_sq` of pruned slots set to 1e-30 after the first step: identical "
        "(zero) updates, but `Adam.step`'s `sqrt` no longer meets exact zeros. *fused Adam* (rows added in a later "
        "session, with the fused rows of (a)): `Adam(lr=1e-4, fused=True)`. *apply_*: timed for reference; with Adam "
        "the callback does not run it, so the *step total* (forward+backward + mask_grads_ + Adam step) leaves it out. "
        "*float-mask mul*: apply_'s work done with float32 masks instead of bool ones, for reference (in no variant's "
        "step).",
        "",
        harness.markdown_table(
            ["setup", *PHASES, "step total"],
            [[k, *("—" if k.startswith("plain") and n not in ("forward+backward", "Adam step") else ms(harness.median(v[n]))
                   for n in PHASES), ms(sum(harness.median(v[n]) for n in PHASES[:3]))] for k, v in ph.items()],
        ),
    ])


def plot(res: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()
    a = res["between"]
    groups = [("(a) between events\ndefault Adam", a["rows"], ""), ("(a) between events\nfused Adam", a["rows"], FUSED),
              ("(b) gradual, amortised\ndefault Adam", res["gradual"]["mean_rows"], "")]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for i, v in enumerate((OURS, THEIRS)):
        rows = [next(r for r in g if r["variant"] == v + t) for _, g, t in groups]
        x = [j + (i - 0.5) * 0.35 for j in range(len(groups))]
        err = [[r["ratio"] - r["ratio_min"] for r in rows], [r["ratio_max"] - r["ratio"] for r in rows]]
        ax.bar(x, [r["ratio"] for r in rows], 0.35, yerr=err, capsize=3,
               label="GradualPruning (lichtenberg)" if v == OURS else "Lightning ModelPruning")
    for j, (_, _, t) in enumerate(groups[:2]):  # ours' floor: plain + one masking pass
        ax.hlines(floor(a, t)["floor_ratio"], j - 0.35, j, color="C3", lw=2, label="floor: plain + mask_grads_" if j == 0 else None)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(1.05, color="gray", ls="--", lw=0.8, label="1.05× target")
    ax.set_xticks(range(len(groups)), [g for g, _, _ in groups], fontsize=8)
    ax.set_ylabel("step time / plain")
    ax.set_title(f"Pruning at {SPARSITY:.0%}: training-step overhead (CPU, 6×Linear MLP)", fontsize=10)
    ax.set_ylim(0, max(r["ratio_max"] for _, g, _ in groups for r in g) + 0.5)  # room for the legend
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    harness.save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    harness.main("pruning_overhead", run, render, plot, "pruning step-time ratios", argv, threads=THREADS,
                 quick="small model, few fits")


if __name__ == "__main__":
    main()
