"""Low-rank factorization of weight matrices: W (rows, cols) ~= A B with A (rows, r), B (r, cols).

  svd:  truncated SVD of W (Eckart-Young: the best rank-r approximation in Frobenius norm);
  asvd: activation-aware SVD by whitening with the calibration input covariance, as in SVD-LLM
        (Wang et al., arXiv 2403.07378; ASVD, Yuan et al., arXiv 2312.05821, scales by activations):
        with H = 2 X^T X / n = L L^T (Cholesky, damped), the output error ||(W - W') X^T||_F^2 equals
        (n/2) ||(W - W') L||_F^2, so the truncated SVD of W L = U S V^T gives the best rank-r output
        approximation: W' = U_r S_r V_r^T L^{-1}.
Factors are balanced: A = U_r S_r^(1/2), B = S_r^(1/2) V_r^T (L^{-1}).
Rank selection: by energy (smallest r keeping a fraction of sum s_i^2 of the (whitened) spectrum), by a
parameter budget (r (rows + cols) <= budget * rows * cols), or fixed."""
from __future__ import annotations

import torch
from torch import Tensor


def whitener(H: Tensor, damp: float = 0.01, tries: int = 4) -> Tensor:
    """Lower Cholesky factor L of H + lambda I (cols, cols), lambda = damp * mean(diag H); damping x10 per
    failed try."""
    H = H.double()
    cols = H.shape[0]
    mean_diag = torch.diag(H).mean().clamp(min=1e-12)
    eye = torch.eye(cols, dtype=H.dtype, device=H.device)
    for t in range(tries):
        L, info = torch.linalg.cholesky_ex(H + damp * 10 ** t * mean_diag * eye)
        if info == 0:
            return L
    raise ValueError(f"input covariance is not positive definite even with damping {damp * 10 ** (tries - 1):g}")


def svd_of(W: Tensor, L: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of W (plain) or of W L (whitened; product in float64), computed in float32: U (rows, q), S (q,),
    Vh (q, cols)."""
    M = W.float() if L is None else (W.double() @ L).float()
    return torch.linalg.svd(M, full_matrices=False)


def factors(U: Tensor, S: Tensor, Vh: Tensor, r: int, L: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Balanced rank-r factors A (rows, r), B (r, cols) from an SVD (of W, or of W L with L given)."""
    sq = S[:r].double().sqrt()
    A = U[:, :r].double() * sq[None, :]                          # (rows, r)
    B = sq[:, None] * Vh[:r].double()                            # (r, cols)
    if L is not None:                                            # B L^{-1}: solve X L = B
        B = torch.linalg.solve_triangular(L, B, upper=False, left=False)
    return A.float(), B.float()


def svd_factors(W: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Truncated SVD: the best rank-r approximation of W in Frobenius norm, as (A, B)."""
    return factors(*svd_of(W), r)


def asvd_factors(W: Tensor, H: Tensor, r: int, damp: float = 0.01) -> tuple[Tensor, Tensor]:
    """Activation-aware (whitened) SVD: the best rank-r approximation of W in output error under H."""
    L = whitener(H, damp)
    return factors(*svd_of(W, L), r, L)


def rank_for_energy(S: Tensor, energy: float) -> int:
    """Smallest r with sum_{i<r} s_i^2 >= energy * sum s_i^2 (at least 1)."""
    e = S.double() ** 2
    cum = e.cumsum(0) / e.sum().clamp(min=1e-300)
    return int(min(len(S), int(torch.searchsorted(cum, torch.tensor([energy], dtype=cum.dtype))[0]) + 1))


def rank_for_budget(rows: int, cols: int, budget: float) -> int:
    """Largest r with r (rows + cols) <= budget * rows * cols (at least 1)."""
    return max(1, int(budget * rows * cols // (rows + cols)))


def output_error(W: Tensor, W_hat: Tensor, H: Tensor) -> float:
    """tr((W - W') H (W - W')^T): the layer-output squared error (up to n/2) under input second moment H."""
    D = (W.double() - W_hat.double())
    return float(((D @ H.double()) * D).sum())
