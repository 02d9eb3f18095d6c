"""`specray bench serve`: an OpenAI-API load generator shaped like `vllm bench serve`.

Owns the client side of a benchmark: arrival schedule, concurrent streaming requests over real HTTP
(httpx), per-request measurements and their summary. Data flow:

    build_dataset (datasets.py) -> samples -> arrival times (gamma, shape = burstiness; 1 = Poisson)
    -> POST base_url+endpoint with stream=true, stream_options.include_usage (<= max_concurrency live)
    -> RequestResult rows -> summarize() -> JSON (--result-file), printed table

Definitions (client side, as vLLM documents them):
- TTFT: send to the first streamed chunk with text.
- ITL: gaps between successive streamed chunks with text. With speculative decoding one chunk
  may carry several tokens, so ITL overstates per-token latency; TPOT amortises correctly.
- TPOT: (E2E - TTFT) / (output tokens - 1), per request; output tokens from the final `usage`.
- E2EL: send to the end of the stream.
- goodput: completed requests per second meeting every SLO given with `--goodput`.
Each row also carries the arm (`x-specray-arm` response header) and the request's mean acceptance
length (`metrics.speculative_decoding` of the final chunk) when the server reports them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from specray.pipelines.datasets import DATASETS, Sample

METRICS = ("ttft", "tpot", "itl", "e2el")
ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


@dataclass
class BenchConfig:
    base_url: str
    model: str
    endpoint: str = "/v1/completions"
    num_prompts: int = 100
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    seed: int = 0
    output_len: int = 128
    ignore_eos: bool = True
    temperature: float = 0.0
    num_sessions: int = 0  # >0: request i belongs to session i % num_sessions
    session_id: str | None = None  # template; `{j}` is the session index
    user: str | None = None  # template for the body's `user` field
    goodput: dict[str, float] = field(default_factory=dict)  # ttft/tpot/e2el -> SLO in ms
    percentiles: tuple[float, ...] = (50.0, 90.0, 99.0)
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"--endpoint must be one of {', '.join(ENDPOINTS)}, got {self.endpoint!r}")
        if not self.request_rate > 0:
            raise ValueError(f"--request-rate must be > 0 (or inf), got {self.request_rate}")
        if not self.burstiness > 0:
            raise ValueError(f"--burstiness must be > 0, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")
        if self.output_len < 1:
            raise ValueError(f"--output-len must be >= 1, got {self.output_len}")
        bad = sorted(set(self.goodput) - {"ttft", "tpot", "e2el"})
        if bad:
            raise ValueError(f"--goodput keys are ttft, tpot, e2el; got {bad[0]!r}")


@dataclass
class RequestResult:
    index: int
    bucket: int
    prompt_len: int
    output_len: int = 0
    success: bool = False
    status: int = 0
    error: str = ""
    arm: str | None = None
    session_id: str | None = None
    user: str | None = None
    start_s: float = 0.0  # send time relative to the benchmark start
    ttft_ms: float = math.nan
    tpot_ms: float = math.nan
    e2el_ms: float = math.nan
    itl_ms: list[float] = field(default_factory=list)
    acceptance_length: float | None = None
    dataset: str = ""


def arrival_delays(n: int, rate: float, burstiness: float, seed: int) -> np.ndarray:
    """Gaps before each of n requests: gamma(shape=burstiness, mean=1/rate); zeros for rate inf."""
    if math.isinf(rate):
        return np.zeros(n)
    rng = np.random.default_rng(seed)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)


def _identity(cfg: BenchConfig, i: int) -> tuple[str | None, str | None]:
    j = i % cfg.num_sessions if cfg.num_sessions > 0 else i
    sid = cfg.session_id if cfg.session_id is not None else ("session-{j}" if cfg.num_sessions > 0 else None)
    return (sid.format(j=j) if sid else None), (cfg.user.format(j=j) if cfg.user else None)


def _payload(cfg: BenchConfig, sample: Sample, user: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": cfg.model, "max_tokens": cfg.output_len, "stream": True,
                            "stream_options": {"include_usage": True}, "temperature": cfg.temperature,
                            "ignore_eos": cfg.ignore_eos}
    if cfg.endpoint == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": sample.prompt}]
    else:
        body["prompt"] = sample.prompt
    if user:
        body["user"] = user
    return body


async def _one(client: Any, cfg: BenchConfig, i: int, sample: Sample, t_bench: float) -> RequestResult:
    sid, user = _identity(cfg, i)
    r = RequestResult(i, sample.bucket, sample.prompt_len, session_id=sid, user=user, dataset=sample.dataset)
    headers = {"x-session-id": sid} if sid else {}
    t0 = time.perf_counter()
    r.start_s = t0 - t_bench
    last = None
    chunks = 0
    try:
        async with client.stream("POST", cfg.base_url.rstrip("/") + cfg.endpoint, json=_payload(cfg, sample, user),
                                 headers=headers) as resp:
            r.status, r.arm = resp.status_code, resp.headers.get("x-specray-arm")
            if resp.status_code != 200:
                r.error = (await resp.aread()).decode(errors="replace")[:500]
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    r.error = json.dumps(obj["error"])[:500]
                    return r
                now = time.perf_counter()
                for ch in obj.get("choices") or []:
                    text = ch.get("text") if "text" in ch else (ch.get("delta") or {}).get("content")
                    if text:
                        chunks += 1
                        if last is None:
                            r.ttft_ms = 1000 * (now - t0)
                        else:
                            r.itl_ms.append(1000 * (now - last))
                        last = now
                if obj.get("usage"):
                    r.output_len = int(obj["usage"].get("completion_tokens", 0))
                    r.prompt_len = int(obj["usage"].get("prompt_tokens", r.prompt_len))
                spec = (obj.get("metrics") or {}).get("speculative_decoding")
                if spec and spec.get("mean_acceptance_length") is not None:
                    r.acceptance_length = float(spec["mean_acceptance_length"])
        r.e2el_ms = 1000 * (time.perf_counter() - t0)
        r.output_len = r.output_len or chunks
        if r.output_len > 1 and not math.isnan(r.ttft_ms):
            r.tpot_ms = (r.e2el_ms - r.ttft_ms) / (r.output_len - 1)
        r.success = last is not None
        if not r.success:
            r.error = "the stream carried no text"
    except Exception as e:  # noqa: BLE001 - a failed request is a row, not a crash of the benchmark
        r.error = f"{type(e).__name__}: {e}"
    return r


async def run_requests(cfg: BenchConfig, samples: list[Sample],
                       should_stop: Callable[[list[RequestResult]], bool] | None = None
                       ) -> tuple[list[RequestResult], float]:
    """Send `samples` on the arrival schedule; `should_stop(done_rows)` is asked before each send
    (the A/B runner's early stop). Returns the rows (in send order) and the wall duration."""
    import httpx

    delays = arrival_delays(len(samples), cfg.request_rate, cfg.burstiness, cfg.seed)
    sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    done: list[RequestResult] = []
    limits = httpx.Limits(max_connections=cfg.max_concurrency or len(samples) or 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout_s), limits=limits) as client:
        t_bench = time.perf_counter()

        async def guarded(i: int, s: Sample) -> RequestResult:
            if sem is None:
                res = await _one(client, cfg, i, s, t_bench)
            else:
                async with sem:
                    res = await _one(client, cfg, i, s, t_bench)
            done.append(res)
            return res

        tasks = []
        for i, (s, gap) in enumerate(zip(samples, delays, strict=True)):
            if gap > 0:
                await asyncio.sleep(float(gap))
            if should_stop is not None and should_stop(done):
                break
            if sem is not None and sem.locked():  # keep the schedule honest: wait for a slot before sending
                async with sem:
                    pass
            tasks.append(asyncio.create_task(guarded(i, s)))
        rows = list(await asyncio.gather(*tasks))
        return rows, time.perf_counter() - t_bench


def _stats(values: list[float], name: str, percentiles: tuple[float, ...]) -> dict[str, float]:
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    out = {f"mean_{name}_ms": float(v.mean()) if v.size else math.nan,
           f"median_{name}_ms": float(np.median(v)) if v.size else math.nan,
           f"std_{name}_ms": float(v.std()) if v.size else math.nan}
    for p in percentiles:
        out[f"p{p:g}_{name}_ms"] = float(np.percentile(v, p)) if v.size else math.nan
    return out


def _good(r: RequestResult, slo: dict[str, float]) -> bool:
    vals = {"ttft": r.ttft_ms, "tpot": r.tpot_ms, "e2el": r.e2el_ms}
    return r.success and all(not (vals[k] > ms) for k, ms in slo.items())  # NaN TPOT (1 token) passes


def summarize(rows: list[RequestResult], duration_s: float, cfg: BenchConfig) -> dict[str, Any]:
    """vLLM's `BenchmarkMetrics` fields (+ acceptance length) over `rows`."""
    ok = [r for r in rows if r.success]
    total_in, total_out = sum(r.prompt_len for r in ok), sum(r.output_len for r in ok)
    acc = [r.acceptance_length for r in ok if r.acceptance_length is not None]
    dur = max(duration_s, 1e-9)
    out: dict[str, Any] = {
        "completed": len(ok), "failed": len(rows) - len(ok), "duration": duration_s,
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / dur, "output_throughput": total_out / dur,
        "total_token_throughput": (total_in + total_out) / dur,
        "request_goodput": sum(_good(r, cfg.goodput) for r in ok) / dur if cfg.goodput else None,
        "mean_acceptance_length": float(np.mean(acc)) if acc else None,
    }
    for m in METRICS:
        vals = [x for r in ok for x in r.itl_ms] if m == "itl" else [getattr(r, f"{m}_ms") for r in ok]
        out.update(_stats(vals, m, cfg.percentiles))
    return out


def result_json(cfg: BenchConfig, rows: list[RequestResult], duration_s: float,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The --result-file document: config, overall summary, per-arm and per-bucket summaries, rows."""
    arms = sorted({r.arm for r in rows if r.arm})
    buckets = sorted({r.bucket for r in rows})
    return {
        "backend": "openai", "base_url": cfg.base_url, "model_id": cfg.model, "endpoint": cfg.endpoint,
        "num_prompts": len(rows), "request_rate": cfg.request_rate if math.isfinite(cfg.request_rate) else "inf",
        "burstiness": cfg.burstiness, "max_concurrency": cfg.max_concurrency, "seed": cfg.seed,
        "output_len": cfg.output_len, "goodput_slo_ms": cfg.goodput, **(extra or {}),
        **summarize(rows, duration_s, cfg),
        "per_arm": {a: summarize([r for r in rows if r.arm == a], duration_s, cfg) for a in arms},
        "per_bucket": {str(b): summarize([r for r in rows if r.bucket == b], duration_s, cfg) for b in buckets},
        "requests": [asdict(r) for r in rows],
    }


def jsonable(x: Any) -> Any:
    """NaN/inf -> None so the document is strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    return x


def print_result(res: dict[str, Any]) -> None:
    line = "{:<40} {:<10}"
    print("{s:{c}^60}".format(s=" Serving Benchmark Result ", c="="))
    for k in ("completed", "failed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
              "request_goodput", "output_throughput", "total_token_throughput", "mean_acceptance_length"):
        v = res.get(k)
        print(line.format(k, "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else v)))
    for m in METRICS:
        print("{s:{c}^60}".format(s=f" {m.upper()} (ms) ", c="-"))
        for k, v in res.items():
            if k.endswith(f"_{m}_ms") and not k.startswith("std"):
                print(line.format(k, f"{v:.2f}"))
    for arm, s in res.get("per_arm", {}).items():
        print(f"arm {arm}: {s['completed']} done, TPOT p50 {s['median_tpot_ms']:.2f} ms, "
              f"p90 {s.get('p90_tpot_ms', math.nan):.2f} ms, acceptance {s['mean_acceptance_length']}")
    print("=" * 60)


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items or []:
        key, _, ms = item.partition(":")
        try:
            out[key] = float(ms)
        except ValueError:
            raise ValueError(f"--goodput takes KEY:MS pairs (ttft:500 tpot:50 e2el:5000), got {item!r}") from None
    return out


def add_bench_parser(sub: Any) -> None:
    """`specray bench serve ...` (flags follow `vllm bench serve`)."""
    b = sub.add_parser("bench", help="benchmarks against a running server")
    bsub = b.add_subparsers(dest="bench_cmd", required=True)
    s = bsub.add_parser("serve", help="load-test an OpenAI-compatible server (like `vllm bench serve`)")
    s.add_argument("--base-url", default="http://127.0.0.1:8000")
    s.add_argument("--model", required=True, help="the served model name (the request's `model`)")
    s.add_argument("--tokenizer", default=None, help="registry name, HF dir or GGUF for prompt lengths "
                                                      "(default: --model)")
    s.add_argument("--endpoint", default="/v1/completions", choices=ENDPOINTS)
    s.add_argument("--dataset-name", default="long_doc", choices=DATASETS)
    s.add_argument("--num-prompts", type=int, default=100)
    s.add_argument("--input-len", default="1024", help="prompt tokens, or comma-separated buckets: 4096,16384")
    s.add_argument("--output-len", type=int, default=128)
    s.add_argument("--request-rate", type=float, default=math.inf, help="requests/s (inf: all at once)")
    s.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of inter-arrivals; 1 = Poisson")
    s.add_argument("--max-concurrency", type=int, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--goodput", nargs="*", default=None, metavar="KEY:MS", help="SLOs: ttft:500 tpot:50 e2el:5000")
    s.add_argument("--num-sessions", type=int, default=0, help="spread requests over this many sessions")
    s.add_argument("--session-id", default=None, help="x-session-id header; '{j}' is the session index")
    s.add_argument("--user", default=None, help="the body's `user`; '{j}' is the session index")
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false")
    s.add_argument("--result-file", default=None, help="write the JSON result here")
    s.set_defaults(func=cmd_bench_serve)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from specray.pipelines.datasets import build_dataset, load_tokenizer

    try:
        lens = [int(x) for x in str(args.input_len).split(",") if x.strip()]
        cfg = BenchConfig(args.base_url, args.model, args.endpoint, args.num_prompts, args.request_rate,
                          args.burstiness, args.max_concurrency, args.seed, args.output_len, args.ignore_eos,
                          args.temperature, args.num_sessions, args.session_id, args.user, parse_goodput(args.goodput))
        samples = build_dataset(args.dataset_name, load_tokenizer(args.tokenizer or args.model), args.num_prompts,
                                lens, seed=args.seed)
    except ValueError as e:
        print(f"specray: error: {e}", file=sys.stderr)
        return 2
    rows, duration = asyncio.run(run_requests(cfg, samples))
    res = result_json(cfg, rows, duration, {"dataset_name": args.dataset_name, "input_len": lens})
    print_result(res)
    if args.result_file:
        with open(args.result_file, "w") as f:
            json.dump(jsonable(res), f, indent=1)
        print(f"[specray] wrote {args.result_file}")
    return 0 if res["completed"] else 1
