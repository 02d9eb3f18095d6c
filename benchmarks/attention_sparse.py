# ruff: noqa: B023  (timed closures run before their loop variables change)
"""UNIQUE sparse page attention and Cross-model Retrieval chunk scores on one GPU, side by side in one run.

sparse: UNIQUE sparse page attention (512-token budget; scoring, top-k selection and attention all inside
        the timed region; page statistics precomputed, as the engine updates them only when a page fills)
        (``SparsePageAttention``: score, select, merge-selection, attend, split-merge launches) vs our dense
        split-KV decode kernel over the same paged cache, one query token per sequence. Llama-3.1-8B (32 q / 8
        kv heads) and Qwen2.5-1.5B (12 / 2) shapes, d 128, bf16, page 16, batch 1 and 8, 32K and 128K.
chunk:  Cross-model Retrieval chunk scores (one query per sequence over one layer's keys) vs one
        single-query dense decode pass over the same cache.

Timing and inputs come from ``benchmarks/attention.py`` (each contender runs over several distinct layers,
captured in one CUDA graph; median replay time per layer). Sparse bytes = the kept K/V plus the page
statistics (means in bf16, std in fp32) of every page; bandwidth fraction = bytes / time / copy bandwidth.

Standalone (sparse only, about 2 minutes on an H100, mostly Triton compilation)::

    PYTHONPATH=$PWD python3 benchmarks/attention_sparse.py --out $OUT/attention_sparse.json

or as parts of ``benchmarks/attention.py --parts sparse chunk``. The JSON is rewritten after every
configuration, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmarks.attention as attention_bench  # noqa: E402
from benchmarks.attention import (  # noqa: E402
    DT,
    PS,
    SHAPES,
    PagedInputs,
    bench_graph,
    kv_bytes,
    layers_for,
    print_table,
)
from specray.kernels.chunk_scores import ChunkScores  # noqa: E402
from specray.kernels.paged_decode import PagedDecodeAttention, choose_num_splits  # noqa: E402
from specray.kernels.sparse_pages import PageStats, SparsePageAttention  # noqa: E402


def _inputs(b, ctx, hq, hkv, d, min_stats_layers=True):
    per_layer = kv_bytes(b, ctx, hkv, d)
    nl = layers_for(per_layer)
    stats_bytes = b * (ctx // PS) * hkv * d * 2
    if min_stats_layers:  # enough layers that the page statistics do not sit in L2 either
        nl = max(nl, min(8, math.ceil((200 << 20) / stats_bytes), max(1, (24 << 30) // per_layer)))
    return PagedInputs(b, ctx, hq, hkv, d, nl, extra=0), nl, per_layer


def _plan_info(sp) -> dict:
    p = sp._plan
    return dict(splits=p["num_splits"], blocks_per_split=p["blocks_per_split"])


def part_sparse(args, rows, budget=512):
    if getattr(args, "dry_run", False) or getattr(attention_bench, "DRY", False):  # run as a script: DRY is __main__'s
        print("sparse: skipped in a dry run")
        return
    batches = getattr(args, "batches", (1, 8))
    shapes = getattr(args, "shapes", tuple(SHAPES))
    lines = []
    # latency floor: one tiny kernel per layer in the same graph-replay timing (what each extra launch costs)
    x = torch.zeros(1, device="cuda")
    t_floor = bench_graph(lambda i: x.add_(1), 8)
    rows.append(dict(part="sparse_floor", one_kernel_us=t_floor * 1e6))
    print(f"sparse: one tiny kernel per layer (graph replay) {t_floor * 1e6:.2f} us", flush=True)
    for name in shapes:
        hq, hkv, d = SHAPES[name]
        for b in batches:
            for ctx in args.sparse_contexts:
                t_cfg = time.time()
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
                row = dict(part="sparse", shape=name, batch=b, ctx=ctx, budget=budget, layers=nl,
                           dense_us=t_dense * 1e6, sparse_us=t_sparse * 1e6, speedup=t_dense / t_sparse,
                           dense_bw_frac=per_layer / args.copy_bw / t_dense, sparse_bytes=sparse_bytes,
                           sparse_bw_frac=sparse_bytes / args.copy_bw / t_sparse, plan=_plan_info(sp),
                           seconds=time.time() - t_cfg)  # fmt: skip
                rows.append(row)
                lines.append([name, b, ctx // 1024, row["dense_us"], row["sparse_us"], row["speedup"],
                              f"{row['sparse_bw_frac']:.1%}", row["plan"]["splits"]])  # fmt: skip
                print(f"sparse {name} B={b} ctx={ctx}: dense {t_dense * 1e6:.1f} us, sparse {t_sparse * 1e6:.1f} us"
                      f" ({row['speedup']:.1f}x), sparse at {row['sparse_bw_frac']:.1%} of copy bw | "
                      f"{row['seconds']:.0f} s", flush=True)  # fmt: skip
                _checkpoint(args, rows)
                inp = stats = sp = None
                torch.cuda.empty_cache()
    print_table(
        "UNIQUE sparse page attention, 512-token budget (us per layer; x = dense / sparse)",
        ["shape", "B", "ctx K", "dense us", "sparse us", "x", "sparse bw", "splits"],
        lines,
    )


def _checkpoint(args, rows):
    """Rewrite the standalone run's JSON (no-op inside benchmarks/attention.py, which writes its own)."""
    if getattr(args, "standalone_out", None):
        meta = dict(getattr(args, "meta", {}), seconds=time.time() - args.t0)
        Path(args.standalone_out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


def part_chunk(args, rows):
    if getattr(args, "dry_run", False) or getattr(attention_bench, "DRY", False):
        print("chunk: skipped in a dry run")
        return
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
                row = dict(
                    part="chunk",
                    shape=name,
                    batch=b,
                    ctx=ctx,
                    decode_us=t_dec * 1e6,
                    chunk_us=t_cs * 1e6,
                    ratio=t_cs / t_dec,
                    chunk_bw_frac=key_bytes / args.copy_bw / t_cs,
                )
                rows.append(row)
                print(
                    f"chunk {name} B={b} ctx={ctx}: decode {t_dec * 1e6:.1f} us, chunk scores {t_cs * 1e6:.1f} us"
                    f" ({row['ratio']:.2f}x), keys at {row['chunk_bw_frac']:.1%} of copy bw"
                )
                inp = cs = None
                torch.cuda.empty_cache()


def main() -> None:
    from benchmarks.decode import copy_bandwidth

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["sparse"], choices=["sparse", "chunk"])
    ap.add_argument("--sparse-contexts", nargs="+", type=int, default=[32768, 131072])
    ap.add_argument("--contexts", nargs="+", type=int, default=[4096, 16384, 32768, 65536, 131072],
                    help="chunk part contexts")  # fmt: skip
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--out", default="attention_sparse.json")
    args = ap.parse_args()
    args.t0 = time.time()
    args.standalone_out = args.out
    args.copy_bw = copy_bandwidth()
    import triton

    args.meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                     python=platform.python_version(), copy_bw_gbs=args.copy_bw / 1e9, date=time.strftime("%Y-%m-%d"),
                     command=" ".join(sys.argv))  # fmt: skip
    print(f"copy bandwidth {args.copy_bw / 1e9:.0f} GB/s", flush=True)
    rows: list[dict] = []
    for part in args.parts:
        {"sparse": part_sparse, "chunk": part_chunk}[part](args, rows)
    _checkpoint(args, rows)
    print(json.dumps(dict(args.meta, seconds=time.time() - args.t0)))


if __name__ == "__main__":
    main()
