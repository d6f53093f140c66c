"""modelpress vs llm-compressor (PyPI llmcompressor 0.14.x) on SmolLM2-135M-Instruct (or another reference
model: --model qwen2.5-coder-0.5b), in one run.

For every setting, OUR compression and THEIRS each run in a fresh subprocess, one after the other
(never at the same time), with the same torch thread count, the same model folder and the same
calibration token ids (made once by modelpress' calibration_set and handed to both as a .pt file).
Each subprocess reports the wall time of the compression call alone and the process' peak RSS
(VmHWM) just after it. Both results are then evaluated here with modelpress' frozen protocol on
the same windows (modelpress.api.windows_for + modelpress.eval.evaluate, reference = the original):
perplexity, top-1 agreement, KL. RTN (quantization) or magnitude (pruning) at the same setting is
the no-calibration baseline. llm-compressor lives in its own venv .venv-llmc
(benchmarks/setup_llmc.sh) and runs through benchmarks/_llmc_runner.py.

    .venv/bin/python benchmarks/vs_llmcompressor.py                    # defaults: 64x512 calib, 16x512 eval
    .venv/bin/python benchmarks/vs_llmcompressor.py --settings gptq-w4g64,wanda50 --samples 16 --no-write
    .venv/bin/python benchmarks/vs_llmcompressor.py --model qwen2.5-coder-0.5b --settings gptq-w4g128 --samples 16

A model other than SmolLM2 gets its own BENCHMARKS.md section ("vs llm-compressor: <model>") and work folder.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLMC_PY = ROOT / ".venv-llmc" / "bin" / "python"
RUNNER = ROOT / "benchmarks" / "_llmc_runner.py"

# name -> (label, our stage {name: config}, their scheme, baseline stage). Their defaults are kept
# where they equal ours (damping 0.01 * mean diag H, block 128, min-max observer); actorder is
# their default "static" (= our act_order: true, static groups from the original weights). The
# "-hessian" settings run our observer hessian (clipping search weighted by diag H = E[x^2] per input)
# against their counterpart, the imatrix_mse observer (weighted by E[x^2] too).
def _gptq(bits: int, group_size: int, sym: bool, observer: str | None = None, theirs: str | None = None) -> dict:
    """A GPTQ setting: ours and theirs with the same scheme (their observer `theirs`, default ours), against
    RTN (and RTN with the mse observer when an observer is named)."""
    scheme = {"bits": bits, "group_size": group_size, "sym": sym}
    theirs = theirs or observer
    label = (f"GPTQ w{bits} g{group_size} {'sym' if sym else 'asym'}" + (f", {observer} observer" if observer else "")
             + (f" (theirs: {theirs})" if theirs != observer else ""))
    rtn = {"quantize": {"method": "rtn", **scheme}}
    return dict(label=label, ours={"quantize": {"method": "gptq", **scheme, **({"observer": observer} if observer else {})}},
                theirs={"method": "gptq", **scheme, "actorder": "static", **({"observer": theirs} if theirs else {})},
                baseline=[rtn, {"quantize": {**rtn["quantize"], "observer": "mse"}}] if observer else rtn)


SETTINGS: dict[str, dict] = {
    "gptq-w4g128": _gptq(4, 128, True),
    "gptq-w4g128-mse": _gptq(4, 128, True, "mse"),
    "gptq-w4g128-hessian": _gptq(4, 128, True, "hessian", "imatrix_mse"),
    "gptq-w4g64": _gptq(4, 64, True),
    "gptq-w3g64": _gptq(3, 64, False),
    "gptq-w3g64-hessian": _gptq(3, 64, False, "hessian", "imatrix_mse"),
    "wanda50": dict(label="Wanda 50% unstructured",
                    ours={"prune": {"method": "wanda", "sparsity": 0.5}},
                    theirs={"method": "wanda", "sparsity": 0.5},
                    baseline={"prune": {"method": "magnitude", "sparsity": 0.5}}),
    "sparsegpt50": dict(label="SparseGPT 50% unstructured",
                        ours={"prune": {"method": "sparsegpt", "sparsity": 0.5}},
                        theirs={"method": "sparsegpt", "sparsity": 0.5},
                        baseline={"prune": {"method": "magnitude", "sparsity": 0.5}}),
    "sparsegpt2of4": dict(label="SparseGPT 2:4",
                          ours={"prune": {"method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4"}},
                          theirs={"method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4"},
                          baseline={"prune": {"method": "magnitude", "sparsity": 0.5, "pattern": "2:4"}}),
}
DEFAULT_SETTINGS = ("gptq-w4g64,wanda50,sparsegpt50,gptq-w3g64,gptq-w4g128,gptq-w4g128-mse,gptq-w4g128-hessian,"
                    "gptq-w3g64-hessian")


def _peak_mb() -> float:
    """This process' peak RSS (VmHWM). Not ru_maxrss: Linux carries the parent's peak across fork+exec."""
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ---------------------------------------------------------------- our worker (fresh process)
def worker(model_dir: str, ids_path: str, stage_json: str, out_dir: str, threads: int) -> int:
    """Mirror of _llmc_runner.py for modelpress: load, compress (timed), dump dense linear weights."""
    import torch
    torch.set_num_threads(threads)
    from modelpress.api import compress
    from modelpress.calib import CalibrationSet
    from modelpress.model import load
    from modelpress.modules import QuantLinear, SparseLinear
    from modelpress.recipe import Recipe

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, _ = load(model_dir)
    ids = torch.load(ids_path).long()                                          # (n, seqlen)
    calib = CalibrationSet.from_ids(ids, source=str(ids_path))
    recipe = Recipe.from_dict({"stages": [json.loads(stage_json)]})
    rss_before, peak_before = _rss_mb(), _peak_mb()
    print(f"[ours] {recipe.stages[0][1]} on {ids.shape[0]}x{ids.shape[1]} ids, {threads} threads", flush=True)
    t0, c0 = time.perf_counter(), _cpu_s()
    stats = compress(model, recipe, calib)
    seconds, cpu_seconds = time.perf_counter() - t0, _cpu_s() - c0
    peak_after = _peak_mb()
    dense = {n: m.weight.detach().float().clone() for n, m in model.named_modules()
             if isinstance(m, (QuantLinear, SparseLinear))}
    if not dense:
        raise SystemExit("vs_llmcompressor worker: no layer was compressed")
    torch.save(dense, out / "weights.pt")
    import modelpress
    res = {"tool": "modelpress", "version": getattr(modelpress, "__version__", "dev"), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "compress_seconds": seconds, "compress_cpu_seconds": cpu_seconds, "rss_before_mb": rss_before,
           "peak_before_mb": peak_before, "peak_rss_mb": peak_after, "summary": stats[0]["summary"],
           "stage": json.loads(stage_json), "config": repr(recipe.stages[0][1]), "linears": len(dense),
           "fallbacks": sum(1 for v in (stats[0].get("layers") or {}).values() if v.get("fallback"))}
    (out / "result.json").write_text(json.dumps(res, indent=1))
    print(f"[ours] done in {seconds:.1f} s, peak RSS {peak_after:.0f} MB", flush=True)
    return 0


# ---------------------------------------------------------------- driver
def _env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _run(cmd: list[str], threads: int, log: Path) -> None:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(threads), cwd=ROOT)
    if p.returncode:
        lines = log.read_text(errors="replace").strip().splitlines()
        errs = [ln for ln in lines if "Error:" in ln]
        raise RuntimeError(f"{cmd[1]} failed (exit {p.returncode}, log {log}):\n" + "\n".join(lines[-15:] + errs[-1:]))
    print(f"    ({time.perf_counter() - t0:.0f} s incl. start-up)", flush=True)


def run_ours(model_dir: Path, ids: Path, stage: dict, out: Path, threads: int) -> dict:
    _run([sys.executable, str(Path(__file__).resolve()), "--worker", str(model_dir), str(ids), json.dumps(stage),
          str(out), "--threads", str(threads)], threads, out.with_suffix(".log"))
    return json.loads((out / "result.json").read_text())


def run_theirs(model_dir: Path, ids: Path, scheme: dict, out: Path, threads: int) -> dict:
    _run([str(LLMC_PY), str(RUNNER), str(model_dir), str(ids), json.dumps({**scheme, "threads": threads}), str(out)],
         threads, out.with_suffix(".log"))
    return json.loads((out / "result.json").read_text())


def reused(out: Path, same_ids: bool) -> dict | None:
    """llm-compressor's result of an earlier run in `out` (--reuse-theirs), marked with the time it finished, when
    that run saw the very calibration ids of this one (same_ids); None (run it) otherwise."""
    res_file = out / "result.json"
    if not same_ids or not res_file.exists() or not (out / "model").is_dir():
        return None
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(res_file.stat().st_mtime))
    print(f"    reusing llm-compressor's run of {when} ({out})", flush=True)
    return {**json.loads(res_file.read_text()), "reused": when}


def ensure_llmc() -> None:
    ok = LLMC_PY.exists() and subprocess.run([str(LLMC_PY), "-c", "import llmcompressor"], capture_output=True).returncode == 0
    if not ok:
        print("setting up llm-compressor in .venv-llmc (benchmarks/setup_llmc.sh) ...", flush=True)
        subprocess.run(["bash", str(ROOT / "benchmarks" / "setup_llmc.sh")], check=True)


def patched(orig, weights: dict):
    import torch
    m = copy.deepcopy(orig)
    with torch.no_grad():
        for name, w in weights.items():
            m.get_submodule(name).weight.copy_(w)
    return m


def _CachedLogits(model):
    """The reference model for modelpress.eval.evaluate with its logits memoized per input (the frozen
    protocol runs the reference on the same windows for every compressed model)."""
    import torch
    from types import SimpleNamespace

    class Cached(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.cache = inner, {}

        def forward(self, input_ids, **kw):
            key = input_ids.cpu().numpy().tobytes()
            if key not in self.cache:
                self.cache[key] = self.inner(input_ids=input_ids, **kw).logits
            return SimpleNamespace(logits=self.cache[key])

    return Cached(model)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", nargs=4, metavar=("MODEL", "IDS", "STAGE_JSON", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--model", default="smollm2",
                    help="a reference model name (smollm2, qwen2.5-coder-0.5b, ...) or a plain HF model folder")
    ap.add_argument("--settings", default=DEFAULT_SETTINGS, help=f"comma list of {', '.join(SETTINGS)}")
    ap.add_argument("--samples", type=int, default=64, help="calibration samples")
    ap.add_argument("--seqlen", type=int, default=512, help="calibration sample length (tokens)")
    ap.add_argument("--windows", type=int, default=16, help="evaluation windows")
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for both tools (and the evaluation)")
    ap.add_argument("--batch-size", type=int, default=8,
                    help="their calibration batch size (ours: modelpress.engine.layerwise's 8)")
    ap.add_argument("--matched", action="store_true",
                    help="also run ours with act_order: true (= their default actorder static) for GPTQ")
    ap.add_argument("--calib-f32", action="store_true",
                    help="also run ours with calib_dtype: float32 (calibration forward passes in plain float32)")
    ap.add_argument("--refit", action="store_true",
                    help="also run ours with refit_scales: true for GPTQ (least-squares scales for the final codes)")
    ap.add_argument("--work", default=None,
                    help="scratch folder for models and logs (default /tmp/modelpress-vs-llmc[-MODEL])")
    ap.add_argument("--reuse-theirs", action="store_true",
                    help="take llm-compressor's result and model from WORK of an earlier run with the same calibration "
                         "ids instead of running it again (the section says so and when it ran)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not touch BENCHMARKS.md")
    ap.add_argument("--report-only", action="store_true",
                    help="re-render the section from WORK/rows.json of an earlier run with the same flags")
    a = ap.parse_args(argv)
    if a.worker:
        return worker(*a.worker, threads=a.threads)

    import torch
    torch.set_num_threads(a.threads)
    from modelpress.api import calibration_set, windows_for
    from modelpress.eval import evaluate
    from modelpress.model import REFERENCES, load, reference_dir
    from modelpress.recipe import Recipe

    names = [s.strip() for s in a.settings.split(",") if s.strip()]
    bad = [s for s in names if s not in SETTINGS]
    if bad:
        raise SystemExit(f"--settings: unknown {bad[0]!r}; choose from {', '.join(SETTINGS)}")
    model_dir = reference_dir(a.model) if a.model in REFERENCES else Path(a.model)
    a.label = (REFERENCES[a.model].title.split(" (")[0] if a.model in REFERENCES else model_dir.name)
    a.work = a.work or "/tmp/modelpress-vs-llmc" + ("" if a.model == "smollm2" else f"-{Path(a.model).name}")
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(model_dir)
    a.hidden, a.tied = cfg.hidden_size, bool(getattr(cfg, "tie_word_embeddings", False))
    work = Path(a.work)
    if a.report_only:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(model_dir)
        calib = calibration_set(tok, "wiki", "random", a.samples, a.seqlen, 0)
        windows = windows_for(tok, "wiki-eval", a.eval_seqlen, a.windows)
        saved = json.loads((work / "rows.json").read_text())
        body = report(a, calib, windows, saved["base"], saved["rows"])
        print(body)
        if not a.no_write:
            _write(a, [x for x in (argv if argv is not None else sys.argv[1:]) if x != "--report-only"], body)
        return 0
    ensure_llmc()
    work.mkdir(parents=True, exist_ok=True)
    orig, tok = load(str(model_dir))
    calib = calibration_set(tok, "wiki", "random", a.samples, a.seqlen, 0)
    ids_path = work / f"calib_{a.samples}x{a.seqlen}.pt"
    same_ids = ids_path.exists() and torch.equal(torch.load(ids_path), calib.input_ids)   # an earlier run's ids
    torch.save(calib.input_ids, ids_path)
    windows = windows_for(tok, "wiki-eval", a.eval_seqlen, a.windows)
    print(f"calibration {tuple(calib.input_ids.shape)} sha256 {calib.provenance['sha256'][:12]}; "
          f"eval windows {tuple(windows.shape)}", flush=True)
    ref = _CachedLogits(orig)      # the original's logits are computed once, then replayed
    t0 = time.perf_counter()
    base = evaluate(ref, windows)
    print(f"uncompressed: ppl {base['perplexity']:.3f} ({time.perf_counter() - t0:.0f} s per evaluation)", flush=True)

    def ev(model) -> dict:
        r = evaluate(model, windows, reference=ref)
        r.pop("per_token", None)
        return r

    rows: list[dict] = []
    for name in names:
        st = SETTINGS[name]
        variants = [("ours", st["ours"])]
        if a.matched and "quantize" in st["ours"]:
            variants.append(("ours act_order", {"quantize": {**st["ours"]["quantize"], "act_order": True}}))
        if a.calib_f32:
            kind, cfg = next(iter(st["ours"].items()))
            variants.append(("ours fp32", {kind: {**cfg, "calib_dtype": "float32"}}))
        if a.refit and "quantize" in st["ours"]:
            variants.append(("ours refit", {"quantize": {**st["ours"]["quantize"], "refit_scales": True}}))
        for tag, stage in variants:
            print(f"[{name}] {tag}: compressing ...", flush=True)
            res = run_ours(model_dir, ids_path, stage, work / f"{name}-{tag.replace(' ', '_')}", a.threads)
            m = patched(orig, torch.load(work / f"{name}-{tag.replace(' ', '_')}" / "weights.pt"))
            rows.append({**res, "setting": name, "tool": tag, **ev(m)})
            del m
            print(f"    ppl {rows[-1]['perplexity']:.3f}  {res['compress_seconds']:.1f} s  {res['peak_rss_mb']:.0f} MB", flush=True)
        print(f"[{name}] llm-compressor: compressing ...", flush=True)
        try:
            res = reused(work / f"{name}-llmc", same_ids) if a.reuse_theirs else None
            res = res or run_theirs(model_dir, ids_path, {**st["theirs"], "batch_size": a.batch_size},
                                    work / f"{name}-llmc", a.threads)
            from transformers import AutoModelForCausalLM
            m = AutoModelForCausalLM.from_pretrained(work / f"{name}-llmc" / "model", dtype=torch.float32).eval()
            rows.append({**res, "setting": name, "tool": "llm-compressor", **ev(m)})
            del m
            print(f"    ppl {rows[-1]['perplexity']:.3f}  {res['compress_seconds']:.1f} s  {res['peak_rss_mb']:.0f} MB", flush=True)
        except RuntimeError as e:
            msg = str(e).strip().splitlines()[-1]
            print(f"    llm-compressor failed: {msg}", flush=True)
            rows.append({"setting": name, "tool": "llm-compressor", "error": msg})
        from modelpress.api import compress
        for bl in st["baseline"] if isinstance(st["baseline"], list) else [st["baseline"]]:
            b = copy.deepcopy(orig)
            compress(b, Recipe.from_dict({"stages": [bl]}), None)
            bname = ("RTN" if "quantize" in bl else "magnitude") + (" mse" if bl.get("quantize", {}).get("observer") == "mse" else "")
            rows.append({"setting": name, "tool": bname, **ev(b)})
            del b
            print(f"    {bname} ppl {rows[-1]['perplexity']:.3f}", flush=True)
        (work / "rows.json").write_text(json.dumps({"base": base, "rows": rows}, indent=1, default=str))
        left = names[names.index(name) + 1:]
        if left and not a.no_write:   # a partial section survives an interrupted run
            _write(a, argv, report(a, calib, windows, base, rows) + f"\n\n*Partial run: {', '.join(left)} still to come.*")

    body = report(a, calib, windows, base, rows)
    print(body)
    if not a.no_write:
        _write(a, argv, body)
    return 0


def _write(a, argv, body: str) -> None:
    sys.path.insert(0, str(ROOT))
    from benchmarks._md import write_section
    cmd = ".venv/bin/python benchmarks/vs_llmcompressor.py " + " ".join(argv if argv is not None else sys.argv[1:])
    name = "vs llm-compressor" + ("" if a.model == "smollm2" else f": {a.label}")
    write_section(name, cmd.strip(), body)
    print(f"wrote BENCHMARKS.md section '{name}'", flush=True)


def _f(x, fmt="{:.3f}"):
    return "n/a" if x is None else fmt.format(x)


def report(a, calib, windows, base, rows) -> str:
    """Markdown: settings, the measured table, ratios and targets."""
    sys.path.insert(0, str(ROOT))
    from benchmarks._md import table
    import torch
    p0 = base["perplexity"]
    by = {(r["setting"], r["tool"]): r for r in rows}
    res_rows, tgt_rows = [], []
    import re
    for r in rows:   # the effective act_order (the default changed during development): from the config or the log
        if r["tool"].startswith("ours") and r["setting"].startswith("gptq"):
            log = Path(a.work) / f"{r['setting']}-{r['tool'].replace(' ', '_')}.log"
            text = r.get("config") or (log.read_text(errors="replace") if log.exists() else "")
            m = re.search(r"act_order=(True|False)", text)
            if m and "act_order" not in r["tool"]:
                r["tool"] = f"{r['tool']} (act_order {m[1].lower()})"
    for name in dict.fromkeys(r["setting"] for r in rows):
        theirs = by.get((name, "llm-compressor"))
        t_ok = theirs is not None and "error" not in theirs
        for r in [r for r in rows if r["setting"] == name]:
            if "error" in r:
                log = Path(a.work) / f"{name}-llmc.log"
                errs = [ln for ln in log.read_text(errors="replace").splitlines() if "Error:" in ln] if log.exists() else []
                r["error"] = (errs[-1] if errs else r["error"]).replace("|", "/")
                res_rows.append([SETTINGS[name]["label"], r["tool"], "failed: " + r["error"][:200]] + [""] * 9)
                continue
            ratio = (lambda k: r[k] / theirs[k] if t_ok and r["tool"].startswith("ours") and k in r else None)
            res_rows.append([SETTINGS[name]["label"], r["tool"], _f(r["perplexity"]), _f(r["perplexity"] - p0, "{:+.3f}"),
                             _f(r.get("agreement"), "{:.4f}"), _f(r.get("kl"), "{:.4f}"),
                             _f(r.get("compress_seconds"), "{:.1f}"), _f(r.get("compress_cpu_seconds"), "{:.1f}"),
                             _f(r.get("peak_rss_mb"), "{:.0f}"), _f(ratio("perplexity"), "{:.4f}"),
                             _f(ratio("compress_seconds"), "{:.2f}"), _f(ratio("peak_rss_mb"), "{:.2f}")])
        for r in [r for r in rows if r["setting"] == name and r["tool"].startswith("ours")]:
            who = f"{SETTINGS[name]['label']} ({r['tool']})"
            if not t_ok:
                tgt_rows.append([who, "ppl, wall time, peak RSS vs llm-compressor", "n/a",
                                 "not measurable: llm-compressor failed on this setting", "n/a"])
            else:
                q = r["perplexity"] / theirs["perplexity"]
                tgt_rows.append([who, "ppl <= llm-compressor's within 0.5%", f"{q:.4f}x", "<= 1.005x",
                                 "met" if q <= 1.005 else "MISSED"])
                if name.startswith("gptq"):
                    w = r["compress_seconds"] / theirs["compress_seconds"]
                    c = r["compress_cpu_seconds"] / theirs["compress_cpu_seconds"]
                    tgt_rows.append([who, "compression wall time <= 0.5x llm-compressor's", f"{w:.2f}x (CPU time {c:.2f}x)",
                                     "<= 0.5x", "met" if w <= 0.5 else "MISSED"])
                m = r["peak_rss_mb"] / theirs["peak_rss_mb"]
                tgt_rows.append([who, "peak RSS <= 1.0x llm-compressor's", f"{m:.2f}x", "<= 1.0x",
                                 "met" if m <= 1.0 else "MISSED"])
            for bname in ("RTN", "RTN mse"):
                rtn = by.get((name, bname))
                if name.startswith("gptq-w4g128") and rtn:
                    inc, rinc = r["perplexity"] - p0, rtn["perplexity"] - p0
                    tgt_rows.append([who, f"ppl increase <= half of {bname}'s", f"{inc:+.3f} vs {bname} {rinc:+.3f} ({inc / rinc:.2f}x)",
                                     "<= 0.5x", "met" if inc <= 0.5 * rinc else "MISSED"])
    hdr = ["setting", "tool", "ppl", "Δppl", "top-1 agree", "KL", "wall s", "CPU s", "peak RSS MB",
           "ppl ours/theirs", "wall ours/theirs", "RSS ours/theirs"]
    llmc = next((r for r in rows if r["tool"] == "llm-compressor" and "version" in r), {})
    reuse = sorted({r["reused"] for r in rows if r.get("reused")})
    reuse_note = (f" Its rows were reused (`--reuse-theirs`) from a run of the same calibration ids on "
                  f"{', '.join(reuse)}; ours and the baselines were run again." if reuse else "")
    emb = ", ".join(f"{r['setting']} {r['embedding_unchanged']}" for r in rows if "embedding_unchanged" in r) or "n/a"
    h = a.hidden
    w4g128 = (f"| GPTQ w4 g128 | last group of a {h}-wide row is partial ({h // 128} x 128 + {h % 128}) | fails: hidden size "
              f"{h} is not a multiple of 128 (see the table) |" if h % 128 else
              f"| GPTQ w4 g128 | {h} = {h // 128} x 128: whole groups | works: hidden size {h} is a multiple of 128 |")
    bos = calib.provenance.get("bos")
    protocol = (f"{calib.provenance['protocol']}, windows start with BOS {calib.provenance.get('bos_token')!r}" if bos
                else "modelpress-eval/1")      # (= modelpress-eval/2 for a tokenizer that adds no BOS)
    notes = f"""
Uncompressed {a.label}: perplexity **{p0:.3f}** on {windows.shape[0]} windows x {windows.shape[1]} tokens
({protocol}: `windows_for(tok, "wiki-eval", {windows.shape[1]}, {windows.shape[0]})`, `evaluate(model, windows,
reference=original)`). Calibration: {calib.input_ids.shape[0]} samples x {calib.input_ids.shape[1]} tokens from
`calibration_set(tok, "wiki", "random", seed=0)` (sha256 `{calib.provenance['sha256'][:16]}`), the very same ids
handed to both tools. llm-compressor {llmc.get('version', '?')} (torch {llmc.get('torch', '?')}) in `.venv-llmc`.{reuse_note}

How each number is taken: each compression runs in a fresh subprocess (ours: `vs_llmcompressor.py --worker`, theirs:
`benchmarks/_llmc_runner.py` under `.venv-llmc/bin/python`), strictly one after the other, with
`torch.set_num_threads({a.threads})` and OMP/MKL_NUM_THREADS={a.threads}, model loaded from the same HF folder in float32.
*wall s* / *CPU s*: wall-clock and process CPU time (user+sys) of the compression call only (`compress(model, recipe,
calib)` / `oneshot(model=..., recipe=..., dataset=DataLoader)`), model loading and saving excluded. *peak RSS*: the
process' own high-water mark (`VmHWM`) right after the compression (imports + model + calibration work), before saving. The machine has 2
cores shared with other jobs, so wall times are noisy; CPU time is given as the steadier companion. Baselines (RTN,
magnitude) are modelpress' own, without calibration. Δppl is against the uncompressed model.

Settings, made apples to apples (everything else is each tool's default):

| knob | modelpress | llm-compressor |
|---|---|---|
| targets | every `nn.Linear` in the decoder layers, `lm_head` excluded ({'tied to the embeddings' if a.tied else 'its own matrix, not tied'}) | `targets=["Linear"]`; GPTQ `ignore=["lm_head"]`; Wanda/SparseGPT `ignore=["re:.*lm_head"]`: their sparsity modifiers name the module `lm_head.`, so the plain name does not match and the {'tied ' if a.tied else ''}lm_head{'/embedding' if a.tied else ''} gets pruned (checked: embedding unchanged = {emb}) |
| pipeline | `modelpress.engine.layerwise`: layer by layer, outputs computed with the compressed layer (error propagates), batch 8. `sequential: true` (the default of quantize and prune, the GPTQ repo's \"true sequential\"): within a layer q/k/v, then o_proj, gate/up, down_proj, each group's statistics taken after the groups before it were compressed, all in one forward pass per layer (each batch parks at the first linear of a group until the group is compressed; the first layer finds the groups with one partial pass per group). Linears reading the same input (q/k/v, gate/up) share one Hessian and are solved as one stacked GPTQ problem (identical codes); Hessians are upper-triangle strips of GEMMs (5/8 to 3/4 of the flops); the per-column ops of the GPTQ/SparseGPT loops run through numpy views on one thread | `pipeline="sequential"` (decoder-layer subgraphs, `propagate_error=True`), `batch_size={a.batch_size}`, `shuffle_calibration_samples=False`, no offloading (CPU only) |
| GPTQ damping | `damp: 0.01` x mean diag H | `dampening_frac=0.01` x mean diag H |
| GPTQ block | `block_size: 128` | `block_size=128` |
| GPTQ observer | `minmax`, fp16-rounded scales (the *mse observer* setting: `observer: mse`, a per-group clipping search of abs(err)^2.4; the *hessian observer* settings: `observer: hessian`, the same search of the squared error weighted by each input's diag H, as in the shipped GPTQ recipes) | `memoryless_minmax` (their weight default), fp32 scales; `mse`; `imatrix_mse` (a clipping search weighted by E[x^2] per input, their counterpart of ours) |
| GPTQ act-order | each *ours* row says which ran: `act_order: false` = group parameters from the updated weights (GPTQ paper); `true` = columns by decreasing diag H, static groups from the original weights (modelpress' default since commit ee6297e){'; *ours act_order* forces true' if a.matched else ''} | default `actorder="static"` (= our `act_order: true`) |
{w4g128}
| Wanda | score abs(W) x norm(X_j), per output row, `sparsity: 0.5` | `WandaPruningModifier(sparsity=0.5, mask_structure="0:0")` |
| SparseGPT | `sparsity: 0.5`, block 128, damp 0.01, mask per block by w^2/[H^-1]_jj^2 | `SparseGPTModifier(sparsity=0.5, mask_structure="0:0", block_size=128, dampening_frac=0.01)` |
| weights evaluated | dequantized / masked dense weights patched into the original model | their model saved dense (`save_compressed=False`, quantization parameters dropped), loaded as a plain HF model |
"""
    caveats = []
    from modelpress.engine.layerwise import fast_bf16
    bf16 = fast_bf16(torch.device("cpu"))
    caveats.append("*ours* rows run the stage defaults, `calib_dtype: auto`, which on this CPU "
                   + ("(native AVX512-BF16/AMX GEMMs) is bfloat16: the calibration forward passes run under "
                      "torch.autocast(bfloat16), while the weights, the Hessians / input norms and the solves stay float32 "
                      "and the evaluated model is float32 like every other row." if bf16 else
                      "(no native bf16 GEMMs) is float32.")
                   + (" *ours fp32* rows: the same stage with `calib_dtype: float32` (plain float32 forward passes)."
                      if a.calib_f32 else "")
                   + (" *ours refit* rows: the same stage with `refit_scales: true` (each group's scale re-solved by least "
                      "squares under H for GPTQ's final codes)." if a.refit else ""))
    if calib.input_ids.numel() < 64 * 512 or windows.numel() < 16 * 512:
        caveats.append(f"This run is smaller than the defaults (64 x 512 calibration, 16 x 512 evaluation): with "
                       f"{windows.numel()} evaluation tokens, perplexity gaps of about 1% between two GPTQ/SparseGPT "
                       "implementations are within the spread that GPTQ's error feedback gives from tiny rounding "
                       "differences, so the 0.5% verdicts below are indicative only.")
    if a.threads == 2:
        caveats.append("Threads: 2 for both tools (this machine's cores; each tool's default use of them). llm-compressor "
                       "runs every op on 2 OpenMP threads; modelpress runs the forward passes, Hessians and block updates on 2 "
                       "threads and the GPTQ/SparseGPT column loops (thousands of small ops) on one thread.")
    else:
        caveats.append(f"Threads: {a.threads} for both tools. At 2 threads on this shared, oversubscribed 2-core machine "
                       "every small per-column op of the GPTQ/SparseGPT loops (both tools') waits on an OpenMP barrier, "
                       "which multiplies wall and CPU time by an order of magnitude and swamps the comparison.")
    if caveats:
        notes = notes.rstrip() + "\n\n" + "\n\n".join(caveats)
    split = "; ".join(f"{r['setting']} {r['tool']}: {r['rss_before_mb']:.0f} MB after load, peak "
                      f"+{r['peak_rss_mb'] - r['rss_before_mb']:.0f} MB above it"
                      for r in rows if r.get("rss_before_mb") and r.get("peak_rss_mb"))
    if split:
        res_rows_note = ("\n\nPeak RSS split (what is resident when the compression starts, then what the compression "
                         "adds; the model's pages count once touched, whether copied or mapped): " + split + ".")
    else:
        res_rows_note = ""
    return (notes.strip() + "\n\n### Results\n\n" + table(hdr, res_rows) + res_rows_note
            + "\n\n### Targets (issue 2)\n\n" + table(["ours", "target", "measured", "needed", "status"], tgt_rows))


if __name__ == "__main__":
    raise SystemExit(main())
