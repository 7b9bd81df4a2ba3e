"""Argument checks shared by every technique: one ValueError vocabulary for bad input.

Each check returns the value (normalised where that is safe) or raises ``ValueError`` with a
message that names the argument, the bad value and what to pass instead. Bools are never
taken for numbers (``True`` is an ``int`` to Python, not to a user), floats are never taken
for ints, and NaN or infinity is never a valid number.

Example:
    >>> decay = check_real("EMA decay", decay, low=0.0, high=1.0, low_open=True, high_open=True,
    ...                    fix="typical values are 0.999 to 0.9999")
    >>> every = check_int("EMA every_n_steps", every, low=1)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = ["check_bool", "check_choice", "check_int", "check_real", "check_step", "check_str_list"]


def _fail(name: str, value: Any, need: str, fix: str) -> ValueError:
    return ValueError(f"{name}={value!r} {need}" + (f"; {fix}" if fix else "") + ".")


def check_real(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    fix: str = "",
) -> float:
    """A finite real number (ints accepted, bools not) within the given bounds."""
    bounds = ""
    if low is not None or high is not None:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        bounds = f" in {'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(name, value, f"must be a finite number{bounds}", fix)
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        raise _fail(name, value, f"must lie{bounds}", fix)
    return value


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None, fix: str = "") -> int:
    """An int (not a bool, not a float such as 2.0) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(name, value, "must be an int" + (f" >= {low}" if low is not None else ""), fix)
    if (low is not None and value < low) or (high is not None and value > high):
        span = f">= {low}" if high is None else f"in [{low}, {high}]" if low is not None else f"<= {high}"
        raise _fail(name, value, f"must be {span}", fix)
    return value


def check_bool(name: str, value: Any) -> bool:
    """True or False (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise _fail(name, value, "must be true or false", "")
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any], fix: str = "") -> Any:
    """One of ``choices`` (compared by type and value, so True is not 1)."""
    options = list(choices)
    if not any(type(value) is type(c) and value == c for c in options):
        raise _fail(name, value, f"must be one of {', '.join(repr(c) for c in options)}", fix)
    return value


def check_step(name: str, value: Any, fix: str = "") -> int | float:
    """A point in training: an int optimizer step >= 0, or a float fraction of the run in [0, 1]."""
    if isinstance(value, float):
        return check_real(name, value, low=0.0, high=1.0,
                          fix=fix or "a float is a fraction of training; pass an int for an optimizer step")
    return check_int(name, value, low=0, fix=fix or "an int is an optimizer step; pass a float in [0, 1] for a fraction")


def check_str_list(name: str, value: Any, fix: str = "") -> list[str]:
    """A list (or tuple) of strings."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise _fail(name, value, "must be a list of strings", fix)
    return list(value)
