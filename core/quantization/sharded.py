"""Quantizers on an FSDP2-sharded model: replicated learned scales, averaged once per step.

Under FSDP2 (``fully_shard``, Lightning's ``ModelParallelStrategy``) the layers are sharded
before the fake-quant swap can see them (``configure_model`` shards, and layers built there
exist only afterwards), so the quantizer submodules that ``prepare_`` attaches are not
managed by FSDP2: nothing all-gathers, reduce-scatters or averages them. The design:

- **The weight is quantized whole.** ``prepare_`` subclasses FSDP2's ``FSDP<Name>`` class
  (hooks and methods kept); its pre-forward hook has all-gathered the weight, so the
  quantizer sees the unsharded ``[out, in, ...]`` rows, exactly as under DDP, and
  per-channel scales need no row bookkeeping for uneven shards.
- **Learned scales are replicated, not sharded.** They are tiny (one per output channel
  or group) and used whole in every forward: sharding them would add an all-gather per
  layer per forward for no memory gain. ``replicate_quantizers_`` turns every quantizer
  Parameter into a ``Replicate()`` DTensor on the weight's mesh (and device): an optimizer
  (foreach or not), gradient clipping and torch.distributed.checkpoint then see one kind
  of tensor; plain tensors mixed with DTensors make foreach optimizers and
  ``clip_grad_norm_`` fail. The quantizers read them through ``to_local()``, whose backward
  leaves each rank's own gradient (from its own batch) in ``param.grad``.
- **Their gradients are averaged by us.** ``average_gradients_`` all-reduces all of them
  as one flat buffer and divides by the world size, once per optimizer step before the
  step (and before clipping): DDP's average, so FSDP2 and DDP runs agree to float
  tolerance, and every rank applies the same update, so scales never diverge.
- **Everything else stays plain and identical on every rank**: initial scales come from
  the whole weight or from all-reduced batch statistics, and tracking buffers
  (``initialized``, levels, oscillation) are computed from the whole weight. A checkpoint
  holds them once (DCP de-duplicates replicated tensors) and every rank loads the same.

Preparing *before* ``fully_shard`` (so that FSDP2 shards the scales) was rejected: LSQ and
PACT initialise their scales inside the first quantized forward, where FSDP2's unsharded
parameters are temporary buffers (writes are lost at reshard), and layers built inside
``configure_model`` would need this path anyway.

Example:
    >>> params = replicate_quantizers_(quant_modules(model))   # after prepare_, under FSDP2
    >>> loss.backward(); average_gradients_(params); optimizer.step()
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate

from ..distributed import check_layout, local

__all__ = ["average_gradients_", "replicate_quantizers_"]


def replicate_quantizers_(layers: dict[str, nn.Module]) -> list[nn.Parameter]:
    """Make the quantizer Parameters of every fake-quant layer whose weight is an FSDP2 shard
    ``Replicate()`` DTensors on the weight's mesh, on its device; returns them (each once,
    tied layers share a quantizer). Layers with whole weights are left alone (empty list)."""
    replicated: dict[int, nn.Parameter] = {}
    for name, module in layers.items():
        weight = module.weight
        if not isinstance(weight, DTensor):
            continue
        check_layout(f"{name}.weight", weight)
        for part in ("weight_quantizer", "input_quantizer"):
            quantizer = getattr(module, part, None)
            if quantizer is None:
                continue
            quantizer.to(local(weight).device)  # FSDP2 does not move modules it does not manage
            for owner in quantizer.modules():
                for key, param in list(owner._parameters.items()):
                    if param is None or id(param) in replicated:
                        continue
                    if not isinstance(param, DTensor):
                        value = DTensor.from_local(param.detach(), weight.device_mesh, [Replicate()], run_check=False)
                        param = nn.Parameter(value, requires_grad=param.requires_grad)
                        owner._parameters[key] = param
                    replicated[id(param)] = param
    return list(replicated.values())


@torch.no_grad()
def average_gradients_(params: list[nn.Parameter]) -> None:
    """Average the gradients of replicated DTensor Parameters over their mesh, in place: one
    all-reduce of one flat buffer (DDP's average; call once per optimizer step, before it).
    A Parameter without a gradient counts as zero and keeps none. The average is linear and
    leaves equal values equal, so calling it once per optimizer step when several optimizers
    step on one backward (or after more backward passes) still gives DDP's average."""
    if not params:
        return
    group = params[0].device_mesh.get_group(0)
    world = dist.get_world_size(group)
    if world == 1:
        return
    grads = [None if p.grad is None else local(p.grad) for p in params]
    flat = torch.cat([torch.zeros(local(p).numel(), device=local(p).device, dtype=local(p).dtype) if g is None
                      else g.reshape(-1) for p, g in zip(params, grads)])
    dist.all_reduce(flat, group=group)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        n = local(p).numel()
        if g is not None:
            g.copy_(flat[offset:offset + n].view_as(g))
        offset += n
