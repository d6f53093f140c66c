"""GPTQ: accurate post-training quantization for generative pre-trained transformers
(Frantar, Ashkboos, Hoefler, Alistarh, arXiv 2210.17323).

Column-by-column optimal-brain-quantization with lazy block updates and the Cholesky form of the
inverse Hessian. H = 2 X^T X / n over calibration inputs X (tokens, cols). Optional act-order with
static groups (group parameters fixed from the original weights, so no column permutation is stored)
and an optional keep mask (pruned weights stay exactly zero, their error is propagated: joint
sparse+quantized, as in SparseGPT)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

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


class HessianNotPD(ValueError):
    """The damped Hessian is not positive definite (too few or degenerate calibration inputs)."""


def inverse_hessian_chol(H: Tensor, percdamp: float, tries: int = 4) -> tuple[Tensor, float]:
    """Upper Cholesky factor of (H + lambda I)^-1, lambda = percdamp * mean(diag H); the damping grows
    x10 per failed try. Returns (U, percdamp used); raises HessianNotPD when every try fails."""
    cols = H.shape[0]
    mean_diag = torch.mean(torch.diag(H))
    for t in range(tries):
        d = percdamp * (10 ** t)
        Hd = H + d * mean_diag * torch.eye(cols, device=H.device, dtype=H.dtype)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U, d
    raise HessianNotPD(f"Hessian not positive definite even with damping {percdamp * 10 ** (tries - 1):g}")


def prepare_hessian(W: Tensor, H: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Copies in float32; dead input channels (H_jj = 0) get H_jj = 1 and W[:, j] = 0."""
    W, H = W.float().clone(), H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H, dead


@dataclass
class GPTQResult:
    q: Tensor        # (rows, cols) uint8 codes
    scale: Tensor    # (rows, n_groups) float32, fp16-exact
    zero: Tensor     # (rows, n_groups) float32, integer-valued
    loss: float      # sum of (w - w_hat)^2 / [H^-1]_jj^2 / 2 (the OBQ objective)
    damp: float
    row_loss: Tensor | None = None   # (rows,) the objective per output row (split it for stacked linears)


def gptq(W: Tensor, H: Tensor, bits: int, group_size: int | None = None, sym: bool = False,
         percdamp: float = 0.01, blocksize: int = 128, act_order: bool = False,
         keep: Tensor | None = None, observer: str = "minmax") -> GPTQResult:
    """Quantize W (rows, cols) given H (cols, cols). keep: optional bool mask (rows, cols).
    Rows are independent given H: linears that read the same input (q/k/v, gate/up) can be stacked
    into one W and quantized in one pass (one Cholesky, one column loop)."""
    rows, cols = W.shape
    quant.check_groups(cols, group_size)
    W, H, _ = prepare_hessian(W, H)
    masked = keep is not None
    keep = torch.ones_like(W, dtype=torch.bool) if keep is None else keep.bool().clone()
    if masked:
        W *= keep
    gs = group_size or cols
    if group_size:
        blocksize = group_size * max(1, blocksize // group_size)   # groups never straddle blocks
    static = act_order or group_size is None
    if static:  # group parameters from the original (masked) weights
        s_all, z_all = quant.group_params(W, bits, group_size, sym, observer)
    else:
        s_all = torch.zeros(rows, quant.n_groups(cols, group_size), device=W.device)
        z_all = torch.zeros_like(s_all)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols, device=W.device)
    W, H, keep = W[:, perm], H[perm][:, perm], keep[:, perm]
    group = perm // gs                                                   # (cols,) group of each permuted column
    U, damp = inverse_hessian_chol(H, percdamp)
    Q = torch.zeros(rows, cols, dtype=torch.uint8, device=W.device)
    loss = torch.zeros(rows, device=W.device)
    mq = quant.maxq(bits)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]                    # (rows, B), (B, B)
        K1 = keep[:, i1:i2].float() if masked else None
        if static:
            S1, Z1 = s_all[:, group[i1:i2]], z_all[:, group[i1:i2]]      # (rows, B) each
        else:
            S1, Z1 = torch.empty_like(W1), torch.empty_like(W1)
        Q1, Err1 = torch.empty_like(W1), torch.empty_like(W1)
        with single_thread():
            for i in range(i2 - i1):
                if not static and (i1 + i) % gs == 0:                     # dynamic groups: params of the updated weights
                    j = min(i + gs, i2 - i1)
                    s, z = quant.scale_zero(W1[:, i:j] * K1[:, i:j] if masked else W1[:, i:j], bits, sym)
                    s_all[:, (i1 + i) // gs], z_all[:, (i1 + i) // gs] = s, z
                    S1[:, i:j], Z1[:, i:j] = s[:, None], z[:, None]
                w, s, z = W1[:, i], S1[:, i], Z1[:, i]
                q = torch.clamp(torch.round(w / s) + z, 0, mq)            # quant.quantize
                wq = (q - z) * s                                          # quant.dequantize
                if masked:
                    wq *= K1[:, i]
                err = (w - wq) / U1[i, i]                                 # (rows,)
                W1[:, i + 1:].addr_(err, U1[i, i + 1:], alpha=-1)
                Q1[:, i] = q
                Err1[:, i] = err
        Q[:, i1:i2] = Q1.to(torch.uint8)
        loss += Err1.pow(2).sum(1) / 2
        W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1)
    inv = torch.argsort(perm)
    return GPTQResult(Q[:, inv], s_all, z_all, float(loss.sum()), damp, loss)
