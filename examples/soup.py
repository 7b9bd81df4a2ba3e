"""Average the last epochs of any run into one model: one callback, no change to the module.

    python examples/soup.py

Soup keeps the weights of the last 4 epoch ends from the second half of training and leaves
their mean in the module when fit ends (BatchNorm statistics, if any, recomputed). With
``monitor="val_loss", mode="min"`` it keeps the 4 best epochs instead.
"""

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lichtenberg.callbacks import Soup


class DigitsClassifier(L.LightningModule):
    def __init__(self, lr: float = 0.1):
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def loaders():
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16, torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    train, val = perm[:1400], perm[1400:]
    return (DataLoader(TensorDataset(x[train], y[train]), batch_size=32, shuffle=True, generator=g),
            DataLoader(TensorDataset(x[val], y[val]), batch_size=256))


if __name__ == "__main__":
    L.seed_everything(0)
    model, (train, val) = DigitsClassifier(), loaders()
    soup = Soup(keep=4, start=0.5)  # <- the one line: the last 4 of 8 epochs are averaged at the end
    trainer = L.Trainer(max_epochs=8, callbacks=[soup], logger=False, enable_checkpointing=False)
    trainer.fit(model, train, val)
    soup_acc = trainer.validate(model, val, verbose=False)[0]["val_acc"]  # the module holds the soup
    model.load_state_dict(soup.raw_weights)  # the last iterate, kept by the callback
    raw_acc = L.Trainer(logger=False).validate(model, val, verbose=False)[0]["val_acc"]
    epochs = [s["epoch"] for s in soup.state_dict()["slots"]]
    print(f"val_acc: last iterate {raw_acc:.4f}, soup of epochs {epochs} {soup_acc:.4f}")
