"""Importance scores for pruning: magnitude, activation-aware (Wanda), gradient (|w * g|).

Wanda (Sun et al., 2024) scores ``|W_ij| * ||X_j||_2`` with ``X_j`` the j-th input feature
of the layer over the data seen. :class:`InputNorms` collects the squared input norms with
forward pre-hooks that are attached only around pruning events, so ordinary steps pay
nothing.

Example:
    >>> with InputNorms(modules) as norms:   # modules: {param name: owning nn.Module}
    ...     model(x)
    >>> scores = {n: wanda_score(p, norms.norms()[n]) for n, p in params.items()}
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["InputNorms", "gradient_score", "magnitude_score", "wanda_score"]


def magnitude_score(weight: Tensor) -> Tensor:
    return weight.detach().abs()


def gradient_score(weight: Tensor) -> Tensor:
    """``|w * dL/dw|``: first-order estimate of the loss change from removing w."""
    if weight.grad is None:
        raise ValueError("gradient scores need gradients: prune where .grad is populated (before the optimizer step).")
    return (weight.detach() * weight.grad).abs()


def wanda_score(weight: Tensor, input_sq_norm: Tensor) -> Tensor:
    """``|W| * ||X_j||`` broadcast over the input dimension (dim 1 of Linear and Conv weights)."""
    norm = input_sq_norm.sqrt().to(weight.dtype)
    shape = [1, -1] + [1] * (weight.dim() - 2)  # [1, in, 1, 1] for conv
    return weight.detach().abs() * norm.view(shape)


class InputNorms:
    """Accumulates per-input-feature squared L2 norms of the inputs of selected modules.

    Args:
        modules: module by parameter name (Linear, Conv1d/2d, Embedding are understood).
    """

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.sums: dict[str, Tensor] = {}
        self._handles: list = []

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            if isinstance(module, nn.Embedding):  # inputs are ids: every "feature" is one row
                return
            if isinstance(module, (nn.Conv1d, nn.Conv2d)):
                sq = x.float().pow(2).transpose(0, 1).reshape(x.shape[1], -1).sum(1)  # [in_channels]
            else:
                sq = x.float().pow(2).reshape(-1, x.shape[-1]).sum(0)  # [in_features]
            self.sums[name] = self.sums[name] + sq if name in self.sums else sq
        return hook

    def __enter__(self) -> InputNorms:
        self.sums = {}
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def norms(self) -> dict[str, Tensor]:
        """Squared input norms seen so far, per parameter name."""
        return dict(self.sums)
