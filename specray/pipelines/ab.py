"""`specray ab run EXPERIMENT.yaml` and `specray ab report RUN_ID`: live A/B tests of speculation configs.

Owns the orchestration of one A/B run; the parts live elsewhere:

    load_experiment (platform/experiments.py)
    -> Ray + Serve on loopback: one SpecrayServer deployment per arm behind ExperimentIngress
    -> build_dataset + run_requests (bench.py) through the ingress, one session id per simulated user
       (sticky assignment), optionally stopping early once the sequential test rejects
    -> decide (stats.py): bootstrap CIs on TPOT/E2E quantile differences + mSPRT on TPOT
    -> log_ab_run (tracking.py): MLflow parent run + a nested run per arm; prints the run id and verdict

The experiment's `traffic:` mapping holds `bench serve` settings (keys as the flags, `_` for `-`);
`decision:` holds alpha, tau, n_boot, sequential_metric, min_pairs, early_stop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
from typing import Any

from specray.errors import ConfigError

TRAFFIC_KEYS = {"dataset_name": "long_doc", "input_len": 1024, "output_len": 64, "num_prompts": 100,
                "num_sessions": 50, "request_rate": 1.0, "burstiness": 1.0, "max_concurrency": 8,
                "endpoint": "/v1/completions", "seed": 0, "tokenizer": None, "ignore_eos": True, "temperature": 0.0,
                "goodput": {}}
DECISION_KEYS = {"alpha": 0.05, "tau": 0.1, "n_boot": 2000, "sequential_metric": "tpot_ms", "min_pairs": 20,
                 "early_stop": False}


def _settings(given: dict[str, Any], defaults: dict[str, Any], section: str) -> dict[str, Any]:
    bad = sorted(set(given) - set(defaults))
    if bad:
        raise ConfigError(f"unknown field {section}.{bad[0]}; known: {', '.join(defaults)}")
    return {**defaults, **given}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _per_arm(rows: list[Any], arm: str, metric: str) -> list[float]:
    """The arm's successful requests' metric in completion order (the order a live test sees them)."""
    done = sorted((r for r in rows if r.arm == arm and r.success), key=lambda r: r.start_s + r.e2el_ms / 1000)
    return [getattr(r, "e2el_ms" if metric == "e2e_ms" else metric) for r in done]


def run_ab(experiment_path: str, tracking_uri: str | None, address: str | None = None, port: int | None = None,
           overrides: dict[str, Any] | None = None, ray_actor_options: dict[str, Any] | None = None,
           keep_serving: bool = False, result_file: str | None = None) -> tuple[str, dict[str, Any]]:
    """Deploy, drive, decide, log. Returns (MLflow parent run id, decision dict)."""
    import httpx
    import ray
    from ray import serve

    from specray.pipelines.bench import BenchConfig, jsonable, result_json, run_requests
    from specray.pipelines.datasets import build_dataset, load_tokenizer
    from specray.pipelines.stats import decide, msprt
    from specray.pipelines.tracking import log_ab_run
    from specray.platform.experiments import build_experiment_app, load_experiment

    exp = load_experiment(experiment_path)
    traffic = _settings({**exp.traffic, **(overrides or {})}, TRAFFIC_KEYS, "traffic")
    dec_cfg = _settings(exp.decision, DECISION_KEYS, "decision")
    lens = traffic["input_len"] if isinstance(traffic["input_len"], list) else [int(traffic["input_len"])]
    tokenizer = load_tokenizer(traffic["tokenizer"] or str(exp.arms[0].engine["model"]))
    samples = build_dataset(traffic["dataset_name"], tokenizer, int(traffic["num_prompts"]), lens,
                            seed=int(traffic["seed"]))
    cfg = BenchConfig("", exp.model, traffic["endpoint"], len(samples), float(traffic["request_rate"]),
                      float(traffic["burstiness"]), traffic["max_concurrency"], int(traffic["seed"]),
                      int(traffic["output_len"]), bool(traffic["ignore_eos"]), float(traffic["temperature"]),
                      int(traffic["num_sessions"]), f"{exp.name}-s{traffic['seed']}-{{j}}", None,
                      dict(traffic["goodput"]))
    port = port or _free_port()
    cfg.base_url = f"http://127.0.0.1:{port}"
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=address, include_dashboard=False, ignore_reinit_error=True,
                 **({} if address else {"num_cpus": max(os.cpu_count() or 1, 2 * len(exp.arms) + 2)}))
    control = exp.control
    treatments = [a.name for a in exp.arms if a.name != control]
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        t0 = time.perf_counter()
        serve.run(build_experiment_app({"experiment": exp, "ray_actor_options": ray_actor_options}),
                  name=exp.name, route_prefix="/", blocking=False)
        _wait_healthy(cfg.base_url, 600)
        print(f"[specray] {exp.name}: {len(exp.arms)} arms up on {cfg.base_url} in {time.perf_counter() - t0:.0f}s; "
              f"sending {len(samples)} requests", flush=True)

        def should_stop(done: list[Any]) -> bool:
            if not dec_cfg["early_stop"]:
                return False
            m = dec_cfg["sequential_metric"]
            res = msprt(_per_arm(done, control, m), _per_arm(done, treatments[0], m), alpha=dec_cfg["alpha"],
                        tau=dec_cfg["tau"], min_pairs=dec_cfg["min_pairs"])
            return res.rejected

        rows, duration = asyncio.run(run_requests(cfg, samples, should_stop))
        counts_doc = httpx.get(cfg.base_url + "/experiments", timeout=30).json()
    finally:
        if not keep_serving:
            serve.delete(exp.name)
            serve.shutdown()
            if started_ray:
                ray.shutdown()
    bench = result_json(cfg, rows, duration, {"dataset_name": traffic["dataset_name"], "input_len": lens,
                                              "experiment": exp.name})
    bench = jsonable(bench)
    counts = {a["name"]: int(a["count"]) for a in counts_doc["arms"]}
    metrics = ("tpot_ms", "e2e_ms")
    comparisons = []
    for t in treatments:
        d = decide(control, t, {m: _per_arm(rows, control, m) for m in metrics},
                   {m: _per_arm(rows, t, m) for m in metrics}, sequential_metric=dec_cfg["sequential_metric"],
                   alpha=dec_cfg["alpha"], tau=dec_cfg["tau"], n_boot=int(dec_cfg["n_boot"]),
                   seed=int(traffic["seed"]), min_pairs=int(dec_cfg["min_pairs"]))
        comparisons.append(d)
    decision = comparisons[0].to_dict()
    if decision["sequential"]:
        decision["sequential"] = comparisons[0].sequential.to_dict(with_path=True)
    decision |= {"counts": counts, "sent": len(rows), "planned": len(samples),
                 "stopped_early": len(rows) < len(samples), "others": [c.to_dict() for c in comparisons[1:]]}
    decision = jsonable(decision)
    if result_file:
        with open(result_file, "w") as f:
            json.dump({"bench": bench, "decision": decision}, f, indent=1)
    try:
        run_id = log_ab_run(tracking_uri, exp, bench, decision, counts)
    except ImportError as e:  # an inference node without MLflow: log from the result file elsewhere
        if not result_file:
            raise
        print(f"[specray] MLflow is not importable here ({e}); results are in {result_file}: log them with "
              f"`specray ab log {experiment_path} {result_file} --tracking-uri ...`", flush=True)
        run_id = ""
    return run_id, decision


def _wait_healthy(base_url: str, timeout_s: float) -> None:
    import httpx

    deadline, last = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(base_url + "/health", timeout=10)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as e:
            last = str(e)
        time.sleep(1.0)
    raise TimeoutError(f"the experiment ingress at {base_url} was not healthy within {timeout_s:.0f}s: {last}")


def _tracking_uri(args: argparse.Namespace) -> str | None:
    return args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")


def cmd_ab_run(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in (("num_prompts", args.num_prompts), ("request_rate", args.request_rate),
                                   ("max_concurrency", args.max_concurrency), ("seed", args.seed)) if v is not None}
    opts = {k: v for k, v in (("num_cpus", args.arm_num_cpus), ("num_gpus", args.arm_num_gpus)) if v is not None}
    try:
        run_id, decision = run_ab(args.experiment, _tracking_uri(args), args.address, args.port, overrides,
                                  opts or None, args.keep_serving, args.result_file)
    except ConfigError as e:
        print(f"specray: error: {e}", file=sys.stderr)
        return 2
    print(f"[specray] MLflow run id: {run_id}")
    print(f"[specray] sent {decision['sent']} of {decision['planned']} requests; assigned {decision['counts']}")
    print(f"[specray] decision: {decision['verdict']}")
    return 0


def cmd_ab_log(args: argparse.Namespace) -> int:
    """Log a finished run's result file (`ab run --result-file`, e.g. from a GPU node without MLflow)."""
    from specray.pipelines.tracking import log_ab_run
    from specray.platform.experiments import load_experiment

    try:
        exp = load_experiment(args.experiment)
        with open(args.result_file) as f:
            res = json.load(f)
        bench, decision = res["bench"], res["decision"]
        counts = {k: int(v) for k, v in decision["counts"].items()}
    except (ConfigError, OSError, KeyError, json.JSONDecodeError) as e:
        print(f"specray: error: cannot log {args.result_file}: {e}", file=sys.stderr)
        return 2
    run_id = log_ab_run(_tracking_uri(args), exp, bench, decision, counts)
    print(f"[specray] MLflow run id: {run_id}")
    print(f"[specray] decision: {decision['verdict']}")
    return 0


def cmd_ab_report(args: argparse.Namespace) -> int:
    from specray.pipelines.tracking import format_report, read_report

    try:
        rep = read_report(_tracking_uri(args), args.run_id)
    except Exception as e:  # noqa: BLE001 - MLflow raises its own types for unknown runs
        print(f"specray: error: cannot read A/B run {args.run_id}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(rep, indent=1, default=str) if args.json else format_report(rep))
    return 0


def add_ab_parser(sub: Any) -> None:
    a = sub.add_parser("ab", help="A/B experiments between speculation configs, tracked in MLflow")
    asub = a.add_subparsers(dest="ab_cmd", required=True)
    r = asub.add_parser("run", help="deploy the arms behind a sticky ingress, drive traffic, decide, log")
    r.add_argument("experiment", help="experiment YAML (see configs/experiments/)")
    r.add_argument("--tracking-uri", default=None, help="MLflow server (default: $MLFLOW_TRACKING_URI)")
    r.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    r.add_argument("--port", type=int, default=None, help="ingress port on 127.0.0.1 (default: a free one)")
    r.add_argument("--num-prompts", type=int, default=None)
    r.add_argument("--request-rate", type=float, default=None)
    r.add_argument("--max-concurrency", type=int, default=None)
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--arm-num-cpus", type=float, default=None, help="CPUs per arm replica (Ray logical)")
    r.add_argument("--arm-num-gpus", type=float, default=None,
                   help="GPUs per arm replica (0.5: two arms share one GPU; lower cache.gpu_memory_utilization)")
    r.add_argument("--keep-serving", action="store_true",
                   help="leave the deployments running afterwards (on the cluster given by --address)")
    r.add_argument("--result-file", default=None, help="also write bench rows + decision JSON here")
    r.set_defaults(func=cmd_ab_run)
    lg = asub.add_parser("log", help="log a finished run's --result-file to MLflow (run elsewhere)")
    lg.add_argument("experiment", help="the experiment YAML the run used")
    lg.add_argument("result_file")
    lg.add_argument("--tracking-uri", default=None, help="MLflow server (default: $MLFLOW_TRACKING_URI)")
    lg.set_defaults(func=cmd_ab_log)
    p = asub.add_parser("report", help="print the decision of a logged A/B run")
    p.add_argument("run_id")
    p.add_argument("--tracking-uri", default=None, help="MLflow server (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ab_report)
