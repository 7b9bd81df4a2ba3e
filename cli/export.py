"""`lichtenberg export`: a checkpoint to a model you can ship.

    lichtenberg export --config pruning-digits --ckpt_path last.ckpt --out digits.safetensors --format compressed
    lichtenberg export --config qat-digits --ckpt_path last.ckpt --out digits.int.pt               # --format int
    lichtenberg export --config qat-digits --ckpt_path last.ckpt --out digits.int8.pt --format int8
    lichtenberg export --config default --ckpt_path last.ckpt --out digits.pt --format plain --averaged EMA

The config (recipe names or YAMLs, as for `fit`) rebuilds the model and, for QAT, the
fake-quant layers; the checkpoint (a ``.ckpt`` file or a sharded run's directory) fills them.
Formats (docs/export.md):

- ``compressed``: one safetensors file, ``lichtenberg.core.decompress_state_dict`` reads it back
  into the plain module's state dict. Sparse weights as bitmask + values, QAT weights as packed
  integers + scales (both where a weight is both), tied weights once, the rest as is.
- ``plain``: ``torch.save`` of the plain module's state dict (masks applied; QAT's latent
  float weights), loadable without lichtenberg.
- ``int`` (QAT): ``{"quantized": export_int(model), "float": <every other tensor>}``.
- ``int8`` (QAT, CPU inference): the whole module after ``to_int8_cpu_`` (torch's dynamic int8
  Linear kernels; ``torch.load(path, weights_only=False)``). ``--int8`` is an alias.

``--averaged EMA`` (or SWA) exports the model the averaging callback evaluates: its averages
replace the raw tensors they average (weights, BatchNorm statistics, and LSQ scales when it
averaged them), still on the sparsity masks and quantized on the QAT grid; scales computed
from the weights (minmax, stat, ternary, binary) follow the averaged weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..core.checkpoints import _BESIDE, _QUANTIZER_PARTS, _identity, load_checkpoint, plain_state_dict
from ..core.compression import compress_state_dict
from ..core.quantization import export_int, quant_modules, to_int8_cpu_

__all__ = ["FORMATS", "export_main"]

PROG = "lichtenberg export"
FORMATS = ("int", "int8", "compressed", "plain")
_NEEDS_QAT = ("int", "int8")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + exit 2
        raise ValueError(f"{PROG}: {message}; `{PROG} --help` lists the options.")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", required=True, help="recipe name or YAML the run used (repeatable)")
    p.add_argument("--ckpt_path", required=True, help="a .ckpt file, or the directory a sharded run writes")
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--format", choices=FORMATS, help="int (default), int8, compressed or plain; see docs/export.md")
    p.add_argument("--int8", action="store_true", help="the same as --format int8")
    p.add_argument("--averaged", choices=("EMA", "SWA", "Soup"),
                   help="export the EMA / SWA / Soup averages instead of the raw weights")
    return p


def _configs(args: argparse.Namespace) -> str:
    return " ".join(f"--config {c}" for c in args.config)


def _format(args: argparse.Namespace) -> str:
    if args.int8 and args.format not in (None, "int8"):
        raise ValueError(f"--int8 and --format {args.format} ask for two formats; pass one of them.")
    return "int8" if args.int8 else (args.format or "int")


def _masks(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Sparsity masks by weight name: ``<param>_mask`` buffers, or a sparsity callback's state
    (GradualPruning ``make_permanent`` writes checkpoints without the buffers)."""
    state = checkpoint["state_dict"]
    masks = {k[: -len("_mask")]: v for k, v in state.items()
             if k.endswith("_mask") and k[: -len("_mask")] in state and v.dtype == torch.bool}
    for cb_state in (checkpoint.get("callbacks") or {}).values():
        saved = cb_state.get("masks") if isinstance(cb_state, dict) else None
        for name, mask in (saved or {}).items():
            if name in state and isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
                masks.setdefault(name, mask)
    return masks


def _averages(checkpoint: dict[str, Any], averaged: str) -> dict[str, torch.Tensor]:
    """The averaged quantizer tensors (LSQ scales): from the callback state or ``_ema``/``_swa`` buffers."""
    state, suffix = checkpoint["state_dict"], "_" + averaged.lower()
    found = [v for k, v in (checkpoint.get("callbacks") or {}).items() if isinstance(k, str) and k.startswith(averaged + "{")]
    tensors = dict((found[0].get("tensors") or {}) if len(found) == 1 else {})
    tensors.update({k[: -len(suffix)]: v for k, v in state.items() if k.endswith(suffix) and k[: -len(suffix)] in state})
    return {k: v for k, v in tensors.items() if any(p in k for p in _QUANTIZER_PARTS)}


def _check_qat(fmt: str, qat: list, quantized: bool, cli, checkpoint: dict[str, Any], args: argparse.Namespace) -> None:
    """The config / checkpoint / format mismatches, each as one ValueError naming the fix."""
    configs, ckpt = _configs(args), args.ckpt_path
    if len(qat) > 1:
        raise ValueError(f"{configs} attaches {len(qat)} QuantizationAwareTraining callbacks; export needs at most one.")
    if fmt in _NEEDS_QAT and not (qat and quantized):
        raise ValueError(f"--format {fmt} needs a QAT run, but {'the checkpoint ' + ckpt if qat else configs} has no "
                         "quantization; export it with --format compressed or --format plain.")
    if qat and not quantized:
        raise ValueError(f"{configs} attaches QuantizationAwareTraining but {ckpt} holds no quantizer state (a run "
                         "without QAT?); pass the config the run was trained with.")
    if quantized and not qat:
        raise ValueError(f"{ckpt} was trained with QuantizationAwareTraining but {configs} attaches none; pass the "
                         "config the run was trained with (or --format plain for the latent float weights).")
    if qat:
        try:
            qat[0].on_load_checkpoint(cli.trainer, cli.model, checkpoint)  # another QAT setting: refused by name
            saved = (checkpoint.get("callbacks") or {}).get(qat[0].state_key)
            qat[0]._check_config(saved.get("config") if isinstance(saved, dict) else None)
        except ValueError as err:
            raise ValueError(f"{configs} does not match {ckpt}: {str(err).split('. Resume')[0]}. Pass the config the run "
                             "was trained with.") from None


def _check_averaged(checkpoint: dict[str, Any], args: argparse.Namespace) -> None:
    states = [k for k in checkpoint.get("callbacks") or {} if isinstance(k, str) and k.startswith(args.averaged + "{")]
    buffers = any(k.endswith("_" + args.averaged.lower()) for k in checkpoint["state_dict"])
    if len(states) > 1 or not (states or buffers):
        other = {"EMA": "SWA", "SWA": "EMA", "Soup": "EMA"}[args.averaged]
        raise ValueError(f"--averaged {args.averaged}: {args.ckpt_path} holds {len(states)} {args.averaged} states, not "
                         f"one; export the raw weights (no --averaged) or a run's other averages (--averaged {other}).")


def _load(model: torch.nn.Module, checkpoint: dict[str, Any], masks: dict[str, torch.Tensor], args) -> None:
    """The checkpoint's model state into the rebuilt (and maybe QAT-prepared) model, strictly; the
    masks become buffers under every alias, so that export_int quantizes pruned weights to 0
    (binary and stat grids have no zero level of their own)."""
    state = checkpoint["state_dict"]
    beside = {k for k in state for s in _BESIDE if k.endswith(s) and k[: -len(s)] in state}
    aliases = {k: group for group in _tie(model.state_dict(), model) for k in group}
    attached = {}
    for name, mask in masks.items():
        for alias in aliases.get(name, [name]):
            owner, _, leaf = alias.rpartition(".")
            try:
                model.get_submodule(owner).register_buffer(f"{leaf}_mask", mask.clone())
            except AttributeError:  # not this model: the strict load below names the keys
                continue
            attached[f"{alias}_mask"] = mask
    try:
        model.load_state_dict({**{k: v for k, v in state.items() if k not in beside}, **attached})
    except RuntimeError as err:
        lines = [ln.strip().rstrip(".") for ln in str(err).splitlines()[1:] if ln.strip()]
        raise ValueError(f"{args.ckpt_path} does not fit the model of {_configs(args)} ({len(lines)} problems, the "
                         f"first: {lines[0][:200] if lines else err}); pass the config the run was trained with.") from None


def _not_started(model: torch.nn.Module, checkpoint: dict[str, Any]) -> None:
    """Refuse a checkpoint from before QAT's start; switch the quantizers on (as the callback does then)."""
    for name, layer in quant_modules(model).items():
        parts = [layer.weight_quantizer] + ([layer.input_quantizer] if hasattr(layer.input_quantizer, "scale") else [])
        if not all(bool(getattr(p, "initialized", True)) for p in parts):
            raise ValueError(f"{name}: the checkpoint was written before quantization started (step "
                             f"{checkpoint.get('global_step')}); export a checkpoint from after QAT's start_step.")
        for part in (layer.weight_quantizer, layer.input_quantizer):
            if part is not None and hasattr(part, "enabled"):
                part.enabled = True


def _dense_bytes(state: dict[str, torch.Tensor], ties: list[list[str]]) -> int:
    """The plain state dict at float32, each tied tensor once."""
    again = {k for group in ties for k in group[1:]}
    return sum(v.numel() * (4 if v.is_floating_point() else v.element_size()) for k, v in state.items() if k not in again)


def _tie(plain: dict[str, torch.Tensor], model: torch.nn.Module) -> list[list[str]]:
    """The model's tied keys (one Parameter under several names), among the plain state's keys."""
    groups: dict[tuple, list[str]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if key in plain:
            groups.setdefault(_identity(value), []).append(key)
    return [g for g in groups.values() if len(g) > 1]


def _kind(record: dict[str, Any]) -> str:
    """"bitmask", "dense", "packed int4", "packed_bitmask ternary", ... for the summary line."""
    if "bits" not in record:
        return record["format"]
    grid = record["method"] if record.get("method") in ("ternary", "binary") else f"int{record['bits']}"
    return f"{record['format']} {grid}"


def export_main(argv: list[str]) -> dict[str, Any]:
    """Run the export; returns what was written (for tests). Every check runs before anything is written."""
    from ..callbacks import QuantizationAwareTraining
    from .main import build

    args = _parser().parse_args(argv)
    fmt = _format(args)
    if not Path(args.ckpt_path).exists():
        raise ValueError(f"--ckpt_path {args.ckpt_path}: no such file or directory.")
    checkpoint = load_checkpoint(args.ckpt_path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(f"{args.ckpt_path} is not a Lightning checkpoint (no 'state_dict'); pass the .ckpt a fit wrote.")
    quantized = any(any(p in k for p in _QUANTIZER_PARTS) for k in checkpoint["state_dict"])
    cli = build(args.config)  # LightningCLI(run=False): no argv warning, no banners, logger off
    model, trainer = cli.model, cli.trainer
    qat = [cb for cb in trainer.callbacks if isinstance(cb, QuantizationAwareTraining)]
    _check_qat(fmt, qat, quantized, cli, checkpoint, args)
    if args.averaged:
        _check_averaged(checkpoint, args)
    plain = plain_state_dict(checkpoint, averaged=args.averaged)
    if qat:
        rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        level = rank_zero.level
        rank_zero.setLevel(logging.WARNING)  # QAT's targets report: not export's business
        try:
            qat[0].setup(trainer, model, "validate")  # the same fake-quant layers as in training ...
            model.configure_model()  # ... bound after the module's own configure_model, as in a run
        finally:
            rank_zero.setLevel(level)
    _load(model, checkpoint, _masks(checkpoint), args)
    if args.averaged and qat:  # the averaged model as its callback evaluates it
        current = model.state_dict()
        averages = _averages(checkpoint, args.averaged)
        unknown = sorted(set(averages) - set(current))
        if unknown:
            raise ValueError(f"the {args.averaged} state averages {unknown[:3]}, which the config's QAT layers do not "
                             "hold; pass the config the run was trained with.")
        model.load_state_dict({**current, **plain, **averages})  # whole: QAT's load hook checks its quantizers
    ints = tensors = None
    ties = _tie(plain, model)
    if qat and fmt != "plain":
        _not_started(model, checkpoint)
        model.eval()
        qat[0].teardown(trainer, model, "validate")  # its load-time hook must not travel with a saved module
        if fmt != "int8":
            ints = export_int(model)
    if fmt == "compressed":
        tensors, metadata = compress_state_dict(plain, ints, ties=ties)
    out = Path(args.out)  # every check is done: write
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "int8":
        torch.save(to_int8_cpu_(model), out)
        what = "int8 CPU model"
    elif fmt == "int":
        skip = {f"{n}.weight" for n in ints}
        torch.save({"quantized": ints, "float": {k: v for k, v in plain.items() if k not in skip}}, out)
        what = f"integer weights of {len(ints)} layers + float tensors"
    elif fmt == "plain":
        torch.save(plain, out)
        what = "plain state dict"
    else:
        save_file(tensors, out, metadata)
        kinds = Counter(_kind(r) for r in json.loads(metadata["lichtenberg.layout"]).values())
        what = "compressed: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    size, dense = os.path.getsize(out), _dense_bytes(plain, ties)
    averaged = f" ({args.averaged} averages)" if args.averaged else ""
    print(f"lichtenberg export: wrote {out} ({what}){averaged}, {size / 1024:.1f} KiB = {size / dense:.2f}x the dense "
          f"fp32 state dict ({dense / 1024:.1f} KiB)")
    return {"format": fmt, "path": str(out), "bytes": size, "dense_bytes": dense, "ratio": size / dense}
