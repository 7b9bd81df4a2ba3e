"""Other people's models for the tests and the real-models benchmark: Hugging Face GPT-2 and
BERT built from configs (no downloads), a MobileNet-like conv net, each in a LightningModule
that reduces per-sample losses with ``weighted_loss``, and tiny embedded-free data for them."""

from __future__ import annotations

import lightning as L
import torch
import transformers
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lichtenberg.callbacks import weighted_loss

__all__ = ["BATCH", "N", "DepthwiseNet", "Wrapped", "bert", "data", "expected_quantized", "gpt2", "linear_like", "tied"]

N, BATCH = 64, 8  # 8 steps per epoch


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def bert() -> nn.Module:
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=64, max_position_embeddings=16)
    return transformers.BertForMaskedLM(config)


class DepthwiseNet(nn.Module):
    """A MobileNet-like conv net: BatchNorm, a depthwise (grouped) conv, a residual, a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = torch.relu(h + self.dw(h))
        return self.head(h.mean((2, 3)))


class Wrapped(L.LightningModule):
    """Someone else's nn.Module in a LightningModule, per-sample losses through ``weighted_loss``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.net = {"gpt2": gpt2, "bert": bert, "conv": DepthwiseNet}[kind]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv":
            return self.net(x)
        return self.net(input_ids=x).logits

    def losses(self, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        x, y = batch
        logits = self(x)
        if self.kind == "conv":
            return nn.functional.cross_entropy(logits, y, reduction="none"), None
        tokens = nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # [B, T]
        return tokens, torch.ones_like(tokens)

    def training_step(self, batch, batch_idx):
        losses, mask = self.losses(batch)
        return weighted_loss(self, losses, mask=mask)

    def validation_step(self, batch, batch_idx):
        losses, mask = self.losses(batch)
        self.log("val_loss", losses.mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3, fused=True)


def data(kind: str) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    if kind == "conv":
        x = torch.randn(N, 1, 8, 8, generator=g)
        y = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()
    else:
        x = torch.randint(0, 64, (N, 12), generator=g)
        y = torch.roll(x, -1, dims=1)  # next token
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True)


def linear_like(model: nn.Module) -> dict[int, tuple[str, nn.Parameter]]:
    """Every Linear-like weight, found independently of lichtenberg: by class name (a fake-quant
    ``Quant<Class>`` as its class), one per tensor."""
    kinds = ("Linear", "NonDynamicallyQuantizableLinear", "Conv2d", "Conv1D")
    out = {}
    for name, module in model.named_modules():
        cls = type(module).__name__.removeprefix("Quant")
        if cls in kinds and isinstance(getattr(module, "weight", None), nn.Parameter):
            out.setdefault(id(module.weight), (f"{name}.weight", module.weight))
    return out


def tied(model: Wrapped) -> list[tuple[nn.Parameter, nn.Parameter]]:
    net = model.net
    if model.kind == "gpt2":
        return [(net.lm_head.weight, net.transformer.wte.weight)]
    if model.kind == "bert":
        return [(net.cls.predictions.decoder.weight, net.bert.embeddings.word_embeddings.weight)]
    return []


QUANTIZABLE = ("Linear", "Conv1d", "Conv2d", "Conv1D", "Embedding")  # exact classes, found by name here


def expected_quantized(model: Wrapped) -> set[str]:
    """Every layer QAT should swap (before a swap, or as the Quant<Class> it became)."""
    return {n for n, m in model.named_modules() if type(m).__name__.removeprefix("Quant") in QUANTIZABLE}
