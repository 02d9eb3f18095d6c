"""Attention kernels on one GPU, side by side in one run, against baselines and the bandwidth floor.

Parts (``--parts``):
  copy    device-to-device copy bandwidth (bytes read + written): the floor's denominator.
  tune    Hybrid Tree Attention variants (block_m, block_n, warps, stages) at 16K, batch 1.
  verify  69-node tree verification: ours vs torch SDPA with an explicit boolean mask (K/V given
          contiguous and pre-expanded to the query heads, so SDPA moves no page-gather bytes) vs
          FlexAttention with a block mask (compiled), on the same inputs.
  decode  N = 1: our paged split-KV decode kernel vs SDPA (contiguous K/V, enable_gqa).
  sparse  UNIQUE sparse page attention, 512-token budget, scoring and selection included, vs our dense
          decode kernel on the same cache.
  chunk   Cross-model Retrieval chunk scores vs one single-query decode pass over the same keys.

Shapes: Llama-3.1-8B attention (32 q / 8 kv heads, d 128) and Qwen2.5-1.5B (12 / 2, d 128), bf16, page
size 16, batch 1 and 8, contexts 4K..128K. Bytes moved = the prefix K/V that must be read (each key and
value once); bandwidth fraction = bytes / time / copy bandwidth.

Timing: each contender runs over several distinct "layers" (separate caches, so repeated runs do not
measure L2), captured in one CUDA graph; the median replay time is divided by the layer count.

    python benchmarks/attention.py --out $OUT/attention.json
"""

# ruff: noqa: B023  (timed closures run before their loop variables change)
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

from benchmarks.decode import copy_bandwidth  # noqa: E402
from specray.kernels.paged_decode import PagedDecodeAttention, choose_num_splits  # noqa: E402
from specray.kernels.tree_attention import HybridTreeAttention  # noqa: E402

SHAPES = {"llama8b": (32, 8, 128), "qwen1.5b": (12, 2, 128)}
PS = 16
DT = torch.bfloat16


def matmul_rate(n: int = 8192) -> float:
    """FLOP/s of a bf16 n x n x n matrix product (cuBLAS, random data): the arithmetic ceiling."""
    a = torch.randn(n, n, dtype=DT, device="cuda")
    b = torch.randn(n, n, dtype=DT, device="cuda")
    t = bench_graph(lambda i: a @ b, 1, reps=20)
    return 2 * n**3 / t


def bench_graph(fn, n_layers: int, reps: int = 30) -> float:
    """Median seconds per layer: fn(layer) for every layer, captured in one CUDA graph."""
    for i in range(n_layers):  # warm-up (compiles outside the capture)
        fn(i)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            for i in range(n_layers):
                fn(i)
        run = g.replay
    except Exception as e:  # noqa: BLE001 -- report and time eagerly
        print(f"  (graph capture failed: {type(e).__name__}: {str(e)[:80]}; timing eagerly)")
        torch.cuda.synchronize()

        def run():
            for i in range(n_layers):
                fn(i)
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2] / n_layers


def layers_for(bytes_per_layer: int, budget: int = 24 << 30) -> int:
    """Enough layers that they exceed L2 several times over, within a memory budget."""
    want = max(2, math.ceil((400 << 20) / max(bytes_per_layer, 1)))
    return max(1, min(8, want, budget // max(bytes_per_layer, 1)))


def beam_tree_mask(shape=(4, 16, 16, 16, 16)) -> torch.Tensor:
    """[N, N] ancestor-or-self mask of LongSpec's beam tree (root + 4 + 16*4 = 69 nodes)."""
    parents = [-1]
    level = [0]
    for width in shape:
        new = []
        for j in range(width):
            parents.append(level[j % len(level)])
            new.append(len(parents) - 1)
        level = new
    n = len(parents)
    mask = torch.eye(n, dtype=torch.bool)
    for j in range(1, n):
        mask[j] |= mask[parents[j]]
    return mask


class PagedInputs:
    """n_layers random paged caches for B sequences of `ctx` committed tokens (+ tree room)."""

    def __init__(self, b, ctx, hq, hkv, d, n_layers, extra=128, seed=0):
        torch.manual_seed(seed)
        self.pages_per_seq = -(-(ctx + extra) // PS)
        num_pages = b * self.pages_per_seq + 1
        self.k = [torch.randn(num_pages, PS, hkv, d, dtype=DT, device="cuda") for _ in range(n_layers)]
        self.v = [torch.randn(num_pages, PS, hkv, d, dtype=DT, device="cuda") for _ in range(n_layers)]
        perm = torch.randperm(num_pages - 1, device="cuda")[: b * self.pages_per_seq] + 1
        self.tables = perm.view(b, self.pages_per_seq).to(torch.int32)
        self.b, self.ctx, self.hq, self.hkv, self.d = b, ctx, hq, hkv, d

    def dense(self, layer, length):
        """Contiguous [B, Hkv, length, D] K/V of one layer (for the baselines)."""
        pages = self.tables[:, : -(-length // PS)].long()
        k = self.k[layer][pages].reshape(self.b, -1, self.hkv, self.d)[:, :length].transpose(1, 2).contiguous()
        v = self.v[layer][pages].reshape(self.b, -1, self.hkv, self.d)[:, :length].transpose(1, 2).contiguous()
        return k, v


def kv_bytes(b, ctx, hkv, d):
    return b * ctx * hkv * d * 2 * 2


def tree_setup(inp: PagedInputs, n: int, **kw):
    b = inp.b
    mask = beam_tree_mask() if n == 69 else torch.ones(n, n, dtype=torch.bool).tril()
    mask = mask[None].expand(b, -1, -1).contiguous().cuda()
    pos = torch.arange(inp.ctx, inp.ctx + n, device="cuda")
    slots = inp.tables.long()[:, pos // PS] * PS + pos % PS  # [B, N]
    att = HybridTreeAttention(b * n, b, n, inp.hq, inp.hkv, inp.d, inp.ctx, "cuda", **kw)
    indptr = torch.arange(0, b * n + 1, n, dtype=torch.int32, device="cuda")
    prefix = torch.full((b,), inp.ctx, dtype=torch.int32, device="cuda")
    att.plan(indptr, prefix, inp.tables, slots, mask)
    q = torch.randn(b * n, inp.hq, inp.d, dtype=DT, device="cuda")
    out = torch.empty_like(q)
    lse = torch.empty(b * n, inp.hq, device="cuda")
    return att, q, out, lse, mask


def part_tune(args, rows):
    variants = [dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st, num_splits=sp)
                for bm, bn, w in ((128, 32, 8), (64, 32, 4), (64, 64, 8), (128, 64, 8))
                for st in (2, 3, 4) for sp in (None, 16, 32, 64)]
    for name, (hq, hkv, d) in SHAPES.items():
        ctx, b = 16384, 1
        nl = layers_for(kv_bytes(b, ctx, hkv, d))
        inp = PagedInputs(b, ctx, hq, hkv, d, nl)
        floor = kv_bytes(b, ctx, hkv, d) / args.copy_bw
        for var in variants:
            try:
                att, q, out, lse, _ = tree_setup(inp, 69, **var)
                t = bench_graph(lambda i: att.run(q, inp.k[i], inp.v[i], d**-0.5, out=out, lse=lse), nl)
            except Exception as e:  # noqa: BLE001
                print(f"  {name} {var}: failed {type(e).__name__}: {str(e)[:100]}")
                continue
            tfl = 4 * 69 * hq * ctx * d / t / 1e12
            rows.append(dict(part="tune", shape=name, ctx=ctx, batch=b, **var, splits=att.num_splits,
                             us=t * 1e6, bw_frac=floor / t, tflops=tfl))
            print(f"tune {name} {var} splits={att.num_splits}: {t * 1e6:.1f} us, {floor / t:.1%} of copy bw, "
                  f"{tfl:.0f} TFLOP/s")
        inp = None
        torch.cuda.empty_cache()


def best_variant(rows, shape):
    cands = [r for r in rows if r["part"] == "tune" and r["shape"] == shape]
    if not cands:
        return {}
    best = min(cands, key=lambda r: r["us"])
    return {k: best[k] for k in ("block_m", "block_n", "num_warps", "num_stages", "num_splits")}


def part_verify(args, rows):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    n = 69
    for name, (hq, hkv, d) in SHAPES.items():
        var = best_variant(rows, name)
        for b in (1, 8):
            for ctx in args.contexts:
                per_layer = kv_bytes(b, ctx, hkv, d)
                nl = layers_for(per_layer)
                inp = PagedInputs(b, ctx, hq, hkv, d, nl)
                var_b = dict(var, num_splits=var.get("num_splits") if b == 1 else None)  # tuned at batch 1
                att, q, out, lse, mask = tree_setup(inp, n, **var_b)
                scale = d**-0.5
                t_ours = bench_graph(lambda i: att.run(q, inp.k[i], inp.v[i], scale, out=out, lse=lse), nl)
                floor = per_layer / args.copy_bw
                flops = 4 * b * n * hq * ctx * d  # QK^T and PV over the prefix
                roof = max(floor, flops / args.mm_rate)
                row = dict(part="verify", shape=name, batch=b, ctx=ctx, nodes=n, bytes=per_layer, flops=flops,
                           ours_us=t_ours * 1e6, bw_frac=floor / t_ours, roofline_frac=roof / t_ours,
                           tflops=flops / t_ours / 1e12, **dict(var_b, num_splits=att.num_splits))
                # baselines on the same inputs: contiguous K/V of prefix + tree nodes, one layer
                dense_bytes = b * hq * (ctx + n) * d * 2 * 2
                if dense_bytes < (20 << 30):
                    kd, vd = inp.dense(0, ctx + n)  # tree keys sit at positions ctx .. ctx+n-1
                    qd = q.view(b, n, hq, d).transpose(1, 2).contiguous()  # [B, Hq, N, D]
                    full = torch.ones(b, n, ctx + n, dtype=torch.bool, device="cuda")
                    full[:, :, ctx:] = mask
                    ke = kd.repeat_interleave(hq // hkv, dim=1)
                    ve = vd.repeat_interleave(hq // hkv, dim=1)
                    am = full[:, None]
                    try:
                        t_sdpa = bench_graph(lambda i: torch.nn.functional.scaled_dot_product_attention(
                            qd, ke, ve, attn_mask=am, scale=scale), 1)
                        row["sdpa_mask_us"] = t_sdpa * 1e6
                        row["speedup_vs_sdpa"] = t_sdpa / t_ours
                    except Exception as e:  # noqa: BLE001
                        row["sdpa_error"] = f"{type(e).__name__}: {str(e)[:100]}"
                    ke = ve = None
                    if name == "llama8b" and ctx in args.flex_contexts:
                        tm = mask

                        def mask_mod(bb, hh, qi, kv, tm=tm, ctx=ctx):
                            return (kv < ctx) | tm[bb, qi.clamp(max=n - 1), (kv - ctx).clamp(min=0, max=n - 1)]
                        try:
                            n_pad = 128  # FlexAttention's kernels want a query length that fills a tile
                            qp = torch.zeros(b, hq, n_pad, d, dtype=DT, device="cuda")
                            qp[:, :, :n] = qd
                            bm = create_block_mask(mask_mod, b, None, n_pad, ctx + n, device="cuda")
                            t_flex = bench_graph(lambda i: flex(qp, kd, vd, block_mask=bm, scale=scale,
                                                                enable_gqa=True), 1)
                            row["flex_us"] = t_flex * 1e6
                            row["speedup_vs_flex"] = t_flex / t_ours
                        except Exception as e:  # noqa: BLE001
                            row["flex_error"] = f"{type(e).__name__}: {str(e)[:160]}"
                    kd = vd = full = None
                rows.append(row)
                print(f"verify {name} B={b} ctx={ctx}: ours {t_ours * 1e6:.1f} us ({floor / t_ours:.1%} bw, "
                      f"{flops / t_ours / 1e12:.0f} TFLOP/s, {roof / t_ours:.1%} of roofline), "
                      f"sdpa {row.get('sdpa_mask_us', float('nan')):.1f} us, "
                      f"flex {row.get('flex_us', float('nan')):.1f} us {row.get('flex_error', '')[:60]}")
                inp = att = None
                torch.cuda.empty_cache()


def part_decode(args, rows):
    for name, (hq, hkv, d) in SHAPES.items():
        for b in (1, 8):
            for ctx in args.contexts:
                per_layer = kv_bytes(b, ctx, hkv, d)
                nl = layers_for(per_layer)
                inp = PagedInputs(b, ctx, hq, hkv, d, nl, extra=0)
                dec = PagedDecodeAttention(b, hq, hkv, d, choose_num_splits(b, hkv, ctx), "cuda")
                q = torch.randn(b, hq, d, dtype=DT, device="cuda")
                lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
                scale = d**-0.5
                t_ours = bench_graph(lambda i: dec.run(q, inp.k[i], inp.v[i], inp.tables, lens, scale), nl)
                floor = per_layer / args.copy_bw
                row = dict(part="decode", shape=name, batch=b, ctx=ctx, bytes=per_layer, ours_us=t_ours * 1e6,
                           bw_frac=floor / t_ours)
                kd, vd = inp.dense(0, ctx)
                qd = q[:, :, None]  # [B, Hq, 1, D]
                try:
                    t_sdpa = bench_graph(lambda i: torch.nn.functional.scaled_dot_product_attention(
                        qd, kd, vd, scale=scale, enable_gqa=True), 1)
                    row["sdpa_us"] = t_sdpa * 1e6
                    row["sdpa_bw_frac"] = floor / t_sdpa
                    row["speedup_vs_sdpa"] = t_sdpa / t_ours
                except Exception as e:  # noqa: BLE001
                    row["sdpa_error"] = f"{type(e).__name__}: {str(e)[:100]}"
                rows.append(row)
                print(f"decode {name} B={b} ctx={ctx}: ours {t_ours * 1e6:.1f} us ({floor / t_ours:.1%} bw), "
                      f"sdpa {row.get('sdpa_us', float('nan')):.1f} us")
                inp = kd = vd = None
                torch.cuda.empty_cache()


def part_decode_tune(args, rows):
    """Batch-1 decode launch-shape sweep at long contexts: block_n x warps x stages x splits."""
    for name, (hq, hkv, d) in SHAPES.items():
        for ctx in (32768, 131072):
            per_layer = kv_bytes(1, ctx, hkv, d)
            nl = layers_for(per_layer)
            inp = PagedInputs(1, ctx, hq, hkv, d, nl, extra=0)
            q = torch.randn(1, hq, d, dtype=DT, device="cuda")
            lens = torch.full((1,), ctx, dtype=torch.int32, device="cuda")
            base = choose_num_splits(1, hkv, ctx)
            best = None
            for bn in (32, 64, 128):
                for w in (4, 8):
                    for st in (2, 3, 4):
                        for sp in sorted({base, min(2 * base, 128), max(base // 2, 1)}):
                            dec = PagedDecodeAttention(1, hq, hkv, d, sp, "cuda", block_n=bn, num_warps=w,
                                                       num_stages=st)
                            try:
                                t = bench_graph(lambda i: dec.run(q, inp.k[i], inp.v[i], inp.tables, lens,
                                                                  d**-0.5), nl)
                            except Exception as e:  # noqa: BLE001
                                print(f"  decode_tune {name} {ctx} bn={bn} w={w} st={st} sp={sp}: {e!s:.80}")
                                continue
                            r = dict(part="decode_tune", shape=name, ctx=ctx, block_n=bn, num_warps=w, num_stages=st,
                                     splits=sp, us=t * 1e6, bw_frac=per_layer / args.copy_bw / t)
                            rows.append(r)
                            if best is None or t < best["us"] / 1e6:
                                best = r
            print(f"decode_tune {name} ctx={ctx}: best {best}")
            inp = None
            torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["copy", "tune", "verify", "decode", "sparse", "chunk"])
    ap.add_argument("--contexts", nargs="+", type=int, default=[4096, 16384, 32768, 65536, 131072])
    ap.add_argument("--flex-contexts", nargs="+", type=int, default=[16384, 65536])
    ap.add_argument("--sparse-contexts", nargs="+", type=int, default=[32768, 131072])
    ap.add_argument("--out", default="attention.json")
    args = ap.parse_args()
    rows: list[dict] = []
    t0 = time.time()
    args.copy_bw = copy_bandwidth()
    args.mm_rate = matmul_rate()
    print(f"copy bandwidth {args.copy_bw / 1e9:.0f} GB/s, bf16 matmul {args.mm_rate / 1e12:.0f} TFLOP/s")
    parts = {"tune": part_tune, "verify": part_verify, "decode": part_decode, "decode_tune": part_decode_tune}
    try:
        from benchmarks.attention_sparse import part_chunk, part_sparse  # noqa: PLC0415

        parts.update(sparse=part_sparse, chunk=part_chunk)
    except ImportError as e:
        print(f"sparse/chunk parts unavailable: {e}")
    for p in args.parts:
        if p in parts:
            parts[p](args, rows)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, python=platform.python_version(),
                copy_bw_gbs=args.copy_bw / 1e9, matmul_tflops=args.mm_rate / 1e12,
                date=time.strftime("%Y-%m-%d"), seconds=time.time() - t0,
                command=" ".join(sys.argv))
    import triton

    meta["triton"] = triton.__version__
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
