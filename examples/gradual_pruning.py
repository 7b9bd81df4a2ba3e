"""Gradual pruning of an existing LightningModule, then export of a plain sparse model.

    python examples/gradual_pruning.py
"""

import lightning as L
import torch

from lichtenberg.callbacks import EMA, GradualPruning
from lichtenberg.core.schedules import SparsitySchedule
from lichtenberg.core.sparsity import export_sparse_

from ema_existing_module import DigitsClassifier, loaders  # an ordinary user module

if __name__ == "__main__":
    L.seed_everything(0)
    model = DigitsClassifier()
    train, val = loaders()
    pruning = GradualPruning(
        sparsity=0.9,
        schedule=SparsitySchedule(kind="cubic", start=0.1, end=0.6, every_n_steps=20),
        allocation="lamp",
    )
    # EMA composes: its averaged weights stay on the pruning masks.
    trainer = L.Trainer(max_epochs=8, callbacks=[pruning, EMA(decay=0.99)], logger=False, enable_checkpointing=False)
    trainer.fit(model, train, val)
    acc = trainer.validate(model, val, verbose=False)[0]["val_acc"]
    report = export_sparse_(model)  # masks squashed: a plain nn.Module with zeros in it
    kept = sum(r["nonzeros"] for r in report.values()) / sum(torch.Size(r["shape"]).numel() for r in report.values())
    print(f"val_acc {acc:.4f} at sparsity {1 - kept:.4f}; per layer: "
          + ", ".join(f"{n} {1 - r['density']:.3f}" for n, r in report.items()))
    torch.save(model.state_dict(), "pruned_digits.pt")
