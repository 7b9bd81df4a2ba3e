"""Sparsity schedules: which sparsity a technique should have reached at a given optimizer step.

Zhu & Gupta (2017) gradual pruning: with events at t0, t0 + dt, ..., t_end,
``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t_end - t0)) ** 3``: fast early, gentle late.

Example:
    >>> sched = SparsitySchedule(kind="cubic", start=100, end=1000, every_n_steps=100)
    >>> sched.value(550, final=0.9)  # the value of the last event at or before step 550
"""

from __future__ import annotations

import dataclasses
from typing import Literal

__all__ = ["SparsitySchedule", "resolve_step"]


def resolve_step(point: int | float, total_steps: int | float, what: str) -> int:
    """A float in [0, 1] is a fraction of ``total_steps``, an int an optimizer step."""
    if isinstance(point, float):
        if not 0.0 <= point <= 1.0:
            raise ValueError(f"{what}={point} is a fraction of training and must lie in [0, 1]; pass an int for a step.")
        if total_steps == float("inf"):
            raise ValueError(f"{what}={point} is a fraction of training; set max_steps or max_epochs.")
        return int(round(point * total_steps))
    if point < 0:
        raise ValueError(f"{what}={point} must be >= 0.")
    return int(point)


@dataclasses.dataclass
class SparsitySchedule:
    """When pruning happens and how the sparsity grows between ``start`` and ``end``.

    Args:
        kind: "cubic" (Zhu & Gupta), "linear", or "one_shot" (the final sparsity at ``start``).
        start: first pruning event: an optimizer step (int) or a fraction of training (float).
        end: last pruning event, where the final sparsity is reached; same units as ``start``.
        every_n_steps: optimizer steps between pruning events.
        initial: sparsity of the first event.
    """

    kind: Literal["cubic", "linear", "one_shot"] = "cubic"
    start: int | float = 0.1
    end: int | float = 0.6
    every_n_steps: int = 50
    initial: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("cubic", "linear", "one_shot"):
            raise ValueError(f"schedule kind={self.kind!r} must be 'cubic', 'linear' or 'one_shot'.")
        if self.every_n_steps < 1:
            raise ValueError(f"schedule every_n_steps={self.every_n_steps} must be >= 1.")
        if not 0.0 <= self.initial < 1.0:
            raise ValueError(f"schedule initial={self.initial} must lie in [0, 1).")
        if type(self.start) is type(self.end) and self.start > self.end:
            raise ValueError(f"schedule start={self.start} is after end={self.end}: swap them.")

    def resolve(self, total_steps: int | float) -> tuple[int, int]:
        """``(start_step, end_step)`` for a run of ``total_steps`` optimizer steps."""
        start = resolve_step(self.start, total_steps, "schedule start")
        end = start if self.kind == "one_shot" else resolve_step(self.end, total_steps, "schedule end")
        if start > end:
            raise ValueError(f"schedule start={self.start} (step {start}) is after end={self.end} (step {end}).")
        if total_steps != float("inf") and end > total_steps:
            raise ValueError(
                f"schedule end={self.end} is step {end}, but training stops at step {int(total_steps)}: "
                "end earlier or train longer."
            )
        return start, end

    def is_event(self, step: int, start: int, end: int) -> bool:
        """Whether the sparsity is (re)computed at ``step``."""
        return start <= step <= end and ((step - start) % self.every_n_steps == 0 or step == end)

    def value(self, step: int, final: float, start: int, end: int) -> float:
        """Target sparsity after the last event at or before ``step`` (0 before ``start``)."""
        if step < start:
            return 0.0
        if self.kind == "one_shot" or step >= end or end == start:
            return final
        last = start + (step - start) // self.every_n_steps * self.every_n_steps
        progress = (last - start) / (end - start)
        if self.kind == "linear":
            return self.initial + (final - self.initial) * progress
        return final + (self.initial - final) * (1.0 - progress) ** 3
