"""Order of compression stages by intensity: the Progressive Intensity Hypothesis ("Prune-then-Quantize
or Quantize-then-Prune?", Kim et al., arXiv 2603.18426) -- weaker perturbations first, stronger later.

Intensity of a stage = its compression-equivalent ratio: apply the stage alone to a copy of the model,
measure its quality loss (mean KL(original || compressed) per token on a few calibration windows), and
map that loss onto the RTN bits -> loss curve measured on the same model and text (8/6/4/3/2 bits,
group 64, asymmetric), by linear interpolation of bits against log(loss):
    b_eq = interp(log L_stage; log L(b), b),   ratio_eq = 16 / b_eq   (against 16-bit weights).
Stages are run in increasing ratio_eq (stable: ties keep the recipe's order). The joint semantics live
in the stages: prune-then-quantize takes scales from surviving weights, quantize-then-prune re-masks
the dequantized weights (QuantLinear.set_keep) so pruned weights stay exactly zero.
"""
from __future__ import annotations

import copy
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
    bits: float                     # compression-equivalent bits
    ratio: float                    # REFERENCE_BITS / bits


@dataclass(frozen=True)
class OrderPlan:
    metric: str
    curve: tuple[tuple[float, float], ...]        # (bits, loss) of the RTN reference
    intensities: tuple[Intensity, ...]            # in recipe order
    order: tuple[int, ...]                        # recipe indices, weaker first

    def table(self) -> str:
        lines = [f"reference: RTN g64 asym, {self.metric} at " +
                 ", ".join(f"w{b:g}={v:.4g}" for b, v in self.curve),
                 f"{'run':>3}  {'recipe':>6}  {'stage':<34} {self.metric:>10} {'eq. bits':>8} {'eq. ratio':>9}"]
        for k, i in enumerate(self.order):
            s = self.intensities[i]
            lines.append(f"{k + 1:>3}  {s.index + 1:>6}  {s.name + ': ' + s.describe:<34} {s.loss:>10.4g} "
                         f"{s.bits:>8.2f} {s.ratio:>8.2f}x")
        moved = self.order != tuple(range(len(self.order)))
        lines.append("order: weaker first" + (" (differs from the recipe)" if moved else " (as written)"))
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


def _subset(calib, n: int):
    from ..calib import CalibrationSet
    return CalibrationSet(calib.input_ids[:n], calib.attention_mask[:n], dict(calib.provenance, subset=n))


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


def plan_order(model: nn.Module, recipe, calib=None, metric: Callable[[nn.Module], float] | None = None,
               windows: int = 4, seqlen: int = 256, samples: int = 16, bits: Sequence[int] = CURVE_BITS,
               group_size: int | None = 64, curve: tuple[tuple[float, float], ...] | None = None) -> OrderPlan:
    """Measure every stage's intensity alone (on deep copies; `model` is not modified) and order them
    weaker first. metric(compressed copy) -> loss; default: KL to `model` on the last `windows`
    calibration sequences (first `seqlen` tokens). Calibrated stages see the first `samples` sequences."""
    stages = tuple(recipe.stages)
    if metric is None:
        if calib is None:
            raise UserError("order: auto needs calibration text to measure stage intensity: add a `calibration:` block")
        metric = kl_metric(model, calib.input_ids[-windows:, :seqlen])
        name = "KL"
    else:
        name = getattr(metric, "__name__", "loss")
    probe = _subset(calib, samples) if calib is not None else None
    curve = curve or reference_curve(model, metric, recipe.stage, bits, group_size)
    cb, cl = [b for b, _ in curve], [v for _, v in curve]
    out = []
    for i, (sname, cfg) in enumerate(stages):
        m = copy.deepcopy(model)
        cfg.apply(m, probe)
        loss = metric(m)
        del m
        b = equivalent_bits(cb, cl, loss)
        out.append(Intensity(i, sname, cfg.describe() if hasattr(cfg, "describe") else sname, loss, b,
                             REFERENCE_BITS / b))
    return OrderPlan(name, tuple(curve), tuple(out), weaker_first([s.ratio for s in out]))


def order_stages(model: nn.Module, recipe, calib=None) -> tuple:
    """The recipe's ((name, config), ...) reordered weaker first (`order: auto`); `model` is unchanged."""
    if len(recipe.stages) < 2:
        return tuple(recipe.stages)
    plan = plan_order(model, recipe, calib)
    log.info("planned order:\n%s", plan.table())
    return tuple(recipe.stages[i] for i in plan.order)
