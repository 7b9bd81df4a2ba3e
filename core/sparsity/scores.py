"""Importance scores for pruning: magnitude, activation-aware (Wanda), gradient (|w * g|).

Wanda (Sun et al., 2024) scores ``|W_ij| * ||X_j||_2`` with ``X_j`` the j-th input feature
of the layer over the data seen. :class:`InputNorms` collects the squared input norms with
forward pre-hooks that are attached only around pruning events, so ordinary steps pay
nothing. A compiled forward would skip hooks added after it was compiled (dynamo does not
guard on hooks: the norms would silently stay empty), so compiled code runs eagerly while
the norms are collected (torch >= 2.6): one eager step per event, no recompile.

Example:
    >>> with InputNorms(modules) as norms:   # modules: {param name: owning nn.Module}
    ...     model(x)
    >>> scores = {n: wanda_score(p, norms.norms()[n]) for n, p in params.items()}
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..compile import force_eager
from ..distributed import is_sharded, like, local, shard_dim, shard_span
from ..layers import layer_kind

__all__ = ["InputNorms", "gradient_score", "magnitude_score", "wanda_score"]


def magnitude_score(weight: Tensor) -> Tensor:
    return weight.detach().abs()


def gradient_score(weight: Tensor) -> Tensor:
    """``|w * dL/dw|``: first-order estimate of the loss change from removing w."""
    if weight.grad is None:
        raise ValueError("gradient scores need gradients: prune where .grad is populated (before the optimizer step).")
    return (weight.detach() * weight.grad).abs()


def wanda_score(weight: Tensor, input_sq_norm: Tensor, groups: int = 1) -> Tensor:
    """``|W| * ||X_j||`` for ``weight`` as rows ``[out, in / groups, ...]`` (``layers.as_rows``).

    ``input_sq_norm`` holds one squared norm per input feature ``[in]``; with ``groups`` > 1
    (grouped and depthwise convolutions) output row o sees only its group's inputs.

    A DTensor weight (Shard(0) rows, or Shard(1) for a Conv1D rows view) with the whole
    ``input_sq_norm`` (summed over ranks) gives the same scores laid out alike, locally.
    """
    if is_sharded(weight):
        dim, (start, length) = shard_dim(weight), shard_span(weight)
        norm = input_sq_norm.sqrt().to(weight.dtype).view(groups, -1)  # [groups, in / groups]
        w = local(weight).detach().abs()
        if norm.shape[1] != weight.shape[1]:
            raise ValueError(f"wanda: {norm.shape[1]} input features per group but the weight has {weight.shape[1]} "
                             "inputs per output: pass the weight as rows [out, in, ...] and the layer's groups.")
        if dim == 0:  # output row o belongs to group o // (out / groups)
            group_of_row = torch.arange(start, start + length, device=norm.device) // (weight.shape[0] // groups)
            cols = norm[group_of_row]  # [rows here, in / groups]
        elif dim == 1 and groups == 1:  # inputs split: this rank's inputs
            cols = norm[:, start:start + length].expand(w.shape[0], -1)
        else:
            raise ValueError(f"wanda: weight sharded along dim {dim} with groups={groups} is not supported.")
        return like(weight, w * cols.view(*cols.shape, *[1] * (w.dim() - 2)))
    norm = input_sq_norm.sqrt().to(weight.dtype)
    w = weight.detach().abs()
    per_group = norm.view(groups, -1)  # [groups, in / groups]
    if per_group.shape[1] != w.shape[1]:
        raise ValueError(f"wanda: {per_group.shape[1]} input features per group but the weight has {w.shape[1]} "
                         "inputs per output: pass the weight as rows [out, in, ...] and the layer's groups.")
    cols = per_group.repeat_interleave(w.shape[0] // groups, dim=0)  # [out, in / groups]
    return w * cols.view(*cols.shape, *[1] * (w.dim() - 2))


class InputNorms:
    """Accumulates per-input-feature squared L2 norms of the inputs of selected modules.

    Args:
        modules: module by parameter name; where each keeps its input features comes from its
            layer kind (``lichtenberg.core.layers``); index inputs (Embedding) are skipped.
    """

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.sums: dict[str, Tensor] = {}
        self._handles: list = []

    def _hook(self, name: str):
        found = layer_kind(self.modules[name])
        features = -1 if found is None else found[0].features

        def hook(module: nn.Module, args: tuple) -> None:
            if features is None:  # inputs are ids: every "feature" is one row
                return
            x = args[0].detach().float()
            sq = x.pow(2).movedim(features, -1).reshape(-1, x.shape[features]).sum(0)  # [in_features]
            self.sums[name] = self.sums[name] + sq if name in self.sums else sq
        return hook

    def __enter__(self) -> InputNorms:
        self.sums = {}
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.modules.items()]
        self._eager = force_eager()  # compiled forwards would not run the hooks
        self._eager.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        eager, self._eager = getattr(self, "_eager", None), None
        if eager is not None:
            eager.__exit__(None, None, None)

    def norms(self) -> dict[str, Tensor]:
        """Squared input norms seen so far, per parameter name."""
        return dict(self.sums)

