"""Quantization-aware training of an existing LightningModule, then integer export and an int8 CPU model.

    python examples/quantization_aware_training.py
"""

import lightning as L
import torch

from lichtenberg.callbacks import QuantizationAwareTraining
from lichtenberg.core.quantization import export_int, packed_bytes, to_int8_cpu_

from ema_existing_module import DigitsClassifier, loaders  # an ordinary user module

if __name__ == "__main__":
    L.seed_everything(0)
    model = DigitsClassifier()
    train, val = loaders()
    qat = QuantizationAwareTraining(weight_bits=4, activation_bits=8, start_step=0.2)  # float warm-up, then W4A8
    trainer = L.Trainer(max_epochs=8, callbacks=[qat], logger=False, enable_checkpointing=False)
    trainer.fit(model, train, val)
    acc = trainer.validate(model, val, verbose=False)[0]["val_acc"]
    ints = export_int(model)  # integer weights + scales, exactly what the fake-quant forward used
    fp32 = sum(e["weight"].numel() * 4 for e in ints.values())
    int4 = sum(packed_bytes(e) for e in ints.values())
    print(f"val_acc {acc:.4f} with W4A8; weights {fp32 / 1024:.1f} KiB fp32 -> {int4 / 1024:.1f} KiB packed int4")
    torch.save(ints, "digits_w4.int.pt")
    int8 = to_int8_cpu_(model)  # in place: Linear layers now run torch's int8 kernels
    x, y = next(iter(val))
    print(f"int8 CPU model batch accuracy {(int8.net(x).argmax(1) == y).float().mean():.4f}")
