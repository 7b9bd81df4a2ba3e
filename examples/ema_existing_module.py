"""Add EMA to a LightningModule you already have: one import, one callback.

    python examples/ema_existing_module.py

The module below is an ordinary user module; nothing in it knows about lichtenberg.
"""

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lichtenberg.callbacks import EMA


class DigitsClassifier(L.LightningModule):
    def __init__(self, lr: float = 0.05):
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def loaders():
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    train, val = perm[:1400], perm[1400:]
    return (
        DataLoader(TensorDataset(x[train], y[train]), batch_size=32, shuffle=True, generator=g),
        DataLoader(TensorDataset(x[val], y[val]), batch_size=256),
    )


if __name__ == "__main__":
    L.seed_everything(0)
    model = DigitsClassifier()
    train, val = loaders()
    ema = EMA(decay=0.99)  # <- the one line: validation now runs on the averaged weights
    trainer = L.Trainer(max_epochs=5, callbacks=[ema], logger=False, enable_checkpointing=False)
    trainer.fit(model, train, val)
    # After fit the module holds the EMA weights (ship it as is); the raw ones are kept too.
    averaged = trainer.validate(model, val, verbose=False)[0]["val_acc"]
    model.load_state_dict(ema.raw_weights)
    raw = L.Trainer(logger=False).validate(model, val, verbose=False)[0]["val_acc"]
    print(f"val_acc: last iterate {raw:.4f}, EMA {averaged:.4f}")
