"""What the command line says: quiet Lightning, one-line configuration errors with "did you mean".

Imports neither Lightning nor jsonargparse at module level: `lichtenberg recipes` and
`lichtenberg --help` must answer without them.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import re
import sys
import warnings

__all__ = ["did_you_mean", "quiet_lightning", "short"]

# Lightning's once-per-Trainer banners: the summary's extra evaluations would print them again.
_NOISE = ("GPU available:", "TPU available:", "HPU available:", "💡 Tip:", "LOCAL_RANK:", "`Trainer.fit` stopped:",
          "Using default `ModelCheckpoint`", "You are using a CUDA device", "Seed set to", "Loading `train_dataloader`",
          "`Trainer(limit_", "`Trainer(val_check_interval", "`Trainer(fast_dev_run")
_NOISY_WARNINGS = (".*does not have many workers.*", ".*GPU available but not used.*",
                   ".*smaller than the logging interval.*", ".*Checkpoint directory .* exists and is not empty.*",
                   ".*`tensorboardX` has been removed.*", ".*is deprecated.*")
_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
            "lightning.pytorch.accelerators.cuda", "lightning.fabric.utilities.seed")
# Importing the standalone `pytorch_lightning` / `lightning_fabric` packages re-points the shared
# rank-zero logger (lightning_utilities' `rank_zero.log`) at their own names: cover those too.
_LOGGERS += tuple(n.replace("lightning.pytorch", "pytorch_lightning").replace("lightning.fabric", "lightning_fabric")
                  for n in _LOGGERS)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not re.sub(r"^\[rank: \d+\] ", "", str(record.msg)).startswith(_NOISE)


_FILTER = _DropNoise()


def quiet_lightning(quiet: bool = True) -> None:
    """Drop Lightning's banners, tips and advisory warnings; ``quiet=False`` (``-v``) lets them through."""
    shared = sys.modules.get("lightning_utilities.core.rank_zero")
    names = {*_LOGGERS, *([shared.log.name] if shared is not None and hasattr(shared, "log") else [])}
    for name in names:
        logger = logging.getLogger(name)
        if quiet:
            logger.addFilter(_FILTER)  # no-op when present
        else:
            logger.removeFilter(_FILTER)
    for pattern in _NOISY_WARNINGS:
        if quiet:
            warnings.filterwarnings("ignore", message=pattern)
        else:
            warnings.filters[:] = [f for f in warnings.filters if not (f[0] == "ignore" and getattr(f[1], "pattern", None) == pattern)]


def did_you_mean(word: str, choices) -> str:
    """``" (did you mean 'x'?)"`` for the closest choice, or ``""``."""
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _chain(err: BaseException) -> list[BaseException]:
    chain = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def _parameters(class_path: str) -> list[str]:
    """Constructor arguments of ``class_path`` (with those of its bases that take ``**kwargs``)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    names: list[str] = []
    for klass in inspect.getmro(cls):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters
        names += [p for p in params if p not in ("self", "args", "kwargs")]
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    return names


def _public_names(class_path: str) -> list[str]:
    module = class_path.rpartition(".")[0]
    try:
        mod = importlib.import_module(module)
    except (ImportError, ValueError):
        return []
    return [n if "." in n else f"{module}.{n}" for n in getattr(mod, "__all__", dir(mod))]


def _demo_classes() -> list[str]:
    return [name for m in ("models", "data") for name in _public_names(f"lichtenberg.cli.{m}.x")]


def _group_parameters(group: str) -> list[str]:
    if group == "trainer":
        return _parameters("lightning.pytorch.Trainer")
    return []


def _typo(texts: list[str], class_path: str | None) -> str | None:
    """The one-line message of an unknown key, value or class, with a suggestion where there is one."""
    joined = "\n".join(texts)
    where = f" of {class_path}" if class_path else ""
    if m := re.search(r"Option '([\w.]+)' is not accepted", joined):
        return f"{m.group(1)!r} is not an argument{where}{did_you_mean(m.group(1), _parameters(class_path or ''))}"
    if m := re.search(r"(?:Group|Subcommand) '\w+' does not accept option '(\w+)\.([\w.]+)'", joined) or re.search(
            r"Group '(\w+)' does not accept option '([\w.]+)'", joined):
        group, key = m.groups()
        return f"{group}.{key} is not an argument of the {group}{did_you_mean(key, _group_parameters(group))}"
    if m := re.search(r"unrecognized arguments: (--([\w]+)\.([\w.]+)[^\n]*)", joined):
        _, group, key = m.groups()
        return (f"--{group}.{key} is not an option{did_you_mean(key, _group_parameters(group))} "
                f"(`lichtenberg fit --help` lists them)")
    if m := re.search(r"unrecognized arguments: ([^\n]+)", joined):
        return f"unrecognized arguments: {m.group(1).strip()} (`lichtenberg fit --help` lists the options)"
    if m := re.search(r"module '([\w.]+)' has no attribute '(\w+)'", joined):
        module, name = m.groups()
        return f"{module}.{name} does not exist{did_you_mean(f'{module}.{name}', _public_names(f'{module}.{name}'))}"
    if m := re.search(r"Expected a dot import path string: (\S+)", joined):
        given = m.group(1)
        hint = did_you_mean(given if "." in given else f"lichtenberg.cli.models.{given}", _demo_classes())
        return f"class_path {given!r} needs a full import path{hint or ', e.g. lichtenberg.cli.models.SmallCNN'}"
    if class_path and re.search(r"(does not exist|Unable to|Import path|not a subclass|No module named)", joined):
        return f"class {class_path!r} cannot be imported{did_you_mean(class_path, _public_names(class_path))}"
    return None


def _bad_value(texts: list[str]) -> str | None:
    """``key: expected ..., got ...`` from jsonargparse's nested type errors."""
    for text in texts:
        keys = re.findall(r'Parser key "([\w.]+)"', text)
        expected = re.findall(r"Expected a (<class '(\w+)'>|[^\n.]+)\.? ?Got value: ([^\n]+)", text)
        if keys and expected:
            _, kind, got = expected[0]
            return f"{'.'.join(dict.fromkeys(keys))}: expected {kind or expected[0][0]}, got {got.strip()!r}"
    return None


def short(err: BaseException, args: list[str]) -> str | None:
    """One or two lines for a configuration error, or None to let it raise in full.

    Configuration errors are jsonargparse's parse errors, ``ValueError`` (our callbacks' and
    models' checks at construction or set-up) and Lightning's ``MisconfigurationException``.
    """
    import argparse

    chain = _chain(err)
    kinds = {type(e).__name__ for e in chain}
    if not (isinstance(err, (argparse.ArgumentError, ValueError, TypeError, KeyError))
            or "MisconfigurationException" in kinds):
        return None
    if isinstance(err, (TypeError, KeyError)) and not isinstance(err, argparse.ArgumentError) and not any(
            isinstance(e, argparse.ArgumentError) or "jsonargparse" in type(e).__module__ for e in chain):
        return None  # a TypeError from deep inside training is a bug, not a configuration error
    texts = [str(e) for e in chain]
    paths = re.findall(r"class_path '([\w.]+)'", "\n".join(texts))
    class_path = paths[-1] if paths else None
    line = _typo(texts, class_path) or _bad_value(texts)
    if line is None:  # our own messages already name the value and the fix: the innermost one is it
        innermost = next((t for t in reversed(texts) if t.strip()), str(err))
        line = innermost.strip().splitlines()[0]
        if len(innermost.strip().splitlines()) > 1 and not line.endswith((".", ";")):
            line = " ".join(s.strip() for s in innermost.strip().splitlines()[:2])
    return line
