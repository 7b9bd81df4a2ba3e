"""The `lichtenberg` console script: LightningCLI with the built-in demo pieces and recipes.

    lichtenberg fit                                # the default recipe: digits CNN + EMA
    lichtenberg fit --config swa-digits            # a shipped recipe, by name
    lichtenberg fit --config mine.yaml             # only callbacks? layered over the default recipe
    lichtenberg recipes                            # list the shipped recipes
    lichtenberg export --config qat-digits --ckpt_path last.ckpt --out model.int.pt
    lichtenberg merge a.ckpt b.ckpt --method uniform --out soup.ckpt

This module imports Lightning lazily: `lichtenberg recipes` and `--help` answer at once.
"""

from __future__ import annotations

import sys
from pathlib import Path

from . import messages

__all__ = ["DEFAULT_RECIPE", "LichtenbergCLI", "build", "main", "recipe_path", "recipes"]

RECIPES = Path(__file__).parent / "recipes"
DEFAULT_RECIPE = "default"
SUBCOMMANDS = ("fit", "validate", "test", "predict")
COMMANDS = {
    "fit": "train a model (the default recipe when no --config is given)",
    "validate": "evaluate a checkpoint on the validation data (--ckpt_path)",
    "test": "evaluate a checkpoint on the test data (--ckpt_path)",
    "predict": "run a checkpoint's predict_step over the predict data (--ckpt_path)",
    "recipes": "list the shipped recipes (usable by name: --config swa-digits)",
    "export": "write a shippable model from a checkpoint (plain, integer, int8 or compressed safetensors)",
    "merge": "merge checkpoints: uniform or greedy soup, Model Stock, WiSE-FT, task arithmetic, TIES, DARE",
}
HELP = "\n".join([
    "usage: lichtenberg COMMAND [--config RECIPE_OR_YAML ...] [options] [-v] [--debug]",
    "",
    "commands:",
    *(f"  {name:<10} {text}" for name, text in COMMANDS.items()),
    "",
    "options for every command:",
    "  -v, --verbose  show Lightning's banners, tips and warnings",
    "  --debug        show the full traceback of an error",
    "",
    "`lichtenberg COMMAND --help` lists a command's options. A YAML that gives only callbacks or",
    "trainer settings runs on the default recipe's model and data; `--config default --config",
    "mine.yaml` says the same explicitly.",
])


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
    hint = messages.did_you_mean(Path(name).stem, recipes())
    raise ValueError(f"--config {name!r} is neither a file nor a shipped recipe{hint}; recipes: {', '.join(recipes())}.")


def _configs(args: list[str]) -> list[tuple[int, str]]:
    """(position of the value, value) of every --config / -c / --config=... argument."""
    found = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            found.append((i + 1, args[i + 1]))
        elif arg.startswith("--config="):
            found.append((i, arg))
    return found


def _defines_model_and_data(path: str) -> bool:
    import yaml

    config = yaml.safe_load(Path(path).read_text()) or {}
    return isinstance(config, dict) and "model" in config and "data" in config


def _resolve_args(args: list[str], subcommand: bool = True) -> list[str]:
    """Resolve recipe names after --config and layer the default recipe under configs without a model.

    With no --config at all, or when no config names both a model and data (a callbacks-only or
    trainer-only YAML), the default recipe comes first and the user's configs override it.
    """
    args = list(args)
    for i, value in _configs(args):
        if value.startswith("--config="):
            args[i] = "--config=" + recipe_path(value.split("=", 1)[1])
        else:
            args[i] = recipe_path(value)
    if subcommand and not (args and args[0] in SUBCOMMANDS):
        return args
    paths = [v.split("=", 1)[1] if v.startswith("--config=") else v for _, v in _configs(args)]
    if not any(_defines_model_and_data(p) for p in paths):
        at = 1 if subcommand else 0
        args[at:at] = ["--config", recipe_path(DEFAULT_RECIPE)]
    return args


def _cli_class():
    """LichtenbergCLI, imported on first use so that importing this module does not import Lightning."""
    from .runner import LichtenbergCLI

    return LichtenbergCLI


def __getattr__(name: str):
    if name == "LichtenbergCLI":
        return _cli_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build(configs: list[str], overrides: list[str] | tuple[str, ...] = ()):
    """The model, data and Trainer a config describes, instantiated and not run (export, merge).

    Args:
        configs: recipe names or YAML paths, layered in order (the default recipe goes first
            when none of them names a model and data).
        overrides: further command-line style arguments, e.g. ``["--trainer.devices", "1"]``.

    Example:
        >>> cli = build(["qat-digits"])
        >>> cli.model, cli.datamodule, cli.trainer
    """
    args = _resolve_args([a for c in configs for a in ("--config", c)], subcommand=False)
    args += ["--trainer.logger", "false", *overrides]
    messages.quiet_lightning()
    cls = _cli_class()
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it sees args and a command line both
    try:
        return cls(args=args, run=False)
    finally:
        sys.argv = argv


def _print_recipes() -> None:
    for name in recipes():
        first = (RECIPES / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
        print(f"{name:<22} {first}")


def _run(args: list[str], programmatic: bool) -> None:
    if args[:1] == ["recipes"]:
        _print_recipes()
        return
    if args[:1] == ["export"]:
        from .export import export_main

        export_main(args[1:])
        return
    if args[:1] == ["merge"]:
        from .merge import merge_main

        merge_main(args[1:])
        return
    if args and args[0] not in SUBCOMMANDS and not args[0].startswith("-"):
        hint = messages.did_you_mean(args[0], list(COMMANDS))
        raise ValueError(f"unknown command {args[0]!r}{hint}; the commands are {', '.join(COMMANDS)}.")
    args = _resolve_args(args)
    cls = _cli_class()
    if programmatic:
        argv, sys.argv = sys.argv, sys.argv[:1]
        try:
            cls(args=args)
        finally:
            sys.argv = argv
    else:
        sys.argv[1:] = args
        cls()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `lichtenberg` console script.

    Errors in the configuration (a bad key, value or argument) print one or two lines and exit
    with status 2; ``--debug`` shows the full traceback instead, ``-v`` Lightning's banners.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    verbose = any(a in ("-v", "--verbose") for a in args)
    debug = "--debug" in args
    args = [a for a in args if a not in ("-v", "--verbose", "--debug")]
    if not args or args[0] in ("-h", "--help", "help"):
        print(HELP)
        return
    messages.quiet_lightning(not verbose)
    try:
        _run(args, programmatic=argv is not None)
    except Exception as err:  # noqa: BLE001  (only configuration errors are shortened, see messages.short)
        short = None if debug else messages.short(err, args)
        if short is None:
            raise
        command, _, message = short.partition(": ") if short.startswith("lichtenberg ") else ("lichtenberg", "", short)
        print(f"{command}: error: {message}\n(run with --debug for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None

