"""Quality off the calibration domain (issue 25): the shipped GPTQ and SparseGPT recipes on Wikipedia (the
calibration domain) and on public-domain novels, against their calibration-free / cheaper baselines, and which
factor drives the off-domain loss, one factor at a time.

Models: SmolLM2-135M-Instruct and Qwen2.5-Coder-0.5B-Instruct (`--model`, fp32; one section each). Evaluation: `windows_for(tok, "wiki-eval" | "novels-eval", 512, W)` (W = 16),
scored with modelpress.eval.evaluate against the uncompressed model. Calibration: `calibration_set(tok, "wiki",
"random", N, 512, seed)` with N = 16 and seeds 0, 1, 2 (the shipped recipes use 128 x 512: this run is smaller).
Settings are the shipped recipes' stage configs (w4a16-gptq-g128: GPTQ w4 g128 sym act_order observer hessian;
sparsegpt-2of4: SparseGPT 2:4), compared with RTN w4 g128 (no calibration) and Wanda 2:4 (same calibration).
Damage = perplexity - the uncompressed model's perplexity on the same text; "damage removed vs RTN" =
1 - damage(GPTQ) / damage(RTN); "SparseGPT / Wanda damage" < 1 means SparseGPT is better. Since this study
w4a16-gptq-g128 calibrates on wiki+novels: its setting is the "GPTQ wiki+novels mix" row, and "GPTQ (shipped)"
is its stage config with the former `wiki` calibration (the default before the change).

Factors (one at a time from the shipped setting, same 3 seeds): GPTQ observer mse / minmax, act_order false,
damp 0.1, 32 samples, a half-and-half calibration mix (the composite source "wiki+novels": N/2 windows
from each part's calibration pool, `calibration_set(tok, "wiki+novels", "random", N, 512, seed)`); SparseGPT
damp 0.1, 32 samples, the mix.

Every finished run is kept in a JSON cache (--cache), so an interrupted run continues; the section is rewritten
after each run from the cache.

    .venv/bin/python benchmarks/offdomain.py                      # everything (~40 min on 2 cores)
    .venv/bin/python benchmarks/offdomain.py --seeds 0 --no-factors
    .venv/bin/python benchmarks/offdomain.py --model qwen2.5-coder-0.5b --no-factors
    .venv/bin/python benchmarks/offdomain.py --samples 128 --only "RTN w4 g128,GPTQ (shipped),GPTQ wiki+novels mix"
        # the shipped calibration size (its own section): the default change's before / after
"""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._md import model_label, table, write_section  # noqa: E402
from modelpress.api import calibration_set, compress, load, windows_for  # noqa: E402
from modelpress.eval.perplexity import evaluate, reference_scores  # noqa: E402
from modelpress.recipe import Recipe  # noqa: E402

DOMAINS = ("wiki-eval", "novels-eval")
GPTQ = {"method": "gptq", "bits": 4, "group_size": 128, "sym": True, "act_order": True, "observer": "hessian",
        "exclude": ["lm_head"]}
SGPT = {"method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4", "exclude": ["lm_head"]}
# name -> (stage, config, calibration kind, samples multiplier)
SETTINGS = {
    "RTN w4 g128": ("quantize", {"method": "rtn", "bits": 4, "group_size": 128, "exclude": ["lm_head"]}, None, 1),
    "GPTQ (shipped)": ("quantize", GPTQ, "wiki", 1),
    "Wanda 2:4": ("prune", {"method": "wanda", "sparsity": 0.5, "pattern": "2:4", "exclude": ["lm_head"]}, "wiki", 1),
    "SparseGPT 2:4 (shipped)": ("prune", SGPT, "wiki", 1),
}
FACTORS = {
    "GPTQ observer mse": ("quantize", {**GPTQ, "observer": "mse"}, "wiki", 1),
    "GPTQ observer minmax": ("quantize", {**GPTQ, "observer": "minmax"}, "wiki", 1),
    "GPTQ act_order false": ("quantize", {**GPTQ, "act_order": False}, "wiki", 1),
    "GPTQ damp 0.1": ("quantize", {**GPTQ, "damp": 0.1}, "wiki", 1),
    "GPTQ 2x samples": ("quantize", GPTQ, "wiki", 2),
    "GPTQ wiki+novels mix": ("quantize", GPTQ, "mix", 1),
    "SparseGPT damp 0.1": ("prune", {**SGPT, "damp": 0.1}, "wiki", 1),
    "SparseGPT 2x samples": ("prune", SGPT, "wiki", 2),
    "SparseGPT wiki+novels mix": ("prune", SGPT, "mix", 1),
}
BASE_OF = {k: ("GPTQ (shipped)" if k.startswith("GPTQ") else "SparseGPT 2:4 (shipped)") for k in FACTORS}


def calib_for(tok, kind: str | None, samples: int, seqlen: int, seed: int):
    if kind is None:
        return None
    return calibration_set(tok, "wiki" if kind == "wiki" else "wiki+novels", "random", samples, seqlen, seed)


def mine(cache: dict, tag: str, a) -> dict:
    """This model's runs at this run's sizes, keyed without the model tag."""
    out = {}
    for k, v in cache.items():
        if tag and not k.startswith(tag):
            continue
        k = k[len(tag):]
        if k.count("|") == 4 and k.split("|")[1:4] == [str(a.samples), str(a.seqlen), str(a.windows)]:
            out[k] = v
    return out


def ms(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):.3f} ± {sd:.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def report(cache: dict, a, base: dict) -> str:
    def runs(name):
        return [v for k, v in sorted(cache.items()) if k.split("|")[0] == name]

    def ppl(name, dom):
        return [r[dom]["perplexity"] for r in runs(name)]

    def dmg(name, dom):
        return [p - base[dom] for p in ppl(name, dom)]

    lines = [f"{model_label(a.model)} fp32; evaluation {a.windows} windows x {a.seqlen} tokens per text "
             f"(`wiki-eval`: the calibration domain; `novels-eval`: Austen, *Pride and Prejudice*, off-domain); "
             f"calibration `wiki` random, {a.samples} x {a.seqlen} tokens"
             f"{' (smaller than the shipped 128 x 512)' if a.samples < 128 else ''}, "
             f"seeds {', '.join(map(str, a.seeds))}; mean ± sd over seeds. Uncompressed perplexity: wiki-eval "
             f"{base['wiki-eval']:.3f}, novels-eval {base['novels-eval']:.3f}. torch threads {a.threads}.", ""]
    rows = []
    for name in [*SETTINGS, *FACTORS]:
        if not runs(name):
            continue
        r = [name, len(runs(name))]
        for dom in DOMAINS:
            r += [ms(ppl(name, dom)), ms([x["agreement"] for x in (q[dom] for q in runs(name))]),
                  ms([x["kl"] for x in (q[dom] for q in runs(name))])]
        rows.append(r)
    lines += ["### Perplexity, agreement, KL per setting", "",
              table(["setting", "seeds", "wiki ppl", "wiki top-1 agr", "wiki KL", "novels ppl", "novels top-1 agr",
                     "novels KL"], rows), ""]
    rtn = {dom: statistics.fmean(dmg("RTN w4 g128", dom)) if runs("RTN w4 g128") else None for dom in DOMAINS}
    rows = []
    for name in ["GPTQ (shipped)", *[k for k in FACTORS if k.startswith("GPTQ")]]:
        if runs(name) and rtn["wiki-eval"]:
            rows.append([name, len(runs(name))] + [ms([1 - d / rtn[dom] for d in dmg(name, dom)]) for dom in DOMAINS])
    if rows:
        lines += ["### GPTQ: damage removed vs RTN (1 - Δppl / Δppl RTN; per seed, mean ± sd)", "",
                  table(["setting", "seeds", "wiki-eval (in domain)", "novels-eval (off domain)"], rows), ""]
    wanda = {dom: statistics.fmean(dmg("Wanda 2:4", dom)) if runs("Wanda 2:4") else None for dom in DOMAINS}
    rows = []
    for name in ["SparseGPT 2:4 (shipped)", *[k for k in FACTORS if k.startswith("SparseGPT")]]:
        if runs(name) and wanda["wiki-eval"]:
            rows.append([name, len(runs(name))] + [ms([d / wanda[dom] for d in dmg(name, dom)]) for dom in DOMAINS])
    if rows:
        lines += ["### SparseGPT 2:4: damage relative to Wanda 2:4 (Δppl / Δppl Wanda (mean over seeds); < 1 = better)",
                  "", table(["setting", "seeds", "wiki-eval (in domain)", "novels-eval (off domain)"], rows), ""]
    def by_seed(name, dom):
        return {k.split("|")[-1]: v[dom]["perplexity"] for k, v in cache.items() if k.split("|")[0] == name}

    rows = []
    for name, b in BASE_OF.items():
        if not runs(name) or not runs(b):
            continue
        cells = [name, b]
        for dom in DOMAINS:
            x, y = ppl(name, dom), ppl(b, dom)
            diff = statistics.fmean(x) - statistics.fmean(y)
            noise = max(statistics.stdev(x) if len(x) > 1 else 0.0, statistics.stdev(y) if len(y) > 1 else 0.0)
            verdict = "noise" if abs(diff) <= 2 * noise or len(x) < 2 else ("better" if diff < 0 else "worse")
            fx, fy = by_seed(name, dom), by_seed(b, dom)
            paired = [fx[s] - fy[s] for s in sorted(fx) if s in fy]
            pm = (f"{statistics.fmean(paired):+.3f} ± {statistics.stdev(paired):.3f}" if len(paired) > 1 else
                  f"{paired[0]:+.3f}" if paired else "n/a")
            cells += [f"{diff:+.3f}", f"{noise:.3f}", verdict, f"{pm} ({len(paired)})"]
        rows.append(cells)
    if rows:
        lines += ["### One factor at a time: Δ mean perplexity vs the shipped setting (negative = better)", "",
                  "Verdict: better / worse only where |Δ| > 2 x the larger seed sd of the two settings, else noise. "
                  "*paired*: the difference seed by seed (the same calibration windows where the factor keeps the "
                  "source), mean ± sd (number of seeds): a consistent sign with a small sd is a small but real effect "
                  "the unpaired verdict may call noise.", "",
                  table(["factor", "vs", "wiki Δ", "wiki sd", "wiki", "wiki paired", "novels Δ", "novels sd",
                         "novels", "novels paired"], rows), ""]
        cand = [f"{r[0]} (wiki paired {r[5]})" for r in rows if r[8] == "better" and r[4] != "worse"]
        lines += ["Candidates for a default change (better off domain, in domain not worse by the rule above): "
                  + (", ".join(cand) if cand else "none") + ".", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="a reference name (smollm2, qwen2.5-coder-0.5b)")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--no-factors", action="store_true")
    ap.add_argument("--only", help="comma-separated setting names to run (default all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default="/tmp/modelpress-offdomain.json")
    ap.add_argument("--no-md", action="store_true")
    ap.add_argument("--report-only", action="store_true",
                    help="write the section from the cache (every run and the uncompressed perplexities in it)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cache_path = Path(a.cache)
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    t0 = time.perf_counter()
    tag = "" if a.model == "smollm2" else f"{a.model}|"       # cache keys: the SmolLM2 ones unprefixed
    section = ("off-domain quality" + ("" if a.model == "smollm2" else f": {model_label(a.model)}")
               + ("" if a.samples == 16 else f", {a.samples} calibration samples"))
    argv_s = shlex.join(x for x in sys.argv[1:] if x != "--report-only")
    cmd = "python benchmarks/offdomain.py" + (f" {argv_s}" if argv_s else "")
    base_key = f"_base|{tag}{a.seqlen}|{a.windows}"
    if a.report_only:
        if base_key not in cache:
            raise SystemExit(f"--report-only: {a.cache} has no uncompressed perplexities ({base_key}): run once without it")
        body = report(mine(cache, tag, a), a, cache[base_key])
        print(body)
        if not a.no_md:
            write_section(section, cmd, __doc__.split("\n\n")[1] + "\n\n" + body)
        return
    model, tok = load(a.model)
    wins = {d: windows_for(tok, d, a.seqlen, a.windows) for d in DOMAINS}
    refs = {d: reference_scores(model, w, 2) for d, w in wins.items()}
    base = {d: r.evaluation()["perplexity"] for d, r in refs.items()}
    cache[base_key] = base
    print(f"[{time.perf_counter() - t0:6.0f} s] uncompressed {base}", flush=True)
    todo = dict(SETTINGS) if a.no_factors else {**SETTINGS, **FACTORS}
    if a.only:
        todo = {k: v for k, v in todo.items() if k in a.only.split(",")}
    phases = [{k: v for k, v in todo.items() if k in SETTINGS}, {k: v for k, v in todo.items() if k in FACTORS}]
    for seed, name, (stage, cfg, kind, mult) in ((s, n, v) for ph in phases for s in a.seeds for n, v in ph.items()):
        if kind is None and seed != a.seeds[0]:
            continue                                   # no calibration: one run
        key = f"{tag}{name}|{a.samples}|{a.seqlen}|{a.windows}|{seed}"
        if key in cache:
            continue
        calib = calib_for(tok, kind, a.samples * mult, a.seqlen, seed)
        m = copy.deepcopy(model)
        t = time.perf_counter()
        compress(m, Recipe.from_dict({"stages": [{stage: cfg}]}), calib)
        took = time.perf_counter() - t
        res = {"seconds": took}
        for d in DOMAINS:
            r = evaluate(m, wins[d], refs[d], 2)
            res[d] = {k: r[k] for k in ("perplexity", "agreement", "kl")}
        del m
        cache[key] = res
        cache_path.write_text(json.dumps(cache, indent=1))
        print(f"[{time.perf_counter() - t0:6.0f} s] {name} seed {seed}: {took:.0f} s, "
              f"wiki {res['wiki-eval']['perplexity']:.3f} novels {res['novels-eval']['perplexity']:.3f}", flush=True)
        if not a.no_md:
            write_section(section, cmd, __doc__.split("\n\n")[1] + "\n\n" + report(mine(cache, tag, a), a, base))
    body = report(mine(cache, tag, a), a, base)
    print(body)
    if not a.no_md:
        write_section(section, cmd, __doc__.split("\n\n")[1] + "\n\n" + body)


if __name__ == "__main__":
    main()
