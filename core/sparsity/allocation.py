"""How many weights each layer keeps for a global sparsity target.

- uniform: every layer at the target sparsity.
- global: one score threshold over all layers (can wipe out a layer whose scale is small).
- global_floor: global, but every layer keeps at least ``floor`` of its weights (Gupta et al.).
- lamp: global over LAMP scores w_u^2 / sum_{v >= u} w_v^2 (Lee et al., 2021); the largest
  weight of each layer scores 1, so no layer collapses.
- erk: Erdos-Renyi-Kernel densities proportional to (sum of dims) / (product of dims).

All return exact integer keep-counts per layer; selecting within a layer is ``topk_mask``.
FSDP2 DTensor scores give the same counts on every rank without gathering them (global:
one distributed threshold, 33 small all-reduces; lamp: nested bisection, see
``lichtenberg.core.sparsity.sharded``); uniform and erk need only the global shapes.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from ..distributed import full, is_sharded, like, local, scatter_like
from . import sharded
from .masks import topk_mask

__all__ = ["Allocation", "allocate", "erk_densities", "lamp_scores"]

Allocation = Literal["uniform", "global", "global_floor", "lamp", "erk"]


def lamp_scores(weight: Tensor) -> Tensor:
    """LAMP score of every weight of one layer, same shape. Needs one sort of the layer.

    A DTensor is gathered for this (its scores need the whole layer's order); selection by
    LAMP (``allocate``, ``prune_masks``) never calls this on shards.
    """
    if is_sharded(weight):
        return scatter_like(weight, lamp_scores(full(weight)))
    w2 = weight.detach().float().reshape(-1) ** 2
    order = w2.argsort()  # ascending
    sorted_w2 = w2[order]
    suffix = sorted_w2.flip(0).cumsum(0).flip(0)  # sum_{v >= u}
    scores = torch.empty_like(w2)
    scores[order] = sorted_w2 / suffix.clamp_min(torch.finfo(torch.float32).tiny)
    return scores.view_as(weight)


def erk_densities(shapes: dict[str, torch.Size], density: float) -> dict[str, float]:
    """ERK densities hitting the global ``density``; layers that would exceed 1 are kept dense."""
    raw = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    budget = density * sum(sizes.values())
    dense: set[str] = set()
    while True:
        free = [n for n in shapes if n not in dense]
        scale = (budget - sum(sizes[n] for n in dense)) / max(sum(raw[n] * sizes[n] for n in free), 1e-12)
        over = [n for n in free if scale * raw[n] > 1.0]
        if not over:
            return {n: 1.0 if n in dense else scale * raw[n] for n in shapes}
        dense.update(over)


def _global_counts(scores: dict[str, Tensor], keep: int) -> dict[str, int]:
    if sharded.any_sharded(scores.values()):
        _, counts = sharded.select(list(scores.values()), [keep], [0] * len(scores))
        return dict(zip(scores, counts))
    flat = torch.cat([s.reshape(-1).float() for s in scores.values()])
    kept = topk_mask(flat, keep)
    counts = torch.stack([c.sum() for c in kept.split([s.numel() for s in scores.values()])])
    return dict(zip(scores, counts.tolist()))  # one host sync for all layers


def allocate(
    scores: dict[str, Tensor],
    sparsity: float,
    method: Allocation = "uniform",
    floor: float = 0.01,
    weights: dict[str, Tensor] | None = None,
) -> dict[str, int]:
    """Keep-count per layer so that the total sparsity is ``sparsity`` (±1 weight per layer).

    Args:
        scores: per-layer importance scores (|w| for magnitude pruning); whole tensors, or
            all DTensor shards (FSDP2), which give the same counts.
        sparsity: global fraction of weights to remove, in [0, 1).
        method: the allocation rule.
        floor: minimum density per layer for ``global_floor``.
        weights: per-layer weights for ``lamp`` (default: the scores themselves).
    """
    sizes = {n: s.numel() for n, s in scores.items()}
    total_keep = round((1.0 - sparsity) * sum(sizes.values()))
    if method == "uniform":
        return {n: round((1.0 - sparsity) * size) for n, size in sizes.items()}
    if method == "global":
        return _global_counts(scores, total_keep)
    if method == "lamp":
        if sharded.any_sharded(scores.values()):
            layers = [(weights or scores)[n] for n in scores]
            return dict(zip(scores, sharded.lamp_counts([like(w, local(w).abs()) for w in layers], None, total_keep)))
        return _global_counts({n: lamp_scores((weights or scores)[n]) for n in scores}, total_keep)
    if method == "erk":
        densities = erk_densities({n: s.shape for n, s in scores.items()}, 1.0 - sparsity)
        return {n: min(sizes[n], round(densities[n] * sizes[n])) for n in scores}
    if method == "global_floor":
        minimum = {n: min(size, max(1, math.ceil(floor * size))) for n, size in sizes.items()}
        fixed: dict[str, int] = {}
        while True:
            free = {n: s for n, s in scores.items() if n not in fixed}
            counts = _global_counts(free, max(0, total_keep - sum(fixed.values()))) if free else {}
            low = {n: minimum[n] for n, c in counts.items() if c < minimum[n]}
            if not low:
                return {**fixed, **counts}
            fixed.update(low)
    raise ValueError(f"allocation={method!r} must be one of uniform, global, global_floor, lamp, erk.")
