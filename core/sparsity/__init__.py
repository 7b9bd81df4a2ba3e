"""Sparsity: one mask engine, mask selection, layer allocation, scores and policies, and a
mask-aware gradient all-reduce for DDP."""

from .allocation import Allocation, allocate, erk_densities, lamp_scores
from .comm import MaskedAllReduce, mask_fingerprint, masked_allreduce_hook
from .dst import (
    cosine_drop_fraction,
    drop_and_grow,
    fanin_masks,
    growth_scores,
    random_masks,
    random_scores,
    srigl_update,
)
from .engine import MaskEngine, mask_name, masked_bits_
from .export import export_sparse_
from .masks import check_nm, check_sharded_nm, nm_mask, parse_pattern, topk_mask
from .pruning import prune_masks
from .scores import InputNorms, gradient_score, magnitude_score, wanda_score
from .srste import SRSTE

__all__ = [
    "Allocation",
    "InputNorms",
    "MaskEngine",
    "MaskedAllReduce",
    "SRSTE",
    "allocate",
    "check_nm",
    "check_sharded_nm",
    "cosine_drop_fraction",
    "drop_and_grow",
    "erk_densities",
    "export_sparse_",
    "fanin_masks",
    "gradient_score",
    "growth_scores",
    "lamp_scores",
    "magnitude_score",
    "mask_fingerprint",
    "mask_name",
    "masked_allreduce_hook",
    "masked_bits_",
    "nm_mask",
    "parse_pattern",
    "prune_masks",
    "random_masks",
    "random_scores",
    "srigl_update",
    "topk_mask",
    "wanda_score",
]
