"""Weight pruning: magnitude, Wanda (Sun et al., arXiv 2306.11695) and SparseGPT (Frantar & Alistarh,
arXiv 2301.00774), unstructured or N:M (at most N non-zeros in every M consecutive input weights of a
row; "2:4" keeps 2 of 4). Masks here are *keep* masks: True = the weight survives.

Block sparsity (per-component budgets, e.g. one per attention head, "Capability-Guided Compression",
arXiv 2603.16440): a spec S (R, G) splits the weight (rows, cols) into R equal row groups x G equal column
groups and asks sparsity S[r, g] of block (r, g). A head's rows of q/k/v are a row group (S (H, 1)), its
input columns of o_proj a column group (S (1, H)). Within a block each method compares what it compares
in a whole matrix: Wanda per output row (round(width * S[r, g]) of the row's entries in the block),
magnitude and SparseGPT's adaptive mask one threshold per block (round(entries * S[r, g]) of the block).
A float sparsity keeps the scalar path (counts truncated, as before); the block path rounds counts, so
its achieved mean is unbiased."""
from __future__ import annotations

import re

import torch
from torch import Tensor

from . import quant
from .gptq import inverse_hessian_chol, loop_arrays, single_thread


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """"unstructured" -> None; "N:M" -> (N, M) with 0 < N < M."""
    if pattern == "unstructured":
        return None
    m = re.fullmatch(r"(\d+):(\d+)", pattern)
    if not m or not 0 < int(m[1]) < int(m[2]):
        raise ValueError(f"pattern {pattern!r}: use 'unstructured' or 'N:M' with 0 < N < M, e.g. '2:4'")
    return int(m[1]), int(m[2])


def _keep_lowest_pruned(score: Tensor, k: int) -> Tensor:
    """Keep mask of a (rows, cols) score: the k lowest of each row are pruned."""
    keep = torch.ones_like(score, dtype=torch.bool)
    if k > 0:
        keep.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, False)
    return keep


def _nm_keep(score: Tensor, n: int, m: int) -> Tensor:
    """Keep the n highest scores in every group of m consecutive columns."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"input size {cols} is not a multiple of M={m} for {n}:{m} sparsity")
    g = score.reshape(rows, cols // m, m)
    keep = torch.zeros_like(g, dtype=torch.bool)
    keep.scatter_(2, torch.topk(g, n, dim=2).indices, True)
    return keep.reshape(rows, cols)


def score_mask(score: Tensor, sparsity: float, pattern: str = "unstructured", per_row: bool = True) -> Tensor:
    """Keep mask from importance scores (higher = more important)."""
    nm = parse_pattern(pattern)
    if nm:
        return _nm_keep(score, *nm)
    if per_row:
        return _keep_lowest_pruned(score, int(score.shape[1] * sparsity))
    flat = score.reshape(1, -1)
    return _keep_lowest_pruned(flat, int(flat.numel() * sparsity)).reshape(score.shape)


def check_spec(spec: Tensor, shape: tuple[int, int]) -> tuple[int, int]:
    """(row group height, column group width) of a block-sparsity spec (R, G) on a (rows, cols) weight."""
    rows, cols = shape
    if spec.dim() != 2 or rows % spec.shape[0] or cols % spec.shape[1]:
        raise ValueError(f"sparsity spec of shape {tuple(spec.shape)} does not tile a {rows} x {cols} weight "
                         "into equal blocks")
    if float(spec.min()) < 0 or float(spec.max()) > 1:
        raise ValueError(f"block sparsities must lie in [0, 1], got {float(spec.min())}..{float(spec.max())}")
    return rows // spec.shape[0], cols // spec.shape[1]


def block_row_keep(score: Tensor, spec: Tensor) -> Tensor:
    """Per-row selection inside column groups: in every row of row group r and column group g, the
    round(width * S[r, g]) lowest scores are pruned. score: (rows, cols); spec: (R, G) -> keep (rows, cols)."""
    rows, cols = score.shape
    hr, wg = check_spec(spec, (rows, cols))
    G = spec.shape[1]
    k = torch.round(spec.double() * wg).to(torch.int64).repeat_interleave(hr, 0).to(score.device)   # (rows, G)
    blocks = score.reshape(rows, G, wg)
    rank = torch.argsort(torch.argsort(blocks, dim=-1, stable=True), dim=-1)                       # (rows, G, wg)
    return (rank >= k[..., None]).reshape(rows, cols)


def block_keep(score: Tensor, spec: Tensor) -> Tensor:
    """One threshold per block: in block (r, g) the round(entries * S[r, g]) lowest scores are pruned.
    score: (rows, cols); spec: (R, G) -> keep (rows, cols)."""
    rows, cols = score.shape
    hr, wg = check_spec(spec, (rows, cols))
    keep = torch.ones_like(score, dtype=torch.bool)
    for r in range(spec.shape[0]):
        for g in range(spec.shape[1]):
            blk = score[r * hr:(r + 1) * hr, g * wg:(g + 1) * wg]
            k = round(float(spec[r, g]) * blk.numel())
            if k > 0:
                kb = torch.ones(blk.numel(), dtype=torch.bool, device=score.device)
                kb[torch.topk(blk.reshape(-1), k, largest=False).indices] = False
                keep[r * hr:(r + 1) * hr, g * wg:(g + 1) * wg] = kb.reshape(blk.shape)
    return keep


def as_spec(sparsity: float | Tensor) -> Tensor | None:
    """A block spec (R, G) from a tensor sparsity; None for a plain float (the scalar path)."""
    if isinstance(sparsity, Tensor):
        return sparsity.double().reshape(1, 1) if sparsity.dim() == 0 else sparsity.double()
    return None


def magnitude_mask(w: Tensor, sparsity: float | Tensor, pattern: str = "unstructured") -> Tensor:
    """Keep mask by |w|, one threshold per matrix (unstructured) or per M-group (N:M); with a block spec
    (R, G) one threshold per block."""
    spec = as_spec(sparsity)
    if spec is not None:
        return block_keep(w.abs().float(), spec)
    return score_mask(w.abs().float(), sparsity, pattern, per_row=False)


def wanda_mask(w: Tensor, x_sq_norm: Tensor, sparsity: float | Tensor, pattern: str = "unstructured") -> Tensor:
    """Wanda: score_ij = |W_ij| * ||X_j||_2, pruned per output row. x_sq_norm: (cols,) sum of x_j^2.
    sparsity: a float, or a block spec (R, G) (per row inside each block)."""
    score = w.abs().float() * torch.sqrt(x_sq_norm.float())[None, :]
    spec = as_spec(sparsity)
    if spec is not None:
        return block_row_keep(score, spec)
    return score_mask(score, sparsity, pattern, per_row=True)


def sparsegpt(W: Tensor, H: Tensor, sparsity: float | Tensor, pattern: str = "unstructured", blocksize: int = 128,
              percdamp: float = 0.01, bits: int | None = None, group_size: int | None = None,
              sym: bool = False, grid: tuple[Tensor, Tensor] | None = None
              ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor] | None]:
    """SparseGPT: prune W (rows, cols) with OBS updates of the surviving weights, mask chosen per block
    by w^2 / [H^-1]_jj^2. With bits set, survivors are quantized jointly (group parameters from the
    current surviving weights; with `grid` = fixed (scales, zeros) (rows, n_groups), on that grid instead:
    pruning a weight that is already quantized keeps its format). Returns (W_hat float32, keep mask,
    (codes, scales, zeros) or None).
    sparsity may be a block spec (R, G): each block's share of a column block of the adaptive mask is
    pruned by its own threshold (round(entries * S[r, g]) per intersection of block and column block)."""
    rows, cols = W.shape
    nm = parse_pattern(pattern)
    spec = as_spec(sparsity)
    if spec is not None:
        if nm is not None:
            raise ValueError("a block sparsity spec needs pattern 'unstructured'")
        hr, wg = check_spec(spec, (rows, cols))
    if bits is not None:
        quant.check_groups(cols, group_size)
        if group_size:
            blocksize = group_size * max(1, blocksize // group_size)
    U, _ = inverse_hessian_chol(H, percdamp)
    gs = group_size or cols
    # transposed layout (a column of W is a contiguous row of WT) and two-level lazy batching as in gptq:
    # a sub-block never splits an N:M group or starts inside a quantization group
    WT = W.float().t().clone(memory_format=torch.contiguous_format)      # (cols, rows), always a copy
    WT[torch.diag(H) == 0] = 0                                           # dead inputs
    KT = torch.ones(cols, rows, dtype=torch.bool, device=W.device)
    QT = torch.zeros(cols, rows, dtype=torch.uint8, device=W.device) if bits else None
    S = torch.zeros(rows, quant.n_groups(cols, group_size), device=W.device) if bits else None
    Z = torch.zeros_like(S) if bits else None
    if grid is not None:
        if bits is None or grid[0].shape != S.shape or grid[1].shape != S.shape:
            raise ValueError(f"grid needs bits and (scales, zeros) of shape {tuple(S.shape) if bits else '?'}")
        S.copy_(grid[0]), Z.copy_(grid[1])
    elif bits is not None and group_size is None:  # per-channel: one range per row, from the whole row
        S[:, 0], Z[:, 0] = quant.scale_zero(WT.t(), bits, sym)
    sub = next((b for b in (32, 16, 8, 4, 2, 1) if (bits is None or group_size is None or gs % b == 0)
                and (nm is None or b % nm[1] == 0)), blocksize)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1 = WT[i1:i2], U[i1:i2, i1:i2]                              # (B, rows) view, (B, B)
        d1 = torch.diag(U1)
        K1 = KT[i1:i2]
        if nm is None and spec is not None:
            score = W1 ** 2 / d1[:, None] ** 2                           # (B, rows)
            K1.copy_(_spec_block_keep(score, spec, hr, wg, i1))
        elif nm is None:
            score = W1 ** 2 / d1[:, None] ** 2
            K1.copy_(_keep_lowest_pruned(score.reshape(1, -1), int(score.numel() * sparsity)).reshape(score.shape))
        E1 = torch.empty_like(W1)
        if bits is None:
            _prune_columns(W1, U1, K1, E1, d1, sub, nm)
        else:
            Wr, Er, Ur, Kr = W1.unbind(0), E1.unbind(0), U1.unbind(0), K1.unbind(0)   # per-column views, made once
            piv = d1.tolist()
            with single_thread():
                for j1 in range(0, i2 - i1, sub):
                    j2 = min(j1 + sub, i2 - i1)
                    for i in range(j1, j2):
                        if nm is not None and i % nm[1] == 0:
                            n, m = nm
                            score = W1[i:i + m] ** 2 / d1[i:i + m, None] ** 2          # (m, rows)
                            K1[i:i + m] = _nm_keep(score.t(), n, m).t()
                        w, k = Wr[i], Kr[i]
                        col = i1 + i
                        if grid is None and group_size is not None and col % gs == 0:
                            g_end = min(i + gs, i2 - i1)
                            s, z = quant.scale_zero((W1[i:g_end] * K1[i:g_end]).t(), bits, sym)
                            S[:, col // gs], Z[:, col // gs] = s, z
                        s, z = S[:, col // gs], Z[:, col // gs]
                        qc = quant.quantize(w * k, s, z, bits)
                        QT[col] = qc.to(torch.uint8)
                        wq = quant.dequantize(qc, s, z) * k
                        err = torch.sub(w, wq, out=Er[i]).div_(piv[i])        # (rows,)
                        W1[i + 1:j2].addr_(Ur[i][i + 1:j2], err, alpha=-1)
                        w.copy_(wq)
                    W1[j2:].addmm_(U1[j1:j2, j2:].t(), E1[j1:j2], alpha=-1)
        WT[i2:].addmm_(U[i1:i2, i2:].t(), E1, alpha=-1)
    WT *= KT
    return WT.t(), KT.t(), ((QT.t(), S, Z) if bits is not None else None)


def _spec_block_keep(scoreT: Tensor, spec: Tensor, hr: int, wg: int, c0: int) -> Tensor:
    """Keep mask (B, rows) of SparseGPT's column block starting at column c0 (scores transposed): every part
    of a spec block (r, g) inside it prunes round(entries * S[r, g]) of its lowest scores."""
    B, rows = scoreT.shape
    keep = torch.ones_like(scoreT, dtype=torch.bool)
    for g in range(c0 // wg, (c0 + B - 1) // wg + 1):
        a, b = max(g * wg, c0) - c0, min((g + 1) * wg, c0 + B) - c0
        keep[a:b] = block_keep(scoreT[a:b].t(), spec[:, g:g + 1]).t()
    return keep


def _prune_columns(W1: Tensor, U1: Tensor, K1: Tensor, E1: Tensor, d1: Tensor, sub: int,
                   nm: tuple[int, int] | None) -> None:
    """SparseGPT's column loop over one block without quantization, in place: W1 (B, rows) pruned by K1 (B, rows)
    (an N:M mask is chosen here, one group of m columns at a time), the surviving weights OBS-updated; E1 (B,
    rows) gets the scaled errors. Three elementwise ops per column, through numpy views on CPU."""
    Kf = K1.float()                                                      # (B, rows)
    D1 = (1 - Kf).div_(d1[:, None])                                      # pruned: 1 / [U]_jj, kept: 0
    xp, Wn, En, Un, Kn, Dn = loop_arrays(W1, E1, U1, Kf, D1)
    with single_thread():
        for j1 in range(0, W1.shape[0], sub):
            j2 = min(j1 + sub, W1.shape[0])
            for i in range(j1, j2):
                if nm is not None and i % nm[1] == 0:
                    n, m = nm
                    K1[i:i + m] = _nm_keep((W1[i:i + m] ** 2 / d1[i:i + m, None] ** 2).t(), n, m).t()
                    Kf[i:i + m] = K1[i:i + m]
                    torch.sub(1, Kf[i:i + m], out=D1[i:i + m]).div_(d1[i:i + m, None])
                w, e = Wn[i], En[i]                                       # (rows,) each
                xp.multiply(w, Dn[i], out=e)                             # (w - w k) / [U]_ii
                xp.multiply(w, Kn[i], out=w)
                Wn[i + 1:j2] -= Un[i, i + 1:j2, None] * e
            W1[j2:].addmm_(U1[j1:j2, j2:].t(), E1[j1:j2], alpha=-1)


def sparsity(w: Tensor) -> float:
    """Fraction of exact zeros."""
    return 1.0 - int(torch.count_nonzero(w)) / w.numel()


def is_nm(w_or_keep: Tensor, n: int, m: int) -> bool:
    """True when every group of m consecutive entries of each row has at most n non-zeros."""
    nz = (w_or_keep != 0).reshape(w_or_keep.shape[0], -1, m).sum(-1)
    return bool((nz <= n).all())
