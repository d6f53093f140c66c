"""Pure mask math shared by mask fine-tuning and safety-potential pruning. Masks are *keep* masks
(True / 1 = the weight survives), as in modelpress.algos.prune.

- Mask fine-tuning (MFT, "Boosting LLMs with Mask Fine-Tuning", arXiv 2503.22764): real-valued scores
  S (rows, cols) per weight; the binary mask M = top-k(S) keeps the k = round(keep * rows * cols)
  highest scores over the whole matrix; the forward uses W * M, the backward passes dL/dM straight
  through to S (straight-through estimator, STE): dL/dS := dL/dM.
- Safety-potential pruning (arXiv 2603.14219): N paired prompts, request i with (s) and without (p) the
  safety prompt; X_s,i / X_p,i the inputs of a linear layer on them; per input channel j,
  delta_j = (1/N) sum_i (sum_t x_s,i,tj^2 - sum_t x_p,i,tj^2) (per-sample sums, so the safety prompt's own
  tokens count); score_ij = |W_ij| * sqrt(delta_j) where delta_j > 0. Channels with delta_j <= 0 are
  never pruned before a responsive one (score +inf): in the authors' code their score is not a number
  and sorts last. Among responsive weights, those that respond least to the safety prompt go first.
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


def paired_sq_delta(sq_with: Tensor, sq_without: Tensor, pairs: int) -> Tensor:
    """delta_j = (1/N) sum_i (sum_t x_with,i,tj^2 - sum_t x_without,i,tj^2) from the per-channel sums of
    squares over all N samples of each stream (cols,): the sum over pairs of per-sample differences equals
    the difference of the stream totals, because both streams hold the same N requests once each."""
    if pairs <= 0:
        raise ValueError(f"safety-potential statistics need at least one prompt pair, got {pairs}")
    return (sq_with.double() - sq_without.double()) / pairs


def safety_potential_score(W: Tensor, delta: Tensor) -> Tensor:
    """score_ij = |W_ij| * sqrt(delta_j) where delta_j > 0, +inf where delta_j <= 0 (or NaN): such channels
    are pruned only once every responsive weight of the row is gone. W (rows, cols), delta (cols,)."""
    d = torch.nan_to_num(delta.double(), nan=0.0, posinf=float("inf"), neginf=0.0)        # (cols,)
    s = W.abs().double() * torch.sqrt(d.clamp(min=0.0))[None, :]                          # (rows, cols)
    return torch.where((d > 0)[None, :], s, torch.full_like(s, float("inf"))).float()


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
