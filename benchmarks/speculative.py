"""Speculative decoding on real weights: Qwen2.5-Coder-1.5B (target) and 0.5B (draft), long code-completion
prompts built from the Python sources of an installed package, batch 1, greedy.

For each context length and method (`none` = AR, `ngram`, `draft_model` with Cross-model Retrieval,
`sparse_self`), in one run on one engine (methods are swapped with `set_speculative_config`):
mean acceptance length (1 + accepted / drafts), decode tokens/s and speedup over AR. Decode time
starts after the first speculative step (which also runs the draft's prefill) and excludes the
target's prefill.

    python benchmarks/speculative.py --target ~/models/qwen2.5-coder-1.5b.gguf \
        --draft ~/models/qwen2.5-coder-0.5b.gguf --tokenizer .stage/tok-qwen --contexts 8192 16384 28672
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from specray.config import (
    CacheConfig,
    EngineConfig,
    RetrievalConfig,
    SchedulerConfig,
    SparseConfig,
    SpeculativeConfig,
    TreeConfig,
)
from specray.engine.llm_engine import LLMEngine
from specray.engine.sampling_params import SamplingParams
from specray.pipelines.datasets import code_completion_prompt


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def methods(draft: str) -> dict[str, SpeculativeConfig | None]:
    retrieval = RetrievalConfig(chunk_size=32, top_k_chunks=32, refresh_every=4)
    return {
        "none": None,
        "ngram": SpeculativeConfig(method="ngram", tree=TreeConfig(kind="chain", length=4)),
        "draft_model+retrieval chain4": SpeculativeConfig(
            method="draft_model", model=draft, retrieval=retrieval, tree=TreeConfig(kind="chain", length=4)),
        "draft_model+retrieval beam69": SpeculativeConfig(
            method="draft_model", model=draft, retrieval=retrieval, tree=TreeConfig(kind="beam")),
        "sparse_self chain4": SpeculativeConfig(
            method="sparse_self", sparse=SparseConfig(page_size=16, budget_tokens=512),
            tree=TreeConfig(kind="chain", length=4)),
    }


def run_one(engine: LLMEngine, prompt: list[int], n: int) -> dict:
    engine.add_request("bench", prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    spec = engine.spec
    t_start, tokens_at_start, stats0 = None, 0, None
    tokens: list[int] = []
    steps = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        for out in outs:
            tokens = out.token_ids
        if tokens and t_start is None:
            steps += 1
            # skip the prefill step (first token) and, with speculation, the first spec step
            if steps == (2 if spec is not None else 1):
                _sync()
                t_start, tokens_at_start = time.perf_counter(), len(tokens)
                stats0 = (spec.stats.num_drafts, spec.stats.num_accepted_tokens) if spec else None
    _sync()
    elapsed = time.perf_counter() - t_start
    row = {"tokens": tokens, "decode_tok_s": (len(tokens) - tokens_at_start) / elapsed}
    if spec is not None:
        drafts = spec.stats.num_drafts - stats0[0]
        accepted = spec.stats.num_accepted_tokens - stats0[1]
        row["mean_acceptance_length"] = 1 + accepted / max(drafts, 1)
        row["timings"] = dict(spec.timings)
        if hasattr(spec.proposer, "peak_kv_bytes"):
            row["draft_peak_kv_bytes"] = spec.proposer.peak_kv_bytes
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft", required=True)
    ap.add_argument("--tokenizer", default=None, help="HF tokenizer dir (skips the slow GGUF conversion)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 16384, 28672])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--package", default="transformers")
    ap.add_argument("--out", default="speculative.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()

    max_len = max(args.contexts) + args.tokens + 512
    t0 = time.perf_counter()
    engine = LLMEngine(EngineConfig(
        model=args.target, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device, cuda_graph_batch_sizes=(1,),
        cache=CacheConfig(page_size=16, num_pages=max_len // 16 + 64),
        scheduler=SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=4096, max_model_len=max_len),
    ))
    print(f"target loaded in {time.perf_counter() - t0:.0f}s", flush=True)
    table = methods(args.draft)
    if args.methods:
        table = {k: v for k, v in table.items() if k in args.methods}
    prompts = {ctx: code_completion_prompt(engine.tokenizer, ctx, package=args.package, seed=ctx)
               for ctx in args.contexts}
    rows, base = [], {}
    for name, cfg in table.items():  # methods outer: each draft loads once
        t1 = time.perf_counter()
        engine.set_speculative_config(cfg)
        print(f"{name}: ready in {time.perf_counter() - t1:.0f}s", flush=True)
        for ctx, prompt in prompts.items():
            r = run_one(engine, prompt.token_ids, args.tokens)
            if name == "none":
                base[ctx] = r
            b = base.get(ctx)
            r.update(context=ctx, method=name, speedup=r["decode_tok_s"] / b["decode_tok_s"] if b else None,
                     identical_to_ar=r["tokens"] == b["tokens"] if b else None, source=prompt.source)
            rows.append(r)
            print(json.dumps({k: v for k, v in r.items() if k not in ("timings", "tokens")}), flush=True)
    engine.set_speculative_config(None)
    for r in rows:
        r.pop("tokens")
    with open(args.out, "w") as f:
        device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        json.dump({"device": device, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "rows": rows},
                  f, indent=2)
    print(f"{'context':>8} {'method':<30} {'accept len':>10} {'tok/s':>8} {'speedup':>8} {'=AR':>4}")
    for r in sorted(rows, key=lambda r: r["context"]):
        acc = r.get("mean_acceptance_length")
        print(f"{r['context']:>8} {r['method']:<30} {acc if acc is None else round(acc, 2)!s:>10} "
              f"{r['decode_tok_s']:>8.1f} {r['speedup'] or 0:>7.2f}x {str(r['identical_to_ar'])[0]:>4}")


if __name__ == "__main__":
    main()
