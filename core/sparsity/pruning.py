"""The gradual-pruning policy: new masks for a target sparsity, never reviving a pruned weight.

Already-pruned entries get the lowest possible score, so a growing sparsity target only ever
removes more weights (masks are monotone), whatever the allocation rule.

FSDP2 DTensor scores and masks give the same masks as DTensors laid out alike, nothing
gathered: the allocation's selection plus one per-layer selection (5 + 5 all-reduces;
LAMP adds its nested bisection, see ``lichtenberg.core.sparsity.sharded``).

Example:
    >>> masks = prune_masks(scores, engine.masks, sparsity=0.8, allocation="lamp")
    >>> engine.set_masks_(masks, optimizers)
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..distributed import like, local
from . import sharded
from .allocation import Allocation, allocate, lamp_scores
from .masks import nm_mask, topk_mask

__all__ = ["prune_masks"]


def prune_masks(
    scores: dict[str, Tensor],
    masks: dict[str, Tensor],
    sparsity: float | dict[str, float],
    allocation: Allocation = "uniform",
    nm: tuple[int, int] | None = None,
    floor: float = 0.01,
) -> dict[str, Tensor]:
    """Masks reaching ``sparsity`` (or the N:M pattern ``nm``), subsets of the current ``masks``.

    Args:
        scores: importance per layer (higher is kept), same shapes as the masks.
        masks: current masks (True = kept).
        sparsity: global target fraction of pruned weights, in [0, 1), or an explicit
            sparsity per layer (then ``allocation`` is not used).
        allocation: how the budget is split across layers (ignored for N:M).
        nm: (N, M) to keep N of every M consecutive inputs, or None for unstructured.
        floor: minimum layer density for ``global_floor``.
    """
    if sharded.any_sharded([*scores.values(), *(masks[n] for n in scores)]):
        return _prune_sharded(scores, masks, sparsity, allocation, nm, floor)
    live = {n: torch.where(masks[n], s.float(), -1.0) for n, s in scores.items()}  # a scalar: no host-to-device copy
    if nm is not None:
        return {n: nm_mask(s, *nm) & masks[n] for n, s in live.items()}
    if isinstance(sparsity, dict):
        return {n: topk_mask(s, round((1.0 - sparsity[n]) * s.numel())) for n, s in live.items()}
    if allocation == "lamp":
        ranked = {n: torch.where(masks[n], lamp_scores(s.clamp_min(0)), -1.0) for n, s in live.items()}
        counts = allocate(ranked, sparsity, "global")
        return {n: topk_mask(ranked[n], counts[n]) for n in live}
    counts = allocate(live, sparsity, allocation, floor=floor)
    return {n: topk_mask(s, counts[n]) for n, s in live.items()}


def _prune_sharded(scores, masks, sparsity, allocation, nm, floor) -> dict[str, Tensor]:
    """:func:`prune_masks` on DTensor shards: the same rules, selections by threshold bisection."""
    live = {n: like(s, torch.where(local(masks[n]), local(s).float(), -1.0)) for n, s in scores.items()}
    if nm is not None:
        return {n: like(s, local(nm_mask(s, *nm)) & local(masks[n])) for n, s in live.items()}
    names = list(live)
    if isinstance(sparsity, dict):
        counts = {n: round((1.0 - sparsity[n]) * live[n].numel()) for n in names}
    elif allocation == "lamp":
        total = round((1.0 - sparsity) * sum(s.numel() for s in live.values()))
        proxies = [like(live[n], local(live[n]).clamp_min(0)) for n in names]
        counts = dict(zip(names, sharded.lamp_counts(proxies, [masks[n] for n in names], total)))
        # LAMP is monotone in the magnitude inside a layer: keep each layer's largest live scores.
        live = {n: like(p, torch.where(local(masks[n]), local(p), -1.0)) for n, p in zip(names, proxies)}
    else:
        counts = allocate(live, sparsity, allocation, floor=floor)
    kept, _ = sharded.select([live[n] for n in names], [counts[n] for n in names])
    return {n: like(live[n], k) for n, k in zip(names, kept)}
