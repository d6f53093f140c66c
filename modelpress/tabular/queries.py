"""Synthetic query generation for data-free tabular distillation (TabKD, arXiv 2603.15481).

* `sample_in_bins`: covering-array rows (bin indices) -> concrete values, uniform inside each
  bin (integers inside integer bins, the level itself for categorical features).
* `refine_boundaries`: boundary refinement. Pair each labelled query with its nearest
  neighbour (in range-normalised space) that the teacher labels differently and bisect the
  segment between them; every bisection midpoint is a teacher query, so the new points
  converge onto the teacher's decision boundary from both sides; after s steps a pair's
  bracket is 2^-s of its length. With `spread`, the pairs are chosen by farthest-point
  order of their midpoints among the tighter half of the brackets (`farthest_points`), so
  the exact boundary points cover the whole boundary instead of its densest stretch.
* `balance_seeds`: class balancing. Queries spread over the spec box can leave a class
  whose region is a thin sliver of the box with a handful of points (the student then
  extrapolates it); new seeds are drawn around existing queries of the rarest teacher
  labels (Gaussian steps in range-normalised space), allotted by water-filling so that the
  label counts move towards equal -- the class-balance idea of data-free KD (DAFL's
  information-entropy term, Chen et al. 2019), done with teacher labels instead of a loss.
* Baseline generators that use the spec only: `uniform_queries` (uniform in the box, uniform
  over levels) and `gaussian_queries` (per feature N(mid, (range/4)^2) clipped to the range).
"""
from __future__ import annotations

import numpy as np

from modelpress.tabular.bins import Bins
from modelpress.tabular.spec import FeatureSpec, uniform_queries  # noqa: F401 (re-exported)
from modelpress.tabular.teacher import Teacher


def snap(X: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    """Project values onto the spec: clip to range, round integers, nearest categorical level."""
    X = X.copy()
    for j, f in enumerate(spec.features):
        if f.kind == "categorical":
            lv = np.asarray(f.levels, dtype=np.float64)
            X[:, j] = lv[np.abs(X[:, j, None] - lv[None, :]).argmin(1)]
        else:
            X[:, j] = np.clip(X[:, j], f.low, f.high)
            if f.kind == "integer":
                X[:, j] = np.clip(np.round(X[:, j]), np.ceil(f.low), np.floor(f.high))
    return X


def bin_intervals(spec: FeatureSpec, bins: Bins, j: int) -> tuple[np.ndarray, np.ndarray]:
    """[lower, upper] of every bin of numeric/integer feature j.  -> (v_j,), (v_j,)"""
    f = spec.features[j]
    e = bins.edges[j]
    return np.concatenate([[f.low], e]), np.concatenate([e, [f.high]])


def sample_in_bins(L: np.ndarray, spec: FeatureSpec, bins: Bins, rng: np.random.Generator) -> np.ndarray:
    """Concrete queries for design rows.  L (n, d) bin indices -> X (n, d) float64."""
    n, d = L.shape
    X = np.empty((n, d), dtype=np.float64)
    U = rng.random((n, d))
    for j, f in enumerate(spec.features):
        if f.kind == "categorical":
            X[:, j] = np.asarray(f.levels, dtype=np.float64)[L[:, j]]
            continue
        lo, hi = bin_intervals(spec, bins, j)
        a, b = lo[L[:, j]], hi[L[:, j]]
        if f.kind == "integer":  # integers k with a < k <= b (bin 0 also holds a itself)
            first = np.where(L[:, j] == 0, np.ceil(a), np.floor(a) + 1)
            last = np.floor(b)
            X[:, j] = first + np.floor(U[:, j] * (last - first + 1))
        else:
            X[:, j] = a + U[:, j] * (b - a)
    return snap(X, spec)


def gaussian_queries(spec: FeatureSpec, n: int, rng: np.random.Generator) -> np.ndarray:
    """Per feature N(mid, (range/4)^2) fitted to the spec range only, clipped; levels uniform."""
    lo, hi = spec.bounds()
    Z = rng.standard_normal((n, len(spec)))
    X = (lo + hi)[None, :] / 2 + Z * (hi - lo)[None, :] / 4
    Xu = uniform_queries(spec, n, rng)
    cat = np.array([f.kind == "categorical" for f in spec.features])
    X[:, cat] = Xu[:, cat]
    return snap(X, spec)


def normalise(X: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    """Map the spec box to [-1, 1]^d (constant features map to 0).  (n, d) -> (n, d)"""
    lo, hi = spec.bounds()
    half = np.where(hi > lo, (hi - lo) / 2, 1.0)
    return (X - (lo + hi) / 2) / half


def farthest_points(Z: np.ndarray, k: int) -> np.ndarray:
    """Greedy farthest-point order: index 0, then repeatedly the point farthest from those
    chosen.  Z (n, d) -> (min(k, n),) indices."""
    k = min(k, len(Z))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    idx = [0]
    dist = ((Z - Z[0]) ** 2).sum(1)  # (n,) squared distance to the chosen set
    for _ in range(k - 1):
        i = int(dist.argmax())
        idx.append(i)
        dist = np.minimum(dist, ((Z - Z[i]) ** 2).sum(1))
    return np.asarray(idx, dtype=np.int64)


def refine_boundaries(teacher: Teacher, spec: FeatureSpec, X: np.ndarray, P: np.ndarray, budget: int,
                      rng: np.random.Generator, steps: int = 3, max_pool: int = 2048,
                      spread: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Bisect between nearest differently-labelled query pairs; <= budget new teacher queries.

    X (n, d), P (n, C): labelled queries so far. Pairs: each pool point and its nearest
    differently-labelled pool point; the closest `budget // steps` of them, or with `spread`
    the farthest-point selection (midpoints, normalised space) among the closest half.
    Each pair costs `steps` queries; at each step
    the midpoint m is queried and replaces the end point with the same teacher label, so the
    bracket [x_a, x_b] shrinks onto the boundary. Returns (X_new (q, d), P_new (q, C)).
    """
    d = X.shape[1]
    y = P.argmax(1)
    if budget <= 0 or len(np.unique(y)) < 2:
        return np.zeros((0, d)), np.zeros((0, P.shape[1]))
    pool = rng.permutation(len(X))[:max_pool]
    Xp, yp = X[pool], y[pool]
    Z = normalise(Xp, spec)
    sq = (Z * Z).sum(1)
    D = sq[:, None] + sq[None, :] - 2 * Z @ Z.T  # (m, m) squared distances
    D[yp[:, None] == yp[None, :]] = np.inf
    nn = D.argmin(1)
    ok = np.isfinite(D[np.arange(len(pool)), nn])
    starts = np.flatnonzero(ok)
    # closest pairs first: they bracket the boundary most tightly
    starts = starts[np.argsort(D[starts, nn[starts]], kind="stable")]
    n_pairs = min(len(starts), max(budget // steps, 1))
    if spread:
        # among the tighter half of the brackets, pick pairs whose midpoints are spread over
        # the boundary (farthest-point order) instead of the n closest, which cluster
        cand = starts[:max(n_pairs, len(starts) // 2)]
        mids = (Z[cand] + Z[nn[cand]]) / 2
        starts = cand[farthest_points(mids, n_pairs)]
    else:
        starts = starts[:n_pairs]
    A, B = Xp[starts].copy(), Xp[nn[starts]].copy()  # (p, d)
    ya = yp[starts]
    out_X, out_P, used = [], [], 0
    for _ in range(steps):
        take = min(len(A), budget - used)
        if take <= 0:
            break
        A, B, ya = A[:take], B[:take], ya[:take]
        M = snap((A + B) / 2, spec)
        Pm = teacher.proba(M)
        used += len(M)
        out_X.append(M)
        out_P.append(Pm)
        same = Pm.argmax(1) == ya
        A = np.where(same[:, None], M, A)
        B = np.where(same[:, None], B, M)
    return np.concatenate(out_X), np.concatenate(out_P)


def water_fill(counts: np.ndarray, n: int) -> np.ndarray:
    """Split n new items over classes so that counts + alloc is as equal as possible
    (lowest first).  counts (C,) -> alloc (C,) int, sum n."""
    c = np.asarray(counts, dtype=np.int64)
    alloc = np.zeros_like(c)
    if n <= 0 or len(c) == 0:
        return alloc
    order = np.argsort(c, kind="stable")
    s = c[order]
    # find the water level: largest k such that the k lowest can be raised to s[k-1] within n
    level_cost = np.arange(1, len(s) + 1) * s - np.cumsum(s)  # cost to raise the k lowest to s[k-1]
    k = int(np.searchsorted(level_cost, n, side="right"))  # classes below the final level
    base = (n + s[:k].sum()) // k
    extra = (n + s[:k].sum()) - base * k
    fill = base - s[:k] + (np.arange(k) < extra)
    alloc[order[:k]] = fill
    return alloc


def balance_seeds(X: np.ndarray, y: np.ndarray, spec: FeatureSpec, n: int, rng: np.random.Generator,
                  sigma: float = 0.1) -> np.ndarray:
    """n new seeds around queries of the rarest labels.  X (m, d), y (m,) -> (n, d) snapped.

    Classes never seen in y get nothing (there is no point to start from). Each seed is a
    random query of its class plus N(0, sigma^2) per coordinate in [-1, 1]-normalised space.
    """
    seen = np.flatnonzero(np.bincount(y))
    if n <= 0 or len(seen) == 0:
        return np.zeros((0, X.shape[1]))
    alloc = water_fill(np.bincount(y)[seen], n)  # (k,)
    base = np.concatenate([rng.choice(np.flatnonzero(y == c), a) for c, a in zip(seen, alloc) if a > 0])
    lo, hi = spec.bounds()
    half = np.where(hi > lo, (hi - lo) / 2, 0.0)
    Z = normalise(X[base], spec) + sigma * rng.standard_normal((len(base), X.shape[1]))
    return snap(np.clip(Z, -1, 1) * half + (lo + hi) / 2, spec)
