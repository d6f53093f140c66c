"""`modelpress compress`, `eval` and `inspect`: the pipeline's own commands (load -> calibrate ->
compress -> evaluate -> export, and looking at what was exported)."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError


def add_parser(sub) -> tuple[str, ...]:
    c = sub.add_parser("compress", help="compress MODEL with a recipe, evaluate it and export it")
    c.add_argument("model", help='"smollm2", an HF folder, a .gguf file or a hub id')
    c.add_argument("--recipe", required=True, help="recipe YAML file or shipped recipe name")
    c.add_argument("--out", required=True, help="export folder")
    c.add_argument("--calib-select")
    c.add_argument("--calib-samples", type=int)
    c.add_argument("--calib-seqlen", type=int)
    c.add_argument("--calib-seed", type=int)
    c.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    c.add_argument("--resume", action="store_true", help="continue an interrupted run from its last finished layer")
    c.add_argument("--offload", action="store_true",
                   help="models larger than memory: one decoder layer at a time from the safetensors shards")
    e = sub.add_parser("eval", help="perplexity (and agreement with --reference) of a model or export")
    e.add_argument("model")
    e.add_argument("--reference", help="original model to compare with")
    e.add_argument("--text", default="wiki-eval", help="wiki-eval or a .txt/.jsonl file")
    e.add_argument("--seqlen", type=int, help="window length (default 512 on CPU, 2048 on GPU)")
    e.add_argument("--windows", type=int, default=32)
    e.add_argument("--tasks", help="lm-eval tasks instead of perplexity, e.g. hellaswag,arc_easy (needs lm-eval)")
    e.add_argument("--limit", type=float, help="lm-eval: documents per task (N) or fraction (< 1)")
    e.add_argument("--tasks-dir", help="lm-eval: folder of task YAMLs to run instead of the built-in tasks")
    i = sub.add_parser("inspect", help="show an export: modules, sizes, report, certificate; verify checksums")
    i.add_argument("dir")
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
        o, c = rep["eval"]["original"], rep["eval"]["compressed"]
        rows = [("size (MB; original at 16 bits)", s["original_bytes"] / 1e6, (artifact_bytes(s) or 0) / 1e6),
                ("bits / parameter (whole artifact)", 16.0, 8 * (artifact_bytes(s) or 0) / s["params"]),
                ("bits / weight (compressed modules)", 16.0, s["bits_per_weight"])]
        if has_masks(rep.get("layers") or {}):
            rows.append(("sparsity (pruned modules, mask)", 0.0, _mean(rep["layers"], "sparsity")))
        rows += [("perplexity", o["perplexity"], c["perplexity"]),
                 ("top-1 agreement with original", 1.0, c.get("agreement", float("nan"))),
                 ("mean KL(original || compressed)", 0.0, c.get("kl", float("nan")))]
        _table(rows, ("metric", "original", "compressed"))
        print(f"evaluated on {c['windows']} windows x {c['seqlen']} tokens ({c['tokens']} predictions), "
              f"protocol {rep['eval']['protocol']}")
    for fmt, e in (rep.get("exports") or {}).items():
        print(f"  export {fmt}: " + (e["path"] if "path" in e else f"FAILED ({e.get('error', '?')})"))


def _mean(layers: dict, key: str) -> float:
    v = [r[key] for r in layers.values() if key in r]
    return sum(v) / len(v) if v else 0.0


def failed_exports(rep: dict) -> list[str]:
    return [f for f, e in (rep.get("exports") or {}).items() if "error" in e]


def cmd_compress(a) -> int:
    from ..api import run_recipe
    from ..recipe import Recipe
    recipe = Recipe.from_yaml(a.recipe)
    if a.calib_select or a.calib_samples or a.calib_seqlen or a.calib_seed is not None:
        d = recipe.to_dict()
        c = d["calibration"]
        for k, v in (("select", a.calib_select), ("samples", a.calib_samples), ("seqlen", a.calib_seqlen),
                     ("seed", a.calib_seed)):
            if v is not None:
                c[k] = v
        recipe = Recipe.from_dict(d, str(a.recipe))
    if a.offload:
        from ..engine.offload import run_recipe_offloaded
        rep = run_recipe_offloaded(recipe, a.model, a.out, resume=a.resume)
        for st in rep["stages"]:
            print(f"  {st['summary']}  ({st['seconds']:.1f} s)")
        print(f"wrote {a.out} (not evaluated with --offload: run `modelpress eval {a.out}`)")
        return 0
    rep = run_recipe(recipe, a.model, a.out, evaluate_models=not a.no_eval, resume=a.resume)
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
    model, tok = load(a.model)
    if a.tasks:
        from ..eval.lm_eval_bridge import print_results, run_tasks
        print_results(run_tasks(model, tok, a.tasks, a.limit, include_path=a.tasks_dir,
                                include_defaults=a.tasks_dir is None))
        return 0
    ref = load(a.reference)[0] if a.reference else None
    res = evaluate(model, tok, ref, a.text, a.seqlen, a.windows)
    rows = [("perplexity", res["perplexity"])]
    if ref is not None:
        rows += [("reference perplexity", res["reference_perplexity"]), ("top-1 agreement", res["agreement"]),
                 ("mean KL", res["kl"])]
    rows += [("bits / weight (compressed modules)", res["size"]["bits_per_weight"]),
             ("size (MB, as exported)", res["size"]["compressed_bytes"] / 1e6),
             ("x the 16-bit original", res["size"]["vs_16bit"]), ("x the fp32 source", res["size"]["vs_fp32"])]
    _table(rows, ("metric", "value"))
    return 0


def cmd_inspect(a) -> int:
    from ..export import verify
    d = Path(a.dir)
    if not (d / "modelpress.json").exists():
        raise UserError(f"{d} is not a modelpress export (no modelpress.json): pass a folder written by `compress`")
    verify(d)
    man = json.loads((d / "modelpress.json").read_text())
    rep = json.loads((d / "report.json").read_text()) if (d / "report.json").exists() else {}
    print(f"{d}: format {man['format']}, {len(man['modules'])} compressed modules, checksums OK")
    kinds: dict[str, int] = {}
    for spec in man["modules"].values():
        kinds[spec["kind"]] = kinds.get(spec["kind"], 0) + 1
    print("  modules: " + ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())))
    if rep:
        if isinstance(rep.get("size"), dict) and (d / "model.safetensors").is_file():
            rep["size"]["file_bytes"] = (d / "model.safetensors").stat().st_size    # the file as it is now
        print_report(rep)
    if (d / "certificate.json").exists():
        from ..certify import certificate as certify
        certify.verify(d)                          # UserError on any tampering
        cert = certify.load(d)
        print("  certificate: " + certify.summary(cert))
        print("  " + cert.statement)
    return 0
