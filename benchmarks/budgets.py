"""Per-component budgets on SmolLM2-135M-Instruct: uniform vs capability-guided (SAE capability density,
"Capability-Guided Compression", arXiv 2603.16440) vs sensitivity (per-layer KL under a probe
compression) vs OWL (outlier-weighted layer sparsity, arXiv 2310.05175), each at the same total budget,
over several calibration seeds, in several settings: Wanda and SparseGPT at 50 % and 60 % sparsity,
and GPTQ at a mixed 3/4-bit mean of 3.5 bits.

Every allocator's plan is applied by the shipped stages: capability budgets per attention head reach the
head's own q/k/v rows and o_proj columns (prune: block masks; quantize: per-head widths inside one
QuantLinear), the others give one budget per linear. Capability densities and OWL ratios are measured
once per seed and allocated again for each setting (modelpress.plan.replan: they do not depend on the
mean); sensitivity probes at each setting's own mean and kind, so it is measured per setting. Mixed
bits: widths bounded to [3, 4]; "uniform" there gives every linear 3.5 bits (its first half of rows 4
bits, the second half 3), and uniform w3 / w4 are shown as brackets. Per seed the calibration sample is
drawn with that seed (the SAEs, probes and the stages all see it); evaluation uses fixed held-out
Wikipedia windows (never calibrated on). Reported per allocator: perplexity, top-1 agreement and KL to
the uncompressed model, mean +- sd over seeds, and the paired difference to uniform (mean +- sd; a
verdict only where |mean| > 2 sd); the paper's perplexity claim (CGC did not beat its baselines) is tested
against the best other allocator of each setting (lowest mean perplexity), paired. Also the Spearman correlation of capability density with Wanda
importance over attention heads per seed (the paper: rho = -0.054 over GPT-2 Medium's 384 heads) and the
SAEs' reconstruction error.

Each finished seed, and within a seed each finished (setting, allocator) row, is cached (--cache, keyed by every setting
but the seeds), so a run cut short resumes, and seeds can run in separate processes; a run whose seeds
are all cached only renders the section. A model other than SmolLM2 writes its own section (": <model>").

    .venv/bin/python benchmarks/budgets.py                    # defaults below, writes BENCHMARKS.md
    .venv/bin/python benchmarks/budgets.py --no-write --methods uniform,owl --seeds 0 --windows 2"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import modelpress  # noqa: E402
from benchmarks._md import model_label, ms, run_cache, table, write_section  # noqa: E402
from benchmarks.order import Scorer  # noqa: E402
from modelpress.api import windows_for  # noqa: E402
from modelpress.io import atomic_write_text  # noqa: E402
from modelpress.plan.budget import plan_bit_specs, plan_budget, replan  # noqa: E402
from modelpress.plan.sae import SAEConfig  # noqa: E402
from modelpress.stages.prune import Prune  # noqa: E402
from modelpress.stages.quantize import Quantize  # noqa: E402
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


@dataclasses.dataclass(frozen=True)
class PlannedQuantize(Quantize):
    """The quantize stage with whole-bit widths planned beforehand ({linear: (R, G) widths})."""
    specs: object = dataclasses.field(default=None, compare=False, hash=False, repr=False)

    def budget_specs(self, model, calib):
        return self.specs


def achieved_sparsity(model) -> float:
    lin = Target().select(model)
    return sum(float((m.weight == 0).sum()) for m in lin.values()) / sum(m.weight.numel() for m in lin.values())


def verdict(diffs: list[float], better_if_negative: bool = True) -> str:
    if len(diffs) < 2:
        return "one seed: no verdict"
    m, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    if abs(m) <= 2 * sd:
        return "inside noise"
    return "better" if (m < 0) == better_if_negative else "worse"


SETTING_HELP = "comma list of pruner:sparsity (wanda, sparsegpt) and gptq:mean-bits"


def parse_settings(text: str) -> list[tuple[str, float]]:
    out = []
    for item in text.split(","):
        name, _, val = item.partition(":")
        if name not in ("wanda", "sparsegpt", "gptq") or not val:
            raise SystemExit(f"--settings item {item!r}: use {SETTING_HELP}")
        out.append((name, float(val)))
    return out


def label(setting: tuple[str, float]) -> str:
    name, v = setting
    return f"GPTQ {v:g}-bit mean" if name == "gptq" else f"{'Wanda' if name == 'wanda' else 'SparseGPT'} {v:.0%}"


def run_seed(a, model, tok, score, seed: int, methods: list[str], settings: list[tuple[str, float]],
             partial: Path) -> dict:
    """Every (setting, allocator) on one calibration seed: {"rows": {setting: {allocator: metrics}}, ...}.
    Each finished (setting, allocator) row is saved to `partial` and skipped when the seed is run again (a
    measurement that later rows reuse is then taken again: the plans are deterministic, so the rows are the
    same); `seconds` sums the time of the rows and brackets that were saved."""
    calib = modelpress.calibration_set(tok, "wiki", samples=a.samples, seqlen=a.seqlen, seed=seed)
    sae_cfg = SAEConfig(steps=a.sae_steps, expansion=a.sae_expansion)
    measured: dict[str, tuple[object, float]] = {}          # allocator -> (plan, seconds to measure its scores)
    out: dict = (json.loads(partial.read_text()) if partial.is_file() else
                 {"rows": {}, "refs": {}, "done": [], "seconds": 0.0})
    for setting in settings:
        if label(setting) in out["done"]:
            say(f"seed {seed} {label(setting)}: cached")
            continue
        name, mean = setting
        kind = "bits" if name == "gptq" else "sparsity"
        bound = {"lo": a.bit_lo, "hi": a.bit_hi} if kind == "bits" else {}
        spread = a.bit_spread if kind == "bits" else a.spread
        rows = out["rows"].setdefault(label(setting), {})
        for meth in methods:
            if meth in rows:
                say(f"seed {seed} {label(setting)} {meth}: cached")
                continue
            t = time.perf_counter()
            if meth in measured and meth != "sensitivity":
                plan = replan(measured[meth][0], mean, kind, spread, **bound)
            else:
                plan = plan_budget(model, calib, meth, mean, kind, spread=spread, windows=a.probe_windows,
                                   sae_config=sae_cfg, **bound)
                measured[meth] = (plan, time.perf_counter() - t)
            m = copy.deepcopy(model)
            if kind == "sparsity":
                specs = plan.module_specs()
                PlannedPrune(method=name, sparsity=mean, budget=meth, budget_spread=spread, plan=plan).apply(m, calib)
            else:
                specs = (plan_bit_specs(model, plan, a.group_size)[0] if meth != "uniform" else
                         {n: torch.tensor([[int(a.bit_hi)], [int(a.bit_lo)]]) for n in plan.module_params})
                PlannedQuantize(method="gptq", bits=mean, group_size=a.group_size, sym=False, budget="owl",
                                specs=specs).apply(m, calib)
            r = score(m)
            lo = min(float(s.min()) for s in specs.values())
            hi = max(float(s.max()) for s in specs.values())
            wts = {n: plan.module_params[n] for n in specs}
            achieved = (achieved_sparsity(m) if kind == "sparsity" else
                        sum(float(specs[n].double().mean()) * w for n, w in wts.items()) / sum(wts.values()))
            del m
            rows[meth] = {"ppl": r["ppl"], "top1": r["top1"], "kl": r["kl"], "achieved": achieved,
                          "t": measured[meth][1], "lo": lo, "hi": hi}
            say(f"seed {seed} {label(setting)} {meth}: achieved {achieved:.4f} (blocks {lo:.3f}..{hi:.3f}), ppl "
                f"{r['ppl']:.3f}, top-1 {r['top1']:.4f}, KL {r['kl']:.4f}")
            if meth == "capability" and "rho" not in out:
                heads = [c for c in plan.components if c.name != "mlp"]
                mlps = [c for c in plan.components if c.name == "mlp"]
                st = spearmanr([c.metrics["density"] for c in heads], [c.metrics["wanda"] for c in heads])
                within = [spearmanr([c.metrics["density"] for c in heads if c.layer == l],
                                    [c.metrics["wanda"] for c in heads if c.layer == l]).statistic
                          for l in sorted({c.layer for c in heads})]
                out["rho"] = {"heads": st.statistic, "p": st.pvalue, "within": statistics.fmean(within),
                              "mlp": spearmanr([c.metrics["density"] for c in mlps],
                                               [c.metrics["wanda"] for c in mlps]).statistic}
                out["sae"] = {"head": statistics.fmean(c.metrics["nmse"] for c in heads),
                              "mlp": statistics.fmean(c.metrics["nmse"] for c in mlps)}
                out["shape"] = [len(heads), len(mlps), int(heads[0].metrics["features"]),
                                int(mlps[0].metrics["features"])]
            out["seconds"] += time.perf_counter() - t
            atomic_write_text(partial, json.dumps(out))             # a cut run keeps its finished rows
        if kind == "bits":                                  # the uniform brackets: every linear at lo / hi bits
            t = time.perf_counter()
            for b in (int(a.bit_lo), int(a.bit_hi)):
                m = copy.deepcopy(model)
                Quantize(method="gptq", bits=b, group_size=a.group_size, sym=False).apply(m, calib)
                r = score(m)
                del m
                out["refs"][f"uniform w{b}"] = {"ppl": r["ppl"], "top1": r["top1"], "kl": r["kl"]}
                say(f"seed {seed} GPTQ w{b} g{a.group_size}: ppl {r['ppl']:.3f}, top-1 {r['top1']:.4f}")
            out["seconds"] += time.perf_counter() - t
        out["done"].append(label(setting))
        atomic_write_text(partial, json.dumps(out))
    return out


def render(a, seeds: list[int], done: dict[int, dict], methods: list[str], settings, base: dict, n_windows: int) -> str:
    """The section body over the seeds done: one table per setting, the paper's claims, the SAEs."""
    ok = [s for s in seeds if s in done]
    parts = []
    for setting in settings:
        lab = label(setting)
        kind = "bits" if setting[0] == "gptq" else "sparsity"
        rows = []
        for meth in methods:
            d = {k: [done[s]["rows"][lab][meth][k] for s in ok] for k in ("ppl", "top1", "kl", "achieved", "t")}
            lo = min(done[s]["rows"][lab][meth]["lo"] for s in ok)
            hi = max(done[s]["rows"][lab][meth]["hi"] for s in ok)
            row = [meth, ms(d["achieved"], ".4f"), f"{lo:.3f}..{hi:.3f}", ms(d["ppl"]), ms(d["top1"], ".4f"),
                   ms(d["kl"], ".4f")]
            if "uniform" in methods and meth != "uniform":
                u = {k: [done[s]["rows"][lab]["uniform"][k] for s in ok] for k in ("ppl", "top1")}
                dp = [x - y for x, y in zip(d["ppl"], u["ppl"])]
                dt = [x - y for x, y in zip(d["top1"], u["top1"])]
                row += [f"{ms(dp)} ({verdict(dp)})", f"{ms(dt, '.4f')} ({verdict(dt, better_if_negative=False)})"]
            else:
                row += ["--", "--"]
            rows.append(row + [ms(d["t"], ".0f")])
        if kind == "bits":
            for ref in (f"uniform w{int(a.bit_lo)}", f"uniform w{int(a.bit_hi)}"):
                d = {k: [done[s]["refs"][ref][k] for s in ok] for k in ("ppl", "top1", "kl")}
                rows.append([ref + " (bracket)", ref[-1], "--", ms(d["ppl"]), ms(d["top1"], ".4f"), ms(d["kl"], ".4f"),
                             "--", "--", "--"])
        unit = "mean bits" if kind == "bits" else "achieved sparsity"
        parts.append(f"**{lab}**\n\n" + table(
            ["allocator", unit, "block range", "ppl", "top-1 agreement", "KL", "ppl - uniform (paired)",
             "top-1 - uniform (paired)", "score time (s)"], rows))
    claims = ""
    if "capability" in methods and ok:
        rho = {k: [done[s]["rho"][k] for s in ok] for k in ("heads", "p", "within", "mlp")}
        sae = {k: [done[s]["sae"][k] for s in ok] for k in ("head", "mlp")}
        n_heads, n_mlp, f_head, f_mlp = done[ok[0]]["shape"]
        indep = all(p > 0.05 for p in rho["p"])
        claims = (f"Paper's claims side by side (ours: {len(ok)} seed(s), {model_label(a.model)}; paper: GPT-2 Medium).\n\n"
                  f"- rho(capability density, Wanda importance) over attention heads: {ms(rho['heads'])} over {n_heads} "
                  f"heads (p per seed: {', '.join(f'{p:.3f}' for p in rho['p'])}); paper -0.054 over 384 heads, "
                  "\"statistically independent\". Verdict: "
                  + ("reproduced (no seed rejects independence at p < 0.05)" if indep else
                     "not reproduced (density and Wanda importance correlate at p < 0.05 in "
                     f"{sum(p <= 0.05 for p in rho['p'])} of {len(ok)} seeds)")
                  + f". Mean within-layer rho {ms(rho['within'])}; over {n_mlp} MLPs {ms(rho['mlp'])}.\n")
        others = [m for m in methods if m != "capability"]
        if others:
            per = []                  # per setting: the best other allocator (lowest mean ppl), capability minus it
            for setting in settings:
                lab = label(setting)
                row = {m: [done[s]["rows"][lab][m]["ppl"] for s in ok] for m in methods}
                best = min(others, key=lambda m: statistics.fmean(row[m]))
                dp = [c - b for c, b in zip(row["capability"], row[best])]
                per.append((lab, best, dp, verdict(dp)))
            better = [p for p in per if p[3] == "better"]
            worse = [p for p in per if p[3] == "worse"]
            claims += ("- Perplexity (the paper reports a negative result: CGC did not beat its baselines on PPL): "
                       "capability minus the best other allocator of each setting = "
                       + "; ".join(f"{lab} vs {best} {ms(dp)} ({v})" for lab, best, dp, v in per)
                       + ". Verdict: " + ("no verdict (one seed)" if len(ok) < 2 else
                                          f"not reproduced (capability beats the best baseline beyond the noise in "
                                          f"{len(better)} of {len(per)} settings)" if better else
                                          f"reproduced (capability never beats the best baseline beyond the noise; "
                                          f"worse in {len(worse)} of {len(per)} settings)") + ".\n")
        claims += (f"- SAEs: overcomplete {a.sae_expansion:g}x ({f_head} features per head, {f_mlp} per MLP output), "
                   f"L1, seed 0, {a.sae_steps} Adam steps; normalised reconstruction error (1 - FVE) heads "
                   f"{ms(sae['head'])}, MLPs {ms(sae['mlp'])}.")
    return (f"{model_label(a.model)}; seeds {', '.join(map(str, ok))}"
            + ("" if len(ok) == len(seeds) else f" (completed {len(ok)} of the {len(seeds)} planned: "
               f"{', '.join(map(str, seeds))}; the run was cut short)")
            + f" (each draws its own {a.samples} x {a.seqlen}-token Wikipedia calibration sample, used by the SAEs, "
            f"the probes and the stages); {n_windows} x {a.eval_seqlen}-token held-out Wikipedia windows; original "
            f"perplexity {base['ppl']:.3f}. Sparsity: spread {a.spread} (capability and sensitivity: budget = mean - "
            "spread x z-score; OWL: lambda), decoder linears. Mixed bits: GPTQ asymmetric group "
            f"{a.group_size}, widths in [{a.bit_lo:g}, {a.bit_hi:g}], spread {a.bit_spread:g} bits; uniform = every "
            "linear's first half of rows at the upper width and its second half at the lower. Capability: per "
            "attention head (applied to the head's q rows, its KV group's k/v rows, its o_proj columns) and per MLP, "
            "each decoder layer's mean kept; its SAE densities and OWL's outlier ratios are measured once per seed and "
            "allocated again per setting; sensitivity (magnitude probe at the mean sparsity, RTN at floor(mean width) - 1 "
            f"bits; KL on {a.probe_windows} calibration sequences) is measured per setting; OWL (M = 5) and "
            "sensitivity move budget between layers. Block range: lowest..highest budget of any head block or "
            "linear. Score time: seconds to measure the allocator's scores (once per seed for capability and OWL). "
            "Paired differences: per seed, allocator minus uniform; verdict only where |mean| > 2 sd. Reduced "
            "scope: one LM per section (each model writes its own), small calibration and evaluation sets (2-core "
            "CPU shared by the team).\n\n" + "\n\n".join(parts) + "\n\n" + claims)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 (default) or an HF folder (smoke tests)")
    ap.add_argument("--settings", default="wanda:0.5,wanda:0.6,sparsegpt:0.5,sparsegpt:0.6,gptq:3.5", help=SETTING_HELP)
    ap.add_argument("--methods", default="uniform,capability,sensitivity,owl")
    ap.add_argument("--seeds", default="0,1,2", help="calibration seeds")
    ap.add_argument("--spread", type=float, default=0.08, help="sparsity budget spread (OWL lambda; z-score scale)")
    ap.add_argument("--bit-spread", type=float, default=1.0, help="bit budget spread (z-score scale)")
    ap.add_argument("--bit-lo", type=float, default=3.0)
    ap.add_argument("--bit-hi", type=float, default=4.0)
    ap.add_argument("--group-size", type=int, default=64, help="GPTQ group (64 = SmolLM2's head dim: per-head o_proj widths)")
    ap.add_argument("--samples", type=int, default=16, help="calibration samples")
    ap.add_argument("--seqlen", type=int, default=256, help="calibration tokens per sample")
    ap.add_argument("--sae-steps", type=int, default=150)
    ap.add_argument("--sae-expansion", type=float, default=4.0)
    ap.add_argument("--probe-windows", type=int, default=4, help="sequences scored by the sensitivity probe")
    ap.add_argument("--windows", type=int, default=16, help="evaluation windows")
    ap.add_argument("--eval-seqlen", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default="/tmp/modelpress-budgets", help="folder of finished seeds (resume)")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    methods = a.methods.split(",")
    seeds = [int(s) for s in a.seeds.split(",")]
    settings = parse_settings(a.settings)
    cache = run_cache(a.cache, a, ("seeds", "threads", "cache", "no_write"))

    model, tok = modelpress.load(a.model)
    windows = windows_for(tok, "wiki-eval", a.eval_seqlen, a.windows)
    score = Scorer(model, windows)
    base = score.original()
    say(f"original: ppl {base['ppl']:.3f}; cache {cache}")
    done: dict[int, dict] = {}
    for seed in seeds:
        f = cache / f"seed{seed}.json"
        if f.is_file():
            done[seed] = json.loads(f.read_text())
            say(f"seed {seed}: cached")
        else:
            done[seed] = run_seed(a, model, tok, score, seed, methods, settings, cache / f"seed{seed}.partial.json")
            atomic_write_text(f, json.dumps(done[seed]))
        body = render(a, seeds, done, methods, settings, base, windows.shape[0])
        print(body)
        if not a.no_write:              # after every seed: a run cut short still leaves its completed seeds
            write_section("Per-component budgets (plan budget)" + ("" if a.model == "smollm2" else
                                                                  f": {model_label(a.model)}"), " ".join(["python benchmarks/budgets.py", *sys.argv[1:]]),
                          body + f"\n\nTotal time of this invocation {time.perf_counter() - T0:.0f} s ({a.threads} "
                          "thread); seeds read from the cache took their own runs' time"
                          + (" (" + ", ".join(f"seed {s}: {done[s]['seconds']:.0f} s" for s in done
                                              if "seconds" in done[s]) + ")" if any("seconds" in d for d in done.values())
                             else "") + ".")


if __name__ == "__main__":
    main()
