"""Atomic file writes and checksums: nothing is ever written half-way (temp file + rename). Reading a
safetensors tensor into memory of its own without a resident memory map (read_tensor)."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(f) on a temp file beside `path`, fsync, then rename it onto `path` (removed on any error)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """safetensors.save_file, but written to a temp file and renamed into place."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        except SafetensorError as e:               # the writer's I/O errors (disk full, ...) as OSError
            code = errno.ENOSPC if "os error 28" in str(e) else errno.EIO
            raise OSError(code, os.strerror(code), str(path)) from None
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; when the block succeeds it replaces `out` (an existing
    `out` is swapped away and removed), when it fails it is deleted and `out` is untouched."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temporaries(out: str | os.PathLike) -> int:
    """Delete what a killed process left of atomic writes to `out`: `.<name>.tmp-*` / `.<name>.old-*`
    folders beside it (atomic_dir) and `.*.tmp` files inside it (atomic_write). Call only while no other
    process writes `out` (e.g. holding its run lock). Returns how many were removed."""
    out = Path(out)
    n = 0
    if out.parent.is_dir():
        for p in out.parent.glob(f".{out.name}.*-*"):
            if p.name.startswith((f".{out.name}.tmp-", f".{out.name}.old-")) and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
                n += 1
    if out.is_dir():
        for p in out.rglob(".*.tmp"):
            if p.is_file() and not p.is_symlink():
                p.unlink(missing_ok=True)
                n += 1
    return n


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_tensor(t: torch.Tensor) -> str:
    """Hash of a tensor's raw bytes (dtype and shape included)."""
    import torch
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


READ_BYTES = 16 << 20          # read_tensor copies a large range in parts of about this size


def read_tensor(path: str | os.PathLike, name: str, r0: int = 0, r1: int | None = None) -> "torch.Tensor":
    """Rows r0:r1 (first dimension) of tensor `name` of a safetensors file, as a fresh tensor of its stored dtype
    that owns its memory. safetensors hands out tensors backed by a memory map of the file, whose pages count in
    the resident set as long as the tensor lives; copying one out in a single piece holds it twice (measured: a
    113 MB embedding raised the peak by 220 MB). Here the range is copied in parts of READ_BYTES, the file
    opened for each part and closed right after, so the resident set grows by the tensor plus one part."""
    import math

    import torch
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        sl = f.get_slice(name)
        shape = sl.get_shape()
        if not shape:
            return f.get_tensor(name).clone()
        r1 = shape[0] if r1 is None else min(shape[0], r1)
        probe = sl[r0:min(r0 + 1, r1)]
        row_bytes = probe.element_size() * max(1, math.prod(shape[1:]))
        step = max(1, READ_BYTES // row_bytes)
        if r1 - r0 <= step:
            return sl[r0:r1].clone()
        out = torch.empty((r1 - r0, *shape[1:]), dtype=probe.dtype)
    for a in range(r0, r1, step):
        b = min(a + step, r1)
        with safe_open(path, framework="pt") as f:
            out[a - r0:b - r0].copy_(f.get_slice(name)[a:b])
    return out
