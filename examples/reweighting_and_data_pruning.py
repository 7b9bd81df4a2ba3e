"""Opt an existing LightningModule into per-sample reweighting and InfoBatch data pruning.

    python examples/reweighting_and_data_pruning.py

The one changed line: ``training_step`` reduces its per-sample losses with ``weighted_loss``
(the plain mean when no such callback is attached, so the module also trains without them).
"""

import lightning as L
import torch
from torch import nn

from lichtenberg.callbacks import DataPruning, SampleReweighting, weighted_loss

from ema_existing_module import DigitsClassifier, loaders  # an ordinary user module


class Module(DigitsClassifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return weighted_loss(self, nn.functional.cross_entropy(self.net(x), y, reduction="none"))  # the one line


if __name__ == "__main__":
    L.seed_everything(0)
    train, val = loaders()
    results = {}
    for name, callbacks in {"plain": [], "reweight+prune": [SampleReweighting("linupper", warmup_steps=50),
                                                              DataPruning(ratio=0.5)]}.items():
        L.seed_everything(0)
        model = Module()
        forwarded = []

        class Count(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                forwarded.append(batch[0].shape[0])

        trainer = L.Trainer(max_epochs=8, callbacks=[*callbacks, Count()], logger=False, enable_checkpointing=False,
                            enable_progress_bar=False)
        trainer.fit(model, train, val)
        acc = trainer.validate(model, val, verbose=False)[0]["val_acc"]
        results[name] = (acc, sum(forwarded))
    (a0, n0), (a1, n1) = results["plain"], results["reweight+prune"]
    print(f"plain: val_acc {a0:.4f}, {n0} samples forwarded; reweight+prune: val_acc {a1:.4f}, {n1} samples "
          f"forwarded ({1 - n1 / n0:.1%} fewer)")
    torch.save(model.state_dict(), "digits_pruned_data.pt")
