"""Per-component sparsity budgets on SmolLM2-135M-Instruct: uniform vs capability-guided (SAE capability
density, "Capability-Guided Compression", arXiv 2603.16440) vs sensitivity (per-layer KL under a probe
pruning) vs OWL (outlier-weighted layer sparsity, arXiv 2310.05175), all at the same total sparsity.

Every allocator's {linear: sparsity} map is applied by Wanda (unstructured, per output row) through a
Prune subclass defined here (the shipped stage takes one sparsity); the achieved parameter-weighted
sparsity is measured. Reported: held-out perplexity and KL to the uncompressed model per allocator, the
planning time, and the Spearman correlation of capability density with Wanda importance over attention
heads (the paper: rho = -0.054 over GPT-2 Medium's 384 heads), globally and within layers.

    .venv/bin/python benchmarks/budgets.py                    # defaults below, writes BENCHMARKS.md
    .venv/bin/python benchmarks/budgets.py --no-write --methods uniform,owl --windows 2"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import modelpress  # noqa: E402
from benchmarks._md import table, write_section  # noqa: E402
from benchmarks.order import Scorer  # noqa: E402
from modelpress.api import windows_for  # noqa: E402
from modelpress.calib import CalibrationSet  # noqa: E402
from modelpress.plan.budget import plan_budget  # noqa: E402
from modelpress.cli.plan import plot_plan  # noqa: E402
from modelpress.plan.sae import SAEConfig  # noqa: E402
from modelpress.stages.prune import Prune  # noqa: E402
from modelpress.targets import Target  # noqa: E402

T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


@dataclasses.dataclass(frozen=True)
class BudgetPrune(Prune):
    """Prune with a per-linear sparsity map ((name, sparsity), ...); linears not in it use `sparsity`."""
    per_layer: tuple = ()

    def prune_one(self, name, lin, stat):
        s = dict(self.per_layer).get(name)
        cfg = self if s is None else dataclasses.replace(self, sparsity=s, per_layer=())
        return Prune.prune_one(cfg, name, lin, stat)


def achieved_sparsity(model) -> float:
    lin = Target().select(model)
    return sum(float((m.weight == 0).sum()) for m in lin.values()) / sum(m.weight.numel() for m in lin.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--methods", default="uniform,capability,sensitivity,owl")
    ap.add_argument("--spread", type=float, default=0.08, help="budget spread (OWL lambda; z-score scale)")
    ap.add_argument("--samples", type=int, default=16, help="calibration samples (Wanda, OWL)")
    ap.add_argument("--seqlen", type=int, default=128, help="calibration tokens per sample")
    ap.add_argument("--sae-samples", type=int, default=8, help="calibration samples the SAEs see")
    ap.add_argument("--sae-steps", type=int, default=150)
    ap.add_argument("--sae-features", type=int, default=256, help="cap on SAE dictionary size")
    ap.add_argument("--probe-windows", type=int, default=2, help="sequences scored by the sensitivity probe")
    ap.add_argument("--windows", type=int, default=8, help="evaluation windows")
    ap.add_argument("--eval-seqlen", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plot", default=None, help="also write the capability plan's PNG here")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    methods = a.methods.split(",")

    model, tok = modelpress.load("smollm2")
    calib = modelpress.calibration_set(tok, "wiki", samples=a.samples, seqlen=a.seqlen, seed=0)
    sae_calib = CalibrationSet(calib.input_ids[:a.sae_samples], calib.attention_mask[:a.sae_samples], calib.provenance)
    windows = windows_for(tok, "wiki-eval", a.eval_seqlen, a.windows)
    score = Scorer(model, windows)
    base = score(model)
    say(f"original: ppl {base['ppl']:.3f}")
    sae_cfg = SAEConfig(steps=a.sae_steps, max_features=a.sae_features)

    rows, plans = [], {}
    for meth in methods:
        t = time.perf_counter()
        c = sae_calib if meth == "capability" else calib
        plan = plan_budget(model, c, meth, a.sparsity, "sparsity", spread=a.spread, windows=a.probe_windows,
                           sae_config=sae_cfg)
        t_plan = time.perf_counter() - t
        plans[meth] = plan
        mm = plan.module_map()
        m = copy.deepcopy(model)
        BudgetPrune(method="wanda", sparsity=a.sparsity, per_layer=tuple(mm.items())).apply(m, calib)
        r = score(m)
        sp = achieved_sparsity(m)
        del m
        say(f"{meth}: plan {t_plan:.0f} s, sparsity {sp:.4f} (layers {min(mm.values()):.3f}..{max(mm.values()):.3f}), "
            f"ppl {r['ppl']:.3f}, KL {r['kl']:.4f}")
        rows.append([meth, round(sp, 4), f"{min(mm.values()):.3f}..{max(mm.values()):.3f}", round(r["ppl"], 3),
                     round(r["kl"], 4), round(t_plan, 1)])
    ref_ppl = next((r[3] for r in rows if r[0] == "uniform"), None)
    if ref_ppl:
        for r in rows:
            r.insert(4, f"{100 * (r[3] / ref_ppl - 1):+.1f}%")
    header = ["allocator", "achieved sparsity", "per-linear range", "ppl"] + (["vs uniform"] if ref_ppl else []) + \
             ["KL", "plan time (s)"]
    tbl = table(header, rows)

    corr = ""
    if "capability" in plans:
        comps = plans["capability"].components
        heads = [c for c in comps if c.name != "mlp"]
        mlps = [c for c in comps if c.name == "mlp"]
        rho = spearmanr([c.metrics["density"] for c in heads], [c.metrics["wanda"] for c in heads]).statistic
        per_layer = []
        for layer in sorted({c.layer for c in heads}):
            hs = [c for c in heads if c.layer == layer]
            per_layer.append(spearmanr([c.metrics["density"] for c in hs], [c.metrics["wanda"] for c in hs]).statistic)
        rho_mlp = spearmanr([c.metrics["density"] for c in mlps], [c.metrics["wanda"] for c in mlps]).statistic
        sub = {k: spearmanr([c.metrics[k] for c in heads], [c.metrics["wanda"] for c in heads]).statistic
               for k in ("breadth", "entropy", "consistency")}
        fve = statistics.fmean(c.metrics["fve"] for c in comps)
        corr = (f"Spearman correlation of capability density with Wanda importance: {rho:+.3f} over {len(heads)} "
                f"attention heads (paper, GPT-2 Medium: -0.054 over 384 heads); mean within-layer rho "
                f"{statistics.fmean(per_layer):+.3f} ({len(per_layer)} layers of {len(hs)} heads); {rho_mlp:+.3f} over "
                f"{len(mlps)} MLPs. Per metric over heads: breadth {sub['breadth']:+.3f}, entropy {sub['entropy']:+.3f}, "
                f"consistency {sub['consistency']:+.3f}. SAE fraction of variance explained, mean over components: "
                f"{fve:.3f}.")
        if a.plot:
            plot_plan(plans["capability"], a.plot, "SmolLM2 Wanda")
    print(tbl, "\n\n", corr, sep="")
    body = (f"SmolLM2-135M-Instruct, Wanda unstructured at {a.sparsity:.0%} total sparsity of the decoder linears, "
            f"{a.samples} x {a.seqlen}-token calibration samples (SAEs: the first {a.sae_samples}, {a.sae_steps} Adam "
            f"steps, at most {a.sae_features} features), {windows.shape[0]} x {a.eval_seqlen}-token held-out "
            f"Wikipedia windows; original perplexity {base['ppl']:.3f}. Spread {a.spread} (capability and sensitivity: "
            "sparsity = mean - spread x z-score; OWL: lambda). Capability keeps each decoder layer's mean (attention "
            "block vs MLP, each standardized within its type across layers); sensitivity (magnitude probe at the "
            f"mean sparsity, KL on {a.probe_windows} sequences) and OWL (M = 5) move budget between layers.\n\n"
            + tbl + "\n\n" + corr + f"\n\nTotal time {time.perf_counter() - T0:.0f} s ({a.threads} thread).")
    if not a.no_write:
        write_section("Per-component budgets (plan budget)", "python benchmarks/budgets.py " + " ".join(sys.argv[1:]), body)


if __name__ == "__main__":
    main()
