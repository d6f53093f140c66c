"""Per-component compression budgets: who gets more sparsity (or fewer bits) at the same mean.

Allocators are pure functions from per-component scores to per-component budgets
(`ALLOCATORS[name](scores, mean, ...) -> Tensor`); the parameter-weighted mean of the budgets equals `mean`
(to 1e-6 after clamping to [lo, hi]) and the budget is monotone in the score: a component with a higher
score (capability density, sensitivity, outlier ratio) is compressed less -- lower sparsity, more bits.
  uniform      every component gets `mean`.
  capability   score = SAE capability density (modelpress.plan.sae; "Capability-Guided Compression",
               arXiv 2603.16440), per attention head and per MLP, within each decoder layer.
  sensitivity  score = loss (KL to the original) when only that decoder layer gets a probe compression.
  owl          score = outlier ratio of Wanda scores per decoder layer (OWL, arXiv 2310.05175); budgets
               spread linearly over [mean - lambda, mean + lambda].

`plan_budget(model, calib, method, mean)` measures the scores on a model and returns a BudgetPlan whose
`module_specs()` is {linear name: (R, G) budgets of its row x column groups} and `module_map()` {linear
name: mean budget}. Capability budgets are per head and reach the head's own weights: the q rows of head
h, the k/v rows of its KV group (GQA: the budgets of the heads sharing the group, weighted by the weights
each owns) and the o_proj input columns of head h (spec (H, 1), (KV, 1), (1, H)); the prune stage applies
them as block masks inside one linear (modelpress.algos.prune). Quantization reads `bit_specs()`: the same
specs in whole bits, rounded jointly over every block of every budgeted linear (round_bit_specs), which
the quantize stage stores as per-head widths inside one QuantLinear (modelpress.modules.quant); o_proj keeps
its per-head column blocks only where the scale groups fit inside a head (group size dividing the head dim),
else it gets its heads' parameter-weighted mean (one width; a per-channel or head-straddling scale cannot
serve two grids). A head whose
budget reaches sparsity 1.0 (`structured: heads`, head bound 1.0) has all its q rows and o columns
zeroed -- recorded by `removed_heads()`; the config's head count is unchanged (transformers reloads one
num_attention_heads for every layer, so per-layer head removal is not a reloadable checkpoint).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..model import attention_mlp_split

KINDS = ("sparsity", "bits")
BOUNDS = {"sparsity": (0.0, 0.95), "bits": (2.0, 8.0)}
DEFAULT_SPREAD = {"sparsity": 0.1, "bits": 1.0}


# ----------------------------------------------------------------------------------------------------------
# pure allocators


def fit_mean(pref: Tensor, mean: float, lo: float, hi: float, weights: Tensor | None = None,
             tol: float = 1e-9) -> Tensor:
    """b_i = clip(pref_i + c, lo, hi) with the common shift c chosen (bisection) so that
    sum_i w_i b_i / sum_i w_i = mean. pref: (n,). Monotone in pref, exact mean to `tol`."""
    if not lo <= mean <= hi:
        raise UserError(f"budget mean {mean} is outside [{lo}, {hi}]: choose a mean inside the bounds")
    pref = pref.double()
    w = torch.ones_like(pref) if weights is None else weights.double()
    w = w / w.sum()

    def wmean(c: float) -> float:
        return float((w * (pref + c).clamp(lo, hi)).sum())

    a, b = lo - float(pref.max()), hi - float(pref.min())          # wmean(a) = lo, wmean(b) = hi
    for _ in range(200):
        c = 0.5 * (a + b)
        if wmean(c) < mean:
            a = c
        else:
            b = c
        if b - a < tol:
            break
    return (pref + 0.5 * (a + b)).clamp(lo, hi)


def _standardize(s: Tensor) -> Tensor:
    s = s.double()
    sd = s.std(unbiased=False) if s.numel() > 1 else s.new_tensor(0.0)
    return torch.zeros_like(s) if float(sd) < 1e-12 else (s - s.mean()) / sd


def _sign(kind: str) -> float:
    if kind not in KINDS:
        raise UserError(f"budget kind {kind!r} is unknown: use one of {', '.join(KINDS)}")
    return -1.0 if kind == "sparsity" else 1.0      # higher score -> less compression


def _bounds(kind: str, lo: float | None, hi: float | None) -> tuple[float, float]:
    d = BOUNDS[kind]
    return (d[0] if lo is None else lo), (d[1] if hi is None else hi)


def uniform(scores: Tensor, mean: float, spread: float | None = None, kind: str = "sparsity",
            weights: Tensor | None = None, lo: float | None = None, hi: float | None = None) -> Tensor:
    """Every component gets `mean`. scores: (n,) (only the count is used)."""
    _sign(kind)
    return torch.full((scores.numel(),), float(mean), dtype=torch.float64)


def by_zscore(scores: Tensor, mean: float, spread: float | None = None, kind: str = "sparsity",
              weights: Tensor | None = None, lo: float | None = None, hi: float | None = None,
              standardize: bool = True) -> Tensor:
    """b_i = mean -/+ spread * z_i (z = standardized score, or the score itself when standardize is
    False), shifted back to the weighted mean and clamped. `-` for sparsity (denser keeps more weights),
    `+` for bits."""
    spread = DEFAULT_SPREAD[kind] if spread is None else spread
    lo, hi = _bounds(kind, lo, hi)
    z = _standardize(scores) if standardize else scores.double()
    return fit_mean(mean + _sign(kind) * spread * z, mean, lo, hi, weights)


def capability(density: Tensor, mean: float, spread: float | None = None, kind: str = "sparsity",
               weights: Tensor | None = None, lo: float | None = None, hi: float | None = None,
               standardize: bool = True) -> Tensor:
    """Capability-guided (arXiv 2603.16440): denser components (higher SAE capability density) are
    compressed less. density: (n,) in [0, 1]."""
    return by_zscore(density, mean, spread, kind, weights, lo, hi, standardize)


def sensitivity(loss: Tensor, mean: float, spread: float | None = None, kind: str = "sparsity",
                weights: Tensor | None = None, lo: float | None = None, hi: float | None = None) -> Tensor:
    """Sensitivity: components whose probe compression costs more loss are compressed less. The loss
    (n,) >= 0 is compared on a log scale (probe losses span orders of magnitude)."""
    return by_zscore(torch.log(loss.double().clamp(min=1e-12)), mean, spread, kind, weights, lo, hi)


def owl(outlier_ratio: Tensor, mean: float, spread: float | None = None, kind: str = "sparsity",
        weights: Tensor | None = None, lo: float | None = None, hi: float | None = None) -> Tensor:
    """OWL (Yin et al., arXiv 2310.05175): budgets linear in the outlier ratio D, the highest D getting
    mean - lambda and the lowest mean + lambda sparsity (lambda = spread), then shifted to the mean."""
    spread = DEFAULT_SPREAD[kind] if spread is None else spread
    lo, hi = _bounds(kind, lo, hi)
    d = outlier_ratio.double()
    rng = float(d.max() - d.min()) if d.numel() else 0.0
    unit = torch.zeros_like(d) if rng < 1e-12 else 2 * (d - d.min()) / rng - 1      # in [-1, 1]
    return fit_mean(mean + _sign(kind) * spread * unit, mean, lo, hi, weights)


ALLOCATORS = {"uniform": uniform, "capability": capability, "sensitivity": sensitivity, "owl": owl}


def weighted_mean(b: Tensor, weights: Tensor | None = None) -> float:
    w = torch.ones_like(b, dtype=torch.float64) if weights is None else weights.double()
    return float((b.double() * w).sum() / w.sum())


def round_bits(bits: Tensor, weights: Tensor, mean: float, lo: int = 2, hi: int = 8) -> Tensor:
    """Integer bit widths (n,) from fractional ones: floor, then add one bit to the largest remainders
    while the weighted mean stays <= `mean` + half the smallest step. Keeps the order of `bits`."""
    b = bits.double().clamp(lo, hi)
    out = b.floor()
    w = weights.double() / weights.double().sum()
    for i in torch.argsort(b - out, descending=True).tolist():
        if out[i] < hi and float((out * w).sum() + w[i]) <= mean + 0.5 * float(w[i]) + 1e-12 and b[i] > out[i]:
            out[i] += 1
    return out.to(torch.int64)


# ----------------------------------------------------------------------------------------------------------
# components of a model


@dataclass
class Component:
    """One budget unit: an attention head, an MLP, or a whole decoder layer."""
    layer: int
    name: str                               # "head 3", "mlp" or "layer"
    modules: tuple[str, ...]                # linears whose budget this component sets
    params: float                           # weights it owns (k/v shared by a GQA group split evenly)
    score: float = float("nan")
    budget: float = float("nan")
    metrics: dict = field(default_factory=dict)
    parts: dict = field(default_factory=dict)   # {module: [(group, weight), ...]}: the row/column groups of
                                                # the module this head owns and how many weights of each


@dataclass
class BudgetPlan:
    method: str
    kind: str                               # sparsity | bits
    mean: float
    scope: str                              # "layer" (means kept per decoder layer) or "model"
    components: list[Component]
    module_params: dict[str, int]
    layouts: dict[str, tuple[str, int]] = field(default_factory=dict)   # {module: ("rows"|"cols", groups)}

    def module_specs(self) -> dict[str, Tensor]:
        """{linear name: budget spec (R, G) float64}: R equal row groups x G equal column groups, each with
        the parameter-weighted mean budget of the components owning it. Per head (capability): q/k/v get
        (H, 1) / (KV groups, 1) -- a KV group's budget combines the heads sharing it, weighted by the weights
        each owns -- o_proj (1, H), a fused qkv (H + 2 KV, 1); MLPs and whole layers (1, 1)."""
        acc: dict[str, Tensor] = {}
        wts: dict[str, Tensor] = {}
        for c in self.components:
            for m in c.modules:
                axis, n = self.layouts.get(m, ("rows", 1))
                shape = (n, 1) if axis == "rows" else (1, n)
                a = acc.setdefault(m, torch.zeros(shape, dtype=torch.float64))
                w = wts.setdefault(m, torch.zeros(shape, dtype=torch.float64))
                for g, wt in (c.parts.get(m) or [(k, c.params / n) for k in range(n)]):
                    a.view(-1)[g] += wt * c.budget
                    w.view(-1)[g] += wt
        return {m: acc[m] / wts[m].clamp(min=1e-30) for m in acc}

    def module_map(self) -> dict[str, float]:
        """{linear name: budget}: the parameter-weighted mean of its components' budgets (the mean of its
        spec: all groups of a module are the same size)."""
        return {m: float(s.mean()) for m, s in self.module_specs().items()}

    def achieved_mean(self) -> float:
        mm = self.module_map()
        tot = sum(self.module_params[m] for m in mm)
        return sum(mm[m] * self.module_params[m] for m in mm) / tot

    def removed_heads(self) -> dict[int, list[int]]:
        """{layer: [head, ...]} of heads whose whole budget is sparsity 1.0 (structured head removal)."""
        out: dict[int, list[int]] = {}
        for c in self.components:
            if self.kind == "sparsity" and c.name.startswith("head ") and c.budget >= 1.0 - 1e-9:
                out.setdefault(c.layer, []).append(int(c.name.split()[1]))
        return out

    def table(self) -> list[tuple]:
        return [(c.layer, c.name, c.score, c.budget) for c in self.components]


OUT_PROJ = ("o_proj", "out_proj", "c_proj", "dense", "wo")     # attention output projections by leaf name


def head_layout(model: nn.Module) -> tuple[int, int, int]:
    """(heads, KV heads, head dim) from the model config; KV heads = heads without GQA."""
    cfg = getattr(model, "config", None)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    if not heads:
        raise UserError("capability budgets need config.num_attention_heads: use budget sensitivity or owl")
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    dh = getattr(cfg, "head_dim", None) or (hidden // heads if hidden else None)
    return int(heads), int(kv), int(dh) if dh else 0


def head_parts(name: str, lin: nn.Linear, heads: int, kv: int, dh: int) -> tuple[tuple[str, int], list] | None:
    """Which groups of attention linear `name` each head owns: ((axis, groups), [[(group, weights)], per head]),
    or None when the shape matches no per-head layout (the module then gets the heads' mean).
    o_proj: input columns [h dh, (h+1) dh); q: output rows of head h; k/v: rows of KV group h // (heads / kv),
    shared by the heads of the group (each owns 1 / group size of it); fused qkv: q rows, then k, then v."""
    out_f, in_f = lin.weight.shape
    if not dh or heads % kv:
        return None
    rep = heads // kv
    if name.rsplit(".", 1)[-1] in OUT_PROJ and in_f == heads * dh:
        return ("cols", heads), [[(h, out_f * dh)] for h in range(heads)]
    if out_f == heads * dh:                                 # q (and k, v without GQA): one group per head
        return ("rows", heads), [[(h, dh * in_f)] for h in range(heads)]
    if out_f == kv * dh:                                    # GQA k or v
        return ("rows", kv), [[(h // rep, dh * in_f / rep)] for h in range(heads)]
    if out_f == (heads + 2 * kv) * dh:                      # fused qkv
        return ("rows", heads + 2 * kv), [[(h, dh * in_f), (heads + h // rep, dh * in_f / rep),
                                           (heads + kv + h // rep, dh * in_f / rep)] for h in range(heads)]
    return None


def layer_components(model: nn.Module, linears: dict[str, nn.Linear], layer: int, per_head: bool,
                     layouts: dict | None = None) -> list[Component]:
    """Components of decoder layer `layer` over the targeted `linears` (full names): one per attention head
    plus one MLP when `per_head`, else a single component for the whole layer. Per head, `layouts` (filled
    here) records each attention linear's ("rows" | "cols", groups) and every head the groups it owns."""
    if not linears:
        return []
    if not per_head:
        return [Component(layer, "layer", tuple(linears), float(sum(m.weight.numel() for m in linears.values())))]
    attn, mlp = attention_mlp_split(linears)
    out = []
    if attn:
        heads, kv, dh = head_layout(model)
        parts = {n: head_parts(n, linears[n], heads, kv, dh) for n in attn}
        if layouts is not None:
            layouts.update({n: p[0] for n, p in parts.items() if p})
        for h in range(heads):
            own = {n: p[1][h] for n, p in parts.items() if p}
            params = sum(w for ps in own.values() for _, w in ps) + sum(
                linears[n].weight.numel() / heads for n, p in parts.items() if not p)
            out.append(Component(layer, f"head {h}", tuple(attn), float(params), parts=own))
    if mlp:
        out.append(Component(layer, "mlp", tuple(mlp), float(sum(linears[n].weight.numel() for n in mlp))))
    return out


def allocate_capability(components: list[Component], mean: float, kind: str, spread: float | None = None,
                        lo: float | None = None, hi: float | None = None, head_hi: float | None = None) -> None:
    """Capability budgets in two levels. (1) Per decoder layer, between its attention block (score = mean
    head density) and its MLP, keeping the layer's mean: each block type is standardized across layers
    (head and MLP SAEs differ in width, so their densities are compared within type). (2) Between the
    heads of a layer, keeping the attention block's budget; module_specs() hands each head's budget to
    its own rows / columns. head_hi: the heads' upper bound (1.0 lets a head be removed whole: structured
    head pruning); default `hi`."""
    by_layer: dict[int, list[Component]] = {}
    for c in components:
        by_layer.setdefault(c.layer, []).append(c)
    units = []                                                   # (layer, kind, params, score)
    for layer, cs in by_layer.items():
        heads = [c for c in cs if c.name != "mlp"]
        if heads:
            units.append((layer, "attn", sum(c.params for c in heads), sum(c.score for c in heads) / len(heads)))
        units += [(layer, "mlp", c.params, c.score) for c in cs if c.name == "mlp"]
    z: dict[tuple[int, str], float] = {}
    for t in ("attn", "mlp"):
        us = [u for u in units if u[1] == t]
        if us:
            zs = _standardize(torch.tensor([u[3] for u in us], dtype=torch.float64)).tolist()
            z.update({(u[0], t): v for u, v in zip(us, zs)})
    for layer, cs in by_layer.items():
        lu = [u for u in units if u[0] == layer]
        b = capability(torch.tensor([z[(u[0], u[1])] for u in lu]), mean, spread, kind,
                       torch.tensor([u[2] for u in lu], dtype=torch.float64), lo, hi, standardize=False)
        block = {u[1]: float(v) for u, v in zip(lu, b)}
        heads = [c for c in cs if c.name != "mlp"]
        if heads:
            hb = capability(torch.tensor([c.score for c in heads]), block["attn"], spread, kind,
                            torch.tensor([c.params for c in heads], dtype=torch.float64), lo,
                            hi if head_hi is None else head_hi)
            for c, v in zip(heads, hb.tolist()):
                c.budget = v
        for c in cs:
            if c.name == "mlp":
                c.budget = block["mlp"]


def allocate(components: list[Component], method: str, mean: float, kind: str, scope: str,
             spread: float | None = None, lo: float | None = None, hi: float | None = None) -> None:
    """Fill c.budget from c.score: per decoder layer (scope "layer") or over all components ("model")."""
    if method not in ALLOCATORS:
        raise UserError(f"budget {method!r} is unknown: use one of {', '.join(ALLOCATORS)}")
    fn = ALLOCATORS[method]
    groups: dict = {}
    for c in components:
        groups.setdefault(c.layer if scope == "layer" else 0, []).append(c)
    for cs in groups.values():
        s = torch.tensor([c.score for c in cs], dtype=torch.float64)
        w = torch.tensor([c.params for c in cs], dtype=torch.float64)
        for c, b in zip(cs, fn(s, mean, spread, kind, w, lo, hi).tolist()):
            c.budget = b


# ----------------------------------------------------------------------------------------------------------
# measuring the scores


def _targeted_layers(model: nn.Module, target) -> list[tuple[int, str, dict[str, nn.Linear]]]:
    from ..model import decoder_layers, layer_linears
    prefix, layers = decoder_layers(model)
    out = []
    for i, layer in enumerate(layers):
        lin = target.filter(layer_linears(layer, f"{prefix}.{i}"))
        if lin:
            out.append((i, f"{prefix}.{i}", lin))
    return out


@torch.no_grad()
def _kl_to(ref_logp: list[Tensor], model: nn.Module, windows: Tensor, batch_size: int = 2) -> float:
    """Mean KL(reference || model) per predicted position; ref_logp: log-probs per batch."""
    tot, n = 0.0, 0
    for k, b in enumerate(range(0, windows.shape[0], batch_size)):
        lp = torch.log_softmax(model(input_ids=windows[b:b + batch_size], use_cache=False).logits.float(), -1)
        r = ref_logp[k]
        tot += float((r.exp() * (r - lp)).sum(-1).clamp(min=0).sum())
        n += r.shape[0] * r.shape[1]
    return tot / n


@torch.no_grad()
def ref_logprobs(model: nn.Module, windows: Tensor, batch_size: int = 2) -> list[Tensor]:
    return [torch.log_softmax(model(input_ids=windows[b:b + batch_size], use_cache=False).logits.float(), -1)
            for b in range(0, windows.shape[0], batch_size)]


@torch.no_grad()
def layer_sensitivity(model: nn.Module, windows: Tensor, layers: list[tuple[int, str, dict[str, nn.Linear]]],
                      kind: str, probe: float) -> list[float]:
    """KL(original || model with only layer l's linears compressed) for each targeted layer: magnitude
    pruning at sparsity `probe` (kind sparsity) or RTN g64 asymmetric at `probe` bits (kind bits).
    The weights are changed in place and restored exactly."""
    from ..algos import prune as P
    from ..algos import quant
    ref = ref_logprobs(model, windows)
    out = []
    for _, _, lin in layers:
        saved = {n: m.weight.data.clone() for n, m in lin.items()}
        try:
            for m in lin.values():
                W = m.weight.data.float()
                if kind == "sparsity":
                    m.weight.data = (W * P.magnitude_mask(W, probe)).to(m.weight.dtype)
                else:
                    m.weight.data = quant.fake_quant(W, int(round(probe)), 64, False).to(m.weight.dtype)
            out.append(_kl_to(ref, model, windows))
        finally:
            for n, m in lin.items():
                m.weight.data = saved[n]
    return out


def outlier_ratio(W: Tensor, x_sq_norm: Tensor, m: float = 5.0) -> tuple[int, int]:
    """OWL outliers of one linear: (count of Wanda scores |W_ij| ||X_j|| > m * their mean, total count)."""
    score = W.abs().float() * torch.sqrt(x_sq_norm.float())[None, :]          # (rows, cols)
    return int((score > m * score.mean()).sum()), score.numel()


def plan_budget(model: nn.Module, calib, method: str, mean: float, kind: str = "sparsity", target=None,
                spread: float | None = None, lo: float | None = None, hi: float | None = None,
                windows: int = 4, owl_m: float = 5.0, sae_config=None, density_weights=None,
                head_hi: float | None = None) -> BudgetPlan:
    """Measure the scores `method` needs on `model` (not modified) and allocate budgets with mean `mean`.
    windows: calibration sequences scored by the sensitivity probe (KL). head_hi (capability): upper bound
    of a head's budget (1.0: a head may be removed whole)."""
    from ..targets import Target
    if method not in ALLOCATORS:
        raise UserError(f"budget {method!r} is unknown: use one of {', '.join(ALLOCATORS)}")
    _sign(kind)
    target = target or Target()
    layers = _targeted_layers(model, target)
    if not layers:
        raise UserError("budget: no targeted linear layers: check include / exclude")
    params = {n: m.weight.numel() for _, _, lin in layers for n, m in lin.items()}
    per_head = method == "capability"
    layouts: dict[str, tuple[str, int]] = {}
    comps = [c for i, _, lin in layers for c in layer_components(model, lin, i, per_head, layouts)]
    if method != "uniform" and calib is None:
        raise UserError(f"budget {method} needs calibration data: add a `calibration:` block or use budget uniform")
    if method == "capability":
        from .sae import capability_scores
        scores = capability_scores(model, calib, target, sae_config, density_weights)
        for c in comps:
            c.metrics = scores[(c.layer, c.name)]
            c.score = c.metrics["density"]
    elif method == "sensitivity":
        probe = mean if kind == "sparsity" else max(2.0, math.floor(mean) - 1)
        loss = layer_sensitivity(model, calib.input_ids[:windows], layers, kind, probe)
        for c, v in zip(comps, loss):
            c.score, c.metrics = v, {"kl": v, "probe": probe}
    elif method == "owl":
        ratios = owl_ratios(model, calib, target, owl_m)
        for c in comps:
            c.score = ratios[c.layer]
            c.metrics = {"outlier_ratio": c.score}
    else:
        for c in comps:
            c.score = 0.0
    measured = BudgetPlan(method, kind, mean, "layer" if per_head else "model", comps, params, layouts)
    return replan(measured, mean, kind, spread, lo, hi, head_hi)


def replan(plan: BudgetPlan, mean: float, kind: str | None = None, spread: float | None = None,
           lo: float | None = None, hi: float | None = None, head_hi: float | None = None) -> BudgetPlan:
    """The same measured scores allocated again at another mean (and kind): a new plan, `plan` unchanged
    (plan_budget allocates its measurement through this too).
    Capability densities and OWL outlier ratios do not depend on the mean or the kind, so one measurement
    serves 50 % and 60 % sparsity and a mixed-bit plan alike. Sensitivity's probe is set by the mean and
    the kind (magnitude pruning at the mean sparsity, RTN below the mean bits): re-measure it."""
    kind = plan.kind if kind is None else kind
    _sign(kind)
    if plan.method == "sensitivity" and (kind != plan.kind or mean != plan.mean):
        raise UserError("budget sensitivity probes at the plan's own mean and kind: call plan_budget again for "
                        f"mean {mean} ({kind}) instead of replan")
    comps = [dataclasses.replace(c, budget=float("nan"), metrics=dict(c.metrics), parts=dict(c.parts))
             for c in plan.components]
    if plan.method == "capability":          # per head, each decoder layer's mean kept (scope "layer")
        allocate_capability(comps, mean, kind, spread, lo, hi, head_hi)
    else:
        allocate(comps, plan.method, mean, kind, plan.scope, spread, lo, hi)
    return BudgetPlan(plan.method, kind, mean, plan.scope, comps, dict(plan.module_params), dict(plan.layouts))


def owl_ratios(model: nn.Module, calib, target, m: float = 5.0) -> dict[int, float]:
    """Per decoder layer: fraction of Wanda scores above m x the layer's mean score (over its linears)."""
    from ..engine import layerwise
    per: dict[int, list[int]] = {}

    def fn(linears, stats):
        for name, lin in linears.items():
            k, n = outlier_ratio(lin.weight.detach(), stats[name], m)
            acc = per.setdefault(_layer_index(name), [0, 0])
            acc[0] += k
            acc[1] += n
        return {}

    layerwise.run(model, calib, target, fn, collect="input_sq_norm")
    return {i: k / n for i, (k, n) in per.items()}


def _layer_index(name: str) -> int:
    """Decoder-layer index in a full linear name such as model.layers.12.mlp.up_proj."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    raise UserError(f"cannot find the decoder layer index in module name {name!r}")


def budget_specs(model: nn.Module, calib, method: str, mean: float, target=None, spread: float | None = None,
                 **kw) -> tuple[dict[str, Tensor], BudgetPlan]:
    """({linear name: sparsity spec (R, G)}, plan) for the targeted linears: per-head row / column groups
    for capability budgets (modelpress.algos.prune block masks read them), (1, 1) otherwise."""
    plan = plan_budget(model, calib, method, mean, "sparsity", target, spread, **kw)
    return plan.module_specs(), plan


def round_bit_specs(specs: dict[str, Tensor], params: dict[str, int], mean: float) -> dict[str, Tensor]:
    """Whole-bit widths (R, G) int64 for fractional specs {linear: (R, G)}, rounded jointly by round_bits over
    all blocks of all linears, each block weighted by the weights it holds (params / (R G)). The rule: the
    achieved parameter-weighted mean of the widths is within half the largest block's share of the weights
    of `mean` (|achieved - mean| <= max_i w_i / 2, w_i = block weights / all budgeted weights), and a block
    with a larger fractional budget never gets fewer bits."""
    names = list(specs)
    vals = torch.cat([specs[n].reshape(-1).double() for n in names])
    wts = torch.cat([torch.full((specs[n].numel(),), params[n] / specs[n].numel(), dtype=torch.float64)
                     for n in names])
    r = round_bits(vals, wts, mean)
    out, i = {}, 0
    for n in names:
        k = specs[n].numel()
        out[n] = r[i:i + k].reshape(specs[n].shape)
        i += k
    return out


def bit_specs(model: nn.Module, calib, method: str, mean: float, target=None, spread: float | None = None,
              group_size: int | None = None, **kw) -> tuple[dict[str, Tensor], BudgetPlan]:
    """({linear name: whole-bit widths (R, G) int64}, plan) for stage quantize's `budget:`: capability gives the
    q/k/v rows of each head (KV group) and the o_proj columns of each head their head's width; a spec with
    column blocks whose width is not a multiple of `group_size` (or group_size None: one scale per row) is
    first replaced by its mean (1, 1). Other methods: (1, 1) per linear. Rounded by round_bit_specs."""
    return plan_bit_specs(model, plan_budget(model, calib, method, mean, "bits", target, spread, **kw), group_size)


def plan_bit_specs(model: nn.Module, plan: BudgetPlan, group_size: int | None = None) -> tuple[dict[str, Tensor], BudgetPlan]:
    """bit_specs for a plan already measured (kind bits): ({linear name: whole-bit widths (R, G) int64}, plan)."""
    if plan.kind != "bits":
        raise UserError(f"plan_bit_specs needs a plan of kind bits, got {plan.kind}: plan with kind bits")
    specs = plan.module_specs()
    for n, sp in specs.items():
        G = sp.shape[1]
        cols = model.get_submodule(n).weight.shape[1]
        if G > 1 and (group_size is None or cols % G or (cols // G) % group_size):
            specs[n] = sp.mean().reshape(1, 1)
    return round_bit_specs(specs, plan.module_params, plan.mean), plan


def budget_map(model: nn.Module, calib, method: str, mean: float, kind: str = "sparsity", target=None,
               spread: float | None = None, **kw) -> dict[str, float]:
    """{linear name: sparsity (kind "sparsity") or integer bits (kind "bits")} for the targeted linears,
    parameter-weighted mean `mean` (bits: as close as integers allow). The hook for stage `budget:`."""
    plan = plan_budget(model, calib, method, mean, kind, target, spread, **kw)
    mm = plan.module_map()
    if kind == "bits":
        names = list(mm)
        b = round_bits(torch.tensor([mm[n] for n in names]), torch.tensor([plan.module_params[n] for n in names],
                                                                           dtype=torch.float64), mean)
        return {n: int(v) for n, v in zip(names, b.tolist())}
    return mm
