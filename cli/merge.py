"""`lichtenberg merge`: several checkpoints of one run (or of fine-tunes of one base) into one.

    lichtenberg merge epoch=7.ckpt epoch=8.ckpt epoch=9.ckpt --method uniform --out soup.ckpt
    lichtenberg merge ckpts/*.ckpt --method greedy --config default --out greedy.ckpt
    lichtenberg merge ft.ckpt --base pretrained.ckpt --method wise_ft --alpha 0.5 --out wise.ckpt
    lichtenberg merge a.ckpt b.ckpt --base pre.ckpt --method ties --trim 0.8 --out ties.ckpt

Each checkpoint is a ``.ckpt`` file or the directory a sharded run writes. ``--averaged EMA``
merges each checkpoint's EMA (or SWA) averages instead of its raw weights; masks and quantizer
state stay in the merged state dict. ``--config`` (a recipe name or YAML, as for ``fit``)
builds the model and data: greedy scores each candidate soup on the config's validation data,
and a model with BatchNorm gets its statistics re-estimated over the training data after the
merge. Writes, for ``--out soup.ckpt``:

- ``soup.ckpt``: a Lightning checkpoint holding the merged weights (no optimizer, scheduler or
  EMA/SWA state), for ``lichtenberg validate --config CFG --ckpt_path soup.ckpt``;
- ``soup.pt``: the plain module's state dict (masks applied, quantizer state dropped);
- ``soup.yaml``: what was merged, mergekit-style (method, base, models, parameters, dtype).
"""

from __future__ import annotations

import argparse
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ..core.averaging import AVERAGE_SUFFIXES, batchnorm_layers, update_bn_
from ..core.checkpoints import _identity, load_checkpoint, plain_state_dict
from ..core.merging import METHODS, check_arguments, check_compatible, greedy_soup, merge

__all__ = ["merge_main"]

PROG = "lichtenberg merge"
# flag -> the methods it acts on; any other method refuses it (a flag that never acts is a mistake)
_USES = {"alpha": ("wise_ft",), "scale": ("task_arithmetic", "ties", "dare"), "trim": ("ties",),
         "density": ("dare",), "seed": ("dare",), "metric": ("greedy",)}
# Callback states a merged checkpoint drops: an averaging callback would swap its old average in at
# validation; checkpointing / early stopping bookkeeping belongs to the run, not to the merged weights.
_DROPPED_STATES = ("EMA{", "SWA{", "Soup{", "EMAWeightAveraging", "StochasticWeightAveraging", "WeightAveraging",
                   "ModelCheckpoint", "EarlyStopping")
_LOWER_IS_BETTER = ("loss", "err", "ppl", "perplexity")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + exit 2
        raise ValueError(f"{PROG}: {message}; `{PROG} --help` lists the options.")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help=".ckpt files or sharded checkpoint directories")
    p.add_argument("--method", required=True, help=" | ".join(METHODS))
    p.add_argument("--out", required=True, help="the merged Lightning checkpoint, NAME.ckpt (NAME.pt, NAME.yaml beside)")
    p.add_argument("--base", help="the pre-trained checkpoint (model_stock, wise_ft, task_arithmetic, ties, dare)")
    p.add_argument("--alpha", type=float, help="wise_ft: weight of the fine-tuned checkpoint, in [0, 1] (default 0.5)")
    p.add_argument("--scale", type=float, help="task_arithmetic, ties, dare: factor of the task vector (default 1)")
    p.add_argument("--trim", type=float, help="ties: fraction of smallest task-vector entries reset (default 0.2)")
    p.add_argument("--density", type=float, help="dare: fraction of task-vector entries kept (default 0.5)")
    p.add_argument("--seed", type=int, help="dare: seed of the random drop (default 0)")
    p.add_argument("--masks", default="intersection", help="sparsity masks: intersection (default) or union")
    p.add_argument("--averaged", choices=("EMA", "SWA", "Soup"), help="merge each checkpoint's averages of that "
                   "callback instead of its raw weights")
    p.add_argument("--config", action="append", default=[], help="recipe name or YAML (repeatable), as for fit")
    p.add_argument("--metric", help="greedy: the logged metric to rank by (default val_acc, else val_loss); "
                   "NAME:max or NAME:min says which way is better (default: min for losses and errors)")
    return p


def merge_main(argv: list[str]) -> dict:
    """Run `lichtenberg merge`; returns what was written and chosen (for tests).

    Every check runs before the first file is written; bad input raises a one-line ValueError.

    Example:
        >>> merge_main(["a.ckpt", "b.ckpt", "--method", "uniform", "--out", "soup.ckpt"])
    """
    args = _attempt(lambda: _parser().parse_args(argv))  # argparse reports some errors from an except block
    params = _check_flags(args)
    paths = [*args.checkpoints, *([args.base] if args.base else [])]
    checkpoints = [_load(p) for p in paths]
    states = [_state(c, p, args.averaged) for c, p in zip(checkpoints, paths)]
    _attempt(lambda: check_compatible(states, paths))
    base = states.pop() if args.base else None
    bn_keys = [k[: -len(".running_mean")] for k in states[0] if k.endswith(".running_mean")]
    run = _Scorer(args.config, states[0], paths[0], args.metric) if args.config else None
    if run is None and bn_keys:
        warnings.warn(f"{PROG}: {len(bn_keys)} BatchNorm layers keep the merged running statistics, not "
                      "re-estimated ones; pass --config with the run's config to re-estimate them.", stacklevel=2)
    scores: dict[str, float] = {}
    chosen = list(range(len(states)))
    if args.method == "greedy":
        # Larger is better once signed; the first score settles the metric (and so the sign) before it returns.
        signed = lambda state: run.score(state) * (1.0 if run.higher_is_better else -1.0)  # noqa: E731
        merged, chosen = _attempt(lambda: greedy_soup(states, signed, True, args.checkpoints, masks=args.masks))
        scores = {args.checkpoints[i]: s for i, s in enumerate(run.calls[: len(states)])}
    else:
        merged = _attempt(lambda: merge(states, args.method, base, names=args.checkpoints, **params))
    batchnorm = "none" if not bn_keys else "merged statistics (not re-estimated)"
    validation = None
    if run is not None:  # also re-estimates BatchNorm statistics into `merged`
        value = run.score(merged)
        validation = {run.metric: value, "higher_is_better": run.higher_is_better}
        if run.has_bn:
            batchnorm = f"re-estimated over {run.seen} training batches"
    description = _describe(args, params, chosen, scores, validation, run, batchnorm, merged)
    return _write(args, checkpoints[0], merged, description)


# -- checks and loading ---------------------------------------------------------------------------------

def _attempt(fn, context: str = "", flags: bool = False):
    """``fn()``; a ValueError it raises becomes one line with the command's prefix (and with ``flags``,
    core's ``alpha=`` spelled ``--alpha``), raised outside the ``except`` block so that the one-line
    error is the whole story: the console script prints the innermost error of a chain."""
    try:
        return fn()
    except ValueError as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
    if message.startswith(PROG):
        raise ValueError(message)
    if flags:
        message = re.sub(r"\bbase=", "--base", message)
        message = re.sub(r"\b(method|alpha|scale|trim|density|seed|masks)=", r"--\1 ", message)
    raise ValueError(f"{PROG}: {context}{message}")


def _check_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The merge parameters, after every check that needs no file; unused flags are refused."""
    for flag, methods in _USES.items():
        if getattr(args, flag) is not None and args.method in METHODS and args.method not in methods:
            raise ValueError(f"{PROG}: --{flag} has no effect with --method {args.method} (it is for "
                             f"{', '.join(methods)}); drop it.")
    params = {k: getattr(args, k) for k in ("alpha", "scale", "trim", "density", "seed") if getattr(args, k) is not None}
    params["masks"] = args.masks
    _attempt(lambda: check_arguments(args.method, len(args.checkpoints), args.base is not None, **params), flags=True)
    if args.method == "greedy" and not args.config:
        raise ValueError(f"{PROG}: --method greedy scores every candidate soup on validation data; pass --config "
                         "with the run's config (a recipe name or YAML).")
    out = Path(args.out)
    if out.suffix != ".ckpt":
        raise ValueError(f"{PROG}: --out {args.out!r} must end in .ckpt (NAME.pt and NAME.yaml are written beside "
                         f"it); pass e.g. --out {out.with_suffix('.ckpt').name}.")
    written = {out.with_suffix(s).resolve() for s in (".ckpt", ".pt", ".yaml")}
    for path in [*args.checkpoints, *([args.base] if args.base else [])]:
        if not Path(path).exists():
            raise ValueError(f"{PROG}: checkpoint {path!r} does not exist; pass .ckpt files or sharded checkpoint "
                             "directories.")
        if Path(path).resolve() in written:
            raise ValueError(f"{PROG}: --out {args.out!r} would overwrite the input {path!r}; pick another name.")
    seen = Counter(Path(p).resolve() for p in args.checkpoints)
    twice = [p for p in args.checkpoints if seen[Path(p).resolve()] > 1]
    if twice:
        raise ValueError(f"{PROG}: checkpoint {twice[0]!r} is given twice; list each once (a soup of copies "
                         "weights it twice).")
    return params


def _load(path: str) -> dict[str, Any]:
    try:
        checkpoint = load_checkpoint(path)
    except Exception as err:  # noqa: BLE001  (any unreadable file is the user's input, not a bug)
        problem = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    else:
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
            return checkpoint
        problem = "it holds no 'state_dict'"
    raise ValueError(f"{PROG}: {path!r} is not a Lightning checkpoint ({problem}); pass the .ckpt files (or sharded "
                     "checkpoint directories) that Trainer.fit wrote.")


def _state(checkpoint: dict[str, Any], path: str, averaged: str | None) -> dict[str, Any]:
    """The state to merge: the model state of the checkpoint (its averages with ``averaged``), without
    the averages that sharded runs keep as buffers beside the weights; tied names stay one tensor."""
    state = checkpoint["state_dict"]
    if averaged is not None:
        plain = _attempt(lambda: plain_state_dict(checkpoint, averaged=averaged), f"{path}: ")
        first: dict[tuple, str] = {}
        for key, value in state.items():  # plain_state_dict copies each name; tie them again
            head = first.setdefault(_identity(value), key) if isinstance(value, torch.Tensor) else key
            if key in plain and head in plain:
                plain[key] = plain[head]
        state = {**state, **plain}
    return {k: v for k, v in state.items() if not any(k.endswith(s) and k[: -len(s)] in state for s in AVERAGE_SUFFIXES)}


# -- scoring and BatchNorm, on the config's model and data ----------------------------------------------

class _Scorer:
    """The config's model and data, a bare Trainer, and every score it gave (in call order)."""

    def __init__(self, configs: list[str], example: dict[str, Any], example_path: str, metric: str | None) -> None:
        import lightning as L

        from .main import build

        cli = _attempt(lambda: build(configs))
        self.model, self.datamodule = cli.model, cli.datamodule
        if self.datamodule is None:
            raise ValueError(f"{PROG}: --config {configs} defines no data; greedy and BatchNorm re-estimation need "
                             "its training and validation data.")
        name, _, way = (metric or "").partition(":")
        if way not in ("", "max", "min"):
            raise ValueError(f"{PROG}: --metric {metric!r}: the suffix must be :max or :min; e.g. --metric val_acc:max.")
        self.metric = name or None
        self.higher_is_better = way == "max" if way else not any(w in (name or "val_acc") for w in _LOWER_IS_BETTER)
        self.has_bn = bool(batchnorm_layers(self.model))
        self.calls: list[float] = []
        self.seen = 0  # batches of the last BatchNorm pass
        self.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                                 enable_model_summary=False, enable_checkpointing=False)
        self._load(example, example_path)  # the config's model must take the checkpoints' weights
        self.datamodule.prepare_data()
        self.datamodule.setup("fit")

    def _load(self, state: dict[str, Any], label: str = "the merged state") -> None:
        plain = plain_state_dict(state)
        try:
            problem = self.model.load_state_dict(plain, strict=False)
            problem = [*problem.missing_keys[:1], *problem.unexpected_keys[:1]]
        except RuntimeError as err:
            problem = [str(err).splitlines()[-1].strip()]
        if problem:
            raise ValueError(f"{PROG}: the --config model does not take the weights of {label} ({problem[0]!r} "
                             "differs); pass the config the checkpoints were trained with.")

    def reestimate_(self, state: dict[str, Any]) -> None:
        """Re-estimate BatchNorm statistics for ``state``'s weights and write them into ``state``."""
        self._load(state)
        self.seen = update_bn_(self.model, self.datamodule.train_dataloader(),
                          lambda m, b: m(b[0] if isinstance(b, (list, tuple)) else b))
        layers = {id(m) for m in batchnorm_layers(self.model)}
        names = {f"{n}.{b}" for n, m in self.model.named_modules() if id(m) in layers
                 for b in ("running_mean", "running_var", "num_batches_tracked")}
        fresh = self.model.state_dict()
        for key in names & set(state):
            state[key] = fresh[key].detach().clone().to(state[key].dtype)

    def score(self, state: dict[str, Any]) -> float:
        """The validation metric of ``state`` (BatchNorm statistics re-estimated into it first)."""
        if self.has_bn:
            self.reestimate_(state)
        else:
            self._load(state)
        (results,) = self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        if self.metric is None:
            self.metric = "val_acc" if "val_acc" in results else "val_loss"
            self.higher_is_better = self.metric == "val_acc"
        if self.metric not in results:
            raise ValueError(f"{PROG}: validation logs no {self.metric!r} (it logs {sorted(results)}); pass one of "
                             "them as --metric.")
        self.calls.append(float(results[self.metric]))
        return self.calls[-1]


# -- outputs ---------------------------------------------------------------------------------------------

def _describe(args, params, chosen, scores, validation, run, batchnorm, merged) -> dict[str, Any]:
    """The mergekit-style description of the merge (merge_method, base_model, models, parameters, dtype)."""
    weights = {"uniform": 1 / len(args.checkpoints), "wise_ft": params.get("alpha", 0.5)}
    weights |= dict.fromkeys(("task_arithmetic", "ties", "dare"), params.get("scale", 1.0))
    models = []
    for i, path in enumerate(args.checkpoints):
        entry: dict[str, Any] = {}
        if args.method == "greedy":
            entry = {"score": scores[path], "chosen": i in chosen,
                     "weight": 1 / len(chosen) if i in chosen else 0.0}
        elif args.method in weights:
            entry = {"weight": weights[args.method]}
        models.append({"model": path, "parameters": entry})
    defaults = {"wise_ft": {"alpha": 0.5}, "task_arithmetic": {"scale": 1.0}, "ties": {"scale": 1.0, "trim": 0.2},
                "dare": {"scale": 1.0, "density": 0.5, "seed": 0}}.get(args.method, {})
    parameters = {**defaults, **{k: v for k, v in params.items() if k != "masks"}, "masks": args.masks}
    floats = Counter(str(v.dtype).removeprefix("torch.") for v in merged.values()
                     if isinstance(v, torch.Tensor) and v.is_floating_point())
    out = {"merge_method": args.method, "base_model": args.base, "models": models, "parameters": parameters,
           "dtype": floats.most_common(1)[0][0] if floats else None, "averaged": args.averaged,
           "batchnorm": batchnorm, "config": list(args.config) or None, "validation": validation}
    if args.method == "greedy":
        out["greedy"] = {"metric": run.metric, "higher_is_better": run.higher_is_better,
                         "chosen": [args.checkpoints[i] for i in chosen], "ingredient_scores": scores}
    return out


def _write(args, first: dict[str, Any], merged: dict[str, Any], description: dict[str, Any]) -> dict:
    """Write NAME.ckpt, NAME.pt and NAME.yaml, one line printed per file."""
    import yaml

    out = Path(args.out)
    pt, described = out.with_suffix(".pt"), out.with_suffix(".yaml")
    checkpoint = {k: v for k, v in first.items() if k not in ("optimizer_states", "lr_schedulers", "state_dict")}
    checkpoint["callbacks"] = {k: v for k, v in (first.get("callbacks") or {}).items()
                               if not (isinstance(k, str) and k.startswith(_DROPPED_STATES))}
    checkpoint["state_dict"] = merged
    checkpoint["lichtenberg_merge"] = description
    plain = plain_state_dict(checkpoint)
    first_name: dict[tuple, str] = {}
    for key, value in merged.items():  # plain_state_dict copies each name; keep tied names one tensor
        head = first_name.setdefault(_identity(value), key) if isinstance(value, torch.Tensor) else key
        if key in plain and head in plain:
            plain[key] = plain[head]
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, out)
    print(f"{PROG}: wrote {out} (Lightning checkpoint: {args.method} of {len(args.checkpoints)}; "
          "validate/test it with --ckpt_path)")
    torch.save(plain, pt)
    print(f"{PROG}: wrote {pt} (plain module state dict: masks applied, quantizer state dropped)")
    described.write_text(yaml.safe_dump(description, sort_keys=False))
    print(f"{PROG}: wrote {described} (what was merged)")
    return {"checkpoint": str(out), "state_dict": str(pt), "description": str(described), **description}
