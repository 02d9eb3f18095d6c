"""A/B end to end on CPU: two arms (`none`, `sparse_self`) of a tiny random llama behind the sticky
experiment ingress on a real Ray Serve app, driven by `specray ab run`'s runner, logged to a real
MLflow tracking server started here (sqlite backend, free loopback port), read back with
`mlflow.search_runs`, and reported by the `specray ab report` CLI. `specray bench serve` runs against
the same live ingress with a Poisson load.

Oracles: the x-specray-arm headers seen by the client (stickiness, counts on /experiments), the arms'
own Prometheus histograms (server-side request counts per arm), the raw per-request rows (for the
benchmark's counts and percentiles, recomputed here with numpy), the CSV artifacts read back.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from tests.support.tiny import make_checkpoint

MODEL = "tiny-llama"
NAME = "tiny-sparse-vs-none"
NUM_PROMPTS = 24
VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy within {timeout_s}s")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, cwd=root)
    try:
        yield {"uri": f"http://127.0.0.1:{port}", "proc": proc}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def ab(tmp_path_factory, mlflow_server):
    """Run the whole A/B (the arms stay up for the HTTP checks below)."""
    import ray
    from ray import serve

    from specray.pipelines.ab import run_ab
    from specray.platform.experiments import load_experiment

    root = tmp_path_factory.mktemp("ab")
    ckpt = make_checkpoint(root / "tiny", "llama", max_position_embeddings=512)
    exp_path = root / "experiment.yaml"
    exp_path.write_text(yaml.safe_dump({
        "name": NAME, "model": str(ckpt), "served_model_name": MODEL,
        "engine": {"device": "cpu", "dtype": "float32", "cache": {"page_size": 8, "num_pages": 400},
                   "scheduler": {"max_num_seqs": 8, "max_num_batched_tokens": 128, "max_model_len": 320}},
        "arms": [
            {"name": "none", "weight": 0.5, "speculative_config": {"method": "none"}},
            {"name": "sparse_self", "weight": 0.5, "speculative_config": {
                "method": "sparse_self", "num_speculative_tokens": 3,
                "sparse": {"page_size": 8, "budget_tokens": 32, "sink_pages": 1, "recent_pages": 2}}},
        ],
        "traffic": {"dataset_name": "random", "input_len": [48, 96], "output_len": 10, "num_prompts": NUM_PROMPTS,
                    "num_sessions": 12, "request_rate": 8.0, "burstiness": 1.0, "max_concurrency": 4,
                    "goodput": {"e2el": 60000}},
        "decision": {"n_boot": 300, "min_pairs": 5},
    }))
    port = _free_port()
    _wait(mlflow_server["uri"] + "/health", 300, mlflow_server["proc"])
    result_file = root / "ab.json"
    try:
        run_id, decision = run_ab(str(exp_path), mlflow_server["uri"], port=port, keep_serving=True,
                                  result_file=str(result_file))
        yield {"run_id": run_id, "decision": decision, "base": f"http://127.0.0.1:{port}",
               "exp": load_experiment(exp_path), "bench": json.loads(result_file.read_text())["bench"],
               "tokenizer": str(ckpt), "root": root}
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()


def _experiments(base: str) -> dict:
    return httpx.get(base + "/experiments", timeout=30).json()


def _arm_counts_from_metrics(base: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base + "/metrics", timeout=30).text
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):  # also proves the merged exposition parses
        for s in fam.samples:
            if s.name == "specray:e2e_request_latency_seconds_count":
                out[s.labels["arm"]] = out.get(s.labels["arm"], 0) + s.value
    return out


def test_runner_traffic_split_and_counts(ab):
    rows = ab["bench"]["requests"]
    assert len(rows) == NUM_PROMPTS and all(r["success"] for r in rows)
    seen = Counter(r["arm"] for r in rows)
    assert set(seen) == {"none", "sparse_self"}
    doc = _experiments(ab["base"])
    assert {a["name"]: a["weight"] for a in doc["arms"]} == {"none": 0.5, "sparse_self": 0.5}
    assert {a["name"]: a["count"] for a in doc["arms"]} == dict(seen) == ab["decision"]["counts"]
    # each session id went to exactly one arm, the one its hash picks
    from specray.platform.experiments import assign

    by_session: dict[str, set[str]] = {}
    for r in rows:
        by_session.setdefault(r["session_id"], set()).add(r["arm"])
    assert len(by_session) == 12 and all(len(v) == 1 for v in by_session.values())
    assert all(v == {assign(ab["exp"], "session:" + s)} for s, v in by_session.items())
    # the sparse arm speculates: it reports acceptance lengths >= 1
    acc = [r["acceptance_length"] for r in rows if r["arm"] == "sparse_self"]
    assert acc and all(a is not None and a >= 1.0 for a in acc)


def test_sticky_assignment_over_http(ab):
    base, before = ab["base"], _experiments(ab["base"])
    metrics_before = _arm_counts_from_metrics(base)
    sent: Counter[str] = Counter()
    for j in range(8):
        arms = set()
        for _ in range(3):
            r = httpx.post(base + "/v1/completions", headers={"x-session-id": f"sticky-{j}"}, timeout=120,
                           json={"model": MODEL, "prompt": "w5 w6 w7", "max_tokens": 2, "ignore_eos": True})
            assert r.status_code == 200 and r.headers["x-specray-experiment"] == NAME
            arms.add(r.headers["x-specray-arm"])
            sent[r.headers["x-specray-arm"]] += 1
        assert len(arms) == 1, f"session sticky-{j} went to {arms}"
    # the body's `user` wins over the header, and is sticky too
    users = {httpx.post(base + "/v1/completions", headers={"x-session-id": f"other-{k}"}, timeout=120,
                        json={"model": MODEL, "prompt": "w9", "max_tokens": 1, "user": "carol"}
                        ).headers["x-specray-arm"] for k in range(4)}
    assert len(users) == 1
    sent[users.pop()] += 4
    after = _experiments(base)
    assert after["total"] - before["total"] == 28
    for a, b in zip(before["arms"], after["arms"], strict=True):
        assert b["count"] - a["count"] == sent[a["name"]]
    # the arms' own server-side histograms saw exactly those requests
    metrics_after = _arm_counts_from_metrics(base)
    assert {k: metrics_after[k] - metrics_before.get(k, 0) for k in metrics_after} == {
        k: float(sent[k]) for k in ("none", "sparse_self")}
    # an unknown model is the arm's 404, still stamped with the arm
    bad = httpx.post(base + "/v1/completions", json={"model": "nope", "prompt": "w5", "user": "carol"}, timeout=60)
    assert bad.status_code == 404 and bad.headers["x-specray-arm"] in ("none", "sparse_self")


def test_mlflow_parent_and_nested_runs(ab, mlflow_server):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(mlflow_server["uri"])
    runs = mlflow.search_runs(experiment_names=[NAME])
    assert len(runs) == 3
    parent = runs[runs.run_id == ab["run_id"]].iloc[0]
    assert parent["tags.specray.role"] == "experiment"
    nested = runs[runs["tags.mlflow.parentRunId"] == ab["run_id"]]
    assert sorted(nested["tags.arm"]) == ["none", "sparse_self"]
    for _, r in nested.iterrows():
        assert r["params.spec.method"] == r["tags.arm"]
        for key in ("ttft_ms/p50", "tpot_ms/p50", "tpot_ms/p90", "e2e_ms/p99", "throughput/output_tok_s"):
            assert math.isfinite(r[f"metrics.{key}"]) and r[f"metrics.{key}"] > 0
    sparse = nested[nested["tags.arm"] == "sparse_self"].iloc[0]
    assert sparse["metrics.spec/mean_acceptance_length"] >= 1.0
    assert sparse["params.spec.sparse.budget_tokens"] == "32" and sparse["params.spec.tree.kind"] == "chain"
    assert parent["metrics.requests/completed"] == NUM_PROMPTS
    assert "metrics.decision/tpot_ms/p50/diff" in runs.columns

    client = MlflowClient(mlflow_server["uri"])
    top = {f.path for f in client.list_artifacts(ab["run_id"])}
    assert {"decision.json", "requests.csv", "bench_result.json", "plots"} <= top
    plots = {f.path for f in client.list_artifacts(ab["run_id"], "plots")}
    assert plots == {"plots/latency_cdf.png", "plots/acceptance_hist.png"}
    dst = ab["root"] / "dl"
    for _, r in nested.iterrows():
        assert [f.path for f in client.list_artifacts(r.run_id)] == ["requests.csv"]
        csv_path = Path(client.download_artifacts(r.run_id, "requests.csv", str(dst / r["tags.arm"])))
        lines = csv_path.read_text().strip().splitlines()
        assert len(lines) - 1 == r["metrics.requests/completed"] == r["metrics.requests/assigned"]
    png = Path(client.download_artifacts(ab["run_id"], "plots/latency_cdf.png", str(dst)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dec = json.loads(Path(client.download_artifacts(ab["run_id"], "decision.json", str(dst))).read_text())
    assert dec["control"] == "none" and dec["treatment"] == "sparse_self" and dec["verdict"]
    assert len(client.get_metric_history(ab["run_id"], "seq/p_value")) == len(dec["sequential"]["path"]) > 0


def test_ab_report_cli_prints_the_decision(ab, mlflow_server):
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server["uri"]}
    out = subprocess.run([str(VENV_BIN / "specray"), "ab", "report", ab["run_id"]], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"A/B run {ab['run_id']}: control none vs treatment sparse_self" in out.stdout
    assert "tpot_ms p90" in out.stdout and "mSPRT on tpot_ms" in out.stdout and "verdict:" in out.stdout
    bad = subprocess.run([str(VENV_BIN / "specray"), "ab", "report", "0" * 32], capture_output=True, text=True,
                         env=env, timeout=120)
    assert bad.returncode == 2 and "cannot read A/B run" in bad.stderr


def test_bench_serve_cli_poisson_load(ab):
    out_file = ab["root"] / "bench.json"
    n = 10
    proc = subprocess.run(
        [str(VENV_BIN / "specray"), "bench", "serve", "--base-url", ab["base"], "--model", MODEL,
         "--tokenizer", ab["tokenizer"], "--dataset-name", "random", "--num-prompts", str(n), "--input-len", "40,80",
         "--output-len", "8", "--request-rate", "6", "--burstiness", "1", "--max-concurrency", "3", "--seed", "3",
         "--num-sessions", "5", "--goodput", "ttft:60000", "e2el:1", "--result-file", str(out_file)],
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Serving Benchmark Result" in proc.stdout
    res = json.loads(out_file.read_text())
    rows = res["requests"]
    assert len(rows) == n and res["completed"] == sum(r["success"] for r in rows) == n and res["failed"] == 0
    assert res["total_output_tokens"] == sum(r["output_len"] for r in rows) == n * 8
    assert sorted({r["bucket"] for r in rows}) == [40, 80]
    for metric, key in (("ttft", "ttft_ms"), ("tpot", "tpot_ms"), ("e2el", "e2el_ms")):
        v = np.array([r[key] for r in rows])
        for p in (50, 90, 99):
            assert res[f"p{p}_{metric}_ms"] == pytest.approx(np.percentile(v, p))
        assert res[f"mean_{metric}_ms"] == pytest.approx(v.mean())
    itl = np.concatenate([r["itl_ms"] for r in rows])
    assert res["p90_itl_ms"] == pytest.approx(np.percentile(itl, 90))
    for r in rows:  # TPOT is per token after the first, from the row's own numbers
        assert r["tpot_ms"] == pytest.approx((r["e2el_ms"] - r["ttft_ms"]) / (r["output_len"] - 1))
        assert r["arm"] in ("none", "sparse_self") and r["session_id"].startswith("session-")
    # goodput: e2el <= 1 ms is impossible, so no request is good
    assert res["request_goodput"] == 0.0
    assert res["request_throughput"] == pytest.approx(n / res["duration"])
    assert sum(s["completed"] for s in res["per_arm"].values()) == n
    # Poisson arrivals at 6 req/s: sends are spread out, not simultaneous
    starts = sorted(r["start_s"] for r in rows)
    assert starts[-1] - starts[0] > 0.3


def _pages_in_use(base: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(httpx.get(base + "/metrics", timeout=30).text):
        for s in fam.samples:
            if s.name == "specray:kv_cache_pages_in_use":
                out[s.labels["arm"]] = s.value
    return out


def test_disconnect_through_the_ingress_frees_pages(ab):
    base = ab["base"]
    body = {"model": MODEL, "prompt": " ".join(f"w{5 + i % 200}" for i in range(100)), "max_tokens": 210,
            "ignore_eos": True, "stream": True}
    finished_before = _arm_counts_from_metrics(base)
    with httpx.Client(timeout=120) as client:
        with client.stream("POST", base + "/v1/completions", json=body, headers={"x-session-id": "leaver"}) as r:
            arm = r.headers["x-specray-arm"]
            for line in r.iter_lines():
                if line.startswith("data:"):
                    break  # one chunk, then hang up mid-stream
    deadline = time.monotonic() + 60
    while _pages_in_use(base).get(arm) != 0.0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _pages_in_use(base)[arm] == 0.0
    time.sleep(2.0)
    # the request was aborted, not run to its 210 tokens: the arm never recorded it as finished
    assert _arm_counts_from_metrics(base) == finished_before


def test_runner_early_stop_hook(ab):
    import asyncio

    from specray.pipelines.bench import BenchConfig, run_requests
    from specray.pipelines.datasets import build_dataset, load_tokenizer

    samples = build_dataset("random", load_tokenizer(ab["tokenizer"]), 12, 32, seed=5)
    cfg = BenchConfig(ab["base"], MODEL, num_prompts=12, request_rate=20.0, max_concurrency=2, output_len=3,
                      num_sessions=6)
    rows, _ = asyncio.run(run_requests(cfg, samples, should_stop=lambda done: len(done) >= 3))
    assert 3 <= len(rows) < 12 and all(r.success for r in rows)
