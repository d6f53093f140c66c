"""The verbs, each a short straight-line function:
load -> calibration_set -> compress -> evaluate -> (certify) -> export."""
from __future__ import annotations

import copy
import inspect
import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

from . import model as _model
from .calib import CalibrationSet
from .calib import calibration_set as _calibration_set
from .calib import sources
from .engine.checkpoint import Run
from .eval import eval_windows, evaluate as _evaluate, size_report
from .errors import UserError
from .export import load_model, save
from .export.native import storage_dtype as _storage_dtype, to_storage as _to_storage
from .recipe import Recipe

log = logging.getLogger("modelpress")


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
                    field="text", model=None) -> CalibrationSet:
    """Token windows for calibration with provenance.

    >>> calib = modelpress.calibration_set(tok, "wiki", samples=32, seqlen=256)
    """
    return _calibration_set(tokenizer, source, select, samples, seqlen, seed, field, model)


def compress(model: nn.Module, recipe: Recipe, calib: CalibrationSet | None = None, run: Run | None = None) -> list[dict]:
    """Apply the recipe's stages in order (or planned order) to `model` in place; returns per-stage stats.
    With `run` (a modelpress.engine.checkpoint.Run), progress is checkpointed per stage and per decoder layer,
    and a run interrupted earlier resumes from its last finished layer.

    >>> stats = modelpress.compress(model, Recipe.from_yaml("w4a16-gptq-g128"), calib)
    """
    stages = recipe.stages
    if recipe.order == "auto":
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
        if run is not None and "checkpoint" in inspect.signature(cfg.apply).parameters:
            st = cfg.apply(model, calib, checkpoint=run.checkpoint(k))
        else:
            st = cfg.apply(model, calib)
        st = {"name": name, "config": Recipe.stage_dict(name, cfg),
              "seconds": time.perf_counter() - t0, **st}
        log.info(st["summary"])
        if run is not None:
            run.finish_stage(k, model, st)
        out.append(st)
    return out


def windows_for(tokenizer, text: str = "wiki-eval", seqlen: int | None = None, windows: int | None = 32):
    return eval_windows(tokenizer, sources.texts(text, "eval"), seqlen, windows)


def evaluate(model: nn.Module, tokenizer, reference: nn.Module | None = None, text: str = "wiki-eval",
             seqlen: int | None = None, windows: int = 32, batch_size: int = 2) -> dict:
    """Perplexity (and agreement/KL against `reference`) with the frozen protocol, plus size accounting.

    >>> modelpress.evaluate(compressed, tok, reference=original)["agreement"]
    """
    w = windows_for(tokenizer, text, seqlen, windows)
    res = _evaluate(model, w, reference, batch_size)
    res.pop("per_token", None)
    res["size"] = {k: v for k, v in size_report(model).items() if k != "layers"}
    return res


def run_recipe(recipe: Recipe, model_src: str | None = None, out: str | Path | None = None,
               evaluate_models: bool = True, resume: bool = False, checkpoint: bool = True) -> dict:
    """The whole pipeline for one recipe: load, calibrate, compress, evaluate against the original,
    export. Returns the report (also written to the export as report.json). With an output folder,
    progress is checkpointed in `<out>.partial/` (removed on success); `resume=True` continues an
    interrupted run from its last finished decoder layer.

    >>> rep = modelpress.run_recipe(Recipe.from_yaml("w4a16-gptq-g128"), "smollm2", "out/smollm2-w4")
    >>> rep["eval"]["compressed"]["agreement"], rep["size"]["bits_per_weight"]
    """
    src = model_src or recipe.model or _model.REFERENCE
    model, tok = load(src, recipe.dtype)
    dest = out or (recipe.export.path if recipe.export else None)
    export_notes = _export_preflight(model, recipe) if dest else []     # before any compression starts
    original = copy.deepcopy(model) if evaluate_models else None
    c = recipe.calibration
    calib = (calibration_set(tok, c.source, c.select, c.samples, c.seqlen, c.seed, c.field, model)
             if recipe.needs_calibration else None)
    run = (Run(f"{dest}.partial", recipe.to_dict(), calib.sha256() if calib is not None else None, resume)
           if dest and checkpoint else None)
    t0 = time.perf_counter()
    stages = compress(model, recipe, calib, run)
    elapsed = time.perf_counter() - t0
    storage = _storage_dtype(model, recipe.export.dtype)
    _to_storage(model, storage)        # evaluate exactly what the export stores (16-bit unquantized tensors)
    size = size_report(model, storage)
    report = {"model": str(src), "recipe": recipe.to_dict(), "size": {k: v for k, v in size.items() if k != "layers"},
              "compress_seconds": elapsed,
              "stages": [{"name": s["name"], "summary": s["summary"], "seconds": s["seconds"]} for s in stages],
              "layers": _layer_table(stages, size)}
    if evaluate_models:
        e = recipe.evaluate
        w = windows_for(tok, e.text, e.seqlen, e.windows)
        orig = _evaluate(original, w, None, e.batch_size)
        comp = _evaluate(model, w, original if e.agreement else None, e.batch_size)
        comp.pop("per_token", None)
        report["eval"] = {"protocol": "modelpress-eval/1", "text": e.text,
                          "original": {**orig, "bits_per_weight": 16.0, "bytes": size["original_bytes"]},
                          "compressed": comp}
    if calib is not None:
        report["calibration"] = calib.provenance
    if dest:
        report["exports"] = {"native": {"path": str(dest)}}
        if export_notes:
            report["export_notes"] = export_notes
        save(model, tok, dest, recipe=recipe.to_dict(), report=report,
             calibration=calib.provenance if calib is not None else None, dtype=storage)
        report["export"] = str(dest)
        _other_formats(model, tok, recipe, Path(dest), storage, report)
        if recipe.certify and original is not None:
            from .certify import certificate as _certify
            cert = _certify.certify_recipe_block(recipe.certify, original, model, tok, recipe=recipe, calibration=calib)
            _certify.save(cert, dest)              # last write: the certificate covers every file
            report["certificate"] = cert.to_dict()
        if run is not None:
            run.close()
    report["_model"], report["_original"], report["_tokenizer"] = model, original, tok
    return report


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
                path = save_compressed_tensors(model, tok, dest / "compressed-tensors", dtype=storage)
                report["exports"][fmt] = {"path": str(path)}
                report["export_compressed_tensors"] = str(path)
            elif fmt == "gguf":
                from .export.gguf import save_gguf
                report["export_gguf"] = save_gguf(model, tok, dest / "model.gguf")["summary"]
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
