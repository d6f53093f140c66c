"""Weight clustering (1-D k-means codebooks) and the rank probes of "Only relative ranks matter in
weight-clustered LLMs" (arXiv 2603.17917).

A matrix W (rows, cols) is split into G groups of consecutive output channels (G = 1: one codebook per
matrix); every group g gets a codebook c_g (K,) and every weight an index i_rc, so w_hat_rc = c_g[i_rc].

k-means is weighted 1-D Lloyd, minimising sum_rc omega_rc (w_rc - c_g[i_rc])^2 (omega = 1, or a per-input-
channel sensitivity as in SqueezeLLM, arXiv 2306.07629). It runs on a fine histogram: one O(n) pass bins the
values (2^16 bins per group at most) and accumulates sum(omega) and sum(omega w) per bin, then every Lloyd
iteration is O(G K) on prefix sums (cluster = interval of bins, boundary = the bin edge nearest the midpoint
of two centroids, centroid = exact weighted mean of its members). 1-D Lloyd has local optima, so several
initialisations (Gaussian / histogram p^(1/3) quantiles, weighted quantiles, uniform, seeded jitters) run
batched and the best per group is kept. No sort of the n values and no per-element Python.

Rank probes (pure functions on codebooks, G x K):
  scramble_centroids          same set of values per codebook, randomly permuted (ranks destroyed);
  rank_preserving_resample    the paper's rank-preserving replacement: K values drawn from the fitted
                              centroid distribution (a pool of centroid values, e.g. all codebooks of the
                              matrix), sorted and put in the original rank order: ranks and the value
                              distribution kept, every individual value changed;
  rank_preserving_randomise   a harsher stress test, not the paper's probe: every gap between sorted
                              centroids scaled by a random Exp(1) factor, range kept (ranks kept, but the
                              dense central centroids move by a large share of the range);
  affine_correct              w' = a w + b, a > 0, matching the reference matrix's mean and std.
Centroid fine-tuning: with frozen indices, dL/dc_g[k] = sum of dL/dw over the weights of cluster k
(centroid_grad)."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

KS = (8, 16, 32, 64, 256)


def n_bins(m: int) -> int:
    """Histogram resolution for groups of m values: the next power of two of m, in [256, 65536]."""
    return int(min(65536, max(256, 1 << max(0, math.ceil(math.log2(max(m, 1)))))))


def _histogram(w: Tensor, omega: Tensor | None, bins: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Bin w (G, m) per group on [min, max]. Returns lo (G,), width (G,) float64, the flat bin index of
    every value (G * m,) int32 (group g's bins at g * bins ...), prefix sums of omega and of omega * w over
    bins (G, bins + 1) float64."""
    G, m = w.shape
    lo, hi = w.amin(1), w.amax(1)                                            # (G,)
    # width leaves half a bin of margin above max, so (w - lo) / width < bins - 1/4 even after float32 rounding
    width = ((hi.double() - lo.double()) / (bins - 0.5)).clamp(min=1e-30)   # (G,)
    flat = ((w - lo[:, None]) * (1 / width).float()[:, None]).to(torch.int32)                       # (G, m)
    if G > 1:
        flat += torch.arange(0, G * bins, bins, dtype=torch.int32, device=w.device)[:, None]
    flat = flat.reshape(-1)
    if omega is None:
        cnt = torch.bincount(flat, minlength=G * bins).double()
        sx = torch.bincount(flat, weights=w.reshape(-1), minlength=G * bins).double()
    else:
        om = omega.float().expand_as(w)
        cnt = torch.bincount(flat, weights=om.reshape(-1), minlength=G * bins).double()
        sx = torch.bincount(flat, weights=(om * w).reshape(-1), minlength=G * bins).double()
    zero = torch.zeros(G, 1, dtype=torch.float64, device=w.device)
    return (lo.double(), width, flat, torch.cat([zero, cnt.reshape(G, bins).cumsum(1)], 1),
            torch.cat([zero, sx.reshape(G, bins).cumsum(1)], 1))


def _interval_sums(P: Tensor, edges: Tensor) -> Tensor:
    """Sums over the bin intervals [edges_k, edges_k+1): P (G, bins + 1) prefix sums, edges (G, R, K + 1)
    -> (G, R, K)."""
    G, R, K1 = edges.shape
    at = P.gather(1, edges.reshape(G, R * K1)).reshape(G, R, K1)
    return at[..., 1:] - at[..., :-1]


def _edges(c: Tensor, lo: Tensor, width: Tensor, bins: int) -> Tensor:
    """Cluster boundaries (G, R, K + 1) as bin indices: the bin edge nearest each midpoint of adjacent
    centroids c (G, R, K) (kept monotone)."""
    mids = (c[..., 1:] + c[..., :-1]) / 2                                     # (G, R, K - 1)
    inner = torch.round((mids - lo[:, None, None]) / width[:, None, None]).clamp(0, bins).long()
    inner = torch.cummax(inner, -1).values
    first = torch.zeros(*c.shape[:2], 1, dtype=torch.long, device=c.device)
    return torch.cat([first, inner, torch.full_like(first, bins)], -1)


def _init_centroids(P_cnt: Tensor, P_sx: Tensor, lo: Tensor, width: Tensor, k: int, restarts: int,
                    seed: int | None) -> Tensor:
    """Initial centroids (G, R, k), sorted. Restart 0: weighted quantiles of a Gaussian with the data's mean
    and sqrt(3) x its std, i.e. the high-resolution optimal point density p^(1/3) of a Gaussian (Panter &
    Dite 1951); 1: the same density from the histogram (pooled to <= 256 bins); 2: weighted quantiles;
    3: uniform on [min, max]; the rest: restart 0 and 1 with levels (i + u_i) / k, u_i ~ U[0, 1) from `seed`."""
    G, bins = P_cnt.shape[0], P_cnt.shape[1] - 1
    dev = P_cnt.device
    centres = lo[:, None] + (torch.arange(bins, device=dev, dtype=torch.float64) + 0.5) * width[:, None]
    cnt = P_cnt[:, 1:] - P_cnt[:, :-1]                                                      # (G, bins)
    tot = P_cnt[:, -1:].clamp(min=1e-300)
    mean = P_sx[:, -1:] / tot
    std = (((centres - mean) ** 2 * cnt).sum(1, keepdim=True) / tot).sqrt().clamp(min=1e-30)

    def quantiles(density: Tensor, edges_at: Tensor, levels: Tensor) -> Tensor:
        """Values at the given CDF levels (G, k) of a piecewise-uniform density on cells [edges_at]."""
        cdf = torch.cat([torch.zeros(G, 1, dtype=torch.float64, device=dev), density.cumsum(1)], 1)
        cdf = cdf / cdf[:, -1:].clamp(min=1e-300)
        j = torch.searchsorted(cdf[:, 1:].contiguous(), levels.contiguous()).clamp(max=cdf.shape[1] - 2)
        c0, c1 = cdf.gather(1, j), cdf.gather(1, j + 1)
        frac = ((levels - c0) / (c1 - c0).clamp(min=1e-300)).clamp(0, 1)
        x0, x1 = edges_at.gather(1, j), edges_at.gather(1, j + 1)
        return x0 + frac * (x1 - x0)

    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    pool = max(1, bins // 256)
    coarse = P_cnt[:, ::pool]                                                               # (G, nc + 1)
    hist13 = (coarse[:, 1:] - coarse[:, :-1]).clamp(min=0) ** (1 / 3)
    hist_edges = lo[:, None] + torch.arange(coarse.shape[1], device=dev, dtype=torch.float64) * pool * width[:, None]
    all_edges = lo[:, None] + torch.arange(bins + 1, device=dev, dtype=torch.float64) * width[:, None]

    def gauss13(levels):
        z = normal.icdf(levels.clamp(1e-9, 1 - 1e-9))
        hi = lo[:, None] + bins * width[:, None]
        return torch.minimum(torch.maximum(mean + 3 ** 0.5 * std * z, lo[:, None]), hi)

    mid = ((torch.arange(k, dtype=torch.float64, device=dev) + 0.5) / k).expand(G, k)
    inits = [gauss13(mid), quantiles(hist13, hist_edges, mid), quantiles(cnt, all_edges, mid),
             lo[:, None] + mid * bins * width[:, None]]
    gen = torch.Generator().manual_seed(0 if seed is None else int(seed))
    for r in range(max(0, restarts - len(inits))):
        u = torch.rand(k, generator=gen, dtype=torch.float64).to(dev)
        lv = ((torch.arange(k, dtype=torch.float64, device=dev) + u) / k).expand(G, k)
        inits.append(gauss13(lv) if r % 2 == 0 else quantiles(hist13, hist_edges, lv))
    return torch.sort(torch.stack(inits[:max(1, restarts)], 1), -1).values               # (G, R, k)


def kmeans_1d(w: Tensor, k: int, omega: Tensor | None = None, iters: int = 100, seed: int | None = 0,
              bins: int | None = None, restarts: int = 8, tol: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Weighted 1-D k-means per row-group. w (G, m); omega: None or sensitivities broadcastable to (G, m).
    All `restarts` initialisations run batched; the one with the lowest weighted error wins per group.
    Returns codebook (G, k) float32, sorted ascending (each entry the weighted mean of its members), and
    indices (G, m) in [0, k), uint8 for k <= 256 (int64 above)."""
    if w.dim() != 2:
        raise ValueError(f"kmeans_1d expects (groups, values), got shape {tuple(w.shape)}")
    w = w.float()
    G, m = w.shape
    bins = bins or n_bins(m)
    lo, width, flat, P_cnt, P_sx = _histogram(w, omega, bins)
    c = _init_centroids(P_cnt, P_sx, lo, width, k, restarts, seed)                        # (G, R, k)
    sxx = ((w * w).sum(1) if omega is None else (omega.float().expand_as(w) * w * w).sum(1)).double()   # (G,)
    edges = _edges(c, lo, width, bins)
    prev = None
    for it in range(iters):
        wsum, xsum = _interval_sums(P_cnt, edges), _interval_sums(P_sx, edges)
        c = torch.where(wsum > 0, xsum / wsum.clamp(min=1e-300), c)
        new = _edges(c, lo, width, bins)
        if torch.equal(new, edges):
            break
        edges = new
        if it % 10 == 9:        # stop once the best restarts' error improves by < tol per 10 iterations
            wsum, xsum = _interval_sums(P_cnt, edges), _interval_sums(P_sx, edges)
            err = (sxx - (xsum ** 2 / wsum.clamp(min=1e-300)).sum(-1).amax(1)).sum()
            if prev is not None and float(prev - err) <= tol * float(err):
                break
            prev = err
    wsum, xsum = _interval_sums(P_cnt, edges), _interval_sums(P_sx, edges)
    c = torch.where(wsum > 0, xsum / wsum.clamp(min=1e-300), c)
    # error = sum omega w^2 - sum_k S_k^2 / W_k: the best restart maximises the second term
    gain = torch.where(wsum > 0, xsum ** 2 / wsum.clamp(min=1e-300), torch.zeros_like(xsum)).sum(-1)   # (G, R)
    best = gain.argmax(1)                                                                   # (G,)
    ar = torch.arange(G, device=w.device)
    c, edges = c[ar, best], edges[ar, best]                                                 # (G, k), (G, k + 1)
    # lut: cluster of every bin = number of inner edges <= bin
    lut = torch.searchsorted(edges[:, 1:-1].contiguous(),
                             torch.arange(bins, device=w.device).expand(G, bins).contiguous(), right=True)
    dt = torch.uint8 if k <= 256 else torch.int64
    idx = torch.index_select(lut.to(dt).reshape(-1), 0, flat).reshape(G, m)              # (G, m)
    return c.float(), idx


def to_groups(W: Tensor, group_rows: int | None) -> Tensor:
    """(rows, cols) -> (G, group_rows * cols), G = rows / group_rows (G = 1 when group_rows is None)."""
    rows, cols = W.shape
    g = group_rows or rows
    if rows % g:
        raise ValueError(f"group_rows {g} does not divide the {rows} output channels")
    return W.reshape(rows // g, g * cols)


def from_groups(x: Tensor, rows: int, cols: int) -> Tensor:
    return x.reshape(rows, cols)


def cluster_matrix(W: Tensor, k: int, group_rows: int | None = None, col_weight: Tensor | None = None,
                   iters: int = 100, seed: int | None = 0, restarts: int = 8) -> tuple[Tensor, Tensor]:
    """Cluster W (rows, cols) with one codebook per group of `group_rows` output channels (whole matrix when
    None); col_weight (cols,) is the per-input-channel sensitivity omega_rc = col_weight_c.
    Returns codebook (G, k) rounded to fp16 (returned as float32) and indices (rows, cols) uint8/int16."""
    rows, cols = W.shape
    omega = None
    if col_weight is not None:
        cw = col_weight.float().to(W.device)
        cw = cw + 1e-8 * cw.mean().clamp(min=1e-30)                   # dead channels still count a little
        omega = to_groups(cw[None, :].expand(rows, cols), group_rows)
    c, idx = kmeans_1d(to_groups(W.float(), group_rows), k, omega, iters, seed, restarts=restarts)
    c16 = c.half().float()
    dt = torch.uint8 if k <= 256 else torch.int16
    return c16, from_groups(idx, rows, cols).to(dt)


def decode(codebook: Tensor, idx: Tensor, group_rows: int | None) -> Tensor:
    """w_hat (rows, cols) = codebook[group(row), idx]. codebook (G, K), idx (rows, cols)."""
    rows, cols = idx.shape
    G, K = codebook.shape
    flat = to_groups(idx.long(), group_rows) + torch.arange(G, device=idx.device)[:, None] * K
    return codebook.reshape(-1)[flat].reshape(rows, cols)


def centroid_grad(grad_w: Tensor, idx: Tensor, group_rows: int | None, k: int) -> Tensor:
    """dL/dc (G, k) = sum of dL/dw over each cluster's weights. grad_w, idx: (rows, cols)."""
    rows, cols = idx.shape
    G = rows // (group_rows or rows)
    flat = (to_groups(idx.long(), group_rows) + torch.arange(G, device=idx.device)[:, None] * k).reshape(-1)
    out = torch.zeros(G * k, dtype=torch.float32, device=grad_w.device)
    out.index_add_(0, flat, to_groups(grad_w.float(), group_rows).reshape(-1))
    return out.reshape(G, k)


def sse(W: Tensor, W_hat: Tensor, col_weight: Tensor | None = None) -> float:
    """sum omega (w - w_hat)^2 (omega_rc = col_weight_c, or 1)."""
    d = (W.double() - W_hat.double()) ** 2
    return float(d.sum() if col_weight is None else (d * col_weight.double()[None, :]).sum())


def bits_per_weight(k: int, rows: int, cols: int, group_rows: int | None) -> float:
    """Stored bits per weight: log2(K)-bit indices plus fp16 codebooks (G * K * 16 bits)."""
    G = rows // (group_rows or rows)
    return math.ceil(math.log2(k)) + 16 * G * k / (rows * cols)


# ---- rank probes --------------------------------------------------------------------------------------

def scramble_centroids(codebook: Tensor, seed: int = 0) -> Tensor:
    """Permute each codebook's values (G, K) at random: the same set, ranks destroyed."""
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.argsort(torch.rand(codebook.shape, generator=gen), dim=1).to(codebook.device)   # (G, K)
    return codebook.gather(1, perm)


def rank_preserving_resample(codebook: Tensor, pool: Tensor | None = None, seed: int = 0, own: bool = False) -> Tensor:
    """Sorted resamples of the fitted centroids: for each codebook (G, K), K values drawn uniformly with
    replacement from `pool` (1-D; default all the codebooks' values), sorted, and assigned in the codebook's
    own rank order. Expected value distribution = the pool's; within-codebook order kept (Spearman with
    the original >= 0 always, = 1 without ties; draws can repeat a value, which merges two clusters, likelier
    for a small pool: G = 1 with K = 16 resamples its own 16 values). `own=True`: every codebook g draws
    from its own K values only (seed * 7919 + g), so each keeps its own distribution."""
    if own:
        if pool is not None:
            raise ValueError("rank_preserving_resample: own=True draws from each codebook's own values; pass no pool")
        return torch.cat([rank_preserving_resample(codebook[g:g + 1], seed=int(seed) * 7919 + g)
                          for g in range(codebook.shape[0])])
    G, K = codebook.shape
    gen = torch.Generator().manual_seed(int(seed))
    cb = codebook.double().cpu()
    src = (cb if pool is None else pool.double().cpu()).reshape(-1)                       # (P,)
    draws = src[torch.randint(0, src.numel(), (G, K), generator=gen)]                     # (G, K)
    new_sorted = torch.sort(draws, dim=1).values                                          # (G, K)
    order = torch.argsort(cb, dim=1, stable=True)                                          # rank -> slot
    out = torch.empty_like(cb).scatter_(1, order, new_sorted)
    return out.to(codebook.dtype).to(codebook.device)


def rank_preserving_randomise(codebook: Tensor, seed: int = 0) -> Tensor:
    """New values for each codebook (G, K) in the original rank order: the sorted centroids' gaps are each
    multiplied by an independent Exp(1) factor (mean 1) and rescaled to span the original [min, max], so
    every value changes at random while the order (and hence every Spearman correlation with the original)
    is kept and the coarse shape (dense middle, sparse tails) survives."""
    G, K = codebook.shape
    gen = torch.Generator().manual_seed(int(seed))
    cb = codebook.double().cpu()
    srt, order = torch.sort(cb, dim=1, stable=True)                                       # (G, K)
    gaps = srt[:, 1:] - srt[:, :-1]                                                        # (G, K - 1)
    e = -torch.log1p(-torch.rand(G, K - 1, generator=gen, dtype=torch.float64))            # Exp(1) > 0
    new_gaps = gaps * e
    span, new_span = gaps.sum(1, keepdim=True), new_gaps.sum(1, keepdim=True)
    new_gaps = torch.where(new_span > 0, new_gaps * span / new_span.clamp(min=1e-300), gaps)
    new_sorted = torch.cat([srt[:, :1], srt[:, :1] + new_gaps.cumsum(1)], 1)              # (G, K)
    out = torch.empty_like(cb).scatter_(1, order, new_sorted)                             # back to original slots
    return out.to(codebook.dtype).to(codebook.device)


def affine_params(w_new: Tensor, w_ref: Tensor) -> tuple[float, float]:
    """(a, b), a > 0, such that a * w_new + b has w_ref's mean and (population) std."""
    x, r = w_new.double(), w_ref.double()
    sx = float(x.std(unbiased=False))
    if sx == 0:
        raise ValueError("affine correction needs a matrix with non-zero spread (all its weights are equal)")
    a = float(r.std(unbiased=False)) / sx
    return a, float(r.mean()) - a * float(x.mean())


def affine_correct(w_new: Tensor, w_ref: Tensor) -> Tensor:
    """w' = a w_new + b (a > 0) matching w_ref's mean and std per matrix; order of w_new is kept."""
    a, b = affine_params(w_new, w_ref)
    return (a * w_new.double() + b).to(w_new.dtype)


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman rank correlation with average ranks for ties (Pearson of the ranks)."""
    from scipy.stats import rankdata
    rx = rankdata(x.detach().double().cpu().numpy().ravel())
    ry = rankdata(y.detach().double().cpu().numpy().ravel())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float(np.dot(rx, rx)) * float(np.dot(ry, ry)))
    return float(np.dot(rx, ry)) / den if den else float("nan")
