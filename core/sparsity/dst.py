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

FSDP2 DTensor shards (weights, masks, gradients laid out like the parameters, or their
``as_rows`` views) give the same masks, laid out alike, nothing gathered
(``lichtenberg.core.sparsity.sharded`` says what each rule communicates). Random draws under
FSDP2 draw the whole layer on every rank and keep the rank's rows (``like=``,
:func:`random_scores`), so they equal the whole-tensor draw from the same generator.

Example:
    >>> masks = random_masks({n: p.shape for n, p in params.items()}, erk_densities(shapes, 0.1), gen)
    >>> new = drop_and_grow(weight, mask, n=int(0.3 * mask.sum()), grow_scores=grad.abs())
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..distributed import all_reduce_, group_of, is_sharded, local, scatter_like, shard_span
from ..distributed import like as _like
from . import sharded
from .masks import _nan_lowest, topk_mask

__all__ = ["cosine_drop_fraction", "drop_and_grow", "fanin_masks", "growth_scores", "random_masks", "random_scores",
           "srigl_update"]


def growth_scores(grad: Tensor) -> Tensor:
    """|grad| as float with NaN and +-inf scored 0: an overflowed slot is no evidence to grow it."""
    if is_sharded(grad):
        return _like(grad, growth_scores(local(grad)))
    return torch.nan_to_num(grad.detach().abs().float(), nan=0.0, posinf=0.0, neginf=0.0)


def cosine_drop_fraction(step: int, start: int, end: int, initial: float) -> float:
    """RigL's drop fraction: ``initial`` at ``start``, cosine-decayed to 0 at ``end``."""
    if step >= end or end <= start:
        return 0.0
    return 0.5 * initial * (1.0 + math.cos(math.pi * (step - start) / (end - start)))


def random_scores(reference: Tensor, generator: torch.Generator) -> Tensor:
    """``torch.rand(reference.shape, generator=generator)`` (drawn on the CPU) on ``reference``'s
    device, laid out like it: SET's growth scores. A DTensor draws the whole shape and keeps its
    rows, so the numbers equal the whole-tensor draw (costs the whole layer's draw per rank)."""
    return sharded.sharded_rand(reference, generator)


def _lay_out(masks: dict[str, Tensor], like: dict[str, Tensor] | None) -> dict[str, Tensor]:
    """Whole CPU masks laid out like ``like`` (the rank's rows of a DTensor, on its device)."""
    if like is None:
        return masks
    out = {}
    for name, mask in masks.items():
        ref = like[name]
        if tuple(ref.shape) != tuple(mask.shape):
            raise ValueError(f"like[{name!r}] has shape {tuple(ref.shape)}, the mask {tuple(mask.shape)}: pass tensors "
                             "shaped like `shapes` (the same [out, in, ...] views).")
        out[name] = scatter_like(ref, mask)
    return out


def random_masks(shapes: dict[str, torch.Size], densities: dict[str, float], generator: torch.Generator,
                 like: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Masks keeping exactly ``round(density * numel)`` uniformly random entries per layer (CPU).

    ``like``: tensors shaped like ``shapes`` to lay each mask out like (device; DTensor shards:
    every rank draws the whole layer and keeps its rows: same masks, no communication).
    """
    out = {}
    for name, shape in shapes.items():
        scores = torch.rand(shape, generator=generator)
        out[name] = topk_mask(scores, round(densities[name] * scores.numel()))
    return _lay_out(out, like)


def fanin_masks(shapes: dict[str, torch.Size], densities: dict[str, float], generator: torch.Generator,
                like: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Random masks with the same number of inputs, ``round(density * fan_in)`` >= 1, per output row.

    ``like``: as for :func:`random_masks`."""
    out = {}
    for name, shape in shapes.items():
        rows = torch.rand(shape[0], math.prod(shape[1:]), generator=generator)  # [out, fan_in]
        k = max(1, round(densities[name] * rows.shape[1]))
        out[name] = _row_top(rows, k).view(shape)
    return _lay_out(out, like)


def _row_top(scores: Tensor, k: int) -> Tensor:
    """Keep the ``k`` highest scores of every row (ties by lowest column)."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        keep.scatter_(1, _nan_lowest(scores).argsort(dim=1, descending=True, stable=True)[:, :k], True)
    return keep


def drop_and_grow(weight, mask, n, grow_scores):
    """Drop the ``n`` active weights of smallest |w|, then grow the ``n`` inactive slots with the
    highest ``grow_scores`` (>= 0; |grad| for RigL, uniform noise for SET).

    A just-dropped slot may be grown back (then it simply stays). Active count is unchanged.
    Takes one layer's tensors, or dicts by layer name (``n`` a dict of ints) for all layers of
    an event at once: on DTensor shards that costs 1 + 10 small all-reduces per event instead
    of per layer, and whole tensors one host sync for the active counts of all layers.
    """
    if isinstance(weight, dict):
        names = list(weight)
        if sharded.any_sharded([*weight.values(), *mask.values(), *grow_scores.values()]):
            return dict(zip(names, _drop_and_grow_sharded([weight[k] for k in names], [mask[k] for k in names],
                                                          [n[k] for k in names], [grow_scores[k] for k in names])))
        active = torch.stack([mask[k].sum() for k in names]).tolist()
        return {k: _drop_and_grow(weight[k], mask[k], n[k], grow_scores[k], a) for k, a in zip(names, active)}
    if sharded.any_sharded([weight, mask, grow_scores]):
        return _drop_and_grow_sharded([weight], [mask], [n], [grow_scores])[0]
    return _drop_and_grow(weight, mask, n, grow_scores, int(mask.sum()))


def _drop_and_grow(weight: Tensor, mask: Tensor, n: int, grow_scores: Tensor, active: int) -> Tensor:
    """:func:`drop_and_grow` of one whole layer with ``active`` kept weights."""
    n = min(n, active)
    keep = topk_mask(torch.where(mask, weight.abs().float(), -1.0), active - n)
    grown = topk_mask(torch.where(keep, -1.0, torch.nan_to_num(grow_scores.float(), 0.0, 0.0, 0.0)), n)
    return keep | grown


def _drop_and_grow_sharded(weights: list[Tensor], masks: list[Tensor], ns: list[int], grows: list[Tensor]) -> list[Tensor]:
    group = group_of(masks[0])
    active = all_reduce_(torch.stack([local(m).sum() for m in masks]), group).tolist()
    ns = [min(n, a) for n, a in zip(ns, active)]
    drop = [_like(m, torch.where(local(m), local(w).abs().float(), -1.0)) for w, m in zip(weights, masks)]
    keep, _ = sharded.select(drop, [a - n for a, n in zip(active, ns)])
    grow = [_like(m, torch.where(k, -1.0, torch.nan_to_num(local(g).float(), 0.0, 0.0, 0.0)))
            for m, k, g in zip(masks, keep, grows)]
    grown, _ = sharded.select(grow, ns)
    return [_like(m, k | g) for m, k, g in zip(masks, keep, grown)]


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

    DTensor rows (Shard(0): rows local; Shard(1): a Conv1D rows view, inputs split) with
    ``alive`` whole on every rank give the same result, ``alive`` whole.
    """
    if sharded.any_sharded([weight, grad, mask]):
        return _srigl_sharded(weight, grad, mask, alive, drop_fraction, gamma)
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


def _srigl_sharded(weight: Tensor, grad: Tensor, mask: Tensor, alive: Tensor, drop_fraction: float, gamma: float
                   ) -> tuple[Tensor, Tensor]:
    """:func:`srigl_update` on DTensor rows: per-row counts all-reduced as whole ``[out]`` vectors,
    layer selections by bisection, per-row selections local (Shard(0)) or by bisection (Shard(1))."""
    group, _, _, dim = sharded.mesh_of(mask)
    if dim not in (0, 1):
        raise ValueError(f"srigl_update: rows sharded along dim {dim}; expected FSDP2's Shard(0) or a Conv1D rows view.")
    out, fan_in = mask.shape[0], math.prod(mask.shape[1:])
    start, length = shard_span(mask) if dim == 0 else (0, out)
    W, G, M = local(weight).detach().abs().float(), growth_scores(local(grad)), local(mask)
    a = alive[start:start + length].view(-1, *[1] * (M.dim() - 1))  # this rank's rows, broadcast over inputs

    def row_sums(x: Tensor) -> Tensor:  # [out], summed over the ranks' parts of every row
        sums = torch.zeros(out, dtype=torch.long, device=alive.device)
        sums[start:start + length] = x.flatten(1).sum(1).to(alive.device)
        return all_reduce_(sums, group)

    def row_top(scores: Tensor, k: int) -> Tensor:  # the k highest of every row, ties by lowest column
        if dim == 0:
            return _row_top(scores.flatten(1), k).view_as(scores)
        return sharded.select([_like(mask, scores)], [k], per_row=True)[0][0]

    def layer_top(scores: Tensor, k: int) -> Tensor:
        return sharded.select([_like(mask, scores)], [k])[0][0]

    counts = row_sums(M)
    k = int(counts[alive].max()) if alive.any() else 0
    budget = int(counts.sum())
    n_drop = round(drop_fraction * budget)
    survive = layer_top(torch.where(M, W, -1.0), budget - n_drop)
    grown = layer_top(torch.where(survive | ~a, -1.0, G), n_drop)
    salient = row_sums(survive | grown)  # [out]
    ablate = alive & (salient < gamma * k)
    if ablate.all():  # never ablate the whole layer: keep the most salient neuron
        ablate[salient.masked_fill(~alive, -1).argmax()] = False
    alive = alive & ~ablate
    a = alive[start:start + length].view_as(a)
    k_new = min(fan_in, budget // max(int(alive.sum()), 1))
    d = round(drop_fraction * k)
    kept = row_top(torch.where(M, W, -1.0), max(k - d, 0)) & M & a
    per_row = row_sums(kept)
    need = k_new - int(per_row[alive].max()) if alive.any() else 0
    grow = row_top(torch.where(kept, -1.0, G), max(need, 0)) & ~kept & a
    return _like(mask, kept | grow), alive
