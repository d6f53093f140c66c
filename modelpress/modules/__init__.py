"""Replacement layers that reload exactly. MODULE_TYPES maps the `kind` stored in an export's
manifest to the class whose `from_state(tensors, config)` rebuilds it."""
from .cluster import ClusteredLinear
from .lowrank import LowRankLinear
from .quant import QuantEmbedding, QuantLinear, SparseLinear, pack_mask, unpack_mask
from .zip import ZipEmbedding, ZipLinear, retie

MODULE_TYPES: dict[str, type] = {
    "QuantLinear": QuantLinear,
    "QuantEmbedding": QuantEmbedding,
    "SparseLinear": SparseLinear,
    "ClusteredLinear": ClusteredLinear,
    "LowRankLinear": LowRankLinear,
    "ZipLinear": ZipLinear,
    "ZipEmbedding": ZipEmbedding,
}

__all__ = ["MODULE_TYPES", "QuantEmbedding", "QuantLinear", "SparseLinear", "ClusteredLinear", "LowRankLinear", "ZipLinear",
           "ZipEmbedding", "pack_mask", "unpack_mask", "retie"]
