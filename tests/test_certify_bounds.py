"""Coverage and tightness of the SimCert probabilistic bounds (modelpress/certify/bounds.py)."""
import math

import numpy as np
import pytest
from scipy.stats import binom

from modelpress.certify import bounds as B
from modelpress.errors import UserError

DELTA = 0.05
TRIALS = 1000


def _coverage(rate: float, n: int, fn, seed: int) -> float:
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(TRIALS):
        x = (rng.random(n) < rate).astype(np.float64)
        hits += fn(x) >= rate
    return hits / TRIALS


@pytest.mark.parametrize("rate,n", [(0.02, 200), (0.1, 100), (0.3, 50)])
def test_clopper_pearson_coverage(rate, n):
    cov = _coverage(rate, n, lambda x: B.clopper_pearson_upper(int(x.sum()), n, DELTA), seed=1)
    assert cov >= 1 - DELTA


@pytest.mark.parametrize("rate,n", [(0.02, 200), (0.1, 100), (0.3, 50)])
def test_hoeffding_and_bernstein_coverage(rate, n):
    assert _coverage(rate, n, lambda x: B.hoeffding_upper(x, DELTA, 0.0, 1.0), seed=2) >= 1 - DELTA
    assert _coverage(rate, n, lambda x: B.bernstein_upper(x, DELTA, 0.0, 1.0), seed=3) >= 1 - DELTA


def test_bernstein_coverage_on_a_bounded_continuous_mean():
    # X = 3 * Beta(2, 5) on [0, 3]; E X = 3 * 2/7
    rng = np.random.default_rng(4)
    mu = 3 * 2 / 7
    ok = sum(B.bernstein_upper(3 * rng.beta(2, 5, 60), DELTA, 0.0, 3.0) >= mu for _ in range(TRIALS))
    assert ok / TRIALS >= 1 - DELTA


def test_the_coverage_check_has_power():
    # the plain sample mean is no bound: it misses about half of the time, so the check above can fail
    assert _coverage(0.1, 100, lambda x: float(x.mean()), seed=5) < 1 - DELTA


def test_clopper_pearson_matches_the_binomial_tail():
    # at the upper bound u, P(Bin(n, u) <= k) = delta exactly
    for k, n in [(0, 50), (3, 100), (40, 100)]:
        u = B.clopper_pearson_upper(k, n, DELTA)
        assert binom.cdf(k, n, u) == pytest.approx(DELTA, rel=1e-6)
    assert B.clopper_pearson_upper(0, 100, DELTA) == pytest.approx(1 - DELTA ** (1 / 100), rel=1e-9)
    assert B.clopper_pearson_upper(7, 7, DELTA) == 1.0
    assert B.clopper_pearson_lower(0, 7, DELTA) == 0.0


def test_bernstein_is_tighter_than_hoeffding_at_low_variance():
    rng = np.random.default_rng(6)
    x = (rng.random(2000) < 0.01).astype(float)
    h = B.hoeffding_upper(x, DELTA, 0, 1)
    e = B.bernstein_upper(x, DELTA, 0, 1)
    assert e < h
    assert h - x.mean() == pytest.approx(math.sqrt(math.log(1 / DELTA) / 4000), rel=1e-9)
    # ... and looser at maximal variance (fair coin), where Hoeffding's constant wins
    y = (rng.random(2000) < 0.5).astype(float)
    assert B.bernstein_upper(y, DELTA, 0, 1) > B.hoeffding_upper(y, DELTA, 0, 1)


def test_zero_range_gives_exact_bound_and_range_scales():
    assert B.bernstein_upper(np.zeros(10), DELTA, 0.0, 0.0) == 0.0
    assert B.hoeffding_upper(np.zeros(10), DELTA, 0.0, 0.0) == 0.0
    rng = np.random.default_rng(7)
    x = rng.random(100)
    assert B.bernstein_upper(5 * x, DELTA, 0, 5) == pytest.approx(5 * B.bernstein_upper(x, DELTA, 0, 1))


def test_samples_outside_the_stated_range_are_refused():
    with pytest.raises(UserError, match="range"):
        B.bernstein_upper([0.1, 2.0], DELTA, 0.0, 1.0)
    with pytest.raises(UserError, match="delta"):
        B.hoeffding_upper([0.1], 1.5, 0.0, 1.0)
    with pytest.raises(UserError, match="0/1"):
        B.upper_bound([0.5], DELTA, "clopper-pearson")


def test_sequential_stops_early_when_decided_and_keeps_coverage():
    ests = [B.Estimator("clopper-pearson")]
    sched = B.geometric_schedule(20, 1280)
    assert sched == [20, 40, 80, 160, 320, 640, 1280]
    rng = np.random.default_rng(8)
    # true rate 0.005, threshold 0.05: decided "pass" long before n_max
    res = B.sequential_bound(lambda k: (rng.random(k) < 0.005).astype(float), ests, 0.05, DELTA, 20, 1280)
    assert res.decided and res.bound <= 0.05 and res.n < 1280
    # true rate 0.3: decided "fail" early via the lower bound
    res = B.sequential_bound(lambda k: (rng.random(k) < 0.3).astype(float), ests, 0.05, DELTA, 20, 1280)
    assert res.decided and res.bound > 0.05 and res.lower > 0.05 and res.n < 1280
    # coverage of the reported bound under optional stopping, at a rate just above the threshold
    rate, bad = 0.06, 0
    for t in range(TRIALS):
        r = np.random.default_rng(1000 + t)
        res = B.sequential_bound(lambda k: (r.random(k) < rate).astype(float), ests, 0.05, DELTA, 20, 640)
        bad += res.bound < rate
    assert bad / TRIALS <= DELTA


def test_combined_bounds_splits_delta():
    rng = np.random.default_rng(9)
    x = np.stack([(rng.random(300) < 0.05).astype(float), rng.random(300) * 0.1], axis=1)
    up, lo, meth = B.combined_bounds(x, [B.Estimator("clopper-pearson"), B.Estimator("bernstein", 0, 1)], DELTA)
    cp = B.clopper_pearson_upper(int(x[:, 0].sum()), 300, DELTA / 2)
    eb = B.bernstein_upper(x[:, 1], DELTA / 2, 0, 1)
    assert up == min(cp, eb) and meth == ("clopper-pearson" if cp < eb else "bernstein")
    assert lo <= up
