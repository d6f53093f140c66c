"""`modelpress compress`, `eval` and `inspect`: the pipeline's own commands (load -> calibrate ->
compress -> evaluate -> export, and looking at what was exported)."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError

PROTOCOL_CHOICES = ("modelpress-eval/2", "modelpress-eval/1")


def add_parser(sub) -> tuple[str, ...]:
    c = sub.add_parser("compress", help="compress MODEL with a recipe, evaluate it and export it")
    c.add_argument("model", help='"smollm2", an HF folder, a .gguf file or a hub id')
    c.add_argument("--recipe", required=True, help="recipe YAML file or shipped recipe name")
    c.add_argument("--out", required=True, help="export folder")
    c.add_argument("--calib-source", metavar="SOURCE",
                   help="override calibration.source: wiki, novels, a .txt/.jsonl file, or parts joined by + "
                        "(wiki+novels: equal shares from each)")
    c.add_argument("--calib-select", metavar="METHOD",
                   help="override the recipe's calibration.select: how calibration windows are chosen "
                        "(random, or another selector of modelpress.calib.select)")
    c.add_argument("--calib-samples", type=int, metavar="N",
                   help="override calibration.samples: number of calibration windows (>= 1)")
    c.add_argument("--calib-seqlen", type=int, metavar="TOKENS",
                   help="override calibration.seqlen: tokens per calibration window (>= 2)")
    c.add_argument("--calib-seed", type=int, metavar="SEED", help="override calibration.seed (window selection)")
    c.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    c.add_argument("--protocol", choices=PROTOCOL_CHOICES,
                   help="calibration and evaluation windows (default modelpress-eval/2: start with the tokenizer's "
                        "BOS where it adds one; modelpress-eval/1: never, as the earlier figures)")
    c.add_argument("--resume", action="store_true", help="continue an interrupted run from its last finished layer")
    how = c.add_mutually_exclusive_group()
    how.add_argument("--offload", action="store_true",
                     help="require the layer-by-layer run (one decoder layer resident at a time, read from the "
                          "safetensors shards; the default wherever the recipe and model allow it) and fail "
                          "with the reason where it cannot be used")
    how.add_argument("--in-memory", action="store_true",
                     help="load the whole model and compress it in memory (needed by stages that work across "
                          "layers, chosen automatically for them)")
    e = sub.add_parser("eval", help="perplexity (and agreement with --reference) of a model or export")
    e.add_argument("model")
    e.add_argument("--reference", help="original model to compare with")
    e.add_argument("--text", default="wiki-eval", help="wiki-eval or a .txt/.jsonl file")
    e.add_argument("--seqlen", type=int, help="window length (default 512 on CPU, 2048 on GPU)")
    e.add_argument("--windows", type=int, default=32)
    e.add_argument("--protocol", choices=PROTOCOL_CHOICES, default="modelpress-eval/2",
                   help="evaluation windows: modelpress-eval/2 (BOS where the tokenizer adds one) or /1 (never)")
    e.add_argument("--tasks", help="lm-eval tasks instead of perplexity, e.g. hellaswag,arc_easy (needs lm-eval)")
    e.add_argument("--limit", type=float, help="lm-eval: documents per task (N) or fraction (< 1)")
    e.add_argument("--tasks-dir", help="lm-eval: folder of task YAMLs to run instead of the built-in tasks. It is "
                                        "code (`!function` tags import its Python files): needs --trust-tasks-code")
    e.add_argument("--trust-tasks-code", action="store_true",
                   help="allow --tasks-dir. DANGER: lm-eval imports and runs Python files named by the task YAMLs "
                        "with your permissions; use only folders you wrote or fully trust")
    i = sub.add_parser("inspect", help="show an export: modules, sizes, report, certificate; verify checksums")
    i.add_argument("dir")
    i.add_argument("--verify", action="store_true",
                   help="also rebuild the model (every tensor against its sha256 and shape, every module's config "
                        "against its tensors) and print the provenance hash chain (recipe, calibration, weights, "
                        "export) checked against the certificate")
    for name, fn in (("compress", cmd_compress), ("eval", cmd_eval), ("inspect", cmd_inspect)):
        sub.choices[name].set_defaults(pipeline_command=fn)
    return ("compress", "eval", "inspect")


def run(a) -> int:
    return a.pipeline_command(a)


def _table(rows: list[tuple], header: tuple) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(*header)
    for r in rows:
        t.add_row(*[f"{x:.4g}" if isinstance(x, float) else str(x) for x in r])
    Console().print(t)


def print_report(rep: dict) -> None:
    """The stages, the size headline (whole artifact vs the 16-bit original and the fp32 source: the same
    line in `compress`, `inspect` and the HTML report), the before/after table and the exports."""
    from ..eval.size import artifact_bytes, has_masks, headline
    s = rep["size"]
    for st in rep["stages"]:
        print(f"  {st['summary']}  ({st['seconds']:.1f} s)")
    print("size: " + headline(s))
    for note in rep.get("export_notes", []):
        print("  " + note)
    if "eval" in rep:
        ev = rep["eval"]
        o, c = ev["original"], ev["compressed"]
        src = ((rep.get("recipe") or {}).get("calibration") or {}).get("source")
        name = f"{ev.get('text', 'wiki-eval')}{_domain(ev.get('text'), src)}"
        rows = [("size (MB; original at 16 bits)", s["original_bytes"] / 1e6, (artifact_bytes(s) or 0) / 1e6),
                ("bits / parameter (whole artifact)", 16.0, 8 * (artifact_bytes(s) or 0) / s["params"]),
                ("bits / weight (compressed modules)", 16.0, s["bits_per_weight"])]
        if has_masks(rep.get("layers") or {}):
            rows.append(("sparsity (pruned modules, mask)", 0.0, _mean(rep["layers"], "sparsity")))
        rows.append((f"perplexity, {name}", o["perplexity"], c["perplexity"]))
        off = ev.get("off_domain")
        if off:
            rows.append((f"perplexity, {off['text']}{_domain(off['text'], src)}", off["original"]["perplexity"],
                         off["compressed"]["perplexity"]))
        rows += [(f"top-1 agreement with original, {ev.get('text', 'wiki-eval')}", 1.0, c.get("agreement", float("nan"))),
                 (f"mean KL(original || compressed), {ev.get('text', 'wiki-eval')}", 0.0, c.get("kl", float("nan")))]
        if off:
            rows.append((f"mean KL(original || compressed), {off['text']}", 0.0,
                         off["compressed"].get("kl", float("nan"))))
        _table(rows, ("metric", "original", "compressed"))
        print(f"evaluated on {c['windows']} windows x {c['seqlen']} tokens ({c['tokens']} predictions) per text, "
              f"protocol {ev['protocol']}" + (f" (windows start with BOS {ev['bos_token']!r})" if ev.get("bos") else ""))
    for fmt, e in (rep.get("exports") or {}).items():
        print(f"  export {fmt}: " + (e["path"] if "path" in e else f"FAILED ({e.get('error', '?')})"))


def _domain(text: str | None, calib_source: str | None) -> str:
    """" (in-domain)" / " (off-domain)": whether an evaluation text is from the calibration source's corpus."""
    if not text or not calib_source:
        return ""
    def corpus(x) -> str:                      # "wiki-eval" -> "wiki"; a file path stays itself
        head = str(x).split("-")[0]
        return head if head in ("wiki", "novels") else str(x)
    from ..calib.sources import parts
    same = corpus(text) in {corpus(p) for p in parts(calib_source) or [calib_source]}   # "wiki+novels": either part
    return " (in-domain)" if same else " (off-domain)"


def _mean(layers: dict, key: str) -> float:
    v = [r[key] for r in layers.values() if key in r]
    return sum(v) / len(v) if v else 0.0


def failed_exports(rep: dict) -> list[str]:
    return [f for f, e in (rep.get("exports") or {}).items() if "error" in e]


def cmd_compress(a) -> int:
    from ..api import run_recipe
    from ..recipe import Recipe
    recipe = Recipe.from_yaml(a.recipe)
    over = {k: v for k, v in (("source", a.calib_source), ("select", a.calib_select), ("samples", a.calib_samples),
                              ("seqlen", a.calib_seqlen), ("seed", a.calib_seed), ("protocol", a.protocol))
            if v is not None}
    if over:
        d = recipe.to_dict()
        d["calibration"].update(over)
        if a.protocol:
            d["evaluate"]["protocol"] = a.protocol
        recipe = Recipe.from_dict(d, str(a.recipe))
    streaming = True if a.offload else (False if a.in_memory else None)
    rep = run_recipe(recipe, a.model, a.out, evaluate_models=not a.no_eval, resume=a.resume, streaming=streaming,
                     return_model=False)
    print_report(rep)
    print(f"wrote {a.out}")
    failed = failed_exports(rep)
    cert = rep.get("certificate")
    if cert is not None:
        print(f"certificate: {cert['statement']} -> {'PASS' if cert['passed'] else 'FAIL'}")
        return 0 if cert["passed"] and not failed else 1
    return 1 if failed else 0


def cmd_eval(a) -> int:
    from ..api import evaluate, load
    if a.seqlen is not None and a.seqlen < 2:                       # checked before loading anything
        raise UserError(f"--seqlen {a.seqlen} is out of range: give at least 2 tokens per window (or omit it: "
                        "512 on CPU, 2048 on GPU)")
    if a.windows < 1:
        raise UserError(f"--windows {a.windows} is out of range: give at least 1 window")
    if a.tasks_dir and not a.trust_tasks_code:                      # before loading anything
        from ..eval.lm_eval_bridge import TASKS_CODE_RISK
        raise UserError(f"--tasks-dir {a.tasks_dir}: {TASKS_CODE_RISK}")
    from ..progress import timed
    if a.tasks:
        model, tok = timed(f"load {a.model}", load, a.model)
        from ..eval.lm_eval_bridge import print_results, run_tasks
        print_results(timed("lm-eval tasks", run_tasks, model, tok, a.tasks, a.limit, include_path=a.tasks_dir,
                            include_defaults=a.tasks_dir is None, trust_code=a.trust_tasks_code))
        return 0
    ref = _reference_scores(a) if a.reference else None     # scored first: the two models are never both loaded
    from ..api import streamable_folder
    folder = streamable_folder(a.model)
    if (Path(a.model) / "modelpress.json").exists() and (Path(a.model) / "tokenizer_config.json").exists():
        res = _evaluate_streamed(a, ref, Path(a.model), export=True)
    elif folder is not None:
        res = _evaluate_streamed(a, ref, folder, export=False)
    else:
        model, tok = timed(f"load {a.model}", load, a.model)
        if ref is not None:
            from ..api import restore_reference_head
            restore_reference_head(ref, model, a.reference, "float32")
        res = evaluate(model, tok, ref, a.text, a.seqlen, a.windows, protocol=a.protocol)
    rows = [("perplexity", res["perplexity"])]
    if ref is not None:
        rows += [("reference perplexity", res["reference_perplexity"]), ("top-1 agreement", res["agreement"]),
                 ("mean KL", res["kl"])]
    rows += [("bits / weight (compressed modules)", res["size"]["bits_per_weight"]),
             ("size (MB, as exported)", res["size"]["compressed_bytes"] / 1e6),
             ("x the 16-bit original", res["size"]["vs_16bit"]), ("x the fp32 source", res["size"]["vs_fp32"])]
    _table(rows, ("metric", "value"))
    return 0


def _evaluate_streamed(a, ref, folder: Path, export: bool) -> dict:
    """`eval EXPORT` or `eval FOLDER` (the safetensors folder of a reference name or an HF folder): the model
    scored one decoder layer at a time (modelpress.engine.stream; the same figures as loading it whole),
    against `ref` (ReferenceScores) if given."""
    from ..api import restore_reference_head, windows_for
    from ..engine.memory import large_allocations_mapped
    from ..engine.stream import export_scores_streamed, folder_scores_streamed
    from ..eval.perplexity import evaluate as evaluate_windows
    from ..model import load_tokenizer
    from ..progress import timed
    w = windows_for(load_tokenizer(folder), a.text, a.seqlen, a.windows, a.protocol)
    sc, size = timed(f"scoring {a.model}, layer by layer", export_scores_streamed if export else folder_scores_streamed,
                     folder, w, 2, progress=str(a.model))
    if ref is not None:
        restore_reference_head(ref, sc, a.reference, "float32")
    with large_allocations_mapped():       # the logits chunks are unmapped when freed, not kept in the heap
        res = timed("evaluation", evaluate_windows, sc, w, ref, 2, progress="evaluation batches")
    res["size"] = {k: v for k, v in size.items() if k != "layers"}
    return res


def _reference_scores(a):
    """The reference model scored on the evaluation windows, then dropped but for its output layer (its hidden
    states, NLL and output layer are kept; see modelpress.eval.perplexity.ReferenceScores)."""
    import gc
    from ..api import load, streamable_folder, windows_for
    from ..eval.perplexity import reference_scores
    folder = streamable_folder(a.reference)
    if folder is not None:                   # a safetensors model: scored one decoder layer at a time
        from ..engine.stream import reference_scores_streamed
        from ..model import load_tokenizer
        from ..progress import timed
        w = windows_for(load_tokenizer(folder), a.text, a.seqlen, a.windows, a.protocol)
        scores = timed(f"scoring {a.reference}, layer by layer", reference_scores_streamed, folder, w, 2,
                       progress=f"{a.reference}")
        scores.release_head()       # read again from the shards only if the compared model's output layer differs
        return scores
    ref, tok = load(a.reference)
    scores = reference_scores(ref, windows_for(tok, a.text, a.seqlen, a.windows, a.protocol), 2)
    # the output layer stays (the rest of the reference goes): an export stores it at 16 bits, so the compared
    # model's own output layer is not the original's and could not stand in for it
    del ref
    gc.collect()
    return scores


def cmd_inspect(a) -> int:
    from ..export import verify
    d = Path(a.dir)
    if not (d / "modelpress.json").exists():
        raise UserError(f"{d} is not a modelpress export (no modelpress.json): pass a folder written by `compress`")
    verify(d)
    from ..export.native import WEIGHTS, check_tensors, member, read_json, read_manifest, read_safetensors
    man = read_manifest(d)
    check_tensors(read_safetensors(member(d, WEIGHTS, str(d))), man.get("tensor_sha256", {}), str(d / WEIGHTS))
    rep = read_json(d / "report.json") if (d / "report.json").exists() else {}
    chain = _verify_chain(d) if a.verify else []       # every check before anything is printed
    print(f"{d}: format {man['format']}, {len(man['modules'])} compressed modules, checksums and tensor hashes OK")
    for line in chain:
        print(line)
    kinds: dict[str, int] = {}
    for spec in man["modules"].values():
        kind = str(spec.get("kind") if isinstance(spec, dict) else spec)[:40]
        kinds[kind] = kinds.get(kind, 0) + 1
    print("  modules: " + ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())))
    if rep:
        if isinstance(rep.get("size"), dict) and (d / "model.safetensors").is_file():
            rep["size"]["file_bytes"] = (d / "model.safetensors").stat().st_size    # the file as it is now
        try:
            print_report(rep)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError):
            raise UserError(f"{d / 'report.json'} does not have the fields of a modelpress report: "
                            "re-export the model") from None
    if (d / "certificate.json").exists():
        from ..certify import certificate as certify
        certify.verify(d)                          # UserError on any tampering
        cert = certify.load(d)
        print("  certificate: " + certify.summary(cert))
        print("  " + cert.statement)
    return 0


def _verify_chain(d: Path) -> list[str]:
    """`inspect --verify`: full reload (tensor hashes, module metadata) and the provenance hash chain,
    each link compared with the certificate's when there is one. Returns the lines to print."""
    from ..export.native import load_compressed, provenance
    model, _ = load_compressed(d)
    chain = provenance(d)
    cert = None
    if (d / "certificate.json").exists():
        from ..certify import certificate as certify
        certify.verify(d)
        cert = certify.load(d)
        chain["compressed_model"] = certify.model_sha256(model)
        chain["certificate"] = cert.certificate_sha256
    lines = ["  verified: every tensor matches its sha256 and shape, every module's config fits its tensors",
             "  provenance (sha256):"]
    for k, v in chain.items():
        mark = ""
        if cert is not None and k in ("recipe", "calibration", "compressed_model") and cert.hashes.get(k):
            if v != cert.hashes[k]:
                raise UserError(f"{d}: the {k} hash {str(v)[:16]}... differs from the certificate's "
                                f"{cert.hashes[k][:16]}...: the certificate does not belong to these bytes")
            mark = "  = certificate"
        lines.append(f"    {k:<17}{v or '-'}{mark}")
    return lines
