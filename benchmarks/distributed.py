"""DistributedEngine on GPUs (Ray actors, NCCL tensor parallelism, a separate draft actor), greedy, batch 1.

Sections (each writes `<out>/<section>.json`):
  equality     random Llama-3.1-8B-shaped target (written once to --workdir as safetensors, plus a 2-layer
               draft cut from it): TP=2 target + separate draft (retrieval on) vs TP=1 without speculation;
               reports how many greedy tokens agree (bf16: different reduction orders can flip near-ties;
               use --dtype float32 for an exact check).
  latency      the same target, AR decode at --latency-context (32K) tokens, batch 1: per-step latency of
               TP=1 and TP=2 (driver-observed decode ms/token and the leader's step time), ratio TP2/TP1.
  overhead     TP=1 with a colocated draft: in-process LLMEngine vs DistributedEngine (same config), ms per
               speculative step, with the leader's breakdown (plan broadcast, draft exchange, retrieval
               scores, draft/verify/commit), plus TP=1 with the draft on its own GPU. The arm
               `inprocess_actor` runs the in-process engine inside a Ray worker process (one GPU, no
               control plane): it separates what the worker process costs from what the control plane costs.
  pair         real Qwen2.5-Coder-1.5B target TP=2 with the 0.5B draft (Cross-model Retrieval): separate
               draft without overlap, separate with overlap, colocated; decode tokens/s at --pair-context
               (16K), code-completion prompt, all in one run. Needs --target/--draft (and --tokenizer).

Needs 2 GPUs for TP=2 and a third for a separate draft. With only 2 GPUs the TP=2 sections put the separate
draft on the second shard's GPU (`draft_gpu_fraction` 0.5, recorded as `draft_gpu_fraction` in the rows). Ray must be
importable (the GPU machine's Ray comes from a carried wheelhouse); a local Ray cluster is started unless
--ray-address is given. The exact command (4x H200):

    python3 benchmarks/distributed.py --out results/distributed --workdir /tmp/specray-bench \
        --target ~/models/qwen2.5-coder-1.5b.gguf --draft ~/models/qwen2.5-coder-0.5b.gguf \
        --tokenizer .stage/tok-qwen --sections equality latency overhead pair
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from specray.actors.probe import GcTimer, host_counters, probe


def llama8b_hf_config(max_len: int, num_layers: int = 32) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": num_layers, "num_attention_heads": 32,
        "num_key_value_heads": 8, "max_position_embeddings": max(max_len, 8192), "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "torch_dtype": "bfloat16",
    }


def write_random_llama(path: Path, max_len: int, draft_layers: int = 2, seed: int = 0) -> tuple[Path, Path]:
    """A random bf16 Llama-3.1-8B-shaped checkpoint (one safetensors file per layer) and a draft that
    shares its embeddings, first `draft_layers` layers and head. Written once; reused when present."""
    from safetensors.torch import save_file

    target, draft = path / "llama8b-random", path / f"llama8b-random-{draft_layers}l"
    if (target / "config.json").exists() and (draft / "config.json").exists():
        return target, draft
    target.mkdir(parents=True, exist_ok=True)
    draft.mkdir(parents=True, exist_ok=True)
    cfg = llama8b_hf_config(max_len)
    g = torch.Generator(device="cuda").manual_seed(seed)
    H, I, V, D = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], 128
    q, kv = cfg["num_attention_heads"] * D, cfg["num_key_value_heads"] * D

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device="cuda") * 0.02).to(torch.bfloat16).cpu()

    maps: dict[str, dict[str, str]] = {"t": {}, "d": {}}

    def save(tensors: dict[str, torch.Tensor], fname: str, to_draft: bool) -> None:
        save_file(tensors, str(target / fname), metadata={"format": "pt"})
        maps["t"].update({n: fname for n in tensors})
        if to_draft:
            save_file(tensors, str(draft / fname), metadata={"format": "pt"})
            maps["d"].update({n: fname for n in tensors})

    save({"model.embed_tokens.weight": rand(V, H), "lm_head.weight": rand(V, H),
          "model.norm.weight": torch.ones(H, dtype=torch.bfloat16)}, "embed.safetensors", True)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        save({p + "self_attn.q_proj.weight": rand(q, H), p + "self_attn.k_proj.weight": rand(kv, H),
              p + "self_attn.v_proj.weight": rand(kv, H), p + "self_attn.o_proj.weight": rand(H, q),
              p + "mlp.gate_proj.weight": rand(I, H), p + "mlp.up_proj.weight": rand(I, H),
              p + "mlp.down_proj.weight": rand(H, I), p + "input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
              p + "post_attention_layernorm.weight": torch.ones(H, dtype=torch.bfloat16)},
             f"layer{i:02d}.safetensors", i < draft_layers)
    for d, m, layers in ((target, maps["t"], cfg["num_hidden_layers"]), (draft, maps["d"], draft_layers)):
        (d / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": layers}))
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": m}))
    return target, draft


def engine_config(model: str, max_len: int, tp: int, spec=None, dtype: str = "bfloat16", **kw):
    from specray.config import CacheConfig, EngineConfig, SchedulerConfig

    return EngineConfig(
        model=model, dtype=dtype, device="cuda", skip_tokenizer_init=kw.pop("skip_tokenizer_init", True),
        cuda_graph_batch_sizes=(1,), tensor_parallel_size=tp, speculative_config=spec,
        cache=CacheConfig(page_size=16, num_pages=max_len // 16 + 64),
        scheduler=SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=4096, max_model_len=max_len), **kw,
    )


def draft_spec(draft: str, placement: str, tp: int = 1):
    """A draft_model chain of 4 with retrieval. A separate draft gets its own GPU when the host has
    tp + 1 of them, else it shares the last shard's (`draft_gpu_fraction` 0.5)."""
    from specray.config import RetrievalConfig, SpeculativeConfig, TreeConfig

    own_gpu = placement != "separate" or torch.cuda.device_count() >= tp + 1
    return SpeculativeConfig(method="draft_model", model=draft, tree=TreeConfig(kind="chain", length=4),
                             retrieval=RetrievalConfig(chunk_size=32, top_k_chunks=32, refresh_every=4),
                             draft_placement=placement, draft_gpu_fraction=1.0 if own_gpu else 0.5)


def start_distributed(cfg, ray_address: str | None):
    """A DistributedEngine; if decode CUDA graphs with NCCL inside fail to capture, retry eager."""
    import dataclasses

    from specray.actors.engine import DistributedEngine

    cfg = dataclasses.replace(cfg, ray_address=ray_address)
    try:
        return DistributedEngine(cfg), True
    except Exception as e:  # noqa: BLE001 - record and fall back
        print(f"start with decode graphs failed ({type(e).__name__}: {str(e)[:200]}); retrying eager", flush=True)
        return DistributedEngine(dataclasses.replace(cfg, cuda_graphs=False)), False


def timed_run(engine, prompt: list[int], n: int, at_first=None) -> dict[str, Any]:
    """Greedy batch-1 run. Decode only (prefill excluded): wall time from the first token to the last, and
    the driver's time inside step() and its calls after the first token. `at_first()` runs once when the
    first token arrives (a stats snapshot)."""
    from specray.engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    engine.add_request(f"bench-{time.monotonic_ns()}", prompt, params)
    tokens, t_first, step_s, calls, last = [], None, 0.0, 0, None
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        outs = engine.step()
        if t_first is not None:
            step_s += time.perf_counter() - t0
            calls += 1
        for out in outs:
            tokens, last = out.token_ids, out
            if t_first is None and tokens:
                t_first = time.perf_counter()
                if at_first is not None:
                    at_first()
    elapsed = time.perf_counter() - t_first
    return {
        "tokens": tokens,
        "decode_tok_s": (len(tokens) - 1) / elapsed,
        "decode_ms_per_token": 1e3 * elapsed / (len(tokens) - 1),
        "driver_decode_step_calls": calls,
        "driver_decode_step_s": step_s,
        "spec_metrics": last.spec_metrics if last is not None else None,
    }


def leader_delta(before: dict, after: dict) -> dict[str, Any]:
    """Per-step breakdown (ms) from two DistributedEngine.stats() snapshots."""
    def diff(section: str) -> dict[str, float]:
        a, b = before.get(section, {}), after.get(section, {})
        return {k: b[k] - a.get(k, 0) for k in b if isinstance(b[k], (int, float))}

    loop, plan, spec, dec, host = diff("loop"), diff("plan"), diff("spec"), diff("decode"), diff("host")
    ahead = diff("async")
    steps = max(loop.get("num_steps", 0), 1)
    drafts = max(spec.get("num_drafts", 0), 1)
    out = {"leader_steps": loop.get("num_steps", 0), "leader_ms_per_step": 1e3 * loop.get("step_s", 0) / steps,
           "plan_ms_per_step": 1e3 * plan.get("plan_s", 0) / steps, "plans_per_step": plan.get("num_plans", 0) / steps}
    for k in ("draft_s", "verify_s", "commit_s", "draft_wait_s", "scores_s"):
        if k in spec:
            out[k.replace("_s", "_ms_per_spec_step")] = 1e3 * spec[k] / drafts
    if spec:
        out["spec_steps"] = spec.get("num_drafts", 0)
    if host:  # the leader process over the window: GC, CPU time, context switches, per leader step
        out["leader_host_per_step"] = host_per_step(host, steps)
    if dec.get("num_replays"):  # graphed decode steps: host before launch, wait for tokens, GPU time of the replay
        n = dec["num_replays"]
        out.update({f"decode_{k[:-2]}_ms": 1e3 * dec[k] / n for k in ("host_s", "wait_s", "gpu_s")})
    if ahead:  # async scheduling: decode steps launched ahead, and of them used (the rest were dropped)
        out["steps_launched_ahead"], out["steps_ahead_used"] = ahead["ahead_launched"], ahead["ahead_used"]
    return out


def host_per_step(host: dict[str, float], steps: int) -> dict[str, float]:
    """A `probe.host_counters()` difference per step (ms for times, counts otherwise)."""
    gc_ms = sum(host.get(f"gc{g}_s", 0.0) for g in range(3))
    return {"gc_ms": 1e3 * gc_ms / steps, "gc2_passes": host.get("gc2_passes", 0) / steps,
            "cpu_ms": 1e3 * (host.get("cpu_user_s", 0) + host.get("cpu_sys_s", 0)) / steps,
            "involuntary_switches": host.get("involuntary_switches", 0) / steps,
            "voluntary_switches": host.get("voluntary_switches", 0) / steps}


def run_distributed(cfg, prompt, n, ray_address, warm: list[int], profile_steps: int = 0) -> dict[str, Any]:
    engine, graphs = start_distributed(cfg, ray_address)
    try:
        timed_run(engine, warm, 16)
        probes = {"leader": engine._call(engine.shards[0].probe.remote())}
        if engine.draft_actor is not None:
            probes["draft"] = engine._call(engine.draft_actor.probe.remote())
        snap: list[dict] = []

        def at_first() -> None:
            snap.append(engine.stats())
            if profile_steps:
                engine._call(engine.shards[0].profile.remote(profile_steps))

        row = timed_run(engine, prompt, n, at_first=at_first)
        if profile_steps:
            row["profile"] = engine._call(engine.shards[0].profile_result.remote())
        before = snap[0]
        after = engine.stats()
        row.update(leader_delta(before, after), decode_graphs=graphs, all_reduce=after.get("all_reduce"),
                   verify_graph_sizes=after.get("verify_graph_sizes"), probes=probes)
        if "draft" in before:
            a, b = before["draft"], after["draft"]
            row["draft_actor"] = b
            steps = b["steps"] - a["steps"]
            if steps and "host" in b:
                row["draft_host_per_step"] = host_per_step(
                    {k: v - a["host"].get(k, 0) for k, v in b["host"].items()}, steps)
            if steps and "busy_s" in b:  # the actor's own work per step; the rest of the leader's wait is exchange
                row["draft_actor_busy_ms_per_step"] = 1e3 * (b["busy_s"] - a["busy_s"]) / steps
            if steps and "prepare_s" in b:  # early prepares: done while the leader finished its step
                row["draft_prepare_ms_per_step"] = 1e3 * (b["prepare_s"] - a["prepare_s"]) / steps
            if steps and "proposer" in b:  # where the actor's work goes (same spans as the in-process proposer)
                row["draft_parts_ms_per_step"] = {k[:-2]: 1e3 * (v - a["proposer"][k]) / steps
                                                  for k, v in b["proposer"].items()}
                row["draft_refreshes"] = b["num_refreshes"] - a["num_refreshes"]
        return row
    finally:
        engine.shutdown()


def run_inprocess(cfg, prompt, n, warm: list[int], torch_threads: int | None = None) -> dict[str, Any]:
    """The in-process engine in this process; `torch_threads`: torch's CPU threads for the run (then restored)."""
    threads = torch.get_num_threads()
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    try:
        return _run_inprocess(cfg, prompt, n, warm)
    finally:
        torch.set_num_threads(threads)


def _run_inprocess(cfg, prompt, n, warm: list[int]) -> dict[str, Any]:
    from specray.engine.llm_engine import LLMEngine

    GcTimer.install()
    engine = LLMEngine(cfg)
    timed_run(engine, warm, 16)
    row_probe = probe(engine.device)
    snap: list = []
    host0: list = []

    def at_first(spec=engine.spec) -> None:
        host0.append(host_counters())
        snap.append((spec.stats.num_drafts, dict(spec.timings), dict(getattr(spec.proposer, "timings", {})),
                     getattr(spec.proposer, "num_refreshes", 0)) if spec else None)

    row = timed_run(engine, prompt, n, at_first=at_first)
    host1 = host_counters()
    spec0 = snap[0]
    row["inprocess_ms_per_step"] = 1e3 * row["driver_decode_step_s"] / max(row["driver_decode_step_calls"], 1)
    row["probes"] = {"inprocess": row_probe}
    row["inprocess_host_per_step"] = host_per_step({k: v - host0[0][k] for k, v in host1.items()},
                                                   max(row["driver_decode_step_calls"], 1))
    if spec0 is not None:
        drafts = max(engine.spec.stats.num_drafts - spec0[0], 1)
        for k, v in engine.spec.timings.items():
            row[k.replace("_s", "_ms_per_spec_step")] = 1e3 * (v - spec0[1][k]) / drafts
        row["spec_steps"] = engine.spec.stats.num_drafts - spec0[0]
        parts = getattr(engine.spec.proposer, "timings", {})
        if parts:  # the draft's own spans, as the draft actor reports them
            row["draft_parts_ms_per_step"] = {k[:-2]: 1e3 * (v - spec0[2][k]) / drafts for k, v in parts.items()}
            row["draft_refreshes"] = engine.spec.proposer.num_refreshes - spec0[3]
    del engine
    gc.collect()  # the engine and its speculative decoder reference each other
    torch.cuda.empty_cache()
    return row


def run_inprocess_in_actor(cfg, prompt, n, warm: list[int], ray_address: str | None,
                           torch_threads: int | None = None) -> dict[str, Any]:
    """`run_inprocess` in a Ray task on one GPU: the in-process engine in a Ray worker process (whose torch
    has 1 CPU thread: Ray sets OMP_NUM_THREADS to the task's CPUs)."""
    import ray

    from specray.actors.placement import connect

    connect(ray_address)
    # max_calls=1: the worker exits after the run, freeing its GPU memory and CUDA context
    return ray.get(ray.remote(num_gpus=1, max_calls=1)(run_inprocess).remote(cfg, prompt, n, warm, torch_threads))


def median_round(rounds: list[dict], key: str, *also: str) -> dict[str, Any]:
    """The round whose `key` is the median (of an even count, the upper one), plus `rounds_<field>`: every
    round's value of `key` and of each field in `also`, in run order."""
    row = dict(sorted(rounds, key=lambda r: r[key])[len(rounds) // 2])
    for field in (key, *also):
        row[f"rounds_{field}"] = [r[field] for r in rounds]
    return row


OVERHEAD_ARMS = ("inprocess_colocated", "inprocess_actor", "distributed_colocated", "distributed_separate",
                 "distributed_separate_long_spin", "inprocess_1thread", "inprocess_actor_threads",
                 "distributed_separate_pinned", "distributed_separate_spin_2ms")


def first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/distributed", help="directory for the JSON results")
    ap.add_argument("--workdir", default="/tmp/specray-bench", help="where the random 8B checkpoint is written")
    ap.add_argument("--sections", nargs="+", default=["equality", "latency", "overhead", "pair"],
                    choices=["equality", "latency", "overhead", "pair"])
    ap.add_argument("--ray-address", default=None)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                    help="dtypes of the equality section (float32: exact; bf16 reductions can flip near-ties)")
    ap.add_argument("--equality-context", type=int, default=4096)
    ap.add_argument("--latency-context", type=int, default=32768)
    ap.add_argument("--pair-context", type=int, default=16384)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--overhead-rounds", type=int, default=3,
                    help="overhead: rounds over all arms (fresh engines each); each arm reports its median round")
    ap.add_argument("--overhead-arms", nargs="+", choices=OVERHEAD_ARMS, default=list(OVERHEAD_ARMS[:4]),
                    help="overhead: the arms to run (inprocess_colocated is the baseline and always runs)")
    ap.add_argument("--latency-variants", nargs="*", default=["tp2_pull", "tp2_unfused", "tp2_nccl"],
                    help="latency variants besides tp1 and tp2")
    ap.add_argument("--latency-rounds", type=int, default=1,
                    help="latency: rounds over the variants (fresh engines each); each reports its median round")
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="latency: also profile this many leader decode steps (after the timed window starts; "
                         "the profiled steps are slower, so use a separate run for the timing)")
    ap.add_argument("--target", help="Qwen2.5-Coder-1.5B (HF dir or GGUF) for the pair section")
    ap.add_argument("--draft", help="Qwen2.5-Coder-0.5B for the pair section")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--package", default="transformers", help="source of the code-completion prompt")
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "num_gpus": torch.cuda.device_count(),
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    g = torch.Generator().manual_seed(1)
    warm = torch.randint(0, 128000, (256,), generator=g).tolist()
    max_len = max(args.latency_context, args.equality_context) + args.tokens + 512

    def dump(name: str, result: dict) -> None:
        (out / f"{name}.json").write_text(json.dumps({**meta, **result}, indent=2, default=str))
        print(name, json.dumps(result, default=str)[:2000], flush=True)

    random_sections = {"equality", "latency", "overhead"} & set(args.sections)
    if random_sections:
        target, draft = write_random_llama(Path(args.workdir), max_len)
        target, draft = str(target), str(draft)
    if "equality" in args.sections:
        prompt = torch.randint(0, 128000, (args.equality_context,), generator=g).tolist()
        for dtype in args.dtypes:
            spec = draft_spec(draft, "separate", tp=2)
            tp1 = run_distributed(engine_config(target, max_len, 1, dtype=dtype), prompt, args.tokens,
                                  args.ray_address, warm)
            tp2 = run_distributed(engine_config(target, max_len, 2, spec, dtype=dtype), prompt, args.tokens,
                                  args.ray_address, warm)
            same = first_divergence(tp1["tokens"], tp2["tokens"])
            dump(f"equality-{dtype}", {
                "context": args.equality_context, "dtype": dtype, "tokens": args.tokens,
                "draft_gpu_fraction": spec.draft_gpu_fraction, "identical": tp1["tokens"] == tp2["tokens"],
                "tokens_equal_prefix": same, "tp1_ar": tp1, "tp2_separate_draft": tp2})
    if "latency" in args.sections:
        prompt = torch.randint(0, 128000, (args.latency_context,), generator=g).tolist()
        # tp2: symmetric memory, O/down partials pushed into every rank's memory and summed inside the next
        # RMSNorm kernel (the default); tp2_pull: the same sum after a flag barrier, reading the peers over NVLink;
        # tp2_prefetch: also 24 MB of the next weight read into L2 meanwhile; tp2_unfused: the one-shot
        # symmetric-memory all-reduce, then the norm; tp2_nccl: NCCL only
        variants = {"tp1": (1, {}), "tp2": (2, {}), "tp2_unfused": (2, {"fuse_allreduce_rmsnorm": False}),
                    "tp2_prefetch": (2, {"tp_weight_prefetch_mb": 24}), "tp2_pull": (2, {"tp_fused_sum": "pull"}),
                    "tp2_nccl": (2, {"disable_custom_all_reduce": True}),
                    # without async scheduling: the host reads each step's tokens before it launches the next
                    "tp1_sync": (1, {"async_scheduling": False}), "tp2_sync": (2, {"async_scheduling": False})}
        variants = {k: v for k, v in variants.items() if k in ("tp1", "tp2", *args.latency_variants)}
        runs: dict[str, list[dict]] = {k: [] for k in variants}
        for rnd in range(args.latency_rounds):  # fresh engines each round, the variants interleaved
            for name, (tp, kw) in variants.items():
                runs[name].append(run_distributed(engine_config(target, max_len, tp, **kw), prompt, args.tokens,
                                                  args.ray_address, warm,
                                                  profile_steps=args.profile_steps if rnd == 0 else 0))
        rows = {}
        for name, rs in runs.items():  # each variant: its median round by leader step time
            rows[name] = median_round(rs, "leader_ms_per_step")
            if rs[0].get("profile"):  # kernel tables of the profiled steps, one text file per variant
                (out / f"latency-profile-{name}.txt").write_text(rs[0]["profile"])
            rows[name].pop("profile", None)
        ratio = rows["tp2"]["leader_ms_per_step"] / rows["tp1"]["leader_ms_per_step"]
        dump("latency", {"context": args.latency_context, "batch": 1, "rounds": args.latency_rounds,
                         "tp2_over_tp1_step_latency": ratio,
                         "tp2_over_tp1_per_round": [a["leader_ms_per_step"] / b["leader_ms_per_step"]
                                                    for a, b in zip(runs["tp2"], runs["tp1"], strict=True)],
                         **{f"{k}_over_tp1_step_latency": v["leader_ms_per_step"] / rows["tp1"]["leader_ms_per_step"]
                            for k, v in rows.items() if k not in ("tp1", "tp2")},
                         **({"tp2_sync_over_tp1_sync_step_latency": rows["tp2_sync"]["leader_ms_per_step"]
                             / rows["tp1_sync"]["leader_ms_per_step"]}
                            if {"tp1_sync", "tp2_sync"} <= rows.keys() else {}),
                         "tp2_over_tp1_driver_ms_per_token":
                             rows["tp2"]["decode_ms_per_token"] / rows["tp1"]["decode_ms_per_token"],
                         **{k: {kk: vv for kk, vv in v.items() if kk != "tokens"} for k, v in rows.items()}})
    if "overhead" in args.sections:
        prompt = torch.randint(0, 128000, (args.equality_context,), generator=g).tolist()
        colocated = engine_config(target, max_len, 1, draft_spec(draft, "colocated"))
        separate = engine_config(target, max_len, 1, draft_spec(draft, "separate"))
        arms = {  # a fresh engine per arm and round; the rounds interleave and rotate the arms
            "inprocess_colocated": lambda: run_inprocess(colocated, prompt, args.tokens, warm),
            "inprocess_actor": lambda: run_inprocess_in_actor(colocated, prompt, args.tokens, warm, args.ray_address),
            # is it torch's CPU thread count? the driver with one thread, and a worker with as many as the driver
            "inprocess_1thread": lambda: run_inprocess(colocated, prompt, args.tokens, warm, torch_threads=1),
            "inprocess_actor_threads": lambda: run_inprocess_in_actor(colocated, prompt, args.tokens, warm,
                                                                      args.ray_address, torch.get_num_threads()),
            "distributed_colocated": lambda: run_distributed(colocated, prompt, args.tokens, args.ray_address, warm),
            "distributed_separate": lambda: run_distributed(separate, prompt, args.tokens, args.ray_address, warm),
            # the control plane's waits spin 50 ms (longer than any phase: neither side ever sleeps)
            "distributed_separate_long_spin": lambda: run_distributed(
                dataclasses.replace(separate, control_plane_spin_ms=50.0), prompt, args.tokens, args.ray_address,
                warm),
            # each engine process on a physical core of its own (EngineConfig.cpu_affinity "cores")
            "distributed_separate_pinned": lambda: run_distributed(
                dataclasses.replace(separate, cpu_affinity="cores"), prompt, args.tokens, args.ray_address, warm),
            # the draft exchange's waits busy-check 2 ms before sleeping (the GPU default before session 9)
            "distributed_separate_spin_2ms": lambda: run_distributed(
                dataclasses.replace(separate, control_plane_spin_ms=2.0), prompt, args.tokens, args.ray_address,
                warm),
        }
        arms = {k: v for k, v in arms.items() if k == "inprocess_colocated" or k in args.overhead_arms}
        runs: dict[str, list[dict]] = {k: [] for k in arms}
        order = list(arms)
        for rnd in range(args.overhead_rounds):
            # the arms' order rotates each round, so no arm always runs first (after the idle gap of a start)
            for name in order[rnd % len(order):] + order[:rnd % len(order)]:
                row = arms[name]()
                row["order_in_round"] = (order.index(name) - rnd) % len(order)
                if "draft_actor_busy_ms_per_step" in row:  # leader's wait for the draft = actor work + exchange
                    row["draft_exchange_ms_per_spec_step"] = (row["draft_wait_ms_per_spec_step"]
                                                              - row["draft_actor_busy_ms_per_step"])
                # end to end, driver's wall clock: decode time / speculative steps
                row["wall_ms_per_spec_step"] = (row["decode_ms_per_token"] * (len(row["tokens"]) - 1)
                                                / max(row.get("spec_steps", 0), 1))
                row["step_ms"] = row.get("leader_ms_per_step", row.get("inprocess_ms_per_step"))
                runs[name].append(row)
        # each arm: its median round (by step time), plus every round's times
        rows = {name: median_round(rs, "step_ms", "wall_ms_per_spec_step") for name, rs in runs.items()}
        base = rows["inprocess_colocated"]["step_ms"]
        wall = rows["inprocess_colocated"]["wall_ms_per_spec_step"]
        dump("overhead", {
            "context": args.equality_context, "rounds": args.overhead_rounds,
            **{f"control_plane_ms_per_spec_step_{k.removeprefix('distributed_')}": rows[k]["step_ms"] - base
               for k in rows if k != "inprocess_colocated"},
            # paired by round (same round, fresh engines minutes apart): arm - in-process, median over rounds
            **{f"paired_overhead_ms_per_spec_step_{k.removeprefix('distributed_')}": statistics.median(
                a["step_ms"] - b["step_ms"] for a, b in zip(runs[k], runs["inprocess_colocated"], strict=True))
               for k in rows if k != "inprocess_colocated"},
            **{f"wall_overhead_ms_per_spec_step_{k.removeprefix('distributed_')}":
                   rows[k]["wall_ms_per_spec_step"] - wall for k in rows if k != "inprocess_colocated"},
            # against the in-process engine in a worker process: what the control plane alone adds
            **{f"control_plane_vs_actor_ms_per_spec_step_{k.removeprefix('distributed_')}":
                   rows[k]["step_ms"] - rows["inprocess_actor"]["step_ms"]
               for k in rows if "inprocess_actor" in rows and k.startswith("distributed_")},
            **{k: {kk: vv for kk, vv in v.items() if kk != "tokens"} for k, v in rows.items()}})
    if "pair" in args.sections:
        if not (args.target and args.draft):
            raise SystemExit("the pair section needs --target and --draft")
        from specray.actors.engine import _load_tokenizer
        from specray.models.loader import load_checkpoint
        from specray.pipelines.datasets import code_completion_prompt

        tok = _load_tokenizer(args.tokenizer) if args.tokenizer else load_checkpoint(args.target).tokenizer
        prompt = code_completion_prompt(tok, args.pair_context, package=args.package, seed=args.pair_context)
        plen = args.pair_context + args.tokens + 512
        base = dict(tokenizer=args.tokenizer, skip_tokenizer_init=False)
        rows = {}
        for name, placement, overlap in (("separate", "separate", False), ("separate_overlap", "separate", True),
                                         ("colocated", "colocated", False)):
            spec = draft_spec(args.draft, placement, tp=2)
            cfg = engine_config(args.target, plen, 2, spec, overlap=overlap, **base)
            rows[name] = run_distributed(cfg, prompt.token_ids, args.tokens, args.ray_address, warm[:64])
        ref = rows["colocated"]["tokens"]
        dump("pair", {"context": args.pair_context, "tokens": args.tokens, "source": prompt.source,
                      "separate_draft_gpu_fraction": draft_spec(args.draft, "separate", tp=2).draft_gpu_fraction,
                      "tok_s": {k: v["decode_tok_s"] for k, v in rows.items()},
                      "identical_to_colocated": {k: v["tokens"] == ref for k, v in rows.items()},
                      **{k: {kk: vv for kk, vv in v.items() if kk != "tokens"} for k, v in rows.items()}})


if __name__ == "__main__":
    main()
