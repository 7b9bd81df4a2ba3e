"""Which samples an epoch trains on: InfoBatch's dynamic plan and Data Diet's static scores.

InfoBatch (Qin et al., ICLR 2024): each item's score is its most recent loss. At an epoch
start, the "well-learned" items (score below the mean of the seen scores) are kept with
probability 1 - r, and the kept ones are up-weighted by 1 / (1 - r); everything else is
kept with weight 1. The expected gradient equals the full-data gradient (unbiased), and the
epoch is shorter. Items never seen are always kept.

Data Diet (Paul et al., NeurIPS 2021): EL2N = ||softmax(logits) - onehot(y)||_2 and GraNd =
||grad_theta loss(x, y)||_2 early in training rank the items; the hardest are kept.

Example:
    >>> kept, weights = infobatch_plan(scores, seen, ratio=0.5, generator=g)
    >>> kept = static_keep(el2n, keep=0.7)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["el2n_scores", "grand_scores", "infobatch_plan", "static_keep"]


@torch.no_grad()
def infobatch_plan(scores: Tensor, seen: Tensor, ratio: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """One epoch's plan: sorted kept item ids and a weight per item (0 for dropped ones).

    Args:
        scores: [N] latest loss per item.
        seen: [N] bool, items with a score.
        ratio: share of the well-learned items dropped, in [0, 1).
        generator: CPU generator (the same seed on every rank gives the same plan).
    """
    scores, seen = scores.cpu(), seen.cpu()
    weights = torch.ones(scores.numel())
    if ratio > 0 and bool(seen.any()):
        well_learned = seen & (scores < scores[seen].mean())
        drop = well_learned & (torch.rand(scores.numel(), generator=generator) < ratio)
        weights[well_learned] = 1.0 / (1.0 - ratio)
        weights[drop] = 0.0
    return weights.nonzero().squeeze(1), weights


def static_keep(scores: Tensor, keep: float, offset: float = 0.0) -> Tensor:
    """Sorted ids of the ``keep`` fraction with the highest scores, after skipping the top
    ``offset`` fraction (the hardest items are enriched in label noise)."""
    n = scores.numel()
    order = scores.float().cpu().argsort(descending=True, stable=True)
    start = int(round(offset * n))
    return order[start:start + max(1, int(round(keep * n)))].sort().values


@torch.no_grad()
def el2n_scores(logits: Tensor, target: Tensor) -> Tensor:
    """EL2N per sample: the L2 norm of the error vector softmax(logits) - onehot(target)."""
    p = logits.detach().float().softmax(-1)
    p[torch.arange(p.shape[0], device=p.device), target] -= 1.0
    return p.norm(dim=-1)


def grand_scores(model: nn.Module, loss_fn, inputs: Tensor, target: Tensor) -> Tensor:
    """GraNd per sample: the norm of each sample's loss gradient over all trainable parameters
    (exact per-sample gradients with torch.func)."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = dict(model.named_buffers())

    def one(p, x, y):
        out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    grads = vmap(grad(one), in_dims=(None, 0, 0))(params, inputs, target)
    return torch.sqrt(sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in grads.values()))
