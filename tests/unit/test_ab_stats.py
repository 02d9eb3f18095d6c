"""A/B statistics checked against statistical oracles on synthetic data with a known truth."""

from __future__ import annotations

import math

import numpy as np
import pytest

from specray.pipelines.stats import bootstrap_quantile_diff, decide, msprt, msprt_pvalues


def _binomial_upper(p: float, n: int, z: float = 3.0) -> float:
    return p + z * math.sqrt(p * (1 - p) / n)


def test_bootstrap_covers_known_quantile_difference():
    # Exponential latencies: quantile q of Exp(scale s) is -s*log(1-q), so the true p90 difference is known.
    rng = np.random.default_rng(0)
    q, sa, sb = 0.9, 10.0, 12.0
    truth = -(sb - sa) * math.log(1 - q)
    trials, covered = 150, 0
    for t in range(trials):
        a, b = rng.exponential(sa, 300), rng.exponential(sb, 300)
        ci = bootstrap_quantile_diff(a, b, q, n_boot=400, confidence=0.9, seed=t)
        covered += ci.low <= truth <= ci.high
        assert ci.low <= ci.diff <= ci.high
    coverage = covered / trials
    # nominal 0.9; the percentile bootstrap of a tail quantile is slightly liberal at n=300
    assert 0.8 <= coverage <= 0.98, coverage


def test_bootstrap_sign_and_significance():
    rng = np.random.default_rng(1)
    a, b = rng.normal(100, 5, 400), rng.normal(80, 5, 400)
    ci = bootstrap_quantile_diff(a, b, 0.5, metric="tpot_ms", seed=0)
    assert ci.significant and ci.high < 0 and ci.rel_diff == pytest.approx(-0.2, abs=0.03)
    same = bootstrap_quantile_diff(a, rng.normal(100, 5, 400), 0.5, seed=0)
    assert same.low < 0 < same.high


def test_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError, match="quantile"):
        bootstrap_quantile_diff([1, 2, 3], [1, 2, 3], 1.5)
    with pytest.raises(ValueError, match="at least 2"):
        bootstrap_quantile_diff([1.0, float("nan")], [1, 2, 3], 0.5)


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_msprt_false_positive_rate_under_null(tau):
    # Watching the always-valid p-value after every pair of 400 must still reject a true null <= alpha.
    rng = np.random.default_rng(int(tau * 100))
    alpha, streams = 0.05, 1500
    d = rng.normal(0.0, 1.0, (streams, 400))
    rejected = sum(msprt_pvalues(row, tau).min() <= alpha for row in d)
    assert rejected / streams <= _binomial_upper(alpha, streams), rejected / streams


def test_msprt_false_positive_rate_on_lognormal_latencies():
    rng = np.random.default_rng(7)
    alpha, streams, rejected = 0.05, 1000, 0
    for _ in range(streams):
        a, b = rng.lognormal(3.0, 0.4, 200), rng.lognormal(3.0, 0.4, 200)
        rejected += msprt(a, b, alpha=alpha, tau=0.1).rejected
    assert rejected / streams <= _binomial_upper(alpha, streams)


def test_msprt_pvalue_is_monotone_and_detects_a_shift():
    rng = np.random.default_rng(3)
    a = rng.lognormal(3.0, 0.3, 300)
    b = rng.lognormal(3.0 - 0.15, 0.3, 300)  # treatment 14% faster
    res = msprt(a, b, alpha=0.05, tau=0.1, metric="tpot_ms")
    assert res.rejected and res.decision == "treatment_lower"
    assert res.stopped_at is not None and res.stopped_at < 300  # stops early
    assert res.mean_diff == pytest.approx(-0.15, abs=0.05)
    assert np.all(np.diff(res.path) <= 0) and res.p_value <= 0.05
    # power: the shift is found in most replications
    hits = sum(msprt(rng.lognormal(3.0, 0.3, 300), rng.lognormal(2.85, 0.3, 300), tau=0.1).rejected
               for _ in range(50))
    assert hits >= 45


def test_msprt_too_few_pairs_is_undecided():
    res = msprt([1.0, 2.0, 3.0], [1.0, 2.0], min_pairs=20)
    assert not res.rejected and res.p_value == 1.0 and res.decision == "no_difference_yet"


def test_decide_reports_cis_and_verdict():
    rng = np.random.default_rng(5)
    a = {"tpot_ms": list(rng.lognormal(3.0, 0.2, 120)), "e2e_ms": list(rng.lognormal(6.0, 0.2, 120))}
    b = {"tpot_ms": list(rng.lognormal(2.7, 0.2, 120)), "e2e_ms": list(rng.lognormal(5.7, 0.2, 120))}
    dec = decide("none", "sparse_self", a, b, n_boot=300)
    d = dec.to_dict()
    assert {(c["metric"], c["quantile"]) for c in d["bootstrap"]} == {
        ("tpot_ms", 0.5), ("tpot_ms", 0.9), ("e2e_ms", 0.5), ("e2e_ms", 0.9)}
    assert all(c["significant"] and c["high"] < 0 for c in d["bootstrap"])
    assert d["sequential"]["decision"] == "treatment_lower"
    assert "sparse_self has lower mean tpot_ms" in dec.verdict


def test_null_oracle_catches_naive_peeking():
    # Control for the oracle above: a fixed-horizon z-test looked at after every pair does exceed alpha.
    rng = np.random.default_rng(11)
    d = rng.normal(0.0, 1.0, (1000, 400))
    n = np.arange(1, 401)
    z = np.abs(np.cumsum(d, axis=1) / np.sqrt(n))[:, 19:]
    naive = (z.max(axis=1) >= 1.96).mean()
    assert naive > _binomial_upper(0.05, 1000)
