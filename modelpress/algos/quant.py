"""Uniform integer quantization of weight matrices (round-to-nearest), with per-channel or per-group
scales and zero points, symmetric or asymmetric, plus bit packing and SQNR.

Conventions (shared by GPTQ, SparseGPT and the QuantLinear module):
  codes q are unsigned in [0, 2^b - 1]; w_hat = s * (q - z);
  asymmetric: s = (max - min) / (2^b - 1), z = round(-min / s)  (range always contains 0);
  symmetric:  s = 2 max|w| / (2^b - 1),   z = 2^(b-1)          (signed codes q - z in [-2^(b-1), 2^(b-1) - 1]);
  signed (symmetric, llama.cpp's Q4_0/Q5_0/Q8_0 convention, quantize_row_q4_0_ref): s = w_e / -2^(b-1) with w_e
              the group's value of largest magnitude, so s < 0 when w_e > 0 and w_e lands exactly on code 0: the
              full 2^b levels with a step of max|w| / 2^(b-1) (finer than 2 max|w| / (2^b - 1)), no clipping of w_e;
  scales are rounded to fp16 where they are computed, so stored fp16 scales reproduce w_hat exactly.
Mixed widths (per-head bit widths, "Capability-Guided Compression", arXiv 2603.16440): `bits` may be a tensor of
widths per column group (n_groups,) in group_params / rtn (and broadcastable to w in quantize), each group on its
own b-bit grid; rows with different widths are separate calls (rows are independent).
Observers pick the range: min/max, or a clipping search (shrink the range, keep the lowest error) of
abs(err)^2.4 ("mse", as llm-compressor's) or of the squared error weighted by each input's second moment
E[x_j^2] = diag H / 2 ("hessian": the error that reaches the layer's output when inputs are uncorrelated, the
weighting of AWQ's activation-aware view, arXiv 2306.00978, and llama.cpp's importance matrix).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def maxq(bits: int | Tensor) -> int | Tensor:
    """2^b - 1 (an int, or a tensor of them for a tensor of widths)."""
    return (1 << bits) - 1


def _range(w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row min and max of w (rows, cols), widened to include 0 -> (rows,), (rows,)."""
    zero_t = torch.zeros(w.shape[0], device=w.device)
    return torch.minimum(w.min(dim=1).values, zero_t), torch.maximum(w.max(dim=1).values, zero_t)


def _params(xmin: Tensor, xmax: Tensor, bits: int, sym: bool, signed: bool = False) -> tuple[Tensor, Tensor]:
    """Scale and zero point of the range [xmin, xmax] (rows,) each (signed: see the module docstring)."""
    mq = maxq(bits)
    if signed:
        if not sym:
            raise ValueError("signed scales are a symmetric grid: set sym")
        ext = torch.where(xmax >= -xmin, xmax, xmin)            # the value of largest magnitude, with its sign
        s = ext / -float(1 << (bits - 1))
        s = torch.copysign(s.abs().clamp(min=1e-7).half().float(), s)
        return s, torch.full_like(s, float(1 << (bits - 1)))
    s = 2 * torch.maximum(xmin.abs(), xmax) / mq if sym else (xmax - xmin) / mq
    s = s.clamp(min=1e-7).half().float()                       # fp16-exact scales
    z = torch.full_like(s, float(1 << (bits - 1))) if sym else torch.round(-xmin / s).clamp(0, mq)
    return s, z


def scale_zero(w: Tensor, bits: int, sym: bool, signed: bool = False) -> tuple[Tensor, Tensor]:
    """Per-row min/max scale and zero point of w (rows, cols) -> (rows,), (rows,)."""
    return _params(*_range(w.float()), bits, sym, signed)


def scale_zero_mse(w: Tensor, bits: int, sym: bool, grid: int = 40, max_shrink: float = 0.8,
                   norm: float = 2.4, weight: Tensor | None = None, signed: bool = False) -> tuple[Tensor, Tensor]:
    """Per-row clipping search: the shrink of the min/max range (1, 1 - 1/grid, ..., 1 - max_shrink) with the
    lowest sum_j c_j |w_j - w_hat_j|^norm, c = weight (same shape as w, e.g. the inputs' second moments) or 1."""
    w = w.float()
    xmin, xmax = _range(w)
    mq = maxq(bits)
    e = torch.empty_like(w)                                    # (rows, cols) work buffer
    best_s = best_z = best_err = None
    for i in range(int(max_shrink * grid) + 1):
        f = 1 - i / grid
        s, z = _params(xmin * f, xmax * f, bits, sym, signed)
        s2, z2 = s[:, None], z[:, None]
        # w_hat - w with w_hat = s (clamp(round(w / s), -z, maxq - z)): quantize's codes shifted by the integer z
        torch.div(w, s2, out=e).round_().clamp_(min=-z2, max=mq - z2).mul_(s2).sub_(w)
        e.square_() if norm == 2 else e.abs_().pow_(norm)
        err = (e if weight is None else e.mul_(weight)).sum(1)
        if best_err is None:
            best_s, best_z, best_err = s, z, err
            continue
        better = err < best_err
        best_s, best_z, best_err = torch.where(better, s, best_s), torch.where(better, z, best_z), torch.minimum(err, best_err)
    return best_s, best_z


def quantize(w: Tensor, s: Tensor, z: Tensor, bits: int | Tensor) -> Tensor:
    """Codes q = clamp(round(w / s) + z, 0, 2^b - 1) (same shape as w, float); bits: an int or widths
    broadcastable to w."""
    mq = maxq(bits)
    if isinstance(mq, int):
        return torch.clamp(torch.round(w / s) + z, 0, mq)
    return (torch.round(w / s) + z).clamp_(min=0).minimum(mq.to(device=w.device, dtype=w.dtype))


def dequantize(q: Tensor, s: Tensor, z: Tensor) -> Tensor:
    return s * (q - z)


def quant_dequant(w: Tensor, s: Tensor, z: Tensor, bits: int) -> Tensor:
    return dequantize(quantize(w, s, z, bits), s, z)


OBSERVERS = ("minmax", "mse", "hessian")
SIGNED_FORMATS = {"q4_0": 4, "q5_0": 5, "q8_0": 8}   # llama.cpp's block grids: 32 weights, one signed fp16 scale


def group_params(w: Tensor, bits: int | Tensor, group_size: int | None, sym: bool, observer: str = "minmax",
                 h: Tensor | None = None, signed: bool = False) -> tuple[Tensor, Tensor]:
    """Scales and zeros per (row, group) of w (rows, cols) -> (rows, n_groups) each. observer: minmax (the range),
    mse (clipping search, |err|^2.4), hessian (clipping search, squared error weighted by h (cols,), the inputs'
    second moments diag H: the error that reaches the layer's output, without input correlations).
    bits: an int, or the width of each column group (n_groups,) (each group's params on its own grid)."""
    if isinstance(bits, Tensor):
        s = z = None
        for b in torch.unique(bits).tolist():
            sb, zb = group_params(w, int(b), group_size, sym, observer, h, signed)    # (rows, n_groups) each
            sel = (bits == b).to(sb.device)[None, :]
            s, z = (sb, zb) if s is None else (torch.where(sel, sb, s), torch.where(sel, zb, z))
        return s, z
    rows, cols = w.shape
    gs = group_size or cols
    ng = n_groups(cols, group_size)
    wp = torch.nn.functional.pad(w.float(), (0, ng * gs - cols))    # zero padding: 0 is always in range
    wg = wp.reshape(rows * ng, gs)                                   # (rows * n_groups, gs)
    if observer == "hessian":
        if h is None:
            raise ValueError("observer 'hessian' needs the inputs' second moments h (calibration data)")
        hg = torch.nn.functional.pad(h.float(), (0, ng * gs - cols)).reshape(1, ng, gs)
        s, z = scale_zero_mse(wg, bits, sym, norm=2.0, weight=hg.expand(rows, ng, gs).reshape(rows * ng, gs),
                              signed=signed)
    else:
        s, z = (scale_zero_mse if observer == "mse" else scale_zero)(wg, bits, sym, signed=signed)
    return s.reshape(rows, -1), z.reshape(rows, -1)


def expand(p: Tensor, group_size: int | None, cols: int) -> Tensor:
    """(rows, n_groups) -> (rows, cols): each column gets its group's value."""
    return p.repeat_interleave(group_size or cols, dim=1)[:, :cols]


def rtn(w: Tensor, bits: int | Tensor, group_size: int | None = None, sym: bool = False,
        keep: Tensor | None = None, observer: str = "minmax", signed: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest. w (rows, cols); keep: optional bool mask of surviving weights (pruned weights
    do not widen the range and dequantize to exactly 0); bits: an int or the width of each column group
    (n_groups,). Returns codes (rows, cols) uint8, scales and zeros (rows, n_groups)."""
    rows, cols = w.shape
    check_groups(cols, group_size)
    wk = w.float() if keep is None else w.float() * keep
    s, z = group_params(wk, bits, group_size, sym, observer, signed=signed)
    qb = bits if isinstance(bits, int) else expand(bits[None, :], group_size, cols)        # (1, cols) widths
    q = quantize(wk, expand(s, group_size, cols), expand(z, group_size, cols), qb)
    return q.to(torch.uint8), s, z


def dequantize_groups(q: Tensor, s: Tensor, z: Tensor, group_size: int | None,
                      keep: Tensor | None = None) -> Tensor:
    """Codes (rows, cols) + per-group params -> float32 weights (rows, cols); pruned entries exactly 0."""
    cols = q.shape[1]
    w = dequantize(q.float(), expand(s.float(), group_size, cols), expand(z.float(), group_size, cols))
    return w if keep is None else w * keep


def fake_quant(w: Tensor, bits: int, group_size: int | None = None, sym: bool = False) -> Tensor:
    """w -> dequantize(quantize(w)) with RTN, same dtype as w."""
    q, s, z = rtn(w, bits, group_size, sym)
    return dequantize_groups(q, s, z, group_size).to(w.dtype)


def n_groups(cols: int, group_size: int | None) -> int:
    """Groups per row; the last group is partial when group_size does not divide cols."""
    return -(-cols // group_size) if group_size else 1


def check_groups(cols: int, group_size: int | None) -> None:
    if group_size is not None and group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")


def pack(q: Tensor, bits: int) -> Tensor:
    """Pack unsigned codes (any shape, values < 2^bits) into a flat uint8 tensor, little-endian bit order
    (for 4 bits: two codes per byte, the first in the low nibble)."""
    if bits in (1, 2, 4, 8):                   # whole codes per byte: shifts, no per-bit expansion
        per = 8 // bits
        a = q.detach().cpu().reshape(-1).to(torch.uint8)
        a = torch.nn.functional.pad(a, (0, -a.numel() % per)).reshape(-1, per)     # (bytes, codes per byte)
        out = a[:, 0].clone()
        for k in range(1, per):
            out |= a[:, k] << (bits * k)
        return out
    a = q.detach().cpu().reshape(-1).to(torch.uint8).numpy()
    b = np.unpackbits(a[:, None], axis=1, bitorder="little")[:, :bits]      # (n, bits)
    return torch.from_numpy(np.packbits(b.reshape(-1), bitorder="little"))


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of pack: n codes as uint8."""
    b = np.unpackbits(packed.cpu().numpy(), bitorder="little")[: n * bits].reshape(n, bits)
    return torch.from_numpy(np.packbits(b, axis=1, bitorder="little")[:, 0])


def sqnr(ref: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (norms accumulated in float64, no float64 copies)."""
    noise = torch.linalg.vector_norm(ref - approx, dtype=torch.float64)
    signal = torch.linalg.vector_norm(ref, dtype=torch.float64)
    return float("inf") if noise == 0 else float(20 * torch.log10(signal / noise))
