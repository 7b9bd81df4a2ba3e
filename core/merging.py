"""Merge the weights of several checkpoints of one architecture into one state dict.

Methods (docs/merging.md has the papers and when to use which):

- ``uniform``: the mean of the states (a uniform "model soup", Wortsman et al. 2022).
- ``greedy``: the greedy soup of the same paper; needs a score, so ``greedy_soup`` runs it.
- ``model_stock``: Jang et al. 2024; per tensor, the mean of the fine-tuned states pulled
  towards the base by the angle between their task vectors ``w_i - w0``.
- ``wise_ft``: Wortsman et al. 2022; ``(1 - alpha) * base + alpha * fine_tuned``.
- ``task_arithmetic``: Ilharco et al. 2023; ``base + scale * sum_i (w_i - base)``.
- ``ties``: Yadav et al. 2023; trim each task vector, elect a sign per entry, average the
  entries that agree with it, ``base + scale * merged``.
- ``dare``: Yu et al. 2024; drop task-vector entries at random, rescale the rest, then
  task arithmetic.

Rules that hold for every method:

- Tensors are paired by name; every state (and the base) must hold the same keys, shapes and
  dtypes. Floating tensors are merged in float32 (float64 stays float64) and cast back.
  QAT quantizer state (``*.weight_quantizer.*``, ``*.input_quantizer.*``) is merged like weights.
- Integer and bool tensors (BatchNorm's ``num_batches_tracked``, QAT's counters and flags) and
  non-tensor entries are not averaged: they are taken from the first state.
- Sparsity masks (``<param>_mask`` bool buffers): each state's weight counts as zero where its
  own mask prunes; the merged mask is the intersection (default) or union of the states' masks,
  and every merged weight is multiplied by the merged mask of each of its names.
- Tied weights (names that share one storage in any state, or whose floating tensors are equal
  in every state: a tie a checkpoint writer copied apart) are merged once; every alias in the
  result is the same tensor object, so ``torch.save`` keeps the tie.

Example:
    >>> soup = merge([torch.load(p) for p in paths])                       # uniform soup
    >>> model = merge([ft], "wise_ft", base=pretrained, alpha=0.5)
    >>> soup, chosen = greedy_soup(states, score=lambda s: accuracy(s))
"""

from __future__ import annotations

import difflib
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .checkpoints import _identity
from .checks import check_choice, check_int, check_real

__all__ = ["METHODS", "check_arguments", "check_compatible", "greedy_soup", "merge"]

METHODS = ("uniform", "greedy", "model_stock", "wise_ft", "task_arithmetic", "ties", "dare")
# method -> (fewest fine-tuned states, most (None: any), needs a base)
_COUNTS = {"uniform": (2, None, False), "greedy": (2, None, False), "model_stock": (2, None, True),
           "wise_ft": (1, 1, True), "task_arithmetic": (1, None, True), "ties": (1, None, True), "dare": (1, None, True)}
MASK_RULES = ("intersection", "union")

Combine = Callable[[str, list[Tensor], "Tensor | None"], Tensor]  # (name, states' tensors, base's) -> merged


def check_arguments(method: str, num_states: int, has_base: bool, *, alpha: float = 0.5, scale: float = 1.0,
                    trim: float = 0.2, density: float = 0.5, seed: int = 0, masks: str = "intersection") -> None:
    """Raise a one-line ``ValueError`` unless ``merge`` can run ``method`` on these arguments.

    Args:
        method: one of ``METHODS``.
        num_states: how many states are merged (the base not counted).
        has_base: whether a base state is given.
        alpha, scale, trim, density, seed, masks: as for ``merge``.

    Example:
        >>> check_arguments("ties", 3, True, trim=0.8)
    """
    if method not in METHODS:
        close = difflib.get_close_matches(str(method), METHODS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"method={method!r} is unknown; {hint}methods: {', '.join(METHODS)}.")
    fewest, most, needs_base = _COUNTS[method]
    if num_states < fewest or (most is not None and num_states > most):
        need = f"exactly {most}" if most == fewest else f"at least {fewest}"
        raise ValueError(f"method={method!r} merges {need} fine-tuned state(s), got {num_states}; "
                         + ("pass the fine-tuned state and the base separately." if method == "wise_ft"
                            else "pass more states."))
    if needs_base and not has_base:
        raise ValueError(f"method={method!r} needs a base (the pre-trained state the task vectors start from); pass base=.")
    if has_base and not needs_base:
        raise ValueError(f"method={method!r} takes no base; drop it, or use 'task_arithmetic' to merge relative to a base.")
    check_real("alpha", alpha, low=0.0, high=1.0, fix="0 is the base, 1 the fine-tuned state")
    check_real("scale", scale, fix="1.0 adds the task vectors as they are")
    check_real("trim", trim, low=0.0, high=1.0, high_open=True, fix="it is the fraction of smallest task-vector "
               "entries reset; the TIES paper keeps the top 20%, i.e. trim=0.8")
    check_real("density", density, low=0.0, high=1.0, low_open=True, fix="it is the fraction of task-vector "
               "entries kept; e.g. 0.1 to 0.5")
    check_int("seed", seed)
    check_choice("masks", masks, MASK_RULES, fix="'intersection' keeps a weight only where every state keeps it")


def check_compatible(states: Sequence[Mapping[str, Any]], names: Sequence[str] | None = None) -> None:
    """Raise a one-line ``ValueError`` naming the state and key unless all states pair by name.

    Every state must hold the same keys, and each key a tensor of the same shape and dtype.

    Args:
        states: the state dicts (the base included, if any).
        names: a label per state for the message (e.g. checkpoint paths).

    Example:
        >>> check_compatible([a, b, base], names=["a.ckpt", "b.ckpt", "base.ckpt"])
    """
    names = _labels(states, names)
    first, label = states[0], names[0]
    for state, other in zip(states[1:], names[1:]):
        missing, extra = [k for k in first if k not in state], [k for k in state if k not in first]
        if missing or extra:
            key, where, there = (missing[0], label, other) if missing else (extra[0], other, label)
            raise ValueError(f"{there} lacks {key!r}, which {where} holds ({len(missing) + len(extra)} keys differ); "
                             "merge checkpoints of one architecture, trained with the same callbacks.")
        for key, a in first.items():
            b = state[key]
            if isinstance(a, Tensor) != isinstance(b, Tensor):
                raise ValueError(f"{other}: {key!r} is a {type(b).__name__}, a {type(a).__name__} in {label}; "
                                 "merge checkpoints of one architecture.")
            if isinstance(a, Tensor) and (a.shape != b.shape or a.dtype != b.dtype):
                raise ValueError(f"{other}: {key!r} is {b.dtype} {list(b.shape)}, {a.dtype} {list(a.shape)} in {label}; "
                                 "merge checkpoints of one architecture and precision.")


def _labels(states: Sequence[Mapping[str, Any]], names: Sequence[str] | None) -> list[str]:
    if isinstance(states, Mapping) or not len(states) or not all(isinstance(s, Mapping) for s in states):
        raise ValueError("states must be a non-empty list of state dicts (one per checkpoint), "
                         f"got {type(states).__name__}; wrap a single state dict in a list.")
    if names is None:
        return [f"state {i}" for i in range(len(states))]
    if len(names) != len(states):
        raise ValueError(f"names has {len(names)} labels for {len(states)} states; pass one label per state.")
    return [str(n) for n in names]


def merge(states: Sequence[Mapping[str, Tensor]], method: str = "uniform", base: Mapping[str, Tensor] | None = None,
          *, alpha: float = 0.5, scale: float = 1.0, trim: float = 0.2, density: float = 0.5, seed: int = 0,
          masks: str = "intersection", names: Sequence[str] | None = None) -> dict[str, Tensor]:
    """One merged state dict from several states of one architecture (see the module docstring).

    Args:
        states: the fine-tuned states (module state dicts), paired by key.
        method: one of ``METHODS`` except ``"greedy"`` (use ``greedy_soup``).
        base: the pre-trained state; required by model_stock, wise_ft, task_arithmetic, ties, dare.
        alpha: wise_ft's weight of the fine-tuned state, in [0, 1].
        scale: the factor of the merged task vector (task_arithmetic, ties, dare).
        trim: ties: the fraction of each task vector's smallest-magnitude entries reset to 0, in [0, 1).
        density: dare: the probability that a task-vector entry is kept, in (0, 1].
        seed: dare's random drop; each tensor draws from its own generator seeded by (seed, name).
        masks: the merged sparsity mask, "intersection" or "union" of the states' masks.
        names: a label per state for error messages (e.g. checkpoint paths).

    Example:
        >>> merged = merge([s1, s2, s3], "ties", base=pretrained, trim=0.8)
    """
    labels = _labels(states, names)
    check_arguments(method, len(states), base is not None, alpha=alpha, scale=scale, trim=trim, density=density,
                    seed=seed, masks=masks)
    if method == "greedy":
        raise ValueError("method='greedy' needs a score of each candidate soup; call greedy_soup(states, score).")
    with_base = [] if base is None else [base]
    check_compatible([*states, *with_base], [*labels, *(["the base"] if with_base else [])])
    combine: Combine = {
        "uniform": _mean,
        "model_stock": _model_stock,
        "wise_ft": lambda _, ws, w0: torch.lerp(w0, ws[0], alpha),
        "task_arithmetic": lambda _, ws, w0: w0 + scale * sum(w - w0 for w in ws),
        "ties": lambda _, ws, w0: w0 + scale * _ties_vector([w - w0 for w in ws], trim),
        "dare": lambda name, ws, w0: w0 + scale * _dare_sum(name, [w - w0 for w in ws], density, seed),
    }[method]
    return _merge_with(states, base, combine, masks)


def greedy_soup(states: Sequence[Mapping[str, Tensor]], score: Callable[[dict[str, Tensor]], float],
                higher_is_better: bool = True, names: Sequence[str] | None = None, *,
                masks: str = "intersection") -> tuple[dict[str, Tensor], list[int]]:
    """The greedy soup (Wortsman et al. 2022): add ingredients best first while the soup does not get worse.

    ``score`` is called once per ingredient, in the given order, then once per candidate soup
    (the uniform soup of the chosen ingredients plus the next one by rank). A candidate joins
    when its score is at least as good as the soup's so far; a NaN score never counts as good.

    Args:
        states: the ingredients (module state dicts of one architecture), at least 2.
        score: the quality of a state dict (e.g. validation accuracy).
        higher_is_better: False for losses.
        names: a label per state for error messages.
        masks: the soups' sparsity masks, as for ``merge``.

    Returns:
        The soup and the indices of its ingredients, in the order they were added.

    Example:
        >>> soup, chosen = greedy_soup(states, lambda s: validate(s)["val_acc"])
    """
    labels = _labels(states, names)
    check_arguments("greedy", len(states), False, masks=masks)
    check_compatible(states, labels)
    sign = 1.0 if higher_is_better else -1.0
    key = [sign * float(score(dict(s))) for s in states]  # larger is better; NaN below everything
    rank = sorted(range(len(states)), key=lambda i: (not math.isnan(key[i]), key[i]), reverse=True)
    chosen, best = [rank[0]], key[rank[0]]
    soup = _merge_with([states[rank[0]]], None, _mean, masks)
    for i in rank[1:]:
        candidate = _merge_with([states[j] for j in (*chosen, i)], None, _mean, masks)
        value = sign * float(score(candidate))
        if value >= best or (math.isnan(best) and not math.isnan(value)):
            chosen, best, soup = [*chosen, i], value, candidate
    return soup, chosen


def _tie_groups(states: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """Names that are one tensor in any state (or equal in all), in groups; sorted, so the first name is stable."""
    parent = {k: k for k in states[0]}

    def root(k: str) -> str:
        while parent[k] != k:
            k = parent[k]
        return k

    for state in states:
        seen: dict[tuple, str] = {}
        for k, v in state.items():
            if isinstance(v, Tensor) and v.numel() > 0:  # empty tensors all share data_ptr 0
                other = seen.setdefault(_identity(v), k)
                parent[root(k)] = root(other)
    # A tie that a writer copied apart (one clone per name) shows as equal values in every state:
    # merge it once too, so that DARE's random drop cannot tell the copies apart.
    buckets: dict[tuple, list[str]] = {}
    for k, v in states[0].items():
        if isinstance(v, Tensor) and v.is_floating_point() and v.numel() > 1 and root(k) == k:
            buckets.setdefault((v.dtype, tuple(v.shape), float(v.double().sum())), []).append(k)
    for names in buckets.values():
        for i, k in enumerate(names[1:], 1):
            other = next((j for j in names[:i] if all(torch.equal(s[j], s[k]) for s in states)), None)
            if other is not None:
                parent[root(k)] = root(other)
    groups: dict[str, list[str]] = {}
    for k in parent:
        groups.setdefault(root(k), []).append(k)
    return [sorted(g) for g in groups.values()]


def _merge_with(states: Sequence[Mapping[str, Any]], base: Mapping[str, Any] | None, combine: Combine,
                masks: str) -> dict[str, Any]:
    """Merge group by group: masks first (weights need them), then floating tensors, the rest from states[0]."""
    first = states[0]
    groups = _tie_groups([*states, *([base] if base is not None else [])])
    is_mask = {k for k in first if k.endswith("_mask") and k[: -len("_mask")] in first
               and isinstance(first[k], Tensor) and first[k].dtype == torch.bool}
    out: dict[str, Any] = {}
    for group in sorted(groups, key=lambda g: g[0] not in is_mask):  # mask groups first
        head, value = group[0], first[group[0]]
        if head in is_mask:
            stacked = torch.stack([s[head] for s in states])  # [k, *shape]
            value = stacked.all(0) if masks == "intersection" else stacked.any(0)
        elif isinstance(value, Tensor) and value.is_floating_point():
            dtype = torch.promote_types(value.dtype, torch.float32)
            own = [_masked(s[head].to(dtype), group, s) for s in states]  # the weights each state computes with
            w0 = None if base is None else _masked(base[head].to(dtype), group, base)
            value = _masked(combine(head, own, w0), group, out).to(value.dtype)  # on the merged masks
        elif isinstance(value, Tensor):
            value = value.clone()  # integer / bool buffers are counters and flags: not averaged
        for k in group:
            out[k] = value  # one object for every alias
    return {k: out[k] for k in first}


def _masked(value: Tensor, group: list[str], masks: Mapping[str, Any]) -> Tensor:
    """``value`` set to zero wherever the mask in ``masks`` of any of the group's names prunes."""
    for k in group:
        mask = masks.get(k + "_mask")
        if isinstance(mask, Tensor) and mask.dtype == torch.bool:
            value = value * mask
    return value


def _mean(_: str, ws: list[Tensor], w0: Tensor | None) -> Tensor:
    return torch.stack(ws).mean(0)  # [k, *shape] -> [*shape]


def _model_stock(_: str, ws: list[Tensor], w0: Tensor | None) -> Tensor:
    """Jang et al. 2024, eq. for t: the mean cosine between task vectors sets how far from w0 to go."""
    assert w0 is not None
    k = len(ws)
    tau = torch.stack([(w - w0).flatten() for w in ws])  # [k, n]
    unit = tau / tau.norm(dim=1, keepdim=True).clamp_min(1e-12)  # a zero task vector has cosine 0
    gram = unit @ unit.T  # [k, k] pairwise cosines
    cos = ((gram.sum() - gram.diagonal().sum()) / (k * (k - 1))).clamp(0.0, 1.0)  # apart or orthogonal: the base
    t = k * cos / (1 + (k - 1) * cos)
    return torch.lerp(w0, torch.stack(ws).mean(0), t)


def _ties_vector(taus: list[Tensor], trim: float) -> Tensor:
    """Yadav et al. 2023: trim each task vector, elect the sign of the summed trimmed vectors,
    average the surviving entries that agree with it (zero where none does)."""
    trimmed = torch.stack([_trim(t, trim) for t in taus])  # [k, *shape]
    elected = torch.sign(trimmed.sum(0))  # [*shape]
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)  # [k, *shape]
    return (trimmed * agree).sum(0) / agree.sum(0).clamp_min(1)


def _trim(tau: Tensor, trim: float) -> Tensor:
    """``tau`` with its floor(trim * n) smallest-magnitude entries set to 0 (ties broken by position)."""
    n = tau.numel()
    reset = int(trim * n)
    if reset == 0:
        return tau
    order = torch.sort(tau.abs().flatten(), stable=True).indices  # ascending magnitude
    keep = torch.ones(n, dtype=torch.bool, device=tau.device)
    keep[order[:reset]] = False
    return tau * keep.view(tau.shape)


def _dare_sum(name: str, taus: list[Tensor], density: float, seed: int) -> Tensor:
    """Yu et al. 2024: keep each entry with probability ``density``, scale kept ones by 1 / density, sum."""
    if density == 1.0:
        return sum(taus)
    # One generator per tensor name: the draws do not depend on the order of the state dict.
    generator = torch.Generator().manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) % 2**63)
    total = torch.zeros_like(taus[0])
    for tau in taus:
        keep = torch.rand(tau.shape, generator=generator) < density  # drawn on the CPU: same on any device
        total += tau * keep.to(tau.device) / density
    return total
