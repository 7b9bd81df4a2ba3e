"""Training-step overhead of every lichtenberg callback beside its peers, on CPU or CUDA, eager or compiled.

One declarative table of variants (a list of callbacks, or a model transform for torchao), each
trained inside a real ``Trainer.fit`` on the same fresh model and data as the plain Trainer, the
baseline. Fits are interleaved (``harness.interleaved``); a step is the interval between two
consecutive ``on_train_batch_start`` calls (every hook and the next batch's fetch included),
each fit reports the median over its steps after a warm-up, and a variant's ratio is the median
of its per-fit medians over plain's, with the min-max of the per-round ratios. Also the peak
memory of each fit and the bytes the callbacks hold.

The per-technique scripts (``ema_overhead``, ``pruning_overhead``, ``dst_overhead``,
``qat_overhead``, ``reweighting_overhead``) keep their specific analyses and measure through
``measure`` / ``fit_once`` here.

Run from the repository root: ``python -m benchmarks.overhead`` (``--quick`` for a smoke run;
``--device cuda``, ``--compile``, ``--model``, ``--variants``: see ``--help``).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, ModelPruning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks import harness
from lichtenberg.callbacks import (EMA, SWA, DataPruning, DynamicSparseTraining, GradualPruning,
                                   QuantizationAwareTraining, SampleReweighting)
from lichtenberg.cli.models import MLP, SmallCNN, TinyTransformerLM
from lichtenberg.core.layers import layer_kind
from lichtenberg.core.schedules import SparsitySchedule

__all__ = ["LinearLikePruning", "Model", "Settings", "StepTimer", "Variant", "fit_once", "load_torchao", "main",
           "measure", "merged", "mlp", "models", "random_loader", "run", "torchao_qat", "variants"]

THREADS = 2
MAX_FOREIGN = 0.1  # share of the 2 CPUs other processes may use during a kept round
DECAY, SPARSITY = 0.999, 0.9
TORCHAO_PATH = "/tmp/torchao_pkgs"  # torchao never goes into the project's environment (see load_torchao)
# Fits per variant and models by (device, compiled). A GPU run must fit the device tool's 10-minute command
# limit; compiling every fit is slow (on CPU tens of seconds for the MLP alone), and on CUDA the LM is the
# model where compiling matters (the MLP and CNN are launch-bound).
DEFAULT_REPEATS = {("cpu", False): 12, ("cuda", False): 5, ("cpu", True): 4, ("cuda", True): 3}
DEFAULT_MODELS = {("cpu", True): "mlp", ("cuda", True): "lm"}


# -- what is measured -------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One row of the table: what a fresh model gets for one fit.

    Args:
        name: the row's label (``--variants`` matches parts of it).
        callbacks: builds the fit's callbacks; fresh instances every fit.
        prepare: changes the fresh module in place before the fit (torchao's ``quantize_``).
        target: the step-time ratio vs plain the technique promises, where it promises one.
    """

    name: str
    callbacks: Callable[[], list[Callback]] = list
    prepare: Callable[[nn.Module], None] | None = None
    target: float | None = None


class LinearLikePruning(ModelPruning):
    """Lightning's ``ModelPruning`` (l1, per layer, no lottery-ticket rewind), by default to 90% after the first epoch.

    Restricted to the layers ours prunes (Linear, conv, embedding weights; Lightning's default
    would prune the norms' weights too), so both mask the same tensors.

    Args:
        amount: the share of the remaining weights pruned at the end of epoch e, ``amount(e)``.
    """

    def __init__(self, amount: Callable[[int], float] = lambda epoch: SPARSITY if epoch == 0 else 0.0) -> None:
        super().__init__("l1_unstructured", amount=amount, parameter_names=["weight"],
                         use_lottery_ticket_hypothesis=False, use_global_unstructured=False, verbose=0)

    def filter_parameters_to_prune(self, parameters_to_prune=()):
        return [(m, name) for m, name in parameters_to_prune if layer_kind(m) is not None]


def variants(steps: int) -> list[Variant]:
    """The table, for fits of ``steps`` optimizer steps. Peers are prefixed ``L-`` (Lightning) or ``torchao``."""
    one_shot = SparsitySchedule(kind="one_shot", start=0, end=0)  # masked from step 0: every timed step, no event
    # One RigL update, at the second-to-last step, which is never timed (a schedule without one is refused).
    rigl = SparsitySchedule(kind="cubic", start=0, end=steps - 1, every_n_steps=steps - 2)
    return [
        Variant("plain"),
        Variant("EMA", lambda: [EMA(decay=DECAY)], target=1.05),
        Variant("L-EMAWeightAveraging", lambda: [EMAWeightAveraging(decay=DECAY)]),
        Variant("SWA (every step)", lambda: [SWA(start=0, interval="step")]),
        Variant("GradualPruning 90%", lambda: [GradualPruning(SPARSITY, one_shot)], target=1.05),
        Variant("L-ModelPruning 90%", lambda: [LinearLikePruning()]),
        Variant("DST RigL 90%", lambda: [DynamicSparseTraining(SPARSITY, "rigl", rigl)], target=1.05),
        Variant("QAT W8A8", lambda: [QuantizationAwareTraining()], target=1.3),
        Variant("QAT W4 weights only", lambda: [QuantizationAwareTraining(4, None)]),
        Variant("torchao QAT W8A8", prepare=torchao_qat(torch.int8)),
        Variant("SampleReweighting", lambda: [SampleReweighting("linupper", warmup_steps=0)], target=1.02),
        Variant("DataPruning", lambda: [DataPruning(ratio=0.5)]),
        Variant("GradualPruning + QAT + EMA",
                lambda: [GradualPruning(SPARSITY, one_shot), QuantizationAwareTraining(), EMA(decay=DECAY)]),
    ]


def load_torchao() -> tuple[Any, str]:
    """(torchao or None, its version or why it cannot be imported).

    torchao is never installed into the project's environment: install it beside it with
    ``pip install --no-deps --target /tmp/torchao_pkgs torchao``; it is imported from the
    environment if there, else from ``$LICHTENBERG_TORCHAO_PATH`` (default ``/tmp/torchao_pkgs``).
    """
    import os

    errors = []
    for path in (None, os.environ.get("LICHTENBERG_TORCHAO_PATH", TORCHAO_PATH)):
        if path is not None and not Path(path).is_dir():
            errors.append(f"{path}: no such folder")
            continue
        if path is not None:
            sys.path.insert(0, path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import torchao
                import torchao.quantization.qat  # noqa: F401  (the API used here)
            return torchao, str(getattr(torchao, "__version__", "?"))
        except Exception as exc:  # not installed, or built for another torch
            errors.append(f"{type(exc).__name__}: {exc}".splitlines()[0][:160])
            for name in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")]:
                del sys.modules[name]
            if path is not None:
                sys.path.remove(path)
    return None, "not importable: " + "; ".join(errors)


def torchao_qat(weight_dtype: torch.dtype) -> Callable[[nn.Module], None]:
    """torchao's QAT prepare step: int8 per-token asymmetric inputs, per-channel symmetric weights (Linear only)."""

    def prepare(model: nn.Module) -> None:
        torchao, info = load_torchao()
        if torchao is None:
            raise RuntimeError(f"torchao {info}")
        from torchao.quantization import quantize_
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

        act = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
        weight = IntxFakeQuantizeConfig(weight_dtype, "per_channel", is_symmetric=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_(model, QATConfig(activation_config=act, weight_config=weight, step="prepare"))

    return prepare


# -- models and data ----------------------------------------------------------------------------
class _FusedAdam:
    """Mixin: ``Adam(fused=True)``, the fastest stock Adam on CPU and CUDA (and the one GradualPruning asks
    for on CPU: the default CPU Adam is slow on the exact zeros of masked slots), so no variant's ratio is
    diluted by a slow optimizer step."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, fused=True)


class _MLP(_FusedAdam, MLP):
    pass


class _CNN(_FusedAdam, SmallCNN):
    pass


class _LM(_FusedAdam, TinyTransformerLM):
    pass


@dataclass(frozen=True)
class Model:
    """A model of the table and its data.

    Args:
        key: its ``--model`` name.
        name: its label.
        build: a fresh, identically initialised module (built under the device's context).
        shape: one input's shape; token ids of that length for a language model.
        classes: output classes (the vocabulary of a language model).
        batch: batch size.
        tokens: a language model (inputs are ids, labels the next ids).
        precision: the Trainer's precision.
    """

    key: str
    name: str
    build: Callable[[], L.LightningModule]
    shape: tuple[int, ...]
    classes: int
    batch: int
    tokens: bool = False
    precision: str = "32-true"

    def loader(self, batches: int, pin: bool = False) -> DataLoader:
        """``batches`` batches per epoch; ``pin``: page-locked, so copies to a GPU do not wait for it."""
        return random_loader(batches, self.batch, self.shape, self.classes, self.tokens, pin)


def mlp(width: int, layers: int) -> MLP:
    """``layers`` x Linear(width) with ReLU between (the demo MLP; ``.net`` is the bare network)."""
    return MLP(in_features=width, hidden=[width] * (layers - 1), num_classes=width)


def models(device: str, quick: bool) -> list[Model]:
    """The MLP (the CPU target model), the digits CNN and a decoder LM: ~109M parameters on CUDA
    (6 blocks, d=1024, vocab 32,000, tied embedding, 16 x 512 tokens, bf16-mixed), the same code scaled
    down on CPU (a CPU run stays minutes)."""
    if device == "cuda":
        lm = dict(vocab_size=32000, context_length=512, d_model=1024, n_layers=6, n_heads=16)
        lm_batch, lm_precision = 16, "bf16-mixed"
    else:
        lm = dict(vocab_size=512, context_length=32, d_model=64, n_layers=2, n_heads=4) if quick else \
            dict(vocab_size=4096, context_length=64, d_model=128, n_layers=4, n_heads=4)
        lm_batch, lm_precision = 8, "32-true"
    lm_name = f"LM {lm['n_layers']}x{lm['d_model']}, vocab {lm['vocab_size']}, {lm_batch}x{lm['context_length']} tokens"
    width, channels = (128, 8) if quick else (512, 32)  # a smoke run only has to exercise every variant
    return [
        Model("mlp", f"MLP 4x{width}, batch 128", lambda: _MLP(in_features=width, hidden=[width] * 3, num_classes=width),
              (width,), width, 128),
        Model("cnn", f"digits SmallCNN({channels}), batch 64", lambda: _CNN(channels=channels), (1, 8, 8), 10, 64),
        Model("lm", lm_name, lambda: _LM(**lm), (lm["context_length"],), lm["vocab_size"], lm_batch, True,
              lm_precision),
    ]


def random_loader(batches: int, batch: int, shape: Sequence[int], classes: int, tokens: bool = False,
                  pin: bool = False) -> DataLoader:
    """``batches`` batches of random inputs and labels from a fixed seed, in order.

    Args:
        batches: batches per epoch.
        batch: batch size.
        shape: one input's shape.
        classes: labels are in ``[0, classes)``.
        tokens: inputs are ids in ``[0, classes)`` and labels the next ids (a language model's batch).
        pin: page-locked memory (``pin_memory``).
    """
    g = torch.Generator().manual_seed(1)
    n = batches * batch
    if tokens:
        ids = torch.randint(0, classes, (n, shape[0] + 1), generator=g)
        data = TensorDataset(ids[:, :-1], ids[:, 1:])
    else:
        data = TensorDataset(torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g))
    return DataLoader(data, batch_size=batch, shuffle=False, pin_memory=pin)


# -- one fit -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """How the fits run.

    Args:
        device: "cpu" or "cuda".
        compile: compile each module's forward (``torch.compile``, inductor) before its fit.
        steps: optimizer steps per fit.
        epoch: batches per epoch (short epochs let Lightning's ModelPruning prune before the timed steps).
        warmup: steps not timed at the start of a fit (compilation included).
        repeats: fits per variant.
    """

    device: str = "cpu"
    compile: bool = False
    steps: int = 50
    epoch: int = 10
    warmup: int = 12
    repeats: int = 12


class StepTimer(Callback):
    """Last in the callback list: marks the start of every training batch, with its epoch and global step.

    On CUDA a mark is an event recorded on the current stream instead of a host clock: the
    intervals are then the GPU's time per step, idle gaps included, and nothing synchronises
    before the fit ends.
    """

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.marks: list[tuple[int, int, Any]] = []

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self.cuda:
            mark = torch.cuda.Event(enable_timing=True)
            mark.record()
        else:
            mark = time.perf_counter()
        self.marks.append((trainer.current_epoch, trainer.global_step, mark))

    def intervals(self) -> list[tuple[int, bool, float]]:
        """(global step, whether the step ends in its own epoch, seconds) of every step but the last."""
        if self.cuda:
            torch.cuda.synchronize()
        return [(s0, e0 == e1, a.elapsed_time(b) / 1e3 if self.cuda else b - a)
                for (e0, s0, a), (e1, _, b) in zip(self.marks, self.marks[1:])]


class PeakMemory:
    """The peak memory of one fit, from construction on: CUDA's peak allocation, or on CPU the growth of
    the peak resident set (Linux; None elsewhere).

    On CPU glibc is first asked to hand freed heap back (``malloc_trim``) and the kernel's peak is
    reset (``/proc/self/clear_refs``), so a fit's growth does not depend on what earlier fits left
    in the heap.
    """

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = 0
            return
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")
            self.base = self._status("VmRSS")
        except (OSError, AttributeError):
            self.base = None

    @staticmethod
    def _status(field_name: str) -> int:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field_name + ":"))
        return int(line.split()[1]) * 1024

    def peak(self) -> int | None:
        if self.cuda:
            return torch.cuda.max_memory_allocated()
        return None if self.base is None else self._status("VmHWM") - self.base


def _storages(root: Any, seen: set[int], out: dict[int, int], depth: int = 0) -> dict[int, int]:
    """Every tensor storage reachable from ``root`` (storage address -> bytes), through modules,
    containers and the attributes of lichtenberg / Lightning / torchao objects; not through the
    trainer or optimizers (their state is not what the callback holds)."""
    if id(root) in seen or depth > 8:
        return out
    seen.add(id(root))
    if isinstance(root, torch.Tensor):
        storage = root.untyped_storage()
        out[storage.data_ptr()] = storage.nbytes()
    elif isinstance(root, nn.Module):
        for m in root.modules():
            tensors = [*m.parameters(recurse=False), *m.buffers(recurse=False)]
            tensors += [v for v in vars(m).values() if isinstance(v, torch.Tensor)]  # e.g. torch.prune's weight
            for t in tensors:
                _storages(t, seen, out, depth + 1)
    elif isinstance(root, dict):
        for v in list(root.values()):
            _storages(v, seen, out, depth + 1)
    elif isinstance(root, (list, tuple, set)):
        for v in list(root):
            _storages(v, seen, out, depth + 1)
    elif not isinstance(root, (L.Trainer, torch.optim.Optimizer)) and hasattr(root, "__dict__") and \
            type(root).__module__.startswith(("lichtenberg", "lightning", "torchao", "torch.optim.swa_utils")):
        for v in list(vars(root).values()):
            _storages(v, seen, out, depth + 1)
    return out


def held_bytes(module: nn.Module, callbacks: list[Callback], plain: dict[int, int]) -> int:
    """Tensor bytes the callbacks added: in the module (buffers, replaced parameters) or held by the callbacks,
    beyond the ``plain`` module's storages."""
    tensors = _storages(callbacks, set(), _storages(module, set(), {}))
    return sum(b for p, b in tensors.items() if p not in plain)


def fit_once(model: Model, variant: Variant, cfg: Settings, loader: DataLoader) -> dict[str, Any]:
    """Train a fresh ``model`` with ``variant`` for ``cfg.steps`` steps; its step times and memory.

    Returns:
        ``median_s`` over the timed steps (after ``cfg.warmup``, before the second-to-last, not
        crossing an epoch end), ``intervals`` (every step's (global step, within its epoch,
        seconds)), ``peak_bytes``, ``held_bytes`` and, compiled, the graphs and graph breaks.
    """
    memory = PeakMemory(cfg.device)
    torch.manual_seed(0)
    with torch.device(cfg.device):  # a 100M-parameter init on the host would take longer than the fit
        module = model.build()
    plain = _storages(module, set(), {})
    params = sum(p.numel() for p in module.parameters())
    if variant.prepare is not None:
        variant.prepare(module)
    callbacks = variant.callbacks()
    timer = StepTimer(cfg.device == "cuda")
    if cfg.compile:
        # The bound forward, in place (traced at the first forward, after the callbacks' set-up; parameter
        # names unchanged). Not module.compile(): with torch 2.13 it hands dynamo no frame (nothing compiles).
        # Not Lightning's own path, a compiled module passed to fit: it also compiles training_step, where
        # dynamo fails on self.log (torch 2.13, Lightning 2.6). Fresh caches: every fit compiles its own
        # module and never hits the recompile limit.
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        module.forward = torch.compile(module.forward)
    # max_epochs only matters to DataPruning (it plans per epoch, and its epochs are shorter).
    trainer = harness.trainer(accelerator=cfg.device, precision=model.precision, max_steps=cfg.steps,
                              max_epochs=2 * math.ceil(cfg.steps / cfg.epoch) + 1, limit_val_batches=0,
                              num_sanity_val_steps=0, callbacks=[*callbacks, timer])  # the timer last
    trainer.fit(module, loader)
    intervals = timer.intervals()
    steady = [dt for step, within, dt in intervals if within and cfg.warmup <= step < cfg.steps - 2]
    out = {"median_s": harness.median(steady), "steps_timed": len(steady), "intervals": intervals,
           "peak_bytes": memory.peak(), "held_bytes": held_bytes(module, callbacks, plain), "params": params}
    if cfg.compile:
        counters = torch._dynamo.utils.counters
        out |= {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values())}
    return out


def measure(model: Model, table: list[Variant], cfg: Settings) -> dict[str, Any]:
    """Every variant of ``table`` (the first is the baseline) on ``model``, ``cfg.repeats`` interleaved fits each.

    A variant that raises is a result (``errors``), not the end of the run: it is not fitted again.
    One fit of the baseline before the rounds is not measured.

    Returns:
        ``rows`` (``harness.ratio_table`` vs the first variant), ``step_s`` (per-fit medians),
        ``fits`` (``fit_once``'s results, aligned with ``step_s``), ``errors`` and ``rounds``.
    """
    loader = model.loader(cfg.epoch, pin=cfg.device == "cuda")
    # Not measured: the first fit of a model pays one-off costs (lazy imports and kernels, heap growth)
    # that would otherwise land on whichever variant comes first.
    fit_once(model, table[0], cfg, loader)
    errors: dict[str, dict[str, str]] = {}

    def fit(variant: Variant) -> Callable[[], tuple[float, Any]]:
        def call() -> tuple[float, Any]:
            if variant.name in errors:
                return math.nan, None
            try:
                out = fit_once(model, variant, cfg, loader)
            except Exception as exc:
                errors[variant.name] = harness.crash_record(exc)
                return math.nan, None
            return out["median_s"], out

        return call

    log: list[dict] = []
    extras: dict[str, list[Any]] = {}
    times = harness.interleaved({v.name: fit(v) for v in table}, cfg.repeats, max_foreign=MAX_FOREIGN, log=log,
                                extras=extras)
    ok = {k: v for k, v in times.items() if k not in errors}
    base = table[0].name
    return {"rows": harness.ratio_table(ok, base) if base in ok else [], "step_s": ok,
            "fits": {k: extras[k] for k in ok}, "errors": errors, "rounds": log}


# -- the benchmark -----------------------------------------------------------------------------
def _pick(items: list, names: str | None, key: Callable[[Any], str]) -> list:
    """The items whose ``key`` contains one of the comma-separated ``names`` (case-insensitive); all if None."""
    if not names:
        return items
    wanted = [n.strip().lower() for n in names.split(",") if n.strip()]
    return [x for x in items if any(w in key(x).lower() for w in wanted)]


def _summary(model: Model, m: dict[str, Any], table: list[Variant], date: str) -> dict[str, Any]:
    """One model's rows as published: ratios, memory, graphs; the raw intervals left out."""
    targets = {v.name: v.target for v in table}
    rows = {}
    for r in m["rows"]:
        fits = m["fits"][r["variant"]]
        peaks = [f["peak_bytes"] for f in fits if f["peak_bytes"] is not None]
        rows[r["variant"]] = {**{k: r[k] for k in ("median", "q1", "q3", "ratio", "ratio_min", "ratio_max", "n")},
                              "target": targets[r["variant"]], "held_bytes": fits[-1]["held_bytes"],
                              "peak_bytes": harness.median(peaks) if peaks else None,
                              "steps_timed": fits[-1]["steps_timed"], "date": date,
                              **{k: fits[-1][k] for k in ("graphs", "graph_breaks") if k in fits[-1]}}
    rows |= {name: {"error": e["error"], "date": date} for name, e in m["errors"].items()}
    params = next((f[-1]["params"] for f in m["fits"].values()), 0)
    return {"name": model.name, "params": params, "rows": rows,
            "rounds_rerun": sum(1 for x in m["rounds"] if not x["kept"]),
            "rounds_disturbed": sum(1 for x in m["rounds"] if x["kept"] and x["disturbed"])}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure the models and variants ``args`` selects; a filtered full run keeps the rest of the published table."""
    quick = args.quick
    repeats = args.repeats or DEFAULT_REPEATS[args.device, args.compile]
    cfg = Settings(device=args.device, compile=args.compile, **(dict(steps=12, epoch=4, warmup=5, repeats=1) if quick
                                                              else dict(repeats=repeats)))
    if cfg.device == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 models, as anyone training on CUDA would
    chosen = _pick(models(cfg.device, quick), args.model or DEFAULT_MODELS.get((cfg.device, cfg.compile)),
                   lambda m: m.key)
    table = [variants(cfg.steps)[0], *_pick(variants(cfg.steps)[1:], args.variants, lambda v: v.name)]
    torchao, torchao_info = load_torchao()
    pinned = harness.pin_allocator()
    date = time.strftime("%Y-%m-%d")
    results: dict[str, Any] = {"settings": {**vars(cfg), "allocator_pinned": pinned, "torchao": torchao_info,
                                            "torchao_ok": torchao is not None, "max_foreign": MAX_FOREIGN,
                                            "threads": torch.get_num_threads(),
                                            "gpu": torch.cuda.get_device_name() if cfg.device == "cuda" else None},
                               "models": {}}
    t0 = time.perf_counter()
    for model in chosen:
        print(f"[overhead] {time.perf_counter() - t0:5.0f} s  {model.name}: {len(table)} variants x {cfg.repeats} "
              f"fits of {cfg.steps} steps ({cfg.device}{', compiled' if cfg.compile else ''})", flush=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*slow path on the exact zeros.*")
            results["models"][model.key] = _summary(model, measure(model, table, cfg), table, date)
    print(f"[overhead] {time.perf_counter() - t0:5.0f} s  done", flush=True)
    if not quick and (args.model or args.variants):
        results = merged(section_name(args), results)
    return results


def merged(name: str, new: dict[str, Any], path: str | Path = "docs/results.md") -> dict[str, Any]:
    """``new`` over the data published in section ``name`` of ``path``: models and rows not re-run are kept
    (each row keeps its own date and its own run's plain baseline)."""
    old = harness.read_section_data(name, path) or {"models": {}}
    for key, m in new["models"].items():
        rows = {**old["models"].get(key, {}).get("rows", {}), **m["rows"]}
        old["models"][key] = {**m, "rows": rows}
    return {**new, "models": old["models"]}


def section_name(args: argparse.Namespace) -> str:
    """``overhead`` on CPU, ``overhead-cuda`` on CUDA, ``-compiled`` appended with ``--compile``."""
    return "overhead" + ("-cuda" if args.device == "cuda" else "") + ("-compiled" if args.compile else "")


# -- rendering ---------------------------------------------------------------------------------
def _ratio(r: dict[str, Any]) -> str:
    if "error" in r:
        return "error¹"
    text = f"{r['ratio']:.3f}× ({r['ratio_min']:.2f}–{r['ratio_max']:.2f})"
    return f"**{text}**" if r.get("target") and r["ratio"] > r["target"] else text


def _mib(b: float | None) -> str:
    return "—" if b is None else f"{b / 2**20:.1f}"


def render(res: dict[str, Any]) -> str:
    s, ms = res["settings"], res["models"]
    cuda, compiled = s["device"] == "cuda", s["compile"]
    names = list(dict.fromkeys(v for m in ms.values() for v in m["rows"]))
    keys = list(ms)
    threads = f"{s['threads']} torch thread{'s' * (s['threads'] != 1)}"
    where = (f"CUDA ({s['gpu']})" if cuda else f"CPU, {threads}") + (", compiled" if compiled else "")
    lines = [
        f"## Training-step overhead of every technique beside its peers ({where})",
        "",
        f"Each variant trains a fresh copy of the model inside `Trainer.fit` for {s['steps']} optimizer steps in "
        f"{s['epoch']}-batch epochs, `Adam(fused=True)`, random data; {s['repeats']} fits per variant, interleaved "
        "with the plain Trainer's (rotating order). A step is the interval between consecutive `on_train_batch_start` "
        f"calls ({'CUDA events on the stream, no added synchronisation' if cuda else '`time.perf_counter`'}): every "
        f"hook and the next batch's fetch included; the first {s['warmup']} steps"
        f"{' (compilation included)' if compiled else ''}, the last two (DST's one update comes at the second-to-last) "
        "and the steps that cross an epoch end are not timed. Cells: median of the variant's per-fit medians over "
        "plain's, in brackets the min–max of the per-round ratios (fits that ran next to each other); **bold**: above "
        "the technique's target. Rounds with other processes using more than "
        f"{s['max_foreign']:.0%} of the CPUs were re-run; allocator pinned: {'yes' if s['allocator_pinned'] else 'no'}.",
        "",
        "Variants: EMA decay 0.999 every step (ours; Lightning's `EMAWeightAveraging`); SWA with a snapshot every step "
        "from step 0; GradualPruning one-shot to 90% at step 0 (masked steps, no event), Lightning's `ModelPruning` "
        "(l1, per layer, the same layers) at 90% after the first epoch; DST RigL at 90% between updates; QAT W8A8 "
        "(LSQ weights per channel, dynamic per-token inputs; the default) and W4 weights only; torchao's QAT "
        "(`QATConfig` int8 per-token inputs, int8 per-channel weights, Linear layers only) "
        + (f"(torchao {s['torchao']})" if s["torchao_ok"] else f"({s['torchao']})")
        + "; SampleReweighting linupper from step 0 (its logs every 50 steps); DataPruning ratio 0.5 (per forwarded "
        "batch); GradualPruning + QAT + EMA together.",
        "",
    ]
    header = ["variant", *(ms[k]["name"] + f" ({ms[k]['params'] / 1e6:.1f}M)" for k in keys), "target"]
    rows = []
    for v in names:
        cells = []
        for k in keys:
            r = ms[k]["rows"].get(v)
            cells.append("—" if r is None else (f"{r['median'] * 1e3:.2f} ms [{r['q1'] * 1e3:.2f}–{r['q3'] * 1e3:.2f}]"
                                                if v == "plain" and "error" not in r else _ratio(r)))
        target = next((ms[k]["rows"][v].get("target") for k in keys if v in ms[k]["rows"]), None)
        rows.append([v, *cells, f"≤ {target}×" if target else ""])
    lines.append(harness.markdown_table(header, rows))
    notes = [f"{ms[k]['name']}: rounds re-run {ms[k]['rounds_rerun']}, kept disturbed {ms[k]['rounds_disturbed']}"
             for k in keys]
    errors = [f"{v} on {ms[k]['name']}: `{ms[k]['rows'][v]['error']}`" for k in keys for v in names
              if "error" in ms[k]["rows"].get(v, {})]
    dates = {r["date"] for m in ms.values() for r in m["rows"].values()}
    lines += ["", "; ".join(notes) + "."]
    if errors:
        lines += ["", "¹ " + "; ".join(errors)]
    if len(dates) > 1:
        lines += ["", f"Rows come from runs on {', '.join(sorted(dates))} (partial re-runs); each ratio is against "
                  "the plain fits of its own run."]
    mem = ("peak `torch.cuda.max_memory_allocated` per fit (MiB, median), and vs plain" if cuda else
           "growth of the peak resident set during a fit (MiB, median over fits; glibc trimmed and the kernel's "
           "peak reset before each fit) minus plain's" + ("; it includes the compiler's own memory, since each fit "
                                                            "compiles afresh" if compiled else ""))
    lines += ["", f"Memory: *held*: tensor bytes the callbacks added, in the module (masks, scales, torch.prune's "
              f"copies) or held by the callbacks (averages, scores), MiB; *peak*: {mem}.", ""]
    rows = []
    for v in names:
        cells = []
        for k in keys:
            r, p = ms[k]["rows"].get(v, {}), ms[k]["rows"].get("plain", {})
            if "held_bytes" not in r:
                cells.append("—")
                continue
            if r.get("peak_bytes") is None or p.get("peak_bytes") is None:
                peak = "—"
            elif cuda:
                peak = f"{_mib(r['peak_bytes'])} ({r['peak_bytes'] / p['peak_bytes']:.2f}×)"
            else:
                peak = f"{'+' if r['peak_bytes'] >= p['peak_bytes'] else '−'}{_mib(abs(r['peak_bytes'] - p['peak_bytes']))}"
            cells.append(f"{_mib(r['held_bytes'])} / {peak}")
        rows.append([v, *cells])
    lines.append(harness.markdown_table(["variant", *(f"{ms[k]['name']}: held / peak" for k in keys)], rows))
    if compiled:
        lines += ["", "Graphs compiled / graph breaks per fit (`torch._dynamo` counters, last fit):", ""]
        lines.append(harness.markdown_table(["variant", *(ms[k]["name"] for k in keys)], [
            [v, *(f"{r['graphs']} / {r['graph_breaks']}" if "graphs" in r else "—"
                  for r in (ms[k]["rows"].get(v, {}) for k in keys))] for v in names]))
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()
    ms = res["models"]
    names = [v for v in dict.fromkeys(v for m in ms.values() for v in m["rows"]) if v != "plain"]
    fig, ax = plt.subplots(figsize=(12, 4))
    width = 0.8 / len(ms)
    for i, m in enumerate(ms.values()):
        rs = [m["rows"].get(v, {}) for v in names]
        ok = [j for j, r in enumerate(rs) if "ratio" in r]
        ax.bar([j + (i - (len(ms) - 1) / 2) * width for j in ok], [rs[j]["ratio"] for j in ok], width,
               yerr=[[rs[j]["ratio"] - rs[j]["ratio_min"] for j in ok], [rs[j]["ratio_max"] - rs[j]["ratio"] for j in ok]],
               capsize=2, label=m["name"])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("step time / plain (median)")
    s = res["settings"]
    ax.set_title(f"Training-step overhead ({s['device']}{', compiled' if s['compile'] else ''})", fontsize=10)
    ax.legend(fontsize=8)
    harness.save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small models, 12 steps, one fit per variant, "
                        "docs untouched")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--compile", action="store_true", help="compile each module (inductor) before its fit")
    parser.add_argument("--model", help="comma-separated: mlp, cnn, lm (default: all; compiled: the MLP on CPU, "
                        "the LM on CUDA)")
    parser.add_argument("--variants", help="comma-separated parts of variant names, e.g. 'EMA,QAT' (plain always runs)")
    parser.add_argument("--repeats", type=int, help="fits per variant (default: 12 on CPU, 5 on CUDA; compiled 4 "
                        "on CPU, 3 on CUDA)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    harness.start(args.quick, THREADS)
    t0 = time.perf_counter()
    results = run(args)
    harness.publish(section_name(args), results, time.perf_counter() - t0, render, plot,
                    "step-time ratios vs the plain Trainer", args.quick)


if __name__ == "__main__":
    main()
