"""llama.cpp's k-quant weight grids (Q4_K, Q5_K, Q6_K) as pure functions: the same codes and scales that
GPTQ (arXiv 2210.17323) or the clipping search choose, snapped to the k-quant structure so that a GGUF stores
them exactly.

A row is cut into super-blocks of 256 weights; each holds sub-blocks (32 weights for Q4_K/Q5_K, 16 for Q6_K)
whose scales (and, for Q4_K/Q5_K, mins) are small integers against one fp16 super-block scale:
  Q4_K / Q5_K (asymmetric, codes q in [0, 2^b - 1]):  w = (d sc_j) q - (dmin m_j),  sc_j, m_j in [0, 63] (6 bit);
  Q6_K        (symmetric,  codes q in [0, 63]):       w = (d sc_j) (q - 32),      sc_j in [-128, 127] (int8).
In modelpress's convention w = s (q - z) this is s_j = d sc_j and a zero point z_j = dmin m_j / s_j that need not
be an integer (Q4_K/Q5_K). Every product is formed in float32 in the order llama.cpp's (and gguf.quants')
dequantizer uses, so `dequantize` equals the GGUF's weights bit for bit.

`snap` turns any per-sub-block (scale, zero) (e.g. from quant.group_params' clipping search) into the nearest
k-quant grid: d = fp16(max_j s_j / sc_max), sc_j = round(s_j / d); dmin = fp16(max_j s_j z_j / 63), m_j =
round(s_j z_j / dmin). The codes are then chosen on that grid (round-to-nearest here, or by GPTQ's column loop
with `grid=`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import quant

SUPER = 256


@dataclass(frozen=True)
class Format:
    name: str
    bits: int
    sub: int          # weights per sub-block (the group size)
    sym: bool
    sc_max: int       # largest sub-block scale integer


FORMATS = {"q4_k": Format("q4_k", 4, 32, False, 63), "q5_k": Format("q5_k", 5, 32, False, 63),
           "q6_k": Format("q6_k", 6, 16, True, 127)}

# What llama-quantize writes for a tensor whose rows are not whole super-blocks (llama-quant.cpp's fallback:
# Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), as modelpress quantize settings: (format, bits, group, sym).
# Q5_1 is the int grid at 5-bit group 32 asymmetric (w = d q + m).
LLAMA_FALLBACK = {"q4_k": ("q5_0", 5, 32, True), "q5_k": ("int", 5, 32, False), "q6_k": ("q8_0", 8, 32, True)}


@dataclass
class KParams:
    """One matrix's k-quant parameters; rows x super-blocks (nsup) and rows x sub-blocks (nsub)."""
    fmt: str
    d: Tensor         # (rows, nsup) fp16
    sc: Tensor        # (rows, nsub) int16: Q4_K/Q5_K in [0, 63], Q6_K in [-128, 127]
    dmin: Tensor      # (rows, nsup) fp16 (zeros for Q6_K)
    m: Tensor         # (rows, nsub) int16 in [0, 63] (zeros for Q6_K)

    def scale_offset(self) -> tuple[Tensor, Tensor]:
        """s = d sc and o = dmin m, float32 (rows, nsub), each product exact: w = s q - o (Q6_K: s (q - 32))."""
        per = self.sc.shape[1] // self.d.shape[1]
        s = self.d.float().repeat_interleave(per, 1) * self.sc.float()
        o = self.dmin.float().repeat_interleave(per, 1) * self.m.float()
        return s, o

    def scale_zero(self) -> tuple[Tensor, Tensor]:
        """(s, z) in modelpress's convention w = s (q - z), z = o / s (fractional for Q4_K/Q5_K), for choosing codes."""
        s, o = self.scale_offset()
        if FORMATS[self.fmt].sym:
            return s, torch.full_like(s, 32.0)
        return s, o / s


def fits(cols: int) -> bool:
    """Whether a row of `cols` weights splits into whole super-blocks (llama.cpp's condition for k-quants)."""
    return cols % SUPER == 0


def snap(s: Tensor, z: Tensor, fmt: str) -> KParams:
    """Per-sub-block scales and zero points (rows, nsub) (w = s (q - z), z >= 0) -> the nearest k-quant grid."""
    f = FORMATS[fmt]
    rows, nsub = s.shape
    per = SUPER // f.sub
    if nsub % per:
        raise ValueError(f"{fmt}: {nsub} sub-blocks of {f.sub} do not fill super-blocks of {SUPER} weights")
    tiny = torch.tensor(2.0 ** -24)                                          # the smallest fp16 subnormal
    sg = s.float().reshape(rows, -1, per)                                    # (rows, nsup, per)
    d = torch.maximum((sg.amax(-1) / f.sc_max).half(), tiny.half())          # (rows, nsup)
    sc = torch.round(sg / d.float()[..., None]).clamp(1, f.sc_max)
    if f.sym:
        zeros = torch.zeros_like(d)
        return KParams(fmt, d, sc.reshape(rows, nsub).to(torch.int16), zeros, torch.zeros_like(sc.reshape(rows, nsub), dtype=torch.int16))
    og = (s.float() * z.float()).clamp(min=0).reshape(rows, -1, per)          # offsets s z >= 0
    dmin = (og.amax(-1) / 63).half()
    dm = dmin.float()[..., None]
    m = torch.where(dm > 0, torch.round(og / torch.where(dm > 0, dm, 1)), 0).clamp(0, 63)
    return KParams(fmt, d, sc.reshape(rows, nsub).to(torch.int16), dmin, m.reshape(rows, nsub).to(torch.int16))


def refine(w: Tensor, p: KParams, weight: Tensor | None = None) -> KParams:
    """The snapped integers' neighbours: per sub-block, sc_j + {-1, 0, 1} (and m_j + {-1, 0, 1} for Q4_K/Q5_K) with
    round-to-nearest codes, keeping the lowest sum_i c_i (w_i - w_hat_i)^2 (c = weight (cols,), or 1): snapping
    rounds each integer alone; this picks the rounding direction that serves the sub-block's weights."""
    f = FORMATS[p.fmt]
    rows, cols = w.shape
    nsub = cols // f.sub
    wg = w.float().reshape(rows, nsub, f.sub)
    c = None if weight is None else weight.float().reshape(1, nsub, f.sub)
    d = p.d.float().repeat_interleave(SUPER // f.sub, 1)                     # (rows, nsub)
    dm = p.dmin.float().repeat_interleave(SUPER // f.sub, 1)
    mq = quant.maxq(f.bits)
    best_sc, best_m, best = p.sc.clone(), p.m.clone(), None
    for dsc in (0, -1, 1):
        for dmm in ((0,) if f.sym else (0, -1, 1)):
            sc = (p.sc + dsc).clamp(1, f.sc_max)
            m = (p.m + dmm).clamp(0, 63)
            s, o = d * sc.float(), dm * m.float()                            # (rows, nsub)
            z = torch.full_like(s, 32.0) if f.sym else o / s
            q = torch.clamp(torch.round(wg / s[..., None] + z[..., None]), 0, mq)
            e = (s[..., None] * (q - 32) if f.sym else s[..., None] * q - o[..., None]) - wg
            e = e.square() if c is None else e.square() * c
            err = e.sum(-1)                                                  # (rows, nsub)
            if best is None:
                best = err
                continue
            better = err < best
            best = torch.where(better, err, best)
            best_sc, best_m = torch.where(better, sc, best_sc), torch.where(better, m, best_m)
    return KParams(p.fmt, p.d, best_sc, p.dmin, best_m)


def params(w: Tensor, fmt: str, observer: str = "minmax", h: Tensor | None = None) -> KParams:
    """k-quant parameters of w (rows, cols), cols a multiple of 256: the observer's per-sub-block (scale, zero)
    (quant.group_params: min/max or clipping search, h the inputs' second moments for 'hessian'), snapped; with a
    clipping-search observer (mse, hessian) the snapped integers are then refined (`refine`, weighted by h)."""
    f = FORMATS[fmt]
    if not fits(w.shape[1]):
        raise ValueError(f"{fmt} needs rows of a multiple of {SUPER} weights, got {w.shape[1]}")
    s, z = quant.group_params(w, f.bits, f.sub, f.sym, observer, h)
    p = snap(s, z, fmt)
    return p if observer == "minmax" else refine(w, p, h if observer == "hessian" else None)


def codes(w: Tensor, p: KParams) -> Tensor:
    """Round-to-nearest codes of w (rows, cols) on the grid p -> uint8 (rows, cols)."""
    f = FORMATS[p.fmt]
    s, z = p.scale_zero()
    sx, zx = quant.expand(s, f.sub, w.shape[1]), quant.expand(z, f.sub, w.shape[1])
    return torch.clamp(torch.round(w.float() / sx + zx), 0, quant.maxq(f.bits)).to(torch.uint8)


def dequantize(q: Tensor, p: KParams) -> Tensor:
    """Codes (rows, cols) -> float32 weights, bit-equal to llama.cpp's dequantization of the packed blocks."""
    f = FORMATS[p.fmt]
    s, o = p.scale_offset()
    cols = q.shape[1]
    sx = quant.expand(s, f.sub, cols)
    if f.sym:
        return sx * (q.float() - 32)
    return sx * q.float() - quant.expand(o, f.sub, cols)


def rtn(w: Tensor, fmt: str, observer: str = "minmax") -> tuple[Tensor, KParams]:
    """Round-to-nearest on the k-quant grid: (codes (rows, cols) uint8, parameters)."""
    p = params(w, fmt, observer)
    return codes(w, p), p
