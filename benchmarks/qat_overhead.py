"""What the int8 / int4 export of quantization-aware training buys: CPU inference speed and sizes.

The training-step overhead of ``QuantizationAwareTraining`` beside torchao's QAT is measured by
``benchmarks.overhead`` (rows QAT W8A8, QAT W4 weights only, torchao QAT W8A8). Here: an MLP of
4 x Linear(1024), trained briefly with W8A8 QAT, converted with ``to_int8_cpu_`` (torch's dynamic
int8 kernels), timed for inference at batch 64 and 1 against the FP32 model holding the same
(folded) weights, and beside torchao's ``Int8DynamicActivationInt8WeightConfig`` applied to that
FP32 model. Sizes on disk (``torch.save`` of the state_dict) and the packed size of the integer
export (``packed_bytes(export_int(...))``) at 8 / 4 / 2 bits, ternary and binary.

torchao is never installed into the project's environment (see ``overhead.load_torchao``); if it
cannot be imported the table says why, and the rest of the run is unaffected.

Run from the repository root: ``python -m benchmarks.qat_overhead`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import copy
import io
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from benchmarks import harness
from benchmarks.overhead import load_torchao, mlp, random_loader
from lichtenberg.callbacks import QuantizationAwareTraining
from lichtenberg.cli.models import MLP
from lichtenberg.core.quantization import export_int, packed_bytes, quant_modules, to_int8_cpu_, unprepare_

__all__ = ["attach", "main", "run"]

THREADS = 2
MAX_FOREIGN = 0.1  # share of the 2 CPUs other processes may use during a kept round
SPEED_TARGET = 1.5  # int8 inference >= 1.5x FP32
DEPLOY_WIDTH, DEPLOY_LAYERS, DEPLOY_QAT_STEPS = 1024, 4, 30
EXPORT_BITS: tuple[Any, ...] = (8, 4, 2, "ternary", "binary")


def attach(model: nn.Module, **qat: Any) -> None:
    """The callback's own layer swap and quantizers on a bare module, enabled (as at ``start_step``).

    Also ``qat_quality``'s post-training quantization.
    """
    trainer = harness.trainer()  # setup only reads its strategy
    QuantizationAwareTraining(**qat).setup(trainer, model, "fit")  # type: ignore[arg-type]
    if hasattr(model, "configure_model"):
        model.configure_model()  # the callback binds right after the module's configure_model
    for m in quant_modules(model).values():
        m.weight_quantizer.enabled = True
        if m.input_quantizer is not None:
            m.input_quantizer.enabled = True


def qat_fit(width: int, layers: int, steps: int, **qat: Any) -> MLP:
    """A short QAT fit of the wide demo MLP on random data (the weights only need to be trained)."""
    torch.manual_seed(0)
    module = mlp(width, layers)
    trainer = harness.trainer(max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0,
                              callbacks=[QuantizationAwareTraining(**qat)])
    trainer.fit(module, random_loader(steps, 64, (width,), width))
    return module.eval()


def saved_bytes(obj: Any) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getbuffer().nbytes


def deployment(quick: bool, torchao_ok: bool) -> dict[str, Any]:
    width = 256 if quick else DEPLOY_WIDTH
    steps = 5 if quick else DEPLOY_QAT_STEPS
    repeats, burst = (2, 5) if quick else (15, 20)
    qat = qat_fit(width, DEPLOY_LAYERS, steps, weight_bits=8, activation_bits=8)
    fp32 = copy.deepcopy(qat)
    unprepare_(fp32.net, fold=True)  # plain float layers holding the fake-quantized weights
    g = torch.Generator().manual_seed(2)
    x = {64: torch.randn(64, width, generator=g), 1: torch.randn(1, width, generator=g)}
    with torch.no_grad():
        fake = qat.net(x[64])
        int8 = to_int8_cpu_(qat.net)  # in place: qat.net is now the int8 model
        agree = {"int8 vs fake-quant rel. error": float((int8(x[64]) - fake).norm() / fake.norm()),
                 "FP32 (folded) vs fake-quant rel. error": float((fp32.net(x[64]) - fake).norm() / fake.norm())}
    models: dict[str, nn.Module] = {"FP32": fp32.net, "int8 (to_int8_cpu_)": int8}
    torchao_error = None
    if torchao_ok:
        try:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

            ao = copy.deepcopy(fp32.net)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_(ao, Int8DynamicActivationInt8WeightConfig())
                with torch.no_grad():
                    agree["torchao int8 vs fake-quant rel. error"] = float((ao(x[64]) - fake).norm() / fake.norm())
            models["torchao Int8DynamicActivationInt8Weight"] = ao
        except Exception as exc:
            torchao_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]

    def timed(model: nn.Module, batch: int) -> Callable[[], float]:
        def call() -> float:
            samples = []
            with torch.inference_mode():
                for _ in range(burst):
                    t0 = time.perf_counter()
                    model(x[batch])
                    samples.append(time.perf_counter() - t0)
            return statistics.median(samples)

        return call

    timing: dict[str, Any] = {}
    for batch in (64, 1):
        for m in models.values():  # warm every kernel before the first timed round
            timed(m, batch)()
        log: list[dict] = []
        times = harness.interleaved({k: timed(m, batch) for k, m in models.items()}, repeats,
                                    max_foreign=None if quick else MAX_FOREIGN, log=log)
        timing[str(batch)] = {"s": times, "rows": harness.ratio_table(times, "FP32"), "rounds": log}
    sizes = {"FP32 state_dict": saved_bytes(fp32.net.state_dict()), "int8 state_dict": saved_bytes(int8.state_dict())}
    # Packed integer export at every width: a short QAT fit each (export needs started quantizers).
    weights = [m for m in fp32.net if isinstance(m, nn.Linear)]
    fp32_linear = sum((m.weight.numel() + m.bias.numel()) * 4 for m in weights)
    export: dict[str, dict[str, int]] = {}
    for bits in EXPORT_BITS:
        model = qat_fit(width, DEPLOY_LAYERS, 2, weight_bits=bits, activation_bits=None)
        ints = export_int(model.net)
        export[str(bits)] = {"packed": sum(packed_bytes(e) for e in ints.values()), "export_pt": saved_bytes(ints)}
    return {"width": width, "layers": DEPLOY_LAYERS, "qat_steps": steps, "repeats": repeats, "burst": burst,
            "timing": timing, "sizes": sizes, "fp32_linear_bytes": fp32_linear, "export": export, "agreement": agree,
            "torchao_error": torchao_error}


def run(quick: bool) -> dict[str, Any]:
    pinned = harness.pin_allocator()
    torchao, torchao_info = load_torchao()
    t0 = time.perf_counter()
    print(f"[qat_overhead] torchao: {torchao_info}", flush=True)
    res: dict[str, Any] = {"settings": dict(allocator_pinned=pinned, torchao=torchao_info, torchao_ok=torchao is not None,
                                            torch_quantized_engine=torch.backends.quantized.engine)}
    res["deploy"] = deployment(quick, torchao is not None)
    print(f"[qat_overhead] {time.perf_counter() - t0:4.0f} s  done", flush=True)
    return res


def render(res: dict[str, Any]) -> str:
    s, d = res["settings"], res["deploy"]
    lines = [
        "## QAT: int8 / int4 deployment",
        "",
        "The training-step overhead of QAT (beside torchao's) is in the `overhead` section.",
        "",
    ]
    sz, ex = d["sizes"], d["export"]
    lines += [
        f"MLP of {d['layers']} × `Linear({d['width']})` (ReLU between), trained {d['qat_steps']} "
        "steps with `QuantizationAwareTraining(8, 8)` on random data, then `to_int8_cpu_` (fold the "
        "fake-quantized weights, restore `nn.Linear`, torch's dynamic int8 `quantize_dynamic` with per-channel "
        f"weights; engine `{s['torch_quantized_engine']}`). *FP32*: the same model unprepared with `fold=True`, i.e. "
        "float layers holding the quantized weights. torchao's `Int8DynamicActivationInt8WeightConfig` is applied to "
        "that FP32 model (eager, no `torch.compile`). Inference under `torch.inference_mode()`: "
        f"{d['repeats']} interleaved rounds, each variant's median over a burst of {d['burst']} calls; ratio = FP32 "
        f"time / variant time (speed-up), in brackets the min–max over rounds. Target: int8 ≥ {SPEED_TARGET}× at "
        "batch 64 and at batch 1.",
        "",
    ]
    rows, verdicts = [], []
    for batch, t in d["timing"].items():
        fp = next(r for r in t["rows"] if r["variant"] == "FP32")
        for r in t["rows"]:
            speed = f"{1 / r['ratio']:.2f}× ({1 / r['ratio_max']:.2f}–{1 / r['ratio_min']:.2f})"
            rows.append([batch, r["variant"], f"{r['median'] * 1e3:.3f} [{r['q1'] * 1e3:.3f}–{r['q3'] * 1e3:.3f}]",
                         "—" if r is fp else (f"**{speed}**" if r["variant"].startswith("int8") else speed)])
            if r["variant"].startswith("int8"):
                ok = 1 / r["ratio"] >= SPEED_TARGET
                verdicts.append(f"batch {batch} {1 / r['ratio']:.2f}× ({'holds' if ok else 'does **not** hold'})")
        redone = sum(1 for x in t["rounds"] if not x["kept"])
        flagged = sum(1 for x in t["rounds"] if x["kept"] and x["disturbed"])
        if redone or flagged:
            rows.append([batch, f"({redone} rounds re-run" + (f", {flagged} kept disturbed)" if flagged else ")"), "", ""])
    lines.append(harness.markdown_table(["batch", "model", "ms / forward [IQR]", "speed-up vs FP32"], rows))
    lines += ["", f"Target *int8 inference ≥ {SPEED_TARGET}× FP32*: " + "; ".join(verdicts) + "."]
    if d["torchao_error"]:
        lines += ["", f"torchao int8: **error:** {d['torchao_error']}"]
    agree = ", ".join(f"{k} {v:.2e}" for k, v in d["agreement"].items())
    lines += ["", f"Outputs on a batch of 64 (relative L2 error vs the fake-quant model the QAT run trained): {agree}.", ""]
    fp32_sd = sz["FP32 state_dict"]
    rows = [["FP32 state_dict (`torch.save`)", f"{fp32_sd / 2**20:.2f}", "1.00×"],
            ["int8 model state_dict (`torch.save`)", f"{sz['int8 state_dict'] / 2**20:.2f}",
             f"**{fp32_sd / sz['int8 state_dict']:.2f}×**"]]
    base = d["fp32_linear_bytes"]
    for bits, e in ex.items():
        label = f"W{bits}" if bits.isdigit() else bits
        rows.append([f"{label}: `packed_bytes(export_int(...))`", f"{e['packed'] / 2**20:.2f}",
                     (f"**{base / e['packed']:.2f}×**" if bits == "4" else f"{base / e['packed']:.2f}×")])
        rows.append([f"{label}: `torch.save(export_int(...))` (int8 containers)", f"{e['export_pt'] / 2**20:.2f}",
                     f"{fp32_sd / e['export_pt']:.2f}×"])
    lines.append(harness.markdown_table(["artefact", "MiB", "smaller than FP32"], rows))
    lines += ["", f"The packed sizes count the integers at their bit width plus float32 scales (one per output channel) "
              f"and biases; they are compared with the FP32 bytes of the same weights and biases "
              f"({base / 2**20:.2f} MiB); the `torch.save` rows with the FP32 state_dict file. Targets: int8 "
              "state_dict ≈ 4× smaller, packed int4 ≈ 8× smaller."]
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()
    d = res["deploy"]
    fig, ax2 = plt.subplots(figsize=(6, 3.8))
    batches = list(d["timing"])
    models = [r["variant"] for r in d["timing"][batches[0]]["rows"] if r["variant"] != "FP32"]
    width = 0.8 / max(len(models), 1)
    for i, m in enumerate(models):
        speed = [1 / next(r for r in d["timing"][b]["rows"] if r["variant"] == m)["ratio"] for b in batches]
        ax2.bar([j + (i - (len(models) - 1) / 2) * width for j in range(len(batches))], speed, width,
                label=m.replace("Int8DynamicActivationInt8Weight", "int8 dyn."),
                color="tab:orange" if m.startswith("torchao") else "tab:blue")
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.axhline(SPEED_TARGET, color="gray", ls="--", lw=0.8, label=f"{SPEED_TARGET}× target")
    ax2.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax2.set_ylabel("inference speed-up vs FP32")
    ax2.set_title(f"{d['layers']} × Linear({d['width']}) inference (CPU)", fontsize=10)
    ax2.legend(fontsize=7)
    harness.save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    harness.main("qat_overhead", run, render, plot, "int8 inference speed-up", argv, threads=THREADS,
                 quick="small model, few rounds")


if __name__ == "__main__":
    main()
