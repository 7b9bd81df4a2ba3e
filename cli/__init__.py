"""The `lichtenberg` command line: LightningCLI, demo models and data on embedded sources, recipes."""

from .data import CharTextDataModule, DigitsDataModule, MNIST1DDataModule
from .main import LichtenbergCLI, main, recipe_path, recipes
from .models import MLP, SmallCNN, TinyTransformerLM

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
