"""The `lichtenberg` console script: LightningCLI with the built-in demo pieces and recipes.

    lichtenberg fit                                # the default recipe: digits CNN + EMA
    lichtenberg fit --config swa-digits            # a shipped recipe, by name
    lichtenberg fit --config my.yaml --trainer.max_epochs 3
    lichtenberg recipes                            # list the shipped recipes
    lichtenberg export --config qat-digits --ckpt_path last.ckpt --out model.int.pt
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from . import data, models  # noqa: F401  (registers the demo classes for short names)
from .summary import fit_summary

__all__ = ["DEFAULT_RECIPE", "LichtenbergCLI", "main", "recipe_path", "recipes"]

RECIPES = Path(__file__).parent / "recipes"
DEFAULT_RECIPE = "default"
SUBCOMMANDS = ("fit", "validate", "test", "predict")


def recipes() -> list[str]:
    """Names of the shipped recipes."""
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def recipe_path(name: str) -> str:
    """A config argument as given, or the shipped recipe of that name."""
    if Path(name).exists():
        return name
    candidate = RECIPES / f"{Path(name).stem}.yaml"
    if candidate.exists():
        return str(candidate)
    raise ValueError(f"--config {name!r} is neither a file nor a shipped recipe; recipes: {', '.join(recipes())}.")


class LichtenbergCLI(LightningCLI):
    """LightningCLI whose model and data are any LightningModule / LightningDataModule class path."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )

    def before_fit(self) -> None:
        self._fit_started = time.perf_counter()

    def after_fit(self) -> None:
        wall = time.perf_counter() - self._fit_started
        table = fit_summary(self.trainer, self.model, self.datamodule, wall)
        rank_zero_only(print)(table)


def _resolve_args(args: list[str]) -> list[str]:
    """Resolve recipe names after --config; with no --config, a subcommand gets the default recipe."""
    args = list(args)
    for i, arg in enumerate(args[:-1]):
        if arg in ("--config", "-c"):
            args[i + 1] = recipe_path(args[i + 1])
    for i, arg in enumerate(args):
        if arg.startswith("--config="):
            args[i] = "--config=" + recipe_path(arg.split("=", 1)[1])
    has_config = any(a in ("--config", "-c") or a.startswith("--config=") for a in args)
    if args and args[0] in SUBCOMMANDS and not has_config:
        args[1:1] = ["--config", recipe_path(DEFAULT_RECIPE)]
    return args


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `lichtenberg` console script."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["recipes"]:
        for name in recipes():
            first = (RECIPES / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
            print(f"{name:<20} {first}")
        return
    if args[:1] == ["export"]:
        from .export import export_main

        export_main(args[1:])
        return
    try:
        args = _resolve_args(args)
    except ValueError as err:
        sys.exit(f"lichtenberg: {err}")
    if argv is None:  # LightningCLI warns when given args and a command line both
        sys.argv[1:] = args
        LichtenbergCLI()
    else:
        LichtenbergCLI(args=args)
