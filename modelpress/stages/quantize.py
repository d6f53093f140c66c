"""Stage `quantize`: weight-only integer quantization of linears by RTN or GPTQ (arXiv 2210.17323).
Prune-then-quantize is handled: on a SparseLinear the scales come from the surviving weights and the
pruned weights stay exactly zero (GPTQ propagates their error).

`budget:` gives linears different whole-bit widths at the same parameter-weighted mean (modelpress.plan.bit_specs).
`budget: capability` ("Capability-Guided Compression", arXiv 2603.16440) plans one width per attention head:
the q rows of head h, the k/v rows of its KV group (GQA: the group's heads combined by the weights each owns)
and, where the scale groups fit inside a head, the o_proj input columns of head h get head h's width, inside
one QuantLinear (bits_map). RTN and GPTQ quantize each row on its own row's grids (a column group's width per
column for o_proj): GPTQ's rows are independent given H, so rows with the same widths are one GPTQ problem
(one call per distinct row pattern), and within a row the error feedback runs over columns whatever each
column's width. Achieved mean: within half the largest block's share of the weights of `bits`
(plan.round_bit_specs), printed in the summary."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from ..engine import layerwise
from ..algos import gptq as G
from ..algos import kquant as K
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
    bits: int | float = 4                 # 2..8; with a budget the mean, fractional allowed (3.5: mixed 3/4-bit)
    group_size: int | None = 128          # null = per output channel
    sym: bool = True
    act_order: bool = True                # GPTQ: columns by decreasing H_jj (static groups, as llm-compressor)
    damp: float = 0.01                    # GPTQ: lambda = damp * mean(diag H)
    block_size: int = 128                 # GPTQ lazy-update block
    observer: str = "minmax"              # minmax | mse (clipping search) | hessian (GPTQ: search weighted by diag H)
    refit_scales: bool = False            # GPTQ: re-solve each group's scale for the final codes (least squares under H;
                                          # helps minmax/mse scales, not hessian ones: BENCHMARKS.md)
    sequential: bool = True               # GPTQ: one input group at a time within a layer, one forward pass per layer (layerwise.run)
    calib_dtype: str = "auto"             # auto | float32 | bfloat16: the calibration forward passes' autocast dtype
                                          # (auto: bf16 where GEMMs are native bf16; weights, statistics, solves: fp32)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ("lm_head",)
    budget: str = "uniform"               # uniform | capability | sensitivity | owl: per-linear integer bits, mean ~ bits
    budget_spread: float | None = None    # how far budgets move from the mean (bits; default 1.0)
    format: str = "int"                   # int | q4_k | q5_k | q6_k: codes and scales on llama.cpp's k-quant grid
                                          # (algos/kquant.py; sets group_size/sym to the format's sub-block; linears
                                          # whose inputs are not a multiple of 256 keep the int grid, same bits/group)
                                          # | q4_0 | q5_0 | q8_0: symmetric group 32 with llama.cpp's signed scale
                                          # (the block's largest-magnitude weight on code -2^(b-1); algos/quant.py)
    kquant_fallback: str = "int"          # format q*_k, linears whose inputs are not a multiple of 256: int = the int
                                          # grid at the format's bits and sub-block (q4_k -> 4-bit g32 asym = Q4_1) |
                                          # llama = the type llama-quantize falls back to (q4_k -> q5_0, q5_k -> 5-bit
                                          # g32 asym = Q5_1, q6_k -> q8_0): its file size, one more bit on those linears

    def __post_init__(self):
        _check.choice("quantize", "method", self.method, ("rtn", "gptq"))
        if self.budget == "uniform" and isinstance(self.bits, float) and 2 <= self.bits <= 8:
            raise UserError(f"quantize.bits {self.bits} is a mean width, which needs a budget: set budget capability, "
                            "sensitivity or owl, or give integer bits")
        if self.budget == "uniform" or isinstance(self.bits, int):
            _check.int_range("quantize", "bits", self.bits, 2, 8)
        else:                                 # a budget's parameter-weighted mean width
            _check.float_range("quantize", "bits", self.bits, 2.0, 8.0)
        _check.group_size("quantize", self.group_size)
        _check.float_range("quantize", "damp", self.damp, 0.0, 1.0)
        _check.int_range("quantize", "block_size", self.block_size, 1, 1 << 16)
        _check.choice("quantize", "observer", self.observer, quant.OBSERVERS)
        if self.observer == "hessian" and self.method != "gptq":
            raise UserError("quantize.observer hessian weighs the clipping search by calibration statistics: "
                            "use it with method gptq, or observer mse with rtn")
        _check.flag("quantize", "refit_scales", self.refit_scales)
        _check.flag("quantize", "sequential", self.sequential)
        _check.choice("quantize", "calib_dtype", self.calib_dtype, ("auto", "float32", "bfloat16"))
        _check.patterns("quantize", "include", self.include)
        _check.patterns("quantize", "exclude", self.exclude)
        _check.budget("quantize", self.budget, self.budget_spread, 6.0)
        _check.choice("quantize", "format", self.format, ("int", *K.FORMATS, *quant.SIGNED_FORMATS))
        _check.choice("quantize", "kquant_fallback", self.kquant_fallback, ("int", "llama"))
        if self.kquant_fallback != "int" and self.format not in K.FORMATS:
            raise UserError(f"quantize.kquant_fallback {self.kquant_fallback} chooses what k-quant formats write where a "
                            f"row is not whole super-blocks; format is {self.format}: set format q4_k, q5_k or q6_k, or "
                            "kquant_fallback: int")
        if self.format in quant.SIGNED_FORMATS:
            b = quant.SIGNED_FORMATS[self.format]
            if self.bits != b or self.budget != "uniform":
                raise UserError(f"quantize.format {self.format} stores {b}-bit codes: set bits: {b} and budget: "
                                "uniform (or format: int)")
            object.__setattr__(self, "group_size", 32)
            object.__setattr__(self, "sym", True)
        elif self.format != "int":
            f = K.FORMATS[self.format]
            if self.bits != f.bits or self.budget != "uniform" or self.refit_scales:
                raise UserError(f"quantize.format {self.format} stores {f.bits}-bit codes on fixed grid scales: set "
                                f"bits: {f.bits}, budget: uniform and refit_scales: false (or format: int)")
            object.__setattr__(self, "group_size", f.sub)
            object.__setattr__(self, "sym", f.sym)

    @property
    def needs_calibration(self) -> bool:
        return self.budget != "uniform"

    def budget_specs(self, model, calib) -> dict[str, torch.Tensor]:
        """{linear name: whole-bit widths (R, G) int64 of its row x column blocks} planned by modelpress.plan.bit_specs
        (parameter-weighted mean ~ bits; per head for capability, (1, 1) otherwise); empty for uniform."""
        if self.budget == "uniform":
            return {}
        from ..plan import bit_specs
        return bit_specs(model, calib, self.budget, float(self.bits), self.target, self.budget_spread,
                         self.group_size)[0]

    def budget_map(self, model, calib) -> dict[str, float]:
        """{linear name: mean width} of budget_specs (an integer for linears of one width)."""
        return {n: float(sp.double().mean()) for n, sp in self.budget_specs(model, calib).items()}

    @property
    def signed(self) -> bool:
        """Symmetric scales signed as llama.cpp's Q4_0/Q5_0/Q8_0 (format q4_0 | q5_0 | q8_0)."""
        return self.format in quant.SIGNED_FORMATS

    @property
    def target(self) -> Target:
        return Target(self.include, self.exclude)

    def describe(self) -> str:
        g = f"g{self.group_size}" if self.group_size else "per-channel"
        s = f"{self.method} w{self.bits} {g} {'sym' if self.sym else 'asym'}"
        s += f" ({self.format} grid)" if self.format != "int" else ""
        return s + (f" ({self.budget} budget)" if self.budget != "uniform" else "")

    def quantize_group(self, items: list[tuple[str, torch.nn.Linear]], H: torch.Tensor | None,
                       in_place: bool = False, bits_maps: dict[str, torch.Tensor] | None = None
                       ) -> dict[str, tuple[QuantLinear, dict]]:
        """Quantize linears that read the same input (one Hessian H, or none for RTN). With GPTQ their
        rows are stacked into one problem: one Cholesky and one column loop (rows are independent given
        H, so the codes are those of one call per linear). bits_maps: {name: (R, G) widths} for linears with
        mixed widths (the others get self.bits); rows are then grouped by their widths, one problem each."""
        bits_maps = bits_maps or {}
        for name, lin in items:
            if isinstance(lin, QuantLinear):
                raise UserError(f"{name} is already quantized: remove the second quantize stage or exclude it")
            _check.plain_or("quantize", name, lin, (SparseLinear,))
        if self.format in K.FORMATS and self.kquant_fallback == "llama" and not K.fits(items[0][1].weight.shape[1]):
            fmt, bits, group, sym = K.LLAMA_FALLBACK[self.format]
            cfg = dataclasses.replace(self, format=fmt, bits=bits, group_size=group, sym=sym, kquant_fallback="int")
            return cfg.quantize_group(items, H, in_place, bits_maps)
        Ws = [lin.weight.detach().float() for _, lin in items]          # (rows_i, cols) each
        keeps = [lin.keep if isinstance(lin, SparseLinear) else None for _, lin in items]
        res: list[tuple] = []
        if self.format in K.FORMATS and K.fits(Ws[0].shape[1]):
            if any(k is not None for k in keeps):
                raise UserError(f"quantize.format {self.format}: {items[0][0]} is pruned, and a k-quant grid cannot "
                                "hold pruned weights at exactly 0: use format int after pruning")
            return self._kquant_group(items, Ws, H, in_place)
        if bits_maps:
            res = self._mixed_group(items, Ws, keeps, H, bits_maps)
        elif self.method == "gptq" and H is not None:
            try:
                keep = None if all(k is None for k in keeps) else torch.cat(
                    [torch.ones_like(W, dtype=torch.bool) if k is None else k for W, k in zip(Ws, keeps)])
                r = G.gptq(torch.cat(Ws) if len(Ws) > 1 else Ws[0], H, self.bits, self.group_size, self.sym,
                           self.damp, self.block_size, self.act_order, keep, self.observer, self.refit_scales,
                           signed=self.signed)
                rows = [W.shape[0] for W in Ws]
                for q, sc, z, rl, wh in zip(r.q.split(rows), r.scale.split(rows), r.zero.split(rows),
                                            r.row_loss.split(rows), r.w_hat.split(rows)):
                    res.append((q, sc, z, {"loss": float(rl.sum()), "damp": r.damp, "w_hat": wh}))
            except G.HessianNotPD as e:
                log.warning("%s: %s; fell back to RTN (add calibration samples or raise quantize.damp)",
                            ", ".join(n for n, _ in items), e)
                obs = "mse" if self.observer == "hessian" else self.observer
                res = [(*quant.rtn(W, self.bits, self.group_size, self.sym, k, obs, self.signed), {"fallback": "rtn"})
                       for W, k in zip(Ws, keeps)]
        else:
            res = [(*quant.rtn(W, self.bits, self.group_size, self.sym, k, self.observer, self.signed), {})
                   for W, k in zip(Ws, keeps)]
        out = {}
        for (name, lin), W, k, (q, sc, z, info) in zip(items, Ws, keeps, res):
            w_hat = info.pop("w_hat", None)                                                      # (rows, cols)
            w_hat = (quant.dequantize_groups(q, sc, z, self.group_size, k) if w_hat is None else w_hat).to(lin.weight.dtype)
            info.update(kind="QuantLinear", bits=self.bits, sqnr=quant.sqnr(W, w_hat.float()))
            bm = bits_maps.get(name)
            if bm is not None:                 # the mean width and the (R, G) widths of its blocks
                info.update(bits=float(bm.double().mean()), widths=bm.tolist())
            if k is not None:                  # sparsity from the pruning mask only, not weights that rounded to 0
                info["sparsity"] = 1.0 - float(k.float().mean())
            # W may alias lin.weight (fp32): everything above reads it before the in-place write below
            out[name] = (QuantLinear.build(lin, q, sc, z, self.bits, self.group_size, self.sym, k, w_hat, in_place,
                                           bits_map=bm), info)
        return out

    def _mixed_group(self, items, Ws, keeps, H, bits_maps) -> list[tuple]:
        """quantize_group's codes for linears with per-block widths: every stacked row's widths per scale group
        (modules.quant.group_bits), rows with the same widths solved together (GPTQ: one call per pattern, the
        same codes as one call per row since rows are independent given H), results put back in row order.
        Returns [(q, scale, zero, info)] per item."""
        from ..modules.quant import group_bits
        cols = Ws[0].shape[1]
        ng = quant.n_groups(cols, self.group_size)
        GB = torch.cat([group_bits(bits_maps[n], W.shape[0], cols, self.group_size).long() if n in bits_maps
                        else torch.full((W.shape[0], ng), self.bits, dtype=torch.long)
                        for (n, _), W in zip(items, Ws)])                                   # (rows, ng)
        W = torch.cat(Ws)                                                                   # (rows, cols)
        keep = None if all(k is None for k in keeps) else torch.cat(
            [torch.ones_like(w, dtype=torch.bool) if k is None else k.bool() for w, k in zip(Ws, keeps)])
        pats, inv = torch.unique(GB, dim=0, return_inverse=True)
        Q = torch.empty(W.shape, dtype=torch.uint8)
        S, Z, WH = torch.empty(W.shape[0], ng), torch.empty(W.shape[0], ng), torch.empty(W.shape)
        RL = torch.zeros(W.shape[0])
        info: dict = {}

        def solve(gptq: bool) -> None:
            for k, pat in enumerate(pats):
                idx = (inv == k).nonzero().view(-1)
                b = int(pat[0]) if bool((pat == pat[0]).all()) else pat               # int, or widths (ng,)
                kk = None if keep is None else keep[idx]
                if gptq:
                    r = G.gptq(W[idx], H, b, self.group_size, self.sym, self.damp, self.block_size, self.act_order,
                               kk, self.observer, self.refit_scales)
                    q, s, z, wh = r.q, r.scale, r.zero, r.w_hat
                    RL[idx], info["damp"] = r.row_loss.cpu(), r.damp
                else:
                    obs = "mse" if self.observer == "hessian" else self.observer
                    q, s, z = quant.rtn(W[idx], b, self.group_size, self.sym, kk, obs)
                    wh = quant.dequantize_groups(q, s, z, self.group_size, kk)
                Q[idx], S[idx], Z[idx], WH[idx] = q.cpu(), s.cpu(), z.cpu(), wh.cpu()

        if self.method == "gptq" and H is not None:
            try:
                solve(True)
            except G.HessianNotPD as e:
                log.warning("%s: %s; fell back to RTN (add calibration samples or raise quantize.damp)",
                            ", ".join(n for n, _ in items), e)
                info = {"fallback": "rtn"}
                solve(False)
        else:
            solve(False)
        out, r0 = [], 0
        for w in Ws:
            sl = slice(r0, r0 + w.shape[0])
            r0 += w.shape[0]
            extra = {"loss": float(RL[sl].sum()), "damp": info["damp"]} if "damp" in info else dict(info)
            dev = w.device
            out.append((Q[sl].to(dev), S[sl].to(dev), Z[sl].to(dev), {**extra, "w_hat": WH[sl].to(dev)}))
        return out

    def _kquant_group(self, items, Ws, H, in_place: bool) -> dict[str, tuple[QuantLinear, dict]]:
        """quantize_group on the k-quant grid: the observer's sub-block params snapped (K.params), then GPTQ's (or
        round-to-nearest) codes on that grid; stacked rows as in quantize_group."""
        W = torch.cat(Ws) if len(Ws) > 1 else Ws[0]
        rows = [w.shape[0] for w in Ws]
        info: dict = {}
        p = None
        if self.method == "gptq" and H is not None:
            try:
                p = K.params(W, self.format, self.observer, torch.diag(H).float())
                r = G.gptq(W, H, self.bits, self.group_size, self.sym, self.damp, self.block_size, self.act_order,
                           grid=p.scale_zero())
                q, info = r.q, {"damp": r.damp}
            except G.HessianNotPD as e:
                log.warning("%s: %s; fell back to RTN", ", ".join(n for n, _ in items), e)
                info, p = {"fallback": "rtn"}, None
        if p is None:
            q, p = K.rtn(W, self.format, "mse" if self.observer == "hessian" else self.observer)
        out, r0 = {}, 0
        for (name, lin), Wi, n in zip(items, Ws, rows):
            sl = slice(r0, r0 + n)
            r0 += n
            kp = K.KParams(p.fmt, p.d[sl], p.sc[sl], p.dmin[sl], p.m[sl])
            qi = q[sl]
            w_hat = K.dequantize(qi, kp)                                                          # (n, cols)
            stats = dict(info, kind="QuantLinear", bits=self.bits, format=self.format, sqnr=quant.sqnr(Wi, w_hat))
            s, z = kp.scale_zero()
            out[name] = (QuantLinear.build(lin, qi, s, z, self.bits, self.group_size, self.sym, None,
                                           w_hat.to(lin.weight.dtype), in_place, kparams=kp), stats)
        return out

    def quantize_one(self, name: str, lin: torch.nn.Linear, H: torch.Tensor | None) -> tuple[QuantLinear, dict]:
        return self.quantize_group([(name, lin)], H)[name]

    def apply(self, model, calib=None, checkpoint=None) -> dict:
        names = {id(m): n for n, m in model.named_modules()}
        per = self.budget_specs(model, calib)       # {name: (R, G) widths}
        mixed = {n: sp for n, sp in per.items() if len(torch.unique(sp)) > 1}
        shared = _check.shared_storages(model)

        def do(linears, stats):
            groups: dict[tuple, list] = {}     # (config, id of the Hessian) -> [(name, linear)]
            for name, lin in linears.items():
                b = int(per[name].max()) if name in per else self.bits if isinstance(self.bits, int) else round(self.bits)
                cfg = dataclasses.replace(self, bits=b, budget="uniform") if b != self.bits or name in per else self
                H = stats.get(name)
                groups.setdefault((cfg, id(H) if H is not None else name), []).append((name, lin))
            out = {}
            for (cfg, _), items in groups.items():     # one at a time: each solve's memory is gone before the next
                in_place = all(lin.weight.data_ptr() not in shared for _, lin in items)
                maps = {n: mixed[n] for n, _ in items if n in mixed}
                for name, (new, info) in cfg.quantize_group(items, stats.get(items[0][0]), in_place, maps).items():
                    set_module(model, names[id(linears[name])], new)
                    out[name] = info
            return out

        amp = layerwise.autocast_dtype(self.calib_dtype, model)
        if self.method == "gptq":
            if calib is None:
                raise UserError("quantize.method gptq needs calibration data: add a `calibration:` block or use rtn")
            layers = layerwise.run(model, calib, self.target, do, collect="hessian", progress=f"GPTQ {self.describe()}",
                                    checkpoint=checkpoint, sequential=self.sequential, amp=amp)
        else:
            layers = do(self.target.select(model), {})
        if not layers:
            raise UserError("quantize matched no linear layers: check quantize.include / quantize.exclude")
        sq = [v["sqnr"] for v in layers.values()]
        fb = sum(1 for v in layers.values() if v.get("fallback"))
        ach = ""
        if per:                                # achieved parameter-weighted mean width over the budgeted linears
            nw = {n: m.weight.numel() for n, m in model.named_modules() if n in per and hasattr(m, "weight")}
            mean = sum(float(per[n].double().mean()) * nw[n] for n in nw) / max(1, sum(nw.values()))
            ach = f", {len(mixed)} with per-head widths, mean {mean:.3f} bits (requested {self.bits})"
        summary = (f"quantize {self.describe()}: {len(layers)} linears, mean SQNR {sum(sq) / len(sq):.2f} dB" + ach
                   + (f", {fb} fell back to RTN" if fb else "")
                   + (", bf16 calibration forward" if amp is not None and self.method == "gptq" else ""))
        return {"summary": summary, "layers": layers}
