"""SR-STE (Zhou et al., ICLR 2021): N:M sparse training with a dense latent weight.

The forward and backward passes see the N:M-sparse weight; the optimizer steps the dense
latent weight with the sparse-forward gradient (straight-through) plus a decay
``decay * (1 - M) * W`` that pulls pruned latent weights towards zero, so the mask, recomputed
from |W| after every step, settles instead of flipping back and forth.

The parameter itself holds the sparse weight between steps (what validation, checkpoints and
export see); the dense latent weight lives here and is restored only around the optimizer
step. Cost: one extra float copy of the target weights and one N:M selection per step.
Gradients of pruned slots flow to the latent weight by design (straight-through), but a
non-finite one (an overflowing fp16 loss scale) is dropped there: it would poison the latent
weight for good.

Example:
    >>> srste = SRSTE(engine, n=2, m=4, decay=2e-4)
    >>> ...  # backward on the sparse weight
    >>> srste.before_step_(); optimizer.step(); srste.after_step_()
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..distributed import local
from .engine import MaskEngine
from .masks import nm_mask

__all__ = ["SRSTE"]


class SRSTE:
    """Dense latent weights and per-step N:M masks for the parameters of ``engine``.

    Args:
        engine: the mask engine holding the target parameters and their masks.
        n: weights kept in every group.
        m: group size along the input dimension(s).
        decay: lambda of the sparse-refined term; the paper uses 2e-4.
    """

    def __init__(self, engine: MaskEngine, n: int, m: int, decay: float,
                 latent: dict[str, Tensor] | None = None) -> None:
        self.engine, self.n, self.m, self.decay = engine, n, m, decay
        # where the latent weights live: given tensors (FSDP2: DTensor buffers that the distributed
        # checkpoint shards), else copies made at the first step
        self.latent: dict[str, Tensor] = dict(latent or {})
        self.started = False

    @torch.no_grad()
    def before_step_(self) -> None:
        """Put the dense latent weights back and add the decay on pruned slots to their gradients."""
        params, masks = self.engine.params, self.engine.masks
        if not self.started:  # first step: the parameters are still dense
            if self.latent:
                for name, p in params.items():
                    local(self.latent[name]).copy_(local(p.detach()))
            else:
                self.latent = {n: p.detach().clone() for n, p in params.items()}
            self.started = True
            for name, p in params.items():
                local(masks[name]).copy_(local(self._nm(name, p)))
        else:  # shard-local throughout (DTensor shards under FSDP2; the tensors themselves otherwise)
            names = list(params)
            torch._foreach_copy_([local(params[n].detach()) for n in names], [local(self.latent[n]) for n in names])
        for name, p in params.items():
            if p.grad is not None:  # pruned slots: finite gradient + decay * W (one pass)
                grad = local(p.grad)
                pruned = torch.nan_to_num(grad, 0.0, 0.0, 0.0).add_(local(p.detach()), alpha=self.decay)
                grad.copy_(torch.where(local(masks[name]), grad, pruned))

    @torch.no_grad()
    def after_step_(self) -> None:
        """Keep the stepped dense weights as latent, recompute the N:M masks, sparsify the parameters."""
        if not self.started:  # a step before SR-STE started
            return
        for name, p in self.engine.params.items():
            local(self.latent[name]).copy_(local(p.detach()))
            local(self.engine.masks[name]).copy_(local(self._nm(name, p)))
        self.engine.apply_()

    def _nm(self, name: str, weight: Tensor) -> Tensor:
        """The N:M mask of ``weight``'s magnitudes, grouped along its inputs."""
        rows = self.engine.rows(name, weight.detach().abs())
        return self.engine.from_rows(name, nm_mask(rows, self.n, self.m))

    def state_dict(self) -> dict[str, Tensor]:
        """The latent weights once started (empty before)."""
        return dict(self.latent) if self.started else {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore latent weights saved by :meth:`state_dict` (whole tensors; DTensor buffers are
        restored with the model instead, see ``started``)."""
        if state:
            self.latent = {n: t.to(self.engine.params[n].device).clone() for n, t in state.items()}
            self.started = True
