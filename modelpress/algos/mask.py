"""Pure mask math shared by mask fine-tuning and safety-potential pruning. Masks are *keep* masks
(True / 1 = the weight survives), as in modelpress.algos.prune.

- Mask fine-tuning (MFT, "Boosting LLMs with Mask Fine-Tuning", arXiv 2503.22764): real-valued scores
  S (rows, cols) per weight; the binary mask M = top-k(S) keeps the k = round(keep * rows * cols)
  highest scores over the whole matrix; the forward uses W * M, the backward passes dL/dM straight
  through to S (straight-through estimator, STE): dL/dS := dL/dM.
- Safety-potential pruning (arXiv 2603.14219): with X_s / X_p the inputs of a linear layer on prompts
  with / without the safety prompt, delta_j = mean_t x_s,tj^2 - mean_t x_p,tj^2 per input channel j;
  score_ij = |W_ij| * sqrt(max(delta_j, 0)). Weights that respond least to the safety prompt go first.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import prune as P


def keep_count(numel: int, keep: float) -> int:
    """k = round(keep * numel): how many entries a top-k keep mask retains."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep ratio must be in (0, 1], got {keep}")
    return max(1, min(numel, int(round(keep * numel))))


def topk_mask(scores: Tensor, keep: float) -> Tensor:
    """Boolean keep mask of the k = round(keep * numel) highest scores over the whole tensor."""
    flat = scores.detach().reshape(-1)                                  # (rows * cols,)
    k = keep_count(flat.numel(), keep)
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    if k == flat.numel():
        mask[:] = True
    else:
        mask[torch.topk(flat, k, sorted=False).indices] = True
    return mask.reshape(scores.shape)


def ste_mask(scores: Tensor, keep: float) -> Tensor:
    """Binary top-k mask in the forward pass (values exactly 0.0 / 1.0), identity gradient to `scores`.
    Written hard + (S - S.detach()) so the forward value is the hard mask bit for bit."""
    hard = topk_mask(scores, keep).to(scores.dtype)                     # (rows, cols)
    return hard + (scores - scores.detach())


def sq_norm_delta(sq_with: Tensor, n_with: int, sq_without: Tensor, n_without: int) -> Tensor:
    """delta_j = mean_t x_with,tj^2 - mean_t x_without,tj^2 from per-channel sums of squares (cols,) and
    token counts. Per-token means, so streams of different lengths compare fairly."""
    if n_with <= 0 or n_without <= 0:
        raise ValueError(f"both calibration streams need tokens, got {n_with} and {n_without}")
    return sq_with.double() / n_with - sq_without.double() / n_without


def safety_potential_score(W: Tensor, delta: Tensor) -> Tensor:
    """score_ij = |W_ij| * sqrt(max(delta_j, 0)); W (rows, cols), delta (cols,). NaN deltas count as 0."""
    d = torch.nan_to_num(delta.double(), nan=0.0, posinf=0.0, neginf=0.0).clamp(min=0.0)   # (cols,)
    return (W.abs().double() * torch.sqrt(d)[None, :]).float()                              # (rows, cols)


def lexicographic_rank(primary: Tensor, secondary: Tensor) -> Tensor:
    """Per-row rank (0 = least important, cols - 1 = most) ordering by `primary`, ties broken by
    `secondary` (then by column index). Distinct per row, so keep masks built from it are exact even
    when many primary scores tie (e.g. all-zero safety scores)."""
    o1 = torch.argsort(secondary, dim=1, stable=True)                  # (rows, cols)
    o2 = torch.argsort(torch.gather(primary, 1, o1), dim=1, stable=True)
    order = torch.gather(o1, 1, o2)                                     # ascending lexicographic order
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order).contiguous())
    return rank.float()


def ranked_keep(score: Tensor, tiebreak: Tensor, sparsity: float, pattern: str = "unstructured") -> Tensor:
    """Keep mask pruning the lowest (score, tiebreak) entries: `sparsity` of each row (unstructured) or
    all but N of every M consecutive inputs of each row (N:M)."""
    return P.score_mask(lexicographic_rank(score, tiebreak), sparsity, pattern, per_row=True)
