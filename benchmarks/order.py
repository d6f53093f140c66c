"""Compression order on SmolLM2-135M-Instruct: prune-then-quantize vs quantize-then-prune, tested as the
Progressive Intensity Hypothesis states it ("Prune-then-Quantize or Quantize-then-Prune?", Kim et al.,
arXiv 2603.18426): applying the weaker perturbation first is better, and (Theorem 2) the advantage grows
with the intensity gap.

Pairs: pruners (--pruners: Wanda at sparsities or N:M patterns, e.g. 0.5 or 2:4; SparseGPT as sparsegpt:0.5
or sparsegpt:2:4 -- after quantization its OBS updates snap to the quantized grid; default Wanda {0.3, 0.5}) x quantizer
(--quant: RTN, or GPTQ, which calibrates per seed) x bits (default {w3, w4}; group 64, asymmetric; never
4-bit group 32, SmolLM2's native grid), both orders, over calibration seeds (each seed draws its own
Wikipedia calibration sample). Scored on fixed held-out Wikipedia windows: perplexity and KL to the
uncompressed model. Intensity of a stage alone = compression-equivalent bits: its held-out KL mapped
onto the RTN bits -> KL curve (8/6/4/3/2 bits) by interpolation in log(KL)
(modelpress.plan.order.equivalent_bits); fewer bits = stronger.

Per pair: the order advantage = (KL stronger-first - KL weaker-first) / KL weaker-first, per seed, mean
+- sd over seeds, and a paired bootstrap over evaluation windows (95 % interval of the seed-mean
advantage). A pair's better order is "inside noise" when |mean| <= 2 sd over seeds or the window
interval contains 0. Claims: (1) weaker-first wins -- counted over the pairs outside noise; (2) Theorem
2 -- Spearman(gap, advantage) over pairs with a bootstrap 95 % interval (resampling pairs); (3) `plan
order`'s pick (weaker first by eq. bits measured on calibration text -- extra calibration sequences the
stages never calibrated on, as plan order does) against the measured better order: accuracy over pairs
outside noise, the within-noise pairs counted apart; and the pick of `plan order --measured` (the order
with the lower KL on those same calibration sequences, both orders run end to end) scored the same way.

The RTN curve, the original model's scores and, per seed, every cell as it finishes (a pair's P->Q, then
both its orders, a stage alone, the planner's RTN curve; each with its computation time) are cached (--cache,
keyed by every setting but the seeds and the grid --pruners/--bits), so a run resumes at the next cell, a
larger grid reuses a smaller one's cells, and seeds can run as separate processes (--no-write; one process per
seed at a time) before one run over all seeds renders the section from the cache, exactly as one process
would have written it (the bootstrap draws its own fixed-seed resamples in every rendering). Each pruned
model is built once and quantized at every width (P->Q), each quantized model once and pruned at every
sparsity (Q->P): the stages are deterministic given the seed's calibration sample, so this is the same
computation as one pair at a time.

    .venv/bin/python benchmarks/order.py                 # defaults below, writes BENCHMARKS.md
    .venv/bin/python benchmarks/order.py --no-write --pruners 0.5,2:4 --bits 4 --seeds 0

The cells of the grids run since 2026-12-07 are committed under benchmarks/cache/order (one folder per
settings key, JSON only), so a lost machine does not cost the runs again: `--cache benchmarks/cache/order`
resumes or renders from them.

Joint semantics are the stages' own: prune-then-quantize takes scales from the surviving weights;
quantize-then-prune masks the dequantized weights (Wanda and SparseGPT statistics taken on the quantized
model), and SparseGPT's OBS updates of the survivors are snapped back onto the quantized grid (its scales
kept), so both orders end in the same format."""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import modelpress  # noqa: E402
from benchmarks._md import model_label, ms, run_cache, table, write_section  # noqa: E402
from modelpress.api import windows_for  # noqa: E402
from modelpress.calib import CalibrationSet  # noqa: E402
from modelpress.eval.perplexity import evaluate, reference_scores  # noqa: E402
from modelpress.io import atomic_write_text  # noqa: E402
from modelpress.plan.order import equivalent_bits  # noqa: E402
from modelpress.stages.prune import Prune  # noqa: E402
from modelpress.stages.quantize import Quantize  # noqa: E402

T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


class Scorer:
    """Perplexity, top-1 agreement and mean KL(original || model) on fixed windows (per window too), by
    modelpress.eval.evaluate against the original's scores computed once (reference_scores keeps the output
    layer's inputs, a few MB, not the logits)."""

    def __init__(self, model, windows: torch.Tensor, batch_size: int = 2):
        self.windows, self.bs = windows, batch_size
        self.ref = reference_scores(model, windows, batch_size)

    def original(self) -> dict:
        """What scoring the original itself returns: its perplexity, KL exactly 0, agreement 1."""
        return {"ppl": self.ref.evaluation()["perplexity"], "kl": 0.0, "top1": 1.0,
                "kl_windows": [0.0] * self.windows.shape[0]}

    def __call__(self, model) -> dict:
        r = evaluate(model, self.windows, reference=self.ref, batch_size=self.bs)
        return {"ppl": r["perplexity"], "kl": r["kl"], "top1": r["agreement"],
                "kl_windows": r["per_token"]["kl"].double().mean(1).tolist()}     # mean KL of each window


def window_boot(wf: list[list[float]], sf: list[list[float]], reps: int, rng: random.Random) -> tuple[float, float]:
    """95 % interval of the seed-mean relative advantage, resampling evaluation windows (paired: the same
    windows for both orders and every seed). wf, sf: per seed, per-window KL of weaker-first / stronger-first."""
    n = len(wf[0])
    vals = []
    for _ in range(reps):
        idx = [rng.randrange(n) for _ in range(n)]
        adv = []
        for a, b in zip(wf, sf):
            ka, kb = sum(a[i] for i in idx), sum(b[i] for i in idx)
            adv.append((kb - ka) / max(ka, 1e-12))
        vals.append(statistics.fmean(adv))
    vals.sort()
    return vals[int(0.025 * reps)], vals[int(0.975 * reps) - 1]


def pair_boot_rho(gaps: list[float], advs: list[float], reps: int, rng: random.Random) -> tuple[float, float]:
    """95 % bootstrap interval of Spearman(gap, advantage), resampling pairs."""
    n, vals = len(gaps), []
    for _ in range(reps):
        idx = [rng.randrange(n) for _ in range(n)]
        g, a = [gaps[i] for i in idx], [advs[i] for i in idx]
        if len(set(g)) > 1 and len(set(a)) > 1:
            vals.append(spearmanr(g, a).statistic)
    vals.sort()
    return (vals[int(0.025 * len(vals))], vals[int(0.975 * len(vals)) - 1]) if vals else (math.nan, math.nan)


def split_pruner(key: str) -> tuple[str, str]:
    """"sparsegpt:2:4" -> ("sparsegpt", "2:4"); "0.5" -> ("wanda", "0.5")."""
    return ("sparsegpt", key[len("sparsegpt:"):]) if key.startswith("sparsegpt:") else ("wanda", key)


def pruner_key(token: str) -> str:
    """The canonical key of a --pruners item (also the cache's): sparsities as str(float), so "0.50" is "0.5"."""
    method, v = split_pruner(token.strip())
    v = v if ":" in v else str(float(v))
    return v if method == "wanda" else f"sparsegpt:{v}"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 (default) or an HF folder (smoke tests)")
    ap.add_argument("--pruners", default="0.3,0.5",
                    help="comma list: Wanda sparsities and/or N:M patterns (2:4); sparsegpt:0.5, sparsegpt:2:4")
    ap.add_argument("--quant", default="rtn", choices=("rtn", "gptq"))
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--seeds", default="0,1,2", help="calibration seeds")
    ap.add_argument("--curve-bits", default="8,6,4,3,2")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--samples", type=int, default=16, help="calibration samples (pruner; GPTQ)")
    ap.add_argument("--seqlen", type=int, default=256, help="calibration tokens per sample")
    ap.add_argument("--plan-windows", type=int, default=4, help="extra calibration sequences the planner scores")
    ap.add_argument("--windows", type=int, default=16, help="evaluation windows")
    ap.add_argument("--eval-seqlen", type=int, default=256)
    ap.add_argument("--boot", type=int, default=2000, help="bootstrap resamples")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default="/tmp/modelpress-order", help="folder of the RTN curve and finished seeds (resume)")
    ap.add_argument("--no-write", action="store_true")
    return ap


CACHE_EXCLUDE = ("seeds", "threads", "cache", "no_write", "boot", "pruners", "bits")   # one cache per LM/quantizer
FIELDS = ("pcurve", "single", "p_single", "res", "pq", "q_single", "q_plan", "seconds")


def load_cells(cache: Path, seed: int) -> dict:
    """One seed's cached cells, whichever grids computed them: pcurve {bits: planner KL of RTN}, single /
    p_single {pruner: score / planner KL of the pruned model alone}, res {"pruner|bits": [P->Q, Q->P]},
    pq {"pruner|bits": P->Q of a pair whose Q->P is not done yet}, q_single / q_plan {bits: the quantizer
    alone}, seconds {cell: computation time}; legacy_seconds {grid: whole-seed time} for seeds cached before
    cells were (one file per grid)."""
    f = cache / f"seed{seed}.json"
    cells = json.loads(f.read_text()) if f.is_file() else {}
    return {k: cells.get(k, {}) for k in (*FIELDS, "legacy_seconds")}


def grid_name(sparsities: list[str], bits: list[int]) -> str:
    return ",".join(sparsities) + "|" + ",".join(map(str, bits))


def grid_cells(sparsities: list[str], bits: list[int], curve_bits: list[int]) -> dict[str, list[str]]:
    """The cells a grid needs, per field of load_cells."""
    return {"pcurve": [str(b) for b in curve_bits], "single": sparsities, "p_single": sparsities,
            "res": [f"{s}|{b}" for s in sparsities for b in bits], "q_single": [str(b) for b in bits],
            "q_plan": [str(b) for b in bits]}


def seed_time(cells: dict, needed: dict[str, list[str]], grid: str) -> str:
    """A seed's computation time for the grid (`needed`: its grid_cells; `grid`: its grid_name): the sum over its
    cells (quantized and pruned models alone, both orders of each pair); cells cached before cells were have
    only their grid's whole-process time."""
    parts = [f"q|{b}" for b in needed["q_single"]] + [f"p|{s}" for s in needed["single"]] + needed["res"]
    known = [cells["seconds"][k] for k in parts if k in cells["seconds"]]
    legacy = cells["legacy_seconds"]
    if len(known) == len(parts):
        return f"{sum(known):.0f} s"
    if grid in legacy:
        return f"{legacy[grid]:.0f} s in one process"
    older = [f"{t:.0f} s in one process for grid {g}" for g, t in legacy.items()
             if set(g.split("|")[0].split(",")) & set(needed["single"])]
    return f"{sum(known):.0f} s for {len(known)} of {len(parts)} cells" + (f" (the rest: {'; '.join(older)})" if older else "")


def main() -> None:
    a = parser().parse_args()
    torch.set_num_threads(a.threads)
    sparsities = [pruner_key(x) for x in a.pruners.split(",")]      # "0.5", "2:4", "sparsegpt:0.5", ...
    bits = [int(x) for x in a.bits.split(",")]
    seeds = [int(x) for x in a.seeds.split(",")]
    curve_bits = sorted({int(x) for x in a.curve_bits.split(",")} | set(bits), reverse=True)
    if a.group_size == 32 and 4 in curve_bits:
        raise SystemExit("4-bit group 32 is SmolLM2's native grid: use another group size")
    cache = run_cache(a.cache, a, CACHE_EXCLUDE)
    model, tok = modelpress.load(a.model)
    windows = windows_for(tok, "wiki-eval", a.eval_seqlen, a.windows)
    cells = {seed: load_cells(cache, seed) for seed in seeds}
    needed = grid_cells(sparsities, bits, curve_bits)
    todo = [seed for seed in seeds if any(k not in cells[seed][f] for f, ks in needed.items() for k in ks)]
    curve_file, base_file = cache / "curve.json", cache / "original.json"
    curve_cached = {int(b): v for b, v in json.loads(curve_file.read_text()).items()} if curve_file.is_file() else {}
    say(f"cache {cache}: seeds {[sd_ for sd_ in seeds if sd_ not in todo]} complete for this grid, "
        f"{'the' if set(curve_bits) <= set(curve_cached) else 'not all the'} RTN curve cached")
    render_only = not todo and set(curve_bits) <= set(curve_cached)
    score = None if render_only and base_file.is_file() else Scorer(model, windows)   # minutes on a 0.5B LM
    base = json.loads(base_file.read_text()) if base_file.is_file() else score.original()
    atomic_write_text(base_file, json.dumps(base))
    say(f"original: ppl {base['ppl']:.3f}")
    calibs, planners = {}, {}

    def seed_data(seed: int) -> tuple[CalibrationSet, Scorer]:
        """The seed's calibration set and its planner's scorer (extra calibration sequences never calibrated on)."""
        if seed not in planners:
            full = modelpress.calibration_set(tok, "wiki", samples=a.samples + a.plan_windows, seqlen=a.seqlen,
                                              seed=seed)
            calibs[seed] = CalibrationSet(full.input_ids[:a.samples], full.attention_mask[:a.samples], full.provenance)
            planners[seed] = Scorer(model, full.input_ids[a.samples:])
        return calibs[seed], planners[seed]

    def save(seed: int) -> None:               # after every cell: a cut-off run resumes at the next one
        atomic_write_text(cache / f"seed{seed}.json", json.dumps(cells[seed]))

    def quant(b, method="rtn"):
        return Quantize(method=method, bits=b, group_size=a.group_size, sym=False)

    def prune(s):
        method, v = split_pruner(s)
        return Prune(method=method, pattern=v) if ":" in v else Prune(method=method, sparsity=float(v))

    def pname(s):
        method, v = split_pruner(s)
        return f"{'Wanda' if method == 'wanda' else 'SparseGPT'} {v if ':' in v else format(float(v), '.0%')}"

    curve = {}                                  # RTN: the yardstick of eq. bits
    qname = a.quant.upper()
    for b in curve_bits:
        need = [seed for seed in todo if str(b) not in cells[seed]["pcurve"]]
        if b in curve_cached and not need:
            curve[b] = curve_cached[b]
            continue
        m = copy.deepcopy(model)
        quant(b).apply(m)
        curve[b] = curve_cached[b] if b in curve_cached else score(m)     # deterministic: RTN needs no data
        for seed in need:
            cells[seed]["pcurve"][str(b)] = seed_data(seed)[1](m)["kl"]
            save(seed)
        say(f"RTN w{b} g{a.group_size} asym: ppl {curve[b]['ppl']:.3f} KL {curve[b]['kl']:.4f}")
        del m                                  # RTN is deterministic: rebuilt where needed (memory: a 0.5B
                                               # model's copy is ~2 GB)
    atomic_write_text(curve_file, json.dumps({**curve_cached, **curve}))
    q_single, q_plan = {}, {}                  # (bits, seed) -> the quantizer alone: held-out score, planner KL
    cb, ck = list(curve), [curve[b]["kl"] for b in curve]

    def eb(kl):
        return equivalent_bits(cb, ck, kl)

    def report(done: list[int]) -> None:
        """Tables, verdicts and (unless --no-write) the BENCHMARKS.md section over the seeds done so far."""
        rng = random.Random(0)                 # the same resamples however many reports ran before
        rows, gaps, advs, outcomes = [], [], [], []
        for s in sparsities:
            for b in bits:
                eb_p = statistics.fmean(eb(single[s, seed]["kl"]) for seed in done)
                eb_q = statistics.fmean(eb(q_single[b, seed]["kl"]) for seed in done)
                prune_weaker = eb_p > eb_q                          # more equivalent bits = weaker perturbation
                wf = [res[s, b, seed][0 if prune_weaker else 1] for seed in done]
                sf = [res[s, b, seed][1 if prune_weaker else 0] for seed in done]
                adv = [(y["kl"] - x["kl"]) / max(x["kl"], 1e-12) for x, y in zip(wf, sf)]
                lo, hi = window_boot([x["kl_windows"] for x in wf], [y["kl_windows"] for y in sf], a.boot, rng)
                mean = statistics.fmean(adv)
                sd = statistics.stdev(adv) if len(adv) > 1 else math.nan
                noise = (len(adv) > 1 and abs(mean) <= 2 * sd) or lo <= 0 <= hi
                better = "P->Q" if (mean > 0) == prune_weaker else "Q->P"
                # the planner: weaker first by eq. bits on its calibration windows, per seed
                picks, joint = [], []
                for seed in done:
                    pb = [pcurve[seed][k] for k in cb]
                    picks.append("P->Q" if equivalent_bits(cb, pb, p_single[s, seed]) > equivalent_bits(cb, pb, q_plan[b, seed])
                                 else "Q->P")
                    r_pq, r_qp = res[s, b, seed]          # `plan order --measured`: both orders on the same windows
                    if "plan_kl" in r_pq:
                        joint.append("P->Q" if r_pq["plan_kl"] <= r_qp["plan_kl"] else "Q->P")
                gap = abs(eb_p - eb_q)
                gaps.append(gap)
                advs.append(mean)
                outcomes.append((noise, mean > 0, picks, better, joint))
                rows.append([pname(s), f"{qname} w{b} g{a.group_size}", round(eb_p, 2), round(eb_q, 2),
                             "P->Q" if prune_weaker else "Q->P", round(gap, 2),
                             ms([x[0]["ppl"] for x in (res[s, b, sd_] for sd_ in done)], ".2f"),
                             ms([x[1]["ppl"] for x in (res[s, b, sd_] for sd_ in done)], ".2f"),
                             ms([x[0]["kl"] for x in (res[s, b, sd_] for sd_ in done)], ".4f"),
                             ms([x[1]["kl"] for x in (res[s, b, sd_] for sd_ in done)], ".4f"),
                             ms([100 * v for v in adv], "+.1f") + " %", f"[{100 * lo:+.1f}, {100 * hi:+.1f}] %",
                             "inside noise" if noise else better, "/".join(picks), "/".join(joint) or "--"])
        n = len(rows)
        clear = [o for o in outcomes if not o[0]]
        wins = sum(o[1] for o in clear)
        rho = spearmanr(gaps, advs).statistic if n > 2 and len(set(gaps)) > 1 else math.nan
        rlo, rhi = pair_boot_rho(gaps, advs, a.boot, rng) if n > 2 else (math.nan, math.nan)
        right = sum(sum(p == o[3] for p in o[2]) for o in clear)
        tot = sum(len(o[2]) for o in clear)
        noisy_picks = sum(len(o[2]) for o in outcomes if o[0])
        j_right = sum(sum(p == o[3] for p in o[4]) for o in clear)
        j_tot = sum(len(o[4]) for o in clear)
        j_seeds = [seed for seed in done if "plan_kl" in res[sparsities[0], bits[0], seed][0]]
        prune_first = sum(o[3] == "P->Q" for o in clear)      # the alternative reading: one order always wins
        if not clear:
            v1 = "not reproduced: no pair's better order is outside the noise"
        elif wins == len(clear):
            v1 = f"reproduced: weaker-first wins all {len(clear)} pairs outside noise"
        elif wins * 2 < len(clear):
            v1 = f"contradicted: stronger-first wins {len(clear) - wins} of {len(clear)} pairs outside noise"
        else:
            v1 = f"not reproduced: weaker-first wins {wins} of {len(clear)} pairs outside noise"
        if math.isnan(rlo):
            v2 = "no verdict (too few pairs)"
        elif rlo > 0 and clear and not wins:     # a rank trend with no weaker-first win outside the noise
            v2 = ("reproduced as a rank trend (interval above 0), not as the theorem means it: no pair has a "
                  "weaker-first advantage beyond the noise, so the advantage rises from below zero toward zero as the "
                  "gap widens (stronger-first's edge fades when the weaker stage barely perturbs), not above it "
                  "beyond the noise")
        elif rlo > 0:
            v2 = "reproduced (interval above 0)"
        elif rhi < 0:
            v2 = "contradicted (interval below 0: the advantage shrinks as the gap grows)"
        else:
            v2 = "not reproduced (interval contains 0)"
        header = ["prune", "quant", "eq. bits P", "eq. bits Q", "weaker first", "gap (bits)", "ppl P->Q", "ppl Q->P",
                  "KL P->Q", "KL Q->P", "weaker-first advantage (seeds)", "95 % (windows)", "better order",
                  "plan order's pick per seed", "plan order --measured, per seed"]
        tbl = table(header, rows)
        curve_tbl = table(["RTN g%d asym" % a.group_size, "ppl", "KL"],
                          [[f"w{b}", round(curve[b]["ppl"], 3), round(curve[b]["kl"], 4)] for b in curve] +
                          [[f"{pname(s)} alone", ms([single[s, sd_]["ppl"] for sd_ in done]),
                            ms([single[s, sd_]["kl"] for sd_ in done], ".4f")] for s in sparsities] +
                          ([[f"GPTQ w{b} g{a.group_size} alone", ms([q_single[b, sd_]["ppl"] for sd_ in done]),
                             ms([q_single[b, sd_]["kl"] for sd_ in done], ".4f")] for b in bits]
                           if a.quant == "gptq" else []))
        summary = (f"Verdicts ({len(done)} seed(s), {n} pairs, {len(clear)} outside noise):\n\n"
                   f"- Weaker-first is better (the Progressive Intensity Hypothesis): {v1}.\n"
                   f"- Theorem 2, the advantage grows with the intensity gap: Spearman(gap, mean advantage) = {rho:+.2f}, "
                   f"bootstrap 95 % [{rlo:+.2f}, {rhi:+.2f}] over {n} pairs: {v2}.\n"
                   f"- `plan order` (weaker first by eq. bits on {a.plan_windows} held-back calibration sequences, one "
                   f"measurement per seed): {right} of {tot} picks match the measured better order on the pairs outside "
                   f"noise; {noisy_picks} picks on pairs inside noise are not counted.\n"
                   + (f"- `plan order --measured` (both orders run, KL on the same {a.plan_windows} held-back sequences; "
                      f"seeds {', '.join(map(str, j_seeds))}): {j_right} of {j_tot} picks match the measured better order "
                      "on the pairs outside noise.\n" if j_seeds else "")
                   + f"- Not a claim of the paper, read off the same pairs: prune-then-quantize (P->Q) is the better order in "
                   f"{prune_first} of {len(clear)} pairs outside noise, whichever stage is weaker.\n\n"
                   f"Original perplexity {base['ppl']:.3f}.")
        print(curve_tbl, "\n\n", tbl, "\n\n", summary, sep="")
        body = (f"{model_label(a.model)}, {', '.join(pname(s) for s in sparsities)} x {qname} (asymmetric, "
                f"{', '.join(f'w{b}' for b in bits)}), seeds {', '.join(map(str, done))}"
                + ("" if len(done) == len(seeds) else f" (completed {len(done)} of the {len(seeds)} planned: "
                   f"{', '.join(map(str, seeds))}; the run was cut short)") + " "
                f"(each its own {a.samples} x {a.seqlen}-token calibration sample), {windows.shape[0]} x "
                f"{a.eval_seqlen}-token held-out Wikipedia windows. Intensity of a stage alone = compression-equivalent "
                "bits: its held-out KL mapped onto the RTN bits -> KL curve below (interpolated in log KL; pruning: "
                "mean over seeds); fewer bits = stronger. Advantage = (KL stronger-first - KL weaker-first) / KL "
                "weaker-first: positive means the hypothesis holds; mean +- sd over seeds, and a 95 % interval from "
                "resampling evaluation windows. Better order: 'inside noise' when |mean| <= 2 sd or the window interval "
                "contains 0. SparseGPT after quantization: its OBS updates of the surviving weights are snapped to the "
                "quantized grid (modelpress's prune stage). Reduced scope (2-core CPU shared by the team): one LM per "
                f"section, {qname} only (the other quantizer is its own run), small calibration and evaluation "
                "sets.\n\n" + curve_tbl + "\n\n" + tbl + "\n\n" + summary +
                f"\n\nTime: {time.perf_counter() - T0:.0f} s for this invocation ({a.threads} thread); seeds: "
                + ", ".join(f"{sd_}: {seconds.get(sd_, 'not recorded')}" for sd_ in done)
                + " (a seed's computation of this grid's cells, whichever runs computed them: the quantized and "
                "pruned models alone and both orders of every pair; \"in one process\": cached before cells were, the "
                "process's whole time for the seed, its first seed including loading and the RTN curve).")
        if not a.no_write:
            methods = {split_pruner(s)[0] for s in sparsities}
            tag = " x ".join(([] if methods == {"wanda"} else ["SparseGPT" if methods == {"sparsegpt"} else
                                                                 "Wanda and SparseGPT"])
                             + ([] if a.quant == "rtn" else ["GPTQ"]))
            write_section("Compression order (plan order)" + (f": {tag}" if tag else "")
                          + ("" if a.model == "smollm2" else f": {model_label(a.model)}"),
                          "python benchmarks/order.py " + " ".join(sys.argv[1:]), body)

    single, p_single, res, pcurve, seconds = {}, {}, {}, {}, {}
    done: list[int] = []
    for seed in seeds:
        c = cells[seed]
        cal, plan = seed_data(seed) if seed in todo else (None, None)
        # P->Q: each pruned model once (pruning is deterministic), quantized at every width; memory: the
        # original, the pruned model and one quantized copy (a 0.5B run was OOM-killed holding more)
        for s in sparsities:
            need = [b for b in bits if f"{s}|{b}" not in c["res"] and f"{s}|{b}" not in c["pq"]]
            if not need and s in c["single"]:
                continue
            t = time.perf_counter()
            pm = copy.deepcopy(model)
            prune(s).apply(pm, cal)
            if s not in c["single"]:
                c["single"][s], c["p_single"][s] = score(pm), plan(pm)["kl"]
                c["seconds"][f"p|{s}"] = time.perf_counter() - t
                save(seed)
                say(f"{pname(s)} seed {seed}: ppl {c['single'][s]['ppl']:.3f} KL {c['single'][s]['kl']:.4f} "
                    f"-> {eb(c['single'][s]['kl']):.2f} eq. bits")
            for b in need:
                t = time.perf_counter()
                pq = copy.deepcopy(pm)
                quant(b, a.quant).apply(pq, cal)
                c["pq"][f"{s}|{b}"] = dict(score(pq), plan_kl=plan(pq)["kl"])     # plan_kl: what --measured sees
                c["seconds"][f"pq|{s}|{b}"] = time.perf_counter() - t
                del pq
                save(seed)
                say(f"  {pname(s)} x w{b}: P->Q ppl {c['pq'][f'{s}|{b}']['ppl']:.3f} "
                    f"KL {c['pq'][f'{s}|{b}']['kl']:.4f}")
            del pm
        # Q->P: each quantized model once, pruned at every sparsity; a pair's cell is complete here
        for b in bits:
            need = [s for s in sparsities if f"{s}|{b}" not in c["res"]]
            if not need and str(b) in c["q_single"]:
                continue
            t = time.perf_counter()
            qm = copy.deepcopy(model)
            if a.quant == "gptq":
                quant(b, "gptq").apply(qm, cal)
                if str(b) not in c["q_single"]:
                    c["q_single"][str(b)], c["q_plan"][str(b)] = score(qm), plan(qm)["kl"]
                    c["seconds"][f"q|{b}"] = time.perf_counter() - t
                    say(f"GPTQ w{b} seed {seed}: ppl {c['q_single'][str(b)]['ppl']:.3f} "
                        f"KL {c['q_single'][str(b)]['kl']:.4f}")
            else:                              # RTN needs no data: the curve's scores, the planner's KL of it
                quant(b).apply(qm)
                c["q_single"][str(b)], c["q_plan"][str(b)] = curve[b], c["pcurve"][str(b)]
                c["seconds"][f"q|{b}"] = 0.0
            save(seed)
            for s in need:
                t = time.perf_counter()
                qp = copy.deepcopy(qm)
                prune(s).apply(qp, cal)
                r_qp = dict(score(qp), plan_kl=plan(qp)["kl"])
                del qp
                r_pq = c["pq"].pop(f"{s}|{b}")
                c["res"][f"{s}|{b}"] = [r_pq, r_qp]
                c["seconds"][f"{s}|{b}"] = c["seconds"].pop(f"pq|{s}|{b}") + time.perf_counter() - t
                save(seed)
                say(f"  {pname(s)} x w{b}: P->Q ppl {r_pq['ppl']:.3f} KL {r_pq['kl']:.4f} | Q->P ppl "
                    f"{r_qp['ppl']:.3f} KL {r_qp['kl']:.4f}")
            del qm
        pcurve[seed] = {b: c["pcurve"][str(b)] for b in curve_bits}
        for s in sparsities:
            single[s, seed], p_single[s, seed] = c["single"][s], c["p_single"][s]
            for b in bits:
                res[s, b, seed] = tuple(c["res"][f"{s}|{b}"])
        for b in bits:
            q_single[b, seed], q_plan[b, seed] = c["q_single"][str(b)], c["q_plan"][str(b)]
        seconds[seed] = seed_time(c, needed, grid_name(sparsities, bits))
        done.append(seed)
        if seed in todo:
            report(done)            # after every computed seed: a run cut short still leaves its completed seeds
    if seeds[-1] not in todo:               # only cached seeds since the last report: render once
        report(done)


if __name__ == "__main__":
    main()
