"""Order of compression stages by intensity: the Progressive Intensity Hypothesis ("Prune-then-Quantize
or Quantize-then-Prune?", Kim et al., arXiv 2603.18426) -- weaker perturbations first, stronger later.

Intensity of a stage = its compression-equivalent ratio: apply the stage alone to a copy of the model,
measure its quality loss (mean KL(original || compressed) per token on a few calibration windows), and
map that loss onto the RTN bits -> loss curve measured on the same model and text (8/6/4/3/2 bits,
group 64, asymmetric), by linear interpolation of bits against log(loss):
    b_eq = interp(log L_stage; log L(b), b),   ratio_eq = 16 / b_eq   (against 16-bit weights).
Stages are run in increasing ratio_eq (stable: ties keep the recipe's order).

Confidence: with `repeats` > 1 the whole measurement (reference curve and every stage alone) is repeated
on disjoint blocks of scoring windows, each stage calibrated on the sequences outside its repeat's windows
(so every repeat uses a different calibration subset and text it did not calibrate on). The planned order
uses the mean equivalent bits; for every pair of neighbours in it the table gives the gap (weaker minus
stronger, eq. bits) as mean +- sd over repeats, how many repeats order the pair the same way, and a
verdict: "outside noise" when |mean gap| > 2 sd (a single repeat would be expected to give the same
order), else "inside noise" (the measurement does not decide the order of that pair). The joint semantics live
in the stages: prune-then-quantize takes scales from surviving weights, quantize-then-prune re-masks
the dequantized weights (QuantLinear.set_keep) so pruned weights stay exactly zero.

Measured (benchmarks/order.py, 3 seeds, BENCHMARKS.md "Compression order"): the hypothesis is contradicted.
On SmolLM2-135M ({Wanda, SparseGPT} x {RTN, GPTQ} x {w8, w4, w3} x {30, 50, 70 %, 2:4}, four grids) the
stronger stage first won 24 of the 29 pairs outside noise and prune-then-quantize all 29, whichever stage was
weaker; this planner's seed-level picks were right in 17 of 87, plan_joint's (below) in 86 of 87. On
Qwen2.5-Coder-0.5B (the same four pairings at {50 %, 2:4} x {w4, w3}) stronger-first won 14 of 15 and
prune-then-quantize 15 of 15; this planner was right in 3 of 45 picks, plan_joint in 43 of 45. Theorem 2 (the
advantage grows with the intensity gap) held only as a rank trend on one grid of eight. This planner
implements the paper's rule; treat its order as a hypothesis.

`order: measured` (plan_joint) does not predict: it runs the whole recipe in every order of its stages
(k! runs for k <= 3 stages) on copies, scores each on the held-back calibration windows, and keeps the
best, with the runner-up's margin as mean +- sd over repeats and an inside/outside-noise verdict.
"""
from __future__ import annotations

import copy
import itertools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import UserError

log = logging.getLogger("modelpress")

CURVE_BITS = (8, 6, 4, 3, 2)
REFERENCE_BITS = 16.0


@dataclass(frozen=True)
class Intensity:
    index: int                      # position in the recipe
    name: str                       # stage name
    describe: str
    loss: float                     # metric of the stage alone
    bits: float                     # compression-equivalent bits (mean over repeats)
    ratio: float                    # REFERENCE_BITS / bits
    bits_sd: float = float("nan")   # sd of the equivalent bits over repeats (nan for one repeat)
    per_repeat: tuple[float, ...] = ()   # equivalent bits of each repeat


@dataclass(frozen=True)
class OrderPlan:
    metric: str
    curve: tuple[tuple[float, float], ...]        # (bits, loss) of the RTN reference
    intensities: tuple[Intensity, ...]            # in recipe order
    order: tuple[int, ...]                        # recipe indices, weaker first
    repeats: int = 1

    def confidence(self) -> list[dict]:
        """For each pair of neighbours (weaker, stronger) in the planned order: the gap in equivalent bits
        (weaker minus stronger) mean and sd over repeats, how many repeats agree on the order, and whether
        |mean| > 2 sd ("outside noise"); sd is nan and the verdict "not measured" for one repeat."""
        out = []
        for a, b in zip(self.order, self.order[1:]):
            sa, sb = self.intensities[a], self.intensities[b]
            gaps = [x - y for x, y in zip(sa.per_repeat, sb.per_repeat)] or [sa.bits - sb.bits]
            mean = sum(gaps) / len(gaps)
            sd = (math.sqrt(sum((g - mean) ** 2 for g in gaps) / (len(gaps) - 1)) if len(gaps) > 1
                  else float("nan"))
            agree = sum(g > 0 for g in gaps) if mean > 0 else sum(g <= 0 for g in gaps)
            verdict = ("not measured (1 repeat)" if len(gaps) < 2 else
                       "outside noise" if abs(mean) > 2 * sd else "inside noise")
            out.append({"weaker": a, "stronger": b, "gap": mean, "sd": sd, "agree": agree, "n": len(gaps),
                        "verdict": verdict})
        return out

    def table(self) -> str:
        lines = [f"reference: RTN g64 asym, {self.metric} at " + (f"(mean of {self.repeats} repeats) " if self.repeats > 1 else "") +
                 ", ".join(f"w{b:g}={v:.4g}" for b, v in self.curve),
                 f"{'run':>3}  {'recipe':>6}  {'stage':<34} {self.metric:>10} {'eq. bits':>8} {'eq. ratio':>9}"]
        for k, i in enumerate(self.order):
            s = self.intensities[i]
            sd = f" +- {s.bits_sd:.2f}" if len(s.per_repeat) > 1 else ""
            lines.append(f"{k + 1:>3}  {s.index + 1:>6}  {s.name + ': ' + s.describe:<34} {s.loss:>10.4g} "
                         f"{s.bits:>8.2f}{sd} {s.ratio:>8.2f}x")
        moved = self.order != tuple(range(len(self.order)))
        lines.append("order: weaker first" + (" (differs from the recipe)" if moved else " (as written)"))
        for c in self.confidence():
            a, b = self.intensities[c["weaker"]], self.intensities[c["stronger"]]
            sd = f" +- {c['sd']:.2f}" if c["n"] > 1 else ""
            lines.append(f"gap {a.name} -> {b.name}: {c['gap']:.2f}{sd} eq. bits over {c['n']} repeat(s), "
                         f"{c['agree']}/{c['n']} agree: {c['verdict']}"
                         + (" -- the order of this pair is not decided by the measurement"
                            if c["verdict"] == "inside noise" else ""))
        return "\n".join(lines)


def equivalent_bits(bits: Sequence[float], loss: Sequence[float], value: float,
                    lo: float = 1.0, hi: float = REFERENCE_BITS) -> float:
    """Bits at which the reference curve (bits_k, loss_k) reaches `value`: piecewise linear in log(loss),
    linear extrapolation beyond the ends, clamped to [lo, hi]. The curve is made monotone (fewer bits
    never lose less) before interpolating. A loss <= 0 maps to `hi`."""
    if len(bits) != len(loss) or len(bits) < 2:
        raise ValueError("the reference curve needs at least two (bits, loss) points")
    if value <= 0:
        return hi
    pts = sorted(zip(bits, loss), key=lambda p: -p[0])                 # most bits (least loss) first
    xs, ys, prev = [], [], -math.inf
    for b, v in pts:
        y = math.log(max(v, 1e-30))
        y = max(y, prev + 1e-9)                                        # strictly increasing log-loss
        xs.append(y)
        ys.append(float(b))
        prev = y
    t = math.log(value)
    k = 0 if t <= xs[0] else len(xs) - 2 if t >= xs[-1] else max(j for j in range(len(xs) - 1) if xs[j] <= t)
    b = ys[k] + (t - xs[k]) * (ys[k + 1] - ys[k]) / (xs[k + 1] - xs[k])
    return float(min(hi, max(lo, b)))


def weaker_first(ratios: Sequence[float]) -> tuple[int, ...]:
    """Indices in increasing intensity; ties keep their order (stable)."""
    return tuple(sorted(range(len(ratios)), key=lambda i: ratios[i]))


@torch.no_grad()
def _logprobs(model: nn.Module, windows: Tensor, batch_size: int = 2) -> list[Tensor]:
    return [torch.log_softmax(model(input_ids=windows[b:b + batch_size], use_cache=False).logits.float(), -1)
            for b in range(0, windows.shape[0], batch_size)]


def kl_metric(reference: nn.Module, windows: Tensor, batch_size: int = 2) -> Callable[[nn.Module], float]:
    """metric(model) = mean KL(reference || model) per position on `windows` (n, seqlen); the
    reference log-probabilities are computed once."""
    ref = _logprobs(reference, windows, batch_size)

    @torch.no_grad()
    def metric(model: nn.Module) -> float:
        tot, n = 0.0, 0
        for r, lp in zip(ref, _logprobs(model, windows, batch_size)):
            tot += float((r.exp() * (r - lp)).sum(-1).clamp(min=0).double().sum())
            n += r.shape[0] * r.shape[1]
        return tot / n
    return metric


def _subset(calib, idx: list[int], n: int):
    """The first n of the sequences `idx` of calib."""
    from ..calib import CalibrationSet
    idx = torch.tensor(idx[:n], dtype=torch.long)
    return CalibrationSet(calib.input_ids[idx], calib.attention_mask[idx],
                          dict(calib.provenance, subset=[int(i) for i in idx]))


def reference_curve(model: nn.Module, metric: Callable[[nn.Module], float], stage: Callable[..., object],
                    bits: Sequence[int] = CURVE_BITS, group_size: int | None = 64, sym: bool = False,
                    include: tuple[str, ...] = (), exclude: tuple[str, ...] = ("lm_head",)) -> tuple[tuple[float, float], ...]:
    """(bits, metric) of RTN-quantized copies of `model` (not modified). `stage(name, **config)` builds a
    stage config (modelpress.recipe.Recipe.stage: the planner sits below the stages and is handed them)."""
    out = []
    for b in bits:
        m = copy.deepcopy(model)
        stage("quantize", method="rtn", bits=b, group_size=group_size, sym=sym, include=include, exclude=exclude).apply(m)
        out.append((float(b), metric(m)))
        del m
    return tuple(out)


def _check(calib, metric, repeats: int, windows: int) -> str:
    """Validate a planner's repeats against the calibration text; the metric's name."""
    if repeats < 1:
        raise UserError(f"order repeats must be >= 1, got {repeats}")
    if metric is not None:
        return getattr(metric, "__name__", "loss")
    if calib is None:
        raise UserError("order: auto / measured needs calibration text to score stages: add a `calibration:` block")
    n = calib.input_ids.shape[0]
    if n < repeats * windows + 1:
        raise UserError(f"order: {repeats} repeat(s) x {windows} scoring windows need at least "
                        f"{repeats * windows + 1} calibration samples, got {n}: add samples or lower windows")
    return "KL"


def _repeat(model: nn.Module, calib, metric, r: int, windows: int, seqlen: int, samples: int):
    """(metric, calibration subset) of repeat r: by default KL to `model` on the r-th block of `windows`
    sequences from the end, the stages calibrated on up to `samples` of the other sequences."""
    n = calib.input_ids.shape[0] if calib is not None else 0
    if metric is not None:
        return metric, (_subset(calib, list(range(n)), samples) if calib is not None else None)
    held = list(range(n - (r + 1) * windows, n - r * windows))
    return (kl_metric(model, calib.input_ids[held, :seqlen]),
            _subset(calib, [i for i in range(n) if i not in held], samples))


def plan_order(model: nn.Module, recipe, calib=None, metric: Callable[[nn.Module], float] | None = None,
               windows: int = 4, seqlen: int = 256, samples: int = 16, bits: Sequence[int] = CURVE_BITS,
               group_size: int | None = 64, curve: tuple[tuple[float, float], ...] | None = None,
               repeats: int = 1) -> OrderPlan:
    """Measure every stage's intensity alone (on deep copies; `model` is not modified) and order them
    weaker first. metric(compressed copy) -> loss; default: KL to `model` on `windows` calibration
    sequences (first `seqlen` tokens): repeat r scores the r-th block of `windows` sequences from the end.
    Calibrated stages see up to `samples` of the other sequences. `repeats` > 1 re-measures everything on
    another block (another calibration subset) and reports the spread (OrderPlan.confidence)."""
    stages = tuple(recipe.stages)
    name = _check(calib, metric, repeats, windows)
    per: list[list[tuple[float, float]]] = [[] for _ in stages]               # (loss, bits) per repeat
    curves = []
    for r in range(repeats):
        m_r, probe = _repeat(model, calib, metric, r, windows, seqlen, samples)
        c_r = curve or reference_curve(model, m_r, recipe.stage, bits, group_size)
        curves.append(c_r)
        cb, cl = [b for b, _ in c_r], [v for _, v in c_r]
        for i, (sname, cfg) in enumerate(stages):
            m = copy.deepcopy(model)
            cfg.apply(m, probe)
            loss = m_r(m)
            del m
            per[i].append((loss, equivalent_bits(cb, cl, loss)))
    out = []
    for i, (sname, cfg) in enumerate(stages):
        bs = [b for _, b in per[i]]
        mb = sum(bs) / len(bs)
        sd = math.sqrt(sum((b - mb) ** 2 for b in bs) / (len(bs) - 1)) if len(bs) > 1 else float("nan")
        out.append(Intensity(i, sname, cfg.describe() if hasattr(cfg, "describe") else sname,
                             sum(v for v, _ in per[i]) / len(bs), mb, REFERENCE_BITS / mb, sd, tuple(bs)))
    curve_mean = tuple((b, sum(c[k][1] for c in curves) / len(curves)) for k, (b, _) in enumerate(curves[0]))
    return OrderPlan(name, curve_mean, tuple(out), weaker_first([s.ratio for s in out]), repeats)


@dataclass(frozen=True)
class JointPlan:
    """Every order of the recipe's stages run end to end on copies, scored by the same metric."""
    metric: str
    names: tuple[str, ...]                        # stage name per stage, recipe order
    described: tuple[str, ...]                    # its config's describe() (the name if none)
    orders: tuple[tuple[int, ...], ...]           # every permutation tried (recipe indices)
    losses: tuple[tuple[float, ...], ...]         # per order, per repeat

    @property
    def order(self) -> tuple[int, ...]:
        """The permutation with the lowest mean loss (ties: the first tried, i.e. the recipe's own)."""
        return min(zip(self.orders, self.losses), key=lambda p: sum(p[1]) / len(p[1]))[0]

    def confidence(self) -> dict:
        """The best order against the runner-up: their loss difference per repeat (runner-up minus best),
        mean, sd, and "outside noise" when mean > 2 sd ("not measured" for one repeat)."""
        ranked = sorted(zip(self.orders, self.losses), key=lambda p: sum(p[1]) / len(p[1]))
        (best, lb), (second, ls) = ranked[0], ranked[1]
        d = [y - x for x, y in zip(lb, ls)]
        mean = sum(d) / len(d)
        sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1)) if len(d) > 1 else float("nan")
        verdict = ("not measured (1 repeat)" if len(d) < 2 else
                   "outside noise" if mean > 2 * sd else "inside noise")
        return {"best": best, "second": second, "diff": mean, "sd": sd, "n": len(d),
                "agree": sum(x > 0 for x in d), "verdict": verdict}

    def table(self) -> str:
        arrow = lambda o: " -> ".join(self.names[i] for i in o)
        lines = [f"{'order':<40} {self.metric + ' (mean)':>12}  per repeat"]
        for o, ls in sorted(zip(self.orders, self.losses), key=lambda p: sum(p[1]) / len(p[1])):
            lines.append(f"{arrow(o):<40} {sum(ls) / len(ls):>12.5g}  " + ", ".join(f"{x:.4g}" for x in ls))
        c = self.confidence()
        sd = f" +- {c['sd']:.3g}" if c["n"] > 1 else ""
        lines.append(f"measured best: {arrow(c['best'])} (stages: "
                     + "; ".join(f"{n}: {d}" for n, d in zip(self.names, self.described)) + ")")
        lines.append(f"runner-up {arrow(c['second'])} loses {c['diff']:.3g}{sd} {self.metric} over {c['n']} "
                     f"repeat(s), {c['agree']}/{c['n']} agree: {c['verdict']}"
                     + (" -- the orders are not told apart by the measurement" if c["verdict"] == "inside noise"
                        else ""))
        return "\n".join(lines)


MAX_JOINT_STAGES = 3


def plan_joint(model: nn.Module, recipe, calib=None, metric: Callable[[nn.Module], float] | None = None,
               windows: int = 4, seqlen: int = 256, samples: int = 16, repeats: int = 1) -> JointPlan:
    """Run the whole recipe in every order of its stages on deep copies of `model` (not modified) and
    score each result (default: KL to `model` on held-back calibration windows, as plan_order does;
    repeat r uses the r-th block of windows and calibrates on the rest). Not the paper's rule: it measures
    the joint outcome the hypothesis tries to predict, at k! pipeline runs for k stages (k <= 3)."""
    stages = tuple(recipe.stages)
    if not 2 <= len(stages) <= MAX_JOINT_STAGES:
        raise UserError(f"order: measured runs every order of the stages: it needs 2..{MAX_JOINT_STAGES} stages, "
                        f"got {len(stages)}: use order: auto (intensity) or as-written")
    name = _check(calib, metric, repeats, windows)
    orders = tuple(itertools.permutations(range(len(stages))))
    losses: list[list[float]] = [[] for _ in orders]
    for r in range(repeats):
        m_r, probe = _repeat(model, calib, metric, r, windows, seqlen, samples)
        for k, o in enumerate(orders):
            m = copy.deepcopy(model)
            for i in o:
                stages[i][1].apply(m, probe)
            losses[k].append(m_r(m))
            del m
            log.info("order %d/%d, repeat %d/%d: %s %s %.5g", k + 1, len(orders), r + 1, repeats,
                     " -> ".join(stages[i][0] for i in o), name, losses[k][-1])
    return JointPlan(name, tuple(n for n, _ in stages),
                     tuple(c.describe() if hasattr(c, "describe") else n for n, c in stages),
                     orders, tuple(tuple(x) for x in losses))


def order_stages(model: nn.Module, recipe, calib=None) -> tuple:
    """The recipe's ((name, config), ...) reordered: weaker first by intensity (`order: auto`, the paper's
    rule) or the best of every order run end to end (`order: measured`); `model` is unchanged."""
    if len(recipe.stages) < 2:
        return tuple(recipe.stages)
    plan = plan_joint(model, recipe, calib) if recipe.order == "measured" else plan_order(model, recipe, calib)
    log.info("planned order:\n%s", plan.table())
    return tuple(recipe.stages[i] for i in plan.order)
