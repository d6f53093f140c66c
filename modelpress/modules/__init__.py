"""Replacement layers that reload exactly. MODULE_TYPES maps the `kind` stored in an export's
manifest to the class whose `from_state(tensors, config)` rebuilds it."""
from .quant import QuantLinear, SparseLinear, pack_mask, unpack_mask

MODULE_TYPES: dict[str, type] = {
    "QuantLinear": QuantLinear,
    "SparseLinear": SparseLinear,
}

__all__ = ["MODULE_TYPES", "QuantLinear", "SparseLinear", "pack_mask", "unpack_mask"]
