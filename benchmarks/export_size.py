"""Size and load time of compact exports (`lichtenberg export --format compressed`) vs the dense fp32 state dict.

For each model (a 4 x ``Linear(512)`` MLP and the digits ``SmallCNN(channels=32)``, where the
weights dominate), each variant's sparse and/or quantized weights are produced directly with
the core functions, no training: magnitude masks per layer (``topk_mask`` 50% / 90%,
``nm_mask`` 2:4 on every layer whose fan-in divides by 4), and weight-only fake quantization
started on them (``prepare_`` + ``WeightQuantizer``: int8 minmax, int4 LSQ, ternary absmean,
all per output channel; pruning + QAT masks the weight first). The plain state dict
(``plain_state_dict``) and ``export_int`` go through ``save_compressed``; the file is read back
with ``decompress_state_dict`` and checked against them (exact for sparsity; equal to
``dequantize(export_int(...))`` for QAT).

Sizes: the file, and each weight's stored bytes (read from the safetensors header), against the
dense fp32 state dict (4 bytes a value) and against the formula ``(d·b + 1/8) / b`` of a bitmask
(density d, b bytes a stored value) times b / 4 for values narrower than fp32: a sparse fp32
weight is ``d + 1/32`` of dense, int4 ``1/8`` (plus scales), int4 at density d
``(d/2 + 1/8) / 4``. Load time: median of interleaved ``decompress_state_dict`` calls, beside
``torch.load`` of the dense ``.pt`` state dict.

Run from the repository root: ``python -m benchmarks.export_size [--quick]``.
"""

from __future__ import annotations

import json
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from benchmarks import harness
from lichtenberg.core import decompress_state_dict, plain_state_dict
from lichtenberg.core.compression import save_compressed
from lichtenberg.core.layers import as_rows, layer_kind
from lichtenberg.core.quantization import WeightQuantizer, dequantize, export_int, prepare_
from lichtenberg.core.sparsity import nm_mask, topk_mask

__all__ = ["VARIANTS", "main", "run"]

THREADS = 1  # loading is single-threaded work; one thread keeps the timing steady on a shared machine
REPEATS, QUICK_REPEATS = 15, 3
# variant -> (sparsity: None | fraction | "2:4", quantization: None | (bits, method))
VARIANTS: dict[str, tuple[Any, Any]] = {
    "dense fp32": (None, None),
    "50% unstructured": (0.5, None),
    "90% unstructured": (0.9, None),
    "2:4": ("2:4", None),
    "int8": (None, (8, "minmax")),
    "int4": (None, (4, "lsq")),
    "ternary": (None, ("ternary", "ternary")),
    "50% + int4": (0.5, (4, "lsq")),
    "90% + int4": (0.9, (4, "lsq")),
}
TARGETS = {"90% unstructured": 0.2, "int4": 0.15}  # the whole file vs the dense fp32 state dict


def _models(quick: bool) -> dict[str, tuple[Any, tuple[int, ...]]]:
    """name -> (a function building the model, input shape)."""
    from lichtenberg.cli.models import SmallCNN

    width = 128 if quick else 512

    def mlp() -> nn.Module:
        return nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(width, width), nn.ReLU())][:-1])

    return {f"MLP 4×{width}": (mlp, (8, width)), "digits CNN": (lambda: SmallCNN(channels=8 if quick else 32), (8, 1, 8, 8))}


@torch.no_grad()
def _variant(model: nn.Module, shape: tuple[int, ...], sparsity: Any, quant: Any):
    """The model's plain state dict and integer export (or None) for one variant, in place."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    masks = {}
    for name, layer in layers.items() if sparsity is not None else ():
        score = as_rows(layer.weight.abs(), layer_kind(layer)[0])  # [out, in, ...]
        if sparsity == "2:4":
            if score[0].numel() % 4:
                continue  # e.g. the CNN's first conv (fan-in 9) stays dense
            mask = nm_mask(score, 2, 4)
        else:
            mask = topk_mask(score, round(score.numel() * (1 - sparsity)))
        layer.weight.mul_(mask)
        masks[name] = mask
    ints = None
    if quant is not None:
        bits, method = quant

        def make(m, kind):
            wq = WeightQuantizer(as_rows(m.weight, kind).shape, bits, method, "channel")
            wq.enabled = True
            return wq

        prepare_(layers, make, lambda m: None)
        for name, mask in masks.items():
            layers[name].register_buffer("weight_mask", mask)
        model.eval()(torch.randn(shape))  # LSQ initialises its scales on the first quantized forward
        ints = export_int(model)
    return plain_state_dict(model.state_dict()), ints, masks


def _stored(path: Path) -> tuple[dict[str, int], int]:
    """Bytes of every tensor in a safetensors file, and the header's bytes."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()}, n + 8


def _formula(weight: torch.Tensor, q: dict | None, fmt: str) -> float:
    """Predicted bytes / dense fp32 bytes of one weight: (d·b + 1/8) / b scaled to fp32, b the stored bytes."""
    if q is None:
        b, d = 4.0, float((weight != 0).float().mean())
        return (d * b + 1 / 8) / 4 if fmt == "bitmask" else 1.0
    bits = {"ternary": 2, "binary": 1}.get(str(q["bits"]), q["bits"])
    b, d = bits / 8, float((q["weight"] != 0).float().mean())
    return (d * b + 1 / 8) / 4 if fmt == "packed_bitmask" else b / 4


def _measure(name: str, model: nn.Module, shape, variant: str, folder: Path) -> dict[str, Any]:
    sparsity, quant = VARIANTS[variant]
    state, ints, masks = _variant(model, shape, sparsity, quant)
    path = folder / f"{name}-{variant}.safetensors".replace(" ", "_").replace("%", "").replace("×", "x")
    size = save_compressed(path, state, ints)
    out = decompress_state_dict(path)
    quantized = {f"{n}.weight": e for n, e in (ints or {}).items()}
    for key, value in state.items():  # the file holds exactly what it claims
        expected = dequantize(quantized[key]).to(value.dtype) if key in quantized else value
        assert torch.equal(out[key], expected), f"{name} {variant}: {key} does not round-trip"
    parts, header = _stored(path)
    layout = json.loads(_metadata(path)["lichtenberg.layout"])
    dense = sum(v.numel() * 4 for v in state.values())
    weights = {}
    for key, value in state.items():
        if not (key.endswith("weight") and value.dim() >= 2):
            continue
        stored = sum(b for part, b in parts.items() if part == key or part.startswith((key + ".", key + "_")))
        predicted = _formula(value, quantized.get(key), layout[key]["format"])
        weights[key] = {"format": layout[key]["format"], "numel": value.numel(), "ratio": stored / (value.numel() * 4),
                        "formula": predicted, "density": float((value != 0).float().mean())}
    formula_bytes = sum(w["formula"] * w["numel"] * 4 for w in weights.values()) + sum(
        v.numel() * 4 for k, v in state.items() if k not in weights)
    return {"path": str(path), "bytes": size, "header": header, "dense_bytes": dense, "ratio": size / dense,
            "formula_ratio": formula_bytes / dense, "weights": weights, "sparse_layers": sorted(masks)}


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def _timed(fn) -> Any:
    def call() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return call


def run(quick: bool) -> dict[str, Any]:
    repeats = QUICK_REPEATS if quick else REPEATS
    results: dict[str, Any] = {"settings": {"repeats": repeats, "threads": THREADS, "targets": TARGETS}, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, (build, shape) in _models(quick).items():
            torch.manual_seed(0)
            init = build().state_dict()
            rows = {}
            for variant in VARIANTS:  # each from the same initial weights
                model = build()
                model.load_state_dict(init)
                rows[variant] = _measure(name, model, shape, variant, folder)
            pt = folder / f"{name}.pt".replace(" ", "_").replace("×", "x")
            torch.save(init, pt)
            loaders = {v: _timed(lambda p=r["path"]: decompress_state_dict(p)) for v, r in rows.items()}
            loaders["torch.load dense .pt"] = _timed(lambda: torch.load(pt))
            times = harness.interleaved(loaders, repeats)
            for variant, r in rows.items():
                r["load_s"] = times[variant]
                del r["path"]  # a temporary file
            results["models"][name] = {"params": sum(v.numel() for v in init.values() if v.is_floating_point()),
                                       "variants": rows, "torch_load_s": times["torch.load dense .pt"],
                                       "pt_bytes": pt.stat().st_size}
    return results


def _verdicts(results: dict[str, Any]) -> list[str]:
    out = []
    for name, m in results["models"].items():
        for variant, bound in TARGETS.items():
            r = m["variants"][variant]["ratio"]
            out.append(f"{name}, {variant}: {r:.3f}× ≤ {bound}× {'holds' if r <= bound else 'does **not** hold'}")
    return out


def render(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        "## Compact exports: file size and load time",
        "",
        "`save_compressed` (what `lichtenberg export --format compressed` writes) on weights made sparse and/or "
        "quantized directly with the core functions (magnitude masks per layer; weight-only fake quantization per "
        "output channel: int8 minmax, int4 LSQ, ternary absmean), no training. *× fp32*: bytes over the dense fp32 "
        "state dict (4 bytes a value); *formula*: a bitmask costs `(d·b + 1/8)/b` of a dense tensor of b-byte values "
        "(density d), scaled by b/4 against fp32 (sparse fp32: d + 1/32; int4: 1/8; int4 at density d: (d/2 + 1/8)/4); "
        "the file's formula counts the other tensors at fp32 and no header (*header*: safetensors' JSON header with the "
        "layout metadata, ~150 bytes a stored tensor). *weights*: the range over the model's weights of "
        "measured / formula (scales, shape tensors and per-tensor rounding are the difference). Every file was read "
        "back and checked: exact for sparse weights, `dequantize(export_int(...))` exactly for quantized ones. "
        f"Load: median ms of `decompress_state_dict` over {s['repeats']} interleaved rounds "
        f"({s['threads']} torch thread), beside `torch.load` of the dense `.pt`.",
    ]
    for name, m in results["models"].items():
        rows = []
        for variant, r in m["variants"].items():
            ws = [w["ratio"] / w["formula"] for w in r["weights"].values()]
            formats = sorted({w["format"] for w in r["weights"].values()})
            rows.append([variant, ", ".join(formats), f"{r['bytes'] / 1024:,.1f}", f"{r['header'] / 1024:.1f}",
                         f"**{r['ratio']:.3f}**",
                         f"{r['formula_ratio']:.3f}", f"{r['ratio'] / r['formula_ratio']:.3f}",
                         f"{min(ws):.3f}–{max(ws):.3f}", f"{harness.median(r['load_s']) * 1e3:.2f}"])
        dense = m["variants"]["dense fp32"]["dense_bytes"]
        rows.append(["`torch.save` dense .pt", "—", f"{m['pt_bytes'] / 1024:,.1f}", "—", f"{m['pt_bytes'] / dense:.3f}",
                     "—", "—", "—", f"{harness.median(m['torch_load_s']) * 1e3:.2f} (`torch.load`)"])
        lines += ["", f"### {name} ({m['params']:,} floating-point values)", "",
                  harness.markdown_table(["variant", "weights stored as", "KiB", "header KiB", "× fp32", "formula ×",
                                          "measured / formula", "weights: measured / formula", "load ms"], rows)]
    lines += ["", "Targets (whole file vs the dense fp32 state dict):", ""] + [f"- {v}." for v in _verdicts(results)]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()
    models = results["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 3.8), squeeze=False)
    for ax, (name, m) in zip(axes[0], models.items()):
        names = list(m["variants"])
        ax.barh(range(len(names)), [m["variants"][v]["ratio"] for v in names], color="tab:blue", label="measured")
        ax.scatter([m["variants"][v]["formula_ratio"] for v in names], range(len(names)), color="k", marker="|", s=120,
                   label="formula", zorder=3)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("file size / dense fp32 state dict")
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
    harness.save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    harness.main("export_size", run, render, plot, "file size vs the dense fp32 state dict", argv, threads=THREADS,
                 quick="a 4×128 MLP and SmallCNN(channels=8), 3 load rounds")


if __name__ == "__main__":
    main()
