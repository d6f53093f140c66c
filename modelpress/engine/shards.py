"""Shard I/O of the offload path: tensors read from an HF folder's safetensors shards in row ranges,
and safetensors files written by streaming, chunk by chunk.

Reading goes through the safetensors library (`safe_open` + `get_slice`), the file opened anew for every
read: a slice is copied out of the memory map and the map is closed at once, so no page of the file stays
in the resident set. Measured on a 256 MB float32 tensor read in 64-row slices: peak RSS 242 MB (the
interpreter with torch alone is ~240 MB) and 0.06 s, against 507 MB for one `safe_open` held over all
slices (every touched page of a held map counts as resident) and 247 MB / 0.44 s for the positioned reads
(os.preadv of the header offsets) this file used before.

Writing is hand-written (`write_streaming`): the safetensors library writes a file from tensors that are
all in memory at once (`save_file` takes a dict of tensors), which is exactly what the offload path must
avoid for one embedding matrix or a whole model; here the header comes from the shapes and each tensor is
copied in row chunks."""
from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import UserError
from ..io import atomic_write, read_tensor
from ..model import shard_files

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
              torch.bool: "BOOL"}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}
_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "U8": 1, "I8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1}
_FLOAT = ("F32", "F16", "BF16", "F64")
CHUNK_BYTES = 1 << 20          # rows read per step: about 1 MB (a multiple of 8 rows, so packed codes align)


class SafeFile:
    """A safetensors file read through safe_open/get_slice, tensor by tensor or in row ranges; the file is
    opened for each read and closed right after (see the module docstring for why)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with self._open() as f:
            self.metadata: dict = f.metadata() or {}
            self.entries: dict[str, tuple[str, list[int]]] = {}
            for k in f.keys():
                sl = f.get_slice(k)
                self.entries[k] = (sl.get_dtype(), list(sl.get_shape()))

    def _open(self):
        try:
            return safe_open(self.path, framework="pt")
        except (SafetensorError, OSError) as e:
            raise UserError(f"{self.path} is not a readable safetensors file ({str(e).splitlines()[0]}): "
                            "restore or re-download the file") from None

    def keys(self) -> list[str]:
        return list(self.entries)

    def spec(self, name: str) -> tuple[str, list[int]]:
        return self.entries[name]

    def rows(self, name: str) -> int:
        shape = self.entries[name][1]
        return shape[0] if shape else 1

    def read(self, name: str, r0: int = 0, r1: int | None = None) -> torch.Tensor:
        """Rows r0:r1 (first dimension) of a tensor, as a fresh tensor of its stored dtype (modelpress.io.read_tensor:
        the map closed after each part, so the resident set grows by the tensor plus one part)."""
        try:
            return read_tensor(self.path, name, r0, r1)
        except (SafetensorError, OSError) as e:
            raise UserError(f"{self.path} is not a readable safetensors file ({str(e).splitlines()[0]}): "
                            "restore or re-download the file") from None

    def chunk_rows(self, name: str) -> int:
        dt, shape = self.entries[name]
        row_bytes = _SIZES[dt] * max(1, math.prod(shape[1:])) if shape else _SIZES[dt]
        return max(8, CHUNK_BYTES // row_bytes // 8 * 8)


@dataclass(frozen=True)
class Src:
    """Where one tensor's bytes come from: a tensor of a SafeFile, cast to `dtype` (floats only)."""
    file: SafeFile
    name: str
    dtype: str | None = None          # safetensors dtype to cast floating tensors to; None = as stored

    @property
    def out_dtype(self) -> str:
        st = self.file.spec(self.name)[0]
        return self.dtype if self.dtype and st in _FLOAT else st

    @property
    def shape(self) -> list[int]:
        return self.file.spec(self.name)[1]

    def chunks(self) -> Iterator[torch.Tensor]:
        step, rows = self.file.chunk_rows(self.name), self.file.rows(self.name)
        for r0 in range(0, max(rows, 1), step):
            yield self.tensor(r0, r0 + step)

    def tensor(self, r0: int = 0, r1: int | None = None) -> torch.Tensor:
        t = self.file.read(self.name, r0, r1)
        return t.to(_TORCH_DTYPES[self.out_dtype])


class Shards:
    """Tensor name -> shard file of an HF folder (model.safetensors or a sharded index)."""

    def __init__(self, folder: Path):
        opened: dict[Path, SafeFile] = {}

        def open_(path: Path) -> SafeFile:
            if path not in opened:
                opened[path] = SafeFile(path)
            return opened[path]
        names = shard_files(folder, keys=lambda path: open_(path).keys())
        if names is None:
            raise UserError(f"--offload reads safetensors shards, but {folder} has no model.safetensors "
                            "(or model.safetensors.index.json): convert the model to safetensors first")
        self.files = {k: open_(path) for k, path in names.items()}

    def src(self, name: str, dtype: torch.dtype) -> Src:
        if name not in self.files:
            raise UserError(f"tensor {name} is missing from the shards: the folder does not match its config.json")
        return Src(self.files[name], name, _ST_DTYPES[dtype])

    def get(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {n: self.src(n, dtype).tensor() for n in names}


@dataclass
class Entry:
    """One tensor of a file written by streaming: its dtype/shape up front, its data as row chunks."""
    name: str
    dtype: str
    shape: list[int]
    chunks: Callable[[], Iterator[torch.Tensor]]

    @staticmethod
    def of(name: str, src: Src) -> "Entry":
        return Entry(name, src.out_dtype, src.shape, src.chunks)

    @staticmethod
    def tensor(name: str, t: torch.Tensor) -> "Entry":
        return Entry(name, _ST_DTYPES[t.dtype], list(t.shape), lambda: iter([t]))


def write_streaming(path: Path, entries: list[Entry], metadata: dict[str, str]) -> tuple[dict[str, str], str]:
    """Write a safetensors file atomically, chunk by chunk (temp file + fsync + rename). Returns
    ({name: modelpress.io.sha256_tensor of the tensor}, sha256 of the file)."""
    header, off = {}, 0
    for e in entries:
        n = 1
        for d in e.shape:
            n *= d
        header[e.name] = {"dtype": e.dtype, "shape": e.shape, "data_offsets": [off, off + _SIZES[e.dtype] * n]}
        off += _SIZES[e.dtype] * n
    header["__metadata__"] = metadata
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    fsha, sha = hashlib.sha256(), {}

    def write(f) -> None:
        for b in (struct.pack("<Q", len(hb)), hb):
            f.write(b)
            fsha.update(b)
        for e in entries:
            tdt = _TORCH_DTYPES[e.dtype]
            h = hashlib.sha256(f"{tdt}{tuple(e.shape)}".encode())
            written = 0
            for t in e.chunks():
                if t.dtype != tdt:
                    raise RuntimeError(f"offload: {e.name} is {t.dtype}, its header says {tdt}")
                if not t.numel():
                    continue
                mv = memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
                f.write(mv)
                h.update(mv)
                fsha.update(mv)
                written += mv.nbytes
            end = header[e.name]["data_offsets"]
            if written != end[1] - end[0]:
                raise RuntimeError(f"offload: {e.name} wrote {written} bytes, its header says {end[1] - end[0]}")
            sha[e.name] = h.hexdigest()

    atomic_write(path, write)
    return sha, fsha.hexdigest()
