"""Per-sample loss weights: the softmax-of-transformed-loss family and focal weights.

Sow et al. (ICLR 2025): normalise the batch's losses to x in [-1, 1], apply a transform f,
and weight by ``softmax(f(x) / r)``, the closed-form maximiser of sum w f - r KL(w || uniform).
The weights are scaled to mean 1 (the learning rate keeps its meaning) and carry no
gradient.

Transforms ("rules"):
- ``linupper``: min(x + 1, 1). Up-weights all but the easiest half; flat for the hardest
  half, so noisy high-loss samples are not over-emphasised (the paper's default).
- ``quadratic``: 1 - x^2, favouring medium losses.
- ``extremes``: |x|, favouring both tails.
- ``uniform``: all weights 1.
- ``softmax``: x, the KL-regularised DRO weights (favour high losses).
- ``softmin``: -x (favour low losses: robust to label noise).

Example:
    >>> w = loss_weights(losses.detach(), "linupper", temperature=1.0)   # [B], mean 1
    >>> loss = (w * losses).mean()
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["RULES", "effective_sample_size", "focal_weights", "loss_weights", "normalize_losses", "weight_entropy"]

RULES = ("linupper", "quadratic", "extremes", "uniform", "softmax", "softmin")


def normalize_losses(losses: Tensor) -> Tensor:
    """Min-max map of a batch of losses to [-1, 1]; all zeros when the batch is constant."""
    lo, hi = losses.min(), losses.max()
    span = hi - lo
    return torch.where(span > 0, 2 * (losses - lo) / span.clamp_min(torch.finfo(losses.dtype).tiny) - 1, 0.0)


@torch.no_grad()
def loss_weights(losses: Tensor, rule: str = "linupper", temperature: float = 1.0) -> Tensor:
    """Weights with mean exactly 1 over ``losses`` (a 1-D batch); no gradient."""
    losses = losses.detach().float()
    if rule == "uniform":
        return torch.ones_like(losses)
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} must be one of {', '.join(RULES)}.")
    # softmax(f(x) / T) with x = normalize_losses(losses), in a third of the tensor ops
    # (on a batch of 64 each op is ~5 us of dispatch, more than its arithmetic): u = x + 1 in [0, 2],
    # and each transform rewritten in u up to a constant, which the softmax ignores. A constant
    # batch gives u = 0 everywhere, hence uniform weights.
    lo, hi = torch.aminmax(losses)
    u = (losses - lo).mul_(2.0 / (hi - lo).clamp_min(torch.finfo(losses.dtype).tiny))
    if rule == "linupper":
        f = u.clamp_(max=1.0)  # min(x + 1, 1)
    elif rule == "quadratic":
        f = u.mul_(2.0 - u)  # 1 - x^2 = u (2 - u)
    elif rule == "extremes":
        f = u.sub_(1.0).abs_()  # |x|
    elif rule == "softmax":
        f = u  # x + 1
    else:  # softmin
        f = u.neg_()  # -x - 1
    if temperature != 1.0:
        f = f.div_(temperature)
    return torch.softmax(f, dim=0).mul_(losses.numel())


@torch.no_grad()
def focal_weights(losses: Tensor, gamma: float = 2.0) -> Tensor:
    """Focal-style weights (1 - p)^gamma with p = exp(-loss) (cross-entropy), scaled to mean 1."""
    w = (-torch.expm1(-losses.detach().float())).clamp_min(0).pow(gamma)
    total = w.sum()
    return torch.where(total > 0, w * (w.numel() / total.clamp_min(torch.finfo(w.dtype).tiny)), 1.0)


def effective_sample_size(weights: Tensor) -> Tensor:
    """Kish's effective sample size as a fraction of the batch: (sum w)^2 / (n sum w^2), in (0, 1]."""
    return weights.sum() ** 2 / (weights.numel() * (weights * weights).sum()).clamp_min(torch.finfo(weights.dtype).tiny)


def weight_entropy(weights: Tensor) -> Tensor:
    """Entropy of the normalised weights divided by log(n): 1 for uniform weights."""
    p = weights / weights.sum()
    n = weights.numel()
    h = -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum()
    return h / torch.log(torch.tensor(float(max(n, 2))))
