"""Compress models larger than memory, layer by layer from safetensors shards (disk offload).

The model skeleton is built on the meta device (accelerate.init_empty_weights); only the parts outside
the decoder stack (embedding, final norm, lm_head) are materialized. Each decoder layer is read from the
shards (safetensors.safe_open) just before it is processed and moved back to the meta device once its
compressed state is written to `<out>.offload/stage<k>/layer<i>.safetensors`, so the resident set is
about one decoder layer + the calibration activations + the embedding.

  calibrated stages (GPTQ arXiv 2210.17323, SparseGPT arXiv 2301.00774, Wanda arXiv 2306.11695) run
    through the ordinary sequential engine (modelpress.layerwise), with the layer store below passed as
    its checkpoint: it materializes layer i before use and saves + releases it after, so the numbers are
    those of the in-memory path;
  calibration-free stages (RTN quantize, magnitude prune) run per linear: one layer resident, each
    linear replaced before the next is touched.
Stages with a cross-layer budget (prune budget != uniform, cluster, lowrank, lossless, safety_prune) or
`order: auto` need the whole model and are refused with a UserError.

The native export is assembled by streaming: the safetensors header is computed from the per-layer
files' shapes, then tensors are copied one at a time into `model.safetensors` (the format
modelpress.export.load_compressed reads), so the whole model is never resident either."""
from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import os
import re
import shutil
import struct
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from .checkpoint import save_module
from .errors import UserError
from .export.native import FORMAT, MANIFEST, WEIGHTS, collect_tensors, write_folder_files
from .io import atomic_dir, sha256_tensor
from .model import decoder_layers, layer_linears, normalize, set_module

SUPPORTED = ("quantize", "prune")
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
              torch.bool: "BOOL"}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


def release_memory() -> None:
    """Collect reference cycles (replaced modules sit in them) and hand freed heap pages back to the OS:
    glibc keeps freed blocks below its (adaptive, up to 32 MB) mmap threshold in the heap, so without
    malloc_trim the resident set would grow by about a layer per layer."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):       # not glibc: nothing to trim
        pass


class Shards:
    """Tensor name -> shard file of an HF folder (model.safetensors or a sharded index)."""

    def __init__(self, folder: Path):
        idx = folder / "model.safetensors.index.json"
        if idx.exists():
            wm = json.loads(idx.read_text())["weight_map"]
            self.files = {k: folder / v for k, v in wm.items()}
        elif (folder / "model.safetensors").exists():
            with safe_open(str(folder / "model.safetensors"), "pt") as f:
                self.files = {k: folder / "model.safetensors" for k in f.keys()}
        else:
            raise UserError(f"--offload reads safetensors shards, but {folder} has no model.safetensors "
                            "(or model.safetensors.index.json): convert the model to safetensors first")

    def get(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for n in names:
            if n not in self.files:
                raise UserError(f"tensor {n} is missing from the shards: the folder does not match its config.json")
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for f, ns in by_file.items():
            with safe_open(str(f), "pt") as h:
                for n in ns:
                    t = h.get_tensor(n)
                    out[n] = t.to(dtype) if t.is_floating_point() else t
        return out

    def spec(self, name: str, dtype: torch.dtype) -> tuple[str, list[int]]:
        with safe_open(str(self.files[name]), "pt") as h:
            sl = h.get_slice(name)
            st, shape = sl.get_dtype(), list(sl.get_shape())
        return (_ST_DTYPES[dtype] if st in ("F32", "F16", "BF16", "F64") else st), shape


def _transplant(layer: nn.Module, path: Path) -> None:
    """Load a saved layer into `layer` keeping every module object (stages map modules by identity)."""
    from .modules import MODULE_TYPES
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    modules, aliases = json.loads(meta["modules"]), json.loads(meta["aliases"])
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


class LayerStore:
    """Where each decoder layer currently lives: the shards, or the file of the last stage that touched
    it. Passed to modelpress.layerwise as the checkpoint of a calibrated stage (load_layer/save)."""

    def __init__(self, model: nn.Module, shards: Shards, work: Path, dtype: torch.dtype):
        self.prefix, self.layers = decoder_layers(model)
        self.shards, self.work, self.dtype = shards, work, dtype
        self.latest: dict[int, Path] = {}
        self.stage = 0
        self.progress = {"done": 0, "stats": {}}

    @property
    def done(self) -> int:
        return 0

    def begin_stage(self, k: int) -> None:
        self.stage = k
        self.progress = {"done": 0, "stats": {}}
        (self.work / f"stage{k}").mkdir(parents=True, exist_ok=True)

    def restore(self, layers):
        return 0, None, {}

    def load_layer(self, i: int, layer: nn.Module) -> None:
        if i in self.latest:
            _transplant(layer, self.latest[i])
        else:
            pre = f"{self.prefix}.{i}."
            names = list(layer.state_dict().keys())
            t = self.shards.get([pre + n for n in names], self.dtype)
            layer.load_state_dict({n: t[pre + n] for n in names}, assign=True, strict=True)

    def save(self, i: int, layer: nn.Module, next_inputs, stats: dict) -> None:
        path = self.work / f"stage{self.stage}" / f"layer{i}.safetensors"
        save_module(layer, path)
        if i in self.latest and self.latest[i].parent != path.parent:
            self.latest[i].unlink(missing_ok=True)       # the previous stage's copy is superseded
        self.latest[i] = path
        layer.to("meta")                                 # release: the layer lives on disk from here
        release_memory()

    def layer_specs(self, i: int) -> tuple[list[tuple[str, str, list[int]]], dict, dict]:
        """(name, safetensors dtype, shape) of every tensor of layer i, its modules and aliases."""
        pre = f"{self.prefix}.{i}."
        if i in self.latest:
            with safe_open(str(self.latest[i]), "pt") as f:
                meta = f.metadata()
                specs = [(pre + k, f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape())) for k in f.keys()]
            return specs, {pre + k: v for k, v in json.loads(meta["modules"]).items()}, \
                {pre + k: pre + v for k, v in json.loads(meta["aliases"]).items()}
        names = list(self.layers[i].state_dict().keys())
        return [(pre + n, *self.shards.spec(pre + n, self.dtype)) for n in names], {}, {}

    def read(self, i: int, names: list[str]) -> dict[str, torch.Tensor]:
        pre = f"{self.prefix}.{i}."
        if i in self.latest:
            with safe_open(str(self.latest[i]), "pt") as f:
                return {n: f.get_tensor(n[len(pre):]) for n in names}
        return self.shards.get(names, self.dtype)


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
    """The model on the meta device with everything outside the decoder stack materialized."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    normalize(model)
    model.eval()
    shards = Shards(folder)
    prefix, _ = decoder_layers(model)
    outside = [k for k in model.state_dict() if not k.startswith(prefix + ".")]
    tied = getattr(model.config, "tie_word_embeddings", False)
    want = [k for k in outside if k in shards.files]
    missing = [k for k in outside if k not in shards.files]
    model.load_state_dict(shards.get(want, dtype), strict=False, assign=True)
    if missing and not (tied and all(k == "lm_head.weight" or k.endswith(".lm_head.weight") for k in missing)):
        raise UserError(f"tensors {missing[:3]} are missing from the shards in {folder}: the folder does not match config.json")
    if tied:
        model.tie_weights()
    return model, shards


def compress_offloaded(model_dir: str | os.PathLike, recipe, calib, work: Path) -> tuple[nn.Module, LayerStore, list[dict]]:
    """Apply the recipe's stages layer by layer; returns (skeleton model, layer store, per-stage stats)."""
    check_recipe(recipe)
    dtype = getattr(torch, recipe.dtype)
    model, shards = skeleton(Path(model_dir), dtype)
    store = LayerStore(model, shards, work, dtype)
    out = []
    for k, (name, cfg) in enumerate(recipe.stages):
        store.begin_stage(k)
        t0 = time.perf_counter()
        if _calibrated(cfg):
            if calib is None:
                raise UserError(f"{name}.method {cfg.method} needs calibration data: add a `calibration:` block")
            st = cfg.apply(model, calib, checkpoint=store)
            for i, layer in enumerate(store.layers):      # the engine stops after the last targeted layer
                if any(not p.is_meta for p in layer.parameters()):     # without handing it back
                    store.save(i, layer, None, {})
        else:
            st = _per_linear(model, store, name, cfg)
        from .recipe import Recipe
        st = {"name": name, "config": Recipe(stages=((name, cfg),)).to_dict()["stages"][0][name],
              "seconds": time.perf_counter() - t0, **st}
        out.append(st)
    return model, store, out


def _per_linear(model: nn.Module, store: LayerStore, name: str, cfg) -> dict:
    """A calibration-free stage, one linear at a time (only one decoder layer resident)."""
    layers: dict = {}
    for i, layer in enumerate(store.layers):
        pre = f"{store.prefix}.{i}"
        selected = cfg.target.filter(layer_linears(layer, pre))
        if not selected:
            continue
        store.load_layer(i, layer)
        for lin_name in selected:
            one = dataclasses.replace(cfg, include=(f"^{re.escape(lin_name)}$",))
            layers.update(one.apply(model, None).get("layers", {}))
            release_memory()
        store.save(i, layer, None, {})
    outside = {n: m for n, m in cfg.target.select(model).items() if not n.startswith(store.prefix + ".")}
    for lin_name in outside:
        one = dataclasses.replace(cfg, include=(f"^{re.escape(lin_name)}$",))
        layers.update(one.apply(model, None).get("layers", {}))
    if not layers:
        raise UserError(f"{name} matched no linear layers: check {name}.include / {name}.exclude")
    sq = [v["sqnr"] for v in layers.values() if "sqnr" in v]
    summary = f"{name} ({cfg.describe() if hasattr(cfg, 'describe') else ''}) offloaded: {len(layers)} linears" + \
        (f", mean SQNR {sum(sq) / len(sq):.2f} dB" if sq else "")
    return {"summary": summary, "layers": layers}


def _outside_tensors(model: nn.Module) -> tuple[dict, dict, dict]:
    """collect_tensors of everything outside the decoder stack (the stack is detached meanwhile)."""
    prefix, layers = decoder_layers(model)
    parent, _, child = prefix.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    setattr(owner, child, nn.ModuleList())
    try:
        return collect_tensors(model)
    finally:
        setattr(owner, child, layers)


def write_safetensors_streaming(path: Path, specs: list[tuple[str, str, list[int]]], read, metadata: dict) -> dict:
    """safetensors file written tensor by tensor: header from (name, dtype, shape), then `read(names)`
    yields the tensors in that order (one group at a time). Returns {name: sha256_tensor}."""
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "U8": 1, "I8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1}
    header, off = {}, 0
    for n, dt, shape in specs:
        nbytes = sizes[dt] * int(torch.tensor(shape).prod().item() if shape else 1)
        header[n] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + nbytes]}
        off += nbytes
    header["__metadata__"] = metadata
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    sha = {}
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for group in read():
            for n, t in group.items():
                t = t.detach().contiguous().cpu()
                if _ST_DTYPES[t.dtype] != header[n]["dtype"] or list(t.shape) != header[n]["shape"]:
                    raise RuntimeError(f"offload export: {n} changed between header and data")
                f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
                sha[n] = sha256_tensor(t)
        f.flush()
        os.fsync(f.fileno())
    return sha


def export_offloaded(model: nn.Module, store: LayerStore, tokenizer, out: str | os.PathLike, recipe: dict | None = None,
                     report: dict | None = None, calibration: dict | None = None) -> Path:
    """The native export folder (same files as modelpress.export.save), assembled layer by layer."""
    out = Path(out)
    if out.exists() and not (out / MANIFEST).exists() and any(out.iterdir()):
        raise UserError(f"output folder {out} exists and is not a modelpress export: choose a new --out")
    with atomic_dir(out) as tmp:
        outside, modules, aliases = _outside_tensors(model)
        specs = [(n, _ST_DTYPES[t.dtype], list(t.shape)) for n, t in outside.items()]
        per_layer = []
        for i in range(len(store.layers)):
            sp, mods, al = store.layer_specs(i)
            specs += sp
            modules.update(mods)
            aliases.update(al)
            per_layer.append([n for n, _, _ in sp])

        def read():
            yield outside
            for i, names in enumerate(per_layer):
                yield store.read(i, names)

        sha = write_safetensors_streaming(tmp / WEIGHTS, specs, read, {"format": FORMAT})
        write_folder_files(tmp, model, tokenizer, str(store.dtype), modules, aliases, sha, recipe, report, calibration)
    return out


def run_recipe_offloaded(recipe, model_src: str | os.PathLike, out: str | os.PathLike) -> dict:
    """load skeleton -> calibrate -> compress layer by layer -> streamed native export (no evaluation:
    run `modelpress eval OUT` afterwards). Returns the report (also written as report.json)."""
    from transformers import AutoTokenizer

    from .calib import calibration_set
    from .model import REFERENCE, smollm2_dir
    src = Path(smollm2_dir() if str(model_src) == REFERENCE else model_src)
    if not (src / "config.json").exists():
        raise UserError(f"--offload needs a local HF folder with config.json and safetensors shards, got {model_src}")
    tok = AutoTokenizer.from_pretrained(src)
    check_recipe(recipe)
    c = recipe.calibration
    calib = (calibration_set(tok, c.source, c.select, c.samples, c.seqlen, c.seed, c.field, None)
             if recipe.needs_calibration else None)
    work = Path(f"{out}.offload")
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        model, store, stages = compress_offloaded(src, recipe, calib, work)
        report = {"model": str(model_src), "recipe": recipe.to_dict(), "offload": True,
                  "compress_seconds": time.perf_counter() - t0,
                  "stages": [{"name": s["name"], "summary": s["summary"], "seconds": s["seconds"]} for s in stages]}
        if calib is not None:
            report["calibration"] = calib.provenance
        export_offloaded(model, store, tok, out, recipe.to_dict(), report,
                         calib.provenance if calib is not None else None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["export"] = str(out)
    return report
