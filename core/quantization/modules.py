"""Fake-quant layers and the prepare / unprepare pair that swaps them in and out.

``prepare_`` changes the class of each target layer in place to its fake-quant subclass and
attaches quantizer submodules. The module object, its Parameters, hooks and any other
reference to it stay the same: tied weights stay one tensor, an optimizer built before or
after still holds the right parameters, and nothing is copied. ``unprepare_`` restores the
class and removes the quantizers (``fold=True`` first writes the fake-quantized weights into
the latent ones).

Which layers can be swapped, and how their forward runs with a quantized weight, comes from
the layer-kind table (``lichtenberg.core.layers``): ``nn.Linear``, ``nn.Conv1d/2d/3d``,
``nn.Embedding`` and Hugging Face's ``Conv1D``. Quantizers always see the weight as rows
``[out, in, ...]``, so per-channel scales are per output feature whatever the layout. Only
exact classes are swapped: a user subclass has its own forward, which a swap would silently
replace, so it is reported instead; FSDP2's ``FSDP<Name>`` wrapper classes define no
forward and are swapped like the layer they wrap (see ``.sharded``). A weight with a
``weight_mask`` buffer (set by the sparsity callbacks, under every alias of a tied weight)
is multiplied by it after quantization: the mask applies to the latent float weight and
pruned weights quantize to exactly zero on every grid.

Example:
    >>> report = prepare_({"fc": model.fc}, lambda m, kind: WeightQuantizer(as_rows(m.weight, kind).shape, 8, "lsq"),
    ...                   lambda m: ActivationQuantizer(8))
    >>> unprepare_(model, fold=True)
"""

from __future__ import annotations

from collections.abc import Callable
import torch
from torch import Tensor, nn

from ..distributed import full, local, scatter_like
from ..layers import KINDS, LayerKind, as_rows, from_rows, layer_kind

__all__ = ["QUANT_CLASSES", "QuantConv1d", "QuantConv2d", "QuantEmbedding", "QuantLinear", "prepare_", "quant_modules",
           "unprepare_"]


class _Quant:
    """Shared by the fake-quant layers: quantized weight (then masked) and input."""

    weight: nn.Parameter
    weight_quantizer: nn.Module
    input_quantizer: nn.Module | None
    target_name: str

    def quantized_rows(self) -> Tensor:
        """The fake-quantized (and masked) weight as rows ``[out, in, ...]``.

        Inside an FSDP2 forward the weight is already whole; outside it (exports, folds) a
        sharded weight is all-gathered here, a collective every rank must join.
        """
        kind = KINDS[self.target_name]
        weight = full(self.weight)
        # Scales stay float32 when FSDP2's MixedPrecisionPolicy casts the weight (bf16): keep its dtype.
        w = self.weight_quantizer(as_rows(weight, kind)).to(weight.dtype)
        mask = getattr(self, "weight_mask", None)  # a Shard(0) buffer under FSDP2: gathered like the weight
        # where, not w * mask: a float times a bool mask is ~6x slower on CPU; pruned slots are +0 either way
        return torch.where(as_rows(full(mask), kind), w, 0.0) if mask is not None else w

    def quantized_weight(self) -> Tensor:
        """The fake-quantized (and masked) weight in the layer's own layout."""
        return from_rows(self.quantized_rows(), KINDS[self.target_name])

    def quantized_input(self, x: Tensor) -> Tensor:
        return self.input_quantizer(x).to(x.dtype) if self.input_quantizer is not None else x

    def forward(self, x: Tensor) -> Tensor:
        return KINDS[self.target_name].forward(self, self.quantized_input(x), self.quantized_rows())


_QUANT: dict[type, type] = {}

try:  # torch >= 2.6; older releases keep FSDP2 under _composable
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover
    try:
        from torch.distributed._composable.fsdp import FSDPModule
    except ImportError:
        FSDPModule = None


def _fsdp_original(cls: type) -> type | None:
    """The class FSDP2's ``fully_shard`` wrapped when ``cls`` is its ``FSDP<Name>`` (or a subclass
    of one, e.g. ours); None for any other class."""
    if FSDPModule is None or not issubclass(cls, FSDPModule) or cls is FSDPModule:
        return None
    return cls.__mro__[cls._orig_cls_mro_index]


def swappable_kind(module: nn.Module) -> tuple[LayerKind, bool] | None:
    """``layer_kind(module)``, seeing through FSDP2's wrapper class: ``fully_shard`` turns a
    ``Linear`` into an ``FSDPLinear`` (FSDPModule, Linear) that adds hooks and methods but no
    forward, so it is swapped like the ``Linear`` it wraps (the swap subclasses the
    ``FSDPLinear``, which keeps its behaviour)."""
    found = layer_kind(module)
    original = _fsdp_original(type(module))
    if found is None or found[1] or original is None:
        return found
    return found[0], layer_kind(object.__new__(original))[1]  # layer_kind reads only the type


def quant_class(plain: type, kind: LayerKind) -> type:
    """The fake-quant subclass of ``plain`` (created once, named ``Quant<Name>`` in this module)."""
    cls = _QUANT.get(plain)
    if cls is None:
        body = {"target_name": kind.name, "forward": _Quant.forward, "__module__": __name__,
                "__doc__": f"{plain.__name__} with a fake-quantized weight and input (see ``prepare_``)."}
        if _fsdp_original(plain) is not None:  # FSDPModule.__new__ finds the original class by MRO index
            body["_orig_cls_mro_index"] = plain._orig_cls_mro_index + 1
        cls = type(f"Quant{plain.__name__}", (plain, _Quant), body)
        globals().setdefault(cls.__name__, cls)  # picklable by name in this process
        _QUANT[plain] = cls
    return cls


QuantLinear = quant_class(nn.Linear, KINDS["Linear"])
QuantConv1d = quant_class(nn.Conv1d, KINDS["Conv1d"])
QuantConv2d = quant_class(nn.Conv2d, KINDS["Conv2d"])
QuantEmbedding = quant_class(nn.Embedding, KINDS["Embedding"])
QUANT_CLASSES: dict[type, type] = {nn.Linear: QuantLinear, nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d,
                                   nn.Embedding: QuantEmbedding}


def prepare_(
    modules: dict[str, nn.Module],
    weight_quantizer: Callable[[nn.Module, LayerKind], nn.Module],
    input_quantizer: Callable[[nn.Module], nn.Module | None],
) -> dict[str, str]:
    """Swap each module in place for its fake-quant class; returns {name: why not} for the rest.

    Modules that share one weight Parameter (tied embedding and output head) share one
    weight quantizer, so the tied weight has one grid. Modules already swapped are kept.
    """
    skipped: dict[str, str] = {}
    by_weight: dict[int, nn.Module] = {}
    for name, module in modules.items():
        if isinstance(module, _Quant):
            by_weight.setdefault(id(module.weight), module.weight_quantizer)
            continue
        found = swappable_kind(module)
        if found is None or not found[1] or found[0].forward is None:
            what = "no known layer kind" if found is None else (
                f"a subclass keeps its own forward (a {found[0].name} swap would replace it)" if not found[1] else "no fake-quant forward")
            skipped[name] = f"{type(module).__name__}: {what}"
            continue
        kind = found[0]
        shared = by_weight.get(id(module.weight))
        if shared is not None and tuple(getattr(shared, "shape", ())) not in ((), tuple(as_rows(module.weight, kind).shape)):
            raise ValueError(f"{name} shares its weight with another layer that holds it in another layout; "
                             "exclude one of them from the targets.")
        wq = shared if shared is not None else weight_quantizer(module, kind)
        by_weight[id(module.weight)] = wq
        module.__class__ = quant_class(type(module), kind)
        module.weight_quantizer = wq
        module.input_quantizer = None if kind.features is None else input_quantizer(module)
    return skipped


def quant_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The fake-quant layers of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _Quant)}


@torch.no_grad()
def unprepare_(model: nn.Module, fold: bool = False) -> dict[str, nn.Module]:
    """Restore the plain classes (FSDP2's ``FSDP<Name>`` for a sharded layer); with ``fold`` the
    latent weights become the quantized ones (sharded weights: a collective, every rank calls)."""
    layers = quant_modules(model)
    if not layers:
        raise ValueError("the model has no fake-quant layers: prepare it (attach QuantizationAwareTraining) first.")
    if fold:  # all weights first: a tied weight must be quantized from its latent values once
        folded = {id(m.weight): (m.weight, m.quantized_weight().detach().clone()) for m in layers.values()}
        for weight, value in folded.values():  # an FSDP2 shard keeps its own rows of the whole value
            local(weight).copy_(local(scatter_like(weight, value)))
    for module in layers.values():
        module.__class__ = type(module).__bases__[0]
        del module.weight_quantizer
        del module.input_quantizer
    return layers
