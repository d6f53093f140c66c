"""Resident-memory hygiene shared by the layer-by-layer engine and the offload path."""
from __future__ import annotations

import ctypes


def trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc malloc_trim). glibc keeps freed blocks below its
    (adaptive, up to 32 MB) mmap threshold in the heap, so the temporaries of each layer's forward passes and
    solves would otherwise stay resident and the resident set would grow layer by layer although nothing is
    live. A no-op where libc is not glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
