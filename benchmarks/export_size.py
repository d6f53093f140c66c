"""Export size over the whole artifact (issue 25): w4 g128 GPTQ with the token embedding left at 16 bits or
quantized by the quantize_embedding stage (8-bit per row; 6- and 4-bit in groups of 32), against the 16-bit
original and the fp32 source, with each variant's perplexity. One run per model:

  * the original is loaded in fp32 (the "fp32 source"); its 16-bit size is 2 bytes x parameters;
  * GPTQ w4 g128 sym (observer hessian, the shipped w4a16-gptq-g128 settings; small calibration set) runs once,
    then each embedding variant is applied to a copy; where the output layer is untied (Qwen2.5-Coder-0.5B:
    22% of the parameters), variants that quantize it alone too (RTN w4 g128 or w6 g64);
  * every variant is exported (native format, default 16-bit storage; one row with export dtype float32, the
    old behaviour) and the bytes of model.safetensors are measured on disk; the reload is checked to give
    logits identical to the evaluated in-memory model on one window;
  * the compressed-tensors folder of the 16-bit-embedding variant is written too (ragged groups -> g64) and
    measured;
  * perplexity on wiki-eval windows for every variant, in the same run.

    python benchmarks/export_size.py                       # SmolLM2-135M: 16 x 256 calibration, 8 x 512 eval
    python benchmarks/export_size.py --model qwen2.5-coder-0.5b --method rtn --windows 2 --seqlen 256
"""
from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import modelpress as mp                                                       # noqa: E402
from modelpress.api import windows_for                                        # noqa: E402
from modelpress.eval import evaluate                                          # noqa: E402
from modelpress.export.compressed_tensors import save_compressed_tensors      # noqa: E402
from modelpress.export.native import load_compressed, save, storage_dtype, to_storage  # noqa: E402
from modelpress.recipe import Recipe                                          # noqa: E402

from benchmarks._md import table, write_section                               # noqa: E402


def head(bits: int, group: int) -> dict:
    """RTN of the output layer alone (an untied lm_head: the quantize stage with include lm_head)."""
    return {"quantize": {"method": "rtn", "bits": bits, "group_size": group, "observer": "mse",
                         "include": ["lm_head"], "exclude": []}}


EMB8 = {"quantize_embedding": {"bits": 8, "group_size": None}}
VARIANTS = [  # (label, stages applied after the w4 quantization, export dtype, only for an untied output layer)
    ("16-bit embedding", [], "auto", False),
    ("8-bit embedding (per row)", [EMB8], "auto", False),
    ("6-bit embedding (g32)", [{"quantize_embedding": {"bits": 6, "group_size": 32}}], "auto", False),
    ("4-bit embedding (g32)", [{"quantize_embedding": {"bits": 4, "group_size": 32}}], "auto", False),
    ("16-bit embedding, output layer w4 g128", [head(4, 128)], "auto", True),
    ("16-bit embedding, output layer w6 g64", [head(6, 64)], "auto", True),
    ("8-bit embedding, output layer w6 g64",
     [{"quantize_embedding": {"bits": 8, "group_size": None, "output": False}}, head(6, 64)], "auto", True),
    ("16-bit embedding, export dtype float32 (before)", [], "float32", False),
]


def head_row(x: dict) -> str:
    """A row that quantizes the output layer too, against its target (0.35x with an 8-bit embedding, else 0.45x)."""
    target = 0.35 if x["label"].startswith("8-bit") else 0.45
    return f"{x['label']} {x['vs16']:.3f}x ({'met' if x['vs16'] <= target else 'NOT met'}, ppl {x['dppl']:+.3f})"


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*.safetensors"))


def run_model(src: str, method: str, samples: int, calib_seqlen: int, windows: int, seqlen: int, tmp: Path) -> dict:
    t0 = time.perf_counter()
    model, tok = mp.load(src)
    params = mp.model.count_params(model)
    refs = mp.model.REFERENCES
    name = refs[src].title.split(" (")[0] if src in refs else Path(src).name
    head, emb_mod = model.get_output_embeddings(), model.get_input_embeddings()
    untied = 0 if head is None or head.weight is emb_mod.weight else head.weight.numel()
    w = windows_for(tok, "wiki-eval", seqlen, windows)
    ppl0 = evaluate(model, w)["perplexity"]
    q = {"method": method, "bits": 4, "group_size": 128, "sym": True, "observer": "hessian" if method == "gptq" else "minmax"}
    recipe = Recipe.from_dict({"stages": [{"quantize": q}]})
    calib = mp.calibration_set(tok, "wiki", samples=samples, seqlen=calib_seqlen) if method == "gptq" else None
    mp.compress(model, recipe, calib)
    rows, ct, ct_diff = [], None, float("nan")
    base_ppl = None
    for label, stages, dtype, untied_only in VARIANTS:
        if untied_only and not untied:
            continue
        m = copy.deepcopy(model)
        if stages:
            mp.compress(m, Recipe.from_dict({"stages": stages}), None)
        storage = storage_dtype(m, dtype)
        to_storage(m, storage)
        ppl = evaluate(m, w)["perplexity"]
        out = tmp / f"{name}-{len(rows)}"
        save(m, tok, out, dtype=storage)
        nbytes = (out / "model.safetensors").stat().st_size
        back, _ = load_compressed(out)
        with torch.no_grad():
            exact = torch.equal(back(w[:1]).logits, m(w[:1]).logits)
        del back
        if not stages and dtype == "auto":
            base_ppl = ppl
            ctp = save_compressed_tensors(m, tok, out / "compressed-tensors", dtype=storage)
            ct = folder_bytes(ctp)
            from transformers import AutoModelForCausalLM           # plain transformers + compressed-tensors
            hf = AutoModelForCausalLM.from_pretrained(ctp, dtype=torch.float32)
            with torch.no_grad():
                ct_diff = float((hf(w[:1]).logits - m(w[:1]).logits).abs().max())
            del hf
        rows.append({"label": label, "bytes": nbytes, "vs16": nbytes / (2 * params), "vs32": nbytes / (4 * params),
                     "ppl": ppl, "dppl": ppl - base_ppl if base_ppl is not None else float("nan"), "exact": exact})
        shutil.rmtree(out)
        del m
    return {"name": name, "params": params, "untied_head": untied, "ppl0": ppl0, "rows": rows, "ct_bytes": ct, "ct_diff": ct_diff, "method": method,
            "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", help="smollm2 (default) or a model path; repeatable")
    ap.add_argument("--method", default="gptq", choices=("gptq", "rtn"))
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    models = a.model or ["smollm2"]
    tmp = Path(tempfile.mkdtemp(prefix="mp-export-size-"))
    try:
        results = [run_model(s, a.method, a.samples, a.calib_seqlen, a.windows, a.seqlen, tmp) for s in models]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for r, src in zip(results, models):
        rows = [[x["label"], f"{x['bytes'] / 1e6:.1f}", f"{x['vs16']:.3f}x", f"{x['vs32']:.3f}x", f"{x['ppl']:.3f}",
                 f"{x['dppl']:+.3f}", "yes" if x["exact"] else "NO"] for x in r["rows"]]
        p = r["params"]
        hit8 = next(x for x in r["rows"] if x["label"].startswith("8-bit"))["vs16"]
        hit16 = r["rows"][0]["vs16"]
        calib = (f"calibration {a.samples} x {a.calib_seqlen} wiki tokens, " if r["method"] == "gptq" else "")
        body = (
            f"{r['name']}: {p / 1e6:.1f}M parameters as loaded; 16-bit original {2 * p / 1e6:.1f} MB, fp32 source "
            f"{4 * p / 1e6:.1f} MB; fp32 perplexity {r['ppl0']:.3f}. {r['method'].upper()} w4 g128 sym on the linears "
            f"(lm_head excluded; {calib}evaluation {a.windows} x {a.seqlen} wiki-eval windows), then the embedding "
            "variant (quantize_embedding; an untied lm_head is quantized with it). "
            + (f"The output layer is untied: {r['untied_head'] / 1e6:.1f}M parameters ({r['untied_head'] / p:.0%} of "
               "the model) stored beside the embedding, at 16 bits in the first row; the rows 'output layer ...' "
               "quantize it alone by RTN (quantize stage, include lm_head, observer mse), the embedding at 16 bits "
               "or 8 bits per row (quantize_embedding output false). " if r["untied_head"] else "")
            + "MB = model.safetensors of the "
            "native export as written. One run: the perplexity differences between variants are deterministic for "
            "the one compressed model (no seeds involved).\n\n"
            + table(["variant", "MB", "x 16-bit original", "x fp32 source", "perplexity", "ppl vs 16-bit emb.",
                     "reload identical"], rows)
            + f"\n\ncompressed-tensors folder (16-bit embedding; ragged groups written with a dividing group): "
            f"{r['ct_bytes'] / 1e6:.1f} MB = {r['ct_bytes'] / (2 * p):.3f}x the 16-bit original; loaded by plain "
            f"transformers, max |logit difference| to the evaluated model on one window {r['ct_diff']:.2g}.  \n"
            f"Targets: w4 g128 + 8-bit embedding <= 0.35x: {hit8:.3f}x ({'met' if hit8 <= 0.35 else 'NOT met'}); "
            f"w4 g128 + 16-bit embedding <= 0.45x: {hit16:.3f}x ({'met' if hit16 <= 0.45 else 'NOT met'}). "
            + ("With the untied output layer quantized as well (a linear like the others; llama.cpp's Q4_K_M stores "
               "output.weight at Q6_K): " + "; ".join(head_row(x) for x in r["rows"] if "output layer" in x["label"])
               + ". " if r["untied_head"] else "")
            + f"Run time {r['seconds']:.0f} s.")
        print(body)
        if not a.no_write:
            cmd = " ".join(["python benchmarks/export_size.py", *sys.argv[1:]])        # exactly as run
            write_section(f"Export size: {r['name']} (issue 25)", cmd, body)

if __name__ == "__main__":
    main()
