"""Load-generator pieces without a server: arrival schedule, summaries, MLflow key mapping."""

from __future__ import annotations

import math

import numpy as np
import pytest

from specray.pipelines.bench import BenchConfig, RequestResult, arrival_delays, parse_goodput, summarize
from specray.pipelines.tracking import arm_metrics, flatten


@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_gamma_arrivals_have_the_rate_and_burstiness(burstiness):
    gaps = arrival_delays(20000, rate=5.0, burstiness=burstiness, seed=0)
    assert gaps.mean() == pytest.approx(1 / 5.0, rel=0.05)
    # gamma(shape k): coefficient of variation 1/sqrt(k); Poisson (k = 1) has CV 1
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.06)
    assert np.array_equal(gaps, arrival_delays(20000, 5.0, burstiness, seed=0))
    assert not arrival_delays(10, math.inf, 1.0, 0).any()


def test_summary_and_goodput():
    cfg = BenchConfig("http://x", "m", goodput={"ttft": 100.0, "tpot": 20.0})
    rows = [RequestResult(i, 64, 64, output_len=5, success=True, ttft_ms=50.0 + 40 * i, tpot_ms=10.0 + 5 * i,
                          e2el_ms=100.0 + 60 * i, itl_ms=[10.0, 12.0]) for i in range(4)]
    rows.append(RequestResult(4, 64, 64, success=False, error="boom"))
    s = summarize(rows, 2.0, cfg)
    assert (s["completed"], s["failed"], s["total_output_tokens"]) == (4, 1, 20)
    assert s["median_ttft_ms"] == pytest.approx(np.median([50, 90, 130, 170]))
    assert s["p90_tpot_ms"] == pytest.approx(np.percentile([10, 15, 20, 25], 90))
    # good: ttft <= 100 and tpot <= 20 -> requests 0 and 1
    assert s["request_goodput"] == pytest.approx(2 / 2.0)
    assert s["mean_itl_ms"] == pytest.approx(11.0)


def test_bad_bench_flags_are_named():
    with pytest.raises(ValueError, match="--endpoint"):
        BenchConfig("http://x", "m", endpoint="/v1/embeddings")
    with pytest.raises(ValueError, match="--request-rate"):
        BenchConfig("http://x", "m", request_rate=0)
    with pytest.raises(ValueError, match="--goodput"):
        BenchConfig("http://x", "m", goodput={"latency": 1.0})
    with pytest.raises(ValueError, match="KEY:MS"):
        parse_goodput(["ttft=5"])
    assert parse_goodput(["ttft:500", "e2el:1e4"]) == {"ttft": 500.0, "e2el": 10000.0}


def test_mlflow_keys():
    flat = flatten({"model": "m", "speculative_config": {"method": "sparse_self", "tree": {"kind": "chain"}},
                    "cuda_graph_batch_sizes": [1, 2]})
    assert flat == {"model": "m", "spec.method": "sparse_self", "spec.tree.kind": "chain",
                    "cuda_graph_batch_sizes": "[1, 2]"}
    m = arm_metrics({"p50_tpot_ms": 12.0, "p90_e2el_ms": 900.0, "median_ttft_ms": 40.0, "mean_acceptance_length": 2.5,
                     "output_throughput": 100.0, "p99_itl_ms": math.nan, "request_goodput": None}, assigned=7)
    assert m == {"tpot_ms/p50": 12.0, "e2e_ms/p90": 900.0, "ttft_ms/p50": 40.0, "spec/mean_acceptance_length": 2.5,
                 "throughput/output_tok_s": 100.0, "requests/assigned": 7.0}
