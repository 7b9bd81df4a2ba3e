"""Test accuracy of dynamic sparse training over seeds: static, SET, RigL, GraNet and SRigL vs dense.

For every seed, each variant trains the same student from the same initialisation on the same
data for the SAME number of optimizer steps (Adam, cosine LR to 0), then is tested; accuracy is
compared with the dense run of the same seed (paired Δ). Targets are the callback's defaults
(the weight of every Linear layer, first layer and classifier included).

Two tasks:

- *sparse teacher-student*: a random teacher MLP 64 -> 256 -> 256 -> 10 with 90% of every
  weight matrix zero (uniform random masks, He-scaled for the sparse fan-in, no hidden biases),
  drawn from the seed, labels Gaussian inputs x ~ N(0, I) by the argmax of its logits
  (classification; the logits are standardised per class on a calibration sample, an affine map
  the output layer absorbs, so the classes are roughly balanced and the teacher stays exactly
  inside the student's function class). The student has the teacher's shape. Labels are
  noiseless: a perfect student reaches 100%.
- *MNIST-1D MLP*: ``MLP(in_features=40, hidden=HIDDEN)`` on ``MNIST1DDataModule``.

Variants at 90% and 95%: static (random ERK masks, never updated), SET, RigL, GraNet
(dense-to-sparse: cubic ramp from 0; and sparse-to-sparse from 50%), SRigL, all with ERK
allocation, plus uniform allocation for static and RigL. The papers' defaults: cubic ramp /
updates from step 0 to 75% of training, drop fraction 0.3 with cosine decay, gamma 0.3 for SRigL;
except the update interval: the papers' delta T = 100 would give only 8 updates in our 1,200
steps, so delta T = 50 (17 updates, 18 for GraNet whose last prune falls at 75%).

Settings were fixed before the first full run and are printed with the results; the verdicts
on the papers' ordering (static < SET <= RigL ~ GraNet < dense) are computed from the numbers.

OpenMP threads wait passively (``OMP_WAIT_POLICY=PASSIVE`` unless set), as in ``pruning_quality``:
on a shared machine spinning threads slowed the fits many times over; the policy changes no
number, only the time.

Run from the repository root: ``python -m benchmarks.dst_quality [--seeds 3] [--quick]``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP; see the module docstring

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmarks import harness
from benchmarks.pruning_quality import evaluate_sparse
from lichtenberg.callbacks import DynamicSparseTraining
from lichtenberg.cli.data import MNIST1DDataModule
from lichtenberg.cli.models import MLP
from lichtenberg.core.schedules import SparsitySchedule
from lichtenberg.core.sparsity import random_masks

__all__ = ["TASKS", "main", "run"]

THREADS = 2
LR, BATCH, STEPS = 1e-3, 64, 1200  # Adam, cosine annealing to 0 over the run; the same step budget for every variant
START, END, EVERY = 0, 0.75, 50  # updates (and GraNet's ramp) from step 0 to 75% of training, every 50 steps
DROP_FRACTION, GAMMA = 0.3, 0.3  # the papers' drop fraction (cosine-decayed) and SRigL's ablation threshold
SPARSITIES = (0.9, 0.95)
GRANET_S2S_INITIAL = 0.5  # GraNet sparse-to-sparse: the ramp starts from 50% (dense-to-sparse starts from 0)
# Optimizer ablation at the first sparsity: the papers trained SET/RigL with SGD + momentum. Under Adam
# every weight's first step is about lr in size whatever its gradient, which may blunt RigL's choice.
SGD_LR, SGD_MOMENTUM = 0.05, 0.9  # cosine to 0 as the Adam runs; fixed before the first run with it
SGD = " (SGD)"  # suffix of the ablation's variant names; their Δ is against "dense (SGD)"
# sparse teacher-student
TEACHER_SIZES = (64, 256, 256, 10)
TEACHER_SPARSITY = 0.9
N_TRAIN, N_TEST, N_CALIBRATE = 16384, 4096, 16384
# MNIST-1D
HIDDEN = [512, 512]
NUM_SAMPLES = 4000  # 2,560 train / 800 test
TIE_PP = 0.5  # the ordering check: "≈" holds when |mean paired Δ| <= 0.5 pp, "≤" when the mean Δ >= -0.5 pp

# The ordering checked, link by link: (left, relation, right). "<" holds when the mean paired
# Δ = right - left is > 0, "≤" when it is >= -TIE_PP, "≈" when |Δ| <= TIE_PP.
CHAIN = (("static", "<", "SET"), ("SET", "≤", "RigL"), ("RigL", "≈", "GraNet"), ("RigL", "<", "dense"),
         ("GraNet", "<", "dense"))


class TeacherData(L.LightningDataModule):
    """Gaussian inputs labelled by a random sparse teacher MLP drawn from ``seed``."""

    def __init__(self, seed: int, n_train: int, n_test: int, batch_size: int = BATCH) -> None:
        super().__init__()
        self.seed, self.n_train, self.n_test, self.batch_size = seed, n_train, n_test, batch_size
        self.train_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    @staticmethod
    def teacher(seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
        g = torch.Generator().manual_seed(10_000 + seed)
        density = 1.0 - TEACHER_SPARSITY
        weights = []
        for fan_in, fan_out in zip(TEACHER_SIZES[:-1], TEACHER_SIZES[1:]):
            mask = random_masks({"w": torch.Size([fan_out, fan_in])}, {"w": density}, g)["w"]
            weights.append(torch.randn(fan_out, fan_in, generator=g) * math.sqrt(2.0 / (density * fan_in)) * mask)

        def raw(x: torch.Tensor) -> torch.Tensor:
            for i, w in enumerate(weights):
                x = x @ w.T
                x = x.relu() if i < len(weights) - 1 else x
            return x

        z = raw(torch.randn(N_CALIBRATE, TEACHER_SIZES[0], generator=g))
        mean, std = z.mean(0), z.std(0)  # per-class standardisation: row scale + bias of the output layer
        return lambda x: (raw(x) - mean) / std

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        teacher = self.teacher(self.seed)
        g = torch.Generator().manual_seed(20_000 + self.seed)
        x = torch.randn(self.n_train + self.n_test, TEACHER_SIZES[0], generator=g)
        y = teacher(x).argmax(-1)
        self.train_set = TensorDataset(x[: self.n_train], y[: self.n_train])
        self.test_set = TensorDataset(x[self.n_train :], y[self.n_train :])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(self.seed))

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=512)


def _optim(sgd: bool) -> dict[str, Any]:
    return dict(lr=SGD_LR, optimizer="sgd", momentum=SGD_MOMENTUM) if sgd else dict(lr=LR, optimizer="adam")


def _teacher_student(seed: int, quick: bool, sgd: bool = False) -> tuple[L.LightningModule, L.LightningDataModule]:
    model = MLP(in_features=TEACHER_SIZES[0], hidden=list(TEACHER_SIZES[1:-1]), num_classes=TEACHER_SIZES[-1],
                scheduler="cosine", **_optim(sgd))
    return model, TeacherData(seed, 256 if quick else N_TRAIN, 256 if quick else N_TEST)


def _mnist1d(seed: int, quick: bool, sgd: bool = False) -> tuple[L.LightningModule, L.LightningDataModule]:
    model = MLP(in_features=40, hidden=HIDDEN, scheduler="cosine", **_optim(sgd))
    return model, MNIST1DDataModule(num_samples=200 if quick else NUM_SAMPLES, batch_size=BATCH, seed=seed)


TASKS: dict[str, Callable] = {"sparse teacher-student": _teacher_student, "MNIST-1D MLP": _mnist1d}


def variants(quick: bool) -> dict[str, tuple[str, float, Callable]]:
    """name -> (family, sparsity, make(seed, every) -> callbacks); built fresh for every fit."""

    def dst(s: float, method: str, allocation: str = "erk", initial: float = 0.0) -> Callable:
        def make(seed: int, every: int) -> list:
            sched = SparsitySchedule(kind="cubic", start=START, end=END, every_n_steps=every, initial=initial)
            return [DynamicSparseTraining(s, method, sched, drop_fraction=DROP_FRACTION, allocation=allocation,
                                          seed=seed, gamma=GAMMA)]

        return make

    out: dict[str, tuple[str, float, Callable]] = {"dense": ("dense", 0.0, lambda seed, every: [])}
    for s in SPARSITIES[:1] if quick else SPARSITIES:
        p = f"{s:.0%}"
        out[f"static {p}"] = ("static", s, dst(s, "static"))
        out[f"static uniform {p}"] = ("static uniform", s, dst(s, "static", "uniform"))
        out[f"SET {p}"] = ("SET", s, dst(s, "set"))
        out[f"RigL {p}"] = ("RigL", s, dst(s, "rigl"))
        out[f"RigL uniform {p}"] = ("RigL uniform", s, dst(s, "rigl", "uniform"))
        out[f"GraNet {p}"] = ("GraNet", s, dst(s, "granet"))
        out[f"GraNet s2s {p}"] = ("GraNet s2s", s, dst(s, "granet", initial=GRANET_S2S_INITIAL))
        out[f"SRigL {p}"] = ("SRigL", s, dst(s, "srigl"))
    s = SPARSITIES[0]
    out["dense" + SGD] = ("dense" + SGD, 0.0, lambda seed, every: [])
    for method, fam in (("static", "static"), ("set", "SET"), ("rigl", "RigL")):
        out[f"{fam} {s:.0%}{SGD}"] = (fam + SGD, s, dst(s, method))
    return out


def fit_and_test(task: str, seed: int, make: Callable, steps: int, every: int, quick: bool,
                 sgd: bool = False) -> dict[str, Any]:
    L.seed_everything(seed, verbose=False)
    model, dm = TASKS[task](seed, quick, sgd=sgd)
    callbacks = make(seed, every)
    try:
        trainer, fit_s = harness.fit(model, dm, callbacks, max_steps=steps)
    except Exception as exc:  # a crash is a result
        return harness.crash_record(exc)
    out = {"fit_s": fit_s, "steps": trainer.global_step, **evaluate_sparse(model, dm, chunk=1024)}
    for cb in callbacks:
        if isinstance(cb, DynamicSparseTraining):
            out.update(itop=cb.itop, ablated=cb.ablated, updates=cb._updates, last_churn=cb._churn)
    return out


def run(seeds: int, quick: bool) -> dict[str, Any]:
    steps, every = (12, 3) if quick else (STEPS, EVERY)  # --quick: updates at steps 0, 3, 6 and 9
    results: dict[str, Any] = {
        "settings": dict(seeds=list(range(seeds)), optimizer="Adam, cosine LR to 0", lr=LR, batch=BATCH, steps=steps,
                         start=START, end=END, every_n_steps=every, drop_fraction=DROP_FRACTION, gamma=GAMMA,
                         sparsities=list(SPARSITIES), granet_s2s_initial=GRANET_S2S_INITIAL,
                         sgd=dict(lr=SGD_LR, momentum=SGD_MOMENTUM),
                         teacher=dict(sizes=list(TEACHER_SIZES), sparsity=TEACHER_SPARSITY, n_train=N_TRAIN,
                                      n_test=N_TEST), hidden=HIDDEN, num_samples=NUM_SAMPLES, tie_pp=TIE_PP),
        "tasks": {},
    }
    for task in TASKS:
        runs: dict[str, list[dict]] = {}
        t0 = time.perf_counter()
        for seed in range(seeds):
            for name, (family, target, make) in variants(quick).items():
                r = fit_and_test(task, seed, make, steps, every, quick, sgd=name.endswith(SGD))
                runs.setdefault(name, []).append({"seed": seed, "family": family, "target": target, **r})
                status = r.get("error") or (f"acc {r['acc']:.4f}, sparsity {r['sparsity']:.4f}, itop {r.get('itop', 1):.3f}, "
                                            f"{r['fit_s']:.1f} s")
                print(f"[dst_quality] {task} | seed {seed} | {name}: {status}", flush=True)
        results["tasks"][task] = {"runs": runs, "seconds": time.perf_counter() - t0}
    return results


def summarise(task: dict[str, Any]) -> dict[str, dict[str, Any]]:
    dense = {ref: {r["seed"]: r["acc"] for r in task["runs"].get(ref, []) if "acc" in r} for ref in ("dense", "dense" + SGD)}
    out = {}
    for name, runs in task["runs"].items():
        ok = [r for r in runs if "acc" in r]
        ref = dense["dense" + SGD if name.endswith(SGD) else "dense"]
        out[name] = {
            "family": runs[0]["family"],
            "target": runs[0]["target"],
            "acc": [r["acc"] for r in ok],
            "by_seed": {r["seed"]: r["acc"] for r in ok},
            "train_acc": [r["train_acc"] for r in ok],
            "d_acc": [r["acc"] - ref[r["seed"]] for r in ok if r["seed"] in ref],
            "sparsity": [r["sparsity"] for r in ok],
            "itop": [r["itop"] for r in ok if "itop" in r],
            "ablated": [r["ablated"] for r in ok if "ablated" in r],
            "updates": [r["updates"] for r in ok if "updates" in r],
            "errors": sorted({r["error"] for r in runs if "error" in r}),
        }
    return out


def _paired(summ: dict[str, dict[str, Any]], left: str, right: str) -> list[float] | None:
    """Paired differences right - left over the seeds both have, in pp (None if either is missing)."""
    a, b = summ.get(left), summ.get(right)
    if not a or not b:
        return None
    seeds = sorted(set(a["by_seed"]) & set(b["by_seed"]))
    return [100 * (b["by_seed"][s] - a["by_seed"][s]) for s in seeds] or None


def ordering(summ: dict[str, dict[str, Any]], sparsity: float, tie: float = TIE_PP) -> dict[str, Any]:
    """Check the papers' chain link by link at one sparsity; every verdict computed from the paired Δs."""
    name = {fam: next((n for n, v in summ.items() if v["family"] == fam and (fam == "dense" or v["target"] == sparsity)),
                      None) for fam in {f for link in CHAIN for f in link[::2]}}
    links, ok = [], True
    for left, rel, right in CHAIN:
        d = _paired(summ, name[left], name[right]) if name[left] and name[right] else None
        if d is None:
            links.append({"left": left, "rel": rel, "right": right, "delta": None, "holds": None})
            ok = False
            continue
        m, sd = harness.mean_std(d)
        holds = m > 0 if rel == "<" else m >= -tie if rel == "≤" else abs(m) <= tie
        ok = ok and holds
        links.append({"left": left, "rel": rel, "right": right, "delta": [m, sd], "holds": holds, "noise": abs(m) < sd})
    return {"links": links, "reproduced": ok}


def _ordering_lines(summ: dict[str, dict[str, Any]], sparsity: float, tie: float) -> list[str]:
    o = ordering(summ, sparsity, tie)
    parts = []
    for k in o["links"]:
        if k["delta"] is None:
            parts.append(f"{k['left']} {k['rel']} {k['right']}: missing")
            continue
        m, sd = k["delta"]
        mark = "✓" if k["holds"] else "✗"
        parts.append(f"{k['left']} {k['rel']} {k['right']} {mark} (Δ {m:+.2f} ± {sd:.2f}{', within seed noise' if k['noise'] else ''})")
    verdict = "**reproduced**" if o["reproduced"] else "**not reproduced**"
    extra = []
    for fam in ("static", "RigL"):
        a = next((n for n, v in summ.items() if v["family"] == f"{fam} uniform" and v["target"] == sparsity), None)
        b = next((n for n, v in summ.items() if v["family"] == fam and v["target"] == sparsity), None)
        d = _paired(summ, a, b) if a and b else None
        if d:
            m, sd = harness.mean_std(d)
            extra.append(f"{fam} ERK − uniform {m:+.2f} ± {sd:.2f} pp")
    return [f"- **{sparsity:.0%}**: static < SET ≤ RigL ≈ GraNet < dense {verdict}. " + "; ".join(parts) + "."
            + (f" Allocation: {'; '.join(extra)}." if extra else "")]


def _optimizer_lines(summ: dict[str, dict[str, Any]]) -> list[str]:
    """RigL − SET and SET − static (paired, pp) under Adam and under SGD + momentum, at the ablation's sparsity."""
    p = f"{SPARSITIES[0]:.0%}"
    parts = []
    for label, suffix in (("Adam", ""), ("SGD", SGD)):
        cells = []
        for left, right in (("static", "SET"), ("SET", "RigL")):
            d = _paired(summ, f"{left} {p}{suffix}", f"{right} {p}{suffix}")
            if d:
                m, sd = harness.mean_std(d)
                cells.append(f"{right} − {left} {m:+.2f} ± {sd:.2f}")
        if cells:
            parts.append(f"{label}: " + ", ".join(cells))
    return [f"- **Optimizer ablation, {p}** (paired, pp): " + "; ".join(parts) + "."] if len(parts) == 2 else []


def render(results: dict[str, Any]) -> str:
    s = results["settings"]
    t = s["teacher"]
    tie = s.get("tie_pp", TIE_PP)
    n_upd = len(range(s["every_n_steps"], round(s["end"] * s["steps"]), s["every_n_steps"]))
    lines = [
        "## Dynamic sparse training: test accuracy vs dense",
        "",
        f"{len(s['seeds'])} seeds (each sets the initialisation, the data, the shuffle and the mask generator, shared "
        f"by all variants of the seed). Every variant gets the same budget: {s['steps']} optimizer steps, "
        f"{s['optimizer']}, lr {s['lr']}, batch {s['batch']}. *Sparse teacher-student*: a random teacher MLP "
        f"{' → '.join(map(str, t['sizes']))} with {t['sparsity']:.0%} of every weight matrix zero (uniform random "
        "masks, He-scaled weights, no hidden biases; its logits standardised per class on a calibration sample), drawn "
        "from the seed, labels x ~ N(0, I) by argmax (classification, noiseless: 100% is reachable); "
        f"{t['n_train']:,} train / {t['n_test']:,} test inputs; the student is `MLP(in_features={t['sizes'][0]}, "
        f"hidden={list(t['sizes'][1:-1])})`, the teacher's shape. *MNIST-1D*: `MLP(in_features=40, hidden={s['hidden']})` "
        f"on `MNIST1DDataModule(num_samples={s['num_samples']})` (2,560 train / 800 test). Targets: the weight of every "
        "Linear layer, first layer and classifier included.",
        "",
        f"Variants: `DynamicSparseTraining(s, method, SparsitySchedule(\"cubic\", start={s['start']}, end={s['end']}, "
        f"every_n_steps={s['every_n_steps']}), drop_fraction={s['drop_fraction']}, allocation=\"erk\", gamma={s['gamma']})`"
        " with method *static* (random ERK masks, never updated), *SET*, *RigL*, *GraNet* (dense-to-sparse: the ramp "
        f"starts from 0), *GraNet s2s* (`initial={s['granet_s2s_initial']}`), *SRigL*; *uniform* rows use "
        f"`allocation=\"uniform\"`. The papers' ΔT = 100 would give {len(range(100, round(s['end'] * s['steps']), 100))} "
        f"updates in {s['steps']} steps; ΔT = {s['every_n_steps']} gives {n_upd} (GraNet one more, its last prune at "
        f"{s['end']:.0%}). Accuracy in %, mean ± std over seeds; Δ = paired difference to the dense run of the same seed "
        "(pp); *sparsity*: exact zeros over the target weights of the tested model; *ITOP*: in-time over-"
        "parameterisation, the share of target weights active at some point (`cb.itop`; static: 1 − sparsity); "
        "*ablated*: SRigL's ablated output neurons at the end (`cb.ablated`, sum over layers). Settings fixed before "
        "the first full run."
        + (f" *(SGD)* rows: the optimizer ablation, `SGD(lr={s['sgd']['lr']}, momentum={s['sgd']['momentum']})` with "
           "the same cosine schedule instead of Adam (the optimizer of the SET and RigL papers); their Δ is against "
           "*dense (SGD)*; added in a later run than the Adam settings." if "sgd" in s else ""),
        "",
        f"**Papers' ordering** static < SET ≤ RigL ≈ GraNet < dense, checked link by link on the paired Δ (right − "
        f"left, pp, mean ± std over seeds): `<` holds when the mean Δ > 0, `≤` when it is ≥ −{tie} pp, `≈` when "
        f"|Δ| ≤ {tie} pp; static, SET, RigL and GraNet are the ERK, dense-to-sparse rows; *within seed noise*: "
        "|mean| < std.",
    ]
    verdicts = []
    for task, tsk in results["tasks"].items():
        summ = summarise(tsk)
        lines += ["", f"### {task}", ""]
        rows = []
        for name, v in summ.items():
            if not v["acc"]:
                rows.append([name, f"**error:** {'; '.join(v['errors'])}", "", "", "", "", "", ""])
                continue
            err = f" (errors: {'; '.join(v['errors'])})" if v["errors"] else ""
            dense = name == "dense"
            rows.append([
                name + err, harness.pm(v["acc"]), harness.pm(v["train_acc"]), "—" if dense else harness.pm(v["d_acc"]),
                "—" if dense else f"{harness.mean_std(v['sparsity'])[0]:.2%}",
                "—" if not v["itop"] else f"{harness.mean_std(v['itop'])[0]:.3f}",
                str(round(harness.mean_std(v["ablated"])[0], 1)) if v["family"] == "SRigL" and v["ablated"] else "—",
                "—" if not v["updates"] else str(max(v["updates"])),
            ])
        lines.append(harness.markdown_table(
            ["variant", "test acc %", "train acc %", "Δ vs dense (pp)", "sparsity", "ITOP", "ablated", "updates"], rows))
        lines.append("")
        for sp in sorted({v["target"] for v in summ.values() if v["target"] > 0}):
            o = _ordering_lines(summ, sp, tie)
            verdicts.append((task, sp, ordering(summ, sp, tie)["reproduced"]))
            lines += o
        lines += _optimizer_lines(summ)
    ok = [f"{t} {sp:.0%}" for t, sp, r in verdicts if r]
    lines += ["", f"**Summary**: the papers' ordering reproduces in {len(ok)} of {len(verdicts)} task/sparsity cases"
              + (f" ({', '.join(ok)})." if ok else ".")]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()
    tasks = results["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 3.8), squeeze=False)
    colors = {0.9: "tab:blue", 0.95: "tab:orange"}
    for ax, (task, t) in zip(axes[0], tasks.items()):
        summ = summarise(t)
        families = list(dict.fromkeys(v["family"] for v in summ.values()
                                      if v["family"] != "dense" and not v["family"].endswith(SGD)))
        sps = sorted({v["target"] for v in summ.values() if v["target"] > 0})
        width = 0.8 / max(len(sps), 1)
        for j, sp in enumerate(sps):
            xs, ys, es = [], [], []
            for i, fam in enumerate(families):
                v = next((v for v in summ.values() if v["family"] == fam and v["target"] == sp and v["d_acc"]), None)
                if v is None:
                    continue
                m, sd = harness.mean_std([d * 100 for d in v["d_acc"]])
                xs.append(i + (j - (len(sps) - 1) / 2) * width)
                ys.append(m)
                es.append(sd)
            ax.bar(xs, ys, width, yerr=es, capsize=2, color=colors.get(sp), label=f"{sp:.0%} sparse")
        ax.axhline(0, color="k", lw=0.8)
        dm, _ = harness.mean_std([a * 100 for a in summ["dense"]["acc"]])
        ax.set_xticks(range(len(families)), families, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("Δ test accuracy vs dense (pp)")
        ax.set_title(f"{task} (dense {dm:.1f}%)", fontsize=10)
        ax.legend(fontsize=8, loc="lower left")
    fig.suptitle("Dynamic sparse training: paired Δ vs dense, same step budget (mean ± std over seeds)", fontsize=10)
    harness.save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    # --quick runs one seed unless --seeds says otherwise (3, the default, counts as not saying).
    harness.main("dst_quality", run, render, plot, "DST accuracy vs dense", argv, threads=THREADS,
                 quick="12 steps, one sparsity", seeds=3, quick_seeds=lambda n: 1 if n == 3 else n)


if __name__ == "__main__":
    main()
