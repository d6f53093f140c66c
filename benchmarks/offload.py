"""Peak memory of `compress --offload` (layer by layer from safetensors shards) against the in-memory path.

A synthetic 8-layer Llama (hidden 1664, 13 heads, MLP 4480, vocab 8192, untied; about 1.1 GB of fp32
weights) is saved as ~200 MB safetensors shards. Each (mode, recipe) runs in a fresh worker process,
started by a fresh launcher that reads the worker's peak RSS with
resource.getrusage(RUSAGE_CHILDREN).ru_maxrss; the worker also reports its RSS right after its imports
(the interpreter + torch + transformers floor, no model). Both paths write the native export.

    .venv/bin/python benchmarks/offload.py                 # RTN w4 g128 and GPTQ w4 g128 (8 x 64 tokens), ~7 min
    .venv/bin/python benchmarks/offload.py --recipes rtn   # RTN only (about two minutes)
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECIPES = {
    "rtn": "stages:\n  - quantize: {method: rtn, bits: 4, group_size: 128}\n",
    "gptq": ("calibration: {source: %s, samples: 8, seqlen: 64, seed: 0}\n"
             "stages:\n  - quantize: {method: gptq, bits: 4, group_size: 128}\n"),
}

WORKER = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
from modelpress.recipe import Recipe
recipe = Recipe.from_yaml({recipe!r})
if {offload!r}:
    from modelpress.engine.offload import run_recipe_offloaded
else:
    from modelpress.api import run_recipe
if not {offload!r} or recipe.needs_calibration:      # this path builds the model class and a tokenizer:
    from accelerate import init_empty_weights           # their code is part of its floor (no weights)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    with init_empty_weights():
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained({model!r}))
    AutoTokenizer.from_pretrained({model!r})
floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if {offload!r}:
    run_recipe_offloaded(recipe, {model!r}, {out!r})
else:
    run_recipe(recipe, {model!r}, {out!r}, evaluate_models=False, checkpoint=False)
print(json.dumps({{"floor_kb": floor, "seconds": time.perf_counter() - t0}}))
"""

LAUNCHER = r"""
import json, resource, subprocess, sys
p = subprocess.run([sys.executable, "-c", sys.argv[1]], capture_output=True, text=True)
if p.returncode:
    sys.stderr.write(p.stderr[-3000:]); sys.exit(p.returncode)
r = json.loads(p.stdout.strip().splitlines()[-1])
r["peak_kb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps(r))
"""


def make_model(folder: Path) -> tuple[int, int]:
    """Synthetic Llama saved as shards; returns (weight bytes, bytes of one decoder layer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import tiny_tokenizer
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=1664, intermediate_size=4480, num_hidden_layers=8,
                      num_attention_heads=13, num_key_value_heads=13, tie_word_embeddings=False,
                      max_position_embeddings=512)
    model = LlamaForCausalLM(cfg)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    layer = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    model.save_pretrained(folder, max_shard_size="200MB")
    tiny_tokenizer().save_pretrained(folder)
    del model
    return nbytes, layer


def measure(model: Path, recipe: Path, out: Path, offload: bool) -> dict:
    code = WORKER.format(root=str(ROOT), recipe=str(recipe), model=str(model), out=str(out), offload=offload)
    p = subprocess.run([sys.executable, "-c", LAUNCHER, code], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"worker failed:\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    from benchmarks._md import table, write_section
    from modelpress.engine.shards import CHUNK_BYTES
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", default="rtn,gptq")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mp-offload-"))
    try:
        nbytes, layer_bytes = make_model(work / "model")
        text = work / "calib.txt"
        text.write_text("the quick brown fox jumps over the lazy dog; compression keeps what matters.\n\n" * 400)
        rows, floors = [], {}
        for name in a.recipes.split(","):
            recipe = work / f"{name}.yaml"
            recipe.write_text(RECIPES[name] % text if "%s" in RECIPES[name] else RECIPES[name])
            res = {}
            for offload in (True, False):
                r = measure(work / "model", recipe, work / f"out-{name}-{offload}", offload)
                res[offload] = r
                floors[(name, offload)] = r["floor_kb"] * 1024
                peak, floor = r["peak_kb"] * 1024, r["floor_kb"] * 1024
                rows.append([f"{name} w4 g128", "offload" if offload else "in memory", f"{peak / 1e6:.0f}",
                             f"{100 * peak / nbytes:.1f}%", f"{floor / 1e6:.0f}", f"{(peak - floor) / 1e6:.0f}",
                             f"{100 * (peak - floor) / nbytes:.1f}%", f"{r['seconds']:.1f}"])
                print(rows[-1], flush=True)
            same = [json.loads((work / f"out-{name}-{o}" / "modelpress.json").read_text())["tensor_sha256"]
                    for o in (True, False)]
            rows.append([f"{name} w4 g128", "offload / in memory", f"{res[True]['peak_kb'] / res[False]['peak_kb']:.2f}x",
                         "", "", "", "", f"exported tensors identical: {'yes' if same[0] == same[1] else 'NO'}"])
        header = ["recipe", "path", "peak RSS (MB)", "peak / weights", "import floor (MB)",
                  "peak - floor (MB)", "(peak - floor) / weights", "compress+export (s)"]
        body = (f"Synthetic 8-layer Llama, {nbytes / 1e9:.2f} GB of fp32 weights in 200 MB safetensors shards; "
                "peak RSS of a fresh process (ru_maxrss via RUSAGE_CHILDREN), one thread. Target: offload peak "
                "< 40% of the weight size.\n\n" + table(header, rows)
                + "\n\nImport floor: the process after the imports its path needs, before any weight is read "
                  "(Python + torch + modelpress; plus the transformers model class and tokenizer for the in-memory "
                  "path and for calibrated offload, which build a meta skeleton and tokenize the calibration text; "
                  "calibration-free offload builds no model and copies the tokenizer files). "
                  f"RTN offload holds one row chunk ({CHUNK_BYTES >> 20} MB of fp32 rows) of one linear plus its packed codes; "
                  "tensors are read with pread, not mmap, and the export is copied in row chunks, so neither a "
                  "decoder layer nor the embedding or lm_head is ever resident. GPTQ offload holds one decoder "
                  f"layer ({layer_bytes / 1e6:.0f} MB here) with its Hessians while the layer is solved; the embedding "
                  "is materialized only for the layer-0 input capture, lm_head never; its peak comes inside the GPTQ "
                  "solve of the widest linear (down_proj: its 4480 x 4480 Hessian plus the about three matrices of that "
                  "size that modelpress.algos.gptq.inverse_hessian_chol holds while it factors it)."
                  + "".join(f" Lower bound of any one-layer-resident {n} run here: its import floor + one fp32 layer = "
                            f"{(f + layer_bytes) / 1e6:.0f} MB ({100 * (f + layer_bytes) / nbytes:.1f}% of the weights)."
                            for (n, o), f in floors.items() if o and n != "rtn"))
        print(body)
        if not a.no_write:
            write_section("offload", " ".join(["python benchmarks/offload.py", *sys.argv[1:]]), body)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
