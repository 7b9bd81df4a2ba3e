"""LichtenbergCLI: LightningCLI with a progress bar, an end-of-fit summary and the commands to run next."""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from .. import plugins  # noqa: F401  (registers strategy="sparse_ddp" / "sparse_ddp_spawn")
from . import data, models  # noqa: F401  (registers the demo classes for short names)
from .summary import fit_summary

__all__ = ["LichtenbergCLI", "next_commands"]

_STAGES = ("fit", "validate", "test", "predict")
_RECIPES = Path(__file__).parent / "recipes"


class EpochLines(Callback):
    """One line of progress-bar metrics per epoch, for output that is not a terminal (a live bar
    draws nothing there: a log file or CI would show no progress at all)."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        metrics = "  ".join(f"{k} {float(v):.4g}" for k, v in sorted(trainer.progress_bar_metrics.items()))
        rank_zero_only(print)(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}  step {trainer.global_step}  {metrics}",
                              flush=True)


class LichtenbergCLI(LightningCLI):
    """LightningCLI whose model and data are any LightningModule / LightningDataModule class path.

    Configuration errors raise (``exit_on_error=False``) so that ``lichtenberg.cli.main`` can
    print them in a line or two.
    """

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        self._argv = list(sys.argv[1:] if args is None else args)
        no_exit = {"exit_on_error": False}
        super().__init__(
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={**no_exit, **{stage: no_exit for stage in _STAGES}},
            args=args,
            run=run,
        )

    def _instantiate_trainer(self, config: dict, callbacks: list) -> object:
        # A live view of the run unless the config turns it off: Rich in a terminal (Lightning's TQDM
        # without Rich); elsewhere (a log file, CI) a bar draws nothing useful, so one line per epoch.
        given = list(config.get("callbacks") or []) + list(callbacks)
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in given):
            if not sys.stdout.isatty():
                config["enable_progress_bar"] = False
                callbacks = [*callbacks, EpochLines()]
            elif _has_rich():
                callbacks = [*callbacks, RichProgressBar(leave=True)]
        return super()._instantiate_trainer(config, callbacks)

    def before_fit(self) -> None:
        self._fit_started = time.perf_counter()

    def after_fit(self) -> None:
        wall = time.perf_counter() - self._fit_started
        table = fit_summary(self.trainer, self.model, self.datamodule, wall)
        rank_zero_only(print)(table + "\n" + next_commands(self.trainer, self._argv))


def _has_rich() -> bool:
    try:
        import rich  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True


def _shown(args: list[str]) -> list[str]:
    """The fit's configs (shipped recipes by name) and model/data overrides, for the next commands."""
    shown, skip = [], False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        if arg in _STAGES and i == 0:
            continue
        if arg in ("--config", "-c") and i + 1 < len(args):
            path = Path(args[i + 1])
            shown += ["--config", path.stem if path.parent == _RECIPES else args[i + 1]]
            skip = True
        elif arg.startswith(("--model", "--data", "--seed_everything")):
            shown.append(arg)
            if "=" not in arg and i + 1 < len(args) and not args[i + 1].startswith("--"):
                shown.append(args[i + 1])
                skip = True
    return shown


def _checkpoint(trainer) -> str | None:
    callback = trainer.checkpoint_callback
    if callback is None:
        return None
    path = callback.best_model_path or callback.last_model_path
    if not path:
        return None
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def next_commands(trainer, args: list[str]) -> str:
    """The checkpoint written by this fit and the exact commands that use it."""
    from ..callbacks import QuantizationAwareTraining
    from ..callbacks._sparsity import _Sparsity

    path = _checkpoint(trainer)
    if path is None:
        return "no checkpoint was written (enable_checkpointing is off)"
    configs = shlex.join(_shown(args))
    ckpt = shlex.quote(path)
    kinds = trainer.callbacks
    if any(isinstance(c, QuantizationAwareTraining) for c in kinds):
        export = "--format compressed --out model.safetensors   # or --format int8 --out model.int8.pt"
    elif any(isinstance(c, _Sparsity) for c in kinds):
        export = "--format compressed --out model.safetensors"
    else:
        export = "--format plain --out model.pt"
    return "\n".join([
        f"checkpoint: {path}",
        "next:",
        f"  lichtenberg validate {configs} --ckpt_path {ckpt}",
        f"  lichtenberg test {configs} --ckpt_path {ckpt}",
        f"  lichtenberg export {configs} --ckpt_path {ckpt} {export}",
    ])
