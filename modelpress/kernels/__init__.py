"""GPU kernels (Triton, imported lazily: this package imports without triton or CUDA)."""
from .zip_gemm import (
    FUSED_MAX_N,
    decode_tiles_torch,
    decompress_rows_torch,
    decompress_torch,
    decompress_triton,
    fused_linear_triton,
    triton_available,
)

__all__ = ["FUSED_MAX_N", "decode_tiles_torch", "decompress_rows_torch", "decompress_torch", "decompress_triton",
           "fused_linear_triton", "triton_available"]
