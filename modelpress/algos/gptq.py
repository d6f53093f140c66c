"""GPTQ: accurate post-training quantization for generative pre-trained transformers
(Frantar, Ashkboos, Hoefler, Alistarh, arXiv 2210.17323).

Column-by-column optimal-brain-quantization with lazy block updates and the Cholesky form of the
inverse Hessian. H = 2 X^T X / n over calibration inputs X (tokens, cols). Optional act-order with
static groups (group parameters fixed from the original weights, so no column permutation is stored)
and an optional keep mask (pruned weights stay exactly zero, their error is propagated: joint
sparse+quantized, as in SparseGPT). `bits` may differ per column group (a tensor (n_groups,): per-head bit
widths on o_proj's input columns, "Capability-Guided Compression", arXiv 2603.16440): each column's codes
are clamped to its own group's grid; the error feedback is unchanged. Optionally the scales are then re-solved for the final integer codes
(`refit_scales`): the same layer objective, closed form per row."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
from torch import Tensor

from . import quant


@contextlib.contextmanager
def single_thread():
    """Run the column loop on one thread: its ops touch a few thousand floats, and on a busy machine an
    OpenMP parallel region per op costs far more (spin/barrier waits) than the op itself."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


_NP = SimpleNamespace(divide=np.divide, rint=np.rint, maximum=np.maximum, minimum=np.minimum, multiply=np.multiply,
                      subtract=np.subtract, add=np.add)
_TORCH = SimpleNamespace(divide=torch.div, rint=torch.round, maximum=torch.maximum, minimum=torch.minimum,
                         multiply=torch.mul, subtract=torch.sub, add=torch.add)


def loop_arrays(*ts: Tensor | None):
    """The column loops' elementwise ops and their operands: numpy's ufuncs on numpy views of CPU tensors (about
    3x less overhead per call than torch's dispatcher on a few thousand floats), torch's ops otherwise."""
    if ts[0].device.type != "cpu":
        return (_TORCH, *ts)
    return (_NP, *(None if t is None else t.numpy() for t in ts))


class HessianNotPD(ValueError):
    """The damped Hessian is not positive definite (too few or degenerate calibration inputs)."""


def tril_inverse_(L: Tensor, leaf: int = 128) -> Tensor:
    """L^-1 of a lower-triangular L (n, n), written over L (returned), by 2x2 blocks,
    [[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]]: about n^3/3 flops in GEMMs (LAPACK trtri's
    count), where a triangular solve against the identity costs n^3; temporaries of one (n/2, n/2) block."""
    n = L.shape[0]
    if n <= leaf:
        return L.copy_(torch.linalg.solve_triangular(L, torch.eye(n, device=L.device, dtype=L.dtype), upper=False))
    h = n // 2
    tril_inverse_(L[:h, :h], leaf)                                            # A^-1, (h, h)
    tril_inverse_(L[h:, h:], leaf)                                            # D^-1, (n-h, n-h)
    T = L[h:, :h] @ L[:h, :h]                                                 # C A^-1, (n-h, h)
    torch.mm(L[h:, h:], T, out=L[h:, :h])
    L[h:, :h].neg_()
    return L


def _flip_(M: Tensor, step: int = 1 << 20) -> Tensor:
    """M.flip(0, 1) of a row- or column-major matrix, in place (its storage reversed `step` elements at a time)."""
    v = (M if M.is_contiguous() else M.t()).view(-1)
    m = v.numel()
    for a in range(0, m // 2, step):
        b = min(a + step, m // 2)
        lo = v[a:b].clone()
        v[a:b] = v[m - b:m - a].flip(0)
        v[m - b:m - a] = lo.flip(0)
    return M


def inverse_hessian_chol(H: Tensor, percdamp: float, perm: Tensor | None = None, tries: int = 4) -> tuple[Tensor, float]:
    """Upper Cholesky factor U of (H_p + lambda I)^-1 = U^T U, with H_p = H[perm][:, perm] (perm: the column
    order, default the identity) and lambda = percdamp * mean(diag H_p); dead inputs (H_jj = 0) count as
    H_jj = 1. The damping grows x10 per failed try. Returns (U, percdamp used); raises HessianNotPD when
    every try fails. H is not modified. One factorization: with J the reversal permutation,
    J H_p J = L L^T gives H_p = R R^T with R = J L J upper, so H_p^-1 = R^-T R^-1 and U = R^-1 = J L^-1 J.
    Memory: one (cols, cols) matrix besides H (permuted, factored, inverted and flipped in place) plus
    temporaries of a quarter of it."""
    cols = H.shape[0]
    idx = (torch.arange(cols, device=H.device) if perm is None else perm).flip(0)
    base = H.diagonal().float().index_select(0, idx)                          # diag of J H_p J
    base[base == 0] = 1                                                       # dead inputs
    mean_diag = base.mean()
    for t in range(tries):
        d = percdamp * (10 ** t)
        Hd = H.float().index_select(0, idx)                                   # rows of J H_p J, (cols, cols)
        for a in range(0, cols, 256):                                         # its columns, a strip at a time
            Hd[a:a + 256] = Hd[a:a + 256].index_select(1, idx)
        L = Hd.t()            # symmetric: the same matrix, column-major (LAPACK's layout, as cholesky_ex returns it)
        del Hd
        L.diagonal().copy_(base + d * mean_diag)
        _, info = torch.linalg.cholesky_ex(L, out=(L, torch.empty((), dtype=torch.int32, device=L.device)))
        if info == 0:
            tril_inverse_(L)                                                  # L^-1, lower
            if torch.isfinite(L).all():
                return _flip_(L), d
            raise HessianNotPD(f"inverse Hessian factor not finite with damping {d:g}")
        del L
    raise HessianNotPD(f"Hessian not positive definite even with damping {percdamp * 10 ** (tries - 1):g}")


def refit_scales(W: Tensor, H: Tensor, Qc: Tensor, scale: Tensor, group_size: int | None) -> Tensor:
    """Least-squares group scales for fixed integer codes Qc = q - z (rows, cols): per row r,
    s_r = argmin_s f_r(s), f_r(s) = (w_r - w_hat_r) H (w_r - w_hat_r)^T with w_hat_r = sum_g s_g Qc_r,g: the
    calibration output error that the column loop only reduced greedily. f_r(s) = s^T A_r s - 2 s^T b_r + const
    with A_r[g, h] = Qc_r,g H_gh Qc_r,h^T and b_r[g] = Qc_r,g (H w_r^T)_g, a (G, G) system per row.
    Returns fp16-exact scales (rows, G); rows whose f_r does not go down (fp16 rounding, a singular A_r)
    keep `scale`."""
    rows, cols = W.shape
    gs, ng = group_size or cols, scale.shape[1]
    H = H.float()
    pad = ng * gs - cols

    def group_sums(x: Tensor) -> Tensor:                                 # (rows, cols) -> (rows, G)
        return torch.nn.functional.pad(x, (0, pad)).view(rows, ng, gs).sum(-1).double()
    b = group_sums(Qc * (W.float() @ H))                                 # (rows, G)
    A = torch.empty(rows, ng, ng, dtype=torch.float64, device=W.device)
    for g in range(ng):
        c = slice(g * gs, min((g + 1) * gs, cols))
        A[:, g] = group_sums((Qc[:, c] @ H[c]) * Qc)                     # Qc_r,g H_g,: against every group
    mu = 1e-9 * A.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-30)[:, None]   # (rows, 1) ridge
    s0 = scale.double()
    s = torch.linalg.solve(A + torch.diag_embed(mu.expand(-1, ng)), b + mu * s0).float().half().float()

    def f(x: Tensor) -> Tensor:                                          # f_r up to its constant, (rows,)
        return (x[:, None] @ A @ x[:, :, None]).view(rows) - 2 * (x * b).sum(1)
    ok = torch.isfinite(s).all(1) & (s * scale > 0).all(1) & (f(s.double()) < f(s0))     # no scale changes sign
    return torch.where(ok[:, None], s, scale)


@dataclass
class GPTQResult:
    q: Tensor        # (rows, cols) uint8 codes (pruned positions: the zero point)
    scale: Tensor    # (rows, n_groups) float32, fp16-exact
    zero: Tensor     # (rows, n_groups) float32, integer-valued
    loss: float      # sum of (w - w_hat)^2 / [H^-1]_jj^2 / 2 (the OBQ objective)
    damp: float
    row_loss: Tensor | None = None   # (rows,) the objective per output row (split it for stacked linears)
    w_hat: Tensor | None = None      # (rows, cols) float32 dequantized weights, = dequantize_groups(q, scale, zero)


def gptq(W: Tensor, H: Tensor, bits: int | Tensor, group_size: int | None = None, sym: bool = False,
         percdamp: float = 0.01, blocksize: int = 128, act_order: bool = False,
         keep: Tensor | None = None, observer: str = "minmax", refit: bool = False,
         grid: tuple[Tensor, Tensor] | None = None, signed: bool = False) -> GPTQResult:
    """Quantize W (rows, cols) given H (cols, cols). keep: optional bool mask (rows, cols); refit: re-solve
    the scales for the final codes (refit_scales); grid: fixed (scale, zero) (rows, n_groups) to choose the codes
    on instead of the observer's, the zero point possibly fractional (a k-quant grid, algos.kquant): codes
    q = clamp(round(w / s + z), 0, maxq), w_hat = (q - z) s (the caller recomputes w_hat in its format's
    arithmetic); not with keep or refit. bits: an int, or the width of each column group (n_groups,) int tensor.
    signed: symmetric scales signed as llama.cpp's Q4_0 (algos.quant's docstring).
    Rows are independent given H: linears that read the same input (q/k/v, gate/up) can be stacked
    into one W and quantized in one pass (one Cholesky, one column loop)."""
    rows, cols = W.shape
    quant.check_groups(cols, group_size)
    hd = torch.diag(H).float()
    dead = hd == 0                                                       # dead inputs: W[:, j] = 0 (H_jj = 1)
    gs = group_size or cols
    if group_size:
        blocksize = group_size * max(1, blocksize // group_size)   # groups never straddle blocks
    static = act_order or group_size is None or grid is not None
    frac = grid is not None
    if frac and (keep is not None or refit):
        raise ValueError("gptq: a fixed grid cannot keep pruned weights at zero or refit its scales")
    mixed = isinstance(bits, Tensor)
    if mixed and (frac or bits.shape != (quant.n_groups(cols, group_size),)):
        raise ValueError("gptq: per-group bits need one width per column group and no fixed grid")
    perm = (torch.argsort(torch.where(dead, torch.ones_like(hd), hd), descending=True) if act_order
            else torch.arange(cols, device=W.device))
    inv = torch.argsort(perm)
    # transposed layout: a column of W is a contiguous row of WT, so the per-column ops stream memory
    WT = W.detach().float().t()[perm]                                    # (cols, rows) copy
    WT[dead[perm]] = 0
    masked = keep is not None
    KT = keep.bool().t()[perm].float() if masked else None               # (cols, rows)
    if masked:
        WT *= KT
    if frac:
        s_all, z_all = grid[0].float().to(W.device), grid[1].float().to(W.device)
    elif static:  # group parameters from the original (masked) weights
        s_all, z_all = quant.group_params(WT[inv].t(), bits, group_size, sym, observer, hd, signed)
    else:
        s_all = torch.zeros(rows, quant.n_groups(cols, group_size), device=W.device)
        z_all = torch.zeros_like(s_all)
    group = perm // gs                                                   # (cols,) group of each permuted column
    U, damp = inverse_hessian_chol(H, percdamp, perm)
    QT = torch.empty(cols, rows, dtype=torch.uint8, device=W.device)
    loss = torch.zeros(rows, device=W.device)
    mq = quant.maxq(bits)
    if mixed:                                      # each permuted column's 2^b - 1, (cols, 1)
        mq_col = quant.maxq(bits.to(W.device).long())[group].float()[:, None]
    # two-level lazy batching: rank-1 updates stay inside sub-blocks of `sub` columns; sub-blocks and blocks
    # update the columns after them with one GEMM each (the same result as column-by-column updates)
    sub = next(b for b in (32, 16, 8, 4, 2, 1) if static or gs % b == 0)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1 = WT[i1:i2], U[i1:i2, i1:i2]                              # (B, rows) view, (B, B)
        if static:
            S1, Z1 = s_all[:, group[i1:i2]].t().contiguous(), z_all[:, group[i1:i2]].t().contiguous()
        else:
            S1, Z1 = torch.empty_like(W1), torch.empty_like(W1)          # (B, rows) each
        L1 = torch.zeros_like(Z1) if frac else Z1.neg()                  # bounds of q - z (frac: of q), (B, rows)
        H1 = L1 + (mq_col[i1:i2] if mixed else mq)
        R1, E1 = torch.empty_like(W1), torch.empty_like(W1)              # q - z; w - w_hat (unscaled)
        piv = U1.diagonal()
        V1 = U1 / piv[:, None]                                           # U's rows over their pivots
        # the column loop runs seven small ops per column: on CPU through numpy views of the same memory
        # (about 3x less overhead per op than torch's dispatcher), on CUDA through torch
        xp, Wn, Sn, Rn, En, Vn, Ln, Hn, Zn, Kn = loop_arrays(W1, S1, R1, E1, V1, L1, H1, Z1,
                                                             KT[i1:i2] if masked else None)
        with single_thread():
            for j1 in range(0, i2 - i1, sub):
                j2 = min(j1 + sub, i2 - i1)
                for i in range(j1, j2):
                    if not static and (i1 + i) % gs == 0:   # dynamic groups: params of the updated weights
                        j = min(i + gs, i2 - i1)          # (a group starts a sub-block: its columns are up to date)
                        wg = W1[i:j] * KT[i1 + i:i1 + j] if masked else W1[i:j]
                        c = perm[i1 + i:i1 + j]
                        g = (i1 + i) // gs
                        bg = int(bits[g]) if mixed else bits
                        s, z = quant.group_params(wg.t(), bg, None, sym, observer, hd[c], signed)
                        s, z = s[:, 0], z[:, 0]
                        s_all[:, g], z_all[:, g] = s, z
                        S1[i:j], Z1[i:j], L1[i:j], H1[i:j] = s, z, -z, quant.maxq(bg) - z
                    w, s, r, e = Wn[i], Sn[i], Rn[i], En[i]               # (rows,) each
                    # q - z = clamp(round(w / s), -z, maxq - z): quant.quantize's clamp(round(w / s) + z, 0, maxq)
                    # shifted by the integer z (exact); w_hat = (q - z) s
                    xp.divide(w, s, out=r)
                    if frac:                                             # fractional z: round w / s + z
                        xp.add(r, Zn[i], out=r)
                    xp.rint(r, out=r)
                    xp.maximum(r, Ln[i], out=r)
                    xp.minimum(r, Hn[i], out=r)
                    if frac:
                        xp.subtract(r, Zn[i], out=r)
                    if masked:
                        xp.multiply(r, Kn[i], out=r)
                    xp.multiply(r, s, out=e)
                    xp.subtract(w, e, out=e)                             # w - w_hat
                    Wn[i + 1:j2] -= Vn[i, i + 1:j2, None] * e
                E1[j1:j2].div_(piv[j1:j2, None])                         # (w - w_hat) / [U]_ii
                W1[j2:].addmm_(U1[j1:j2, j2:].t(), E1[j1:j2], alpha=-1)
        R1.add_(0.0)                                                     # -0.0 -> 0.0, as (q - z) gives
        QT[i1:i2] = R1.add(Z1).round_().to(torch.uint8)
        torch.mul(R1, S1, out=W1)                                        # WT ends as the dequantized weights
        loss += E1.pow(2).sum(0) / 2
        WT[i2:].addmm_(U[i1:i2, i2:].t(), E1, alpha=-1)
    Q = QT[inv].t()
    if not refit:
        return GPTQResult(Q, s_all, z_all, float(loss.sum()), damp, loss, WT[inv].t())
    del WT
    Qc = Q.float() - quant.expand(z_all, group_size, cols)                # (rows, cols), 0 where pruned or dead
    W0 = W.float() * KT[inv].t() if masked else W.float()
    W0 = W0.masked_fill(dead, 0) if dead.any() else W0
    s_all = refit_scales(W0, H, Qc, s_all, group_size)
    return GPTQResult(Q, s_all, z_all, float(loss.sum()), damp, loss, quant.dequantize_groups(Q, s_all, z_all, group_size))
