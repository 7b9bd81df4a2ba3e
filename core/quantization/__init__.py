"""Quantization-aware training: fake-quant math, quantizers, layer swap, integer export."""

from . import fused
from .export import dequantize, export_int, packed_bytes, to_int8_cpu_
from .functional import (binarize, fake_quantize, grad_scale, grouped, lsq_quantize, qrange, reste_power, round_ste,
                         straight_through, ternarize)
from .modules import QUANT_CLASSES, QuantConv1d, QuantConv2d, QuantEmbedding, QuantLinear, prepare_, quant_modules, unprepare_
from .activations import ACTIVATION_METHODS, ActivationQuantizer
from .quantizers import WEIGHT_METHODS, WeightQuantizer
from .sharded import average_gradients_, replicate_quantizers_

__all__ = [
    "ACTIVATION_METHODS",
    "ActivationQuantizer",
    "QUANT_CLASSES",
    "QuantConv1d",
    "QuantConv2d",
    "QuantEmbedding",
    "QuantLinear",
    "WEIGHT_METHODS",
    "WeightQuantizer",
    "average_gradients_",
    "binarize",
    "dequantize",
    "export_int",
    "fake_quantize",
    "fused",
    "grad_scale",
    "grouped",
    "lsq_quantize",
    "packed_bytes",
    "prepare_",
    "qrange",
    "quant_modules",
    "replicate_quantizers_",
    "reste_power",
    "round_ste",
    "straight_through",
    "ternarize",
    "to_int8_cpu_",
    "unprepare_",
]
