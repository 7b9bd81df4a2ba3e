"""Sample reweighting and data pruning: loss weights, epoch plans, scores, samplers."""

from .data import IndexedDataset, PlanSampler, sampler_order
from .selection import el2n_scores, grand_scores, infobatch_plan, static_keep
from .weights import RULES, effective_sample_size, focal_weights, loss_weights, normalize_losses, weight_entropy

__all__ = [
    "IndexedDataset",
    "PlanSampler",
    "RULES",
    "effective_sample_size",
    "el2n_scores",
    "focal_weights",
    "grand_scores",
    "infobatch_plan",
    "loss_weights",
    "normalize_losses",
    "sampler_order",
    "static_keep",
    "weight_entropy",
]
