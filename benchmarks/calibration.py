"""Calibration-data curation on an LM (SmolLM2-135M-Instruct by default; --model): random vs ZipCal
("Frequency Matters", arXiv 2603.16105) vs two model-based baselines: the one the authors' code ships
(lowest-perplexity selection) and the one their result tables compare with (COLA, arXiv 2510.10618), all on
the same pool.

Selectors (modelpress/calib/select.py, following the authors' code): zipcal-coverage = their
`unique_tokens_sampling` over the pool's sentences (the sampler their scalability test times as theirs),
zipcal-words = their `words_dataset_sampling` (what their plots label ZipCal), perplexity = their
`least_perplexity_sampling` (every candidate sentence scored by the model, lowest kept), cola = COLA's
activation-clustering sample selection (one pool window per k-means cluster of mean layer activations). For each
compression (Wanda 50%, SparseGPT 50%, GPTQ w3 g64 asym; `cluster` on request) and selector, over seeds
(5 by default for every compression; the perplexity selector is deterministic, one run): held-out
perplexity and top-1 agreement with the uncompressed model (mean, sd, min-max); selection time of each
selector on the same pool (and its ratio to the model-based baselines'); linear scaling of the model-free
selectors (time on the pool over time on a tenth of it, target < 15x for a 10x pool). Verdicts only where
a gap exceeds one sd (the larger of the two selectors' seed sds).

    .venv/bin/python benchmarks/calibration.py --threads 1        # SmolLM2, writes the "calibration" section

COLA's candidates (the pool's windows in pool order) and their activations do not depend on the seed, so they
are computed once per run and each seed's set reuses them; each set's time counts them in full (the cost of one
COLA selection), and each set equals `calibration_set(select="cola")`'s.

Every selected set (with its selection time) and every finished (compression, selector, seed) run is cached
(--cache, keyed by the settings that change a number), so a run cut short resumes, and processes with
different --stages (and --no-write) can run side by side before one run renders the section.

`--pool-texts N` uses a seeded random N of the Wikipedia calibration summaries as the pool of every selector,
so the model-based baseline can score all of it on a CPU; 0 = all 8985."""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import modelpress  # noqa: E402
from benchmarks._md import model_label, run_cache, table, write_section  # noqa: E402
from modelpress.api import windows_for  # noqa: E402
from modelpress import progress  # noqa: E402
from modelpress.calib import CalibrationSet  # noqa: E402
from modelpress.calib import select as S  # noqa: E402
from modelpress.calib import sources  # noqa: E402
from modelpress.calib.protocol import body_len, prepend, window_bos  # noqa: E402
from modelpress.eval import evaluate  # noqa: E402
from modelpress.io import atomic_save_file, atomic_write_text  # noqa: E402

METHODS = ("random", "zipcal-words", "zipcal-coverage", "perplexity", "cola")
STAGE_RECIPES = {
    "wanda": {"prune": {"method": "wanda", "sparsity": 0.5}},
    "sparsegpt": {"prune": {"method": "sparsegpt", "sparsity": 0.5}},
    "gptq": {"quantize": {"method": "gptq", "bits": 3, "group_size": 64, "sym": False}},
    # the clustering benchmark's best setting (K=16, one codebook per 16 output rows, hessian-diag weighted
    # k-means), so the calibration set matters (the stage's default, weighting none, ignores it)
    "cluster": {"cluster": {"k": 16, "group_rows": 16, "weighting": "hessian-diag"}},
}
STAGE_LABELS = {"wanda": "Wanda 50% unstructured", "sparsegpt": "SparseGPT 50% unstructured", "gptq": "GPTQ w3 g64 asym", "cluster": "cluster K=16 /16 rows hessian-diag"}
VERDICT_METHODS = ("zipcal-coverage", "zipcal-words", "perplexity", "cola")
BASELINES = {"perplexity": "the authors' code's model-based sampler", "cola": "the paper's tables' model-based method"}

T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


class CachedReference(nn.Module):
    """The uncompressed model's logits on the evaluation windows, computed once: `evaluate` calls its
    reference per batch, and the reference never changes between runs (same numbers, half the time)."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_size: int):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)     # gives evaluate() a device
        self.cache: dict[bytes, torch.Tensor] = {}
        with torch.no_grad():
            for b in range(0, windows.shape[0], batch_size):
                ids = windows[b:b + batch_size]
                self.cache[ids.numpy().tobytes()] = model(input_ids=ids, use_cache=False).logits.float()

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False, **_):
        return SimpleNamespace(logits=self.cache[input_ids.cpu().numpy().tobytes()])


def types_per_sample(ids: torch.Tensor, tok) -> float:
    """Mean number of distinct normalised token types per calibration sample."""
    types = S.normalised_types(ids.numpy(), tok)
    return float(np.mean([len(np.unique(r[r >= 0])) for r in types]))


def spread(xs: list[float]) -> tuple[float, float, float, float]:
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0, min(xs), max(xs))


def time_selector(method: str, pool: list[str], tok, samples: int, seqlen: int, repeats: int, model=None) -> float:
    best = float("inf")
    for r in range(repeats):
        t = time.perf_counter()
        S.SELECTORS[method](pool, tok, samples=samples, seqlen=seqlen, seed=r, model=model)
        best = min(best, time.perf_counter() - t)
    return best


def report(a, argv, load_s, methods, pool, pool_desc, windows, base, sel_time, sel_types, scaling, notes, results, stages,
           pending) -> str:
    """The markdown section from the numbers gathered so far."""
    n_seeds = sorted({len(v["ppl"]) for (_, m), v in results.items() if m != "perplexity"})
    rows = []
    for st in stages:
        rnd = results.get((st, "random"))
        for m in methods:
            if (st, m) not in results:
                continue
            p, g = spread(results[st, m]["ppl"]), spread(results[st, m]["agr"])
            dp = p[0] - statistics.fmean(rnd["ppl"]) if rnd else float("nan")
            rows.append([STAGE_LABELS[st], m, len(results[st, m]["ppl"]), f"{p[0]:.3f} ± {p[1]:.3f}",
                         f"{p[2]:.3f}–{p[3]:.3f}", f"{dp:+.3f}", f"{g[0]:.4f} ± {g[1]:.4f}"])
    q = table(["compression", "selection", "seeds", "perplexity mean ± sd", "perplexity min–max",
               "Δ mean vs random", "top-1 agreement mean ± sd"], rows)
    base_t = {b: statistics.fmean(sel_time[b]) for b in BASELINES if b in methods}
    srows = [[m, statistics.fmean(sel_time[m]), *(t / statistics.fmean(sel_time[m]) for t in base_t.values()),
              statistics.fmean(sel_types[m])] for m in methods]
    sel = table(["selection", "seconds per set (the pool, in memory)", *(f"{b} time / this" for b in base_t),
                 "types per sample"], srows)
    sc = table(["selection", "pool texts (1/10)", "seconds", "pool texts (all)", "seconds", "time ratio"], scaling)
    verdicts = []
    for b, t in base_t.items():
        for m in ("zipcal-coverage", "zipcal-words"):
            if m in methods:
                r = t / statistics.fmean(sel_time[m])
                verdicts.append(f"Selection speed: {m} is {r:.0f}x faster than {b} ({BASELINES[b]}) on the same pool "
                                f"(paper: ~240x on average): {'reproduced' if r >= 100 else 'not reproduced'} (>= 100x).")
    for r in scaling:
        verdicts.append(f"Scaling {r[0]}: 10x pool -> {r[5]:.1f}x time (target < 15x): "
                        f"{'met' if r[5] < 15 else 'NOT met'}.")
    for st in stages:
        if (st, "random") not in results:
            continue
        rm, rs = spread(results[st, "random"]["ppl"])[:2]
        for m in VERDICT_METHODS:
            if (st, m) in results:
                zm, zs = spread(results[st, m]["ppl"])[:2]
                det = m == "perplexity"            # deterministic selector: its only spread is random's
                sd = rs if det else max(rs, zs)
                if len(results[st, "random"]["ppl"]) < 2 or (len(results[st, m]["ppl"]) < 2 and not det):
                    v = "no verdict (one seed)"
                elif zm < rm - sd:
                    v = "better than random by more than one sd"
                elif zm > rm + sd:
                    v = "WORSE than random by more than one sd"
                else:
                    v = "no difference beyond one sd"
                verdicts.append(f"Quality {STAGE_LABELS[st]}, {m}: mean perplexity {zm:.3f} vs random {rm:.3f} "
                                f"({'random' if det else 'larger'} seed sd {sd:.3f}"
                                f"{'; the selector is deterministic' if det else ''}): {v}.")
        for b in BASELINES:                  # the paper: ZipCal is competitive with the model-based selection
            if (st, b) not in results:
                continue
            pm, ps = spread(results[st, b]["ppl"])[:2]
            for m in ("zipcal-coverage", "zipcal-words"):
                if (st, m) in results and len(results[st, m]["ppl"]) > 1:
                    zm, zs = spread(results[st, m]["ppl"])[:2]
                    sd = max(zs, rs if b == "perplexity" else ps)        # deterministic perplexity: random's sd
                    v = ("reproduced (better by more than one sd)" if zm < pm - sd else
                         "contradicted (worse by more than one sd)" if zm > pm + sd else
                         "reproduced (no difference beyond one sd)")
                    verdicts.append(f"Paper claim (ZipCal is competitive with the model-based selection), "
                                    f"{STAGE_LABELS[st]}, {m}: {zm:.3f} vs {b}-selected {pm:.3f} (larger seed sd of "
                                    f"{m} and {'random' if b == 'perplexity' else b} {sd:.3f}): {v}.")
    claims = [f"{x.split(':')[0].replace('Quality ', '')}: " + ("reproduced" if "better" in x else "contradicted"
                                                              if "WORSE" in x else "not reproduced")
              for x in verdicts if x.startswith("Quality") and "zipcal" in x and "no verdict" not in x]
    if claims:
        verdicts.append("Paper claim (ZipCal beats uniform random sampling): " + "; ".join(claims) + ".")
    if pending:
        verdicts.append(f"PARTIAL: stages {', '.join(pending)} had not finished when this section was written.")
    return (f"{a.label} (float32), calibration pool: {pool_desc} "
            f"({len(pool)} summaries, the same pool for every selector); {a.samples} samples x {a.seqlen} tokens per calibration set; held-out "
            f"evaluation: {windows.shape[0]} windows x {windows.shape[1]} tokens of the Wikipedia evaluation split "
            f"(uncompressed perplexity {base:.3f}); seeds per compression and selector: "
            f"{' or '.join(map(str, n_seeds)) or 0} (the first of 0..{a.seeds - 1}); "
            f"{a.threads} CPU thread(s), shared machine. The perplexity baseline scores every sentence of the pool "
            f"with the model and keeps the lowest-perplexity ones (deterministic: one set, so one run per compression); zipcal-coverage and perplexity pack whole "
            f"sentences into the windows; cola keeps one of the pool's windows per k-means cluster of their mean layer "
            f"activations (seeded projection and k-means). One LM per run (section per model).\n\n"
            f"### Held-out quality after compression\n\n{q}\n\n### Selection time\n\n"
            f"Mean over the seeds of `calibration_set` on the in-memory pool (each set timed when it was first "
            f"selected; the sets are cached); reading and hashing the pool once "
            f"(`wiki_texts` + `source_sha256`) took a further {load_s:.2f} s, common to every method.\n\n{sel}\n\n"
            f"### Linear scaling (best of {a.scaling_repeats})\n\n{sc}\n\n### Verdict\n\n"
            + "\n".join(f"- {v}" for v in verdicts + notes))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--samples", type=int, default=16, help="calibration samples")
    ap.add_argument("--seqlen", type=int, default=256, help="calibration sample length (tokens)")
    ap.add_argument("--pool-texts", type=int, default=1000, help="seeded random subset of the pool (0 = all)")
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--eval-seqlen", type=int, default=256)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--stages", default="wanda,sparsegpt,gptq")
    ap.add_argument("--model", default="smollm2", help="reference name or HF folder")
    ap.add_argument("--scaling-repeats", type=int, default=3, help="best-of repeats for the scaling timings")
    ap.add_argument("--stage-seeds", default="", help="fewer seeds for slow stages, e.g. gptq=3")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--section", default="calibration", help="BENCHMARKS.md section to (re)write")
    ap.add_argument("--no-write", action="store_true", help="print only, do not touch BENCHMARKS.md")
    ap.add_argument("--cache", default="/tmp/modelpress-calibration",
                    help="folder of selected sets and finished runs (resume; parallel processes by --stages)")
    a = ap.parse_args(argv)
    progress.show()                   # the model-based selectors' i/N, ETA lines in the log
    a.label = model_label(a.model)
    torch.set_num_threads(a.threads)
    cache = run_cache(a.cache, a, ("seeds", "stage_seeds", "methods", "stages", "scaling_repeats", "threads",
                                   "section", "no_write", "cache"))
    methods = [m for m in a.methods.split(",") if m]
    stages = [s for s in a.stages.split(",") if s]
    seeds = list(range(a.seeds))
    notes: list[str] = []
    for s in list(stages):
        name = next(iter(STAGE_RECIPES[s]))
        if name not in modelpress.STAGES:
            stages.remove(s)
            notes.append(f"Stage `{name}` is not registered in modelpress.STAGES in this run, so it was skipped.")

    say(f"loading {a.label} and the Wikipedia pool")
    orig, tok = modelpress.load(a.model)
    t = time.perf_counter()
    pool = sources.wiki_texts("calib")
    sources.source_sha256("wiki")
    load_s = time.perf_counter() - t
    pool_desc = "the Wikipedia calibration split"
    if a.pool_texts:
        keep = np.sort(np.random.default_rng(12345).choice(len(pool), a.pool_texts, replace=False))
        pool = [pool[i] for i in keep]
        pool_desc = f"a fixed random {a.pool_texts} (numpy seed 12345) of the Wikipedia calibration split's summaries"
    windows = windows_for(tok, "wiki-eval", a.eval_seqlen, a.eval_windows)
    ref = CachedReference(orig, windows, batch_size=2)
    base = evaluate(orig, windows, batch_size=2)["perplexity"]
    say(f"uncompressed perplexity {base:.3f} on {windows.shape[0]} x {windows.shape[1]} held-out tokens")

    # ---- selection: once per (method, seed), reused by every compression. The in-memory pool is the
    # source, so the timing is the selection itself, not reading and hashing the 4 MB Wikipedia JSON.
    # Each set, its time and its types per sample are cached (the set is deterministic; the time is the
    # first run's), so a later run or a parallel process reuses the perplexity baseline's long scoring.
    calibs: dict[tuple[str, int], CalibrationSet] = {}
    sel_time: dict[str, list[float]] = {m: [] for m in methods}
    sel_types: dict[str, list[float]] = {m: [] for m in methods}
    cola = None                                 # (candidates, their activations, bos, seconds), made once
    for m in methods:
        for s in (seeds[:1] if m == "perplexity" else seeds):     # scores every sentence: no seed in it
            f = cache / f"select-{m}-{s}"
            if f.with_suffix(".json").is_file():
                rec = json.loads(f.with_suffix(".json").read_text())
                calibs[m, s] = CalibrationSet.from_ids(load_file(str(f.with_suffix(".safetensors")))["input_ids"])
            elif m == "cola":           # the candidates' activations do not depend on the seed: computed once,
                if cola is None:        # each set's time counts them in full (what one selection costs)
                    t = time.perf_counter()
                    bos = window_bos(tok)
                    cand = S.pool_windows(pool, tok, body_len(a.seqlen, bos), None, a.samples)
                    cola = (cand, S.window_activations(orig, cand, bos), bos, time.perf_counter() - t)
                    say(f"cola: activations of {cand.shape[0]} candidate windows in {cola[3]:.1f} s")
                t = time.perf_counter()
                ids = prepend(cola[0][S.cola_pick(cola[1], a.samples, s)], cola[2])
                calibs[m, s] = CalibrationSet.from_ids(ids)
                rec = {"seconds": cola[3] + time.perf_counter() - t, "types": types_per_sample(ids, tok)}
            else:
                t = time.perf_counter()
                calibs[m, s] = modelpress.calibration_set(tok, pool, select=m, samples=a.samples, seqlen=a.seqlen,
                                                          seed=s, model=orig)
                rec = {"seconds": time.perf_counter() - t, "types": types_per_sample(calibs[m, s].input_ids, tok)}
            if not f.with_suffix(".json").is_file():
                atomic_save_file({"input_ids": calibs[m, s].input_ids}, f.with_suffix(".safetensors"))
                atomic_write_text(f.with_suffix(".json"), json.dumps(rec))
            sel_time[m].append(rec["seconds"])
            sel_types[m].append(rec["types"])
        say(f"selected {m}: {statistics.fmean(sel_time[m]):.2f} s per set, "
            f"{statistics.fmean(sel_types[m]):.1f} types/sample")

    # ---- linear scaling: a tenth of the pool vs all of it (model-free selectors)
    scaling = []
    for m in [m for m in methods if m not in S.MODEL_BASED]:
        small = time_selector(m, pool[::10], tok, a.samples, a.seqlen, a.scaling_repeats)
        full = time_selector(m, pool, tok, a.samples, a.seqlen, a.scaling_repeats)
        scaling.append([m, len(pool[::10]), small, len(pool), full, full / small])
        say(f"scaling {m}: {small:.3f} s -> {full:.3f} s ({full / small:.1f}x for "
            f"{len(pool) / len(pool[::10]):.1f}x pool)")

    # ---- compress + evaluate (the section is rewritten after every stage, so a cut-off run keeps its numbers)
    stage_seeds = {k: int(v) for k, v in (x.split("=") for x in a.stage_seeds.split(",") if x)}
    results: dict[tuple[str, str], dict[str, list[float]]] = {}
    ctx = dict(a=a, argv=argv, load_s=load_s, methods=methods, pool=pool, pool_desc=pool_desc, windows=windows, base=base, sel_time=sel_time,
               sel_types=sel_types, scaling=scaling, notes=notes, results=results)
    for i, st in enumerate(stages):
        recipe = modelpress.Recipe.from_dict({"stages": [STAGE_RECIPES[st]]})
        uses_calib = recipe.needs_calibration
        st_seeds = seeds[:stage_seeds.get(st, len(seeds))] if uses_calib else seeds[:1]
        for m in methods:
            ppl, agr = [], []
            for s in (st_seeds[:1] if m == "perplexity" else st_seeds):
                f = cache / f"run-{st}-{m}-{s}.json"
                cached = f.is_file()
                if cached:
                    r = json.loads(f.read_text())
                else:
                    model = copy.deepcopy(orig)
                    t = time.perf_counter()
                    modelpress.compress(model, recipe, calibs[m, s] if uses_calib else None)
                    tc = time.perf_counter() - t
                    r = evaluate(model, windows, reference=ref, batch_size=2)
                    r = {"perplexity": r["perplexity"], "agreement": r["agreement"], "compress_s": tc}
                    atomic_write_text(f, json.dumps(r))
                    del model
                ppl.append(r["perplexity"])
                agr.append(r["agreement"])
                say(f"{st} {m} seed {s}: ppl {r['perplexity']:.3f} agreement {r['agreement']:.4f} "
                    f"(compress {r['compress_s']:.0f} s{', cached' if cached else ''})")
            results[st, m] = {"ppl": ppl, "agr": agr}
            last = m == methods[-1] or not uses_calib
            body = report(stages=stages[:i + 1], pending=([] if last else [f"{st} ({m} done)"]) + stages[i + 1:],
                          **ctx)
            if not a.no_write:
                write_section(a.section, "python benchmarks/calibration.py " + " ".join(
                    argv if argv is not None else sys.argv[1:]), body)
                say(f"wrote BENCHMARKS.md section {a.section!r}")
            if not uses_calib:
                notes.append(f"`{st}` does not use calibration data (recipe.needs_calibration is false): one run.")
                break
    print(report(stages=stages, pending=[], **ctx))
    return 0


if __name__ == "__main__":
    sys.exit(main())
