# ruff: noqa: B023  (timed closures run before their loop variables change)
"""Sparse-page and chunk-score parts of ``benchmarks/attention.py`` (see its docstring for the method).

sparse: UNIQUE sparse page attention (512-token budget; scoring, top-k selection and attention all inside
        the timed region; page statistics precomputed, as the engine updates them only when a page fills)
        vs our dense split-KV decode kernel over the same paged cache, one query token per sequence.
chunk:  Cross-model Retrieval chunk scores (one query per sequence over one layer's keys) vs one
        single-query dense decode pass over the same cache.
"""

from __future__ import annotations

import math

import torch

from benchmarks.attention import DT, PS, SHAPES, PagedInputs, bench_graph, kv_bytes, layers_for
from specray.kernels.chunk_scores import ChunkScores
from specray.kernels.paged_decode import PagedDecodeAttention, choose_num_splits
from specray.kernels.sparse_pages import PageStats, SparsePageAttention


def _inputs(b, ctx, hq, hkv, d, min_stats_layers=True):
    per_layer = kv_bytes(b, ctx, hkv, d)
    nl = layers_for(per_layer)
    stats_bytes = b * (ctx // PS) * hkv * d * 2
    if min_stats_layers:  # enough layers that the page statistics do not sit in L2 either
        nl = max(nl, min(8, math.ceil((200 << 20) / stats_bytes), max(1, (24 << 30) // per_layer)))
    return PagedInputs(b, ctx, hq, hkv, d, nl, extra=0), nl, per_layer


def part_sparse(args, rows, budget=512):
    for name, (hq, hkv, d) in SHAPES.items():
        for b in (1, 8):
            for ctx in args.sparse_contexts:
                inp, nl, per_layer = _inputs(b, ctx, hq, hkv, d)
                scale = d**-0.5
                q = torch.randn(b, hq, d, dtype=DT, device="cuda")
                lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
                dec = PagedDecodeAttention(b, hq, hkv, d, choose_num_splits(b, hkv, ctx), "cuda")
                t_dense = bench_graph(lambda i: dec.run(q, inp.k[i], inp.v[i], inp.tables, lens, scale), nl)
                stats = PageStats(inp.k, mean_dtype=DT)
                stats.update_all(inp.tables.reshape(-1).contiguous())
                sp = SparsePageAttention(b, hq, hkv, d, PS, inp.tables.shape[1], "cuda", budget_tokens=budget)
                sp.plan(inp.tables, lens)
                t_sparse = bench_graph(lambda i: sp.run(q, inp.k[i], inp.v[i], stats.layer(i), scale), nl)
                sparse_bytes = b * hkv * (budget * d * 2 * 2 + (ctx // PS) * (d * 2 + 4))  # K/V kept + stats
                row = dict(part="sparse", shape=name, batch=b, ctx=ctx, budget=budget, dense_us=t_dense * 1e6,
                           sparse_us=t_sparse * 1e6, speedup=t_dense / t_sparse, dense_bw_frac=per_layer /
                           args.copy_bw / t_dense, sparse_bytes=sparse_bytes,
                           sparse_bw_frac=sparse_bytes / args.copy_bw / t_sparse, layers=nl)
                rows.append(row)
                print(f"sparse {name} B={b} ctx={ctx}: dense {t_dense * 1e6:.1f} us, sparse {t_sparse * 1e6:.1f} us"
                      f" ({row['speedup']:.1f}x), sparse at {row['sparse_bw_frac']:.1%} of copy bw")
                inp = stats = sp = None
                torch.cuda.empty_cache()


def part_chunk(args, rows):
    for name, (hq, hkv, d) in SHAPES.items():
        for b in (1, 8):
            for ctx in args.contexts:
                inp, nl, per_layer = _inputs(b, ctx, hq, hkv, d, min_stats_layers=False)
                scale = d**-0.5
                q = torch.randn(b, hq, d, dtype=DT, device="cuda")
                lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
                dec = PagedDecodeAttention(b, hq, hkv, d, choose_num_splits(b, hkv, ctx), "cuda")
                t_dec = bench_graph(lambda i: dec.run(q, inp.k[i], inp.v[i], inp.tables, lens, scale), nl)
                cs = ChunkScores(b, hq, hkv, d, PS, inp.tables.shape[1], "cuda")
                cs.plan(inp.tables, lens)
                t_cs = bench_graph(lambda i: cs.run(q, inp.k[i], scale), nl)
                key_bytes = per_layer // 2
                row = dict(part="chunk", shape=name, batch=b, ctx=ctx, decode_us=t_dec * 1e6, chunk_us=t_cs * 1e6,
                           ratio=t_cs / t_dec, chunk_bw_frac=key_bytes / args.copy_bw / t_cs)
                rows.append(row)
                print(f"chunk {name} B={b} ctx={ctx}: decode {t_dec * 1e6:.1f} us, chunk scores {t_cs * 1e6:.1f} us"
                      f" ({row['ratio']:.2f}x), keys at {row['chunk_bw_frac']:.1%} of copy bw")
                inp = cs = None
                torch.cuda.empty_cache()
