"""Data pruning: samples forwarded, wall time and accuracy vs full data; DDP epoch lengths; EL2N noise detection.

Four parts, settings fixed as module constants before the first full run:

(a) **Speed and quality, one process.** ``DataPruning(ratio=0.5, anneal=0.125)`` (InfoBatch) and
    the static Data Diet mode (``mode="static", score="el2n", score_epochs=2, ratio=0.5``: EL2N
    during the first 2 full epochs, then the hardest 50% for the rest) vs full data, at equal
    epochs, on the digits CNN and the MNIST-1D MLP, 3 seeds. Per fit: samples forwarded,
    optimizer steps, wall time of ``Trainer.fit``, clean test accuracy. The fits of a seed run
    interleaved (rotating start), and a seed's round is re-run if other processes used more
    than ``MAX_FOREIGN`` of the CPUs meanwhile. All variants use a per-EPOCH cosine LR (what
    docs/reweighting.md recommends with DataPruning: a per-step schedule sized from the
    full-data step count would end early in pruned runs).
(b) **DDP, 2 processes on CPU** (``strategy="ddp_spawn", devices=2``): samples forwarded per
    rank and optimizer steps, full data vs DataPruning, plus an *emulation* of a pruning sampler
    that leaves distribution to Lightning (as InfoBatch's official sampler does): a plain
    sampler whose epochs shrink to the same kept counts, which Lightning wraps in its
    ``DistributedSamplerWrapper``. That wrapper fixes its length when the loader is set up and
    pads every epoch back to it, so the shrunk epochs cost as many steps as full ones.
(c) **EL2N label-noise detection**: digits with 15% label noise; EL2N of every training sample
    at the end of epochs 1, 2 and 3 (eval mode); AUROC of noisy vs clean for each epoch and for
    the mean over the three, 3 seeds; also for DataPruning's own in-training EL2N scores, and
    the share of noisy samples in the hardest 50% that Data Diet would keep.

Run from the repository root: ``python -m benchmarks.data_pruning [--seeds 3] [--quick]``.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Sampler

from benchmarks import harness
from lichtenberg.callbacks import DataPruning
from lichtenberg.cli.data import DigitsDataModule, MNIST1DDataModule
from lichtenberg.cli.models import MLP, SmallCNN
from lichtenberg.core.reweighting import el2n_scores, static_keep

__all__ = ["TASKS", "main", "run"]

THREADS = 2
LR, BATCH, EPOCHS = 1e-3, 64, 30  # Adam, cosine LR per epoch to 0
RATIO, ANNEAL = 0.5, 0.125  # InfoBatch's defaults
STATIC_EPOCHS = 2  # Data Diet: EL2N scores from the first 2 (full) epochs
MNIST1D_SAMPLES = 4000  # 2,560 train / 800 test
MAX_FOREIGN = 0.15  # share of the CPUs other processes may use during a kept round of (a)
DDP_EPOCHS, DDP_BATCH = 16, 32  # per rank: the global batch is 64 as in (a)
NOISE, NOISE_EPOCHS = 0.15, 3  # (c)
TARGETS = dict(forwarded=0.25, wall=0.20, acc_pp=0.5)  # >= 25% fewer samples, >= 20% less time, within 0.5 point


class _EpochCosine:
    """Adam with a cosine LR annealed to 0 over the EPOCHS (stepped once per epoch)."""

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.trainer.max_epochs))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


class EpochCosineCNN(_EpochCosine, SmallCNN):
    pass


class EpochCosineMLP(_EpochCosine, MLP):
    pass


def _digits(seed: int, quick: bool, label_noise: float = 0.0, batch: int = BATCH):
    return EpochCosineCNN(channels=32, lr=LR), DigitsDataModule(batch_size=batch, seed=seed, label_noise=label_noise)


def _mnist1d(seed: int, quick: bool):
    return (EpochCosineMLP(in_features=40, hidden=[256, 256], lr=LR),
            MNIST1DDataModule(num_samples=200 if quick else MNIST1D_SAMPLES, batch_size=BATCH, seed=seed))


TASKS: dict[str, Callable] = {"digits SmallCNN": _digits, "MNIST-1D MLP": _mnist1d}

VARIANTS: dict[str, Callable[[int], list[Callback]]] = {
    "full data": lambda seed: [],
    f"InfoBatch (ratio {RATIO}, anneal {ANNEAL})": lambda seed: [DataPruning(ratio=RATIO, anneal=ANNEAL, seed=seed)],
    f"Data Diet (static EL2N after {STATIC_EPOCHS} epochs, keep {1 - RATIO:.0%})": lambda seed: [
        DataPruning(ratio=RATIO, mode="static", score="el2n", score_epochs=STATIC_EPOCHS, seed=seed)],
}
FULL, INFOBATCH, STATIC = VARIANTS
# the control InfoBatch must beat: plain training cut to InfoBatch's sample budget (whole epochs, same cosine
# schedule over them), run after each seed's round because the budget is that seed's InfoBatch share
BUDGET = "full data, InfoBatch's budget (fewer epochs)"
VARIANTS[BUDGET] = lambda seed: []


class Counter(Callback):
    """Samples forwarded per epoch (the batches the training loop really ran); under DDP, per rank, saved to
    ``folder/rank{r}.json`` at the end of fit (ddp_spawn runs the callback in other processes)."""

    def __init__(self, folder: str | None = None) -> None:
        self.folder = folder
        self.per_epoch: dict[int, int] = {}
        self.batches = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            torch.set_num_threads(max(1, THREADS // trainer.world_size))  # 2 processes share the 2 cores

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.t0 = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.train_s = time.perf_counter() - self.t0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        x = batch[0]
        self.per_epoch[trainer.current_epoch] = self.per_epoch.get(trainer.current_epoch, 0) + int(x.shape[0])
        self.batches += 1

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.folder is not None:
            out = {"rank": trainer.global_rank, "steps": trainer.global_step, "batches": self.batches,
                   "train_s": self.train_s,
                   "per_epoch": [self.per_epoch.get(e, 0) for e in range(trainer.current_epoch)]}
            Path(self.folder, f"rank{trainer.global_rank}.json").write_text(json.dumps(out))

    @property
    def forwarded(self) -> int:
        return sum(self.per_epoch.values())


# -- (a) speed and quality -----------------------------------------------------------------------
def fit_and_test(task: str, variant: str, seed: int, epochs: int, quick: bool) -> dict[str, Any]:
    L.seed_everything(seed, verbose=False)
    model, dm = TASKS[task](seed, quick)
    counter = Counter()
    callbacks = [*VARIANTS[variant](seed), counter]
    try:
        trainer, fit_s = harness.fit(model, dm, callbacks, max_epochs=epochs)
    except Exception as exc:  # a crash is a result
        return harness.crash_record(exc)
    return {"fit_s": fit_s, "steps": trainer.global_step, "forwarded": counter.forwarded,
            "n_train": len(dm.train_set), "per_epoch": [counter.per_epoch.get(e, 0) for e in range(epochs)],
            **harness.evaluate(model, dm)}


def run_speed_quality(seeds: int, quick: bool) -> dict[str, Any]:
    epochs = 3 if quick else EPOCHS
    out: dict[str, Any] = {}
    for task in TASKS:
        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        rounds: list[dict] = []
        t0 = time.perf_counter()
        for seed in range(seeds):
            names = [v for v in VARIANTS if v != BUDGET]
            order = names[seed % len(names):] + names[:seed % len(names)]  # rotate the start over seeds

            def call(name: str, seed: int = seed) -> Callable[[], tuple[float, dict]]:
                def fit() -> tuple[float, dict]:
                    r = fit_and_test(task, name, seed, epochs, quick)
                    return r.get("fit_s", float("nan")), r
                return fit

            extras: dict[str, list] = {}
            harness.interleaved({n: call(n) for n in order}, 1, max_foreign=None if quick else MAX_FOREIGN,
                                log=rounds, extras=extras)
            for name in names:
                r = extras[name][0]
                runs[name].append({"seed": seed, **r})
                status = r.get("error") or (f"test acc {r['acc']:.4f}, {r['forwarded']} samples forwarded, "
                                            f"{r['steps']} steps, {r['fit_s']:.1f} s")
                print(f"[data_pruning] {task} | seed {seed} | {name}: {status}", flush=True)
            ib, full = runs[INFOBATCH][-1], runs[FULL][-1]
            if "forwarded" in ib and "forwarded" in full:
                budget = max(1, round(epochs * ib["forwarded"] / full["forwarded"]))
                r = fit_and_test(task, BUDGET, seed, budget, quick)
                runs[BUDGET].append({"seed": seed, "epochs": budget, **r})
                print(f"[data_pruning] {task} | seed {seed} | {BUDGET}: {budget} epochs, "
                      f"{r.get('error') or 'test acc %.4f' % r['acc']}", flush=True)
        out[task] = {"epochs": epochs, "runs": runs, "rounds": rounds, "seconds": time.perf_counter() - t0}
    return out


# -- (b) DDP ----------------------------------------------------------------------------------------
class ShrinkingSampler(Sampler):
    """A plain (non-distributed) sampler whose epoch e yields ``kept[e]`` random ids, InfoBatch-style: its length
    changes per epoch. Lightning wraps it in DistributedSamplerWrapper (and forwards ``set_epoch``)."""

    def __init__(self, n: int, kept: list[int], seed: int) -> None:
        self.n, self.kept, self.seed, self.epoch = n, kept, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.kept[self.epoch] if self.epoch < len(self.kept) else self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        return iter(torch.randperm(self.n, generator=g)[: len(self)].tolist())


class ShrinkingDigits(DigitsDataModule):
    """Digits whose train loader samples with a ShrinkingSampler (built once, like InfoBatch's loader)."""

    def __init__(self, kept: list[int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kept = kept

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size,
                          sampler=ShrinkingSampler(len(self.train_set), self.kept, self.seed))


def _ddp_fit(make_dm: Callable[[], L.LightningDataModule], callbacks: list[Callback], epochs: int,
             seed: int, **limits: Any) -> dict[str, Any]:
    """One 2-process fit; ``limits``: a smoke run's ``limit_train_batches`` (a full run passes none)."""
    with tempfile.TemporaryDirectory() as tmp:
        L.seed_everything(seed, verbose=False)
        model = EpochCosineCNN(channels=32, lr=LR)
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=epochs, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, num_sanity_val_steps=0, callbacks=[*callbacks, Counter(tmp)], **limits)
        t0 = time.perf_counter()
        try:
            trainer.fit(model, datamodule=make_dm())
        except Exception as exc:
            return harness.crash_record(exc)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(2)]
    fit_s = time.perf_counter() - t0
    (test,) = harness.trainer().test(model, datamodule=make_dm(), verbose=False)  # ddp_spawn returned rank 0's weights
    return {"fit_s": fit_s, "ranks": ranks, "acc": float(test["test_acc"])}


def run_ddp(quick: bool, seed: int = 0) -> dict[str, Any]:
    epochs = 3 if quick else DDP_EPOCHS
    # --quick: 4 batches per epoch, and ranks that exit without collecting torch and Lightning (the three
    # 2-process launches, each rank importing them afresh, still dominate)
    limits = {"limit_train_batches": harness.SMOKE_TRAIN_BATCHES} if quick else {}
    smoke = [harness.FreezeGC()] if quick else []
    dm0 = DigitsDataModule(batch_size=DDP_BATCH, seed=seed)
    dm0.setup("fit")
    n = len(dm0.train_set)
    out: dict[str, Any] = {"epochs": epochs, "batch_per_rank": DDP_BATCH, "n_train": n, "seed": seed}
    out["full data"] = _ddp_fit(lambda: DigitsDataModule(batch_size=DDP_BATCH, seed=seed), [*smoke], epochs, seed,
                                **limits)
    print(f"[data_pruning] DDP | full data: {_ddp_status(out['full data'])}", flush=True)
    out["DataPruning"] = _ddp_fit(lambda: DigitsDataModule(batch_size=DDP_BATCH, seed=seed),
                                  [DataPruning(ratio=RATIO, anneal=ANNEAL, seed=seed), *smoke], epochs, seed, **limits)
    print(f"[data_pruning] DDP | DataPruning: {_ddp_status(out['DataPruning'])}", flush=True)
    if "ranks" in out["DataPruning"]:
        kept = [2 * c for c in out["DataPruning"]["ranks"][0]["per_epoch"]]  # the global kept count of each epoch
        kept[0] = n  # the sampler's length at set-up: the first epoch is full in both
        out["kept"] = kept
        out["emulated"] = _ddp_fit(lambda: ShrinkingDigits(kept, batch_size=DDP_BATCH, seed=seed), [*smoke], epochs,
                                   seed, **limits)
        print(f"[data_pruning] DDP | shrinking sampler under DistributedSamplerWrapper: "
              f"{_ddp_status(out['emulated'])}", flush=True)
    return out


def _ddp_status(r: dict[str, Any]) -> str:
    if "error" in r:
        return r["error"]
    return "; ".join(f"rank {x['rank']}: {sum(x['per_epoch'])} samples, {x['steps']} steps" for x in r["ranks"])


# -- (c) EL2N label-noise detection --------------------------------------------------------------
class El2nProbe(Callback):
    """EL2N of every training sample at the end of each epoch (eval mode, full train set, given labels)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y, self.scores = x, y, []

    @torch.no_grad()
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        was = pl_module.training
        pl_module.eval()
        logits = torch.cat([pl_module(xb) for xb in self.x.split(512)])
        self.scores.append(el2n_scores(logits, self.y))
        pl_module.train(was)


def _auroc(noisy: torch.Tensor, scores: torch.Tensor) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(noisy.numpy().astype(int), scores.float().numpy()))


def run_el2n(seeds: int, quick: bool) -> dict[str, Any]:
    epochs = 2 if quick else NOISE_EPOCHS
    runs = []
    for seed in range(seeds):
        L.seed_everything(seed, verbose=False)
        model, dm = _digits(seed, quick, label_noise=NOISE)
        dm.setup("fit")
        x, y = dm.train_set.tensors
        noisy = dm.noisy_mask
        probe = El2nProbe(x, y)
        # A scorer only: ratio 0 keeps every sample after the scoring epochs, in the same shuffled
        # order, so training and in-training scores equal a run that scores in every epoch.
        dp = DataPruning(ratio=0.0, mode="static", score="el2n", score_epochs=epochs - 1, seed=seed)
        harness.fit(model, dm, [dp, probe], max_epochs=epochs)
        mean = torch.stack(probe.scores).mean(0)
        in_training = dp.scores.cpu()
        k = int(noisy.sum())
        kept = static_keep(in_training, 1.0 - RATIO)
        r = {
            "seed": seed, "n_train": len(y), "noisy": k,
            "auroc_epoch": [_auroc(noisy, s) for s in probe.scores],
            "auroc_mean": _auroc(noisy, mean),
            "auroc_in_training": _auroc(noisy, in_training),
            "precision_at_k": float(noisy[mean.argsort(descending=True)[:k]].float().mean()),
            "noisy_share_kept": float(noisy[kept].float().mean()),
            "hist": {"clean": mean[~noisy].tolist(), "noisy": mean[noisy].tolist()} if seed == 0 else None,
        }
        runs.append(r)
        print(f"[data_pruning] EL2N | seed {seed}: AUROC per epoch {[round(a, 3) for a in r['auroc_epoch']]}, "
              f"mean {r['auroc_mean']:.3f}, in-training {r['auroc_in_training']:.3f}", flush=True)
    return {"epochs": epochs, "label_noise": NOISE, "runs": runs}


def run(seeds: int, quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {
        "settings": dict(seeds=list(range(seeds)), optimizer="Adam, cosine LR per epoch to 0", lr=LR, batch=BATCH,
                         epochs=3 if quick else EPOCHS, ratio=RATIO, anneal=ANNEAL, static_epochs=STATIC_EPOCHS,
                         mnist1d_samples=MNIST1D_SAMPLES, max_foreign=MAX_FOREIGN, ddp_epochs=DDP_EPOCHS,
                         ddp_batch=DDP_BATCH, noise=NOISE, noise_epochs=NOISE_EPOCHS, targets=TARGETS),
    }
    t0 = time.perf_counter()
    results["speed_quality"] = run_speed_quality(seeds, quick)
    results["ddp"] = run_ddp(quick)
    results["el2n"] = run_el2n(seeds, quick)
    results["seconds"] = time.perf_counter() - t0
    return results


# -- report ----------------------------------------------------------------------------------------
def summarise(task: dict[str, Any]) -> dict[str, dict[str, Any]]:
    full = {r["seed"]: r for r in task["runs"][FULL] if "acc" in r}
    out = {}
    for name, runs in task["runs"].items():
        ok = [r for r in runs if "acc" in r and r["seed"] in full]
        out[name] = {
            "acc": [r["acc"] for r in ok],
            "d_acc": [r["acc"] - full[r["seed"]]["acc"] for r in ok],
            "forwarded_share": [r["forwarded"] / full[r["seed"]]["forwarded"] for r in ok],
            "steps_share": [r["steps"] / full[r["seed"]]["steps"] for r in ok],
            "forwarded": [r["forwarded"] for r in ok],
            "steps": [r["steps"] for r in ok],
            "fit_s": [r["fit_s"] for r in ok],
            "time_ratio": [r["fit_s"] / full[r["seed"]]["fit_s"] for r in ok],
            "errors": sorted({r["error"] for r in runs if "error" in r}),
        }
    return out


def _targets(v: dict[str, Any]) -> tuple[bool, bool, bool]:
    fwd = 1 - harness.mean_std(v["forwarded_share"])[0] >= TARGETS["forwarded"]
    wall = 1 - harness.median(v["time_ratio"]) >= TARGETS["wall"]
    acc = harness.mean_std(v["d_acc"])[0] * 100 >= -TARGETS["acc_pp"]
    return fwd, wall, acc


def render(results: dict[str, Any]) -> str:
    s = results["settings"]
    yes = lambda ok: "yes" if ok else "**no**"  # noqa: E731
    lines = [
        "## Data pruning: samples forwarded, wall time, accuracy; DDP; EL2N noise detection",
        "",
        f"**(a) One process.** {len(s['seeds'])} seeds (each sets the initialisation, the split and the shuffle; "
        "DataPruning's own draws use `seed=` the same seed). digits: `SmallCNN(channels=32)` on `DigitsDataModule` "
        "(1,257 train / 270 test); MNIST-1D: `MLP(in_features=40, hidden=[256, 256])` on "
        f"`MNIST1DDataModule(num_samples={s['mnist1d_samples']})` (2,560 train / 800 test). {s['optimizer']} (a "
        f"per-step schedule sized from the full-data step count would end early in pruned runs), lr {s['lr']}, batch "
        f"{s['batch']}, {s['epochs']} epochs for every variant but the control. *InfoBatch*: `DataPruning(ratio={s['ratio']}, "
        f"anneal={s['anneal']})`; *Data Diet*: `DataPruning(ratio={s['ratio']}, mode=\"static\", score=\"el2n\", "
        f"score_epochs={s['static_epochs']})`. *{BUDGET}*: the control InfoBatch has to beat, plain training for "
        "round(epochs × InfoBatch's forwarded share of the same seed) epochs, the cosine schedule over those epochs "
        "(run after the seed's round, not interleaved with it). *forwarded*: samples the training loop really ran (counted per batch), "
        "as a share of the full-data run of the same seed; *wall time*: `Trainer.fit` (set-up, dataloader reloads "
        "and the callback's work included; no validation), ratio to the full-data fit of the same seed, median over "
        "seeds [min–max]. The fits of a seed ran back to back in rotating order; a seed's round was re-run when "
        f"other processes used > {s['max_foreign']:.0%} of the CPUs. Accuracy in %, mean ± std; Δ = paired "
        f"difference to full data (pp). Targets: ≥ {s['targets']['forwarded']:.0%} fewer samples forwarded, ≥ "
        f"{s['targets']['wall']:.0%} less wall time, accuracy within {s['targets']['acc_pp']} point (mean Δ ≥ "
        f"−{s['targets']['acc_pp']} pp).",
        "",
    ]
    rows = []
    for task, t in results["speed_quality"].items():
        summ = summarise(t)
        for name, v in summ.items():
            if not v["acc"]:
                rows.append([task, name, f"**error:** {'; '.join(v['errors'])}", "", "", "", "", "", ""])
                continue
            full = name == FULL
            fwd_m = harness.mean_std(v["forwarded_share"])[0]
            tr = v["time_ratio"]
            cells = [
                task, name, harness.pm(v["acc"]), "—" if full else harness.pm(v["d_acc"]),
                f"{harness.mean_std(v['forwarded'])[0]:,.0f}" + ("" if full else f" ({fwd_m:.1%})"),
                f"{harness.mean_std(v['steps'])[0]:,.0f}" + ("" if full else f" ({harness.mean_std(v['steps_share'])[0]:.1%})"),
                f"{harness.median(v['fit_s']):.1f}" + ("" if full else f" ({harness.median(tr):.3f}× [{min(tr):.2f}–{max(tr):.2f}])"),
            ]
            if full:
                cells.append("—")
            elif name == BUDGET:
                cells.append(f"(control: {harness.mean_std([r['epochs'] for r in t['runs'][BUDGET] if 'acc' in r])[0]:.1f} "
                             "epochs)")
            else:
                f_ok, w_ok, a_ok = _targets(v)
                cells.append(f"{yes(f_ok)} / {yes(w_ok)} / {yes(a_ok)}")
            rows.append(cells)
        redone = sum(1 for x in t["rounds"] if not x["kept"])
        flagged = sum(1 for x in t["rounds"] if x["kept"] and x["disturbed"])
        t["_redone"] = f"{task}: {redone} round(s) re-run" + (f", {flagged} kept disturbed" if flagged else "")
    lines.append(harness.markdown_table(
        ["task", "variant", "test acc %", "Δ acc (pp)", "samples forwarded (share)", "optimizer steps (share)",
         "fit s, median (ratio [min–max])", "targets: samples / time / acc"], rows))
    lines += ["", "Rounds: " + "; ".join(t.pop("_redone") for t in results["speed_quality"].values()) + "."]
    versus = []
    for task, t in results["speed_quality"].items():
        ctrl = {r["seed"]: r["acc"] for r in t["runs"].get(BUDGET, []) if "acc" in r}
        diffs = [r["acc"] - ctrl[r["seed"]] for r in t["runs"][INFOBATCH] if "acc" in r and r["seed"] in ctrl]
        if diffs:
            versus.append(f"{task} {harness.pm(diffs)} pp")
    if versus:
        lines += ["", "InfoBatch minus the control at the same sample budget (paired by seed): " + "; ".join(versus)
                  + ". Positive: InfoBatch's choice of samples beats simply training fewer epochs."]
    per_epoch = []
    for task, t in results["speed_quality"].items():
        runs = t["runs"][INFOBATCH]
        r0 = next((r for r in runs if "per_epoch" in r), None)
        if r0:
            per_epoch.append(f"{task} (seed {r0['seed']}, of {r0['n_train']:,}): "
                             + ", ".join(f"{c:,}" for c in r0["per_epoch"]))
    if per_epoch:
        lines += ["", "InfoBatch, samples forwarded per epoch: " + "; ".join(per_epoch) + "."]

    d = results["ddp"]
    lines += [
        "",
        f"**(b) DDP, 2 processes on CPU** (`strategy=\"ddp_spawn\", devices=2, accelerator=\"cpu\"`), digits CNN, "
        f"batch {d['batch_per_rank']} per rank (global {2 * d['batch_per_rank']}), {d['epochs']} epochs, seed "
        f"{d['seed']}, {d['n_train']:,} training samples. *full data*: Lightning's own DistributedSampler; "
        f"*DataPruning*: `DataPruning(ratio={s['ratio']}, anneal={s['anneal']})`, whose sampler Lightning leaves "
        "alone; *shrinking sampler, Lightning-wrapped*: an emulation of a pruning sampler that leaves distribution "
        "to Lightning, as InfoBatch's official sampler does (InfoBatch itself is not installed): a plain sampler "
        "whose epoch e yields a random subset of the size DataPruning kept in epoch e, in a loader built once; "
        "Lightning wraps it in `DistributedSamplerWrapper`, whose length is fixed at set-up, so every epoch is "
        "padded back to the full length by repeating samples. Counted per rank by a callback in each process; "
        "*train s*: rank 0's `on_train_start` to `on_train_end` (process start-up excluded); *test acc*: the weights "
        "ddp_spawn returns to the main process, on the test split (one seed: the DDP rows show cost, not quality).",
        "",
    ]
    rows = []
    full_steps = full_train_s = full_acc = None
    for name, key in (("full data", "full data"), ("DataPruning", "DataPruning"),
                      ("shrinking sampler, Lightning-wrapped (emulation)", "emulated")):
        r = d.get(key)
        if r is None:
            continue
        if "error" in r:
            rows.append([name, f"**error:** {r['error']}", "", "", "", "", ""])
            continue
        steps = [x["steps"] for x in r["ranks"]]
        fwd = [sum(x["per_epoch"]) for x in r["ranks"]]
        if key == "full data":
            full_steps, full_fwd = steps[0], fwd[0]
        distinct = "—"
        if key == "full data":
            distinct = f"{d['n_train'] * d['epochs']:,}; {sum(fwd) - d['n_train'] * d['epochs']:,} padded repeats"
        elif key == "DataPruning":
            distinct = f"{sum(fwd):,} (each once per epoch)"
        elif key == "emulated" and "kept" in d:
            distinct = f"{sum(d['kept']):,}; {sum(fwd) - sum(d['kept']):,} padded repeats"
        rel = "" if full_steps is None or key == "full data" else f" ({steps[0] / full_steps:.1%})"
        rel_f = "" if full_steps is None or key == "full data" else f" ({fwd[0] / full_fwd:.1%})"
        train_s = r["ranks"][0].get("train_s")
        if key == "full data":
            full_train_s, full_acc = train_s, r.get("acc")
        rel_t = "" if key == "full data" or not full_train_s else f" ({train_s / full_train_s:.3f}×)"
        acc = "" if r.get("acc") is None else f"{r['acc'] * 100:.2f}" + (
            "" if key == "full data" or full_acc is None else f" ({(r['acc'] - full_acc) * 100:+.2f} pp)")
        rows.append([name, " / ".join(f"{f:,}" for f in fwd) + rel_f, " / ".join(str(x) for x in steps) + rel,
                     f"{train_s:.1f}{rel_t}" if train_s else "—", acc,
                     distinct, ", ".join(str(c) for c in r["ranks"][0]["per_epoch"])])
    lines.append(harness.markdown_table(
        ["variant", "samples forwarded, rank 0 / rank 1 (vs full)", "optimizer steps, rank 0 / rank 1 (vs full)",
         "train s, rank 0 (vs full)", "test acc % (Δ)", "distinct samples, both ranks", "rank 0 samples per epoch"],
        rows))

    e = results["el2n"]
    ok = e["runs"]
    au = lambda key: harness.pm([r[key] for r in ok], 1.0, 3)  # noqa: E731
    lines += [
        "",
        f"**(c) EL2N label-noise detection.** digits with {e['label_noise']:.0%} label noise "
        f"(`DigitsDataModule(label_noise={e['label_noise']})`, {ok[0]['noisy']} of {ok[0]['n_train']:,} train labels "
        f"flipped), the CNN of (a) trained {e['epochs']} epochs; EL2N = ‖softmax − onehot(given label)‖₂ of every "
        "training sample at the end of each epoch (eval mode, `core.reweighting.el2n_scores`). AUROC of the score "
        "separating flipped from clean samples (1 = perfect, 0.5 = chance), mean ± std over "
        f"{len(ok)} seeds. *In-training*: DataPruning's own scores (`mode=\"static\", score=\"el2n\"`: each sample's "
        f"EL2N from its latest training batch, train mode); *precision@k*: share of flipped samples among the k "
        "highest mean scores, k = the number flipped; *noisy share of the kept 50%*: what Data Diet would keep "
        "(the hardest half by the in-training scores). Target: AUROC > 0.9.",
        "",
    ]
    n_ep = len(ok[0]["auroc_epoch"])
    mean_auc = harness.mean_std([r["auroc_mean"] for r in ok])[0]
    lines.append(harness.markdown_table(
        [*(f"AUROC epoch {i + 1}" for i in range(n_ep)), f"AUROC mean of epochs 1–{n_ep}", "AUROC in-training",
         "precision@k", "noisy share of the kept 50%", "target > 0.9"],
        [[*(harness.pm([r["auroc_epoch"][i] for r in ok], 1.0, 3) for i in range(n_ep)), au("auroc_mean"),
          au("auroc_in_training"), harness.pm([r["precision_at_k"] for r in ok]), harness.pm([r["noisy_share_kept"] for r in ok]),
          yes(mean_auc > 0.9)]]))
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    tasks = list(results["speed_quality"])
    names = [INFOBATCH, STATIC]
    short = {INFOBATCH: "InfoBatch", STATIC: "Data Diet"}
    ax = axes[0, 0]
    width = 0.2
    for j, task in enumerate(tasks):
        summ = summarise(results["speed_quality"][task])
        for i, n in enumerate(names):
            v = summ[n]
            if not v["acc"]:
                continue
            x = j + (2 * i - 1) * width
            ax.bar(x - width / 2, harness.mean_std(v["forwarded_share"])[0], width, color="tab:blue",
                   label="samples forwarded" if (i, j) == (0, 0) else None)
            tr = v["time_ratio"]
            ax.bar(x + width / 2, harness.median(tr), width, color="tab:orange",
                   yerr=[[harness.median(tr) - min(tr)], [max(tr) - harness.median(tr)]], capsize=3,
                   label="wall time" if (i, j) == (0, 0) else None)
            ax.text(x, 0.03, short[n], rotation=90, ha="center", va="bottom", fontsize=7, color="white")
    ax.axhline(1 - TARGETS["forwarded"], color="tab:blue", ls="--", lw=0.8)
    ax.axhline(1 - TARGETS["wall"], color="tab:orange", ls="--", lw=0.8)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("share of the full-data run")
    ax.set_title("(a) cost vs full data (dashed: targets)", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    for j, task in enumerate(tasks):
        summ = summarise(results["speed_quality"][task])
        for i, n in enumerate(names):
            if summ[n]["d_acc"]:
                m, sd = harness.mean_std([x * 100 for x in summ[n]["d_acc"]])
                ax.bar(j + (i - 0.5) * 0.35, m, 0.35, yerr=sd, capsize=3, color=["tab:green", "tab:purple"][i],
                       label=short[n] if j == 0 else None)
    ax.axhline(0, color="k", lw=0.8)
    ax.axhline(-TARGETS["acc_pp"], color="gray", ls="--", lw=0.8)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("Δ test accuracy vs full data (pp)")
    ax.set_title("(a) accuracy (dashed: −0.5 pp)", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[1, 0]
    d = results["ddp"]
    for key, label, style in (("full data", "full data", "-"), ("DataPruning", "DataPruning", "-o"),
                              ("emulated", "shrinking sampler, Lightning-wrapped", "--s")):
        r = d.get(key)
        if r and "ranks" in r:
            ax.plot(range(1, len(r["ranks"][0]["per_epoch"]) + 1), r["ranks"][0]["per_epoch"], style, label=label, ms=4)
    if "kept" in d:
        ax.plot(range(1, len(d["kept"]) + 1), [k / 2 for k in d["kept"]], ":", color="k", label="kept / 2 (distinct)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("samples forwarded by rank 0")
    ax.set_title("(b) 2-process DDP: per-rank epoch length", fontsize=10)
    ax.legend(fontsize=7)
    ax = axes[1, 1]
    r0 = next((r for r in results["el2n"]["runs"] if r.get("hist")), None)
    if r0:
        bins = torch.linspace(0, math.sqrt(2), 30).tolist()
        ax.hist(r0["hist"]["clean"], bins=bins, alpha=0.6, density=True, label="clean labels")
        ax.hist(r0["hist"]["noisy"], bins=bins, alpha=0.6, density=True, label="flipped labels")
        ax.set_title(f"(c) mean EL2N, epochs 1–{len(r0['auroc_epoch'])}, seed {r0['seed']}: AUROC {r0['auroc_mean']:.3f}",
                     fontsize=10)
        ax.set_xlabel("EL2N")
        ax.legend(fontsize=8)
    harness.save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    harness.main("data_pruning", run, render, plot, "data pruning: cost, accuracy, DDP epoch lengths and EL2N", argv,
                 threads=THREADS, quick="1 seed, 3 epochs of 4 batches, small data", seeds=3, quick_seeds=lambda n: 1)


if __name__ == "__main__":
    main()
