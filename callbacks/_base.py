"""What every lichtenberg callback shares: one fit, one binding, and state that knows its config.

- **One fit, one binding.** A callback instance may serve many fits (a sweep builds its
  callbacks list once). Everything bound to a model is (re)bound when a fit starts, from the
  model as it is then; layers built in the module's ``configure_model`` are seen, because the
  binding runs right after that hook (and still before Lightning restores a checkpoint, so a
  resumed run loads into what was bound). Only a checkpoint restore brings old state back.
- **State that knows its config.** Each callback's checkpoint state carries the init args it
  was trained with. Resuming with other settings (8 instead of 4 bits, another sparsity)
  raises a ``ValueError`` naming the differences, instead of silently continuing from state
  that belongs to another configuration.
- **Run length.** ``run_length`` is the number of optimizer steps (``trainer.global_step``
  units) a fit will take, or None when Lightning cannot know it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

__all__: list[str] = []

_PENDING = "_lichtenberg_after_configure_model"


def _plain(value: Any) -> Any:
    """A config value as plain data (dataclasses as dicts), comparable across processes."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def after_configure_model(pl_module: pl.LightningModule, bind: Callable[[], None]) -> None:
    """Call ``bind`` now, or right after the module's own ``configure_model`` when it has one.

    Lightning calls ``configure_model`` after the callbacks' ``setup`` and before it restores
    a checkpoint, with no callback hook in between: the hook is wrapped on this instance for
    one call (several callbacks share one wrapper and bind in their order in ``callbacks``).
    """
    if not overrides(pl_module, "configure_model"):
        bind()
        return
    pending = vars(pl_module).get(_PENDING)
    if pending is None:
        pending = []
        previous = vars(pl_module).get("configure_model")
        original = pl_module.configure_model

        @functools.wraps(original)
        def configure_model(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            _unwrap(pl_module, previous)
            for fn in pending:
                fn()
            return out

        configure_model.__lichtenberg_previous__ = previous  # type: ignore[attr-defined]
        pl_module.configure_model = configure_model  # type: ignore[method-assign]
        pl_module.__dict__[_PENDING] = pending
    pending.append(bind)


def _unwrap(pl_module: pl.LightningModule, previous: Any) -> None:
    if previous is None:
        pl_module.__dict__.pop("configure_model", None)
    else:
        pl_module.configure_model = previous  # type: ignore[method-assign]
    pl_module.__dict__.pop(_PENDING, None)


def overrides(pl_module: Any, name: str) -> bool:
    """Whether the module's class overrides LightningModule's ``name`` (``lightning.pytorch`` and
    ``pytorch_lightning`` modules alike; Lightning's ``is_overridden`` knows one namespace)."""
    base = next((c for c in type(pl_module).__mro__ if c.__name__ == "LightningModule"), None)
    return base is not None and getattr(type(pl_module), name, None) is not getattr(base, name, None)


def never_acts(trainer: pl.Trainer, message: str) -> None:
    """A setting that would never act in this run: ValueError with ``message``. A ``fast_dev_run``
    smoke test, a few steps by design, only gets a warning."""
    if trainer.fast_dev_run:
        rank_zero_warn(f"{message} (not raised: fast_dev_run)")
    else:
        raise ValueError(message)


def run_length(trainer: pl.Trainer) -> int | None:
    """Optimizer steps (``global_step`` units) this fit takes; None when unknown.

    Lightning's estimate is -1 or inf for an IterableDataset with ``max_epochs`` only. Under
    manual optimization every optimizer's step advances ``global_step``; a fraction of the run
    then counts the steps of all optimizers, assuming each steps once per batch.
    """
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total) or total < 0:
        return None
    module = trainer.lightning_module
    if module is not None and not module.automatic_optimization:
        total *= max(len(trainer.optimizers), 1)
    return int(total)


class _Base(Callback):
    """Base of every public lichtenberg callback. Subclasses implement ``_state`` / ``_load_state``
    and list in ``_resume_free`` the init args a resumed run may change."""

    _resume_free: tuple[str, ...] = ()

    def _config(self) -> dict[str, Any]:
        """The init args this instance was built with, as plain data."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {name: _plain(getattr(self, name)) for name in names}

    def _state(self) -> dict[str, Any]:
        return {}

    def _load_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {**self._state(), "config": self._config()}

    def _check_config(self, saved: dict[str, Any] | None) -> None:
        """ValueError naming every init arg that differs from the ones ``saved`` state was made with."""
        if saved is None:
            return
        mine = self._config()
        diff = [f"{k}: {saved.get(k)!r} -> {mine.get(k)!r}" for k in sorted(set(saved) | set(mine))
                if k not in self._resume_free and saved.get(k) != mine.get(k)]
        if diff:
            raise ValueError(
                f"{type(self).__name__}: the checkpoint was trained with other settings ({'; '.join(diff)}). "
                "Resume with the checkpoint's settings, or start a new fit from its weights to change them."
            )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_config(state_dict.get("config"))
        self._load_state({k: v for k, v in state_dict.items() if k != "config"})

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning calls no teardown after an exception: undo what this run attached (hooks,
        # wrappers), or a later fit would run them. A run that failed between setup and
        # configure_model also leaves the one-call wrapper, with that run's binds, on the module.
        wrapper = vars(pl_module).get("configure_model")
        if _PENDING in vars(pl_module):
            _unwrap(pl_module, getattr(wrapper, "__lichtenberg_previous__", None))
        self.teardown(trainer, pl_module, getattr(trainer.state.fn, "value", "fit"))

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Lightning finds a callback's state by its state_key, which holds some init args: with
        # other settings it finds nothing and the run would silently restart this callback.
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return
        claimed = {cb.state_key for cb in trainer.callbacks}
        prefix = f"{type(self).__qualname__}{{"
        orphans = [k for k in states if isinstance(k, str) and k.startswith(prefix) and k not in claimed]
        if orphans:
            saved = states[orphans[0]].get("config") if isinstance(states[orphans[0]], dict) else None
            self._check_config(saved)
            raise ValueError(
                f"{type(self).__name__}: the checkpoint was trained with other settings ({orphans[0]}, this run "
                f"{self.state_key}). Resume with the checkpoint's settings, or start a new fit from its weights "
                "to change them."
            )
