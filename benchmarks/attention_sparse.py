# ruff: noqa: B023  (timed closures run before their loop variables change)
"""UNIQUE sparse page attention and Cross-model Retrieval chunk scores on one GPU, side by side in one run.

sparse: UNIQUE sparse page attention (512-token budget; scoring, top-k selection and attention all inside
        the timed region; page statistics precomputed, as the engine updates them only when a page fills)
        through every pipeline of ``SparsePageAttention`` -- "legacy" (score, select, merge-selection, attend,
        split-merge launches), "fused2" (score+select, attend+merge) and "fused1" (one launch) -- vs our dense
        split-KV decode kernel over the same paged cache, one query token per sequence. Llama-3.1-8B (32 q / 8
        kv heads) and Qwen2.5-1.5B (12 / 2) shapes, d 128, bf16, page 16, batch 1 and 8, 32K and 128K.
        Each fused output is compared with the legacy output on the same inputs (max relative error per row
        and head, printed and stored), so a GPU-only fault shows up here too. A short sweep of the fused score
        chunk follows (``--no-tune`` skips it).
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
from benchmarks.attention import DT, PS, SHAPES, PagedInputs, bench_graph, kv_bytes, layers_for  # noqa: E402
from specray.kernels.chunk_scores import ChunkScores  # noqa: E402
from specray.kernels.paged_decode import PagedDecodeAttention, choose_num_splits  # noqa: E402
from specray.kernels.sparse_pages import PageStats, SparsePageAttention  # noqa: E402

PIPELINES = ("legacy", "fused2", "fused1")
# (shape, batch, context, score chunks to try besides the heuristic's) for the fused chunk sweep
TUNE = (("llama8b", 1, 32768, (128,)), ("llama8b", 1, 131072, (128,)), ("llama8b", 8, 131072, (128,)))


def _inputs(b, ctx, hq, hkv, d, min_stats_layers=True):
    per_layer = kv_bytes(b, ctx, hkv, d)
    nl = layers_for(per_layer)
    stats_bytes = b * (ctx // PS) * hkv * d * 2
    if min_stats_layers:  # enough layers that the page statistics do not sit in L2 either
        nl = max(nl, min(8, math.ceil((200 << 20) / stats_bytes), max(1, (24 << 30) // per_layer)))
    return PagedInputs(b, ctx, hq, hkv, d, nl, extra=0), nl, per_layer


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest relative L2 error over (row, head) of out against ref ([B, Hq, D])."""
    o, r = out.float(), ref.float()
    return ((o - r).norm(dim=-1) / r.norm(dim=-1).clamp_min(1e-6)).max().item()


def _time_sparse(sp, q, inp, stats, scale, nl, ref=None):
    """(seconds per layer, relative error of layer 0's output against ``ref`` or None, lse of layer 0)."""
    out, lse = sp.run(q, inp.k[0], inp.v[0], stats.layer(0), scale)
    err = None if ref is None else _rel_err(out, ref)
    out = out.clone()
    t = bench_graph(lambda i: sp.run(q, inp.k[i], inp.v[i], stats.layer(i), scale), nl)
    return t, err, out


def _plan_info(sp) -> dict:
    p = sp._plan
    info = dict(splits=p["num_splits"], blocks_per_split=p["blocks_per_split"])
    if "num_chunks" in p:
        info |= dict(chunk=p["score_chunk"], chunks=p["num_chunks"], score_warps=p["score_warps"])
    return info


def part_sparse(args, rows, budget=512):
    if getattr(attention_bench, "DRY", False):
        print("sparse: skipped in a dry run")
        return
    pipelines = getattr(args, "pipelines", PIPELINES)
    batches = getattr(args, "batches", (1, 8))
    shapes = getattr(args, "shapes", tuple(SHAPES))
    table = []
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
                sparse_bytes = b * hkv * (budget * d * 2 * 2 + (ctx // PS) * (d * 2 + 4))  # K/V kept + stats
                row = dict(part="sparse", shape=name, batch=b, ctx=ctx, budget=budget, layers=nl,
                           dense_us=t_dense * 1e6, sparse_bytes=sparse_bytes,
                           dense_bw_frac=per_layer / args.copy_bw / t_dense)  # fmt: skip
                ref = None
                for pipe in pipelines:
                    sp = SparsePageAttention(b, hq, hkv, d, PS, inp.tables.shape[1], "cuda", budget_tokens=budget,
                                             pipeline=pipe)  # fmt: skip
                    sp.plan(inp.tables, lens)
                    try:
                        t, err, out = _time_sparse(sp, q, inp, stats, scale, nl, ref)
                    except Exception as e:  # noqa: BLE001 -- report, keep the other pipelines
                        row[f"{pipe}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                        print(f"  {name} B={b} ctx={ctx} {pipe}: failed {row[f'{pipe}_error']}")
                        continue
                    if ref is None:
                        ref = out
                    else:
                        row[f"{pipe}_rel_err_vs_{pipelines[0]}"] = err
                    row[f"{pipe}_us"] = t * 1e6
                    row[f"{pipe}_speedup"] = t_dense / t
                    row[f"{pipe}_bw_frac"] = sparse_bytes / args.copy_bw / t
                    row[f"{pipe}_plan"] = _plan_info(sp)
                    sp = None
                fused = [p for p in pipelines if p != "legacy" and f"{p}_us" in row]
                if fused:
                    best = min(fused, key=lambda p: row[f"{p}_us"])
                    row |= dict(best=best, sparse_us=row[f"{best}_us"], speedup=row[f"{best}_speedup"],
                                sparse_bw_frac=row[f"{best}_bw_frac"])  # fmt: skip
                row["seconds"] = time.time() - t_cfg
                rows.append(row)
                table.append(row)
                us = "  ".join(f"{p} {row.get(f'{p}_us', float('nan')):.1f}" for p in pipelines)
                errs = " ".join(f"{k.split('_')[0]}={v:.1e}" for k, v in row.items() if "_rel_err_" in k)
                print(f"sparse {name} B={b} ctx={ctx}: dense {t_dense * 1e6:.1f} us | {us} us | "
                      f"best {row.get('best')} {row.get('speedup', float('nan')):.1f}x | err {errs} | "
                      f"{row['seconds']:.0f} s", flush=True)  # fmt: skip
                _checkpoint(args, rows)
                inp = stats = ref = None
                torch.cuda.empty_cache()
    _print_sparse_table(table, pipelines)
    if getattr(args, "tune", True):
        _tune_chunks(args, rows)


def _tune_chunks(args, rows, budget=512):
    """Fused pipelines with score chunks other than the heuristic's, on a few configurations."""
    lines = []
    for name, b, ctx, chunks in TUNE:
        if name not in SHAPES or ctx not in args.sparse_contexts:
            continue
        hq, hkv, d = SHAPES[name]
        inp, nl, _ = _inputs(b, ctx, hq, hkv, d)
        scale = d**-0.5
        q = torch.randn(b, hq, d, dtype=DT, device="cuda")
        lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
        stats = PageStats(inp.k, mean_dtype=DT)
        stats.update_all(inp.tables.reshape(-1).contiguous())
        for pipe in ("fused2", "fused1"):
            for chunk in chunks:
                sp = SparsePageAttention(b, hq, hkv, d, PS, inp.tables.shape[1], "cuda", budget_tokens=budget,
                                         pipeline=pipe, max_candidates=4096)  # fmt: skip
                try:
                    sp.plan(inp.tables, lens, score_chunk=chunk)
                    t, _, _ = _time_sparse(sp, q, inp, stats, scale, nl)
                except Exception as e:  # noqa: BLE001
                    print(f"  tune {name} B={b} ctx={ctx} {pipe} chunk {chunk}: failed {type(e).__name__}: {e!s:.120}")
                    continue
                r = dict(part="sparse_tune", shape=name, batch=b, ctx=ctx, pipeline=pipe, us=t * 1e6,
                         **_plan_info(sp))  # fmt: skip
                rows.append(r)
                lines.append([name, b, ctx // 1024, pipe, r["chunk"], r["chunks"], r["splits"], r["us"]])
                _checkpoint(args, rows)
        inp = stats = None
        torch.cuda.empty_cache()
    if lines:
        _table("sparse score-chunk sweep (heuristic's chunk in the main table)",
               ["shape", "B", "ctx K", "pipeline", "chunk", "chunks", "splits", "us"], lines)  # fmt: skip


def _print_sparse_table(table, pipelines):
    header = ["shape", "B", "ctx K", "dense us", *(f"{p} us" for p in pipelines), *(f"{p} x" for p in pipelines)]
    header += ["fused chunk/chunks/splits"]
    lines = []
    for r in table:
        plan = r.get("fused2_plan") or r.get("fused1_plan") or {}
        lines.append(
            [r["shape"], r["batch"], r["ctx"] // 1024, r["dense_us"]]
            + [r.get(f"{p}_us", float("nan")) for p in pipelines]
            + [r.get(f"{p}_speedup", float("nan")) for p in pipelines]
            + [f"{plan.get('chunk')}/{plan.get('chunks')}/{plan.get('splits')}"]
        )
    _table("UNIQUE sparse page attention, 512-token budget (us per layer; x = dense / sparse)", header, lines)


def _table(title, header, lines):
    print(f"\n### {title}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for line in lines:
        print("| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in line) + " |")
    sys.stdout.flush()


def _checkpoint(args, rows):
    """Rewrite the standalone run's JSON (no-op inside benchmarks/attention.py, which writes its own)."""
    if getattr(args, "standalone_out", None):
        meta = dict(getattr(args, "meta", {}), seconds=time.time() - args.t0)
        Path(args.standalone_out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


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
    ap.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=list(PIPELINES),
                    help="the first one is the reference of the rel_err columns")  # fmt: skip
    ap.add_argument("--no-tune", dest="tune", action="store_false", help="skip the fused score-chunk sweep")
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
