"""CLI plugin: `modelpress plan order RECIPE [--model M] [--repeats 3] [--measured]` (stage order by
compression-equivalent intensity, arXiv 2603.18426, with the intensity gap's sd over repeats and whether it
is inside that noise; or, with --measured, every order run end to end and the best kept) and
`modelpress plan budget RECIPE [--model M] [--plot out.png]` (per-component budgets of the recipe's
prune/quantize stage: capability density from SAEs, arXiv 2603.16440; sensitivity; OWL, arXiv 2310.05175),
printed as a table and optionally plotted (PNG)."""
from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    from ..plan.budget import BudgetPlan

# the keys of modelpress.plan.budget.ALLOCATORS, spelled out so `--help` imports no torch (a test checks they agree)
ALLOCATOR_NAMES = ("uniform", "capability", "sensitivity", "owl")


def add_parser(subparsers) -> tuple[str, ...]:
    p = subparsers.add_parser("plan", help="plan a recipe: stage order by intensity, per-component budgets")
    ps = p.add_subparsers(dest="plan_cmd", required=True)
    o = ps.add_parser("order", help="measure each stage alone (compression-equivalent ratio), print the "
                                    "weaker-first order")
    b = ps.add_parser("budget", help="per-head / per-MLP / per-layer budgets of the recipe's prune or "
                                     "quantize stage")
    for q in (o, b):
        q.add_argument("recipe", help="recipe YAML file or shipped recipe name")
        q.add_argument("--model", help='"smollm2" (default: the recipe\'s model), an HF folder or a hub id')
        q.add_argument("--samples", type=int, default=16, help="calibration samples (default 16)")
        q.add_argument("--seqlen", type=int, default=256, help="calibration tokens per sample (default 256)")
        q.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    o.add_argument("--windows", type=int, default=4, help="calibration sequences scored by the KL metric (per repeat)")
    o.add_argument("--measured", action="store_true", help="run the recipe in every order of its stages "
                   "(2-3 stages) and keep the lowest KL, instead of predicting it from each stage alone")
    o.add_argument("--repeats", type=int, default=3, help="re-measure the intensities on this many disjoint "
                   "window blocks / calibration subsets and report the gap's sd (default 3; needs "
                   "--samples > windows x repeats)")
    b.add_argument("--method", choices=ALLOCATOR_NAMES, help="allocator (default: the stage's `budget`, "
                                                                "else capability)")
    b.add_argument("--stage", type=int, default=None, help="1-based stage index (default: the first prune or "
                                                           "quantize stage)")
    b.add_argument("--spread", type=float, default=None, help="budget spread (sparsity units or bits)")
    b.add_argument("--plot", help="write a PNG heat map of scores and budgets")
    return ("plan",)


def _setup(a):
    from ..api import calibration_set, load
    from ..model import REFERENCE
    from ..recipe import Recipe
    if a.samples < 2 or a.seqlen < 2:
        raise UserError(f"--samples and --seqlen must be >= 2, got {a.samples}, {a.seqlen}")
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    recipe = Recipe.from_yaml(a.recipe)
    model, tok = load(a.model or recipe.model or REFERENCE, recipe.dtype)
    c = recipe.calibration
    calib = calibration_set(tok, c.source, c.select, a.samples, a.seqlen, c.seed, c.field, model)
    return recipe, model, calib


def cmd_order(a) -> int:
    from ..plan.order import plan_joint, plan_order
    if a.repeats < 1 or a.windows < 1 or a.windows * a.repeats >= a.samples:
        raise UserError(f"--windows x --repeats must be below --samples={a.samples} (each repeat scores its own "
                        f"windows and calibrates on the rest), got {a.windows} x {a.repeats}")
    recipe, model, calib = _setup(a)
    planner = plan_joint if a.measured else plan_order
    plan = planner(model, recipe, calib, windows=a.windows, seqlen=a.seqlen, samples=a.samples, repeats=a.repeats)
    print(plan.table())
    print(f"to apply it: `order: {'measured' if a.measured else 'auto'}` in the recipe")
    return 0


def _stage(recipe, index: int | None):
    from ..stages.prune import Prune
    from ..stages.quantize import Quantize
    if index is not None:
        if not 1 <= index <= len(recipe.stages):
            raise UserError(f"--stage must be in [1, {len(recipe.stages)}], got {index}")
        name, cfg = recipe.stages[index - 1]
    else:
        found = [(n, c) for n, c in recipe.stages if isinstance(c, (Prune, Quantize))]
        if not found:
            raise UserError("plan budget needs a prune or quantize stage in the recipe: add one or pass --stage")
        name, cfg = found[0]
    if isinstance(cfg, Prune):
        if cfg.pattern != "unstructured":
            raise UserError(f"plan budget: prune.pattern {cfg.pattern} fixes every layer's sparsity: use unstructured")
        return name, cfg, "sparsity", cfg.sparsity
    if isinstance(cfg, Quantize):
        return name, cfg, "bits", float(cfg.bits)
    raise UserError(f"plan budget handles prune and quantize stages, stage {name} is neither: pass --stage")


def layer_rows(plan: BudgetPlan) -> list[tuple]:
    """Per decoder layer: (layer, attention score, attention budget, head budget min, max, MLP score,
    MLP budget) for capability plans; (layer, score, budget) otherwise."""
    layers = sorted({c.layer for c in plan.components})
    rows = []
    for l in layers:
        cs = [c for c in plan.components if c.layer == l]
        if plan.scope == "layer":
            heads = [c for c in cs if c.name != "mlp"]
            mlp = [c for c in cs if c.name == "mlp"]
            hs = [c.score for c in heads]
            hb = [c.budget for c in heads]
            rows.append((l, sum(hs) / len(hs) if hs else math.nan, sum(hb) / len(hb) if hb else math.nan,
                         min(hb, default=math.nan), max(hb, default=math.nan),
                         mlp[0].score if mlp else math.nan, mlp[0].budget if mlp else math.nan))
        else:
            rows.append((l, cs[0].score, cs[0].budget))
    return rows


def print_plan(plan: BudgetPlan, stage: str) -> None:
    unit = "sparsity" if plan.kind == "sparsity" else "bits"
    print(f"{stage}: budget {plan.method}, mean {unit} {plan.mean:g} "
          f"(achieved, parameter-weighted: {plan.achieved_mean():.6f})")
    if plan.scope == "layer":
        print(f"{'layer':>5} {'attn density':>12} {'attn ' + unit:>13} {'heads min':>9} {'heads max':>9} "
              f"{'mlp density':>11} {'mlp ' + unit:>12}")
        for r in layer_rows(plan):
            print(f"{r[0]:>5} {r[1]:>12.4f} {r[2]:>13.4f} {r[3]:>9.4f} {r[4]:>9.4f} {r[5]:>11.4f} {r[6]:>12.4f}")
    else:
        score = {"sensitivity": "probe KL", "owl": "outlier ratio"}.get(plan.method, "score")
        print(f"{'layer':>5} {score:>14} {unit:>10}")
        for r in layer_rows(plan):
            print(f"{r[0]:>5} {r[1]:>14.4g} {r[2]:>10.4f}")


def plot_plan(plan: BudgetPlan, path: str, title: str) -> None:
    """Two heat maps (layers x components): score and budget. Written atomically as PNG."""
    import torch
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_write_bytes
    layers = sorted({c.layer for c in plan.components})
    cols = list(dict.fromkeys(c.name for c in plan.components))
    cols = [c for c in cols if c != "mlp"] + (["mlp"] if "mlp" in cols else [])
    S = torch.full((len(layers), len(cols)), float("nan"))
    Bm = torch.full_like(S, float("nan"))
    for c in plan.components:
        S[layers.index(c.layer), cols.index(c.name)] = c.score
        Bm[layers.index(c.layer), cols.index(c.name)] = c.budget
    score_name = {"capability": "capability density", "sensitivity": "probe KL (log10)",
                  "owl": "outlier ratio"}.get(plan.method, "score")
    if plan.method == "sensitivity":
        S = torch.log10(S.clamp(min=1e-12))
    unit = "sparsity" if plan.kind == "sparsity" else "bits"
    width = max(8.0, 2.0 + 0.9 * len(cols))
    fig, axes = plt.subplots(1, 2, figsize=(width, max(4.0, 1.0 + 0.28 * len(layers))), constrained_layout=True)
    budget_name = unit + (" (q/k/v/o get the mean of their heads)" if plan.scope == "layer" else "")
    for ax, M, name, cmap in ((axes[0], S, score_name, "viridis"), (axes[1], Bm, budget_name, "magma_r")):
        im = ax.imshow(M.numpy(), aspect="auto", cmap=cmap, interpolation="nearest")
        ax.set_xticks(range(len(cols)), [c.replace("head ", "h") for c in cols], rotation=90 if len(cols) > 12 else 0)
        step = max(1, len(layers) // 16)
        ax.set_yticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)])
        ax.set_xlabel("component")
        ax.set_ylabel("decoder layer")
        ax.set_title(name)
        fig.colorbar(im, ax=ax, shrink=0.9)
    fig.suptitle(f"{title}: budget {plan.method}, mean {unit} {plan.mean:g}")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def cmd_budget(a) -> int:
    from ..plan.budget import plan_budget
    if a.plot and not a.plot.lower().endswith(".png"):
        raise UserError(f"--plot {a.plot}: the plot is a PNG file, name it *.png")
    recipe, model, calib = _setup(a)
    name, cfg, kind, mean = _stage(recipe, a.stage)
    method = a.method or (getattr(cfg, "budget", "uniform") if getattr(cfg, "budget", "uniform") != "uniform"
                          else "capability")
    spread = a.spread if a.spread is not None else getattr(cfg, "budget_spread", None)
    plan = plan_budget(model, calib, method, mean, kind, cfg.target, spread)
    print_plan(plan, f"{name} ({cfg.describe()})")
    if a.plot:
        plot_plan(plan, a.plot, f"{name} {cfg.describe()}")
        print(f"wrote {a.plot}")
    return 0


def run(a) -> int:
    return {"order": cmd_order, "budget": cmd_budget}[a.plan_cmd](a)
