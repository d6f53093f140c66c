"""Peak memory of the default pipeline and of `eval`, before and after streaming evaluation (issues 22, 23, 25).

Each measurement is one `python -m modelpress.cli ...` process, started with the working directory at a
source tree (so that tree's modelpress is imported); its peak RSS is read with /usr/bin/time -v (the child's
own high-water mark). "before" runs the pre-change code from another checkout (`--before DIR`, default
/work/main; the table was made with DIR = `git archive 0941081 | tar -x -C DIR`, the branch point), "after"
this checkout. Both get the same environment (OMP_NUM_THREADS). Cases:

- pipeline: `compress smollm2 --recipe w4a16-gptq-g128` (the shipped default: 128 x 512 calibration tokens,
  evaluation on 32 windows x 512), figures read from the export's report.json (identical results checked).
- eval-262k: a synthetic Llama with a 262,144-token tied vocabulary (hidden 640, 2 layers, about 180 M
  parameters, so the fp32 weights are dominated by the embedding: 671 of 710 MB) and a perturbed copy of it
  as "compressed", both with SmolLM2's tokenizer; `eval COPY --reference ORIG` and `eval COPY` on 4 windows x 512.
- eval-262k-270m: the same with issue 25's model shape (Gemma-3-270M-like: hidden 640, 18 layers, 4 heads of
  256, 1 KV head, intermediate 2048, tied 262,144-token vocabulary: about 268 M parameters), this checkout only.
- eval-smollm2 / eval-qwen: the real models, this checkout only: `eval EXPORT --reference MODEL` on 32 windows
  x 512, EXPORT written first by `compress MODEL --recipe w4a16-gptq-g128 --calib-samples 16 --no-eval` (its
  own memory is not what is measured; 16 calibration windows keep it short).
- pipeline-qwen: the pipeline case on Qwen2.5-Coder-0.5B-Instruct (`compress qwen2.5-coder-0.5b`), this
  checkout only (the before code has no Qwen reference).

    .venv/bin/python benchmarks/pipeline_memory.py --before DIR          # all cases, before and after (~30 min)
    .venv/bin/python benchmarks/pipeline_memory.py --cases eval-262k     # one case
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CASES = ("pipeline", "eval-262k", "eval-262k-270m", "eval-smollm2", "pipeline-qwen", "eval-qwen")
ROWS = ("perplexity", "reference perplexity", "top-1 agreement", "mean KL")


def run(tree: Path, args: list[str], env: dict, code: str | None = None) -> dict:
    """Run `python -m modelpress.cli ARGS` (or `python -c CODE`) in `tree` under /usr/bin/time -v: peak RSS (MB,
    the child's own high-water mark), wall seconds, stdout."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "modelpress.cli", *args]
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        p = subprocess.run(["/usr/bin/time", "-v", "-o", tf.name, *cmd], cwd=tree, env=env,
                           capture_output=True, text=True)
        timing = Path(tf.name).read_text()
    if p.returncode != 0:
        raise RuntimeError(f"{cmd} failed in {tree}:\n{p.stderr[-3000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", timing).group(1))
    return {"rss_mb": kb * 1024 / 1e6, "wall": time.perf_counter() - t0, "stdout": p.stdout, "figures": {}}


def git_head(tree) -> str:
    """The short commit of a checkout ('' for a tree outside git, e.g. a `git archive` copy)."""
    return subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


FLOOR = ("import modelpress.cli, modelpress.api, torch, transformers\n"
         "from modelpress.api import load\n"
         "m, _ = load({src!r})\n"
         "print(sum(float(p.detach().sum()) for p in m.parameters()))   # every weight read (no copy of it)\n")


def fp32_mb(model: str) -> float:
    """The reference model's fp32 weight bytes (MB), from its safetensors header: every stored tensor once (a
    tied output layer is not stored), 4 bytes per element."""
    import math

    from safetensors import safe_open
    from modelpress.model import reference_dir
    total = 0
    for f in sorted(reference_dir(model).glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            total += sum(math.prod(h.get_slice(k).get_shape()) for k in h.keys())
    return total * 4 / 1e6


def pipeline(tree: Path, model: str, out: Path, env: dict, sizes: dict, key: str | None = None) -> dict:
    """`compress MODEL --recipe w4a16-gptq-g128` in `tree`: peak RSS, wall, the report's figures; records the
    model's fp32 weight MB in sizes[key or model] (from the checkpoint, not from the report)."""
    r = run(tree, ["compress", model, "--recipe", "w4a16-gptq-g128", "--out", str(out)], env)
    rep = json.loads((out / "report.json").read_text())
    sizes[key or model] = fp32_mb(model)
    ev = rep["eval"]
    r["figures"] = {"original perplexity": ev["original"]["perplexity"], "perplexity": ev["compressed"]["perplexity"],
                    "top-1 agreement": ev["compressed"]["agreement"], "mean KL": ev["compressed"]["kl"]}
    return r


def table_values(stdout: str) -> dict:
    """The figures of `eval`'s printed table (rich box rows `│ name │ value │`)."""
    vals = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in re.split(r"[│|]", line) if c.strip()]
        if len(cells) == 2 and cells[0] in ROWS:
            vals[cells[0]] = cells[1]
    return vals


SHAPES = {"262k": {"num_hidden_layers": 2, "num_attention_heads": 10, "num_key_value_heads": 2},
          "262k-270m": {"num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256}}


def big_vocab_models(d: Path, shape: str = "262k") -> tuple[Path, Path, int]:
    """ORIG and a perturbed COPY (every decoder weight x (1 + 30% noise)): 262k tied vocabulary, hidden 640,
    intermediate 2048, the layers and heads of SHAPES[shape]."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from modelpress.model import smollm2_dir
    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    cfg = LlamaConfig(vocab_size=262_144, hidden_size=640, intermediate_size=2048, **SHAPES[shape],
                      tie_word_embeddings=True, max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        m.model.embed_tokens.weight.normal_(0, 0.1)       # logits with a spread of a few units
    nbytes = sum(p.numel() * 4 for p in m.parameters())
    orig, copy = d / f"{shape}-orig", d / f"{shape}-copy"
    m.save_pretrained(orig)
    tok.save_pretrained(orig)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "layers" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
    m.save_pretrained(copy)
    tok.save_pretrained(copy)
    return orig, copy, nbytes


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--before", default="/work/main", help="checkout with the pre-change code")
    ap.add_argument("--before-label", help="what --before holds, for the table (default: its git HEAD)")
    ap.add_argument("--label", help="the commit this checkout holds, recorded with each row it measures "
                    "(default: its git HEAD; give it when running from a `git archive` copy)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-md", action="store_true")
    ap.add_argument("--cache", default="/tmp/modelpress-pipeline-memory.json",
                    help="finished measurements (a later run continues from them)")
    a = ap.parse_args(argv)
    cases = a.cases.split(",")
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "TQDM_DISABLE": "1"}
    trees = {"before": Path(a.before), "after": ROOT}
    cache_path = Path(a.cache)
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    res: dict = {tuple(k.split("|")): v for k, v in cache.items() if not k.startswith("_")}
    sizes = cache.setdefault("_fp32_mb", {})
    argv_s = " ".join(sys.argv[1:])
    cmd = "python benchmarks/pipeline_memory.py" + (f" {argv_s}" if argv_s else "")

    label = a.label or git_head(ROOT)

    def done(case, tag, r):
        r.pop("stdout", None)
        if tag == "after" and label:
            r["commit"] = label
        res[case, tag] = r
        cache[f"{case}|{tag}"] = r
        cache_path.write_text(json.dumps(cache, indent=1))
        print(f"{case} {tag}: {r['rss_mb']:.0f} MB, {r['wall']:.0f} s, {r['figures']}", flush=True)
        if not a.no_md:
            from benchmarks._md import write_section
            write_section("pipeline memory", cmd, report(res, sizes, a))

    if "pipeline" in cases or "eval-smollm2" in cases:      # from the checkpoint (also for cached rows)
        sizes["smollm2"] = fp32_mb("smollm2")
    if "pipeline-qwen" in cases or "eval-qwen" in cases:
        sizes["qwen"] = fp32_mb("qwen2.5-coder-0.5b")
    work = Path(tempfile.mkdtemp(prefix="mp-mem-"))
    try:
        if "pipeline" in cases:
            if ("floor: load smollm2", "after") not in res:
                done("floor: load smollm2", "after", run(ROOT, [], env, FLOOR.format(src="smollm2")))
            for tag, tree in trees.items():
                if ("pipeline", tag) not in res:
                    done("pipeline", tag, pipeline(tree, "smollm2", work / f"w4-{tag}", env, sizes))
        if "pipeline-qwen" in cases and ("pipeline-qwen", "after") not in res:
            done("pipeline-qwen", "after", pipeline(ROOT, "qwen2.5-coder-0.5b", work / "w4-qwen", env, sizes, "qwen"))
        for case, model in (("eval-smollm2", "smollm2"), ("eval-qwen", "qwen2.5-coder-0.5b")):
            if case in cases and (case, "after") not in res:
                out = work / f"quick-{model}"
                run(ROOT, ["compress", model, "--recipe", "w4a16-gptq-g128", "--calib-samples", "16", "--no-eval",
                           "--out", str(out)], env)
                r = run(ROOT, ["eval", str(out), "--reference", model, "--windows", "32", "--seqlen", "512"], env)
                r["figures"] = table_values(r["stdout"])
                done(case, "after", r)
        for shape in ("262k", "262k-270m"):
            if f"eval-{shape}" not in cases:
                continue
            orig, copy, nb = big_vocab_models(work, shape)
            sizes[shape] = nb / 1e6
            done(f"floor: load {shape} model", "after", run(ROOT, [], env, FLOOR.format(src=str(copy))))
            for tag, tree in (trees.items() if shape == "262k" else [("after", ROOT)]):
                for ref in (True, False):
                    args = ["eval", str(copy), "--windows", "4", "--seqlen", "512"]
                    args += ["--reference", str(orig)] if ref else []
                    r = run(tree, args, env)
                    r["figures"] = table_values(r["stdout"])
                    done(f"eval-{shape}" + (" --reference" if ref else ""), tag, r)
    finally:
        subprocess.run(["rm", "-rf", str(work)])
    print(report(res, sizes, a))
    if not a.no_md:                       # also when every case came from the cache
        from benchmarks._md import write_section
        write_section("pipeline memory", cmd, report(res, sizes, a))


def report(res: dict, sizes: dict, a) -> str:
    from benchmarks._md import table
    fp32_smol, fp32_big = sizes.get("smollm2"), sizes.get("262k")
    rows = []
    for case in ("floor: load smollm2", "pipeline", "eval-smollm2", "pipeline-qwen", "eval-qwen",
                 "floor: load 262k model", "eval-262k --reference", "eval-262k", "floor: load 262k-270m model",
                 "eval-262k-270m --reference", "eval-262k-270m"):
        if (case, "after") not in res:
            continue
        fp32 = (sizes.get("262k-270m") if "270m" in case else fp32_big if "262k" in case
                else sizes.get("qwen") if case.endswith("-qwen") else fp32_smol)
        b, f = res.get((case, "before")), res[case, "after"]
        same = ("n/a" if case.startswith("floor") or b is None else
                "yes" if b is not None and b["figures"] == f["figures"] else "NO")
        for tag, r in (("before", b), ("after", f)):
            if r is None:
                continue
            figs = ", ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}" for k, v in r["figures"].items())
            code = f"{tag} ({r['commit']})" if r.get("commit") else tag
            rows.append([case, code, f"{r['rss_mb']:.0f}", f"{r['rss_mb'] / fp32:.2f}x" if fp32 else "n/a",
                         f"{r['rss_mb'] - fp32:+.0f}" if fp32 else "n/a", f"{r['wall']:.0f}", figs,
                         same if tag == "after" else ""])
    cmds = {"pipeline": "compress smollm2 --recipe w4a16-gptq-g128 --out OUT",
            "pipeline-qwen": "compress qwen2.5-coder-0.5b --recipe w4a16-gptq-g128 --out OUT",
            "eval-smollm2": "eval QUICK --reference smollm2 --windows 32 --seqlen 512",
            "eval-qwen": "eval QUICK --reference qwen2.5-coder-0.5b --windows 32 --seqlen 512",
            "eval-262k --reference": "eval COPY --reference ORIG --windows 4 --seqlen 512",
            "eval-262k": "eval COPY --windows 4 --seqlen 512",
            "eval-262k-270m --reference": "eval COPY --reference ORIG --windows 4 --seqlen 512 (the 270M shape)",
            "eval-262k-270m": "eval COPY --windows 4 --seqlen 512 (the 270M shape)"}
    label = a.before_label or git_head(a.before) or a.before
    lines = [f"Peak RSS (`/usr/bin/time -v`: the one `python -m modelpress.cli` process' own high-water mark) before (the pre-change "
             f"code: {label}) and after (this checkout: `compress` goes layer by layer from the shards where the "
             "recipe allows (modelpress.engine.stream scores the original, the offload engine compresses and "
             "exports, the export is scored layer by layer too; neither whole model is ever resident), `eval` "
             "streams an export, a safetensors reference and a safetensors model likewise, tensors copied out of the "
             "safetensors files on load but for the input embedding and an untied output layer, which stay mapped; "
             f"each after row names the commit it ran on), OMP_NUM_THREADS={a.threads}; the machine's 2 cores were shared with other jobs "
             "(benchmarks, tests), so wall times are indicative. "
             f"fp32 weight bytes: SmolLM2 {fp32_smol or float('nan'):.0f} MB, Qwen2.5-Coder-0.5B "
             f"{sizes.get('qwen') or float('nan'):.0f} MB, synthetic 262k-vocabulary Llama "
             f"{fp32_big or float('nan'):.0f} MB (hidden 640, 2 layers, tied), the same with issue 25's 270M shape "
             f"{sizes.get('262k-270m') or float('nan'):.0f} MB (18 layers). QUICK = `compress MODEL --recipe "
             "w4a16-gptq-g128 --calib-samples 16 --no-eval --out QUICK` (not measured). Targets: pipeline <= 1.6x fp32 "
             "weights; eval <= fp32 weights + 500 MB. Figures: perplexity / agreement / KL from report.json "
             "(pipeline, full precision) or as `eval` prints them (4 significant digits); `same` = identical "
             "before and after (the after code stores unquantized tensors in bf16 and evaluates exactly what it "
             "stores (issue 25), so its figures differ from before's in the 4th-5th significant digit). *floor* rows: the same interpreter importing modelpress/torch/transformers, loading "
             "the model with `modelpress.api.load` and reading every weight (what any command on that model costs "
             "before it computes anything).", "",
             table(["case", "code", "peak RSS MB", "x fp32 weights", "MB over fp32 weights", "wall s", "figures",
                    "same"], rows), "",
             "Commands (`python -m modelpress.cli ...`): " + "; ".join(f"{k}: `{v}`" for k, v in cmds.items()
                                                               if any(c == k for c, _ in res)) + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
