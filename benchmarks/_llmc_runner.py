"""One llm-compressor (PyPI llmcompressor 0.14.x) compression in a fresh process, for
benchmarks/vs_llmcompressor.py. Runs with .venv-llmc/bin/python and never imports modelpress.

    .venv-llmc/bin/python benchmarks/_llmc_runner.py MODEL_DIR CALIB_IDS.pt SCHEME_JSON OUT_DIR

MODEL_DIR: plain HF folder; CALIB_IDS.pt: LongTensor (n, seqlen) made by modelpress' calibration_set
(identical samples for both tools); SCHEME_JSON: {"method": "gptq"|"wanda"|"sparsegpt", "bits",
"group_size", "sym", "actorder": "static"|null, "damp", "block_size", "sparsity", "pattern",
"batch_size", "threads"}. Writes OUT_DIR/model (dense HF folder: fake-quantized / pruned float32
weights, no quantization_config) and OUT_DIR/result.json (compression wall time, peak RSS, ...).

Wall time covers `oneshot(...)` only (model already loaded, data already a DataLoader); peak RSS is
the process' VmHWM just after oneshot returns (before saving), RSS before = after model load.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def _rss_mb() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 2**20


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _peak_mb() -> float:
    """This process' peak RSS (VmHWM). Not ru_maxrss: Linux carries the parent's peak across fork+exec."""
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024


def build_recipe(s: dict):
    """The llm-compressor modifier for one scheme (lm_head ignored, every other Linear targeted)."""
    method = s["method"]
    if method == "gptq":
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from llmcompressor.modifiers.quantization import GPTQModifier
        weights = QuantizationArgs(num_bits=s["bits"], type="int", symmetric=s["sym"],
                                   strategy="group" if s.get("group_size") else "channel",
                                   group_size=s.get("group_size"), dynamic=False,
                                   actorder=s.get("actorder"),
                                   observer=s.get("observer", "memoryless_minmax"))
        scheme = QuantizationScheme(targets=["Linear"], weights=weights)
        return GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"],
                            block_size=s.get("block_size", 128), dampening_frac=s.get("damp", 0.01),
                            actorder=s.get("actorder"))
    # their sparsity modifiers name a matched module "<layer>." (trailing dot), so a plain "lm_head" ignore
    # misses it and the tied lm_head / embedding gets pruned: use the regex form their warning suggests
    ignore = ["re:.*lm_head"]
    pat = s.get("pattern", "unstructured")
    mask = "0:0" if pat == "unstructured" else pat
    if method == "wanda":
        from llmcompressor.modifiers.pruning import WandaPruningModifier
        return WandaPruningModifier(sparsity=s["sparsity"], mask_structure=mask, targets=["Linear"],
                                    ignore=ignore)
    if method == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier
        return SparseGPTModifier(sparsity=s["sparsity"], mask_structure=mask, targets=["Linear"],
                                 ignore=ignore, block_size=s.get("block_size", 128),
                                 dampening_frac=s.get("damp", 0.01))
    raise SystemExit(f"_llmc_runner: unknown method {method!r} (use gptq, wanda or sparsegpt)")


def dense_state(model) -> dict:
    """Plain parameters only (drop weight_scale / weight_zero_point / g_idx / observers)."""
    skip = ("_scale", "_zero_point", "_g_idx", "_global_scale", "_observer")
    return {k: v.detach().float().clone() for k, v in model.state_dict().items()
            if not any(k.endswith(s) or s + "." in k for s in skip)}


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    model_dir, ids_path, scheme_json, out_dir = argv
    s = json.loads(scheme_json)
    threads = int(s.get("threads", 2))
    import torch
    torch.set_num_threads(threads)
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM
    from llmcompressor import oneshot
    import llmcompressor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.load(ids_path).long()                                     # (n, seqlen)
    rows = [{"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i])} for i in range(ids.shape[0])]
    loader = DataLoader(rows, batch_size=int(s.get("batch_size", 8)), shuffle=False)
    recipe = build_recipe(s)
    rss_before, peak_before = _rss_mb(), _peak_mb()
    print(f"[llmc] {s['method']} on {ids.shape[0]}x{ids.shape[1]} ids, {threads} threads", flush=True)
    t0, c0 = time.perf_counter(), _cpu_s()
    oneshot(model=model, recipe=recipe, dataset=loader, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False, pipeline="sequential",
            save_compressed=False)
    seconds, cpu_seconds = time.perf_counter() - t0, _cpu_s() - c0
    peak_after = _peak_mb()

    # a dense plain model (no quantization_config) holding the fake-quantized / pruned weights
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(model_dir)
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    sd = dense_state(model)
    missing, unexpected = plain.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]     # tied to embed_tokens
    if missing or unexpected:
        raise SystemExit(f"_llmc_runner: state mismatch, missing {missing[:5]} unexpected {unexpected[:5]}")
    plain.save_pretrained(out / "model")
    emb = plain.get_input_embeddings().weight.detach()
    emb0 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).get_input_embeddings().weight
    check = {"embedding_unchanged": bool(torch.equal(emb, emb0))}
    if s["method"] == "gptq":   # the saved weights sit on the integer grid: count codes per group
        gs = s.get("group_size") or None
        w = plain.model.layers[0].self_attn.q_proj.weight.detach()
        g = w.reshape(w.shape[0], -1, gs) if gs else w[:, None, :]
        check["max_distinct_per_group_q_proj0"] = int(max(len(torch.unique(r)) for r in g.reshape(-1, g.shape[-1])[:512]))
    else:
        lin = [m.weight for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
        check["sparsity"] = float(sum(int((w == 0).sum()) for w in lin) / sum(w.numel() for w in lin))
    res = {"tool": "llmcompressor", "version": llmcompressor.__version__, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "compress_seconds": seconds, "compress_cpu_seconds": cpu_seconds,
           "rss_before_mb": rss_before, "peak_before_mb": peak_before, "peak_rss_mb": peak_after,
           "scheme": s, "recipe": repr(recipe), **check}
    (out / "result.json").write_text(json.dumps(res, indent=1))
    print(f"[llmc] done in {seconds:.1f} s, peak RSS {peak_after:.0f} MB", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
