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

from .checks import check_choice, check_int, check_real, check_step

__all__ = ["SparsitySchedule", "resolve_step"]


def resolve_step(point: int | float, total_steps: int | None, what: str) -> int:
    """A float in [0, 1] is a fraction of the run's ``total_steps`` optimizer steps (1.0 is the
    last step, ``total_steps - 1``), an int an optimizer step. ``total_steps`` is None when the
    run's length is unknown (an IterableDataset with ``max_epochs`` only)."""
    if isinstance(point, float):
        if total_steps is None:
            raise ValueError(f"{what}={point} is a fraction of training, but the run's length is unknown (an "
                             "IterableDataset with max_epochs only): set Trainer(max_steps=...) or give an int step.")
        return min(int(round(point * total_steps)), max(total_steps - 1, 0))
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
        check_choice("schedule kind", self.kind, ("cubic", "linear", "one_shot"))
        self.start = check_step("schedule start", self.start)
        self.end = check_step("schedule end", self.end)
        self.every_n_steps = check_int("schedule every_n_steps", self.every_n_steps, low=1)
        self.initial = check_real("schedule initial", self.initial, low=0.0, high=1.0, high_open=True)
        if type(self.start) is type(self.end) and self.start > self.end:
            raise ValueError(f"schedule start={self.start} is after end={self.end}: swap them.")

    def resolve(self, total_steps: int | None, squeeze: bool = False) -> tuple[int, int]:
        """``(start_step, end_step)`` for a run of ``total_steps`` optimizer steps (None: unknown).

        With ``squeeze`` (a smoke test of a few steps) steps beyond the run become its last step
        instead of an error."""
        start = resolve_step(self.start, total_steps, "schedule start")
        end = start if self.kind == "one_shot" else resolve_step(self.end, total_steps, "schedule end")
        if start > end:
            raise ValueError(f"schedule start={self.start} (step {start}) is after end={self.end} (step {end}).")
        if squeeze and total_steps is not None:
            return min(start, total_steps - 1), min(end, total_steps - 1)
        if total_steps is not None and end >= total_steps:
            what = f"start={self.start}" if self.kind == "one_shot" else f"end={self.end}"
            raise ValueError(
                f"schedule {what} is step {end}, but training stops at step {total_steps} (its last optimizer step is "
                f"{total_steps - 1}): end earlier or train longer."
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
