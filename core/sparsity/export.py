"""Export a masked model: squash the masks into plain weights, optionally as sparse tensors.

Masks are bool ``<param>_mask`` buffers (see ``engine.py``); squashing works on any module
that carries them, e.g. one freshly loaded from a checkpoint, without the engine.

Example:
    >>> report = export_sparse_(model)                 # plain dense module, report of non-zeros
    >>> report = export_sparse_(model, layout="csr")   # weights become CSR tensors (inference)
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

__all__ = ["export_sparse_"]


@torch.no_grad()
def export_sparse_(model: nn.Module, layout: Literal["dense", "csr", "semi_structured"] = "dense") -> dict[str, dict]:
    """Apply and remove every ``<param>_mask`` buffer; returns per-layer shape / non-zeros / density.

    Args:
        model: a module with mask buffers (modified in place).
        layout: "dense" keeps ordinary weights; "csr" turns 2-D masked weights into
            ``torch.sparse_csr`` tensors (worth it on CPU at high sparsity); "semi_structured"
            uses ``torch.sparse.to_sparse_semi_structured`` for 2:4 weights (CUDA only).
    """
    if layout not in ("dense", "csr", "semi_structured"):
        raise ValueError(f"layout={layout!r} must be 'dense', 'csr' or 'semi_structured'.")
    if layout == "semi_structured" and not torch.cuda.is_available():
        raise ValueError("layout='semi_structured' needs a CUDA device (2:4 kernels); use 'dense' or 'csr' on CPU.")
    report: dict[str, dict] = {}
    done: dict[int, nn.Parameter | None] = {}  # a tied weight carries one mask under every alias
    for owner_name, owner in list(model.named_modules()):
        for key in [k for k, b in owner._buffers.items() if k.endswith("_mask") and b is not None and b.dtype == torch.bool]:
            leaf = key[: -len("_mask")]
            param = getattr(owner, leaf)
            mask = owner._buffers.pop(key)
            if id(param) in done:  # an alias: apply nothing twice, keep it tied to the new tensor
                if done[id(param)] is not None:
                    setattr(owner, leaf, done[id(param)])
                continue
            param.mul_(mask)
            done[id(param)] = None
            name = f"{owner_name}.{leaf}" if owner_name else leaf
            nnz = int(param.count_nonzero())
            report[name] = {"shape": tuple(param.shape), "nonzeros": nnz, "density": nnz / param.numel()}
            if layout != "dense" and param.dim() == 2:
                sparse = param.detach().to_sparse_csr() if layout == "csr" else torch.sparse.to_sparse_semi_structured(param.detach())
                done[id(param)] = nn.Parameter(sparse, requires_grad=False)
                setattr(owner, leaf, done[id(param)])
                report[name]["layout"] = layout
    if not report:
        raise ValueError("the model carries no `<param>_mask` buffers: nothing to export.")
    return report
