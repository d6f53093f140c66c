"""Per-component sparsity budgets on SmolLM2-135M-Instruct: uniform vs capability-guided (SAE capability
density, "Capability-Guided Compression", arXiv 2603.16440) vs sensitivity (per-layer KL under a probe
pruning) vs OWL (outlier-weighted layer sparsity, arXiv 2310.05175), all at the same total sparsity,
over several calibration seeds.

Every allocator's plan is applied by the shipped prune stage (Wanda, unstructured): capability budgets
per attention head reach the head's own q/k/v rows and o_proj columns (block masks), the others give one
sparsity per linear. Per seed the calibration sample is drawn with that seed (the SAEs, probes and Wanda
all see it); evaluation uses fixed held-out Wikipedia windows (never calibrated on). Reported per
allocator: perplexity, top-1 agreement and KL to the uncompressed model, mean +- sd over seeds, and the
paired difference to uniform (mean +- sd; a verdict only where |mean| > 2 sd). Also the Spearman
correlation of capability density with Wanda importance over attention heads per seed (the paper:
rho = -0.054 over GPT-2 Medium's 384 heads) and the SAEs' reconstruction error.

    .venv/bin/python benchmarks/budgets.py                    # defaults below, writes BENCHMARKS.md
    .venv/bin/python benchmarks/budgets.py --no-write --methods uniform,owl --seeds 0 --windows 2"""
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
from modelpress.plan.budget import plan_budget  # noqa: E402
from modelpress.plan.sae import SAEConfig  # noqa: E402
from modelpress.stages.prune import Prune  # noqa: E402
from modelpress.targets import Target  # noqa: E402

T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


@dataclasses.dataclass(frozen=True)
class PlannedPrune(Prune):
    """The prune stage with a plan measured beforehand (so its scores can be reported without a second
    SAE training); the stage applies it exactly as it applies its own."""
    plan: object = dataclasses.field(default=None, compare=False, hash=False, repr=False)

    def budget_specs(self, model, calib):
        return self.plan.module_specs(), self.plan.removed_heads()


def achieved_sparsity(model) -> float:
    lin = Target().select(model)
    return sum(float((m.weight == 0).sum()) for m in lin.values()) / sum(m.weight.numel() for m in lin.values())


def ms(xs: list[float], digits: int = 3) -> str:
    """mean +- sd (sd over seeds; n = 1: the value)."""
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.fmean(xs):.{digits}f} +- {statistics.stdev(xs):.{digits}f}"


def verdict(diffs: list[float], better_if_negative: bool = True) -> str:
    if len(diffs) < 2:
        return "one seed: no verdict"
    m, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    if abs(m) <= 2 * sd:
        return "inside noise"
    return "better" if (m < 0) == better_if_negative else "worse"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 (default) or an HF folder (smoke tests)")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--methods", default="uniform,capability,sensitivity,owl")
    ap.add_argument("--seeds", default="0,1,2", help="calibration seeds")
    ap.add_argument("--spread", type=float, default=0.08, help="budget spread (OWL lambda; z-score scale)")
    ap.add_argument("--samples", type=int, default=16, help="calibration samples")
    ap.add_argument("--seqlen", type=int, default=256, help="calibration tokens per sample")
    ap.add_argument("--sae-steps", type=int, default=150)
    ap.add_argument("--sae-expansion", type=float, default=4.0)
    ap.add_argument("--probe-windows", type=int, default=4, help="sequences scored by the sensitivity probe")
    ap.add_argument("--windows", type=int, default=16, help="evaluation windows")
    ap.add_argument("--eval-seqlen", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    methods = a.methods.split(",")
    seeds = [int(s) for s in a.seeds.split(",")]

    model, tok = modelpress.load(a.model)
    windows = windows_for(tok, "wiki-eval", a.eval_seqlen, a.windows)
    score = Scorer(model, windows)
    base = score(model)
    say(f"original: ppl {base['ppl']:.3f}")
    sae_cfg = SAEConfig(steps=a.sae_steps, expansion=a.sae_expansion)

    res: dict[str, dict[str, list[float]]] = {m: {"ppl": [], "top1": [], "kl": [], "sp": [], "t": [], "lo": [],
                                                  "hi": []} for m in methods}
    rho: dict[str, list[float]] = {"heads": [], "within": [], "mlp": [], "p": []}
    sae_err: dict[str, list[float]] = {"head": [], "mlp": []}
    info: dict = {}
    done: list[int] = []
    def report(done: list[int]) -> None:
        """Table, claims and (unless --no-write) the BENCHMARKS.md section over the seeds done so far."""
        n_heads, n_mlp, f_head, f_mlp = info.get("shape", (0, 0, 0, 0))
        rows = []
        for meth in methods:
            d = res[meth]
            row = [meth, ms(d["sp"], 4), f"{min(d['lo']):.3f}..{max(d['hi']):.3f}", ms(d["ppl"]), ms(d["top1"], 4),
                   ms(d["kl"], 4)]
            if "uniform" in res and meth != "uniform":
                dp = [x - y for x, y in zip(d["ppl"], res["uniform"]["ppl"])]
                dt = [x - y for x, y in zip(d["top1"], res["uniform"]["top1"])]
                row += [f"{ms(dp)} ({verdict(dp)})", f"{ms(dt, 4)} ({verdict(dt, better_if_negative=False)})"]
            else:
                row += ["--", "--"]
            row.append(ms(d["t"], 0))
            rows.append(row)
        header = ["allocator", "achieved sparsity", "block range", "ppl", "top-1 agreement", "KL",
                  "ppl - uniform (paired)", "top-1 - uniform (paired)", "plan time (s)"]
        tbl = table(header, rows)

        claims = ""
        if "capability" in res:
            n = len(done)
            indep = all(p > 0.05 for p in rho["p"])
            claims = (f"Paper's claims side by side (ours: {n} seed(s), SmolLM2-135M; paper: GPT-2 Medium).\n\n"
                      f"- rho(capability density, Wanda importance) over attention heads: {ms(rho['heads'])} over "
                      f"{n_heads} heads (p per seed: {', '.join(f'{p:.3f}' for p in rho['p'])}); paper -0.054 over 384 "
                      "heads, \"statistically independent\". Verdict: "
                      + ("reproduced (no seed rejects independence at p < 0.05)" if indep else
                         "not reproduced (density and Wanda importance correlate at p < 0.05 in "
                         f"{sum(p <= 0.05 for p in rho['p'])} of {n} seeds)")
                      + f". Mean within-layer rho {ms(rho['within'])}; over {n_mlp} MLPs {ms(rho['mlp'])}.\n")
            if "uniform" in res:
                dp = [x - y for x, y in zip(res["capability"]["ppl"], res["uniform"]["ppl"])]
                v = verdict(dp)
                claims += ("- Perplexity (the paper reports a negative result: CGC did not beat its baselines on PPL): "
                           f"capability - uniform = {ms(dp)} ppl. Verdict: "
                           + {"inside noise": "reproduced (no gain beyond the seed noise)",
                              "worse": "reproduced (capability is worse than uniform beyond the noise)",
                              "better": "not reproduced (capability beats uniform beyond the noise)",
                              "one seed: no verdict": "no verdict (one seed)"}[v] + ".\n")
            claims += (f"- SAEs: overcomplete {a.sae_expansion:g}x ({f_head} features per head, {f_mlp} per MLP "
                       f"output), L1, seed 0, {a.sae_steps} Adam steps; normalised reconstruction error (1 - FVE) "
                       f"heads {ms(sae_err['head'])}, MLPs {ms(sae_err['mlp'])}.")
        print(tbl, "\n\n", claims, sep="")
        body = (f"SmolLM2-135M-Instruct, Wanda unstructured at {a.sparsity:.0%} total sparsity of the decoder linears; "
                f"seeds {', '.join(map(str, done))}"
                + ("" if len(done) == len(seeds) else f" (completed {len(done)} of the {len(seeds)} planned: "
                   f"{', '.join(map(str, seeds))}; the run was cut short)")
                + f" (each draws its own {a.samples} x {a.seqlen}-token Wikipedia "
                f"calibration sample, used by the SAEs, the probes and Wanda); {windows.shape[0]} x {a.eval_seqlen}-token "
                f"held-out Wikipedia windows; original perplexity {base['ppl']:.3f}. Spread {a.spread} (capability and "
                "sensitivity: sparsity = mean - spread x z-score; OWL: lambda). Capability: per attention head (applied "
                "to the head's q rows, its KV group's k/v rows, its o_proj columns) and per MLP, each decoder layer's "
                f"mean kept; sensitivity (magnitude probe at the mean sparsity, KL on {a.probe_windows} calibration "
                "sequences) and OWL (M = 5) move budget between layers. Block range: lowest..highest sparsity of any "
                "head block or linear. Paired differences: per seed, allocator minus uniform; verdict only where "
                "|mean| > 2 sd. Reduced scope: one model, 50 % Wanda only (no 60 %, SparseGPT, mixed 3/4-bit or "
                "second LM), small calibration and evaluation sets (2-core CPU shared by the team).\n\n"
                + tbl + "\n\n" + claims + f"\n\nTotal time {time.perf_counter() - T0:.0f} s ({a.threads} thread).")
        if not a.no_write:
            write_section("Per-component budgets (plan budget)", "python benchmarks/budgets.py " + " ".join(sys.argv[1:]), body)

    for seed in seeds:
        calib = modelpress.calibration_set(tok, "wiki", samples=a.samples, seqlen=a.seqlen, seed=seed)
        for meth in methods:
            t = time.perf_counter()
            plan = plan_budget(model, calib, meth, a.sparsity, "sparsity", spread=a.spread, windows=a.probe_windows,
                               sae_config=sae_cfg)
            t_plan = time.perf_counter() - t
            specs = plan.module_specs()
            lo = min(float(s.min()) for s in specs.values())
            hi = max(float(s.max()) for s in specs.values())
            m = copy.deepcopy(model)
            PlannedPrune(method="wanda", sparsity=a.sparsity, budget=meth, budget_spread=a.spread, plan=plan).apply(m, calib)
            r = score(m)
            sp = achieved_sparsity(m)
            del m
            for k, v in (("ppl", r["ppl"]), ("top1", r["top1"]), ("kl", r["kl"]), ("sp", sp), ("t", t_plan),
                         ("lo", lo), ("hi", hi)):
                res[meth][k].append(v)
            say(f"seed {seed} {meth}: plan {t_plan:.0f} s, sparsity {sp:.4f} (blocks {lo:.3f}..{hi:.3f}), "
                f"ppl {r['ppl']:.3f}, top-1 {r['top1']:.4f}, KL {r['kl']:.4f}")
            if meth == "capability":
                heads = [c for c in plan.components if c.name != "mlp"]
                mlps = [c for c in plan.components if c.name == "mlp"]
                st = spearmanr([c.metrics["density"] for c in heads], [c.metrics["wanda"] for c in heads])
                rho["heads"].append(st.statistic)
                rho["p"].append(st.pvalue)
                per_layer = [spearmanr([c.metrics["density"] for c in heads if c.layer == l],
                                       [c.metrics["wanda"] for c in heads if c.layer == l]).statistic
                             for l in sorted({c.layer for c in heads})]
                rho["within"].append(statistics.fmean(per_layer))
                rho["mlp"].append(spearmanr([c.metrics["density"] for c in mlps], [c.metrics["wanda"] for c in mlps]).statistic)
                sae_err["head"].append(statistics.fmean(c.metrics["nmse"] for c in heads))
                sae_err["mlp"].append(statistics.fmean(c.metrics["nmse"] for c in mlps))
                info["shape"] = (len(heads), len(mlps), int(heads[0].metrics["features"]),
                                 int(mlps[0].metrics["features"]))
                say(f"seed {seed}: rho(density, wanda) heads {st.statistic:+.3f} (p {st.pvalue:.3f}), SAE nmse heads "
                    f"{sae_err['head'][-1]:.3f} mlp {sae_err['mlp'][-1]:.3f}")
        done.append(seed)
        report(done)                # after every seed: a run cut short still leaves its completed seeds


if __name__ == "__main__":
    main()
