"""Profile speculative steps (torch.profiler): where a verify / draft step spends CPU and GPU time.

    python benchmarks/profile_step.py --target T.gguf --tokenizer DIR --context 8192 --method ngram
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from specray.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig, TreeConfig
from specray.engine.llm_engine import LLMEngine
from specray.engine.sampling_params import SamplingParams
from specray.pipelines.datasets import code_completion_prompt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default=None, help="a model; default: random Qwen2.5-1.5B-shaped weights")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--method", default="ngram")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    max_len = args.context + 1024
    ckpt = None
    if args.target is None:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        from specray.models.checkpoint import Checkpoint, DictWeightSource, GenerationDefaults

        cfg = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                          num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                          tie_word_embeddings=True)
        torch.set_default_dtype(torch.bfloat16)
        with torch.device("cuda"):
            hf = Qwen2ForCausalLM(cfg)
        torch.set_default_dtype(torch.float32)
        ckpt = Checkpoint("memory", {**cfg.to_dict(), "architectures": ["Qwen2ForCausalLM"]},
                          DictWeightSource(dict(hf.state_dict())), None, GenerationDefaults())
    engine = LLMEngine(EngineConfig(
        model=args.target or "memory", tokenizer=args.tokenizer, skip_tokenizer_init=args.target is None,
        dtype="bfloat16", device="cuda", cuda_graph_batch_sizes=(1,),
        cache=CacheConfig(page_size=16, num_pages=max_len // 16 + 64),
        scheduler=SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=4096, max_model_len=max_len),
        speculative_config=SpeculativeConfig(method=args.method, tree=TreeConfig(kind="chain", length=4)),
    ), checkpoint=ckpt)
    if engine.tokenizer is not None:
        ids = code_completion_prompt(engine.tokenizer, args.context, seed=args.context).token_ids
    else:  # a repeated random block, so that prompt lookup finds matches
        block = torch.randint(0, 151936, (256,)).tolist()
        ids = (block * (args.context // 256 + 1))[: args.context]
    engine.add_request("p", ids, SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
    for _ in range(4):  # prefill + warm-up spec steps
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
    engine.abort("p")
    spec = engine.config.speculative_config
    for name, cfg in (("AR", None), (args.method, spec)):  # decode tok/s side by side, same prompt
        engine.set_speculative_config(cfg)
        engine.add_request("t", ids, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        t0 = n0 = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                last = out
                if t0 is None and len(out.token_ids) > 1:
                    torch.cuda.synchronize()
                    t0, n0 = time.perf_counter(), len(out.token_ids)
        torch.cuda.synchronize()
        rate = (len(last.token_ids) - n0) / (time.perf_counter() - t0)
        extra = (engine.spec.stats.as_dict(), engine.spec.timings) if engine.spec else ""
        print(f"{name}: {rate:.1f} tok/s {extra}")


if __name__ == "__main__":
    main()
