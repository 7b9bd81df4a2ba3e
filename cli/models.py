"""Small LightningModules for the demos and recipes: an MLP, a CNN and a character-level transformer.

Every constructor argument is a plain int/float/str/list so a LightningCLI YAML file can
set it. The shared ``DemoModule`` owns the optimizer, the logging and the public
``per_sample_loss`` that sample-reweighting callbacks build on.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from ..callbacks import weighted_loss
from ..core.distributed import shard_layers_

__all__ = ["DemoModule", "MLP", "SmallCNN", "TinyTransformerLM"]

OptimizerName = Literal["sgd", "adam", "adamw"]
SchedulerName = Literal["none", "cosine"]


class DemoModule(LightningModule):
    """Base of the demo models: optimizer settings, train/val/test/predict steps and per-sample losses.

    Subclasses define ``forward(x) -> logits`` and may override ``losses_from_logits``;
    the default is per-sample cross-entropy over the last logit dimension.

    Args:
        lr: Learning rate, > 0.
        weight_decay: Decoupled for ``adamw``, L2 for ``sgd``/``adam``; >= 0.
        optimizer: One of ``sgd``, ``adam``, ``adamw``.
        momentum: SGD momentum (ignored by the Adam variants).
        scheduler: ``none`` keeps ``lr`` fixed; ``cosine`` anneals it to 0 over the
            trainer's estimated stepping batches, updated every step.
        num_classes: Classes for the val/test accuracy; ``None`` logs no accuracy (language models).
        fused: Passed to ``adam``/``adamw`` as ``fused=`` when not ``None`` (``None`` keeps torch's
            default). ``True`` is the fast choice on CPU with sparsity masks: torch's default CPU
            Adam slows down on the exact zeros that masks create. Not for ``sgd``.
    """

    def __init__(
        self,
        lr: float,
        weight_decay: float = 0.0,
        optimizer: OptimizerName = "adam",
        momentum: float = 0.9,
        scheduler: SchedulerName = "none",
        num_classes: Optional[int] = None,
        fused: Optional[bool] = None,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr={lr} must be > 0; pass e.g. 1e-3.")
        if weight_decay < 0:
            raise ValueError(f"weight_decay={weight_decay} must be >= 0; pass 0 to disable it.")
        if optimizer not in ("sgd", "adam", "adamw"):
            raise ValueError(f"optimizer={optimizer!r} is unknown; use 'sgd', 'adam' or 'adamw'.")
        if scheduler not in ("none", "cosine"):
            raise ValueError(f"scheduler={scheduler!r} is unknown; use 'none' or 'cosine'.")
        if fused is not None and not isinstance(fused, bool):
            raise ValueError(f"fused={fused!r} must be true, false or null (torch's default).")
        if fused is not None and optimizer == "sgd":
            raise ValueError(f"fused={fused} only applies to optimizer='adam' or 'adamw', not 'sgd'; drop fused.")
        self.lr = lr
        self.weight_decay = weight_decay
        self.optimizer_name = optimizer
        self.momentum = momentum
        self.scheduler_name = scheduler
        self.fused = fused
        # One metric per stage so a validation run inside fit never mixes with test state.
        self.accuracy = (
            nn.ModuleDict({s: MulticlassAccuracy(num_classes, average="micro") for s in ("val", "test")})
            if num_classes is not None
            else None
        )

    def losses_from_logits(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample losses ``[B]`` from ``logits [B, C]`` and targets ``y [B]``."""
        return F.cross_entropy(logits, y, reduction="none")

    def _losses_and_logits(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        return self.losses_from_logits(logits, y), logits

    def per_sample_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Unreduced loss of every sample in ``batch = (x, y)``, shape ``[B]``, differentiable."""
        return self._losses_and_logits(batch)[0]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        losses, logits = self._losses_and_logits(batch)
        # The plain mean, unless SampleReweighting / DataPruning are attached (then their weights).
        extra = {"logits": logits, "target": batch[1]} if self.accuracy is not None else {}
        loss = weighted_loss(self, losses, **extra)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        losses, logits = self._losses_and_logits(batch)
        loss = losses.mean()
        # batch_size weights the epoch mean, so a short last batch does not skew it.
        self.log(f"{stage}_loss", loss, on_epoch=True, sync_dist=True, batch_size=len(losses), prog_bar=True)
        if self.accuracy is not None:
            metric = self.accuracy[stage]
            metric.update(logits, batch[1])
            # Logging the Metric object makes Lightning compute it over the whole epoch (all ranks).
            self.log(f"{stage}_acc", metric, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "test")

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        # Predict loaders may yield (x, y) or bare x.
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(-1)

    def configure_model(self) -> None:
        """Under ModelParallelStrategy (FSDP2), shard every layer with untied parameters, then the
        whole module (which takes the rest: tied weights, norms); elsewhere do nothing."""
        if self.device_mesh is None:
            return
        shard_layers_(self, self.device_mesh["data_parallel"])

    def configure_optimizers(self):
        params = self.parameters()
        if self.optimizer_name == "sgd":
            opt = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        else:
            # Only an explicit choice is passed on: torch picks its own default otherwise.
            extra = {} if self.fused is None else {"fused": self.fused}
            adam = torch.optim.Adam if self.optimizer_name == "adam" else torch.optim.AdamW
            opt = adam(params, lr=self.lr, weight_decay=self.weight_decay, **extra)
        if self.scheduler_name == "none":
            return opt
        total = self.trainer.estimated_stepping_batches
        if total == float("inf"):
            raise ValueError("scheduler='cosine' needs a finite run; set trainer max_steps or max_epochs.")
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, int(total)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class MLP(DemoModule):
    """Fully connected classifier; inputs of any shape are flattened to ``[B, in_features]``.

    Args:
        in_features: Flattened input size (64 for digits, 40 for MNIST-1D).
        hidden: Widths of the hidden Linear+ReLU(+Dropout) blocks; ``None`` means ``[128, 128]``.
        num_classes: Output logits.
        dropout: Dropout probability after each hidden block.
        lr: See ``DemoModule``.
        weight_decay: See ``DemoModule``.
        optimizer: See ``DemoModule``.
        momentum: See ``DemoModule``.
        scheduler: See ``DemoModule``.
        fused: See ``DemoModule``.
    """

    def __init__(
        self,
        in_features: int = 64,
        hidden: Optional[list[int]] = None,
        num_classes: int = 10,
        dropout: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: OptimizerName = "adam",
        momentum: float = 0.9,
        scheduler: SchedulerName = "none",
        fused: Optional[bool] = None,
    ) -> None:
        super().__init__(lr, weight_decay, optimizer, momentum, scheduler, num_classes=num_classes, fused=fused)
        self.save_hyperparameters()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1); pass 0 to disable it.")
        widths = [in_features, *(hidden if hidden is not None else [128, 128])]
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(w_in, w_out), nn.ReLU(), nn.Dropout(dropout)]
        layers.append(nn.Linear(widths[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))  # [B, ...] -> [B, num_classes]


class SmallCNN(DemoModule):
    """Two-conv classifier sized for 8x8 images such as scikit-learn's digits.

    Args:
        in_channels: Input image channels.
        num_classes: Output logits.
        channels: Width of the first conv; the second has twice as many.
        lr: See ``DemoModule``.
        weight_decay: See ``DemoModule``.
        optimizer: See ``DemoModule``.
        momentum: See ``DemoModule``.
        scheduler: See ``DemoModule``.
        fused: See ``DemoModule``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: int = 32,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: OptimizerName = "adam",
        momentum: float = 0.9,
        scheduler: SchedulerName = "none",
        fused: Optional[bool] = None,
    ) -> None:
        super().__init__(lr, weight_decay, optimizer, momentum, scheduler, num_classes=num_classes, fused=fused)
        self.save_hyperparameters()
        c = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c, 3, padding=1),
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, padding=1),
            nn.BatchNorm2d(2 * c),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(2 * c * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)  # [B, C_in, 8, 8] -> [B, 2c, 4, 4]
        return self.classifier(h.flatten(1))  # [B, num_classes]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention on ``[B, T, D]``."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)  # 3 x [B, T, D]
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))  # [B, H, T, D/H]
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))  # [B, T, D]


class Block(nn.Module):
    """Pre-LayerNorm transformer block: attention then a 4x GELU MLP, each residual."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyTransformerLM(DemoModule):
    """Decoder-only character language model with the output head tied to the token embedding.

    ``forward`` maps tokens ``[B, T]`` (``T <= context_length``) to logits ``[B, T, vocab_size]``;
    ``per_sample_loss`` is each sequence's mean next-token cross-entropy, shape ``[B]``.

    Args:
        vocab_size: Token ids are in ``[0, vocab_size)``.
        context_length: Longest sequence the positional embedding covers.
        d_model: Embedding width; must be divisible by ``n_heads``.
        n_layers: Transformer blocks.
        n_heads: Attention heads per block.
        dropout: Dropout in attention and the MLPs.
        lr: See ``DemoModule``.
        weight_decay: See ``DemoModule``.
        optimizer: See ``DemoModule``.
        momentum: See ``DemoModule``.
        scheduler: See ``DemoModule``.
        fused: See ``DemoModule``.
    """

    def __init__(
        self,
        vocab_size: int = 128,
        context_length: int = 64,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        dropout: float = 0.0,
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        optimizer: OptimizerName = "adam",
        momentum: float = 0.9,
        scheduler: SchedulerName = "none",
        fused: Optional[bool] = None,
    ) -> None:
        super().__init__(lr, weight_decay, optimizer, momentum, scheduler, num_classes=None, fused=fused)
        self.save_hyperparameters()
        if d_model % n_heads:
            raise ValueError(
                f"d_model={d_model} is not divisible by n_heads={n_heads}; pick e.g. n_heads=4 with d_model=64."
            )
        self.context_length = context_length
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(context_length, d_model)
        self.blocks = nn.Sequential(*(Block(d_model, n_heads, dropout) for _ in range(n_layers)))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied: one parameter, seen once by the optimizer
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # GPT-2 style small init; the default N(0, 1) embedding would make the tied head's logits huge.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        if t > self.context_length:
            raise ValueError(f"sequence length {t} exceeds context_length={self.context_length}; crop the input.")
        pos = torch.arange(t, device=x.device)
        h = self.tok_emb(x) + self.pos_emb(pos)  # [B, T, D]
        return self.head(self.ln_f(self.blocks(h)))  # [B, T, V]

    def losses_from_logits(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # cross_entropy wants the class dimension second: [B, V, T] against [B, T].
        return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(dim=1)  # [B]
