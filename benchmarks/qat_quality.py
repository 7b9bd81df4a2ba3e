"""Quality of quantization-aware training over seeds: W8A8 ... binary vs FP32, QAT vs PTQ, LSQ vs stat, ReSTE vs STE.

For every seed, each variant trains the same model from the same initialisation on the same
data for the same number of steps, with ``QuantizationAwareTraining`` attached (quantization
starts after a float warm-up of ``START`` of training), then tests the fake-quant model it
holds; the result is compared with the FP32 run of the same seed (paired Δ).

Post-training quantization (PTQ) uses the same quantizers without any training: each seed's
trained FP32 model is copied, the callback's own ``setup`` swaps its layers exactly as in a
QAT run, the quantizers are enabled (what the callback does at ``start_step``) and the model
is tested. Weight scales come from the weights alone (LSQ: its initial scale
2·mean|w|/sqrt(Q_P); minmax: max|w|/Q_P; stat: 2·mean|w|), and activations are quantized
dynamically per token / tensor, so no calibration data are needed and none are used.

Tasks (``lichtenberg.cli``): SmallCNN on digits and an MLP on MNIST-1D (test accuracy), and
the tiny character transformer LM on ``pydoc_data`` (validation loss and next-character
accuracy; fewer variants, see ``LM_VARIANTS``).

Settings were fixed before the first full run and are printed with the results. OpenMP threads
wait passively (``OMP_WAIT_POLICY=PASSIVE`` unless set), as in ``pruning_quality``: it changes no
result, only the wall time on a shared machine.

Run from the repository root: ``python -m benchmarks.qat_quality [--seeds 3] [--quick]``.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Before torch loads OpenMP, as in pruning_quality: on the shared 2-core machine spinning OpenMP
# threads slow small fits many times over whenever another process is busy. No number changes.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import lightning as L
import torch
import torch.nn.functional as F

from benchmarks import harness
from benchmarks.pruning_quality import BATCH, EPOCHS, LR, digits_task, mnist1d_task
from benchmarks.qat_overhead import attach
from lichtenberg.callbacks import QuantizationAwareTraining
from lichtenberg.cli.data import CharTextDataModule
from lichtenberg.cli.models import TinyTransformerLM
from lichtenberg.core.quantization import quant_modules

__all__ = ["TASKS", "main", "run"]

THREADS = 2
# digits / MNIST-1D: pruning_quality's two tasks and its LR, BATCH, EPOCHS (Adam, cosine LR to 0), imported above
LM_LR, LM_BATCH, LM_EPOCHS = 3e-3, 32, 5  # char LM: Adam, cosine LR to 0
LM_CHARS, LM_CONTEXT = 200_000, 64  # 2,770 train / 308 val windows of 64 characters
START = 0.1  # quantization starts after 10% of training in float (every QAT variant)
# Targets (the claims), judged on the mean paired Δ vs FP32 of the same seed, in points of
# accuracy (the LM: next-character accuracy):
TARGET_W8A8, TARGET_W4A4 = -0.5, -2.0
QAT_VS_PTQ_MARGIN = 1.0  # "QAT clearly above PTQ": QAT - PTQ > 0 in every seed and >= 1 point on average

# QAT variants: name -> QuantizationAwareTraining kwargs (granularity "channel", activations
# "dynamic": the callback's defaults). freeze_step=1.0 resolves to the step after the last one:
# it switches oscillation tracking on for the LSQ rows without freezing anything.
QAT: dict[str, dict[str, Any] | None] = {
    "FP32": None,
    "W8A8": dict(weight_bits=8, activation_bits=8),
    "W4A8": dict(weight_bits=4, activation_bits=8, freeze_step=1.0),
    "W4A4": dict(weight_bits=4, activation_bits=4),
    "W2A8": dict(weight_bits=2, activation_bits=8, freeze_step=1.0),
    "ternary A8": dict(weight_bits="ternary", activation_bits=8),
    "binary A8 (ReSTE)": dict(weight_bits="binary", activation_bits=8),
    "binary A8 (STE)": dict(weight_bits="binary", activation_bits=8, weight_method="ste"),
    "W4A8 stat": dict(weight_bits=4, activation_bits=8, weight_method="stat"),
    "W2A8 stat": dict(weight_bits=2, activation_bits=8, weight_method="stat"),
}
# PTQ: name -> (kwargs of the quantizers attached to the trained FP32 model, the QAT row it is paired with)
PTQ: dict[str, tuple[dict[str, Any], str]] = {
    "PTQ W8A8": (dict(weight_bits=8, activation_bits=8), "W8A8"),
    "PTQ W4A8": (dict(weight_bits=4, activation_bits=8), "W4A8"),
    "PTQ W2A8": (dict(weight_bits=2, activation_bits=8), "W2A8"),
    "PTQ W4A8 minmax": (dict(weight_bits=4, activation_bits=8, weight_method="minmax"), "W4A8"),
    "PTQ W2A8 minmax": (dict(weight_bits=2, activation_bits=8, weight_method="minmax"), "W2A8"),
    "PTQ W4A8 stat": (dict(weight_bits=4, activation_bits=8, weight_method="stat"), "W4A8 stat"),
    "PTQ W2A8 stat": (dict(weight_bits=2, activation_bits=8, weight_method="stat"), "W2A8 stat"),
}
# The LM trains fewer variants (its fits are the slowest): no stat and no STE rows.
LM_VARIANTS = ("FP32", "W8A8", "W4A8", "W4A4", "W2A8", "ternary A8", "binary A8 (ReSTE)")
QUICK_VARIANTS = ("FP32", "W4A8", "W2A8 stat", "binary A8 (ReSTE)")
QUICK_PTQ = ("PTQ W4A8",)
QUICK_BATCHES = 10  # --quick: batches per epoch; enough that START (10%) is a step after a float one on every task


def _charlm(seed: int, quick: bool) -> tuple[L.LightningModule, L.LightningDataModule]:
    model = TinyTransformerLM(context_length=LM_CONTEXT, d_model=64, n_layers=2, n_heads=4, lr=LM_LR, optimizer="adam",
                              scheduler="cosine")
    dm = CharTextDataModule(context_length=LM_CONTEXT, batch_size=LM_BATCH, max_chars=20_000 if quick else LM_CHARS,
                            seed=seed)
    return model, dm


# name -> (builder, epochs, language model?)
TASKS: dict[str, tuple[Callable, int, bool]] = {
    "digits SmallCNN": (digits_task, EPOCHS, False),
    "MNIST-1D MLP": (mnist1d_task, EPOCHS, False),
    "char LM (TinyTransformerLM)": (_charlm, LM_EPOCHS, True),
}


def variants(lm: bool, quick: bool) -> list[str]:
    names = QUICK_VARIANTS if quick else LM_VARIANTS if lm else tuple(QAT)
    return [n for n in QAT if n in names]


def ptq_variants(lm: bool, quick: bool) -> list[str]:
    qat = set(variants(lm, quick))
    return [n for n, (_, pair) in PTQ.items() if pair in qat and (not quick or n in QUICK_PTQ)]


@torch.no_grad()
def _lm_eval(model: L.LightningModule, dm: L.LightningDataModule) -> dict[str, float]:
    """Mean next-token cross-entropy and accuracy over every validation token."""
    model.eval()
    loss, correct, n = 0.0, 0, 0
    for x, y in dm.test_dataloader():
        logits = model(x)  # [B, T, V]
        loss += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
        n += y.numel()
    return {"acc": correct / n, "loss": loss / n}


def evaluate(model: L.LightningModule, dm: L.LightningDataModule, lm: bool) -> dict[str, float]:
    """Test what the module holds (the fake-quant model, quantizers as training left them)."""
    if lm:
        return _lm_eval(model, dm)
    return harness.evaluate(model, dm)


def fit_and_test(task: str, seed: int, name: str, epochs: int, quick: bool) -> dict[str, Any]:
    build, _, lm = TASKS[task]
    L.seed_everything(seed, verbose=False)
    model, dm = build(seed, quick)
    kwargs = QAT[name]
    callbacks = [] if kwargs is None else [QuantizationAwareTraining(start_step=START, **kwargs)]
    limits = {"limit_train_batches": QUICK_BATCHES} if quick else {}
    try:
        trainer, fit_s = harness.fit(model, dm, callbacks, max_epochs=epochs, **limits)
    except Exception as exc:  # a crash is a result
        return harness.crash_record(exc)
    out: dict[str, Any] = {"fit_s": fit_s, "steps": trainer.global_step, **evaluate(model, dm, lm)}
    if callbacks:
        out["layers"] = len(quant_modules(model))
        out.update({f"weights_{k}": v for k, v in callbacks[0].statistics().items()})  # tracked rows only
    if kwargs is None:
        out["_state"], out["_dm"] = copy.deepcopy(model.state_dict()), dm
    return out


def ptq_and_test(task: str, seed: int, name: str, fp32: dict[str, torch.Tensor], dm: L.LightningDataModule,
                 quick: bool) -> dict[str, Any]:
    model, _ = TASKS[task][0](seed, quick)
    model.load_state_dict(fp32)  # a fresh copy of this seed's trained FP32 model
    t0 = time.perf_counter()
    try:
        attach(model, **PTQ[name][0])  # post-training quantization: QAT's layer swap and quantizers, no training
        layers = len(quant_modules(model))
        out = evaluate(model, dm, TASKS[task][2])
    except Exception as exc:
        return harness.crash_record(exc)
    return {"fit_s": time.perf_counter() - t0, "layers": layers, **out}


def run(seeds: int, quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {
        "settings": dict(
            seeds=list(range(seeds)), start=START, lr=LR, batch=BATCH, lm_lr=LM_LR, lm_batch=LM_BATCH,
            lm_chars=20_000 if quick else LM_CHARS, lm_context=LM_CONTEXT,
            epochs={t: (1 if quick else e) for t, (_, e, _) in TASKS.items()},
            qat={k: v for k, v in QAT.items()}, ptq={k: v[0] for k, v in PTQ.items()},
            targets=dict(w8a8=TARGET_W8A8, w4a4=TARGET_W4A4, qat_vs_ptq=QAT_VS_PTQ_MARGIN),
        ),
        "tasks": {},
    }
    for task, (_, epochs, lm) in TASKS.items():
        epochs = results["settings"]["epochs"][task]
        runs: dict[str, list[dict]] = {}
        t0 = time.perf_counter()
        for seed in range(seeds):
            fp32 = None
            for name in variants(lm, quick):
                r = fit_and_test(task, seed, name, epochs, quick)
                if "_state" in r:
                    fp32 = (r.pop("_state"), r.pop("_dm"))
                runs.setdefault(name, []).append({"seed": seed, **r})
                status = r.get("error") or f"acc {r['acc']:.4f}, loss {r['loss']:.4f}, {r['fit_s']:.1f} s"
                print(f"[qat_quality] {task} | seed {seed} | {name}: {status}", flush=True)
            for name in ptq_variants(lm, quick) if fp32 is not None else []:
                r = ptq_and_test(task, seed, name, *fp32, quick)
                runs.setdefault(name, []).append({"seed": seed, **r})
                status = r.get("error") or f"acc {r['acc']:.4f}, loss {r['loss']:.4f}"
                print(f"[qat_quality] {task} | seed {seed} | {name}: {status}", flush=True)
        results["tasks"][task] = {"epochs": epochs, "lm": lm, "runs": runs, "seconds": time.perf_counter() - t0}
    return results


def _paired(a: list[dict], b: list[dict], key: str) -> list[float]:
    """Per-seed differences a - b of ``key`` over the seeds both have."""
    other = {r["seed"]: r[key] for r in b if key in r}
    return [r[key] - other[r["seed"]] for r in a if key in r and r["seed"] in other]


def summarise(task: dict[str, Any]) -> dict[str, dict[str, Any]]:
    fp32 = task["runs"].get("FP32", [])
    out = {}
    for name, runs in task["runs"].items():
        ok = [r for r in runs if "acc" in r]
        out[name] = {
            "acc": [r["acc"] for r in ok],
            "loss": [r["loss"] for r in ok],
            "d_acc": _paired(ok, fp32, "acc"),
            "d_loss": _paired(ok, fp32, "loss"),
            "osc": [r["weights_oscillating"] for r in ok if "weights_oscillating" in r],
            "fit_s": [r["fit_s"] for r in ok],
            "errors": sorted({r["error"] for r in runs if "error" in r}),
        }
    return out


def _mean(values: list[float], scale: float = 100.0) -> float:
    return harness.mean_std([v * scale for v in values])[0]


def targets(task: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    """(claim, holds?, evidence) per target, computed from the numbers (None: not measured)."""
    summ, runs = summarise(task), task["runs"]
    metric = "next-character accuracy" if task["lm"] else "test accuracy"
    out: list[tuple[str, bool | None, str]] = []
    for name, bound in (("W8A8", TARGET_W8A8), ("W4A4", TARGET_W4A4)):
        d = summ.get(name, {}).get("d_acc", [])
        claim = f"{name} within {-bound:g} point{'s' if bound != -1 else ''} of FP32 ({metric})"
        if not d:
            out.append((claim, None, "not measured"))
            continue
        m, sd = harness.mean_std([x * 100 for x in d])
        out.append((claim, m >= bound, f"Δ = {m:+.2f} ± {sd:.2f} pp"))
    for bits in ("W4A8", "W2A8"):
        if bits not in runs or f"PTQ {bits}" not in runs:
            continue
        d = [x * 100 for x in _paired(runs[bits], runs[f"PTQ {bits}"], "acc")]
        claim = f"QAT clearly above PTQ at {bits[:2]} (same quantizer, LSQ; {metric})"
        if not d:
            out.append((claim, None, "not measured"))
            continue
        m, sd = harness.mean_std(d)
        ok = min(d) > 0 and m >= QAT_VS_PTQ_MARGIN
        out.append((claim, ok, f"QAT − PTQ = {m:+.2f} ± {sd:.2f} pp (paired; min over seeds {min(d):+.2f})"))
    return out


def _pp(values: list[float]) -> str:
    return harness.pm(values) if values else "—"


def render(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        "## Quantization-aware training: quality vs FP32",
        "",
        f"{len(s['seeds'])} seeds (each sets the initialisation, the split and the shuffle, shared by all variants of "
        f"the seed). Digits: `SmallCNN(channels=32)` on `DigitsDataModule` (1,257 train / 270 test); MNIST-1D: "
        "`MLP(in_features=40, hidden=[256, 256])` on `MNIST1DDataModule(num_samples=4000)` (2,560 train / 800 test); "
        f"both Adam lr {s['lr']}, cosine to 0, batch {s['batch']}; char LM: `TinyTransformerLM(d_model=64, n_layers=2, "
        f"n_heads=4)` (tied embedding/head) on `CharTextDataModule(context_length={s['lm_context']}, "
        f"max_chars={s['lm_chars']:,})`, Adam lr {s['lm_lr']}, cosine to 0, batch {s['lm_batch']}, scored on the "
        "validation split (val loss in nats per character and next-character accuracy). Epochs: "
        + ", ".join(f"{t} {e}" for t, e in s["epochs"].items())
        + f". **QAT**: `QuantizationAwareTraining(weight_bits, activation_bits, start_step={s['start']})`: the first "
        f"{s['start']:.0%} of training runs in float, then weights and the inputs of every Linear / Conv / "
        "Embedding layer are fake-quantized (first and last layer included; weights per output channel, LSQ "
        "learned scale unless stated; activations `dynamic`: asymmetric min/max per token for Linear, per tensor "
        "for conv). *W2A8*: 2-bit weights with **8-bit** activations; *ternary*: BitNet b1.58 absmean; *binary*: "
        "sign·mean|w| with ReSTE's backward (default) or the plain clipped STE; *stat*: OFQ's statistic scale "
        "2·mean|w| on a grid without a zero level (oscillation tracking on, no freezing). The LSQ rows W4A8 / W2A8 "
        "run with `freeze_step=1.0` (the step after the last one): it switches oscillation tracking on without "
        "freezing any weight. *oscillating*: share of the tracked weights whose oscillation EMA (momentum 0.01) "
        "exceeds 0.005 at the end of training. **PTQ**: each seed's trained FP32 model, copied; the callback's own "
        "`setup` swaps the layers as in a QAT run, every quantizer is enabled, no further training (weight scales "
        "from the weights alone: LSQ's initial 2·mean|w|/√Q_P, minmax max|w|/Q_P, stat 2·mean|w|; activations "
        "dynamic, so no calibration data). Accuracy in %, mean ± std over seeds; Δ = paired difference to the FP32 "
        "run of the same seed. Targets are judged on the mean paired Δ, in points of accuracy (the LM: "
        f"next-character accuracy); *QAT clearly above PTQ* means QAT − PTQ > 0 in every seed and ≥ "
        f"{s['targets']['qat_vs_ptq']:g} point on average. The LM trains the variants "
        f"{', '.join(LM_VARIANTS)} only (its fits are the slowest).",
    ]
    for task, t in results["tasks"].items():
        summ = summarise(t)
        lm = t["lm"]
        acc_label = "next-char acc %" if lm else "test acc %"
        loss_label = "val loss" if lm else "test loss"
        lines += ["", f"### {task}", ""]
        rows = []
        for name, v in summ.items():
            if not v["acc"]:
                rows.append([name, f"**error:** {'; '.join(v['errors'])}", "", "", "", "", ""])
                continue
            err = f" (errors: {'; '.join(v['errors'])})" if v["errors"] else ""
            first = name == "FP32"
            osc = f"{_mean(v['osc']):.2f}%" if v["osc"] else "—"
            rows.append([
                name + err, harness.pm(v["acc"]), "—" if first else _pp(v["d_acc"]), harness.pm(v["loss"], 1.0, 3),
                "—" if first else harness.pm(v["d_loss"], 1.0, 3), osc,
                "—" if name.startswith("PTQ") else f"{harness.mean_std(v['fit_s'])[0]:.1f}",
            ])
        lines.append(harness.markdown_table(
            ["variant", acc_label, "Δ vs FP32 (pp)", loss_label, "Δ loss", "oscillating weights", "fit s"], rows))
        lines += ["", "Targets:", ""]
        for claim, ok, evidence in targets(t):
            verdict = "not measured" if ok is None else "holds" if ok else "does **not** hold"
            lines.append(f"- {claim}: {evidence}, {verdict}.")
        comparisons = []
        for a, b in (("W4A8", "PTQ W4A8"), ("W2A8", "PTQ W2A8"), ("W4A8 stat", "W4A8"), ("W2A8 stat", "W2A8"),
                     ("binary A8 (ReSTE)", "binary A8 (STE)")):
            if a in t["runs"] and b in t["runs"]:
                d_acc = _paired(t["runs"][a], t["runs"][b], "acc")
                d_loss = _paired(t["runs"][a], t["runs"][b], "loss")
                if d_acc:
                    comparisons.append([f"{a} − {b}", harness.pm(d_acc), harness.pm(d_loss, 1.0, 3)])
        if comparisons:
            lines += ["", "Paired comparisons (same seed):", "",
                      harness.markdown_table(["comparison", f"Δ {acc_label[:-2]} (pp)", f"Δ {loss_label}"], comparisons)]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()
    tasks = results["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.0 * len(tasks), 4.6), squeeze=False)
    for ax, (task, t) in zip(axes[0], tasks.items()):
        summ = summarise(t)
        names = [n for n, v in summ.items() if n != "FP32" and v["d_acc"]]
        stats = [harness.mean_std([d * 100 for d in summ[n]["d_acc"]]) for n in names]
        colors = ["tab:gray" if n.startswith("PTQ") else "tab:blue" for n in names]
        lo = min((m - sd for m, sd in stats), default=-1.0)
        # PTQ at 2 bits can fall towards chance: clip the axis so the QAT bars stay readable, print the value.
        left = max(lo - 1.0, -12.0)
        ax.barh(range(len(names)), [max(m, left) for m, _ in stats], xerr=[sd if m >= left else 0 for m, sd in stats],
                color=colors, capsize=3)
        for i, (m, sd) in enumerate(stats):
            if m < left:
                ax.text(left + 0.2, i, f"{m:.1f} ± {sd:.1f} (clipped)", va="center", fontsize=7, color="white")
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(left, max(1.0, max((m + sd for m, sd in stats), default=0.0) + 0.5))
        ax.axvline(0, color="k", lw=0.8)
        for bound in (TARGET_W8A8, TARGET_W4A4):
            ax.axvline(bound, color="tab:red", ls="--", lw=0.7)
        ax.set_xlabel(("Δ next-char accuracy" if t["lm"] else "Δ test accuracy") + " vs FP32 (pp)")
        ax.set_title(task, fontsize=10)
    fig.suptitle("QAT (blue) and PTQ (gray) vs FP32, paired over seeds; red: −0.5 / −2 pp targets", fontsize=10)
    harness.save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    harness.main("qat_quality", run, render, plot, "Δ accuracy vs FP32", argv, threads=THREADS,
                 quick="1 seed, 1 epoch of at most 10 batches, few variants", seeds=3,
                 quick_seeds=lambda n: 1 if n == 3 else n, seeds_help="seeds 0..N-1 (default 3; --quick: 1 unless given)")


if __name__ == "__main__":
    main()
