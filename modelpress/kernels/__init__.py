"""GPU kernels (Triton, imported lazily: this package imports without triton or CUDA)."""
from .zip_gemm import (
    FUSED_MAX_N,
    decode_tiles_torch,
    decompress_rows_torch,
    decompress_torch,
    decompress_triton,
    device_layout,
    fused_linear_triton,
    stream_layout,
    triton_available,
)

__all__ = ["FUSED_MAX_N", "decode_tiles_torch", "decompress_rows_torch", "decompress_torch", "decompress_triton",
           "device_layout", "fused_linear_triton", "stream_layout", "triton_available"]
