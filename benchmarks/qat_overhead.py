"""What quantization-aware training costs per training step, and what the int8 / int4 export buys.

(a) **Training step time** inside a real ``Trainer.fit`` (protocol of ``ema_overhead``: step =
    interval between consecutive ``on_train_batch_start`` calls, median per fit after a warm-up,
    interleaved fits, glibc allocator pinned, rounds disturbed by other processes re-run).
    Variants: ``plain``; ``QuantizationAwareTraining`` W8A8 (LSQ weights, the default), W8A8 with
    minmax weights, W4A8 LSQ, and W4A8 LSQ with oscillation tracking on (``freeze_step`` after the
    last step); torchao's QAT (``quantize_(model, QATConfig(activation_config=int8 per-token
    asymmetric, weight_config=int8 / int4 per-channel symmetric))``, dynamic scales) where it can
    be imported. Models: the digits ``SmallCNN(channels=32)`` at batch 64 (cross-entropy) and an
    MLP of 4 x Linear(512) at batch 128 and at batch 1024 (MSE to random targets), all Adam. The
    weight quantizers cost the same at both batches, the matmuls 8x more at 1024. torchao swaps
    Linear layers only: on the CNN it fake-quantizes the classifier alone, ours the convs too.
    Also forward + backward of the MLP alone, per quantizer (where the time goes).
(b) **Deployment**: an MLP of 4 x Linear(1024), trained briefly with W8A8 QAT, converted with
    ``to_int8_cpu_`` (torch's dynamic int8 kernels), timed for inference at batch 64 and 1 against
    the FP32 model holding the same (folded) weights, and beside torchao's
    ``Int8DynamicActivationInt8WeightConfig`` applied to that FP32 model. Sizes on disk
    (``torch.save`` of the state_dict) and the packed size of the integer export
    (``packed_bytes(export_int(...))``) at 8 / 4 / 2 bits, ternary and binary.

torchao is never installed into the project's environment. Install it beside it, e.g.
``pip install --no-deps --target /tmp/torchao_pkgs torchao``; the benchmark imports ``torchao``
if it can, else from ``$LICHTENBERG_TORCHAO_PATH`` (default ``/tmp/torchao_pkgs``). If neither
works the table says why, and the rest of the run is unaffected.

Run from the repository root: ``python -m benchmarks.qat_overhead`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import copy
import gc
import io
import os
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
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks import harness
from benchmarks.ema_overhead import Regression, StepTimer, random_loader
from lichtenberg.callbacks import QuantizationAwareTraining
from lichtenberg.cli.data import DigitsDataModule
from lichtenberg.cli.models import SmallCNN
from lichtenberg.core.quantization import export_int, packed_bytes, quant_modules, to_int8_cpu_, unprepare_

__all__ = ["attach", "main", "run"]

THREADS = 2
MAX_FOREIGN = 0.1  # share of the 2 CPUs other processes may use during a kept round
TORCHAO_PATH = os.environ.get("LICHTENBERG_TORCHAO_PATH", "/tmp/torchao_pkgs")
STEP_TARGET, SPEED_TARGET = 1.4, 1.5  # W8A8 step time <= 1.4x plain; int8 inference >= 1.5x FP32
DEPLOY_WIDTH, DEPLOY_LAYERS, DEPLOY_QAT_STEPS = 1024, 4, 30
EXPORT_BITS: tuple[Any, ...] = (8, 4, 2, "ternary", "binary")


def load_torchao() -> tuple[Any, str]:
    """(torchao module or None, version or the reason it is unavailable)."""
    errors = []
    for path in (None, TORCHAO_PATH):
        if path is not None:
            if not Path(path).is_dir():
                errors.append(f"{path}: no such folder")
                continue
            sys.path.insert(0, path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import torchao
                from torchao.quantization import quantize_  # noqa: F401
                from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig  # noqa: F401
            return torchao, str(getattr(torchao, "__version__", "?"))
        except Exception as exc:  # not installed, or built for another torch
            errors.append(f"{type(exc).__name__}: {exc}".splitlines()[0][:160])
            for name in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")]:
                del sys.modules[name]
            if path is not None:
                sys.path.remove(path)
    return None, "not installable/importable: " + "; ".join(errors)


def torchao_qat(weight_dtype: torch.dtype) -> Callable[[nn.Module], None]:
    """torchao's QAT prepare step: int8 per-token asymmetric inputs, per-channel symmetric weights."""

    def prepare(model: nn.Module) -> None:
        from torchao.quantization import quantize_
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

        act = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
        weight = IntxFakeQuantizeConfig(weight_dtype, "per_channel", is_symmetric=True)
        quantize_(model, QATConfig(activation_config=act, weight_config=weight, step="prepare"))

    return prepare


# -- (a) training step time ----------------------------------------------------------------
def mlp(width: int, layers: int, out: int | None = None) -> nn.Sequential:
    mods: list[nn.Module] = []
    for i in range(layers):
        mods += [nn.Linear(width, out if (out and i == layers - 1) else width)] + ([nn.ReLU()] if i < layers - 1 else [])
    return nn.Sequential(*mods)


def model_specs(quick: bool) -> dict[str, dict[str, Any]]:
    width = 128 if quick else 512
    return {
        "digits SmallCNN": dict(build=lambda: SmallCNN(channels=32, lr=1e-3, optimizer="adam"), batch=64, data="digits"),
        f"MLP 4x{width}, batch 128": dict(build=lambda: Regression(mlp(width, 4), "adam"), batch=128, data=width),
        # the same weights, 8x the matmul work per step: the weight quantizers' share shrinks
        f"MLP 4x{width}, batch 1024": dict(build=lambda: Regression(mlp(width, 4), "adam"), batch=1024, data=width),
    }


def loader_for(spec: dict[str, Any], steps: int) -> DataLoader:
    """One epoch covers the run (no epoch-boundary work among the steps); no shuffle."""
    n = steps * spec["batch"]
    if spec["data"] != "digits":
        return random_loader(n, spec["data"], spec["batch"])
    dm = DigitsDataModule(batch_size=spec["batch"], seed=0)
    dm.setup()
    x, y = dm.train_set.tensors
    reps = -(-n // len(y))
    data = TensorDataset(x.repeat(reps, 1, 1, 1)[:n], y.repeat(reps)[:n])
    return DataLoader(data, batch_size=spec["batch"], shuffle=False)


def step_variants(torchao_ok: bool) -> dict[str, tuple[Callable[[], Callback | None], Callable[[nn.Module], None] | None]]:
    """name -> (callback factory, model transform applied before the fit)."""
    out: dict[str, tuple[Callable[[], Callback | None], Callable[[nn.Module], None] | None]] = {
        "plain": (lambda: None, None),
        "W8A8": (lambda: QuantizationAwareTraining(8, 8), None),
        "W8A8 minmax": (lambda: QuantizationAwareTraining(8, 8, weight_method="minmax"), None),
        "W4A8": (lambda: QuantizationAwareTraining(4, 8), None),
        "W4A8 + tracking": (lambda: QuantizationAwareTraining(4, 8, freeze_step=1.0), None),
    }
    if torchao_ok:
        out["torchao W8A8"] = (lambda: None, torchao_qat(torch.int8))
        out["torchao W4A8"] = (lambda: None, torchao_qat(torch.int4))
    return out


def fit_once(spec: dict[str, Any], loader: DataLoader, make: Callable, transform: Callable | None, steps: int,
             warmup: int) -> dict[str, Any]:
    torch.manual_seed(0)
    module = spec["build"]()
    if transform is not None:
        transform(module)
    callback = make()
    timer = StepTimer(warmup)
    trainer = harness.trainer(max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0,
                              callbacks=([callback] if callback is not None else []) + [timer])  # timer last
    gc.collect()
    trainer.fit(module, loader)
    times = timer.step_times()
    fq = sum(1 for m in module.modules() if type(m).__name__ == "FakeQuantizedLinear")
    return {"median_s": statistics.median(times), "faults": statistics.median(timer.step_faults()),
            "quantized_layers": len(quant_modules(module)) + fq}


def measure_steps(quick: bool, torchao_ok: bool) -> dict[str, Any]:
    steps, warmup, repeats = (12, 4, 1) if quick else (40, 10, 12)
    out: dict[str, Any] = {"steps": steps, "warmup": warmup, "repeats": repeats, "models": {}}
    for name, spec in model_specs(quick).items():
        loader = loader_for(spec, steps)
        log: list[dict] = []
        extras: dict[str, list[dict]] = {}

        def call(make: Callable, transform: Callable | None) -> Callable[[], tuple[float, dict]]:
            def go() -> tuple[float, dict]:
                r = fit_once(spec, loader, make, transform, steps, warmup)
                return r["median_s"], r

            return go

        t0 = time.perf_counter()
        times = harness.interleaved({k: call(*v) for k, v in step_variants(torchao_ok).items()}, repeats,
                                    max_foreign=None if quick else MAX_FOREIGN, log=log, extras=extras)
        print(f"[qat_overhead] (a) {name}: {repeats} fits x {len(times)} variants in {time.perf_counter() - t0:.0f} s",
              flush=True)
        out["models"][name] = {
            "batch": spec["batch"], "step_s": times, "rows": harness.ratio_table(times, "plain"),
            "faults_per_step": {k: [x["faults"] for x in e] for k, e in extras.items()},
            "quantized_layers": {k: e[-1]["quantized_layers"] for k, e in extras.items()},
            "rounds": log,
        }
    return out


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


def decompose(quick: bool, torchao_ok: bool) -> dict[str, Any]:
    """Forward + backward of the MLP alone (no optimizer, no Trainer): which quantizer costs what."""
    width, repeats, iters = (128, 2, 5) if quick else (512, 12, 20)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(128, width, generator=g), torch.randn(128, width, generator=g)
    builds: dict[str, Callable[[nn.Module], None]] = {
        "plain": lambda net: None,
        "W8 only (LSQ, inputs float)": lambda net: attach(net, weight_bits=8, activation_bits=None),
        "A8 only (dynamic, weights float)": lambda net: attach(net, weight_bits=None, activation_bits=8),
        "W8A8": lambda net: attach(net, weight_bits=8, activation_bits=8),
        "W8A8 minmax": lambda net: attach(net, weight_bits=8, activation_bits=8, weight_method="minmax"),
        "W4A8 + tracking": lambda net: attach(net, weight_bits=4, activation_bits=8, freeze_step=1.0),
    }
    if torchao_ok:
        builds["torchao W8A8"] = torchao_qat(torch.int8)
    nets = {}
    for name, build in builds.items():
        torch.manual_seed(0)
        nets[name] = mlp(width, 4).train()
        build(nets[name])

    def burst(net: nn.Module) -> Callable[[], float]:
        def call() -> float:
            samples = []
            for _ in range(iters):
                t0 = time.perf_counter()
                nn.functional.mse_loss(net(x), y).backward()
                samples.append(time.perf_counter() - t0)
                net.zero_grad(set_to_none=True)
            return statistics.median(samples)

        return call

    for net in nets.values():  # initialise the quantizers, warm the kernels
        burst(net)()
    log: list[dict] = []
    times = harness.interleaved({k: burst(v) for k, v in nets.items()}, repeats,
                                max_foreign=None if quick else MAX_FOREIGN, log=log)
    return {"width": width, "batch": 128, "iters": iters, "s": times, "rows": harness.ratio_table(times, "plain"),
            "rounds": log}


# -- (b) deployment -------------------------------------------------------------------------
def qat_fit(width: int, layers: int, steps: int, **qat: Any) -> Regression:
    """A short QAT fit of the wide MLP on random regression data (the weights only need to be trained)."""
    torch.manual_seed(0)
    module = Regression(mlp(width, layers), "adam")
    trainer = harness.trainer(max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0,
                              callbacks=[QuantizationAwareTraining(**qat)])
    trainer.fit(module, random_loader(steps * 64, width, 64))
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
    say = lambda msg: print(f"[qat_overhead] {time.perf_counter() - t0:4.0f} s  {msg}", flush=True)  # noqa: E731
    say(f"torchao: {torchao_info}")
    res: dict[str, Any] = {"settings": dict(allocator_pinned=pinned, torchao=torchao_info, torchao_ok=torchao is not None,
                                            torch_quantized_engine=torch.backends.quantized.engine)}
    res["steps"] = measure_steps(quick, torchao is not None)
    say("(a) forward + backward alone")
    res["phases"] = decompose(quick, torchao is not None)
    say("(b) deployment")
    res["deploy"] = deployment(quick, torchao is not None)
    say("done")
    return res


def _ratio(r: dict[str, Any]) -> str:
    return f"{r['ratio']:.3f}× ({r['ratio_min']:.2f}–{r['ratio_max']:.2f})"


def render(res: dict[str, Any]) -> str:
    s, a, d = res["settings"], res["steps"], res["deploy"]
    torchao = f"torchao {s['torchao']}" if s["torchao_ok"] else f"torchao: {s['torchao']}"
    lines = [
        "## QAT: training overhead and int8 / int4 deployment",
        "",
        f"**(a) Training step time** inside `Trainer.fit` (CPU, {THREADS} torch threads, Adam), protocol of "
        f"`ema_overhead`: {a['repeats']} interleaved fits per variant of {a['steps']} steps, the first {a['warmup']} "
        "skipped (quantizer initialisation included there), median per fit; ratio = median of the per-fit medians / "
        "that of `plain`, in brackets the min–max of the per-round ratios; allocator pinned: "
        f"{'yes' if s['allocator_pinned'] else 'NO'}; rounds with > {MAX_FOREIGN:.0%} foreign CPU load re-run. Ours: "
        "`QuantizationAwareTraining(weight_bits, activation_bits)` from step 0 (weights per output channel, LSQ "
        "unless *minmax*; inputs `dynamic`: per token for Linear, per tensor for conv); *+ tracking*: "
        "`freeze_step=1.0` (oscillation tracking, never freezes). torchao (" + torchao + "): "
        "`quantize_(model, QATConfig(activation_config=IntxFakeQuantizeConfig(torch.int8, \"per_token\", "
        "is_symmetric=False), weight_config=IntxFakeQuantizeConfig(torch.int8 / torch.int4, \"per_channel\")))` — "
        "dynamic min/max scales, Linear layers only (on the CNN: the classifier alone; ours: both convs and the "
        f"classifier). Target: our W8A8 ≤ {STEP_TARGET}× plain.",
        "",
    ]
    variants = [v for v in next(iter(a["models"].values()))["step_s"] if v != "plain"]
    if not s["torchao_ok"]:
        variants += ["torchao W8A8", "torchao W4A8"]
    rows = []
    for name, m in a["models"].items():
        by = {r["variant"]: r for r in m["rows"]}
        p = by["plain"]
        cells = [name, f"{p['median'] * 1e3:.2f} [{p['q1'] * 1e3:.2f}–{p['q3'] * 1e3:.2f}]"]
        for v in variants:
            if v not in by:
                cells.append("n/a (torchao unavailable)")
                continue
            text = _ratio(by[v]) + f", {m['quantized_layers'][v]} layers"
            cells.append(f"**{text}**" if v == "W8A8" else text)
        redone = sum(1 for x in m["rounds"] if not x["kept"])
        flagged = sum(1 for x in m["rounds"] if x["kept"] and x["disturbed"])
        cells.append(f"{redone}" + (f" ({flagged} kept disturbed)" if flagged else ""))
        rows.append(cells)
    lines.append(harness.markdown_table(["model", "plain ms/step [IQR]", *variants, "rounds re-run"], rows))
    verdicts = []
    for name, m in a["models"].items():
        r = next(r for r in m["rows"] if r["variant"] == "W8A8")
        verdicts.append(f"{name} {r['ratio']:.2f}× ({'holds' if r['ratio'] <= STEP_TARGET else 'does **not** hold'})")
    lines += ["", f"Target *W8A8 step time ≤ {STEP_TARGET}× plain*: " + "; ".join(verdicts) + "."]
    if not s["torchao_ok"]:
        lines += ["", f"torchao: {s['torchao']}"]
    ph = res["phases"]
    lines += ["", f"Where the time goes: forward + backward of the same {ph['width']}-wide MLP alone (batch {ph['batch']}, "
              "no optimizer, no Trainer; quantizers initialised beforehand), median over interleaved bursts of "
              f"{ph['iters']}:", ""]
    rows = []
    base = harness.median(ph["s"]["plain"])
    for r in ph["rows"]:
        extra = "—" if r["variant"] == "plain" else f"+{(r['median'] - base) * 1e3:.2f}"
        rows.append([r["variant"], f"{r['median'] * 1e3:.2f}", extra, "—" if r["variant"] == "plain" else _ratio(r)])
    lines.append(harness.markdown_table(["variant", "ms fwd+bwd", "ms over plain", "ratio"], rows))

    sz, ex = d["sizes"], d["export"]
    lines += [
        "",
        f"**(b) Deployment.** MLP of {d['layers']} × `Linear({d['width']})` (ReLU between), trained {d['qat_steps']} "
        "steps with `QuantizationAwareTraining(8, 8)` on random regression data, then `to_int8_cpu_` (fold the "
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


COLORS = {"W8A8": "tab:blue", "W8A8 minmax": "tab:cyan", "W4A8": "tab:green", "W4A8 + tracking": "tab:olive",
          "torchao W8A8": "tab:orange", "torchao W4A8": "tab:brown"}


def plot(res: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()
    a, d = res["steps"], res["deploy"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    names = list(a["models"])
    variants = [v for v in next(iter(a["models"].values()))["step_s"] if v != "plain"]
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        rows = [next(r for r in a["models"][n]["rows"] if r["variant"] == v) for n in names]
        x = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(names))]
        y = [r["ratio"] for r in rows]
        err = [[r["ratio"] - r["ratio_min"] for r in rows], [r["ratio_max"] - r["ratio"] for r in rows]]
        ax1.bar(x, y, width, yerr=err, capsize=2, label=v, color=COLORS.get(v))
    ax1.axhline(1.0, color="k", lw=0.8)
    ax1.axhline(STEP_TARGET, color="gray", ls="--", lw=0.8, label=f"{STEP_TARGET}× target (W8A8)")
    ax1.set_xticks(range(len(names)), names)
    ax1.set_ylabel("step time / plain (median)")
    ax1.set_title("QAT training step (CPU)", fontsize=10)
    ax1.legend(fontsize=7, ncol=2)
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
    harness.main("qat_overhead", run, render, plot, "QAT step-time ratios and int8 speed-up", argv, threads=THREADS,
                 quick="small models, few fits")


if __name__ == "__main__":
    main()
