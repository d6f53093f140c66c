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


def gptq(W: Tensor, H: Tensor, bits: int, group_size: int | None = None, sym: bool = False,
         percdamp: float = 0.01, blocksize: int = 128, act_order: bool = False,
         keep: Tensor | None = None, observer: str = "minmax") -> GPTQResult:
    """Quantize W (rows, cols) given H (cols, cols). keep: optional bool mask (rows, cols)."""
    rows, cols = W.shape
    quant.check_groups(cols, group_size)
    W, H, _ = prepare_hessian(W, H)
    keep = torch.ones_like(W, dtype=torch.bool) if keep is None else keep.bool().clone()
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
    U, damp = inverse_hessian_chol(H, percdamp)
    Q = torch.zeros(rows, cols, dtype=torch.uint8, device=W.device)
    loss = torch.zeros(rows, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        with single_thread():
            for i in range(i2 - i1):
                col = int(perm[i1 + i])
                g = col // gs
                if not static and col % gs == 0:      # dynamic groups: params of the updated weights
                    s, z = quant.scale_zero(W1[:, i:i + gs] * keep[:, i1 + i:i1 + i + gs], bits, sym)
                    s_all[:, g], z_all[:, g] = s, z
                w, d = W1[:, i], U1[i, i]
                q = quant.quantize(w, s_all[:, g], z_all[:, g], bits)
                wq = quant.dequantize(q, s_all[:, g], z_all[:, g]) * keep[:, i1 + i]
                Q[:, i1 + i] = q.to(torch.uint8)
                loss += (w - wq) ** 2 / d ** 2 / 2
                err = (w - wq) / d                                           # (rows,)
                W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
                Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    inv = torch.argsort(perm)
    return GPTQResult(Q[:, inv], s_all, z_all, float(loss.sum()), damp)
