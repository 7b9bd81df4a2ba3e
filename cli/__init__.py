"""The `lichtenberg` command line: LightningCLI, demo models and data on embedded sources, recipes.

The demo classes import Lightning; they load on first access so that `lichtenberg recipes`
and `lichtenberg --help` answer without it.
"""

from importlib import import_module

from .main import main, recipe_path, recipes

__all__ = [
    "CharTextDataModule",
    "DigitsDataModule",
    "LichtenbergCLI",
    "MLP",
    "MNIST1DDataModule",
    "SmallCNN",
    "TinyTransformerLM",
    "main",
    "recipe_path",
    "recipes",
]

_LAZY = {
    "CharTextDataModule": ".data", "DigitsDataModule": ".data", "MNIST1DDataModule": ".data",
    "MLP": ".models", "SmallCNN": ".models", "TinyTransformerLM": ".models", "LichtenbergCLI": ".runner",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
