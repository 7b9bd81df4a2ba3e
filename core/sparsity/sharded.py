"""Exact mask selection on FSDP2 shards: a distributed k-th value, by radix selection.

Under FSDP2 every parameter (and every score, mask or gradient laid out like it) is a DTensor
``Shard(d)`` over a 1-D mesh (d = 0 for parameters; d = 1 for the ``[out, in]`` rows view of a
Hugging Face ``Conv1D`` weight ``[in, out]``). The rules here give EXACTLY the mask the
whole-tensor rule gives on the gathered tensors (ties: lowest flat index wins; NaN ranks
lowest) without gathering weights or scores:

1. Scores become order-preserving int keys (:func:`float_keys`: float32 bits, negatives
   flipped; NaN -> -inf, -0.0 -> +0.0, as ``masks.topk_mask`` compares them).
2. The k-th largest key of every *problem* (a layer, or all layers for a global threshold)
   is found one byte at a time, high byte first: 4 all-reduces of a 256-bin histogram per
   problem (all problems of an event at once), each pass reading only the keys left in the
   chosen bucket. Per-row problems (a Conv1D rows view, rows split over ranks) bisect the
   key range instead: 32 rounds of ONE all-reduce of an int64 count per row.
3. Ties at the threshold are split by global flat index: flat order inside a tensor is
   "slab-major, then rank-major" (a slab: one index of the dims before the shard dim; one slab
   for Shard(0)), so one all-reduce of per-(slab, rank) tie counts (an all-gather of
   world-size ints per slab) tells every rank how many of its first ties to keep.

Communication per event, per rank (P problems, S slabs, w ranks; G = gathering the full
scores instead, parameter count x 4 x (w - 1) / w bytes):

- ``topk_mask``, per-layer allocations (uniform, erk, explicit dict), ``global``: 5
  all-reduces: 4 x (2 KiB P) + 1 x (8 S (w + 1) bytes). S = layers for Shard(0) weights,
  + out rows for each Conv1D rows view. ``allocate`` uniform/erk alone: nothing (shapes only).
- ``global_floor``: one selection (5) per round of fixing floored layers (usually 1-2).
- ``prune_masks``: the allocation's selection, then one per-layer selection (5), so 10.
- LAMP (:func:`lamp_counts`, L layers): 1 all-reduce of L live counts; an outer 16-ary search
  over the 2^30 float32 score keys in [0, 1] (8 steps of 15 candidate thresholds), each step an
  inner bisection over float32 w^2 keys (31 rounds) of ONE all-reduce of (count, sum) as 2
  float64 per (candidate, layer): 8 x 31 = 248 all-reduces of 240 L bytes; then 31 of 32 L
  bytes for the tie split; then ``prune_masks``' per-layer selection (5). About 285 small
  all-reduces per event, whatever the layer sizes; local work: one local sort of the rank's
  weights, then a searchsorted per query.
- ``drop_and_grow`` (SET, RigL; GraNet's regrowth): 1 all-reduce of active counts + 2
  selections (10), for one layer or (given dicts) all layers of the event at once.
- ``srigl_update`` (per layer): 3 all-reduces of per-row counts as whole ``[out]`` int64
  vectors (8 out bytes: active, salient, kept) + 2 layer selections (10); for a Conv1D rows
  view (every row split over ranks) + 2 per-row bisections (66, with P = S = out rows).
- ``nm_mask`` and ``wanda_score``: nothing (rows or aligned groups are local).
- ``random_masks``/``fanin_masks``/``random_scores`` with ``like``: nothing; every rank draws
  the whole layer (numel x 4 bytes of transient CPU memory and the time of that draw) and
  keeps its rows, so the result equals the whole-tensor draw from the same generator.

Example:
    >>> masks, counts = select([scores_a, scores_b], ks=[10], problems=[0, 0])  # global top-10
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

from ..distributed import all_reduce_, local, scatter_like

__all__ = ["any_sharded", "float_keys", "lamp_counts", "mesh_of", "nm_local_ok", "select", "sharded_rand"]

ROUNDS = 32  # bisection rounds over the int32 key range (per-row problems)
OUTER = 15  # LAMP thresholds tried per outer step: 8 steps of 31 all-reduces cover [0, 1]'s 2^30 keys


def any_sharded(tensors) -> bool:
    """Whether the tensors are DTensors; ValueError if some are and some are not."""
    flags = [isinstance(t, DTensor) for t in tensors]
    if any(flags) and not all(flags):
        raise ValueError("mixed whole tensors and DTensor shards: pass all scores/masks sharded like the parameters or none.")
    return any(flags)


def float_keys(scores: Tensor) -> Tensor:
    """int64 keys ordered like float32 ``scores`` (NaN lowest, as -inf; -0.0 equal to +0.0)."""
    x = scores.float()
    x = torch.where(x.isnan(), float("-inf"), x) + 0.0  # -0.0 + 0.0 is +0.0
    bits = x.view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()  # negatives: larger bits, smaller value


def _key_to_float(keys: Tensor) -> Tensor:
    """Inverse of :func:`float_keys` for keys of non-negative floats."""
    return keys.int().view(torch.float32)


def mesh_of(t: DTensor) -> tuple[dist.ProcessGroup, int, int, int]:
    """(group, rank, world, shard dim) of a DTensor laid out as Shard(d) over a 1-D mesh."""
    mesh, placements = t.device_mesh, tuple(t.placements)
    if mesh.ndim != 1 or len(placements) != 1 or not isinstance(placements[0], Shard):
        raise ValueError(f"selection supports Shard(d) over a 1-D mesh only, got {placements} over a {mesh.ndim}-D mesh.")
    return mesh.get_group(0), mesh.get_local_rank(0), mesh.size(0), placements[0].dim


def _slabs(t: DTensor) -> Tensor:
    """Local shard as ``[slabs, L]``: inside a slab, global flat order is rank-major."""
    d = mesh_of(t)[3]
    s = math.prod(t.shape[:d])
    x = local(t).contiguous()
    return x.reshape(s, x.numel() // s if s else 0)


def _radix_threshold(parts: list[Tensor], k: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """The ``k[p]``-th largest key of every problem p over all ranks (``parts[p]``: this rank's
    keys of p; 2**31 - 1 where k is 0), by radix selection one byte at a time, high byte first:
    4 all-reduces of a [P, 256] histogram. Each pass reads only the keys still in the chosen
    bucket, so after the exponent byte little is left: ~2 passes over the keys instead of 32."""
    cand = [p + 2**31 for p in parts]  # unsigned order
    need, prefix = k.clone(), torch.zeros_like(k)
    for shift in (24, 16, 8, 0):
        hist = torch.stack([torch.bincount((c >> shift) & 255, minlength=256) for c in cand])  # [P, 256]
        all_reduce_(hist, group)
        at_least = hist.flip(1).cumsum(1).flip(1)  # [P, 256]: keys in this bucket or above
        bucket = (at_least >= need[:, None]).sum(1) - 1  # the one holding the need-th largest
        above = torch.where(bucket < 255, at_least.gather(1, (bucket + 1).clamp_max(255)[:, None])[:, 0], 0)
        need, prefix = need - above, prefix | (bucket << shift)
        cand = [c[((c >> shift) & 255) == b] for c, b in zip(cand, bucket)]
    return prefix - 2**31


def select(pieces: list[Tensor], ks: list[int], problems: list[int] | None = None, per_row: bool = False
           ) -> tuple[list[Tensor], list[int]]:
    """Keep the ``ks[p]`` highest scores of every problem p over DTensor ``pieces`` (ties: lowest
    flat index of the pieces concatenated in order; NaN lowest).

    Args:
        pieces: DTensor scores (Shard(d), one mesh).
        ks: keep-count per problem (per piece with ``per_row``).
        problems: problem of each piece, non-decreasing (default: one problem per piece).
        per_row: every slab (row of a Shard(1) rows view) is its own problem, keeping ``ks`` of
            its piece.

    Returns:
        local bool masks (the rank's shards) and the global kept count of every piece.
    """
    group, rank, world, _ = mesh_of(pieces[0])
    problems = list(range(len(pieces))) if problems is None else problems
    slabs = [_slabs(p) for p in pieces]
    device = slabs[0].device
    sizes = [s.shape[0] for s in slabs]
    piece_of_seg = torch.repeat_interleave(torch.arange(len(pieces), device=device), torch.tensor(sizes, device=device))
    n_seg = int(sum(sizes))
    if per_row:
        seg_problem, k = torch.arange(n_seg, device=device), torch.tensor(ks, device=device)[piece_of_seg]
    else:
        seg_problem, k = torch.tensor(problems, device=device)[piece_of_seg], torch.tensor(ks, device=device)
    n_prob = k.numel()
    keys = torch.cat([float_keys(s).reshape(-1) for s in slabs])  # [N local]
    seg = torch.repeat_interleave(torch.arange(n_seg, device=device),
                                  torch.tensor([s.shape[1] for s in slabs], device=device).repeat_interleave(
                                      torch.tensor(sizes, device=device)))
    pid = seg_problem[seg]
    # Largest key t with count(key >= t) >= k: the invariant holds at the lowest key (k <= size).
    lo = torch.full((n_prob,), -2**31, dtype=torch.long, device=device)
    hi = torch.full((n_prob,), 2**31 - 1, dtype=torch.long, device=device)
    if per_row:  # many tiny problems (rows): bisection with one count per row per round
        for _ in range(ROUNDS):
            mid = lo + (hi - lo + 1) // 2
            count = all_reduce_(torch.bincount(pid[keys >= mid[pid]], minlength=n_prob), group)
            ok = count >= k
            lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid - 1)
    else:  # problems of whole pieces are contiguous runs of keys
        spans = [int(r.sum()) for r in torch.tensor([s.numel() for s in slabs]).split(
            torch.bincount(torch.tensor(problems), minlength=n_prob).tolist())]
        lo = _radix_threshold(list(keys.split(spans)), k, group)
    above, tie = keys > lo[pid], keys == lo[pid]
    my_ties = torch.bincount(seg[tie], minlength=n_seg)
    stats = torch.zeros(n_seg, 1 + world, dtype=torch.long, device=device)
    stats[:, 0] = torch.bincount(seg[above], minlength=n_seg)
    stats[:, 1 + rank] = my_ties
    all_reduce_(stats, group)  # [slab: above count, ties on rank 0 .. w-1]
    ties = stats[:, 1:]
    missing = k - torch.zeros_like(k).index_add_(0, seg_problem, stats[:, 0])
    before = (ties.reshape(-1).cumsum(0) - ties.reshape(-1)).view_as(ties)  # ties earlier in (slab, rank) order
    first = torch.searchsorted(seg_problem, torch.arange(n_prob, device=device))
    before = before - before[first, 0][seg_problem, None]  # ... counted from the problem's first slab
    take = torch.minimum((missing[seg_problem, None] - before).clamp_min(0), ties)  # [slab, rank]
    # Keep this rank's first take[slab, rank] ties of every slab, in local (= global) order.
    tie_rank = tie.long().cumsum(0) - (my_ties.cumsum(0) - my_ties)[seg]
    keep = above | (tie & (tie_rank <= take[:, rank][seg]))
    kept = torch.zeros(len(pieces), dtype=torch.long, device=device).index_add_(0, piece_of_seg, stats[:, 0] + take.sum(1))
    out = [m.view_as(local(p)) for m, p in zip(keep.split([s.numel() for s in slabs]), pieces)]
    return out, kept.tolist()


def lamp_counts(proxies: list[Tensor], live: list[Tensor] | None, keep: int) -> list[int]:
    """Per-layer keep-counts of global LAMP selection over DTensor layers, without a global sort.

    LAMP scores ``x_u / sum_{v: x_v >= x_u} x_v`` (x = proxy^2 in float32, live entries; dead
    entries rank below every live one) are monotone in x inside a layer, so the count of
    scores >= tau in a layer is the count of x >= x*(tau), x*(tau) the smallest x with
    ``fl32(x / T(x)) >= tau`` (T(x): the layer's sum of x' >= x, all-reduced): an inner
    bisection over x keys inside an outer one over tau. Sums run in float64, the whole-tensor
    rule sums in float32 (a sequential cumsum): the counts are equal unless two LAMP scores
    straddle the threshold within float32 rounding, and equal nonzero magnitudes (whose
    whole-tensor scores depend on an unstable sort) are not resolved alike. Exact on tie-free
    weights; zeros (score 0), the maximum of each layer (score 1) and dead slots tie as there.
    """
    group, _, _, _ = mesh_of(proxies[0])
    device = local(proxies[0]).device
    n_layers = len(proxies)
    xs, alive = [], []
    for i, p in enumerate(proxies):
        x = local(p).detach().float().reshape(-1).clamp_min(0) ** 2
        a = torch.ones_like(x, dtype=torch.bool) if live is None else local(live[i]).reshape(-1)
        xs.append(x[a])
        alive.append(int(a.sum()))
    # One local sort: the layer id is the major key, x's key the minor one.
    layer = torch.repeat_interleave(torch.arange(n_layers, device=device), torch.tensor(alive, device=device))
    sort_keys, order = (layer * 2**32 + float_keys(torch.cat(xs))).sort()
    x_sorted = torch.cat(xs)[order].double()
    suffix = torch.cat([x_sorted.flip(0).cumsum(0).flip(0), x_sorted.new_zeros(1)])  # sum from i on
    ends = torch.tensor(alive, device=device).cumsum(0)
    n_live = all_reduce_(torch.tensor(alive, dtype=torch.long, device=device), group)
    sizes = torch.tensor([p.numel() for p in proxies], device=device)
    total_live = int(n_live.sum())
    if keep >= total_live:  # every live weight, then dead slots in flat order (they tie at the bottom)
        dead = sizes - n_live
        extra = (keep - total_live - (dead.cumsum(0) - dead)).clamp_min(0).minimum(dead)
        return (n_live + extra).tolist()

    def counts(tau: Tensor) -> Tensor:
        """[B, L] count of live LAMP scores >= tau[b] per layer (31 all-reduces)."""
        b = tau.numel()
        lo = torch.zeros(b, n_layers, dtype=torch.long, device=device)
        hi = torch.full((b, n_layers), 0x7F800000, dtype=torch.long, device=device)  # +inf: T = 0, holds
        c_hi = torch.zeros(b, n_layers, dtype=torch.double, device=device)
        lid = torch.arange(n_layers, device=device).expand(b, -1)
        for _ in range(31):
            mid = (lo + hi) // 2
            idx = torch.searchsorted(sort_keys, lid * 2**32 + mid)
            stats = torch.stack([(ends[lid] - idx).double(), suffix[idx] - suffix[ends[lid]]], -1)  # [B, L, 2]
            all_reduce_(stats, group)
            x = _key_to_float(mid).double()
            ok = (x / stats[..., 1].clamp_min(torch.finfo(torch.float32).tiny)).float() >= tau[:, None]
            lo, hi = torch.where(ok, lo, mid + 1), torch.where(ok, mid, hi)
            c_hi = torch.where(ok, stats[..., 0], c_hi)
        return c_hi.long()

    # Largest float32 tau in [0, 1] with at least `keep` scores >= tau (true at tau = 0), by a
    # search that tries OUTER candidates at once: the inner bisections share their all-reduces.
    lo, hi = 0, int(float_keys(torch.tensor(1.0)))
    while lo < hi:
        candidates = sorted({lo + -(-(hi - lo) * (i + 1) // (OUTER + 1)) for i in range(OUTER)})  # in (lo, hi]
        total = counts(_key_to_float(torch.tensor(candidates, device=device))).sum(1).tolist()
        lo = max([c for c, n in zip(candidates, total) if n >= keep], default=lo)
        hi = min([c - 1 for c, n in zip(candidates, total) if n < keep], default=hi)
    at, above = counts(_key_to_float(torch.tensor([lo, lo + 1], device=device)))
    ties = at - above
    missing = keep - int(above.sum())
    take = (missing - (ties.cumsum(0) - ties)).clamp_min(0).minimum(ties)  # ties go to earlier layers
    return (above + take).tolist()


def nm_local_ok(shape: torch.Size, shard_dim: int, world: int, m: int) -> bool:
    """Whether N:M groups along the inputs of rows ``shape`` never straddle a shard boundary."""
    if shard_dim == 0:
        return True
    if shard_dim != 1:
        return False
    chunk = math.ceil(shape[1] / world)
    return chunk >= shape[1] or (chunk * math.prod(shape[2:])) % m == 0


def sharded_rand(reference: Tensor, generator: torch.Generator) -> Tensor:
    """``torch.rand(reference.shape, generator)`` (CPU, the whole shape) laid out like ``reference``."""
    return scatter_like(reference, torch.rand(reference.shape, generator=generator))