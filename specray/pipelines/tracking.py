"""MLflow tracking of an A/B run: one parent run per experiment run, one nested run per arm.

Owns the mapping from the A/B runner's results to MLflow (and back, for `specray ab report`):
- parent run (tags `specray.role=experiment`): params = the flattened experiment (`arms.none.weight`,
  `traffic.request_rate`, ...); metrics `decision/...` (CI bounds per metric and quantile) and the
  sequential test's always-valid p-value at each look (`seq/p_value`, step = pairs); artifacts
  `decision.json`, `requests.csv` (every request), `bench_result.json`, `plots/latency_cdf.png`,
  `plots/acceptance_hist.png`.
- nested run per arm (tags `specray.role=arm`, `arm`): params = the arm's flattened EngineConfig with
  `speculative_config` shortened to `spec` (`spec.method`, `spec.tree.kind`, ...); metrics
  `ttft_ms/p50`, `tpot_ms/p90`, `itl_ms/p99`, `e2e_ms/mean`, `throughput/output_tok_s`,
  `spec/mean_acceptance_length`, `requests/completed`, `requests/assigned`; artifact
  `requests.csv` (the arm's requests).
Keys are `/`-namespaced (no Prometheus colons), as MLflow's UI groups them.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

PARENT_TAG, ARM_TAG = "experiment", "arm"
_SUMMARY_KEYS = {"ttft": "ttft_ms", "tpot": "tpot_ms", "itl": "itl_ms", "e2el": "e2e_ms"}
_ROW_FIELDS = ("index", "arm", "session_id", "user", "dataset", "bucket", "prompt_len", "output_len", "success",
               "status", "start_s", "ttft_ms", "tpot_ms", "e2el_ms", "acceptance_length", "num_chunks", "error")


def flatten(d: Any, prefix: str = "") -> dict[str, str]:
    """Nested mappings/lists -> {"a.b.c": "value"}; `speculative_config` is shortened to `spec`."""
    out: dict[str, str] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            key = "spec" if k == "speculative_config" else str(k)
            out.update(flatten(v, f"{prefix}{key}."))
    elif isinstance(d, list | tuple) and any(isinstance(x, dict) for x in d):
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix.rstrip(".")] = json.dumps(d) if isinstance(d, list | tuple) else str(d)
    return out


def engine_params(engine: dict[str, Any]) -> dict[str, str]:
    """The arm's complete EngineConfig (defaults included), flattened."""
    from specray.config import load_engine_config

    return flatten(dataclasses.asdict(load_engine_config(dict(engine))))


def arm_metrics(summary: dict[str, Any], assigned: int | None = None) -> dict[str, float]:
    """`bench.summarize` fields -> `/`-namespaced MLflow metrics (NaN/None dropped)."""
    m: dict[str, float | None] = {}
    for short, key in _SUMMARY_KEYS.items():
        for stat in ("mean", "std"):
            m[f"{key}/{stat}"] = summary.get(f"{stat}_{short}_ms")
        for p in (50, 90, 99):
            m[f"{key}/p{p}"] = summary.get(f"p{p}_{short}_ms")
        if m[f"{key}/p50"] is None:
            m[f"{key}/p50"] = summary.get(f"median_{short}_ms")
    m.update({
        "throughput/output_tok_s": summary.get("output_throughput"),
        "throughput/total_tok_s": summary.get("total_token_throughput"),
        "throughput/requests_s": summary.get("request_throughput"),
        "goodput/requests_s": summary.get("request_goodput"),
        "spec/mean_acceptance_length": summary.get("mean_acceptance_length"),
        "requests/completed": summary.get("completed"),
        "requests/failed": summary.get("failed"),
        "requests/assigned": assigned,
    })
    return {k: float(v) for k, v in m.items() if v is not None and math.isfinite(float(v))}


def write_rows(rows: list[dict[str, Any]], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_ROW_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "num_chunks": len(r.get("itl_ms") or []) + (1 if r.get("success") else 0)})
    return path


def plot_latency_cdfs(rows: list[dict[str, Any]], path: Path) -> Path:
    """Empirical CDFs of TTFT, TPOT and E2E per arm, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    arms = sorted({r["arm"] for r in rows if r.get("arm")})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (key, label) in zip(axes, (("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms/token)"),
                                       ("e2el_ms", "E2E latency (ms)")), strict=True):
        for arm in arms:
            v = np.sort([r[key] for r in rows if r.get("arm") == arm and r.get("success")
                         and r.get(key) is not None and math.isfinite(r[key])])
            if v.size:
                ax.step(v, np.arange(1, v.size + 1) / v.size, where="post", label=f"{arm} (n={v.size})")
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Latency CDFs per arm")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_acceptance(rows: list[dict[str, Any]], path: Path) -> Path:
    """Histogram of per-request mean acceptance length per arm (1.0 = no speculation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = sorted({r["arm"] for r in rows if r.get("arm")})
    fig, ax = plt.subplots(figsize=(7, 4))
    for arm in arms:
        v = [r["acceptance_length"] for r in rows if r.get("arm") == arm and r.get("acceptance_length") is not None]
        if v:
            ax.hist(v, bins=20, alpha=0.6, label=f"{arm} (n={len(v)})")
    ax.set_xlabel("mean acceptance length per request (1 + accepted / drafts)")
    ax.set_ylabel("requests")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _log_params(params: dict[str, str]) -> None:
    import mlflow

    items = sorted(params.items())
    for i in range(0, len(items), 100):  # MLflow's batch limit
        mlflow.log_params({k: v[:6000] for k, v in items[i: i + 100]})


def log_ab_run(tracking_uri: str | None, experiment: Any, bench: dict[str, Any], decision: dict[str, Any],
               counts: dict[str, int], run_name: str | None = None) -> str:
    """Log a finished A/B run; returns the parent run id. `experiment`: `platform.experiments.Experiment`;
    `bench`: `bench.result_json` (per_arm summaries + requests); `decision`: `stats.Decision.to_dict(with path)`."""
    import mlflow
    from mlflow.entities import Metric

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment.name)
    rows = bench["requests"]
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_name=run_name or f"{experiment.name}-ab",
                                                                tags={"specray.role": PARENT_TAG}) as parent:
        d = Path(tmp)
        exp = experiment.to_dict()
        _log_params(flatten({k: v for k, v in exp.items() if k != "arms"})
                    | {f"arms.{a['name']}.{k}": str(a[k]) for a in exp["arms"] for k in ("weight", "replicas")}
                    | {f"arms.{a['name']}.spec.method": str((a["engine"].get("speculative_config") or {})
                                                           .get("method", "none")) for a in exp["arms"]})
        summary = {k: v for k, v in bench.items() if k not in ("requests", "per_arm", "per_bucket")}
        mlflow.log_metrics(arm_metrics(summary))
        dec_metrics: dict[str, float] = {}
        for c in decision.get("bootstrap", []):
            base = f"decision/{c['metric']}/p{round(100 * c['quantile'])}"
            dec_metrics |= {f"{base}/diff": c["diff"], f"{base}/low": c["low"], f"{base}/high": c["high"]}
        seq = decision.get("sequential") or {}
        if seq:
            dec_metrics["decision/seq_p_value"] = seq["p_value"]
            dec_metrics["decision/seq_rejected"] = float(seq["rejected"])
        mlflow.log_metrics(dec_metrics)
        path = seq.get("path") or []
        if path:
            client, ts = mlflow.tracking.MlflowClient(), int(1000 * time.time())
            first = seq["n_pairs"] - len(path) + 1
            metrics = [Metric("seq/p_value", float(p), ts, first + i) for i, p in enumerate(path)]
            for i in range(0, len(metrics), 1000):
                client.log_batch(parent.info.run_id, metrics=metrics[i: i + 1000])
        mlflow.log_dict({k: v for k, v in decision.items()}, "decision.json")
        mlflow.log_dict({k: v for k, v in bench.items() if k != "requests"}, "bench_result.json")
        mlflow.log_artifact(str(write_rows(rows, d / "requests.csv")))
        mlflow.log_artifact(str(plot_latency_cdfs(rows, d / "latency_cdf.png")), "plots")
        mlflow.log_artifact(str(plot_acceptance(rows, d / "acceptance_hist.png")), "plots")
        mlflow.set_tags({"decision.verdict": decision.get("verdict", "")[:5000],
                         "control": decision.get("control", ""), "treatment": decision.get("treatment", "")})
        for arm in experiment.arms:
            with mlflow.start_run(run_name=arm.name, nested=True, tags={"specray.role": ARM_TAG, "arm": arm.name}):
                _log_params(engine_params(arm.engine) | {"arm.weight": str(arm.weight),
                                                         "arm.replicas": str(arm.replicas)})
                mlflow.log_metrics(arm_metrics(bench.get("per_arm", {}).get(arm.name, {}), counts.get(arm.name)))
                arm_rows = [r for r in rows if r.get("arm") == arm.name]
                sub = d / arm.name
                sub.mkdir()
                mlflow.log_artifact(str(write_rows(arm_rows, sub / "requests.csv")))
        return parent.info.run_id


def read_report(tracking_uri: str | None, run_id: str) -> dict[str, Any]:
    """The decision and per-arm metrics of a logged A/B run (for `specray ab report`)."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.tracking.MlflowClient()
    run = client.get_run(run_id)
    if run.data.tags.get("specray.role") != PARENT_TAG:
        raise ValueError(f"run {run_id} is not a specray A/B experiment run (tag specray.role="
                         f"{run.data.tags.get('specray.role')!r})")
    with tempfile.TemporaryDirectory() as tmp:
        decision = json.loads(Path(client.download_artifacts(run_id, "decision.json", tmp)).read_text())
    arms = client.search_runs([run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
    return {"run_id": run_id, "experiment_id": run.info.experiment_id, "decision": decision,
            "arms": {r.data.tags.get("arm", r.info.run_name): {"run_id": r.info.run_id, "metrics": r.data.metrics,
                                                               "method": r.data.params.get("spec.method", "none")}
                     for r in arms}}


def format_report(rep: dict[str, Any]) -> str:
    dec = rep["decision"]
    lines = [f"A/B run {rep['run_id']}: control {dec['control']} vs treatment {dec['treatment']}", ""]
    lines.append(f"{'arm':<16}{'method':<14}{'n':>5}{'TPOT p50':>10}{'TPOT p90':>10}{'E2E p50':>10}"
                 f"{'E2E p90':>10}{'acc len':>9}")
    for arm, a in sorted(rep["arms"].items()):
        m = a["metrics"]

        def g(k: str, m: dict[str, float] = m) -> str:
            return f"{m[k]:.2f}" if k in m else "-"

        lines.append(f"{arm:<16}{a['method']:<14}{int(m.get('requests/completed', 0)):>5}{g('tpot_ms/p50'):>10}"
                     f"{g('tpot_ms/p90'):>10}{g('e2e_ms/p50'):>10}{g('e2e_ms/p90'):>10}"
                     f"{g('spec/mean_acceptance_length'):>9}")
    lines += ["", f"{'difference (treatment - control)':<34}{'estimate':>10}{'CI low':>10}{'CI high':>10}  significant"]
    for c in dec.get("bootstrap", []):
        name = f"{c['metric']} p{round(100 * c['quantile'])}"
        lines.append(f"{name:<34}{c['diff']:>10.3f}{c['low']:>10.3f}{c['high']:>10.3f}  {c['significant']}")
    seq = dec.get("sequential")
    if seq:
        lines += ["", f"mSPRT on {seq['metric']} ({seq['transform']}, tau={seq['tau']}): {seq['n_pairs']} pairs, "
                      f"always-valid p={seq['p_value']:.4g}, decision {seq['decision']}"
                      + (f" (stopped at {seq['stopped_at']} pairs)" if seq.get("stopped_at") else "")]
    lines += ["", f"verdict: {dec['verdict']}"]
    return "\n".join(lines)
