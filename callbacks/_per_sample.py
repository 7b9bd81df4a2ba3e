"""The per-sample loss protocol: how SampleReweighting and DataPruning see individual losses.

A LightningModule opts in either way:

- ``training_step`` returns per-sample losses: a 1-D tensor ``[batch]``, or a dict whose
  ``"loss"`` is ``[batch]`` (or ``[batch, tokens]`` with a ``"mask"`` of the same shape),
  optionally with ``"index"`` (dataset ids), ``"logits"`` and ``"target"``. While such a
  callback is attached, the module's ``training_step`` is wrapped (on the instance only,
  nothing global) and the output reduced to the scalar that is back-propagated;
- or it calls ``weighted_loss(self, losses)`` itself (manual optimization, or to keep a
  module that still trains, with the plain mean, when the callbacks are removed).

The weights of every attached per-sample callback are computed over the GLOBAL batch
(losses all-gathered under DDP, no host sync), multiplied, and applied to this rank's
losses: ``mean_i(w_i * l_i)``. DDP's gradient averaging then gives the global weighted mean.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import RunningStage
from torch import Tensor

from ._base import _Base
from ._strategy import data_parallel

__all__ = ["weighted_loss"]


class _PerSample(_Base):
    """Base of the callbacks that weight (or select) individual samples.

    Everything a fit binds (the ``training_step`` wrapper, and whatever a subclass binds in
    ``_reset``) is bound in ``setup("fit")`` and unbound in ``teardown`` or, since Lightning calls
    no teardown after an exception, in ``on_exception``: a reused instance starts each fit clean.
    """

    # Whether ``_weights`` needs the losses of the whole global batch every step: under DDP
    # that is one all-gather per step, a sync point in the middle of the forward pass.
    _global_losses = True

    def _weights(self, trainer: pl.Trainer, pl_module: pl.LightningModule, losses: Tensor,
                 index: Tensor | None) -> Tensor | None:
        """Weights for the global batch ``losses`` [G] (None = all 1)."""
        return None

    def _observe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, losses: Tensor, index: Tensor | None,
                 extra: dict[str, Tensor]) -> None:
        """See this rank's detached losses [B] and their dataset ids (e.g. to update scores)."""

    def _global_index(self, trainer: pl.Trainer, batch_size: int) -> Tensor | None:
        """Dataset ids of the global batch, when the callback knows them (DataPruning's sampler)."""
        return None

    def _check_batch(self, trainer: pl.Trainer, losses: Tensor, index: Tensor | None) -> None:
        """Refuse this rank's losses [B] (and ids) when they cannot belong to the batch (no host sync)."""

    def _reset(self) -> None:
        """Forget everything an earlier fit left (a checkpoint restore follows ``setup``)."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._reset()
            _install(pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # idempotent: the first per-sample callback's teardown removes the wrapper
            _uninstall(pl_module)


def _gather(trainer: pl.Trainer, t: Tensor) -> Tensor:
    """[R * B] in data-parallel rank order for R replicas (the tensor itself on one process).

    Tensor-parallel ranks of one replica hold the same batch: the gather over the world keeps
    one row per replica (Lightning's mesh is data-parallel-major: rank = dp_rank * tp + tp_rank).
    """
    if trainer.world_size < 2:
        return t.reshape(-1)
    replicas, _ = data_parallel(trainer)
    rows = trainer.strategy.all_gather(t).reshape(trainer.world_size, -1)  # [W, B]
    return rows[:: trainer.world_size // replicas].reshape(-1)


def _per_sample(losses: Tensor, mask: Tensor | None) -> Tensor:
    if mask is not None:  # token losses -> one loss per sequence (token average)
        if mask.shape != losses.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} must equal the token losses' {tuple(losses.shape)}.")
        m = mask.to(losses.dtype)
        losses = (losses * m).sum(-1) / m.sum(-1).clamp_min(1)
    if losses.dim() != 1:
        raise ValueError(
            f"per-sample losses must have shape [batch] (or [batch, tokens] with a mask), got {tuple(losses.shape)}: "
            "compute the loss with reduction='none'."
        )
    return losses


def _check_index(index: Any, n: int) -> None:
    """One integer dataset id per loss (shapes and dtypes only: no host sync)."""
    if not isinstance(index, Tensor):
        got = f"a {type(index).__name__}"
    elif index.dim() != 1:
        got = f"shape {tuple(index.shape)}"
    elif index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        got = f"dtype {index.dtype}"
    elif index.numel() != n:
        got = f"{index.numel()} ids"
    else:
        return
    raise ValueError(f"training_step's 'index' must be a 1-D integer tensor with one dataset id per loss; got {got} "
                     f"for {n} losses: return the batch's dataset ids (e.g. from IndexedDataset), or no index.")


def weighted_loss(pl_module: pl.LightningModule, losses: Tensor, index: Tensor | None = None,
                  mask: Tensor | None = None, **extra: Tensor) -> Tensor:
    """Reduce per-sample ``losses`` to the scalar to back-propagate.

    With SampleReweighting / DataPruning attached and training, their weights apply (over
    the global batch); otherwise this is ``losses.mean()`` (token-averaged first with a mask).

    Args:
        pl_module: the module being trained.
        losses: [batch] per-sample losses, or [batch, tokens] with ``mask``.
        index: [batch] dataset ids, if the module has them.
        mask: [batch, tokens] token mask for sequence losses.
        extra: optional "logits" / "target" (DataPruning's EL2N scores).

    Example:
        >>> def training_step(self, batch, batch_idx):
        ...     x, y = batch
        ...     return weighted_loss(self, F.cross_entropy(self(x), y, reduction="none"))
    """
    losses = _per_sample(losses, mask)
    trainer = pl_module._trainer
    active = trainer is not None and trainer.state.stage == RunningStage.TRAINING
    callbacks = [cb for cb in trainer.callbacks if isinstance(cb, _PerSample)] if active else []
    if not callbacks:
        return losses.mean()
    if index is not None:
        _check_index(index, losses.numel())
    for cb in callbacks:
        cb._check_batch(trainer, losses, index)
    pl_module.__dict__["_lichtenberg_reduced"] = True  # the training_step wrapper passes this scalar through
    n, start = losses.numel(), data_parallel(trainer)[1] * losses.numel()
    gather = any(cb._global_losses for cb in callbacks)  # else no collective at all in the step
    g_losses = _gather(trainer, losses.detach()) if gather else None
    g_index = _gather(trainer, index) if index is not None and gather else None
    for cb in callbacks:
        g_index = cb._global_index(trainer, n) if g_index is None else g_index
    weights = None
    for cb in callbacks:
        w = cb._weights(trainer, pl_module, g_losses, g_index)
        weights = w if weights is None else (weights if w is None else weights * w)
    local_index = index if index is not None or g_index is None else g_index[start:start + n]
    for cb in callbacks:
        cb._observe(trainer, pl_module, losses.detach(), local_index, extra)
    if weights is None:
        return losses.mean()
    return (weights[start:start + n].to(losses.dtype) * losses).mean()  # this rank's share


def _reduce_output(pl_module: pl.LightningModule, out: Any) -> Any:
    if out is None:
        return None
    loss = out.get("loss") if isinstance(out, Mapping) else out
    if isinstance(loss, Tensor) and loss.dim() == 0 and pl_module.__dict__.pop("_lichtenberg_reduced", False):
        return out  # the module called weighted_loss itself
    if not isinstance(loss, Tensor) or loss.dim() == 0:
        names = sorted({type(cb).__name__ for cb in pl_module.trainer.callbacks if isinstance(cb, _PerSample)})
        raise ValueError(
            f"{', '.join(names)} need per-sample losses, but training_step returned "
            f"{'a scalar loss' if isinstance(loss, Tensor) else type(loss).__name__}: return a tensor of shape [batch] "
            "(e.g. F.cross_entropy(logits, y, reduction='none')) or a dict whose 'loss' has shape [batch] "
            "(optionally with 'index' and a token 'mask'); or reduce it yourself with "
            "lichtenberg.callbacks.weighted_loss(self, losses)."
        )
    if not isinstance(out, Mapping):
        return weighted_loss(pl_module, out)
    extra = {k: out[k] for k in ("logits", "target") if k in out}
    reduced = weighted_loss(pl_module, loss, index=out.get("index"), mask=out.get("mask"), **extra)
    return {**out, "loss": reduced}


def _install(pl_module: pl.LightningModule) -> None:
    current = vars(pl_module).get("training_step")  # a step the user set on the instance is kept and wrapped
    if current is not None and getattr(current, "__lichtenberg_wrapped__", False):
        return
    original = pl_module.training_step

    @functools.wraps(original)
    def training_step(*args: Any, **kwargs: Any) -> Any:
        pl_module.__dict__.pop("_lichtenberg_reduced", None)
        return _reduce_output(pl_module, original(*args, **kwargs))

    training_step.__lichtenberg_wrapped__ = True  # type: ignore[attr-defined]
    training_step.__lichtenberg_previous__ = current  # type: ignore[attr-defined]
    pl_module.training_step = training_step  # type: ignore[method-assign]


def _uninstall(pl_module: pl.LightningModule) -> None:
    step = vars(pl_module).get("training_step")
    if step is None or not getattr(step, "__lichtenberg_wrapped__", False):
        return
    if step.__lichtenberg_previous__ is None:
        del pl_module.training_step
    else:
        pl_module.training_step = step.__lichtenberg_previous__
