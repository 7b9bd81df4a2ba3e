"""Train 90% sparse on two processes while all-reducing only the gradients of kept weights.

    python examples/sparse_ddp.py        # two CPU processes (gloo); devices=8, accelerator="gpu" on a GPU node

Lightning starts the second process by running this script again, so everything sits under
``if __name__ == "__main__"``. The result equals ``strategy="ddp"``; only the traffic differs.
"""

import lightning as L

from lichtenberg.callbacks import DynamicSparseTraining
from lichtenberg.core.schedules import SparsitySchedule
from lichtenberg.plugins import SparseDDPStrategy

from ema_existing_module import DigitsClassifier, loaders  # an ordinary user module

if __name__ == "__main__":
    L.seed_everything(0)
    model = DigitsClassifier()
    train, val = loaders()
    dst = DynamicSparseTraining(sparsity=0.9, method="rigl", schedule=SparsitySchedule(start=0, end=0.75, every_n_steps=25))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=SparseDDPStrategy(), max_epochs=10, callbacks=[dst],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, train, val)
    acc = trainer.validate(model, val, verbose=False)[0]["val_acc"]
    t = trainer.strategy.totals  # RigL's update steps went dense: it reads the averaged dense gradients
    if trainer.is_global_zero:
        print(f"val_acc {acc:.4f}; {t['steps']} steps ({t['dense_steps']} dense) all-reduced {t['bytes']} bytes per "
              f"process instead of {t['dense_bytes']} ({t['bytes'] / t['dense_bytes']:.3f}x)")
