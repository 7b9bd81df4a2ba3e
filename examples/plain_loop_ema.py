"""lichtenberg.core in a plain PyTorch loop: no Lightning anywhere (the layering at work).

    python examples/plain_loop_ema.py [seed]

The learning rate is high and constant, so the last iterate still bounces between
mini-batches when training stops; the EMA of the same run averages the bouncing out and
scores a few points higher.
"""

import sys

import torch
from sklearn.datasets import load_digits
from torch import nn

from lichtenberg.core.averaging import AveragedWeights, ema_decay

seed = int(sys.argv[1]) if len(sys.argv) > 1 else 0
x, y = load_digits(return_X_y=True)
x, y = torch.tensor(x, dtype=torch.float32) / 16, torch.tensor(y)
# A shuffled split, the same for every seed: load_digits is ordered by writer.
order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
train, val = order[:1400], order[1400:]
train_x, train_y, val_x, val_y = x[train], y[train], x[val], y[val]

torch.manual_seed(seed)  # initial weights and batch order
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
ema = AveragedWeights(model)  # name-keyed float copies of every parameter and buffer

for epoch in range(5):
    for idx in torch.randperm(len(train_x)).split(32):
        loss = nn.functional.cross_entropy(model(train_x[idx]), train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update_(1.0 - ema_decay(ema.num_updates, decay=0.99))  # one foreach lerp


def accuracy() -> float:
    with torch.no_grad():
        return (model(val_x).argmax(1) == val_y).float().mean().item()


raw_acc = accuracy()
raw = ema.snapshot()
ema.copy_to_()  # the averaged weights, ready to save with torch.save(model.state_dict(), ...)
print(f"val_acc: last iterate {raw_acc:.4f}, EMA {accuracy():.4f} after {ema.num_updates} updates")
ema.restore_(raw)  # back to the raw weights to keep training
