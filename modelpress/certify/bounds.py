"""Probabilistic bounds for SimCert certificates (arXiv 2603.14818): pure functions on i.i.d. samples.

- Clopper-Pearson (1934) exact binomial bounds on a violation rate theta = P(V) from k violations in n
  i.i.d. trials: upper = Beta^{-1}(1 - delta; k + 1, n - k), lower = Beta^{-1}(delta; k, n - k + 1).
- Hoeffding (1963) for a mean of i.i.d. X in [a, b]: mean +- (b - a) sqrt(ln(1/delta) / (2n)).
- Empirical Bernstein, Maurer & Pontil 2009 ("Empirical Bernstein bounds and sample variance
  penalization", Theorem 4), X in [a, b], n >= 2, V_n the unbiased sample variance:
  E X <= mean + sqrt(2 V_n ln(2/delta) / n) + 7 (b - a) ln(2/delta) / (3 (n - 1)).
  Tighter than Hoeffding when V_n << (b - a)^2 / 4.
- Sequential mode: union bound over a geometric schedule of checkpoints n_j = n_min * 2^j (capped at
  n_max, J checkpoints fixed before sampling). Each checkpoint and each method gets delta / (J * m), so
  with probability >= 1 - delta *every* reported upper bound holds at once, and the sampler may stop at
  the first checkpoint where the bound is decided (upper <= threshold: pass; lower > threshold: fail).
  The same split applied to the lower bounds makes a "fail" decision hold at 1 - delta as well.

All one-sided: `upper` holds with probability >= 1 - delta, `lower` likewise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from modelpress.errors import UserError

METHODS = ("clopper-pearson", "hoeffding", "bernstein")


def _check_delta(delta: float) -> None:
    if not (0.0 < delta < 1.0):
        raise UserError(f"delta={delta} is out of range: use a failure probability in (0, 1), e.g. 0.05")


def _check_range(a: float, b: float) -> None:
    if not (math.isfinite(a) and math.isfinite(b)) or b < a:
        raise UserError(f"range [a, b] = [{a}, {b}] is invalid: need finite a <= b")


def clopper_pearson_upper(k: int, n: int, delta: float) -> float:
    """Upper 1 - delta bound on a binomial rate from k violations in n trials."""
    _check_delta(delta)
    if n <= 0 or not (0 <= k <= n):
        raise UserError(f"Clopper-Pearson needs 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if k == n:
        return 1.0
    from scipy.stats import beta      # lazy: scipy.stats adds ~20 MB to every `import modelpress`
    return float(beta.ppf(1.0 - delta, k + 1, n - k))


def clopper_pearson_lower(k: int, n: int, delta: float) -> float:
    """Lower 1 - delta bound on a binomial rate from k violations in n trials."""
    _check_delta(delta)
    if n <= 0 or not (0 <= k <= n):
        raise UserError(f"Clopper-Pearson needs 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if k == 0:
        return 0.0
    from scipy.stats import beta
    return float(beta.ppf(delta, k, n - k + 1))


def _as_samples(x, a: float, b: float) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).reshape(-1)  # (n,)
    if x.size == 0:
        raise UserError("no samples: need at least one i.i.d. sample to bound a mean")
    if np.any(x < a - 1e-12 * max(1.0, abs(a))) or np.any(x > b + 1e-12 * max(1.0, abs(b))):
        raise UserError(f"samples leave the stated range [{a}, {b}] (min {x.min():.6g}, max {x.max():.6g}): "
                        "state a range that holds for every sample")
    return np.clip(x, a, b)


def hoeffding_upper(x, delta: float, a: float, b: float) -> float:
    """Upper 1 - delta bound on E X for i.i.d. X in [a, b]."""
    _check_delta(delta)
    _check_range(a, b)
    x = _as_samples(x, a, b)
    n = x.size
    return float(min(b, x.mean() + (b - a) * math.sqrt(math.log(1.0 / delta) / (2.0 * n))))


def hoeffding_lower(x, delta: float, a: float, b: float) -> float:
    _check_delta(delta)
    _check_range(a, b)
    x = _as_samples(x, a, b)
    n = x.size
    return float(max(a, x.mean() - (b - a) * math.sqrt(math.log(1.0 / delta) / (2.0 * n))))


def _bernstein_radius(x: np.ndarray, delta: float, a: float, b: float) -> float:
    n = x.size
    if n < 2:
        return b - a
    v = float(x.var(ddof=1))  # unbiased sample variance V_n
    l2d = math.log(2.0 / delta)
    return math.sqrt(2.0 * v * l2d / n) + 7.0 * (b - a) * l2d / (3.0 * (n - 1))


def bernstein_upper(x, delta: float, a: float, b: float) -> float:
    """Maurer-Pontil empirical Bernstein upper 1 - delta bound on E X for i.i.d. X in [a, b]."""
    _check_delta(delta)
    _check_range(a, b)
    x = _as_samples(x, a, b)
    return float(min(b, x.mean() + _bernstein_radius(x, delta, a, b)))


def bernstein_lower(x, delta: float, a: float, b: float) -> float:
    _check_delta(delta)
    _check_range(a, b)
    x = _as_samples(x, a, b)
    return float(max(a, x.mean() - _bernstein_radius(x, delta, a, b)))


def upper_bound(x, delta: float, method: str, a: float = 0.0, b: float = 1.0) -> float:
    """Dispatch: 'clopper-pearson' (x are 0/1 violation indicators), 'hoeffding', 'bernstein'."""
    if method == "clopper-pearson":
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if not np.all((x == 0) | (x == 1)):
            raise UserError("clopper-pearson needs 0/1 violation indicators; use hoeffding or bernstein for means")
        return clopper_pearson_upper(int(x.sum()), int(x.size), delta)
    if method == "hoeffding":
        return hoeffding_upper(x, delta, a, b)
    if method == "bernstein":
        return bernstein_upper(x, delta, a, b)
    raise UserError(f"method={method!r} is unknown: use one of {', '.join(METHODS)}")


def lower_bound(x, delta: float, method: str, a: float = 0.0, b: float = 1.0) -> float:
    if method == "clopper-pearson":
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if not np.all((x == 0) | (x == 1)):
            raise UserError("clopper-pearson needs 0/1 violation indicators; use hoeffding or bernstein for means")
        return clopper_pearson_lower(int(x.sum()), int(x.size), delta)
    if method == "hoeffding":
        return hoeffding_lower(x, delta, a, b)
    if method == "bernstein":
        return bernstein_lower(x, delta, a, b)
    raise UserError(f"method={method!r} is unknown: use one of {', '.join(METHODS)}")


@dataclass(frozen=True)
class Estimator:
    """One bound method on one column of samples, with the range [a, b] its samples are known to lie in."""
    method: str
    a: float = 0.0
    b: float = 1.0


@dataclass
class BoundResult:
    bound: float                 # upper bound, holds w.p. >= 1 - delta
    lower: float                 # lower bound, holds w.p. >= 1 - delta
    n: int                       # samples used
    method: str                  # estimator that gave `bound`
    decided: bool                # bound <= threshold or lower > threshold
    checkpoints: list[dict] = field(default_factory=list)


def combined_bounds(samples: np.ndarray, estimators: Sequence[Estimator], delta: float) -> tuple[float, float, str]:
    """Min of upper (max of lower) bounds over m estimators, each at delta / m (union bound).

    samples: (n, m), column j feeds estimators[j]. Returns (upper, lower, method of the upper)."""
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim == 1:
        samples = samples[:, None]
    m = len(estimators)
    if samples.shape[1] != m:
        raise UserError(f"samples have {samples.shape[1]} columns but {m} estimators were given")
    d = delta / m
    ups = [upper_bound(samples[:, j], d, e.method, e.a, e.b) for j, e in enumerate(estimators)]
    los = [lower_bound(samples[:, j], d, e.method, e.a, e.b) for j, e in enumerate(estimators)]
    j = int(np.argmin(ups))
    return ups[j], max(los), estimators[j].method


def geometric_schedule(n_min: int, n_max: int, growth: float = 2.0) -> list[int]:
    """Checkpoints n_min, n_min*g, n_min*g^2, ... capped by (and ending at) n_max."""
    if n_min < 2 or n_max < n_min or growth <= 1.0:
        raise UserError(f"sequential schedule needs 2 <= n_min <= n_max and growth > 1, got "
                        f"n_min={n_min}, n_max={n_max}, growth={growth}")
    out, n = [], float(n_min)
    while int(n) < n_max:
        if not out or int(n) > out[-1]:
            out.append(int(n))
        n *= growth
    out.append(n_max)
    return out


def sequential_bound(draw: Callable[[int], np.ndarray], estimators: Sequence[Estimator], threshold: float,
                     delta: float, n_min: int, n_max: int, growth: float = 2.0) -> BoundResult:
    """Sample in batches until the bound is decided w.r.t. `threshold` (or n_max is reached).

    draw(k) -> (k, m) array of the next k i.i.d. samples (column j for estimators[j]).
    Soundness: union bound over the J fixed checkpoints and m estimators, delta / (J m) each; the
    reported bound is the smallest upper bound seen, valid simultaneously w.p. >= 1 - delta.
    """
    _check_delta(delta)
    sched = geometric_schedule(n_min, n_max, growth)
    d = delta / len(sched)
    rows: list[np.ndarray] = []
    have = 0
    best_up, best_lo, best_m = math.inf, -math.inf, estimators[0].method
    cps: list[dict] = []
    for n_j in sched:
        new = np.asarray(draw(n_j - have), dtype=np.float64)
        if new.ndim == 1:
            new = new[:, None]
        rows.append(new)
        have += new.shape[0]
        if have != n_j:
            raise UserError(f"sequential sampler returned {have} samples, expected {n_j}: "
                            "give more evaluation windows or lower n_max")
        x = np.concatenate(rows, axis=0)  # (n_j, m)
        up, lo, meth = combined_bounds(x, estimators, d)
        if up < best_up:
            best_up, best_m = up, meth
        best_lo = max(best_lo, lo)
        cps.append({"n": n_j, "upper": up, "lower": lo, "delta": d})
        if best_up <= threshold or best_lo > threshold:
            return BoundResult(best_up, best_lo, n_j, best_m, True, cps)
    return BoundResult(best_up, best_lo, have, best_m, False, cps)
