"""Stage `lowrank`: factor selected linears into two thin ones, W ~= A B, by truncated SVD or by
activation-aware (whitened) SVD with the calibration input covariance (SVD-LLM, arXiv 2403.07378; ASVD,
arXiv 2312.05821). Rank per matrix by energy threshold, parameter budget, or fixed. A matrix whose rank would
not save parameters (r (rows + cols) >= rows cols) stays dense."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..engine import layerwise
from ..algos import lowrank as LR
from ..algos import quant
from ..errors import UserError
from ..model import set_module
from ..modules.lowrank import LowRankLinear
from ..targets import Target
from . import _check


@dataclass(frozen=True)
class LowRank:
    method: str = "asvd"                  # svd | asvd (whitened by the calibration input covariance)
    rank_by: str = "energy"               # energy | budget | fixed
    energy: float = 0.95                  # rank_by energy: fraction of sum s_i^2 kept (whitened for asvd)
    budget: float = 0.5                   # rank_by budget: r (rows + cols) <= budget * rows * cols
    rank: int = 64                        # rank_by fixed (capped at min(rows, cols))
    damp: float = 0.01                    # asvd: lambda = damp * mean(diag H) before the Cholesky
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ("lm_head",)

    def __post_init__(self):
        _check.choice("lowrank", "method", self.method, ("svd", "asvd"))
        _check.choice("lowrank", "rank_by", self.rank_by, ("energy", "budget", "fixed"))
        _check.float_range("lowrank", "energy", self.energy, 0.0, 1.0)
        if self.energy <= 0:
            raise UserError(f"lowrank.energy must be a number in (0, 1], got {self.energy!r}")
        _check.float_range("lowrank", "budget", self.budget, 0.0, 1.0, hi_open=True)
        if self.budget <= 0:
            raise UserError(f"lowrank.budget must be a number in (0, 1), got {self.budget!r}")
        _check.int_range("lowrank", "rank", self.rank, 1, 1 << 20)
        _check.float_range("lowrank", "damp", self.damp, 0.0, 1.0)
        _check.patterns("lowrank", "include", self.include)
        _check.patterns("lowrank", "exclude", self.exclude)

    @property
    def target(self) -> Target:
        return Target(self.include, self.exclude)

    @property
    def needs_calibration(self) -> bool:
        return self.method == "asvd"

    def describe(self) -> str:
        how = {"energy": f"energy {self.energy:g}", "budget": f"budget {self.budget:g}",
               "fixed": f"rank {self.rank}"}[self.rank_by]
        return f"{self.method} {how}"

    def choose_rank(self, S: torch.Tensor, rows: int, cols: int) -> int:
        if self.rank_by == "energy":
            return LR.rank_for_energy(S, self.energy)
        if self.rank_by == "budget":
            return min(len(S), LR.rank_for_budget(rows, cols, self.budget))
        return min(len(S), self.rank)

    def factor_one(self, name: str, lin: nn.Linear, H: torch.Tensor | None) -> tuple[nn.Module, dict]:
        if type(lin) is not nn.Linear:
            raise UserError(f"{name} is already compressed ({type(lin).__name__}): put lowrank first or exclude it")
        W = lin.weight.detach().float()
        rows, cols = W.shape
        L = None
        if self.method == "asvd":
            try:
                L = LR.whitener(H, self.damp)
            except ValueError as e:
                raise UserError(f"{name}: {e}; add calibration samples or raise lowrank.damp") from None
        U, S, Vh = LR.svd_of(W, L)
        r = self.choose_rank(S, rows, cols)
        e = S.double() ** 2
        info = {"rank": r, "energy_kept": float(e[:r].sum() / e.sum().clamp(min=1e-300)),
                "params_fraction": r * (rows + cols) / (rows * cols)}
        if r * (rows + cols) >= rows * cols:
            info.update(kind="Linear", skipped="rank saves no parameters", sqnr=float("inf"))
            return lin, info
        A, B = LR.factors(U, S, Vh, r, L)
        new = LowRankLinear.build(lin, A, B)
        W_hat = new.weight.detach().float()
        info.update(kind="LowRankLinear", sqnr=quant.sqnr(W, W_hat))
        if H is not None:
            info["rel_output_error"] = LR.output_error(W, W_hat, H) / max(LR.output_error(W, torch.zeros_like(W), H), 1e-300)
        return new, info

    def apply(self, model, calib=None) -> dict:
        names = {id(m): n for n, m in model.named_modules()}

        def do(linears, stats):
            out = {}
            for name, lin in linears.items():
                new, info = self.factor_one(name, lin, stats.get(name))
                if new is not lin:
                    set_module(model, names[id(lin)], new)
                out[name] = info
            return out

        if self.method == "asvd":
            if calib is None:
                raise UserError("lowrank.method asvd needs calibration data: add a `calibration:` block or use svd")
            layers = layerwise.run(model, calib, self.target, do, collect="hessian", progress=f"lowrank {self.describe()}")
        else:
            layers = do(self.target.select(model), {})
        if not layers:
            raise UserError("lowrank matched no linear layers: check lowrank.include / lowrank.exclude")
        done = [v for v in layers.values() if v["kind"] == "LowRankLinear"]
        frac = sum(v["params_fraction"] for v in done) / len(done) if done else 1.0
        summary = (f"lowrank {self.describe()}: {len(done)} of {len(layers)} linears factored, mean parameter "
                   f"fraction {frac:.3f}, mean rank {sum(v['rank'] for v in done) / max(len(done), 1):.1f}")
        return {"summary": summary, "layers": layers}
