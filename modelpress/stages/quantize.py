"""Stage `quantize`: weight-only integer quantization of linears by RTN or GPTQ (arXiv 2210.17323).
Prune-then-quantize is handled: on a SparseLinear the scales come from the surviving weights and the
pruned weights stay exactly zero (GPTQ propagates their error)."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from .. import layerwise
from ..algos import gptq as G
from ..algos import quant
from ..errors import UserError
from ..model import set_module
from ..modules import QuantLinear, SparseLinear
from ..targets import Target
from . import _check

log = logging.getLogger("modelpress")


@dataclass(frozen=True)
class Quantize:
    method: str = "gptq"                  # rtn | gptq
    bits: int = 4                         # 2..8
    group_size: int | None = 128          # null = per output channel
    sym: bool = True
    act_order: bool = True                # GPTQ: columns by decreasing H_jj (static groups, as llm-compressor)
    damp: float = 0.01                    # GPTQ: lambda = damp * mean(diag H)
    block_size: int = 128                 # GPTQ lazy-update block
    observer: str = "minmax"              # minmax | mse (clipping search)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ("lm_head",)
    budget: str = "uniform"               # uniform | capability | sensitivity | owl: per-linear integer bits, mean ~ bits
    budget_spread: float | None = None    # how far budgets move from the mean (bits; default 1.0)

    def __post_init__(self):
        _check.choice("quantize", "method", self.method, ("rtn", "gptq"))
        _check.int_range("quantize", "bits", self.bits, 2, 8)
        _check.group_size("quantize", self.group_size)
        _check.float_range("quantize", "damp", self.damp, 0.0, 1.0)
        _check.int_range("quantize", "block_size", self.block_size, 1, 1 << 16)
        _check.choice("quantize", "observer", self.observer, ("minmax", "mse"))
        _check.patterns("quantize", "include", self.include)
        _check.patterns("quantize", "exclude", self.exclude)
        _check.budget("quantize", self.budget, self.budget_spread, 6.0)

    @property
    def needs_calibration(self) -> bool:
        return self.budget != "uniform"

    def budget_map(self, model, calib) -> dict[str, int]:
        """{linear name: bits} planned by modelpress.plan (parameter-weighted mean ~ bits); empty for uniform."""
        if self.budget == "uniform":
            return {}
        from ..plan import budget_map
        return budget_map(model, calib, self.budget, float(self.bits), "bits", self.target, self.budget_spread)

    @property
    def target(self) -> Target:
        return Target(self.include, self.exclude)

    def describe(self) -> str:
        g = f"g{self.group_size}" if self.group_size else "per-channel"
        s = f"{self.method} w{self.bits} {g} {'sym' if self.sym else 'asym'}"
        return s + (f" ({self.budget} budget)" if self.budget != "uniform" else "")

    def quantize_one(self, name: str, lin: torch.nn.Linear, H: torch.Tensor | None) -> tuple[QuantLinear, dict]:
        if isinstance(lin, QuantLinear):
            raise UserError(f"{name} is already quantized: remove the second quantize stage or exclude it")
        _check.plain_or("quantize", name, lin, (SparseLinear,))
        keep = lin.keep if isinstance(lin, SparseLinear) else None
        W = lin.weight.detach().float()
        info: dict = {}
        if self.method == "gptq" and H is not None:
            try:
                r = G.gptq(W, H, self.bits, self.group_size, self.sym, self.damp, self.block_size,
                           self.act_order, keep, self.observer)
                q, s, z = r.q, r.scale, r.zero
                info.update(loss=r.loss, damp=r.damp)
            except G.HessianNotPD as e:
                log.warning("%s: %s; fell back to RTN (add calibration samples or raise quantize.damp)", name, e)
                q, s, z = quant.rtn(W, self.bits, self.group_size, self.sym, keep, self.observer)
                info["fallback"] = "rtn"
        else:
            q, s, z = quant.rtn(W, self.bits, self.group_size, self.sym, keep, self.observer)
        new = QuantLinear.build(lin, q, s, z, self.bits, self.group_size, self.sym, keep)
        info.update(kind="QuantLinear", bits=self.bits, sqnr=quant.sqnr(W, new.weight.float()),
                    sparsity=float((new.weight == 0).float().mean()))
        return new, info

    def apply(self, model, calib=None, checkpoint=None) -> dict:
        names = {id(m): n for n, m in model.named_modules()}
        per = self.budget_map(model, calib)

        def do(linears, stats):
            out = {}
            for name, lin in linears.items():
                cfg = dataclasses.replace(self, bits=per[name], budget="uniform") if name in per else self
                new, info = cfg.quantize_one(name, lin, stats.get(name))
                set_module(model, names[id(lin)], new)
                out[name] = info
            return out

        if self.method == "gptq":
            if calib is None:
                raise UserError("quantize.method gptq needs calibration data: add a `calibration:` block or use rtn")
            layers = layerwise.run(model, calib, self.target, do, collect="hessian", progress=f"GPTQ {self.describe()}",
                                    checkpoint=checkpoint)
        else:
            layers = do(self.target.select(model), {})
        if not layers:
            raise UserError("quantize matched no linear layers: check quantize.include / quantize.exclude")
        sq = [v["sqnr"] for v in layers.values()]
        fb = sum(1 for v in layers.values() if v.get("fallback"))
        summary = (f"quantize {self.describe()}: {len(layers)} linears, mean SQNR {sum(sq) / len(sq):.2f} dB"
                   + (f", {fb} fell back to RTN" if fb else ""))
        return {"summary": summary, "layers": layers}
