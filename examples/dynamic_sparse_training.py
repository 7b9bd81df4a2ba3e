"""Train an existing LightningModule 90% sparse from the first step with RigL.

    python examples/dynamic_sparse_training.py
"""

import lightning as L
import torch

from lichtenberg.callbacks import DynamicSparseTraining
from lichtenberg.core.schedules import SparsitySchedule

from ema_existing_module import DigitsClassifier, loaders  # an ordinary user module

if __name__ == "__main__":
    L.seed_everything(0)
    model = DigitsClassifier()
    train, val = loaders()
    dst = DynamicSparseTraining(
        sparsity=0.9,
        method="rigl",  # or "static", "set", "granet", "srigl"
        schedule=SparsitySchedule(start=0, end=0.75, every_n_steps=25),  # drop/grow every 25 steps until 75%
        allocation="erk",
    )
    trainer = L.Trainer(max_epochs=10, callbacks=[dst], logger=False, enable_checkpointing=False)
    trainer.fit(model, train, val)
    acc = trainer.validate(model, val, verbose=False)[0]["val_acc"]
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    zeros = sum(int((p == 0).sum()) for p in weights) / sum(p.numel() for p in weights)
    print(f"val_acc {acc:.4f} at sparsity {zeros:.4f}; {dst.itop:.3f} of the weights were active at some point")
    torch.save(model.state_dict(), "sparse_digits.pt")  # masks are buffers: load with the callback attached
