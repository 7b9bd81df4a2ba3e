"""The end-of-fit summary of `lichtenberg fit`: what each set of weights scores on validation."""

from __future__ import annotations

import lightning as L
import torch

from ..callbacks._averaging import _Averaging
from ..callbacks._summary import format_table

__all__ = ["fit_summary"]



def _class_name(model: object) -> str:
    """The model's own class name (FSDP2's ``fully_shard`` swaps in an ``FSDP<Name>`` subclass)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c.__name__ for c in type(model).__mro__ if not (issubclass(c, FSDPModule) and c.__name__.startswith("FSDP")))

def _metric(results: list[dict]) -> tuple[str, float]:
    metrics = results[0] if results else {}
    key = "val_acc" if "val_acc" in metrics else "val_loss"
    return key, float(metrics.get(key, float("nan")))


def _validate(model: L.LightningModule, datamodule, weights: dict[str, torch.Tensor] | None) -> tuple[str, float]:
    """Validate ``model`` with ``weights`` loaded in (None: as it is), then put its weights back."""
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    if weights is not None:
        model.load_state_dict(weights, strict=False)
    # A bare Trainer: no callback may swap weights behind our back.
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    try:
        return _metric(trainer.validate(model, datamodule=datamodule, verbose=False))
    finally:
        model.load_state_dict(saved)


def fit_summary(trainer: L.Trainer, model: L.LightningModule, datamodule, wall_seconds: float) -> str:
    """Rows: run facts, then the validation metric of the raw weights and of each average."""
    rows = [
        ("model / data", f"{_class_name(model)} / {type(datamodule).__name__}"),
        ("optimizer steps / epochs", f"{trainer.global_step} / {trainer.current_epoch}"),
        ("wall time", f"{wall_seconds:.1f} s"),
    ]
    averaging = [cb for cb in trainer.callbacks if isinstance(cb, _Averaging) and cb.averaged is not None]
    if trainer.world_size > 1:
        rows.append(("validation", "see the logged metrics (per-weights evaluation runs on one process only)"))
        return format_table("lichtenberg fit summary", rows)
    holder = next((cb for cb in averaging if cb.raw_weights is not None), None)
    key, raw = _validate(model, datamodule, holder.raw_weights if holder else None)
    rows.append((f"{key}, last iterate (raw weights)", f"{raw:.4f}"))
    for cb in averaging:
        if cb.averaged.num_updates == 0:
            rows.append((f"{key}, {type(cb).__name__} average", "no update happened"))
            continue
        _, value = _validate(model, datamodule, cb.averaged.tensors)
        rows.append((f"{key}, {type(cb).__name__} average ({cb.averaged.num_updates} updates)", f"{value:.4f}"))
    held = type(holder).__name__ + " average" if holder else "raw weights"
    rows.append(("the model now holds", held))
    return format_table("lichtenberg fit summary", rows)
