"""`lichtenberg export`: a QAT checkpoint to integer weights (or to an int8 CPU model).

    lichtenberg export --config qat-digits --ckpt_path last.ckpt --out digits.int.pt
    lichtenberg export --config qat-digits --ckpt_path last.ckpt --out digits.int8.pt --int8

The config (a recipe name or YAML, as for `fit`) rebuilds the model and the
QuantizationAwareTraining callback; the checkpoint's weights and quantizer state are loaded
into it. Default output: ``{"quantized": export_int(model), "float": <every other tensor>}``
(integer weights with their scales; biases, norms and unquantized layers stay float).
With ``--int8`` the whole module is saved after ``to_int8_cpu_`` (torch's dynamic int8
Linear kernels; load with ``torch.load(path, weights_only=False)``).
"""

from __future__ import annotations

import argparse
import os

import torch

from ..callbacks import QuantizationAwareTraining
from ..core.checkpoints import load_checkpoint
from ..core.quantization import export_int, quant_modules, to_int8_cpu_

__all__ = ["export_main"]


def export_main(argv: list[str]) -> dict:
    """Run the export; returns what was written (for tests)."""
    from .main import LichtenbergCLI, recipe_path

    parser = argparse.ArgumentParser(prog="lichtenberg export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True, help="recipe name or YAML (repeatable)")
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written while training with QAT")
    parser.add_argument("--out", required=True, help="output file")
    parser.add_argument("--int8", action="store_true", help="save an int8 CPU model (dynamic int8 Linear) instead")
    args = parser.parse_args(argv)
    cli_args = [a for c in args.config for a in ("--config", recipe_path(c))] + ["--trainer.logger", "false"]
    cli = LichtenbergCLI(args=cli_args, run=False)
    qat = [cb for cb in cli.trainer.callbacks if isinstance(cb, QuantizationAwareTraining)]
    if len(qat) != 1:
        raise ValueError(f"the config attaches {len(qat)} QuantizationAwareTraining callbacks; export needs exactly one.")
    model = cli.model
    qat[0].setup(cli.trainer, model, "validate")  # the same fake-quant layers as in training ...
    model.configure_model()  # ... bound after the module's own configure_model, as in a run
    checkpoint = load_checkpoint(args.ckpt_path)  # a file, or the directory a sharded run writes
    model.load_state_dict(checkpoint["state_dict"])
    layers = quant_modules(model)
    for name, layer in layers.items():
        for part in (layer.weight_quantizer, layer.input_quantizer):
            if part is None or not hasattr(part, "enabled"):
                continue
            if hasattr(part, "scale") and not bool(part.initialized):
                raise ValueError(f"{name}: the checkpoint was written before quantization started "
                                 f"(step {checkpoint.get('global_step')}); export a later checkpoint.")
            part.enabled = True
    model.eval()
    qat[0].teardown(cli.trainer, model, "validate")  # its load-time hook must not travel with a saved module
    if args.int8:
        torch.save(to_int8_cpu_(model), args.out)
        written = {"int8_model": args.out}
    else:
        ints = export_int(model)
        skip = {f"{n}.weight" for n in ints} | {k for k in model.state_dict() if "_quantizer." in k or k.endswith("_mask")}
        rest = {k: v for k, v in model.state_dict().items() if k not in skip}
        torch.save({"quantized": ints, "float": rest}, args.out)
        written = {"quantized": sorted(ints), "float": sorted(rest)}
    print(f"lichtenberg export: {args.out} ({os.path.getsize(args.out) / 1024:.1f} KiB), "
          f"{len(layers)} quantized layers from {args.ckpt_path}")
    return written
