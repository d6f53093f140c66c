"""The verbs, each a short straight-line function:
load -> calibration_set -> compress -> evaluate -> (certify) -> export."""
from __future__ import annotations

import copy
import gc
import inspect
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from . import model as _model
from .calib import CalibrationSet
from .calib import calibration_set as _calibration_set
from .calib.protocol import describe as describe_protocol
from .calib import sources
from .engine.checkpoint import Run, RunLock
from .errors import UserError
from .eval import eval_windows, evaluate as _evaluate_windows, size_report
from .eval.perplexity import ReferenceScores, reference_scores
from .export import load_model, save
from .progress import timed
from .export.native import storage_dtype as _storage_dtype, to_storage as _to_storage
from .recipe import Recipe

log = logging.getLogger("modelpress")


def _evaluate(model, *args, **kwargs):
    """modelpress.eval.evaluate with progress lines (long runs talk, also in logs)."""
    return timed("evaluation", _evaluate_windows, model, *args, progress="evaluation batches", **kwargs)


def load(src: str = _model.REFERENCE, dtype: str | torch.dtype = torch.float32):
    """Load (model, tokenizer) from "smollm2", a modelpress export, an HF folder, a .gguf file or a hub id.

    >>> model, tok = modelpress.load("smollm2")
    """
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    m, tok = load_model(src)
    if (Path(str(src)) / "modelpress.json").exists():
        return m, tok          # an export keeps its own dtype (its logits must match exactly)
    return m.to(dtype), tok


def calibration_set(tokenizer, source="wiki", select="random", samples=128, seqlen=512, seed=0,
                    field="text", model=None, protocol: str = "modelpress-eval/2") -> CalibrationSet:
    """Token windows for calibration with provenance.

    >>> calib = modelpress.calibration_set(tok, "wiki", samples=32, seqlen=256)
    """
    return _calibration_set(tokenizer, source, select, samples, seqlen, seed, field, model, protocol)


def compress(model: nn.Module, recipe: Recipe, calib: CalibrationSet | None = None, run: Run | None = None) -> list[dict]:
    """Apply the recipe's stages in order (or planned order) to `model` in place; returns per-stage stats.
    With `run` (a modelpress.engine.checkpoint.Run), progress is checkpointed per stage and per decoder layer,
    and a run interrupted earlier resumes from its last finished layer.

    >>> stats = modelpress.compress(model, Recipe.from_yaml("w4a16-gptq-g128"), calib)
    """
    stages = recipe.stages
    if recipe.order != "as-written":
        from .plan import order_stages
        stages = order_stages(model, recipe, calib)
    out = []
    last_done = max((k for k in range(len(stages)) if run is not None and run.finished(k)), default=-1)
    for k, (name, cfg) in enumerate(stages):
        if k <= last_done:
            if k == last_done:
                run.restore_stage(k, model)
            out.append(json.loads((run.stage_dir(k) / "stats.json").read_text()))
            continue
        t0 = time.perf_counter()
        label = f"stage {k + 1}/{len(stages)}: {name}"
        if run is not None and "checkpoint" in inspect.signature(cfg.apply).parameters:
            st = timed(label, cfg.apply, model, calib, checkpoint=run.checkpoint(k))
        else:
            st = timed(label, cfg.apply, model, calib)
        st = {"name": name, "config": Recipe.stage_dict(name, cfg),
              "seconds": time.perf_counter() - t0, **st}
        log.info(st["summary"])
        if run is not None:
            run.finish_stage(k, model, st)
        out.append(st)
    return out


def windows_for(tokenizer, text: str = "wiki-eval", seqlen: int | None = None, windows: int | None = 32,
                protocol: str = "modelpress-eval/2"):
    if (seqlen is not None and seqlen < 2) or (windows is not None and windows < 1):
        raise UserError(f"evaluation needs seqlen >= 2 and windows >= 1, got seqlen {seqlen}, windows {windows}")
    return eval_windows(tokenizer, sources.texts(text, "eval"), seqlen, windows, protocol)


def evaluate(model: nn.Module, tokenizer, reference: nn.Module | ReferenceScores | None = None,
             text: str = "wiki-eval", seqlen: int | None = None, windows: int = 32, batch_size: int = 2,
             protocol: str = "modelpress-eval/2") -> dict:
    """Perplexity (and agreement/KL against `reference`: a model, or its ReferenceScores on the same windows)
    with the frozen protocol, plus size accounting.

    >>> modelpress.evaluate(compressed, tok, reference=original)["agreement"]
    """
    w = windows_for(tokenizer, text, seqlen, windows, protocol)
    res = _evaluate(model, w, reference, batch_size)
    res.pop("per_token", None)
    res["size"] = {k: v for k, v in size_report(model).items() if k != "layers"}
    return res


def run_recipe(recipe: Recipe, model_src: str | None = None, out: str | Path | None = None,
               evaluate_models: bool = True, resume: bool = False, checkpoint: bool = True,
               streaming: bool | None = None, return_model: bool = True) -> dict:
    """The whole pipeline for one recipe: load, calibrate, compress, evaluate against the original,
    export. Returns the report (also written to the export as report.json). With an output folder,
    progress is checkpointed in `<out>.partial/` (removed on success); `resume=True` continues an
    interrupted run from its last finished decoder layer.

    streaming (None: wherever it can; True: required; False: never): the run goes layer by layer from the
    model's safetensors shards (modelpress.engine.stream scores the original on the evaluation windows,
    modelpress.engine.offload compresses and writes the export, the compressed model is then loaded from the
    export for its evaluation), so the whole original model is never resident; the figures are those of the
    in-memory run. It needs an output folder, a local safetensors model (a reference name or an HF folder)
    and stages that work one layer at a time (see _why_not_streamed). In memory, no copy of the original is
    kept either: it is scored on the evaluation windows before compression (ReferenceScores), and reloaded
    from `model_src` only for a `certify:` block (report["_original"] is None). Streamed, the compressed model
    is scored layer by layer from the export too and loaded whole only for report["_model"] (return_model),
    other export formats or a certificate.

    >>> rep = modelpress.run_recipe(Recipe.from_yaml("w4a16-gptq-g128"), "smollm2", "out/smollm2-w4")
    >>> rep["eval"]["compressed"]["agreement"], rep["size"]["bits_per_weight"]
    """
    src = model_src or recipe.model or _model.REFERENCE
    dest = out or (recipe.export.path if recipe.export else None)
    lock = check_before_loading(recipe, dest, resume, evaluate_models) if dest else None
    why = "streaming off" if streaming is False else _why_not_streamed(recipe, src, dest, checkpoint)
    if why is None:
        from .engine.memory import large_allocations_mapped
        with large_allocations_mapped():   # freed temporaries >= 1 MB go back to the OS in every phase
            return _run_streamed(recipe, src, dest, evaluate_models, resume, lock, return_model)
    if streaming:
        raise UserError(f"this run cannot go layer by layer from the shards: {why}")
    model, tok = timed(f"load {src}", load, src, recipe.dtype)
    export_notes = _export_preflight(model, recipe) if dest else []     # before any compression starts
    refs: dict[str, ReferenceScores] = {}
    e = recipe.evaluate
    if evaluate_models:                  # the original is scored before compressing in place; no copy is kept
        for text in _texts(recipe):
            refs[text] = timed(f"scoring the original on {text}", reference_scores, model,
                               windows_for(tok, text, e.seqlen, e.windows, e.protocol), e.batch_size,
                               progress=f"original on {text}: batches")
        if e.agreement and any(r.head is not None for r in refs.values()):
            # one copy of the original output layer (not of the model): compression or the export's 16-bit
            # storage may change the model's own in place, and the reference must score with the original's
            head = copy.deepcopy(model.get_output_embeddings())
            for r in refs.values():
                r.head = head
    c = recipe.calibration
    calib = (timed("calibration set", calibration_set, tok, c.source, c.select, c.samples, c.seqlen, c.seed, c.field,
                   model, c.protocol) if recipe.needs_calibration else None)
    run = (Run(f"{dest}.partial", recipe.to_dict(), calib.sha256() if calib is not None else None, resume, lock)
           if dest and checkpoint else None)
    t0 = time.perf_counter()
    stages = compress(model, recipe, calib, run)
    elapsed = time.perf_counter() - t0
    storage = _storage_dtype(model, recipe.export.dtype)
    _to_storage(model, storage)        # evaluate exactly what the export stores (16-bit unquantized tensors)
    size = size_report(model, storage)
    report = _report(src, recipe, size, elapsed, stages)
    _evaluate_against(model, refs, report, src, recipe, describe_protocol(tok, e.protocol), size)
    if dest:
        _note_exports(report, calib, dest, export_notes)
        timed(f"export {dest}", save, model, tok, dest, recipe=recipe.to_dict(), report=report,
              calibration=calib.provenance if calib is not None else None, dtype=storage)
        _finish(model, tok, recipe, src, dest, storage, report, calib, evaluate_models)
        if run is not None:
            run.close()
    elif calib is not None:
        report["calibration"] = calib.provenance
    report["_model"], report["_original"], report["_tokenizer"] = model, None, tok
    return report


def _texts(recipe: Recipe) -> list[str]:
    e = recipe.evaluate
    return list(dict.fromkeys(t for t in (e.text, e.off_domain) if t))


def _why_not_streamed(recipe: Recipe, src, dest, checkpoint: bool) -> str | None:
    """Why this run cannot go layer by layer from the shards (None: it can)."""
    from .engine.offload import check_recipe
    if not dest or not checkpoint:
        return "it needs an output folder (--out) with checkpoints"
    try:
        check_recipe(recipe)
    except UserError as e:
        return str(e)
    if streamable_folder(src) is None:
        return (f"{src} is not a reference name or a local folder with config.json and safetensors shards of a "
                "model that stores its linears as (out, in) (GPT-2's Conv1D does not)")
    return None


def streamable_folder(src) -> Path | None:
    """The local HF folder (a reference's cached conversion, or `src` itself) whose safetensors shards the
    layer-by-layer engine can read, or None."""
    if str(src) in _model.REFERENCES:
        return _model.reference_dir(str(src))
    p = Path(str(src))
    if not (p / "config.json").is_file() or (p / "modelpress.json").exists() or not (
            (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file()):
        return None
    try:
        mtype = json.loads((p / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None                                  # (a broken config: the loader reports it)
    return None if mtype in _model.CONV1D_MODELS else p


def _run_streamed(recipe: Recipe, src, dest, evaluate_models: bool, resume: bool, lock, return_model: bool) -> dict:
    """run_recipe layer by layer from the shards (see run_recipe)."""
    from .engine.checkpoint import claim
    from .engine.memory import large_allocations_mapped
    from .engine.offload import compress_offloaded, export_offloaded, fingerprint
    from .engine.store import skeleton
    from .engine.stream import export_scores_streamed, export_size, reference_scores_streamed
    from .export.native import storage_dtype_of
    folder = streamable_folder(src)
    dtype = getattr(torch, recipe.dtype)
    tok = _model.load_tokenizer(folder)
    shell, _ = skeleton(folder, dtype)             # the shapes, for the export formats' checks
    export_notes = _export_preflight(shell, recipe)
    source_dtype = getattr(shell.config, "dtype", None)
    del shell
    e = recipe.evaluate
    windows = {t: windows_for(tok, t, e.seqlen, e.windows, e.protocol) for t in _texts(recipe)} if evaluate_models else {}
    c = recipe.calibration
    calib = (timed("calibration set", calibration_set, tok, c.source, c.select, c.samples, c.seqlen, c.seed, c.field,
                   None, c.protocol) if recipe.needs_calibration else None)
    protocol = describe_protocol(tok, e.protocol)
    tok = None                        # (~50-100 MB: the export copies the folder's tokenizer files)
    gc.collect()
    work = Path(f"{dest}.partial")
    claim(work, fingerprint(recipe, calib, src), resume, "recipe, model or calibration set")
    refs: dict[str, ReferenceScores] = {}
    for j, (text, w) in enumerate(windows.items()):
        r = timed(f"scoring the original on {text}, layer by layer", reference_scores_streamed, folder, w,
                  e.batch_size, dtype, progress=f"original on {text}")
        r.release_head()               # read again from the shards if the compressed model's output layer differs
        r.park(work / f"reference{j}.safetensors")      # its hidden states wait on disk, read per batch when used
        refs[text] = r
    t0 = time.perf_counter()
    with large_allocations_mapped():
        shell, store, stages = compress_offloaded(folder, recipe, calib, work)
    elapsed = time.perf_counter() - t0
    storage = storage_dtype_of(dtype, source_dtype, recipe.export.dtype)
    report = {"model": str(src), "recipe": recipe.to_dict(), "size": {}}
    _note_exports(report, calib, dest, export_notes)
    timed(f"export {dest}", export_offloaded, shell, store, folder, dest, recipe.to_dict(), report,
          calib.provenance if calib is not None else None, storage)
    del shell, store
    sized: dict = {}

    def score(text: str, ref: ReferenceScores) -> ReferenceScores:   # the compressed model, layer by layer
        sc, size = timed(f"scoring the compressed model on {text}, layer by layer", export_scores_streamed, dest,
                         ref.windows, e.batch_size, progress=f"compressed on {text}")
        sized.setdefault("size", size)
        sc.park(work / "compressed.safetensors")      # its states too are read back one batch at a time
        return sc
    _evaluate_against(score, refs, report, src, recipe, protocol)
    shutil.rmtree(work, ignore_errors=True)
    size = sized.get("size") or timed(f"size of {dest}", export_size, dest)
    head = {k: v for k, v in report.items() if k not in ("model", "recipe", "size")}
    report = {**_report(src, recipe, {**size, **report["size"]}, elapsed, stages), "streamed": True, **head}
    if "eval" in report:
        for entry in (report["eval"], report["eval"].get("off_domain")):
            if entry:
                entry["original"]["bytes"] = size["original_bytes"]
    model = None
    if return_model or len(recipe.export.formats) > 1 or (recipe.certify and evaluate_models):
        model, tok = timed(f"load {dest}", load, dest)
    _finish(model, tok, recipe, src, dest, storage, report, calib, evaluate_models)
    lock.release()
    report["_model"], report["_original"], report["_tokenizer"] = model, None, tok
    return report


def _report(src, recipe: Recipe, size: dict, elapsed: float, stages: list[dict]) -> dict:
    return {"model": str(src), "recipe": recipe.to_dict(), "size": {k: v for k, v in size.items() if k != "layers"},
            "compress_seconds": elapsed,
            "stages": [{"name": s["name"], "summary": s["summary"], "seconds": s["seconds"]} for s in stages],
            "layers": _layer_table(stages, size)}


def _evaluate_against(model, refs: dict[str, ReferenceScores], report: dict, src, recipe: Recipe, protocol: dict,
                      size: dict | None = None) -> None:
    """The compressed model (a model, or a function (text, ReferenceScores) -> its scores on those windows)
    scored against the original's scores, per evaluation text, into report["eval"]."""
    e = recipe.evaluate
    head = None
    streamed = callable(model) and not isinstance(model, nn.Module)
    for i, (text, ref) in enumerate(refs.items()):
        comp_model = model(text, ref) if streamed else model
        if e.agreement:
            head = restore_reference_head(ref, comp_model, src, recipe.dtype, head)
        comp = _evaluate(comp_model, ref.windows, ref if e.agreement else None, e.batch_size)
        comp.pop("per_token", None)
        del comp_model
        ref.hidden = ref.logits = None          # this text is done: its states can go
        if streamed:                            # and its output layer: read again for the next text, so that it
            ref.head = head = None              # is not resident while the compressed model is scored
        entry = {"text": text, "original": {**ref.evaluation(), "bits_per_weight": 16.0,
                                            "bytes": size["original_bytes"] if size else None}, "compressed": comp}
        if i == 0:
            report["eval"] = {**protocol, **entry}
        else:
            report["eval"]["off_domain"] = entry
    refs.clear()


def _note_exports(report: dict, calib, dest, export_notes: list[str]) -> None:
    if calib is not None:
        report["calibration"] = calib.provenance
    report["exports"] = {"native": {"path": str(dest)}}
    if export_notes:
        report["export_notes"] = export_notes


def _finish(model: nn.Module, tok, recipe: Recipe, src, dest, storage: torch.dtype, report: dict, calib,
            evaluate_models: bool) -> None:
    """After the native export: the other formats, then the certificate (the last write: it covers every file)."""
    report["export"] = str(dest)
    _other_formats(model, tok, recipe, Path(dest), storage, report)
    if recipe.certify and evaluate_models:
        from .certify import certificate as _certify
        original = load(src, recipe.dtype)[0]         # reloaded from its source, only for the certificate
        cert = timed("certificate", _certify.certify_recipe_block, recipe.certify, original, model, tok, recipe=recipe,
                     calibration=calib)
        del original
        _certify.save(cert, dest)
        report["certificate"] = cert.to_dict()


def check_before_loading(recipe: Recipe, dest, resume: bool, evaluate_models: bool) -> RunLock:
    """Everything that can be checked from the recipe and arguments, before the model is loaded: the
    output folder (not a foreign folder, not a live run's), the calibration and evaluation texts. Returns
    the run lock on `<dest>.partial` (held until the run closes)."""
    from .export.native import MANIFEST
    d = Path(dest)
    if d.exists() and (not d.is_dir() or (not (d / MANIFEST).exists() and any(d.iterdir()))):
        raise UserError(f"output folder {d} exists and is not a modelpress export: choose a new --out")
    parent = next(p for p in d.absolute().parents if p.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write the output folder {d}: {parent} is not writable; choose another --out")
    if recipe.needs_calibration:
        sources.texts(recipe.calibration.source, "calib", recipe.calibration.field)
    if evaluate_models:
        for text in (recipe.evaluate.text, recipe.evaluate.off_domain):
            if text:
                sources.texts(text, "eval")
    lock = RunLock(f"{d}.partial", d)
    if (Path(f"{d}.partial") / "fingerprint.json").exists() and not resume:
        lock.release()
        raise UserError(f"an interrupted run exists in {d}.partial: pass --resume to continue it, "
                        "or delete that folder to start over")
    return lock


def restore_reference_head(ref: ReferenceScores, model: nn.Module, src, dtype, known: nn.Module | None = None):
    """Make sure `ref` can score against `model`: when compression changed the output layer (in place or
    tied to a compressed embedding), the original's output layer (`known`, or reloaded from the source) is
    put back into `ref`. Returns the output layer `ref` will use."""
    if ref.hidden is None:
        return known
    try:
        return ref.head_for(model)
    except UserError:
        if known is None:
            dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
            folder = streamable_folder(src)
            if folder is not None:                  # read alone from the shards
                from .engine.stream import load_output_layer
                known = load_output_layer(folder, dtype)
            else:
                known = load(src, dtype)[0].get_output_embeddings()
        ref.head = known
        return ref.head_for(model)


def _export_preflight(model: nn.Module, recipe: Recipe) -> list[str]:
    """Every export format's constraints, checked from the recipe and the model's shapes before compressing."""
    notes = []
    if "compressed-tensors" in recipe.export.formats:
        from .export.compressed_tensors import preflight
        notes += preflight(model, recipe.stages)
    if "gguf" in recipe.export.formats:
        from .export import gguf
        if hasattr(gguf, "preflight"):                 # the GGUF writer's own checks, where it has them
            notes += gguf.preflight(model, recipe.stages)
    for n in notes:
        log.warning(n)
    return notes


def _other_formats(model: nn.Module, tok, recipe: Recipe, dest: Path, storage: torch.dtype, report: dict) -> None:
    """Write the formats besides native into the export folder. A format that fails is reported in
    report["exports"][fmt]["error"] (the native export, the before/after table and the other formats stand)."""
    from .export.native import update_report
    for fmt in recipe.export.formats:
        if fmt == "native":
            continue
        try:
            if fmt == "compressed-tensors":
                from .export.compressed_tensors import save_compressed_tensors
                path = timed("compressed-tensors export", save_compressed_tensors, model, tok,
                             dest / "compressed-tensors", dtype=storage)
                report["exports"][fmt] = {"path": str(path)}
                report["export_compressed_tensors"] = str(path)
            elif fmt == "gguf":
                from .export.gguf import save_gguf
                report["export_gguf"] = timed("GGUF export", save_gguf, model, tok, dest / "model.gguf")["summary"]
                report["exports"][fmt] = {"path": str(dest / "model.gguf")}
        except Exception as e:                 # noqa: BLE001 - reported, and `compress` exits non-zero
            log.error("export format %s failed: %s", fmt, e)
            report["exports"][fmt] = {"error": f"{type(e).__name__}: {e}" if not isinstance(e, UserError) else str(e)}
    update_report(dest, report)


def _layer_table(stages: list[dict], size: dict) -> dict:
    layers: dict = {}
    for s in stages:
        for name, info in (s.get("layers") or {}).items():
            row = layers.setdefault(name, {})
            row.update({k: v for k, v in info.items() if isinstance(v, (int, float, str))})
    for name, row in layers.items():
        if name in size["layers"]:
            row["bits"] = size["layers"][name]["bits"]
            row["kind"] = size["layers"][name]["kind"]
        if "sqnr" in row:
            row["error"] = 10 ** (-row["sqnr"] / 10) if row["sqnr"] != float("inf") else 0.0
    return layers
