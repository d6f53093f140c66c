"""modelpress GGUF exports run in a real llama.cpp build, against llama.cpp's own quantization (issue 24).

SmolLM2-135M-Instruct (fp32, dequantized from the official Q4_1 GGUF). Written with modelpress:
  * the float base (F32) that llama-quantize starts from;
  * GPTQ / RTN on the Q4_K grid (quantize.format q4_k; rows of 576 inputs are not whole 256-superblocks, so
    those linears keep the int grid 4-bit g32 asym -> Q4_1), and GPTQ with kquant_fallback llama, which gives
    them the type llama-quantize falls back to (Q5_0; Q5_1 for Q5_K), so its file is about the size of
    llama-quantize's Q4_K_S;
  * GPTQ 4-bit g32 sym -> Q4_0, with modelpress's symmetric scale (2 max|w| / 15) and with llama.cpp's signed one
    (quantize.format q4_0: the block's largest-magnitude weight on code -8).
Against llama-quantize Q4_K_M / Q4_K_S / Q4_0 of the same F32 base, with and without an importance matrix
(llama-imatrix on the calibration windows GPTQ uses, never on the evaluation text).
Every file: size, llama-perplexity on the evaluation text (modelpress's wiki eval split, -c CTX, --chunks N),
and the same statistic (chunks of CTX tokens, second half scored) computed per token in PyTorch fp32 from the
GGUF's weights (transformers' GGUF loader), which pairs every modelpress file with the llama-quantize files of
about its size on the very same tokens (mean NLL difference, standard error over the independent chunks); for
modelpress's files also modelpress's own evaluation, and greedy text from llama-simple vs transformers.
NOTE: SmolLM2's linears already sit on a 4-bit g32 grid (the source is Q4_1), which favours 4-bit g32 schemes.

    flock /work/heavy.lock nice -n 5 python benchmarks/gguf_llamacpp.py --write-md --chunks 24 --out /tmp/mp-gguf-24
"""
from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import modelpress as mp  # noqa: E402
from modelpress.calib import calibration_set, sources  # noqa: E402
from modelpress.eval.perplexity import eval_windows, evaluate  # noqa: E402
from modelpress.export.gguf import save_gguf  # noqa: E402

PROMPT = "The history of the city begins"


def run(cmd: list[str], log: Path) -> str:
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    log.write_text(p.stdout + "\n----\n" + p.stderr)
    print(f"  [{time.time() - t:.0f}s] {' '.join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))[:150]}",
          flush=True)
    if p.returncode:
        raise RuntimeError(f"{cmd[0]} failed ({p.returncode}), see {log}")
    return p.stdout + p.stderr


def llama_ppl(bin_: Path, gguf: Path, text: Path, ctx: int, chunks: int, out: Path) -> float:
    o = run([str(bin_ / "llama-perplexity"), "-m", str(gguf), "-f", str(text), "-c", str(ctx), "-b", str(ctx),
             "--chunks", str(chunks), "-t", "2"], out / f"ppl_{gguf.stem}.log")
    return float(re.search(r"Final estimate: PPL = ([0-9.]+)", o).group(1))


def llama_greedy(bin_: Path, gguf: Path, n: int, out: Path) -> str:
    run([str(bin_ / "llama-simple"), "-m", str(gguf), "-n", str(n), PROMPT], out / f"gen_{gguf.stem}.log")
    text = (out / f"gen_{gguf.stem}.log").read_text().split("\n----\n")[0]
    return text.strip()


@torch.no_grad()
def torch_nll(model, ids: torch.Tensor, ctx: int, chunks: int) -> np.ndarray:
    """llama-perplexity's statistic in PyTorch, per token: chunk i = tokens [i ctx, (i+1) ctx), no BOS (SmolLM2's
    add_bos_token is false), NLL of tokens ctx/2 + 1 .. ctx - 1 given their prefix in the chunk ->
    (chunks, ctx/2 - 1) float64; perplexity = exp(mean)."""
    first, out = ctx // 2, []
    for i in range(chunks):
        x = ids[i * ctx:(i + 1) * ctx][None]
        lp = torch.log_softmax(model(input_ids=x, use_cache=False).logits[0].double(), -1)
        tgt = x[0, first + 1:]
        out.append(-lp[first:ctx - 1].gather(-1, tgt[:, None])[:, 0].numpy())
    return np.stack(out)


def paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean per-token NLL difference a - b (= log perplexity ratio) and its standard error over chunks (the
    chunks are independent texts; tokens within one are not)."""
    d = (a - b).mean(1)                                               # (chunks,)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


@torch.no_grad()
def torch_greedy(model, tok, n: int) -> str:
    ids = tok(PROMPT, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0], skip_special_tokens=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama", default="/work/llama/bin")
    ap.add_argument("--out", default="/tmp/modelpress-gguf-bench",
                    help="work folder; finished rows are kept there (use a new one when changing --ctx/--chunks/--calib)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=6)
    ap.add_argument("--calib", type=int, default=8, help="calibration windows of CTX tokens (GPTQ and imatrix)")
    ap.add_argument("--gen", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write-md", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    bin_, out = Path(a.llama), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"ctx": a.ctx, "chunks": a.chunks, "calib": a.calib}
    sfile = out / "settings.json"
    if sfile.exists() and json.loads(sfile.read_text()) != settings:
        raise SystemExit(f"{out} holds rows measured with {sfile.read_text()}: give another --out for {settings}")
    sfile.write_text(json.dumps(settings))
    model, tok = mp.load("smollm2")

    # evaluation text: modelpress's eval split, whole texts until CHUNKS x CTX tokens (+1 chunk of margin)
    texts, eval_text, n_tok = sources.wiki_texts("eval"), "", 0
    for t in texts:
        eval_text += t + "\n\n"
        n_tok += len(tok(t + "\n\n", add_special_tokens=False).input_ids)
        if n_tok > (a.chunks + 1) * a.ctx:
            break
    (out / "eval.txt").write_text(eval_text)
    ids = torch.tensor(tok(eval_text, add_special_tokens=False).input_ids)
    calib = calibration_set(tok, "wiki", "random", samples=a.calib, seqlen=a.ctx, seed=0)
    (out / "calib.txt").write_text("".join(tok.decode(w) for w in calib.input_ids))

    rfile = out / "results.json"           # resumable: finished rows are kept (delete the folder to start over)
    res: dict[str, dict] = json.loads(rfile.read_text()) if rfile.exists() else {}

    def done(name: str, row: dict) -> None:
        res[name] = row
        rfile.write_text(json.dumps(res, indent=1))

    def from_gguf(f: Path):
        """The GGUF `f` read back by transformers' GGUF loader, fp32."""
        return AutoModelForCausalLM.from_pretrained(out, gguf_file=f.name, dtype=torch.float32).eval()

    def scored(f: Path, model=None) -> float:
        """Per-token NLL of the GGUF `f` in PyTorch (from_gguf(f), or `model` when given), kept in
        nll-<stem>.npy for the paired comparisons; returns its perplexity."""
        nll = torch_nll(from_gguf(f) if model is None else model, ids, a.ctx, a.chunks)
        np.save(out / f"nll-{f.stem}.npy", nll)
        return math.exp(float(nll.mean()))
    base = out / "base-f32.gguf"
    if not base.exists():
        save_gguf(model, tok, base, float_type="f32", embed_type="float")
    # llama.cpp tokenizes the eval text exactly as transformers does (the copied pre-tokenizer metadata)
    o = run([str(bin_ / "llama-tokenize"), "-m", str(base), "-f", str(out / "eval.txt"), "--ids", "--log-disable"],
            out / "tokenize.log")
    llama_ids = json.loads(o[o.index("["):o.index("]") + 1])
    same_tokens = llama_ids == ids.tolist()
    print(f"tokens: llama {len(llama_ids)}, transformers {len(ids)}, identical {same_tokens}", flush=True)
    from transformers import AutoModelForCausalLM
    if "F32 (base)" not in res:
        ref_ppl = evaluate(model, eval_windows(tok, texts, a.ctx, a.chunks))["perplexity"]
        done("F32 (base)", {"src": "modelpress", "file": base.name, "size": base.stat().st_size,
                            "llama_ppl": llama_ppl(bin_, base, out / "eval.txt", a.ctx, a.chunks, out),
                            "torch_ppl": scored(base, model), "mp_ppl": ref_ppl})

    # llama.cpp's own quantization, with and without an importance matrix from the calibration windows
    imat = out / "imatrix.gguf"
    if not imat.exists():
        run([str(bin_ / "llama-imatrix"), "-m", str(base), "-f", str(out / "calib.txt"), "-o", str(imat), "-c", str(a.ctx),
             "--chunks", str(a.calib), "-t", "2"], out / "imatrix.log")
    for qt in ("Q4_K_M", "Q4_K_S", "Q4_0"):
        for im in (False, True):
            name = f"llama-quantize {qt}{' + imatrix' if im else ''}"
            if name in res:
                continue
            f = out / f"llama-{qt}{'-imat' if im else ''}.gguf"
            run([str(bin_ / "llama-quantize")] + (["--imatrix", str(imat)] if im else []) + [str(base), str(f), qt, "2"],
                out / f"quant_{f.stem}.log")
            done(name, {"src": "llama.cpp", "file": f.name, "size": f.stat().st_size,
                        "llama_ppl": llama_ppl(bin_, f, out / "eval.txt", a.ctx, a.chunks, out),
                        "torch_ppl": scored(f)})

    # modelpress
    variants = {
        "modelpress GPTQ q4_k grid (hessian)": {"method": "gptq", "bits": 4, "format": "q4_k", "observer": "hessian"},
        "modelpress RTN q4_k grid (mse)": {"method": "rtn", "bits": 4, "format": "q4_k", "observer": "mse"},
        "modelpress GPTQ w4 g32 sym (hessian)": {"method": "gptq", "bits": 4, "group_size": 32, "sym": True, "observer": "hessian"},
        "modelpress GPTQ q4_0 grid, signed scales (hessian)": {"method": "gptq", "bits": 4, "format": "q4_0",
                                                               "observer": "hessian"},
        "modelpress GPTQ q4_k grid, llama fallback (hessian)": {"method": "gptq", "bits": 4, "format": "q4_k",
                                                                "observer": "hessian", "kquant_fallback": "llama"},
    }
    for i, (name, q) in enumerate(variants.items()):
        if name in res:
            continue
        m, _ = mp.load("smollm2")
        t0 = time.time()
        mp.compress(m, mp.Recipe.from_dict({"stages": [{"quantize": q}]}), calib if q["method"] == "gptq" else None)
        f = out / f"mp-{i}.gguf"
        rep = save_gguf(m, tok, f)
        print(f"  {name}: {time.time() - t0:.0f}s; {rep['summary'][:160]}", flush=True)
        g = from_gguf(f)
        row = {"src": "modelpress", "file": f.name, "size": f.stat().st_size, "summary": rep["summary"],
               "llama_ppl": llama_ppl(bin_, f, out / "eval.txt", a.ctx, a.chunks, out),
               "torch_ppl": scored(f, g),
               "mp_ppl": evaluate(m, eval_windows(tok, texts, a.ctx, a.chunks))["perplexity"]}
        if i == 0:
            row["greedy_llama"] = llama_greedy(bin_, f, a.gen, out)
            row["greedy_torch"] = torch_greedy(g, tok, a.gen)
        done(name, row)
        del m, g
    report(res, a, same_tokens, len(ids), out)


def versus(res: dict, out: Path) -> list[list[str]]:
    """Each modelpress file against the llama-quantize files of about its size (within 12%), with and without
    an importance matrix: the paired per-token difference on the same evaluation tokens (PyTorch statistic)."""
    rows = []
    nll = {n: np.load(out / f"nll-{Path(r['file']).stem}.npy") for n, r in res.items() if "file" in r}
    for name, r in res.items():
        if r["src"] != "modelpress" or name.startswith("F32") or name not in nll:
            continue
        for other, o in sorted(res.items(), key=lambda kv: kv[1]["size"]):
            if o["src"] != "llama.cpp" or other not in nll or abs(o["size"] / r["size"] - 1) > 0.12:
                continue
            d, se = paired(nll[name], nll[other])
            verdict = "inside noise" if abs(d) <= 2 * se else ("modelpress better" if d < 0 else "llama.cpp better")
            rows.append([name, other, f"{r['size'] / o['size']:.3f}", f"{math.exp(d):.4f}", f"{d:+.4f} ± {se:.4f}",
                         verdict])
    return rows


def report(res: dict, a, same_tokens: bool, n_ids: int, out: Path) -> None:
    from benchmarks import _md
    rows = []
    for name, r in sorted(res.items(), key=lambda kv: kv[1]["size"]):
        rows.append([name, f"{r['size'] / 1e6:.1f}", f"{r['llama_ppl']:.3f}",
                     f"{r['torch_ppl']:.3f}" if "torch_ppl" in r else "-",
                     f"{r['mp_ppl']:.3f}" if "mp_ppl" in r else "-"])
    body = (f"SmolLM2-135M-Instruct; evaluation text: modelpress's wiki eval split, {a.chunks} chunks of {a.ctx} "
            f"tokens (llama-perplexity's statistic: second half of each chunk scored); calibration: {a.calib} random "
            f"windows of {a.ctx} tokens from the wiki calib split (GPTQ, and as text for llama-imatrix). llama.cpp and "
            f"transformers tokenize the evaluation text identically: {same_tokens} ({n_ids} tokens).\n\n"
            "Caveat: the source model is the official Q4_1 GGUF dequantized, so its linears already sit on a 4-bit "
            "g32 asymmetric grid: 4-bit g32 schemes are favoured, and this says little about k-quants in general. "
            "SmolLM2's hidden size 576 is not a multiple of 256: only ffn_down (1536 inputs) can be a k-quant; "
            "llama-quantize falls back to Q5_0 (Q4_K) / Q8_0 (Q6_K) for the others, modelpress to the int grid "
            "(4-bit g32 asym = Q4_1) or, with `kquant_fallback: llama`, to llama-quantize's own fallback types.\n\n"
            + _md.table(["file", "MB", "llama-perplexity", "same statistic, PyTorch fp32 from the GGUF's weights",
                         "modelpress eval (protocol modelpress-eval/1, model in memory)"], rows))
    vs = versus(res, out)
    if vs:
        body += ("\n\nPaired on the same tokens (PyTorch statistic, per-token NLL from each GGUF's weights; the "
                 f"{a.chunks} chunks are the independent units): perplexity ratio modelpress / llama.cpp = exp(mean "
                 "NLL difference); verdict only where |difference| > 2 standard errors over chunks.\n\n"
                 + _md.table(["modelpress", "llama.cpp", "size ratio", "ppl ratio", "NLL difference ± SE",
                              "verdict"], vs))
    g = next((r for r in res.values() if "greedy_llama" in r), None)
    if g:
        body += f"\n\nGreedy {a.gen} tokens, GPTQ q4_k file: llama-simple `{g['greedy_llama']!r}`; transformers `{g['greedy_torch']!r}`."
    print(body)
    if a.write_md:
        cmd = " ".join(["flock /work/heavy.lock nice -n 5 python benchmarks/gguf_llamacpp.py", *sys.argv[1:]])
        _md.write_section("GGUF in llama.cpp vs llama-quantize (issue 24)", cmd, body)


if __name__ == "__main__":
    main()
