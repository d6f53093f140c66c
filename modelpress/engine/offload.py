"""Compress models larger than memory, layer by layer from safetensors shards (disk offload), resumable.

Tensors are read with positioned reads from the shard files (their safetensors header parsed here), never
through a memory map: the pages of a mapped file count in the resident set once touched. Every compressed
layer is written to `<out>.offload/stage<k>/layer<i>.safetensors` (the format of
modelpress.engine.checkpoint.save_module) atomically, its sha256 recorded in `stage<k>/progress.json` after it
is in place, so a run killed at any instant resumes (`resume=True`, `compress --offload --resume`) from
the last finished layer and writes the same export as an uninterrupted run.

  calibration-free stages (RTN quantize, magnitude prune) run one linear at a time with no model built
    at all (the structure comes from the shard names and config.json): RTN reads its weight in row
    chunks and writes packed codes chunk by chunk (codes equal modelpress.algos.quant.rtn's: every
    quantity is per row), the SQNR comes from running sums; a magnitude mask needs one whole linear;
  calibrated stages (GPTQ arXiv 2210.17323, SparseGPT arXiv 2301.00774, Wanda arXiv 2306.11695) run
    through modelpress.engine.layerwise on a meta-device skeleton with the LayerStore below as its checkpoint:
    one decoder layer is materialized at a time; the input embedding only while the layer-0 inputs are
    captured; lm_head never. The inputs of the next layer are saved with each finished layer.
Stages with a cross-layer budget (prune budget != uniform, cluster, lowrank, lossless, safety_prune) or
`order: auto` / `measured` need the whole model and are refused with a UserError.

The native export is written by streaming: the safetensors header comes from the shapes, then every
tensor is copied in row chunks (shards, layer files) into `model.safetensors`, so the whole model, or
even one embedding matrix, is never resident."""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..io import atomic_save_file
from ..model import CONV1D_MODELS
from ..progress import timed
from .memory import large_allocations_mapped, trim_heap
from .shards import _SIZES, _ST_DTYPES, Entry, SafeFile, Shards, Src, write_streaming
from .store import LayerStore, RawConfig, _ConfigOnly, skeleton, structure_from_model, structure_from_shards

SUPPORTED = ("quantize", "prune")


def check_recipe(recipe) -> None:
    if recipe.order != "as-written":
        raise UserError("--offload runs the stages as written: set `order: as-written` in the recipe")
    from ..calib.select import MODEL_BASED
    if recipe.needs_calibration and recipe.calibration.select in MODEL_BASED:
        raise UserError(f"calibration.select {recipe.calibration.select} runs the whole model over the pool and "
                        "cannot run with --offload: choose random, zipcal-coverage or zipcal-words")
    for name, cfg in recipe.stages:
        if name not in SUPPORTED:
            raise UserError(f"stage {name} needs the whole model in memory and cannot run with --offload "
                            f"(offload supports {', '.join(SUPPORTED)}): drop --offload or the stage")
        if getattr(cfg, "budget", "uniform") != "uniform":
            raise UserError(f"{name}.budget {cfg.budget} allocates across all layers and cannot run with --offload: "
                            "use budget: uniform")


def _calibrated(cfg) -> bool:
    return getattr(cfg, "method", None) in ("gptq", "wanda", "sparsegpt") or getattr(cfg, "needs_calibration", False)


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
        from ..model import decoder_layers
        struct = structure_from_model(model)
        layers = decoder_layers(model)[1]
    store = LayerStore(struct, shards, work, dtype, layers)
    out = []
    for k, (name, cfg) in enumerate(recipe.stages):
        head = {"name": name, "config": recipe.stage_dict(name, cfg)}
        t0 = time.perf_counter()
        if store.begin_stage(k):
            st = store.progress["stats"]
        elif _calibrated(cfg):
            if calib is None:
                raise UserError(f"{name}.method {cfg.method} needs calibration data: add a `calibration:` block")
            store.retype()
            st = timed(f"stage {k + 1}/{len(recipe.stages)}: {name}", cfg.apply, model, calib, checkpoint=store)
            store.save_final([(i, layer) for i, layer in enumerate(store.layers)
                              if any(not p.is_meta for p in layer.parameters())], st)
        else:
            st = timed(f"stage {k + 1}/{len(recipe.stages)}: {name}", _per_linear, store, name, cfg)
            store.finish_stage(st)
        out.append({**head, "seconds": time.perf_counter() - t0, **st})
    return model, store, out


def _meta_linear(o: int, i: int, bias: bool) -> nn.Linear:
    return nn.Linear(i, o, bias=bias, device="meta")


def rtn_entries(w: Src, bias: Src | None, out_f: int, in_f: int, cfg, dtype: torch.dtype
                ) -> tuple[list[Entry], dict, Callable[[], dict]]:
    """RTN (modelpress.algos.quant.rtn) of one plain linear read in row chunks, as the entries of its
    QuantLinear state (identical to QuantLinear.to_state), its module config, and a function giving its
    stats (sqnr, sparsity) once the entries are written. Every RTN quantity is per row, so the codes equal
    the whole-matrix call; chunks are multiples of 8 rows, so packed chunks concatenate to the packed
    whole; the SQNR comes from float64 running sums instead of full-size float64 copies."""
    from ..algos import quant
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
    from ..modules import MODULE_TYPES
    quantize = hasattr(cfg, "quantize_one")            # a quantize stage (else prune: prune_one)
    out_f, in_f, has_bias = shape
    pre = rel + "."
    if rel not in modules and quantize and cfg.method == "rtn":
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
    new, info = cfg.quantize_one(full, lin, None) if quantize else cfg.prune_one(full, lin, None)
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


def _stored(name: str, src: Src, modules: dict, storage: torch.dtype | None) -> Entry:
    """The export entry of one tensor: cast to `storage` where modelpress.export.native.storage_names would
    (a floating tensor wider than it, plain or one of its compressed module's `storage_keys`)."""
    from ..modules import MODULE_TYPES
    st = _ST_DTYPES.get(storage) if storage is not None else None
    if st is None or src.out_dtype not in ("F32", "F64") or _SIZES[src.out_dtype] <= storage.itemsize:
        return Entry.of(name, src)
    owner = next((m for m in modules if name.startswith(m + ".")), None)
    if owner is not None and name[len(owner) + 1:] not in getattr(MODULE_TYPES[modules[owner]["kind"]], "storage_keys", ()):
        return Entry.of(name, src)
    return Entry.of(name, replace(src, dtype=st))


def export_offloaded(model, store: LayerStore, tokenizer, out: str | os.PathLike, recipe: dict | None = None,
                     report: dict | None = None, calibration: dict | None = None,
                     storage: torch.dtype | None = None) -> Path:
    """The native export folder (same files as modelpress.export.save), streamed tensor by tensor in row
    chunks from the shards and the layer files. `tokenizer`: a tokenizer object (saved with
    save_pretrained), or the model folder, whose tokenizer files are copied as they are. `storage`: the dtype
    unquantized floating tensors are stored in (modelpress.export.native.storage_dtype; None: as computed)."""
    from ..export.native import FORMAT, MANIFEST, WEIGHTS, write_folder_files
    from ..io import atomic_dir
    out = Path(out)
    if out.exists() and not (out / MANIFEST).exists() and any(out.iterdir()):
        raise UserError(f"output folder {out} exists and is not a modelpress export: choose a new --out")
    st = store.struct
    store.verify()
    with atomic_dir(out) as tmp:
        srcs, modules = store.outside_sources()
        pairs = list(srcs.items())
        aliases = dict(st.aliases)
        for i in range(st.n_layers):
            lsrcs, mods, al = store.layer_sources(i)
            pre = f"{st.prefix}.{i}."
            pairs += [(pre + n, s) for n, s in lsrcs.items()]
            modules.update({pre + k: v for k, v in mods.items()})
            aliases.update({pre + k: pre + v for k, v in al.items()})
        entries = [_stored(n, s, modules, storage) for n, s in pairs]
        cast = [e.name for e, (_, s) in zip(entries, pairs) if e.dtype != s.out_dtype]
        sha, _ = write_streaming(tmp / WEIGHTS, entries, {"format": FORMAT})
        if report is not None and isinstance(report.get("size"), dict):
            report["size"]["file_bytes"] = (tmp / WEIGHTS).stat().st_size
            report["size"]["storage_dtype"] = str(storage or store.dtype).replace("torch.", "")
        if isinstance(tokenizer, (str, os.PathLike)):
            for p in sorted(Path(tokenizer).iterdir()):
                if p.is_file() and TOKENIZER_FILES.match(p.name):
                    shutil.copyfile(p, tmp / p.name)
            tokenizer = None
        write_folder_files(tmp, model, tokenizer, str(store.dtype), modules, aliases, sha, recipe, report, calibration,
                           storage=None if storage is None else {"dtype": str(storage).replace("torch.", ""),
                                                                 "upcast": cast})
    return out


def fingerprint(recipe, calib, model_src) -> str:
    """The hash of a run's inputs (recipe, calibration set, model) that a resumed run must match."""
    blob = json.dumps({"recipe": recipe.to_dict(), "calib": calib.sha256() if calib is not None else None,
                       "model": str(model_src)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def run_recipe_offloaded(recipe, model_src: str | os.PathLike, out: str | os.PathLike, resume: bool = False) -> dict:
    """load structure -> calibrate -> compress layer by layer -> streamed native export (no evaluation:
    run `modelpress eval OUT` afterwards). Progress lives in `<out>.offload/` until the export is written;
    a run interrupted at any point continues with resume=True and writes the same files as an
    uninterrupted run (the wall-clock times are therefore only in the returned report, not in
    report.json). Returns the report."""
    from ..calib import calibration_set
    from ..model import REFERENCES, reference_dir
    src = Path(reference_dir(str(model_src)) if str(model_src) in REFERENCES else model_src)
    if not (src / "config.json").exists():
        raise UserError(f"--offload needs a local HF folder with config.json and safetensors shards, got {model_src}")
    check_recipe(recipe)
    calib = None
    if recipe.needs_calibration:         # the tokenizer classes cost ~80 MB of imports: only when needed
        from transformers import AutoTokenizer
        c = recipe.calibration
        calib = calibration_set(AutoTokenizer.from_pretrained(src), c.source, c.select, c.samples, c.seqlen,
                                c.seed, c.field, None, c.protocol)
    work = Path(f"{out}.offload")
    fp = fingerprint(recipe, calib, model_src)
    from .checkpoint import RunLock, claim
    lock = RunLock(work, out)           # a second run into the same --out is told this one is running
    claim(work, fp, resume, "recipe, model or calibration set")
    t0 = time.perf_counter()
    with large_allocations_mapped():
        model, store, stages = compress_offloaded(src, recipe, calib, work)
    report = {"model": str(model_src), "recipe": recipe.to_dict(), "offload": True,
              "stages": [{"name": s["name"], "summary": s["summary"]} for s in stages]}
    if calib is not None:
        report["calibration"] = calib.provenance
    from ..export.native import storage_dtype_of
    storage = storage_dtype_of(store.dtype, json.loads((src / "config.json").read_text()).get("dtype"),
                               recipe.export.dtype)
    export_offloaded(model, store, src, out, recipe.to_dict(), report,
                     calib.provenance if calib is not None else None, storage)
    shutil.rmtree(work, ignore_errors=True)
    lock.release()
    report["compress_seconds"] = time.perf_counter() - t0
    for r, s in zip(report["stages"], stages):
        r["seconds"] = s["seconds"]
    report["export"] = str(out)
    return report
