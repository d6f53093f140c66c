"""Compression order on SmolLM2-135M-Instruct: prune-then-quantize vs quantize-then-prune (Progressive
Intensity Hypothesis, "Prune-then-Quantize or Quantize-then-Prune?", arXiv 2603.18426).

For Wanda {30, 50}% unstructured x RTN {w3, w4, w8} group 64 asymmetric (never 4-bit group 32, SmolLM2's
native grid), both orders are run and scored on held-out Wikipedia windows (perplexity, KL to the
uncompressed model). Each stage's intensity alone is its compression-equivalent bits: its KL mapped onto
the RTN bits -> KL curve (8/6/4/3/2 bits, g64 asym) measured in the same run, by interpolation in
log(KL) (modelpress.plan.order.equivalent_bits). Reported: the order advantage of weaker-first over
stronger-first against the intensity gap, and how often weaker-first wins.

    .venv/bin/python benchmarks/order.py                 # defaults below, writes BENCHMARKS.md
    .venv/bin/python benchmarks/order.py --no-write --sparsities 0.5 --bits 4

Quantization is RTN (GPTQ's CPU solve would multiply the run time); the joint semantics are the stages'
own: prune-then-quantize takes scales from the surviving weights, quantize-then-prune masks the
dequantized weights (Wanda statistics taken on the quantized model)."""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import modelpress  # noqa: E402
from benchmarks._md import table, write_section  # noqa: E402
from modelpress.api import windows_for  # noqa: E402
from modelpress.plan.order import equivalent_bits  # noqa: E402
from modelpress.stages.prune import Prune  # noqa: E402
from modelpress.stages.quantize import Quantize  # noqa: E402

T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


class Scorer:
    """Perplexity and mean KL(original || model) on fixed windows; the original's log-probs cached."""

    def __init__(self, model, windows: torch.Tensor, batch_size: int = 2):
        self.windows, self.bs = windows, batch_size
        self.ref = self._logprobs(model)

    @torch.no_grad()
    def _logprobs(self, model) -> list[torch.Tensor]:
        return [torch.log_softmax(model(input_ids=self.windows[b:b + self.bs], use_cache=False).logits[:, :-1].float(), -1)
                for b in range(0, self.windows.shape[0], self.bs)]

    @torch.no_grad()
    def __call__(self, model) -> dict:
        nll = kl = 0.0
        n = top1 = 0
        kl_w = []                                                       # mean KL of each window
        for k, b in enumerate(range(0, self.windows.shape[0], self.bs)):
            ids = self.windows[b:b + self.bs]
            lp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[:, :-1].float(), -1)
            r = self.ref[k]
            nll += float(-lp.gather(-1, ids[:, 1:, None]).double().sum())
            klt = (r.exp() * (r - lp)).sum(-1).clamp(min=0).double()    # (batch, positions)
            kl += float(klt.sum())
            kl_w += klt.mean(1).tolist()
            top1 += int((lp.argmax(-1) == r.argmax(-1)).sum())
            n += ids[:, 1:].numel()
        return {"ppl": math.exp(nll / n), "kl": kl / n, "top1": top1 / n, "kl_windows": kl_w}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sparsities", default="0.3,0.5")
    ap.add_argument("--bits", default="8,4,3")
    ap.add_argument("--curve-bits", default="8,6,4,3,2")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--samples", type=int, default=16, help="calibration samples (Wanda)")
    ap.add_argument("--seqlen", type=int, default=128, help="calibration tokens per sample")
    ap.add_argument("--windows", type=int, default=8, help="evaluation windows")
    ap.add_argument("--eval-seqlen", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    sparsities = [float(x) for x in a.sparsities.split(",")]
    bits = [int(x) for x in a.bits.split(",")]
    curve_bits = sorted({int(x) for x in a.curve_bits.split(",")} | set(bits), reverse=True)
    if a.group_size == 32 and 4 in curve_bits:
        raise SystemExit("4-bit group 32 is SmolLM2's native grid: use another group size")

    model, tok = modelpress.load("smollm2")
    calib = modelpress.calibration_set(tok, "wiki", samples=a.samples, seqlen=a.seqlen, seed=0)
    windows = windows_for(tok, "wiki-eval", a.eval_seqlen, a.windows)
    score = Scorer(model, windows)
    base = score(model)
    say(f"original: ppl {base['ppl']:.3f}")

    def quant(b):
        return Quantize(method="rtn", bits=b, group_size=a.group_size, sym=False)

    def prune(s):
        return Prune(method="wanda", sparsity=s)

    curve = {}
    for b in curve_bits:
        m = copy.deepcopy(model)
        quant(b).apply(m)
        curve[b] = score(m)
        say(f"RTN w{b} g{a.group_size} asym: ppl {curve[b]['ppl']:.3f} KL {curve[b]['kl']:.4f}")
        del m
    cb, ck = list(curve), [curve[b]["kl"] for b in curve]

    pruned, single = {}, {}
    for s in sparsities:
        m = copy.deepcopy(model)
        prune(s).apply(m, calib)
        pruned[s], single[s] = m, score(m)
        say(f"Wanda {s:.0%}: ppl {single[s]['ppl']:.3f} KL {single[s]['kl']:.4f} "
            f"-> {equivalent_bits(cb, ck, single[s]['kl']):.2f} eq. bits")

    rows, wins, gaps, advs = [], 0, [], []
    for s in sparsities:
        for b in bits:
            pq = copy.deepcopy(pruned[s])
            quant(b).apply(pq)
            r_pq = score(pq)
            del pq
            qp = copy.deepcopy(model)
            quant(b).apply(qp)
            prune(s).apply(qp, calib)
            r_qp = score(qp)
            del qp
            eb_p, eb_q = equivalent_bits(cb, ck, single[s]["kl"]), equivalent_bits(cb, ck, curve[b]["kl"])
            prune_weaker = eb_p > eb_q                      # more equivalent bits = weaker perturbation
            wf, sf = (r_pq, r_qp) if prune_weaker else (r_qp, r_pq)
            adv_kl, adv_ppl = sf["kl"] - wf["kl"], sf["ppl"] - wf["ppl"]
            win = adv_kl > 0
            wins += win
            gap = abs(eb_p - eb_q)
            gaps.append(gap)
            advs.append(adv_kl / max(wf["kl"], 1e-12))
            say(f"Wanda {s:.0%} x w{b}: P->Q ppl {r_pq['ppl']:.3f} KL {r_pq['kl']:.4f} | Q->P ppl {r_qp['ppl']:.3f} "
                f"KL {r_qp['kl']:.4f} | weaker: {'prune' if prune_weaker else 'quant'}, gap {gap:.2f} bits, "
                f"weaker-first {'wins' if win else 'loses'}")
            rows.append([f"Wanda {s:.0%}", f"w{b} g{a.group_size}", round(eb_p, 2), round(eb_q, 2),
                         "P->Q" if prune_weaker else "Q->P", round(gap, 2),
                         round(r_pq["ppl"], 3), round(r_qp["ppl"], 3), round(r_pq["kl"], 4), round(r_qp["kl"], 4),
                         round(adv_ppl, 3), f"{100 * adv_kl / max(wf['kl'], 1e-12):+.1f}%",
                         "yes" if win else "no"])
    rho = spearmanr(gaps, advs).statistic if len(gaps) > 2 else float("nan")
    header = ["prune", "quant", "eq. bits P", "eq. bits Q", "weaker first", "gap (bits)", "ppl P->Q", "ppl Q->P",
              "KL P->Q", "KL Q->P", "ppl advantage", "KL advantage", "weaker-first wins"]
    tbl = table(header, rows)
    curve_tbl = table(["RTN g%d asym" % a.group_size, "ppl", "KL"],
                      [[f"w{b}", round(curve[b]["ppl"], 3), round(curve[b]["kl"], 4)] for b in curve] +
                      [[f"Wanda {s:.0%} alone", round(single[s]["ppl"], 3), round(single[s]["kl"], 4)] for s in sparsities])
    summary = (f"Weaker-first wins {wins} of {len(rows)} pairs (by KL). Spearman correlation of the intensity gap "
               f"with the relative KL advantage of weaker-first: {rho:.2f} (n = {len(rows)}). "
               f"Original perplexity {base['ppl']:.3f}.")
    print(curve_tbl, "\n\n", tbl, "\n\n", summary, sep="")
    body = (f"SmolLM2-135M-Instruct, Wanda (unstructured) x RTN (asymmetric), {a.samples} x {a.seqlen}-token "
            f"calibration samples, {windows.shape[0]} x {a.eval_seqlen}-token held-out Wikipedia windows. "
            "Intensity of a stage alone = compression-equivalent bits: its KL to the original mapped onto the "
            "RTN bits -> KL curve below (interpolated in log KL); fewer equivalent bits = stronger. Advantage = "
            "stronger-first minus weaker-first (positive: the Progressive Intensity Hypothesis holds); the "
            "KL advantage is relative to the weaker-first KL.\n\n" + curve_tbl + "\n\n" + tbl + "\n\n" + summary +
            f"\n\nTotal time {time.perf_counter() - T0:.0f} s ({a.threads} thread).")
    if not a.no_write:
        write_section("Compression order (plan order)", "python benchmarks/order.py " + " ".join(sys.argv[1:]), body)


if __name__ == "__main__":
    main()
