"""Compress models larger than memory, layer by layer from safetensors shards (disk offload), resumable.

Tensors are read with positioned reads from the shard files (their safetensors header parsed here), never
through a memory map: the pages of a mapped file count in the resident set once touched. Every compressed
layer is written to `<out>.offload/stage<k>/layer<i>.safetensors` (the format of
modelpress.checkpoint.save_module) atomically, its sha256 recorded in `stage<k>/progress.json` after it
is in place, so a run killed at any instant resumes (`resume=True`, `compress --offload --resume`) from
the last finished layer and writes the same export as an uninterrupted run.

  calibration-free stages (RTN quantize, magnitude prune) run one linear at a time with no model built
    at all (the structure comes from the shard names and config.json): RTN reads its weight in row
    chunks and writes packed codes chunk by chunk (codes equal modelpress.algos.quant.rtn's: every
    quantity is per row), the SQNR comes from running sums; a magnitude mask needs one whole linear;
  calibrated stages (GPTQ arXiv 2210.17323, SparseGPT arXiv 2301.00774, Wanda arXiv 2306.11695) run
    through modelpress.layerwise on a meta-device skeleton with the LayerStore below as its checkpoint:
    one decoder layer is materialized at a time; the input embedding only while the layer-0 inputs are
    captured; lm_head never. The inputs of the next layer are saved with each finished layer.
Stages with a cross-layer budget (prune budget != uniform, cluster, lowrank, lossless, safety_prune) or
`order: auto` need the whole model and are refused with a UserError.

The native export is written by streaming: the safetensors header comes from the shapes, then every
tensor is copied in row chunks (shards, layer files) into `model.safetensors`, so the whole model, or
even one embedding matrix, is never resident."""
from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import json
import math
import os
import re
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .io import atomic_save_file, atomic_write, atomic_write_text, sha256_file
from .memory import trim_heap

SUPPORTED = ("quantize", "prune")
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
              torch.bool: "BOOL"}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}
_FLOAT = ("F32", "F16", "BF16", "F64")
CHUNK_BYTES = 1 << 20          # rows read per step: about 1 MB (a multiple of 8 rows, so packed codes align)
CONV1D_MODELS = ("gpt2", "imagegpt", "decision_transformer")     # linears stored (in, out): refused


@contextlib.contextmanager
def large_allocations_mapped(threshold: int = 1 << 20) -> Iterator[None]:
    """Within the block, glibc serves every allocation >= `threshold` by mmap and unmaps it when freed.
    By default glibc raises that threshold (up to 32 MB) after the first large free, so the full-size
    temporaries of a layer (GPTQ's W and H copies, 1-30 MB each here) land in the heap and stay resident
    after they are freed; measured on the benchmark's GPTQ run: peak 1.70 GB -> 1.09 GB, and faster.
    On exit the threshold is set to 32 MB, glibc's dynamic ceiling (setting it ends the dynamic scheme
    for the process). A no-op where libc has no mallopt."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        yield
        return
    m_mmap_threshold = -3
    mallopt(m_mmap_threshold, threshold)
    try:
        yield
    finally:
        mallopt(m_mmap_threshold, 32 << 20)


def release_memory() -> None:
    """Collect reference cycles (replaced modules sit in them), then trim_heap: without it the resident
    set would grow by about a layer per layer. A full collection takes ~0.3 s once transformers is
    imported (millions of objects): once per layer, not per linear (the per-linear path makes no cycles)."""
    gc.collect()
    trim_heap()


# ---------------------------------------------------------------------------------------------- reading

class SafeFile:
    """A safetensors file read by positioned reads (os.pread), tensor by tensor or in row ranges."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
        self.metadata: dict = header.pop("__metadata__", None) or {}
        self.base = 8 + n
        self.entries: dict[str, tuple[str, list[int], int, int]] = {
            k: (v["dtype"], list(v["shape"]), v["data_offsets"][0], v["data_offsets"][1]) for k, v in header.items()}

    def keys(self) -> list[str]:
        return list(self.entries)

    def spec(self, name: str) -> tuple[str, list[int]]:
        dt, shape, _, _ = self.entries[name]
        return dt, shape

    def rows(self, name: str) -> int:
        shape = self.entries[name][1]
        return shape[0] if shape else 1

    def read(self, name: str, r0: int = 0, r1: int | None = None) -> torch.Tensor:
        """Rows r0:r1 (first dimension) of a tensor, as a fresh tensor of its stored dtype."""
        dt, shape, b, e = self.entries[name]
        rows = shape[0] if shape else 1
        r1 = rows if r1 is None else min(r1, rows)
        row_bytes = (e - b) // rows if rows else 0
        buf = bytearray(row_bytes * (r1 - r0))
        with open(self.path, "rb", buffering=0) as f:
            view, pos = memoryview(buf), self.base + b + r0 * row_bytes
            while view.nbytes:
                got = os.preadv(f.fileno(), [view], pos)
                if got <= 0:
                    raise UserError(f"{self.path} is truncated at tensor {name}: restore or re-download the file")
                view, pos = view[got:], pos + got
        t = torch.frombuffer(buf, dtype=_TORCH_DTYPES[dt]) if buf else torch.empty(0, dtype=_TORCH_DTYPES[dt])
        return t.reshape([r1 - r0, *shape[1:]] if shape else [])

    def chunk_rows(self, name: str) -> int:
        dt, shape, b, e = self.entries[name]
        row_bytes = max(1, (e - b) // max(1, self.rows(name)))
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
        idx = folder / "model.safetensors.index.json"
        if idx.exists():
            wm = json.loads(idx.read_text())["weight_map"]
            files = {v: SafeFile(folder / v) for v in sorted(set(wm.values()))}
            self.files = {k: files[v] for k, v in wm.items()}
        elif (folder / "model.safetensors").exists():
            f = SafeFile(folder / "model.safetensors")
            self.files = {k: f for k in f.keys()}
        else:
            raise UserError(f"--offload reads safetensors shards, but {folder} has no model.safetensors "
                            "(or model.safetensors.index.json): convert the model to safetensors first")

    def src(self, name: str, dtype: torch.dtype) -> Src:
        if name not in self.files:
            raise UserError(f"tensor {name} is missing from the shards: the folder does not match its config.json")
        return Src(self.files[name], name, _ST_DTYPES[dtype])

    def get(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {n: self.src(n, dtype).tensor() for n in names}


# ---------------------------------------------------------------------------------------------- writing

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
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "U8": 1, "I8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1}
    header, off = {}, 0
    for e in entries:
        n = 1
        for d in e.shape:
            n *= d
        header[e.name] = {"dtype": e.dtype, "shape": e.shape, "data_offsets": [off, off + sizes[e.dtype] * n]}
        off += sizes[e.dtype] * n
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


# ---------------------------------------------------------------------------------------------- structure

@dataclass
class Structure:
    """Names of everything the offloaded run touches, from the skeleton or from the shard names."""
    prefix: str                                            # e.g. "model.layers"
    layer_names: list[list[str]]                           # tensors of layer i, relative to "<prefix>.<i>."
    linears: list[dict[str, tuple[int, int, bool]]]        # layer i: {relative module: (out, in, has bias)}
    outside: list[str]                                     # tensors outside the stack (aliases excluded)
    outside_linears: dict[str, tuple[int, int, bool]]      # full module name -> (out, in, has bias)
    aliases: dict[str, str] = field(default_factory=dict)  # tied tensor -> the tensor it shares

    @property
    def n_layers(self) -> int:
        return len(self.layer_names)


def structure_from_model(model: nn.Module) -> Structure:
    from .model import decoder_layers, layer_linears
    prefix, layers = decoder_layers(model)
    lin = [{n: (m.out_features, m.in_features, m.bias is not None) for n, m in layer_linears(layer).items()}
           for layer in layers]
    seen: dict[int, str] = {}
    outside, aliases = [], {}
    for k, v in model.state_dict(keep_vars=True).items():
        if k.startswith(prefix + "."):
            continue
        if id(v) in seen:
            aliases[k] = seen[id(v)]
            continue
        seen[id(v)] = k
        outside.append(k)
    out_lin = {n: (m.out_features, m.in_features, m.bias is not None) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and not n.startswith(prefix + ".")}
    return Structure(prefix, [list(layer.state_dict().keys()) for layer in layers], lin, outside, out_lin, aliases)


def structure_from_shards(shards: Shards, config) -> Structure | None:
    """The structure of an ordinary decoder LM (every 2-D `.weight` inside the stack is an nn.Linear, the
    output projection is `lm_head`) read from the shard names alone, so no model class is imported; None
    when the folder does not look like one (the caller builds the skeleton instead)."""
    n = getattr(config, "num_hidden_layers", None)
    pat = re.compile(r"^(.+?)\.(\d+)\.(.+)$")
    groups: dict[str, dict[int, list[str]]] = {}
    for name in shards.files:
        m = pat.match(name)
        if m:
            groups.setdefault(m[1], {}).setdefault(int(m[2]), []).append(m[3])
    cands = [p for p, g in groups.items() if sorted(g) == list(range(n or -1))]
    if len(cands) != 1:
        return None
    prefix = cands[0]
    layer_names = [sorted(groups[prefix][i]) for i in range(n)]
    linears = []
    for i, names in enumerate(layer_names):
        lin = {}
        for r in names:
            full = f"{prefix}.{i}.{r}"
            shape = shards.files[full].spec(full)[1]
            if r.endswith(".weight") and len(shape) == 2:
                mod = r[:-len(".weight")]
                lin[mod] = (shape[0], shape[1], f"{mod}.bias" in names)
        linears.append(lin)
    outside = sorted(k for k in shards.files if not k.startswith(prefix + "."))
    out_lin, aliases = {}, {}
    if "lm_head.weight" in shards.files:
        o, i = shards.files["lm_head.weight"].spec("lm_head.weight")[1]
        out_lin["lm_head"] = (o, i, "lm_head.bias" in shards.files)
    else:                               # no output projection stored: it is tied to the input embedding
        emb = [k for k in outside if k.endswith(".weight") and len(shards.files[k].spec(k)[1]) == 2
               and "embed" in k]
        if len(emb) != 1:
            return None
        aliases["lm_head.weight"] = emb[0]
        o, i = shards.files[emb[0]].spec(emb[0])[1]
        out_lin["lm_head"] = (o, i, False)
    return Structure(prefix, layer_names, linears, outside, out_lin, aliases)


# ---------------------------------------------------------------------------------------------- layer store

def _transplant(layer: nn.Module, path: Path) -> None:
    """Load a saved layer into `layer` keeping every module object (stages map modules by identity)."""
    from .model import set_module
    from .modules import MODULE_TYPES
    f = SafeFile(path)
    modules, aliases = json.loads(f.metadata["modules"]), json.loads(f.metadata["aliases"])
    tensors = {k: f.read(k) for k in f.keys()}
    for name, spec in modules.items():
        pre = name + "."
        sub = {k[len(pre):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(pre)]}
        new = MODULE_TYPES[spec["kind"]].from_state(sub, spec["config"])
        old = layer.get_submodule(name)
        if type(old) is type(new):
            old.__dict__.update(new.__dict__)
        else:
            set_module(layer, name, new)
    for alias, src in aliases.items():
        tensors[alias] = tensors[src]
    missing, unexpected = layer.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in missing if not k.startswith(tuple(n + "." for n in modules))]
    if missing or unexpected:
        raise UserError(f"{path} does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]}): "
                        "delete the .offload folder and start over")


def _jsonable(d):
    if isinstance(d, dict):
        return {str(k): _jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_jsonable(v) for v in d]
    if isinstance(d, torch.Tensor):
        return d.tolist()
    return d


class LayerStore:
    """Where each decoder layer currently lives: the shards, or the file of the last stage that touched
    it; plus the per-stage progress that makes a run resumable. Passed to modelpress.layerwise as the
    checkpoint of a calibrated stage (restore / load_layer / save)."""

    def __init__(self, struct: Structure, shards: Shards, work: Path, dtype: torch.dtype,
                 layers: nn.ModuleList | None = None):
        self.struct, self.shards, self.work, self.dtype = struct, shards, work, dtype
        self.layers = layers
        self.latest: dict[int, Path] = {}
        self.outside_latest: Path | None = None
        self.digests: dict[Path, str] = {}
        self.stage = 0
        self.resident: list[nn.Module] = []
        self.progress: dict = {"done": 0, "files": {}, "stats": {}, "finished": False}

    @property
    def prefix(self) -> str:
        return self.struct.prefix

    # progress ------------------------------------------------------------------------------------
    def _pfile(self, k: int) -> Path:
        return self.work / f"stage{k}" / "progress.json"

    def _write_progress(self) -> None:
        atomic_write_text(self._pfile(self.stage), json.dumps(self.progress, default=float))

    def begin_stage(self, k: int) -> bool:
        """Enter stage k, picking up what an interrupted run left; True when the stage already finished."""
        self.stage = k
        (self.work / f"stage{k}").mkdir(parents=True, exist_ok=True)
        p = self._pfile(k)
        self.progress = json.loads(p.read_text()) if p.exists() else \
            {"done": 0, "files": {}, "stats": {}, "finished": False}
        for key, digest in self.progress["files"].items():      # later stages supersede earlier ones
            path = self.work / f"stage{k}" / f"{key}.safetensors"
            self.digests[path] = digest
            if key == "outside":
                self.outside_latest = path
            else:
                self.latest[int(key.removeprefix("layer"))] = path
        if not self.progress["finished"]:
            self.verify()
        return self.progress["finished"]

    def verify(self) -> None:
        """Every file the run still reads is there with the sha256 recorded when it was finished."""
        for path in [*self.latest.values(), *([self.outside_latest] if self.outside_latest else [])]:
            if not path.exists() or sha256_file(path) != self.digests[path]:
                raise UserError(f"{path} is missing or does not match its checksum in {path.parent / 'progress.json'}: "
                                f"delete {self.work} and start over")

    def finish_stage(self, stats: dict) -> None:
        self.progress["stats"] = _jsonable(stats)
        self.progress["finished"] = True
        self._write_progress()

    def record(self, key: str, path: Path, digest: str, stats: dict, done: int | None = None) -> None:
        """A finished unit (layer<i> or outside) is in place: record it (progress written last), then
        drop the copy an earlier stage left."""
        self.progress["files"][key] = digest
        self.digests[path] = digest
        self.progress["stats"].update(_jsonable(stats))
        if done is not None:
            self.progress["done"] = done
        self._write_progress()
        old = self.outside_latest if key == "outside" else self.latest.get(int(key.removeprefix("layer")))
        if old is not None and old != path:
            old.unlink(missing_ok=True)
        if key == "outside":
            self.outside_latest = path
        else:
            self.latest[int(key.removeprefix("layer"))] = path

    # the layerwise checkpoint protocol -------------------------------------------------------------
    @property
    def done(self) -> int:
        return self.progress["done"]

    def restore(self, layers) -> tuple[int, list[torch.Tensor] | None, dict]:
        d = self.done
        if d == 0:
            return 0, None, {}
        f = SafeFile(self.work / f"stage{self.stage}" / f"inputs{d}.safetensors")
        return d, [f.read(f"b{j}") for j in range(len(f.keys()))], self.progress["stats"]

    def load_layer(self, i: int, layer: nn.Module) -> None:
        self.resident = list(layer.modules())
        if i in self.latest:
            _transplant(layer, self.latest[i])
        else:
            pre = f"{self.prefix}.{i}."
            names = list(layer.state_dict().keys())
            layer.load_state_dict({n: self.shards.src(pre + n, self.dtype).tensor() for n in names},
                                  assign=True, strict=True)

    def save(self, i: int, layer: nn.Module, next_inputs, stats: dict) -> None:
        """Layer i is done: its file and the next layer's inputs first, the progress that points to them
        last (a kill in between leaves the previous state intact)."""
        from .checkpoint import claim, save_module
        d = self.work / f"stage{self.stage}"
        path = d / f"layer{i}.safetensors"
        save_module(layer, path)
        self.release(layer)
        atomic_save_file({f"b{j}": x.detach().cpu() for j, x in enumerate(next_inputs)}, d / f"inputs{i + 1}.safetensors")
        self.record(f"layer{i}", path, sha256_file(path), stats, done=i + 1)
        (d / f"inputs{i}.safetensors").unlink(missing_ok=True)

    def release(self, layer: nn.Module) -> None:
        """Move the layer, and every module it held when it was loaded, to the meta device: a stage
        replaces linears by new modules while the engine still refers to the old ones until the next
        layer (measured: the previous layer's 134 MB of dense weights stayed alive into the next one)."""
        layer.to("meta")                                 # the layer lives on disk from here
        for m in self.resident:
            m.to("meta")
        self.resident = []
        release_memory()

    def save_final(self, items: list[tuple[int, nn.Module]], stage_stats: dict) -> None:
        """The layers the engine left materialized (it stops after the last targeted layer without handing
        it back) and the end of the stage, recorded by one progress write: a kill before it recomputes
        them from their previous home, a kill after it finds the stage finished."""
        from .checkpoint import save_module
        d = self.work / f"stage{self.stage}"
        written = []
        for i, layer in items:
            path = d / f"layer{i}.safetensors"
            save_module(layer, path)
            self.release(layer)
            written.append((i, path, sha256_file(path)))
        for i, path, digest in written:
            self.progress["files"][f"layer{i}"] = digest
            self.digests[path] = digest
        self.progress["stats"], self.progress["finished"] = _jsonable(stage_stats), True
        self._write_progress()
        for i, path, _ in written:
            old = self.latest.get(i)
            if old is not None and old != path:
                old.unlink(missing_ok=True)
            self.latest[i] = path
        for p in d.glob("inputs*.safetensors"):
            p.unlink()

    def retype(self) -> None:
        """Give the skeleton's (meta) modules the classes the layer files hold (a calibration-free stage
        ran without the skeleton), so a stage's module-identity maps stay valid when layers are loaded."""
        from .model import set_module
        from .modules import MODULE_TYPES
        for i, path in self.latest.items():
            for name, spec in json.loads(SafeFile(path).metadata["modules"]).items():
                old, cls = self.layers[i].get_submodule(name), MODULE_TYPES[spec["kind"]]
                if type(old) is not cls:
                    shell = cls.__new__(cls)
                    shell.__dict__.update(old.__dict__)
                    set_module(self.layers[i], name, shell)

    # reading for the per-linear stages and the export ----------------------------------------------
    def layer_sources(self, i: int) -> tuple[dict[str, Src], dict, dict]:
        """Layer i as ({relative tensor name: source}, modules, aliases) of its current home."""
        if i in self.latest:
            f = SafeFile(self.latest[i])
            return ({k: Src(f, k) for k in f.keys()}, json.loads(f.metadata["modules"]),
                    json.loads(f.metadata["aliases"]))
        pre = f"{self.prefix}.{i}."
        return {n: self.shards.src(pre + n, self.dtype) for n in self.struct.layer_names[i]}, {}, {}

    def outside_sources(self) -> tuple[dict[str, Src], dict]:
        """Everything outside the stack as ({full name: source}, compressed modules)."""
        srcs = {n: self.shards.src(n, self.dtype) for n in self.struct.outside}
        modules: dict = {}
        if self.outside_latest is not None:
            f = SafeFile(self.outside_latest)
            modules = json.loads(f.metadata["modules"])
            comp = tuple(m + "." for m in modules)
            srcs = {n: s for n, s in srcs.items() if not n.startswith(comp)}
            srcs.update({k: Src(f, k) for k in f.keys()})
        return srcs, modules


def check_recipe(recipe) -> None:
    if recipe.order == "auto":
        raise UserError("--offload runs the stages as written: set `order: as-written` in the recipe")
    for name, cfg in recipe.stages:
        if name not in SUPPORTED:
            raise UserError(f"stage {name} needs the whole model in memory and cannot run with --offload "
                            f"(offload supports {', '.join(SUPPORTED)}): drop --offload or the stage")
        if getattr(cfg, "budget", "uniform") != "uniform":
            raise UserError(f"{name}.budget {cfg.budget} allocates across all layers and cannot run with --offload: "
                            "use budget: uniform")


def _calibrated(cfg) -> bool:
    return getattr(cfg, "method", None) in ("gptq", "wanda", "sparsegpt") or getattr(cfg, "needs_calibration", False)


def skeleton(folder: Path, dtype: torch.dtype) -> tuple[nn.Module, Shards]:
    """The model on the meta device. Tensors outside the decoder stack are materialized except the input
    embedding, which is read from the shards only while the model runs (the layer-0 input capture) and
    released after, and the output projection, which is never needed before the export."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .model import decoder_layers, normalize
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    normalize(model)
    model.eval()
    shards = Shards(folder)
    prefix, _ = decoder_layers(model)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    lazy = tuple(f"{names[id(m)]}." for m in (emb, head) if m is not None)
    outside = [k for k in model.state_dict() if not k.startswith(prefix + ".")]
    missing = [k for k in outside if k not in shards.files]
    tied = getattr(model.config, "tie_word_embeddings", False)
    if missing and not (tied and all(k == "lm_head.weight" or k.endswith(".lm_head.weight") for k in missing)):
        raise UserError(f"tensors {missing[:3]} are missing from the shards in {folder}: the folder does not match config.json")
    if tied:
        model.tie_weights()
    now = [k for k in outside if k in shards.files and not k.startswith(lazy)]
    model.load_state_dict(shards.get(now, dtype), strict=False, assign=True)
    if emb is not None:
        # not resident between forwards: a one-element CPU placeholder broadcast to the full shape (a meta
        # tensor here would move the calibration ids to the meta device: layerwise reads the device of
        # the model's first parameter); materialized from the shards for the forward, released after
        pre = names[id(emb)] + "."
        keys = [pre + k for k in emb.state_dict()]

        def placeholder(mod):
            for n, p in list(mod.named_parameters(recurse=False)):
                setattr(mod, n, nn.Parameter(torch.zeros((), dtype=p.dtype).expand(p.shape), requires_grad=False))

        def materialize(mod, _args):
            mod.load_state_dict({k[len(pre):]: shards.src(k, dtype).tensor() for k in keys}, assign=True)

        def release(mod, _args, _out):
            placeholder(mod)
            trim_heap()

        shared = head is not None and head.weight is emb.weight
        placeholder(emb)
        if shared:                          # keep the tie visible (structure_from_model reads it as an alias)
            head.weight = emb.weight
        emb.register_forward_pre_hook(materialize)
        emb.register_forward_hook(release)
    return model, shards


# ---------------------------------------------------------------------------------------------- stages

def compress_offloaded(model_dir: str | os.PathLike, recipe, calib, work: Path
                       ) -> tuple[object, LayerStore, list[dict]]:
    """Apply the recipe's stages layer by layer, continuing whatever `work` holds from an interrupted run.
    Returns (the skeleton model, or an object with the model's `config` when no stage needed one;
    the layer store; per-stage stats)."""
    check_recipe(recipe)
    dtype = getattr(torch, recipe.dtype)
    folder = Path(model_dir)
    mtype = json.loads((folder / "config.json").read_text()).get("model_type")
    if mtype in CONV1D_MODELS:
        raise UserError(f"--offload reads linear weights as stored (out, in), but {mtype} stores them transposed "
                        "(Conv1D): compress this model without --offload")
    model, layers, struct = None, None, None
    if any(_calibrated(cfg) for _, cfg in recipe.stages):
        model, shards = skeleton(folder, dtype)
    else:
        shards = Shards(folder)
        config = RawConfig(json.loads((folder / "config.json").read_text()))
        struct = structure_from_shards(shards, config)
        if struct is None:
            model, shards = skeleton(folder, dtype)
        else:
            model = _ConfigOnly(config)
    if struct is None:
        from .model import decoder_layers
        struct = structure_from_model(model)
        layers = decoder_layers(model)[1]
    store = LayerStore(struct, shards, work, dtype, layers)
    out = []
    for k, (name, cfg) in enumerate(recipe.stages):
        from .recipe import Recipe
        head = {"name": name, "config": Recipe(stages=((name, cfg),)).to_dict()["stages"][0][name]}
        t0 = time.perf_counter()
        if store.begin_stage(k):
            st = store.progress["stats"]
        elif _calibrated(cfg):
            if calib is None:
                raise UserError(f"{name}.method {cfg.method} needs calibration data: add a `calibration:` block")
            store.retype()
            st = cfg.apply(model, calib, checkpoint=store)
            store.save_final([(i, layer) for i, layer in enumerate(store.layers)
                              if any(not p.is_meta for p in layer.parameters())], st)
        else:
            st = _per_linear(store, name, cfg)
            store.finish_stage(st)
        out.append({**head, "seconds": time.perf_counter() - t0, **st})
    return model, store, out


@dataclass
class _ConfigOnly:
    """Stands in for the model where only its config is needed (the export's config.json)."""
    config: object


class RawConfig:
    """config.json as read, with attribute access: transformers.AutoConfig imports the model package
    (~85 MB resident), which a run that builds no model does not need."""

    def __init__(self, d: dict):
        self._d = d

    def __getattr__(self, name):
        try:
            return self.__dict__["_d"][name]
        except KeyError:
            raise AttributeError(name) from None

    def to_dict(self) -> dict:
        return dict(self._d)


def _meta_linear(o: int, i: int, bias: bool) -> nn.Linear:
    return nn.Linear(i, o, bias=bias, device="meta")


def rtn_entries(w: Src, bias: Src | None, out_f: int, in_f: int, cfg, dtype: torch.dtype
                ) -> tuple[list[Entry], dict, Callable[[], dict]]:
    """RTN (modelpress.algos.quant.rtn) of one plain linear read in row chunks, as the entries of its
    QuantLinear state (identical to QuantLinear.to_state), its module config, and a function giving its
    stats (sqnr, sparsity) once the entries are written. Every RTN quantity is per row, so the codes equal
    the whole-matrix call; chunks are multiples of 8 rows, so packed chunks concatenate to the packed
    whole; the SQNR comes from float64 running sums instead of full-size float64 copies."""
    from .algos import quant
    bits, gs, sym = cfg.bits, cfg.group_size, cfg.sym
    quant.check_groups(in_f, gs)
    ng = quant.n_groups(in_f, gs)
    scales: list[torch.Tensor] = []
    zeros: list[torch.Tensor] = []
    sums = {"signal": 0.0, "noise": 0.0, "zeros": 0}

    def qweight() -> Iterator[torch.Tensor]:
        for W in w.chunks():                                               # (r, cols)
            W = W.float()
            q, s, z = quant.rtn(W, bits, gs, sym, None, cfg.observer)      # (r, cols), (r, ng), (r, ng)
            s16, z8 = s.half(), z.to(torch.uint8)
            scales.append(s16)
            zeros.append(z8)
            w_hat = quant.dequantize_groups(q, s16.float(), z8.float(), gs).to(dtype).double()   # (r, cols)
            W64 = W.double()
            sums["signal"] += float(W64.pow(2).sum())
            sums["noise"] += float((W64 - w_hat).pow(2).sum())
            sums["zeros"] += int((w_hat == 0).sum())
            del W64, w_hat
            yield quant.pack(q, bits)
            trim_heap()

    def stats() -> dict:
        noise, signal = sums["noise"], sums["signal"]
        return {"kind": "QuantLinear", "bits": bits,
                "sqnr": float("inf") if noise == 0 else 10 * math.log10(signal / noise),
                "sparsity": sums["zeros"] / (out_f * in_f)}

    entries = [Entry("qweight", "U8", [-(-out_f * in_f * bits // 8)], qweight),
               Entry("scales", "F16", [out_f, ng], lambda: iter(scales))]
    if not sym:
        entries.append(Entry("zeros", "U8", [-(-out_f * ng * bits // 8)],
                             lambda: iter([quant.pack(torch.cat(zeros), bits)])))
    if bias is not None:
        entries.append(Entry.of("bias", bias))
    conf = {"in": in_f, "out": out_f, "bits": bits, "group_size": gs, "sym": sym, "dtype": str(dtype)}
    return entries, conf, stats


def _compress_linear(cfg, full: str, rel: str, srcs: dict[str, Src], modules: dict, shape: tuple[int, int, bool],
                     dtype: torch.dtype, part: Path) -> tuple[dict, dict]:
    """Compress one linear (sources keyed by names relative to its owner) into the safetensors `part`;
    returns ({kind, config} of its module, stats)."""
    from .modules import MODULE_TYPES
    from .stages.quantize import Quantize
    out_f, in_f, has_bias = shape
    pre = rel + "."
    if rel not in modules and isinstance(cfg, Quantize) and cfg.method == "rtn":
        entries, conf, stats = rtn_entries(srcs[pre + "weight"], srcs.get(pre + "bias"), out_f, in_f, cfg, dtype)
        write_streaming(part, entries, {})
        return {"kind": "QuantLinear", "config": conf}, stats()
    if rel in modules:                                    # compressed by an earlier stage: rebuild that one module
        sub = {k[len(pre):]: s.tensor() for k, s in srcs.items() if k.startswith(pre)}
        lin = MODULE_TYPES[modules[rel]["kind"]].from_state(sub, modules[rel]["config"])
    else:
        lin = nn.Linear(in_f, out_f, bias=has_bias, device="meta", dtype=dtype)
        lin.weight = nn.Parameter(srcs[pre + "weight"].tensor(), requires_grad=False)
        if has_bias:
            lin.bias = nn.Parameter(srcs[pre + "bias"].tensor(), requires_grad=False)
    new, info = cfg.quantize_one(full, lin, None) if isinstance(cfg, Quantize) else cfg.prune_one(full, lin, None)
    state, conf = new.to_state()
    atomic_save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, part)
    kind = type(new).__name__
    del lin, new, state
    return {"kind": kind, "config": conf}, info


def _rewrite(path: Path, srcs: dict[str, Src], modules: dict, aliases: dict, new: dict[str, tuple[dict, Path]]) -> str:
    """Write a unit (a layer, or the outside) whose modules `new` were just compressed into part files:
    untouched tensors stream from `srcs`, the new modules' states from their parts. Returns the sha256."""
    comp = tuple(m + "." for m in new)
    entries = [Entry.of(k, s) for k, s in srcs.items() if not k.startswith(comp)]
    mods = {k: v for k, v in modules.items() if k not in new}
    for mod, (spec, part) in new.items():
        f = SafeFile(part)
        entries += [Entry.of(f"{mod}.{k}", Src(f, k)) for k in f.keys()]
        mods[mod] = spec
    _, digest = write_streaming(path, entries, {"modules": json.dumps(mods), "aliases": json.dumps(aliases)})
    return digest


def _per_linear(store: LayerStore, name: str, cfg) -> dict:
    """A calibration-free stage, one linear at a time; each finished layer is recorded (resumable)."""
    st = store.struct
    layers: dict = dict(store.progress["stats"].get("layers", {}))
    d = store.work / f"stage{store.stage}"

    def unit(key: str, selected: dict, owner: str, srcs: dict, modules: dict, aliases: dict, shapes: dict) -> None:
        new, stats = {}, {}
        parts = d / f"{key}.parts"
        shutil.rmtree(parts, ignore_errors=True)
        for full in selected:
            rel = full[len(owner) + 1:] if owner else full
            part = parts / f"{rel}.safetensors"
            spec, stats[full] = _compress_linear(cfg, full, rel, srcs, modules, shapes[rel], store.dtype, part)
            new[rel] = (spec, part)
            trim_heap()
        path = d / f"{key}.safetensors"
        digest = _rewrite(path, srcs, modules, aliases, new)
        shutil.rmtree(parts, ignore_errors=True)
        layers.update(stats)
        store.record(key, path, digest, {"layers": layers})
        trim_heap()

    for i in range(st.n_layers):
        pre = f"{st.prefix}.{i}"
        selected = cfg.target.filter({f"{pre}.{n}": _meta_linear(*s) for n, s in st.linears[i].items()})
        if selected and f"layer{i}" not in store.progress["files"]:
            unit(f"layer{i}", selected, pre, *store.layer_sources(i), st.linears[i])
    selected = cfg.target.filter({n: _meta_linear(*s) for n, s in st.outside_linears.items()})
    if selected and "outside" not in store.progress["files"]:
        tied = [n for n in selected if f"{n}.weight" in st.aliases]
        if tied:
            raise UserError(f"{tied[0]} shares its weight with the embedding and cannot be compressed with "
                            f"--offload: add {tied[0]} to {name}.exclude, or drop --offload")
        prior = SafeFile(store.outside_latest) if store.outside_latest is not None else None
        srcs = {k: Src(prior, k) for k in prior.keys()} if prior else {}
        modules = json.loads(prior.metadata["modules"]) if prior else {}
        for n in selected:
            if n not in modules:
                srcs.update({k: store.shards.src(k, store.dtype) for k in st.outside if k.startswith(n + ".")})
        unit("outside", selected, "", srcs, modules, {}, st.outside_linears)
    return _per_linear_summary(store, name, cfg, layers)


def _per_linear_summary(store, name, cfg, layers) -> dict:
    if not layers:
        raise UserError(f"{name} matched no linear layers: check {name}.include / {name}.exclude")
    sq = [v["sqnr"] for v in layers.values() if "sqnr" in v]
    summary = f"{name} ({cfg.describe() if hasattr(cfg, 'describe') else ''}) offloaded: {len(layers)} linears" + \
        (f", mean SQNR {sum(sq) / len(sq):.2f} dB" if sq else "")
    return {"summary": summary, "layers": layers}


# ---------------------------------------------------------------------------------------------- export

TOKENIZER_FILES = re.compile(r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*|merges\.txt|"
                             r"spiece\.model|chat_template\..*|sentencepiece.*\.model)$")


def export_offloaded(model, store: LayerStore, tokenizer, out: str | os.PathLike, recipe: dict | None = None,
                     report: dict | None = None, calibration: dict | None = None) -> Path:
    """The native export folder (same files as modelpress.export.save), streamed tensor by tensor in row
    chunks from the shards and the layer files. `tokenizer`: a tokenizer object (saved with
    save_pretrained), or the model folder, whose tokenizer files are copied as they are."""
    from .export.native import FORMAT, MANIFEST, WEIGHTS, write_folder_files
    from .io import atomic_dir
    out = Path(out)
    if out.exists() and not (out / MANIFEST).exists() and any(out.iterdir()):
        raise UserError(f"output folder {out} exists and is not a modelpress export: choose a new --out")
    st = store.struct
    store.verify()
    with atomic_dir(out) as tmp:
        srcs, modules = store.outside_sources()
        entries = [Entry.of(n, s) for n, s in srcs.items()]
        aliases = dict(st.aliases)
        for i in range(st.n_layers):
            lsrcs, mods, al = store.layer_sources(i)
            pre = f"{st.prefix}.{i}."
            entries += [Entry.of(pre + n, s) for n, s in lsrcs.items()]
            modules.update({pre + k: v for k, v in mods.items()})
            aliases.update({pre + k: pre + v for k, v in al.items()})
        sha, _ = write_streaming(tmp / WEIGHTS, entries, {"format": FORMAT})
        if isinstance(tokenizer, (str, os.PathLike)):
            for p in sorted(Path(tokenizer).iterdir()):
                if p.is_file() and TOKENIZER_FILES.match(p.name):
                    shutil.copyfile(p, tmp / p.name)
            tokenizer = None
        write_folder_files(tmp, model, tokenizer, str(store.dtype), modules, aliases, sha, recipe, report, calibration)
    return out


def _fingerprint(recipe, calib, model_src) -> str:
    blob = json.dumps({"recipe": recipe.to_dict(), "calib": calib.sha256() if calib is not None else None,
                       "model": str(model_src)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def run_recipe_offloaded(recipe, model_src: str | os.PathLike, out: str | os.PathLike, resume: bool = False) -> dict:
    """load structure -> calibrate -> compress layer by layer -> streamed native export (no evaluation:
    run `modelpress eval OUT` afterwards). Progress lives in `<out>.offload/` until the export is written;
    a run interrupted at any point continues with resume=True and writes the same files as an
    uninterrupted run (the wall-clock times are therefore only in the returned report, not in
    report.json). Returns the report."""
    from .calib import calibration_set
    from .model import REFERENCE, smollm2_dir
    src = Path(smollm2_dir() if str(model_src) == REFERENCE else model_src)
    if not (src / "config.json").exists():
        raise UserError(f"--offload needs a local HF folder with config.json and safetensors shards, got {model_src}")
    check_recipe(recipe)
    calib = None
    if recipe.needs_calibration:         # the tokenizer classes cost ~80 MB of imports: only when needed
        from transformers import AutoTokenizer
        c = recipe.calibration
        calib = calibration_set(AutoTokenizer.from_pretrained(src), c.source, c.select, c.samples, c.seqlen,
                                c.seed, c.field, None)
    work = Path(f"{out}.offload")
    fp = _fingerprint(recipe, calib, model_src)
    from .checkpoint import claim
    claim(work, fp, resume, "recipe, model or calibration set")
    t0 = time.perf_counter()
    with large_allocations_mapped():
        model, store, stages = compress_offloaded(src, recipe, calib, work)
    report = {"model": str(model_src), "recipe": recipe.to_dict(), "offload": True,
              "stages": [{"name": s["name"], "summary": s["summary"]} for s in stages]}
    if calib is not None:
        report["calibration"] = calib.provenance
    export_offloaded(model, store, src, out, recipe.to_dict(), report,
                     calib.provenance if calib is not None else None)
    shutil.rmtree(work, ignore_errors=True)
    report["compress_seconds"] = time.perf_counter() - t0
    for r, s in zip(report["stages"], stages):
        r["seconds"] = s["seconds"]
    report["export"] = str(out)
    return report
