"""Stage `prune`: magnitude, Wanda (arXiv 2306.11695) or SparseGPT (arXiv 2301.00774), unstructured
or N:M; SparseGPT can quantize the survivors jointly (bits set). Pruning a quantized layer
(quantize-then-prune) masks its dequantized weights so pruned weights are exactly zero; with SparseGPT the
surviving weights also take the OBS update, snapped back onto the layer's own grid (its scales and zero
points are kept: the layer stays the same QuantLinear, with fewer weights).

`budget: capability` plans one sparsity per attention head and MLP ("Capability-Guided Compression", arXiv
2603.16440) and applies each head's sparsity to its own weights: block masks inside q/k/v (row groups) and
o_proj (column groups), modelpress.algos.prune. `structured: heads` lets a head's budget reach 1.0: that
head's q rows and o_proj columns are all zeroed (recorded in the stats as removed_heads; the config keeps
its head count, see modelpress.plan.budget)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..engine import layerwise
from ..algos import prune as P
from ..algos import quant
from ..errors import UserError
from ..model import set_module
from ..modules import QuantLinear, SparseLinear
from ..targets import Target
from . import _check


@dataclass(frozen=True)
class Prune:
    method: str = "wanda"                 # magnitude | wanda | sparsegpt
    sparsity: float = 0.5                 # fraction of zeros; implied by an N:M pattern
    pattern: str = "unstructured"         # unstructured | N:M (at most N non-zeros per M), e.g. 2:4, 4:8
    bits: int | None = None               # sparsegpt only: quantize survivors jointly
    group_size: int | None = 128
    sym: bool = True
    damp: float = 0.01
    block_size: int = 128
    sequential: bool = True               # wanda/sparsegpt: one input group at a time within a layer, one forward pass per layer (layerwise.run)
    calib_dtype: str = "auto"             # auto | float32 | bfloat16: the calibration forward passes' autocast dtype
                                          # (auto: bf16 where GEMMs are native bf16; weights, statistics, solves: fp32)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ("lm_head",)
    budget: str = "uniform"               # uniform | capability | sensitivity | owl: per-linear sparsities, mean = sparsity
    budget_spread: float | None = None    # how far budgets move from the mean (sparsity units; default 0.1)
    structured: str = "none"              # none | heads (budget capability: a head may get sparsity 1.0 = removed)

    def __post_init__(self):
        _check.choice("prune", "method", self.method, ("magnitude", "wanda", "sparsegpt"))
        nm = _check.sparsity_pattern("prune", self.sparsity, self.pattern)
        if self.bits is not None:
            if self.method != "sparsegpt":
                raise UserError("prune.bits (joint quantization) needs prune.method sparsegpt: add a quantize stage instead")
            _check.int_range("prune", "bits", self.bits, 2, 8)
        _check.group_size("prune", self.group_size)
        _check.float_range("prune", "damp", self.damp, 0.0, 1.0)
        _check.flag("prune", "sequential", self.sequential)
        _check.choice("prune", "calib_dtype", self.calib_dtype, ("auto", "float32", "bfloat16"))
        _check.patterns("prune", "include", self.include)
        _check.patterns("prune", "exclude", self.exclude)
        _check.budget("prune", self.budget, self.budget_spread, 1.0)
        _check.choice("prune", "structured", self.structured, ("none", "heads"))
        if self.structured == "heads" and self.budget != "capability":
            raise UserError(f"prune.structured heads needs budget capability (per-head budgets), got budget "
                            f"{self.budget}: set budget: capability or structured: none")
        if self.budget != "uniform" and nm:
            raise UserError(f"prune.budget {self.budget} needs pattern unstructured ({self.pattern} fixes every "
                            "layer's sparsity): set budget: uniform or pattern: unstructured")

    @property
    def needs_calibration(self) -> bool:
        return self.budget != "uniform"

    def budget_map(self, model, calib) -> dict[str, float]:
        """{linear name: sparsity} planned by modelpress.plan (mean = sparsity); empty for budget uniform."""
        if self.budget == "uniform":
            return {}
        from ..plan import budget_map
        return budget_map(model, calib, self.budget, self.sparsity, "sparsity", self.target, self.budget_spread)

    def budget_specs(self, model, calib) -> tuple[dict[str, torch.Tensor], dict[int, list[int]]]:
        """({linear name: sparsity spec (R, G)}, {layer: removed heads}) planned by modelpress.plan; per-head
        groups for budget capability, one number per linear for the others; empty for budget uniform."""
        if self.budget == "uniform":
            return {}, {}
        from ..plan import budget_specs
        kw = {"head_hi": 1.0} if self.structured == "heads" else {}
        specs, plan = budget_specs(model, calib, self.budget, self.sparsity, self.target, self.budget_spread, **kw)
        return specs, plan.removed_heads()

    @property
    def target(self) -> Target:
        return Target(self.include, self.exclude)

    def describe(self) -> str:
        s = f"{self.method} {self.pattern if self.pattern != 'unstructured' else f'{self.sparsity:.0%}'}"
        s += f" + w{self.bits} g{self.group_size}" if self.bits else ""
        s += f" ({self.budget} budget)" if self.budget != "uniform" else ""
        return s + (", structured heads" if self.structured == "heads" else "")

    def prune_one(self, name: str, lin: torch.nn.Linear, stat: torch.Tensor | None,
                  in_place: bool = False, spec: torch.Tensor | None = None) -> tuple[torch.nn.Module, dict]:
        """in_place: the new module's dense weight reuses lin's storage (lin shares it with nothing).
        spec: block sparsities (R, G) of the weight's row x column groups (per-head budgets) instead of
        one sparsity."""
        sp = self.sparsity if spec is None else spec
        _check.plain_or("prune", name, lin, (SparseLinear, QuantLinear))
        W = lin.weight.detach().float()       # may alias lin.weight: read before any in-place write
        bits, gs, sym = self.bits, self.group_size, self.sym      # joint quantization (SparseGPT with bits)
        if self.method == "sparsegpt" and stat is not None:
            grid = None
            if isinstance(lin, QuantLinear):   # after quantize: the OBS updates of the survivors snap to the
                # layer's own grid (its scales and zero points): it stays the QuantLinear it was, with fewer weights
                if lin.fmt is not None or getattr(lin, "bits_map", None) is not None or self.bits:
                    raise UserError(f"prune.method sparsegpt after quantize needs {name} on one int grid (no k-quant "
                                    "format, no mixed widths) and no prune.bits: put prune before quantize")
                bits, gs, sym, grid = lin.bits, lin.group_size, lin.sym, (lin.scale.float(), lin.zero.float())
            W_hat, keep, qparams = P.sparsegpt(W, stat, sp, self.pattern, self.block_size, self.damp, bits, gs, sym,
                                               grid=grid)
            if grid is not None and lin.keep is not None:
                keep = keep & lin.keep.to(keep.device)
            if qparams is not None:
                W_hat = quant.dequantize_groups(*qparams, gs, keep)
            W_hat = W_hat.to(lin.weight.dtype)
        else:
            keep = (P.wanda_mask(W, stat, sp, self.pattern) if self.method == "wanda"
                    else P.magnitude_mask(W, sp, self.pattern))
            W_hat, qparams = None, None
        if W_hat is None:                      # = what set_keep / from_linear will hold
            W_hat = lin.weight.detach() * keep.to(lin.weight.device)
        info = {"sparsity": P.sparsity(W_hat), "sqnr": quant.sqnr(W, W_hat.float())}   # before any in-place write
        if qparams is not None:                # SparseGPT with joint quantization, or on the layer's own grid
            new = QuantLinear.build(lin, *qparams, bits, gs, sym, keep, W_hat, in_place)
        elif isinstance(lin, QuantLinear):
            lin.set_keep(keep)
            new = lin
        else:
            new = SparseLinear.from_linear(lin, keep, in_place, weight=W_hat)
        return new, {"kind": type(new).__name__, **info}

    def apply(self, model, calib=None, checkpoint=None) -> dict:
        names = {id(m): n for n, m in model.named_modules()}
        per, removed = self.budget_specs(model, calib)
        shared = _check.shared_storages(model)

        def do(linears, stats):
            out = {}
            for name, lin in linears.items():       # one at a time: each solve's memory is gone before the next
                spec = per.get(name)
                if spec is not None and spec.numel() == 1:      # one number: the plain path at that sparsity
                    cfg, spec = dataclasses.replace(self, sparsity=float(spec), budget="uniform",
                                                    structured="none"), None
                else:
                    cfg = self
                new, info = cfg.prune_one(name, lin, stats.get(name), lin.weight.data_ptr() not in shared, spec)
                if spec is not None:
                    info["spec"] = [round(float(v), 4) for v in spec.reshape(-1)]
                if new is not lin:
                    set_module(model, names[id(lin)], new)
                out[name] = info
            return out

        collect = {"wanda": "input_sq_norm", "sparsegpt": "hessian"}.get(self.method)
        amp = layerwise.autocast_dtype(self.calib_dtype, model)
        if collect:
            if calib is None:
                raise UserError(f"prune.method {self.method} needs calibration data: add a `calibration:` block "
                                "or use magnitude")
            layers = layerwise.run(model, calib, self.target, do, collect=collect, progress=f"prune {self.describe()}",
                                    checkpoint=checkpoint, sequential=self.sequential, amp=amp)
        else:
            layers = do(self.target.select(model), {})
        if not layers:
            raise UserError("prune matched no linear layers: check prune.include / prune.exclude")
        total = sum(v["sparsity"] * 1 for v in layers.values()) / len(layers)
        heads = "" if not removed else f", removed heads {sum(len(v) for v in removed.values())} (zeroed)"
        nm = P.parse_pattern(self.pattern)
        valid = "" if not nm else (", N:M valid" if all(
            P.is_nm(model.get_submodule(n).weight, *nm) for n in layers) else ", N:M VIOLATED")
        bf16 = ", bf16 calibration forward" if amp is not None and collect else ""
        return {"summary": f"prune {self.describe()}: sparsity {total:.3f} (target {self.sparsity:.3f}){valid}{bf16}"
                           f"{heads}", "layers": layers, **({"removed_heads": removed} if removed else {})}
