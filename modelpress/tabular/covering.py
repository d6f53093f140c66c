"""2-way (pairwise) covering arrays over feature bins, IPOG strategy (TabKD, arXiv 2603.15481).

A strength-2 covering array CA(N; v_1..v_k) is an N x k matrix whose column j takes values in
{0..v_j-1} such that every pair of columns (j, i) shows every value pair (a, b) in some row.
IPOG (Lei et al., 2007) builds it one parameter at a time: start from the cross product of
the two largest parameters; for parameter i, *horizontal growth* gives each existing row the
value covering the most still-uncovered pairs with columns < i; *vertical growth* then adds
rows (with don't-care entries, -1) for the pairs still uncovered. Don't-cares are filled at
random at the end. The gain computation per row is vectorised over all earlier columns via
one flat (sum_{j<i} v_j, v_i) "uncovered" matrix.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def ipog(levels: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Strength-2 covering array.  levels (k,) -> (N, k) int64 with 100% pairwise coverage."""
    v_in = np.asarray(levels, dtype=np.int64)
    if np.any(v_in < 1):
        raise ValueError("covering array levels must be >= 1")
    k = len(v_in)
    order = np.argsort(-v_in, kind="stable")  # largest parameters first (smallest N)
    v = v_in[order]
    if k == 1:
        ca = np.arange(v[0])[:, None]
    else:
        a, b = np.meshgrid(np.arange(v[0]), np.arange(v[1]), indexing="ij")
        ca = np.stack([a.ravel(), b.ravel()], 1)  # (v0*v1, 2)
        for i in range(2, k):
            ca = _extend(ca, int(v[i]), v[:i], rng)
    ca = ca.copy()
    dont = ca < 0
    if dont.any():
        fill = np.floor(rng.random(ca.shape) * v[None, :]).astype(np.int64)
        ca[dont] = fill[dont]
    out = np.empty_like(ca)
    out[:, order] = ca
    return out


def _extend(ca: np.ndarray, vi: int, v_prev: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Add parameter i (vi values) to ca (N, i): horizontal then vertical growth."""
    offs = np.concatenate([[0], np.cumsum(v_prev)])  # (i+1,)
    U = np.ones((int(offs[-1]), vi), dtype=bool)  # uncovered (column j value a) x (value b)
    n = len(ca)
    col = np.empty(n, dtype=np.int64)
    ties = rng.random((n, vi)) * 1e-3  # seeded tie-break, < 1 so it never beats a real gain
    for r in range(n):
        row = ca[r]
        idx = (offs[:-1] + row)[row >= 0]  # flat rows of U touched by this row
        gain = U[idx].sum(0) + ties[r]  # (vi,)
        best = int(np.argmax(gain))
        col[r] = best
        U[idx, best] = False
        for j in np.flatnonzero(row < 0):  # don't-care: pick a value that covers a new pair
            open_a = np.flatnonzero(U[offs[j]:offs[j + 1], best])
            if len(open_a):
                row[j] = open_a[0]
                U[offs[j] + open_a[0], best] = False
    ca = np.concatenate([ca, col[:, None]], 1)
    # vertical growth: pack uncovered pairs (j, a, b) into new rows with column i = b
    flat, bvals = np.nonzero(U)
    if len(flat) == 0:
        return ca
    js = np.searchsorted(offs, flat, side="right") - 1
    avals = flat - offs[js]
    new_rows: list[np.ndarray] = []
    by_b: dict[int, list[int]] = {}
    for j, a, b in zip(js.tolist(), avals.tolist(), bvals.tolist()):
        for r in by_b.get(b, []):
            if new_rows[r][j] < 0:
                new_rows[r][j] = a
                break
        else:
            row = np.full(len(v_prev) + 1, -1, dtype=np.int64)
            row[j], row[-1] = a, b
            by_b.setdefault(b, []).append(len(new_rows))
            new_rows.append(row)
    return np.concatenate([ca, np.stack(new_rows)], 0)


def pair_counts(L: np.ndarray, levels: Sequence[int]) -> tuple[int, int]:
    """(covered, total) value pairs over all column pairs.  L (n, k) ints in [0, levels)."""
    v = np.asarray(levels, dtype=np.int64)
    k = L.shape[1]
    covered = total = 0
    for j in range(k):
        for i in range(j + 1, k):
            codes = L[:, j] * v[i] + L[:, i]
            covered += len(np.unique(codes))
            total += int(v[j] * v[i])
    return covered, total


def pairwise_coverage(L: np.ndarray, levels: Sequence[int]) -> float:
    """Fraction of all 2-way value combinations (over all column pairs) present in L."""
    if L.shape[1] < 2:
        v = int(levels[0])
        return len(np.unique(L[:, 0])) / v if L.shape[1] == 1 else 1.0
    c, t = pair_counts(L, levels)
    return c / t


def covering_rows(levels: Sequence[int], n_rows: int, rng: np.random.Generator) -> np.ndarray:
    """n_rows design rows: repeated covering arrays, each with randomly relabelled values.

    Every complete copy covers all pairs; relabelling makes copies differ, so repeated copies
    cover each pair several times with different companions. The last copy is truncated.
    Returns (n_rows, k).
    """
    v = np.asarray(levels, dtype=np.int64)
    out, have = [], 0
    while have < n_rows:
        ca = ipog(v, rng)
        perm = [rng.permutation(int(x)) for x in v]
        ca = np.stack([perm[j][ca[:, j]] for j in range(len(v))], 1)
        ca = ca[rng.permutation(len(ca))] if out else ca
        out.append(ca)
        have += len(ca)
    return np.concatenate(out)[:n_rows]
