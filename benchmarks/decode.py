"""Batch-1 AR decode throughput of a random-weight Llama-3.1-8B-shaped model (bf16) on one GPU.

Measures, in one run and on the same weights:
  * specray: LLMEngine (Triton paged decode attention, CUDA graphs), decode tokens/s;
  * HF transformers `generate()` (greedy, its default SDPA attention and dynamic cache), decode tokens/s;
  * the memory floor: (weight bytes + KV bytes at that context) / measured device-to-device copy
    bandwidth (bytes read + bytes written), as tokens/s.
Decode rate excludes prefill: (time to N+1 tokens - time to the first token) / N.

    python benchmarks/decode.py --contexts 1024 8192 32768 --out results.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def copy_bandwidth(nbytes: int = 2 << 30, iters: int = 20) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus bytes written (median)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(iters + 3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    t = sorted(times[3:])[len(times[3:]) // 2]
    del src, dst
    return 2 * nbytes / t


def llama8b_config(max_len: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=max(max_len, 8192),
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
        rope_scaling={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )


def specray_decode(engine, prompt: list[int], n: int) -> tuple[float, list[int]]:
    from specray.engine.sampling_params import SamplingParams

    engine.add_request("bench", prompt, SamplingParams(temperature=0, max_tokens=n + 1, ignore_eos=True))
    t_first = None
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens = out.token_ids
            if t_first is None and out.new_token_ids:
                torch.cuda.synchronize()
                t_first = time.perf_counter()
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t_first), tokens


def replay_ms(engine, iters: int = 50) -> float:
    """GPU time of one batch-1 decode graph replay (inputs as left by the last step), median."""
    graph = engine.runner.graphs[1]
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[iters // 2]


def set_fused(engine, enabled: bool) -> None:
    engine.model.use_fused_ops(enabled)
    engine.runner.graphs.clear()
    engine.runner._capture_graphs()


def hf_decode(model, prompt: list[int], n: int) -> tuple[float, list[int]]:
    ids = torch.tensor([prompt], device="cuda")
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=n + 1, min_new_tokens=n + 1, **kw)
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return n / ((t2 - t1) - (t1 - t0)), out[0, len(prompt):].tolist()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768])
    ap.add_argument("--tokens", type=int, default=128, help="decode tokens timed for specray")
    ap.add_argument("--hf-tokens", type=int, default=32, help="decode tokens timed for transformers")
    ap.add_argument("--out", default="decode.json")
    args = ap.parse_args()

    import transformers
    import triton
    from transformers import LlamaForCausalLM

    from specray.config import CacheConfig, EngineConfig, SchedulerConfig
    from specray.engine.llm_engine import LLMEngine
    from specray.models.checkpoint import Checkpoint, DictWeightSource, GenerationDefaults

    bw = copy_bandwidth()
    max_ctx = max(args.contexts)
    max_len = max_ctx + args.tokens + 64
    cfg = llama8b_config(max_len)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        hf = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    hf_cfg = {**cfg.to_dict(), "architectures": ["LlamaForCausalLM"]}
    ckpt = Checkpoint(path="memory", hf_config=hf_cfg, weights=DictWeightSource(dict(hf.state_dict())),
                      tokenizer=None, generation=GenerationDefaults(), format="memory")
    page = 16
    engine = LLMEngine(
        EngineConfig(model="memory", dtype="bfloat16", device="cuda", skip_tokenizer_init=True,
                     cuda_graph_batch_sizes=(1, 2, 4, 8),
                     cache=CacheConfig(page_size=page, num_pages=max_len // page + 8),
                     scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4096, max_model_len=max_len)),
        checkpoint=ckpt,
    )
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * 128 * 2
    g = torch.Generator().manual_seed(1)
    rows = []
    specray_decode(engine, torch.randint(0, cfg.vocab_size, (512,), generator=g).tolist(), 16)  # warm-up
    for ctx in args.contexts:
        prompt = torch.randint(0, cfg.vocab_size, (ctx,), generator=g).tolist()
        set_fused(engine, False)
        unfused, _ = specray_decode(engine, prompt, args.tokens)
        unfused_replay = replay_ms(engine)
        set_fused(engine, True)
        ours, our_tokens = specray_decode(engine, prompt, args.tokens)
        graph_ms = replay_ms(engine)
        theirs, hf_tokens = hf_decode(hf, prompt, args.hf_tokens)
        same = next((i for i, (a, b) in enumerate(zip(our_tokens, hf_tokens, strict=False)) if a != b), len(hf_tokens))
        floor = bw / (weight_bytes + kv_per_token * (ctx + args.tokens // 2))
        rows.append({
            "context": ctx, "specray_tok_s": ours, "hf_tok_s": theirs, "floor_tok_s": floor,
            "specray_unfused_tok_s": unfused, "graph_replay_ms": graph_ms, "unfused_graph_replay_ms": unfused_replay,
            "step_ms": 1000 / ours, "host_overhead_ms": 1000 / ours - graph_ms,
            "specray_vs_floor": ours / floor, "specray_vs_hf": ours / theirs,
            "greedy_tokens_equal_to_hf": same,
        })
        torch.cuda.empty_cache()
    result = {
        "device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "copy_bandwidth_GBps": bw / 1e9, "weight_bytes": weight_bytes,
        "kv_bytes_per_token": kv_per_token, "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"device {result['device']}; copy bandwidth {bw / 1e9:.0f} GB/s; weights {weight_bytes / 1e9:.2f} GB")
    print(f"{'context':>8} {'specray tok/s':>14} {'unfused':>8} {'HF tok/s':>9} {'floor tok/s':>12} {'of floor':>9} "
          f"{'vs HF':>7} {'graph ms':>9} {'host ms':>8} {'=HF toks':>8}")
    for r in rows:
        print(f"{r['context']:>8} {r['specray_tok_s']:>14.1f} {r['specray_unfused_tok_s']:>8.1f} {r['hf_tok_s']:>9.1f} "
              f"{r['floor_tok_s']:>12.1f} {100 * r['specray_vs_floor']:>8.1f}% {r['specray_vs_hf']:>6.1f}x "
              f"{r['graph_replay_ms']:>9.2f} {r['host_overhead_ms']:>8.2f} {r['greedy_tokens_equal_to_hf']:>8}")


if __name__ == "__main__":
    main()
