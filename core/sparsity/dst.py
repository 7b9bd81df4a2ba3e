"""Dynamic sparse training policies: which weights to drop and which to grow at an update.

Tensors are given ``[out, in, ...]`` (``lichtenberg.core.layers.as_rows`` views): SRigL's
fan-in runs along the inputs. Non-finite gradients (an overflowing fp16 loss scale) score 0
for growth, and NaN weights rank last: exact counts whatever the gradients hold.

All policies keep the masks' per-layer counts (SET, RigL, SRigL) or follow a pruning
schedule (GraNet); the engine installs the result (grown weights start at zero, optimizer
state of changed slots is reset). Selection is ``topk_mask`` (kthvalue, ties by lowest
index) per layer, or a stable per-row sort for SRigL's constant fan-in; random draws come
from an explicit ``torch.Generator`` on the CPU, so every rank draws the same numbers.

- SET (Mocanu et al., 2018): drop the smallest |w|, grow at random.
- RigL (Evci et al., 2020): drop the smallest |w|, grow the largest dense |grad|.
- GraNet (Liu et al., 2021): gradual global magnitude pruning + RigL drop/grow per layer.
- SRigL (Lasby et al., 2024): RigL with the same fan-in for every output neuron, and neurons
  with too few salient weights ablated (their budget goes to the others).

Example:
    >>> masks = random_masks({n: p.shape for n, p in params.items()}, erk_densities(shapes, 0.1), gen)
    >>> new = drop_and_grow(weight, mask, n=int(0.3 * mask.sum()), grow_scores=grad.abs())
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .masks import _nan_lowest, topk_mask

__all__ = ["cosine_drop_fraction", "drop_and_grow", "fanin_masks", "growth_scores", "random_masks", "srigl_update"]


def growth_scores(grad: Tensor) -> Tensor:
    """|grad| as float with NaN and +-inf scored 0: an overflowed slot is no evidence to grow it."""
    return torch.nan_to_num(grad.detach().abs().float(), nan=0.0, posinf=0.0, neginf=0.0)


def cosine_drop_fraction(step: int, start: int, end: int, initial: float) -> float:
    """RigL's drop fraction: ``initial`` at ``start``, cosine-decayed to 0 at ``end``."""
    if step >= end or end <= start:
        return 0.0
    return 0.5 * initial * (1.0 + math.cos(math.pi * (step - start) / (end - start)))


def random_masks(shapes: dict[str, torch.Size], densities: dict[str, float], generator: torch.Generator) -> dict[str, Tensor]:
    """Masks keeping exactly ``round(density * numel)`` uniformly random entries per layer (CPU)."""
    out = {}
    for name, shape in shapes.items():
        scores = torch.rand(shape, generator=generator)
        out[name] = topk_mask(scores, round(densities[name] * scores.numel()))
    return out


def fanin_masks(shapes: dict[str, torch.Size], densities: dict[str, float], generator: torch.Generator) -> dict[str, Tensor]:
    """Random masks with the same number of inputs, ``round(density * fan_in)`` >= 1, per output row."""
    out = {}
    for name, shape in shapes.items():
        rows = torch.rand(shape[0], math.prod(shape[1:]), generator=generator)  # [out, fan_in]
        k = max(1, round(densities[name] * rows.shape[1]))
        out[name] = _row_top(rows, k).view(shape)
    return out


def _row_top(scores: Tensor, k: int) -> Tensor:
    """Keep the ``k`` highest scores of every row (ties by lowest column)."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        keep.scatter_(1, _nan_lowest(scores).argsort(dim=1, descending=True, stable=True)[:, :k], True)
    return keep


def drop_and_grow(weight: Tensor, mask: Tensor, n: int, grow_scores: Tensor) -> Tensor:
    """Drop the ``n`` active weights of smallest |w|, then grow the ``n`` inactive slots with the
    highest ``grow_scores`` (>= 0; |grad| for RigL, uniform noise for SET).

    A just-dropped slot may be grown back (then it simply stays). Active count is unchanged.
    """
    active = int(mask.sum())
    n = min(n, active)
    keep = topk_mask(torch.where(mask, weight.abs().float(), -1.0), active - n)
    grown = topk_mask(torch.where(keep, -1.0, torch.nan_to_num(grow_scores.float(), 0.0, 0.0, 0.0)), n)
    return keep | grown


def srigl_update(
    weight: Tensor, grad: Tensor, mask: Tensor, alive: Tensor, drop_fraction: float, gamma: float
) -> tuple[Tensor, Tensor]:
    """One SRigL update of a layer: constant fan-in drop/grow with neuron ablation.

    Saliency (per layer, as in RigL): the active weights that survive a magnitude drop of
    ``drop_fraction`` plus the inactive ones with the largest |grad|. An output neuron with
    fewer than ``gamma * k`` salient weights (k: the current constant fan-in) is ablated; the layer's weight budget is
    re-spread over the remaining neurons (fan-in k' = budget // alive, at most the full fan-in).
    Then, per alive neuron, the smallest |w| are dropped and the largest |grad| grown.

    Args:
        weight, grad, mask: the layer's tensors, [out, ...].
        alive: bool [out], neurons not ablated so far.
        drop_fraction: fraction of each neuron's active weights to replace.
        gamma: saliency threshold (the paper: 0.3).

    Returns:
        (new mask, new alive).
    """
    w = weight.detach().abs().float().reshape(weight.shape[0], -1)  # [out, fan_in]
    g = growth_scores(grad).reshape(w.shape)
    m = mask.reshape(w.shape)
    k = int(m[alive].sum(1).max()) if alive.any() else 0
    budget = int(m.sum())
    n_drop = round(drop_fraction * budget)
    survive = topk_mask(torch.where(m, w, -1.0), budget - n_drop)
    grown = topk_mask(torch.where(survive | ~alive[:, None], -1.0, g), n_drop)
    salient = (survive | grown).sum(1)  # [out]
    ablate = alive & (salient < gamma * k)
    if ablate.all():  # never ablate the whole layer: keep the most salient neuron
        ablate[salient.masked_fill(~alive, -1).argmax()] = False
    alive = alive & ~ablate
    k_new = min(w.shape[1], budget // max(int(alive.sum()), 1))
    d = round(drop_fraction * k)
    # Per alive row: keep its k - d largest active |w| (or all it has if the fan-in grew) ...
    kept = _row_top(torch.where(m, w, -1.0), max(k - d, 0)) & m
    kept &= alive[:, None]
    # ... then grow to k_new with the largest |grad| among the rest of the row.
    need = k_new - int(kept[alive].sum(1).max()) if alive.any() else 0
    grow = _row_top(torch.where(kept, -1.0, g), max(need, 0)) & ~kept & alive[:, None]
    return (kept | grow).reshape(mask.shape), alive
