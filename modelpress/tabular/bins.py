"""Adaptive feature bins aligned with the teacher's decision boundaries (TabKD, arXiv 2603.15481).

A feature's bins are the intervals [low, e_1], (e_1, e_2], ..., (e_K, high] between its inner
edges low <= e_1 < ... < e_K < high (K + 1 bins; e_1 = low makes the point bin {low}, a split
"x <= low" of a tree teacher), or its levels when categorical. Edges come from

* the teacher's split thresholds (tree teachers): every distinct threshold inside the range
  when they fit into `max_bins`, else frequency-weighted quantiles of the threshold multiset
  (each edge is still a real threshold, bins are narrow where many trees split);
* 1-D sweeps (any teacher): vary one feature over a grid at a few random anchor points and
  put edges at the local maxima of the mean output change ||p(x_{g+1}) - p(x_g)||_1, i.e.
  where the teacher's output changes sharply. The sweep queries are returned so they can be
  reused as labelled training points (nothing is wasted from the query budget).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modelpress.tabular.spec import FeatureSpec, uniform_queries
from modelpress.tabular.teacher import Teacher


@dataclass(frozen=True)
class Bins:
    """Inner edges per feature (empty for categorical) and the bin count per feature."""

    edges: tuple[np.ndarray, ...]
    n_levels: tuple[int, ...]
    source: str

    def to_dict(self) -> dict:
        return {"source": self.source, "n_levels": list(self.n_levels),
                "edges": [e.tolist() for e in self.edges]}


def _int_edges(edges: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Integer features: an edge only matters by which integers it separates -> k + 0.5."""
    k = np.floor(edges)
    k = k[(k >= np.ceil(lo)) & (k + 1 <= np.floor(hi))]
    return np.unique(k) + 0.5


def make_bins(spec: FeatureSpec, edges: list[np.ndarray], source: str) -> Bins:
    """Clean edges (inside the range, unique, integer-aware) and count bins per feature."""
    out, n = [], []
    for f, e in zip(spec.features, edges):
        if f.kind == "categorical":
            out.append(np.zeros(0))
            n.append(len(f.levels))
            continue
        e = np.unique(np.asarray(e, dtype=np.float64))
        e = e[(e >= f.low) & (e < f.high)]  # an edge at low makes the point bin {low}
        if f.kind == "integer":
            e = _int_edges(e, f.low, f.high)
        out.append(e)
        n.append(len(e) + 1)
    return Bins(tuple(out), tuple(n), source)


def reduce_thresholds(t: np.ndarray, max_edges: int) -> np.ndarray:
    """Keep all distinct thresholds if <= max_edges, else frequency-weighted quantiles.

    t: thresholds with multiplicity (one entry per tree node). The quantiles use the
    'inverted_cdf' rule, so every kept edge is one of the teacher's own thresholds.
    """
    u = np.unique(t)
    if len(u) <= max_edges or max_edges <= 0:
        return u if max_edges > 0 else u[:0]
    q = np.arange(1, max_edges + 1) / (max_edges + 1)
    return np.unique(np.quantile(np.sort(t), q, method="inverted_cdf"))


def bins_from_thresholds(spec: FeatureSpec, thresholds: list[np.ndarray], max_bins: int = 8) -> Bins:
    """Bins whose edges are the tree teacher's split thresholds (reduced to max_bins - 1 edges)."""
    edges = []
    for f, t in zip(spec.features, thresholds):
        t = np.asarray(t, dtype=np.float64)
        point = np.zeros(0)
        if f.kind != "categorical":
            t = t[(t >= f.low) & (t < f.high)]
            if f.kind == "integer":  # thresholds 2.3 and 2.7 split the same integers
                t = np.floor(t) + 0.5
            elif np.any(t == f.low) and max_bins > 2:
                # a split "x <= low" isolates the point mass at low (zero-inflated columns such
                # as spending): keep it as its own bin {low} whatever the other thresholds
                point, t = np.array([f.low]), t[t > f.low]
        edges.append(np.concatenate([point, reduce_thresholds(t, max_bins - 1 - len(point))]))
    return make_bins(spec, edges, "thresholds")


def uniform_bins(spec: FeatureSpec, n_bins: int) -> Bins:
    """Equal-width bins (no teacher information); used for ablations and as a fallback."""
    edges = [np.linspace(f.lo, f.hi, n_bins + 1)[1:-1] for f in spec.features]
    return make_bins(spec, edges, "uniform")


def sweep_grid(spec: FeatureSpec, j: int, n_grid: int) -> np.ndarray:
    """Grid of values for feature j: its levels, its integers (if few), or a linspace."""
    f = spec.features[j]
    if f.kind == "categorical":
        return np.asarray(f.levels, dtype=np.float64)
    if f.kind == "integer" and f.high - f.low + 1 <= n_grid:
        return np.arange(np.ceil(f.low), np.floor(f.high) + 1, dtype=np.float64)
    g = np.linspace(f.low, f.high, n_grid)
    return np.unique(np.round(g)) if f.kind == "integer" else g


def output_change(P: np.ndarray) -> np.ndarray:
    """Mean L1 change of the teacher output between grid neighbours.  P (M, G, C) -> (G-1,)"""
    return np.abs(np.diff(P, axis=1)).sum(-1).mean(0)


def peak_edges(grid: np.ndarray, change: np.ndarray, max_edges: int, rel_tol: float = 0.05) -> np.ndarray:
    """Edges at local maxima of `change` (the sharpest output changes), strongest first.

    grid (G,), change (G-1,) located at the midpoints between grid points. A peak must be
    >= rel_tol * max(change) and > 1e-6 so that a flat teacher yields no edges.
    """
    if len(change) == 0 or max_edges <= 0:
        return np.zeros(0)
    top = change.max()
    if top <= 1e-6:
        return np.zeros(0)
    left = np.concatenate([[-np.inf], change[:-1]])
    right = np.concatenate([change[1:], [-np.inf]])
    peak = (change >= left) & (change > right) & (change >= rel_tol * top)
    idx = np.flatnonzero(peak)
    idx = idx[np.argsort(-change[idx], kind="stable")][:max_edges]
    return np.sort((grid[idx] + grid[idx + 1]) / 2)


@dataclass(frozen=True)
class Sweep:
    """1-D sweep results: per swept feature its grid (G,) and output change (G-1,)."""

    grids: dict[int, np.ndarray]
    changes: dict[int, np.ndarray]
    X: np.ndarray  # (q, d) queries asked
    P: np.ndarray  # (q, C) teacher outputs

    def bins(self, spec: FeatureSpec, max_bins: int, fallback: int = 3) -> Bins:
        """Edges at the sharpest changes; a feature whose sweep saw no change at all gets
        `fallback` equal-width bins (no boundary information, but interactions still get
        covered), capped by max_bins."""
        edges = [np.zeros(0)] * len(spec)
        for j, ch in self.changes.items():
            edges[j] = peak_edges(self.grids[j], ch, max_bins - 1)
            if len(edges[j]) == 0:
                f = spec.features[j]
                edges[j] = np.linspace(f.low, f.high, min(fallback, max_bins) + 1)[1:-1]
        return make_bins(spec, edges, "sweep")


def sweep(teacher: Teacher, spec: FeatureSpec, budget: int, rng: np.random.Generator,
          n_grid: int = 24, sample=None) -> Sweep:
    """1-D sweeps of every non-categorical feature using at most `budget` teacher queries.

    `sample(n, rng) -> (n, d)` draws the anchor points (default: uniform in the spec box).
    """
    sample = sample or (lambda n, r: uniform_queries(spec, n, r))
    d = len(spec)
    feats = [j for j, f in enumerate(spec.features) if f.kind != "categorical"]
    if not feats or budget <= 0:
        return Sweep({}, {}, np.zeros((0, d)), np.zeros((0, 0)))
    g = max(min(n_grid, budget // len(feats)), 4)
    grids = {j: sweep_grid(spec, j, g) for j in feats}
    cost = sum(len(grids[j]) for j in feats)
    n_anchor = max(budget // max(cost, 1), 1)
    anchors = sample(n_anchor, rng)  # (M, d)
    Xs = []
    for j in feats:
        X = np.repeat(anchors[:, None, :], len(grids[j]), axis=1)  # (M, G, d)
        X[:, :, j] = grids[j][None, :]
        Xs.append(X.reshape(-1, d))
    Xall = np.concatenate(Xs)[:budget]  # tiny budgets: keep only as many queries as allowed
    Pall = teacher.proba(Xall)
    changes, start = {}, 0
    for j, X in zip(feats, Xs):
        n = len(X)
        if start + n > len(Pall):
            break
        changes[j] = output_change(Pall[start:start + n].reshape(n_anchor, len(grids[j]), -1))
        start += n
    return Sweep(grids, changes, Xall, Pall)


def sweep_bins(teacher: Teacher, spec: FeatureSpec, budget: int, rng: np.random.Generator,
               max_bins: int = 8, n_grid: int = 24, sample=None) -> tuple[Bins, np.ndarray, np.ndarray]:
    """Black-box bins from 1-D sweeps: (bins, X_sweep (q, d), P_sweep (q, C)), q <= budget."""
    s = sweep(teacher, spec, budget, rng, n_grid, sample)
    return s.bins(spec, max_bins), s.X, s.P


def digitize(X: np.ndarray, spec: FeatureSpec, bins: Bins) -> np.ndarray:
    """Bin index of every value.  X (n, d) -> (n, d) int (categorical: index of nearest level)."""
    L = np.zeros(X.shape, dtype=np.int64)
    for j, f in enumerate(spec.features):
        if f.kind == "categorical":
            lv = np.asarray(f.levels)
            L[:, j] = np.abs(X[:, j, None] - lv[None, :]).argmin(1)
        else:
            L[:, j] = np.searchsorted(bins.edges[j], X[:, j], side="left")
    return L
