"""Export a masked model: squash the masks into plain weights, optionally as sparse tensors.

Masks are bool ``<param>_mask`` buffers (see ``engine.py``); squashing works on any module
that carries them, e.g. one freshly loaded from a checkpoint, without the engine.

Sharded (FSDP2) modules squash shard-local; their non-zero counts cost one all-reduce in all.
Sparse layouts need whole weights: export a gathered copy of a sharded model for those.

Example:
    >>> report = export_sparse_(model)                 # plain dense module, report of non-zeros
    >>> report = export_sparse_(model, layout="csr")   # weights become CSR tensors (inference)
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..distributed import is_sharded, like, local
from .engine import global_sums, masked_bits_

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
    sharded = [n for n, p in model.named_parameters() if is_sharded(p)]
    if layout != "dense" and sharded:  # checked before anything is squashed
        raise ValueError(f"layout={layout!r} needs whole weights but {sharded[0]} is a DTensor shard (FSDP2): export "
                         "with layout='dense', or gather the model first (a full state dict into a plain module).")
    report: dict[str, dict] = {}
    nonzero: dict[str, torch.Tensor] = {}
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
            masked_bits_([param.detach()], [mask])  # shard-local, NaN-safe
            done[id(param)] = None
            name = f"{owner_name}.{leaf}" if owner_name else leaf
            nonzero[name] = like(param, local(param.detach()) != 0)
            report[name] = {"shape": tuple(param.shape)}
            if layout != "dense" and param.dim() == 2:
                sparse = param.detach().to_sparse_csr() if layout == "csr" else torch.sparse.to_sparse_semi_structured(param.detach())
                done[id(param)] = nn.Parameter(sparse, requires_grad=False)
                setattr(owner, leaf, done[id(param)])
                report[name]["layout"] = layout
    if not report:
        raise ValueError("the model carries no `<param>_mask` buffers: nothing to export.")
    for (name, flags), nnz in zip(nonzero.items(), global_sums(list(nonzero.values()))):
        report[name].update(nonzeros=nnz, density=nnz / flags.numel())
    return report
