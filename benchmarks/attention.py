"""Attention kernels on one GPU, side by side in one run, against baselines and the bandwidth floor.

Parts (``--parts``):
  copy    device-to-device copy bandwidth (bytes read + written): the floor's denominator.
  tune    Hybrid Tree Attention variants (block_m, block_n, warps, stages) at 16K, batch 1.
  verify  69-node tree verification: ours vs torch SDPA with an explicit boolean mask (K/V given
          contiguous and pre-expanded to the query heads, so SDPA moves no page-gather bytes) vs
          FlexAttention with a block mask (compiled), on the same inputs.
  decode  N = 1, batch 1 and 8: our paged split-KV decode kernel (split kernel + merge kernel) at its
          default split count vs SDPA (contiguous K/V, enable_gqa).
  decode_sweep  N = 1, batch 1: our decode kernel over splits x (block_n, warps, stages), the best vs SDPA.
  tune_b8 69-node tree verification at batch 8 (--b8-contexts): splits x launch shapes (block_m,
          block_n, warps, stages) next to FlexAttention and SDPA with a mask, measured in the same run;
          also the default (wave-aware split count) and the old split rule.
  sparse  UNIQUE sparse page attention, 512-token budget, scoring and selection included, vs our dense
          decode kernel on the same cache.
  chunk   Cross-model Retrieval chunk scores vs one single-query decode pass over the same keys.

Shapes: Llama-3.1-8B attention (32 q / 8 kv heads, d 128) and Qwen2.5-1.5B (12 / 2, d 128), bf16, page
size 16, batch 1 and 8, contexts 4K..128K. Bytes moved = the prefix K/V that must be read (each key and
value once); bandwidth fraction = bytes / time / copy bandwidth.

Timing: each contender runs over several distinct "layers" (separate caches, so repeated runs do not
measure L2), captured in one CUDA graph; the median replay time is divided by the layer count.

    python benchmarks/attention.py --out $OUT/attention.json
    python benchmarks/attention.py --parts decode decode_sweep tune_b8 --contexts 4096 8192 32768 131072 \
        --out $OUT/attn.json     # the issue-4 follow-up (about 3-4 minutes on an H100)
    python benchmarks/attention.py --dry-run --parts decode decode_sweep tune_b8   # CPU: plan only, no timing
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
from specray.kernels.tree_attention import HybridTreeAttention, default_tiles  # noqa: E402

SHAPES = {"llama8b": (32, 8, 128), "qwen1.5b": (12, 2, 128)}
PS = 16
DT = torch.bfloat16
DEV = "cuda"  # "meta" with --dry-run: shapes and launch plans only, nothing allocated or timed
DRY = False
# decode_sweep: split counts (plus the default) x (block_n, num_warps, num_stages)
DECODE_SWEEP_SPLITS = (8, 16, 24, 32, 48, 64, 96, 128)
DECODE_SWEEP_SHAPES = ((64, 4, 2), (128, 4, 2))  # 32-token blocks, 3 stages: 4-10% slower (decode_tune)
# tune_b8: split counts (plus the default and the old rule's) x (block_m, block_n, num_warps, num_stages)
B8_SPLITS = (1, 2, 3, 4, 6, 8, 11, 16)
B8_TILES = ((128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3), (64, 32, 4, 2))


def matmul_rate(n: int = 8192) -> float:
    """FLOP/s of a bf16 n x n x n matrix product (cuBLAS, random data): the arithmetic ceiling."""
    a = torch.randn(n, n, dtype=DT, device=DEV)
    b = torch.randn(n, n, dtype=DT, device=DEV)
    t = bench_graph(lambda i: a @ b, 1, reps=20)
    return 2 * n**3 / t


def bench_graph(fn, n_layers: int, reps: int = 30) -> float:
    """Median seconds per layer: fn(layer) for every layer, captured in one CUDA graph."""
    if DRY:
        return 1e-5  # --dry-run: nothing runs
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
        self.k = [torch.randn(num_pages, PS, hkv, d, dtype=DT, device=DEV) for _ in range(n_layers)]
        self.v = [torch.randn(num_pages, PS, hkv, d, dtype=DT, device=DEV) for _ in range(n_layers)]
        perm = torch.randperm(num_pages - 1, device=DEV)[: b * self.pages_per_seq] + 1
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
    mask = mask[None].expand(b, -1, -1).contiguous().to(DEV)
    pos = torch.arange(inp.ctx, inp.ctx + n, device=DEV)
    slots = inp.tables.long()[:, pos // PS] * PS + pos % PS  # [B, N]
    att = HybridTreeAttention(b * n, b, n, inp.hq, inp.hkv, inp.d, inp.ctx, DEV, **kw)
    indptr = torch.arange(0, b * n + 1, n, dtype=torch.int32, device=DEV)
    prefix = torch.full((b,), inp.ctx, dtype=torch.int32, device=DEV)
    att.plan(indptr, prefix, inp.tables, slots, mask)
    q = torch.randn(b * n, inp.hq, inp.d, dtype=DT, device=DEV)
    out = torch.empty_like(q)
    lse = torch.empty(b * n, inp.hq, device=DEV)
    return att, q, out, lse, mask


def part_tune(args, rows):
    variants = [
        dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st, num_splits=sp)
        for bm, bn, w in ((128, 32, 8), (64, 32, 4), (64, 64, 8), (128, 64, 8))
        for st in (2, 3, 4)
        for sp in (None, 16, 32, 64)
    ]
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
            rows.append(
                dict(
                    part="tune",
                    shape=name,
                    ctx=ctx,
                    batch=b,
                    **var,
                    splits=att.num_splits,
                    us=t * 1e6,
                    bw_frac=floor / t,
                    tflops=tfl,
                )
            )
            print(
                f"tune {name} {var} splits={att.num_splits}: {t * 1e6:.1f} us, {floor / t:.1%} of copy bw, "
                f"{tfl:.0f} TFLOP/s"
            )
        inp = None
        torch.cuda.empty_cache()


def best_variant(rows, shape):
    cands = [r for r in rows if r["part"] == "tune" and r["shape"] == shape]
    if not cands:
        return {}
    best = min(cands, key=lambda r: r["us"])
    return {k: best[k] for k in ("block_m", "block_n", "num_warps", "num_stages", "num_splits")}


def tree_baselines(inp: PagedInputs, q, mask, n: int, scale: float, flex=None) -> dict:
    """SDPA with a boolean mask (K/V contiguous, pre-expanded to the query heads) and, when `flex` is given,
    FlexAttention with a block mask, on the same prefix + tree inputs (layer 0). Returns their µs or errors."""
    b, hq, hkv, d, ctx = inp.b, inp.hq, inp.hkv, inp.d, inp.ctx
    res: dict = {}
    if b * hq * (ctx + n) * d * 2 * 2 >= (20 << 30):
        return res
    kd, vd = inp.dense(0, ctx + n)  # tree keys sit at positions ctx .. ctx+n-1
    qd = q.view(b, n, hq, d).transpose(1, 2).contiguous()  # [B, Hq, N, D]
    full = torch.ones(b, n, ctx + n, dtype=torch.bool, device=DEV)
    full[:, :, ctx:] = mask
    ke = kd.repeat_interleave(hq // hkv, dim=1)
    ve = vd.repeat_interleave(hq // hkv, dim=1)
    am = full[:, None]
    try:
        t_sdpa = bench_graph(
            lambda i: torch.nn.functional.scaled_dot_product_attention(qd, ke, ve, attn_mask=am, scale=scale), 1
        )
        res["sdpa_mask_us"] = t_sdpa * 1e6
    except Exception as e:  # noqa: BLE001
        res["sdpa_error"] = f"{type(e).__name__}: {str(e)[:100]}"
    ke = ve = am = full = None
    if flex is not None and not DRY:
        from torch.nn.attention.flex_attention import create_block_mask  # noqa: PLC0415

        def mask_mod(bb, hh, qi, kv, tm=mask, ctx=ctx):
            return (kv < ctx) | tm[bb, qi.clamp(max=n - 1), (kv - ctx).clamp(min=0, max=n - 1)]

        try:
            n_pad = 128  # FlexAttention's kernels want a query length that fills a tile
            qp = torch.zeros(b, hq, n_pad, d, dtype=DT, device=DEV)
            qp[:, :, :n] = qd
            bm = create_block_mask(mask_mod, b, None, n_pad, ctx + n, device=DEV)
            t_flex = bench_graph(lambda i: flex(qp, kd, vd, block_mask=bm, scale=scale, enable_gqa=True), 1)
            res["flex_us"] = t_flex * 1e6
        except Exception as e:  # noqa: BLE001
            res["flex_error"] = f"{type(e).__name__}: {str(e)[:160]}"
    return res


def compiled_occupancy(att: HybridTreeAttention) -> dict:
    """Registers, spills, shared memory and resident programs per SM of the last compiled prefix kernel."""
    try:
        k = att.compiled[0]
        regs, shared, warps = int(k.n_regs), int(k.metadata.shared), int(k.metadata.num_warps)
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        sm_regs = getattr(props, "regs_per_multiprocessor", 65536)
        sm_smem = getattr(props, "shared_memory_per_multiprocessor", 233472)
        warp_regs = -(-regs * 32 // 256) * 256
        by_smem = sm_smem // (shared + 1024) if shared else 32
        occ = min(sm_regs // max(warp_regs * warps, 1), 64 // warps, by_smem, 32)
        return dict(regs=regs, spills=int(k.n_spills), shared=shared, ctas_per_sm=occ)
    except Exception:  # noqa: BLE001 -- interpreter / dry run / older Triton
        return {}


def print_table(title: str, header: list[str], lines: list[list]) -> None:
    """Compact markdown table on stdout."""
    print(f"\n### {title}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for line in lines:
        print("| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in line) + " |")
    sys.stdout.flush()


def over_budget(args) -> bool:
    """True once the run has used --deadline-s: sweeps stop (baselines and defaults still run)."""
    return time.time() - args.t0 > args.deadline_s


def part_verify(args, rows):
    from torch.nn.attention.flex_attention import flex_attention

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
                row = dict(
                    part="verify",
                    shape=name,
                    batch=b,
                    ctx=ctx,
                    nodes=n,
                    bytes=per_layer,
                    flops=flops,
                    ours_us=t_ours * 1e6,
                    bw_frac=floor / t_ours,
                    roofline_frac=roof / t_ours,
                    tflops=flops / t_ours / 1e12,
                    **dict(var_b, num_splits=att.num_splits),
                )
                use_flex = name == "llama8b" and ctx in args.flex_contexts
                row |= tree_baselines(inp, q, mask, n, scale, flex if use_flex else None)
                if "sdpa_mask_us" in row:
                    row["speedup_vs_sdpa"] = row["sdpa_mask_us"] / row["ours_us"]
                if "flex_us" in row:
                    row["speedup_vs_flex"] = row["flex_us"] / row["ours_us"]
                rows.append(row)
                print(
                    f"verify {name} B={b} ctx={ctx}: ours {t_ours * 1e6:.1f} us ({floor / t_ours:.1%} bw, "
                    f"{flops / t_ours / 1e12:.0f} TFLOP/s, {roof / t_ours:.1%} of roofline), "
                    f"sdpa {row.get('sdpa_mask_us', float('nan')):.1f} us, "
                    f"flex {row.get('flex_us', float('nan')):.1f} us {row.get('flex_error', '')[:60]}"
                )
                inp = att = None
                empty_cache()


def empty_cache() -> None:
    if not DRY:
        torch.cuda.empty_cache()


def part_decode(args, rows):
    """Batch 1 and 8 at the default split count vs SDPA."""
    table = []
    for name, (hq, hkv, d) in SHAPES.items():
        for b in (1, 8):
            for ctx in args.contexts:
                per_layer = kv_bytes(b, ctx, hkv, d)
                nl = layers_for(per_layer)
                inp = PagedInputs(b, ctx, hq, hkv, d, nl, extra=0)
                splits = choose_num_splits(b, hkv, ctx)
                q = torch.randn(b, hq, d, dtype=DT, device=DEV)
                lens = torch.full((b,), ctx, dtype=torch.int32, device=DEV)
                scale = d**-0.5
                dec = PagedDecodeAttention(b, hq, hkv, d, splits, DEV)
                t_ours = bench_graph(lambda i: dec.run(q, inp.k[i], inp.v[i], inp.tables, lens, scale), nl)
                floor = per_layer / args.copy_bw
                row = dict(
                    part="decode",
                    shape=name,
                    batch=b,
                    ctx=ctx,
                    bytes=per_layer,
                    splits=splits,
                    ours_us=t_ours * 1e6,
                    bw_frac=floor / t_ours,
                )
                kd, vd = inp.dense(0, ctx)
                qd = q[:, :, None]  # [B, Hq, 1, D]
                try:
                    t_sdpa = bench_graph(
                        lambda i: torch.nn.functional.scaled_dot_product_attention(
                            qd, kd, vd, scale=scale, enable_gqa=True
                        ),
                        1,
                    )
                    row["sdpa_us"] = t_sdpa * 1e6
                    row["sdpa_bw_frac"] = floor / t_sdpa
                    row["speedup_vs_sdpa"] = t_sdpa / t_ours
                except Exception as e:  # noqa: BLE001
                    row["sdpa_error"] = f"{type(e).__name__}: {str(e)[:100]}"
                rows.append(row)
                sdpa = row.get("sdpa_us", float("nan"))
                print(
                    f"decode {name} B={b} ctx={ctx} S={splits}: ours {t_ours * 1e6:.1f} us "
                    f"({floor / t_ours:.1%} bw), sdpa {sdpa:.1f} us"
                )
                table.append([name, b, ctx, splits, t_ours * 1e6, sdpa, f"{sdpa / (t_ours * 1e6):.2f}"])
                inp = kd = vd = None
                empty_cache()
    header = ["shape", "B", "ctx", "S", "ours µs", "SDPA µs", "SDPA÷ours"]
    print_table("decode: default splits vs SDPA", header, table)


def part_decode_sweep(args, rows):
    """Batch-1 decode: splits x (block_n, warps, stages); the default and the best vs SDPA."""
    table = []
    for name, (hq, hkv, d) in SHAPES.items():
        for ctx in args.contexts:
            per_layer = kv_bytes(1, ctx, hkv, d)
            nl = layers_for(per_layer)
            inp = PagedInputs(1, ctx, hq, hkv, d, nl, extra=0)
            q = torch.randn(1, hq, d, dtype=DT, device=DEV)
            lens = torch.full((1,), ctx, dtype=torch.int32, device=DEV)
            scale = d**-0.5
            kd, vd = inp.dense(0, ctx)
            qd = q[:, :, None]
            t_sdpa = bench_graph(
                lambda i: torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, scale=scale, enable_gqa=True),
                1,
            )
            kd = vd = None
            default = choose_num_splits(1, hkv, ctx)
            cap = max(1, -(-ctx // 128))  # choose_num_splits' shortest split: 128 tokens
            splits = sorted({s for s in args.decode_splits if s <= cap} | {default})
            best: tuple[float, dict] | None = None
            t_default = None
            skipped = 0
            for bn, w, st in DECODE_SWEEP_SHAPES:
                for sp in splits:
                    if over_budget(args):
                        skipped += 1
                        continue
                    cfg = dict(block_n=bn, num_warps=w, num_stages=st, splits=sp)
                    dec = PagedDecodeAttention(1, hq, hkv, d, sp, DEV, block_n=bn, num_warps=w, num_stages=st)
                    try:
                        t = bench_graph(lambda i: dec.run(q, inp.k[i], inp.v[i], inp.tables, lens, scale), nl)
                    except Exception as e:  # noqa: BLE001
                        print(f"  decode_sweep {name} {ctx} {cfg}: {e!s:.80}")
                        continue
                    rows.append(
                        dict(part="decode_sweep", shape=name, ctx=ctx, batch=1, **cfg, us=t * 1e6,
                             sdpa_us=t_sdpa * 1e6, bw_frac=per_layer / args.copy_bw / t)
                    )  # fmt: skip
                    if sp == default and (bn, w, st) == (64, 4, 2):
                        t_default = t
                    if best is None or t < best[0]:
                        best = (t, cfg)
            if skipped:
                print(f"  decode_sweep {name} ctx={ctx}: {skipped} configs skipped (--deadline-s)")
            line = [name, ctx, t_sdpa * 1e6, f"{t_default * 1e6:.1f} (S={default})" if t_default is not None else "—"]
            if best is not None:
                t, cfg = best
                line += [t * 1e6, f"S={cfg['splits']} bn={cfg['block_n']} w={cfg['num_warps']} "
                         f"st={cfg['num_stages']}", f"{t_sdpa / t:.2f}"]  # fmt: skip
            else:
                line += ["—", "—", "—"]
            table.append(line)
            print(f"decode_sweep {name} ctx={ctx}: sdpa {t_sdpa * 1e6:.1f} us, best {best}")
            inp = None
            empty_cache()
    header = ["shape", "ctx", "SDPA µs", "default µs", "best µs", "best cfg", "SDPA÷best"]
    print_table("decode_sweep (batch 1): default and best launch vs SDPA", header, table)


def old_tree_splits(rows_programs: int, max_prefix: int, num_sms: int, block_n: int) -> int:
    """The split rule before the wave-aware one: about 2 programs per SM, at least 4 blocks per split."""
    wanted = -(-2 * num_sms // max(rows_programs, 1))
    return max(1, min(wanted, max(1, max_prefix // (4 * block_n)), 32))


def part_tune_b8(args, rows):
    """Batch-8 verification (69-node tree): launch shapes x splits, the default and the old split rule, vs
    FlexAttention and SDPA with a mask in the same run."""
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    b, n = 8, 69
    sms = torch.cuda.get_device_properties(0).multi_processor_count if not DRY else 132
    table, tile_lines = [], []
    for name, (hq, hkv, d) in SHAPES.items():
        group = hq // hkv
        dt = default_tiles(hkv, n * group, b)
        dflt_tile = (dt["block_m"], dt["block_n"], dt["num_warps"], dt["num_stages"])
        for ctx in args.b8_contexts:
            per_layer = kv_bytes(b, ctx, hkv, d)
            nl = layers_for(per_layer)
            inp = PagedInputs(b, ctx, hq, hkv, d, nl)
            flops = 4 * b * n * hq * ctx * d  # QK^T and PV over the prefix
            scale = d**-0.5

            def measure(**kw):
                att, q, out, lse, mask = tree_setup(inp, n, **kw)
                t = bench_graph(lambda i: att.run(q, inp.k[i], inp.v[i], scale, out=out, lse=lse), nl)
                return t, att, q, mask

            t_def, att, q, mask = measure()
            def_splits = att.num_splits
            base = tree_baselines(inp, q, mask, n, scale, flex if args.b8_flex else None)
            occ = compiled_occupancy(att)
            res = {}  # (tile, splits) -> seconds
            res[(dflt_tile, att.num_splits)] = t_def
            rows.append(
                dict(part="tune_b8", kind="default", shape=name, batch=b, ctx=ctx, block_m=att.block_m,
                     block_n=att.block_n, num_warps=att.num_warps, num_stages=att.num_stages,
                     splits=att.num_splits, us=t_def * 1e6, tflops=flops / t_def / 1e12, **occ, **base)
            )  # fmt: skip
            old = old_tree_splits(b * att.m_tiles * hkv, ctx, sms, att.block_n)
            skipped = 0
            for tile in B8_TILES:
                bm, bn, w, st = tile
                m_tiles = -(-n * group // bm)
                wave_pick = choose_tree_splits_for(tile, b * m_tiles * hkv, ctx, sms, d)
                extra = {wave_pick} | ({old} if tile == dflt_tile else set())
                best_t, best_s, occ = float("inf"), None, {}
                for sp in sorted(set(args.b8_splits) | extra):
                    if (tile, sp) in res:
                        t = res[(tile, sp)]
                    elif over_budget(args):
                        skipped += 1
                        continue
                    else:
                        cfg = dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st, num_splits=sp)
                        try:
                            t, att, _, _ = measure(**cfg)
                        except Exception as e:  # noqa: BLE001
                            print(f"  tune_b8 {name} {ctx} {cfg}: failed {type(e).__name__}: {str(e)[:100]}")
                            continue
                        occ = occ or compiled_occupancy(att)
                        res[(tile, sp)] = t
                        rows.append(
                            dict(part="tune_b8", kind="sweep", shape=name, batch=b, ctx=ctx, block_m=bm,
                                 block_n=bn, num_warps=w, num_stages=st, splits=sp, us=t * 1e6,
                                 tflops=flops / t / 1e12, wave_pick=wave_pick, **occ)
                        )  # fmt: skip
                    if t < best_t:
                        best_t, best_s = t, sp
                if best_s is not None:
                    t_pick = res.get((tile, wave_pick), float("nan"))
                    tile_lines.append(
                        [name, ctx, "x".join(map(str, tile)), occ.get("ctas_per_sm", "?"), best_s, best_t * 1e6,
                         wave_pick, t_pick * 1e6, f"{best_t / t_pick:.2f}"]
                    )  # fmt: skip
            if skipped:
                print(f"  tune_b8 {name} ctx={ctx}: {skipped} configs skipped (--deadline-s)")
            (b_tile, b_s), t_best = min(res.items(), key=lambda kv: kv[1])
            t_old = res.get((dflt_tile, old), float("nan"))
            sdpa, fl = base.get("sdpa_mask_us", float("nan")), base.get("flex_us", float("nan"))
            table.append(
                [name, ctx, sdpa, fl, f"{t_def * 1e6:.1f} (S={def_splits})",
                 f"{flops / t_def / 1e12:.0f}", f"{t_old * 1e6:.1f} (S={old})",
                 f"{t_best * 1e6:.1f} ({'x'.join(map(str, b_tile))} S={b_s})", f"{flops / t_best / 1e12:.0f}",
                 f"{fl / (t_def * 1e6):.2f}", f"{fl / (t_best * 1e6):.2f}", f"{sdpa / (t_def * 1e6):.2f}",
                 f"{sdpa / (t_best * 1e6):.2f}"]
            )  # fmt: skip
            print(
                f"tune_b8 {name} ctx={ctx}: default {t_def * 1e6:.1f} us, old rule {t_old * 1e6:.1f} us, best "
                f"{t_best * 1e6:.1f} us {b_tile} S={b_s}, sdpa {sdpa:.1f} us, flex {fl:.1f} us "
                f"{base.get('flex_error', '')[:60]}"
            )
            inp = att = None
            empty_cache()
    print_table(
        "tune_b8 (batch 8, 69-node tree): default / old split rule / best swept vs Flex and SDPA+mask",
        ["shape", "ctx", "SDPA+mask µs", "Flex µs", "default µs", "TFLOP/s", "old rule µs", "best µs (tile S)",
         "TFLOP/s", "Flex÷default", "Flex÷best", "SDPA÷default", "SDPA÷best"],
        table,
    )  # fmt: skip
    print_table(
        "tune_b8 per launch shape (block_m x block_n x warps x stages): best split count vs the wave-aware pick",
        ["shape", "ctx", "tile", "CTAs/SM", "best S", "best µs", "picked S", "picked µs", "best÷picked"],
        tile_lines,
    )


def choose_tree_splits_for(tile, rows_programs: int, ctx: int, sms: int, d: int) -> int:
    """The wave-aware split count HybridTreeAttention picks for this launch shape."""
    from specray.kernels.tree_attention import choose_tree_splits, estimate_ctas_per_sm  # noqa: PLC0415

    bm, bn, w, st = tile
    return choose_tree_splits(rows_programs, ctx, sms, bn, ctas_per_sm=estimate_ctas_per_sm(bm, bn, w, st, d))


def part_decode_tune(args, rows):
    """Batch-1 decode launch-shape sweep at long contexts: block_n x warps x stages x splits."""
    for name, (hq, hkv, d) in SHAPES.items():
        for ctx in (32768, 131072):
            per_layer = kv_bytes(1, ctx, hkv, d)
            nl = layers_for(per_layer)
            inp = PagedInputs(1, ctx, hq, hkv, d, nl, extra=0)
            q = torch.randn(1, hq, d, dtype=DT, device=DEV)
            lens = torch.full((1,), ctx, dtype=torch.int32, device=DEV)
            base = choose_num_splits(1, hkv, ctx)
            best = None
            for bn in (32, 64, 128):
                for w in (4, 8):
                    for st in (2, 3, 4):
                        for sp in sorted({base, min(2 * base, 128), max(base // 2, 1)}):
                            dec = PagedDecodeAttention(1, hq, hkv, d, sp, DEV, block_n=bn, num_warps=w, num_stages=st)
                            try:
                                t = bench_graph(lambda i: dec.run(q, inp.k[i], inp.v[i], inp.tables, lens, d**-0.5), nl)
                            except Exception as e:  # noqa: BLE001
                                print(f"  decode_tune {name} {ctx} bn={bn} w={w} st={st} sp={sp}: {e!s:.80}")
                                continue
                            r = dict(
                                part="decode_tune",
                                shape=name,
                                ctx=ctx,
                                block_n=bn,
                                num_warps=w,
                                num_stages=st,
                                splits=sp,
                                us=t * 1e6,
                                bw_frac=per_layer / args.copy_bw / t,
                            )
                            rows.append(r)
                            if best is None or t < best["us"] / 1e6:
                                best = r
            print(f"decode_tune {name} ctx={ctx}: best {best}")
            inp = None
            torch.cuda.empty_cache()


def main() -> None:
    global DEV, DRY
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["copy", "tune", "verify", "decode", "sparse", "chunk"])
    ap.add_argument("--contexts", nargs="+", type=int, default=[4096, 16384, 32768, 65536, 131072])
    ap.add_argument("--flex-contexts", nargs="+", type=int, default=[16384, 65536])
    ap.add_argument("--sparse-contexts", nargs="+", type=int, default=[32768, 131072])
    ap.add_argument("--b8-contexts", nargs="+", type=int, default=[16384, 65536], help="tune_b8 prefix lengths")
    ap.add_argument("--b8-splits", nargs="+", type=int, default=list(B8_SPLITS), help="tune_b8 split counts")
    ap.add_argument("--no-b8-flex", dest="b8_flex", action="store_false", help="tune_b8 without FlexAttention")
    ap.add_argument("--decode-splits", nargs="+", type=int, default=list(DECODE_SWEEP_SPLITS))
    ap.add_argument("--deadline-s", type=float, default=300.0, help="sweeps stop after this many seconds")
    ap.add_argument("--dry-run", action="store_true", help="CPU: build every launch plan on meta tensors, no timing")
    ap.add_argument("--out", default="attention.json")
    args = ap.parse_args()
    rows: list[dict] = []
    t0 = args.t0 = time.time()
    if args.dry_run:
        DEV, DRY = "meta", True
        args.copy_bw, args.mm_rate = 3.0e12, 7.8e14
    else:
        args.copy_bw = copy_bandwidth()
        args.mm_rate = matmul_rate()
    print(f"copy bandwidth {args.copy_bw / 1e9:.0f} GB/s, bf16 matmul {args.mm_rate / 1e12:.0f} TFLOP/s")
    parts = {
        "tune": part_tune,
        "verify": part_verify,
        "decode": part_decode,
        "decode_tune": part_decode_tune,
        "decode_sweep": part_decode_sweep,
        "tune_b8": part_tune_b8,
    }
    try:
        from benchmarks.attention_sparse import part_chunk, part_sparse  # noqa: PLC0415

        parts.update(sparse=part_sparse, chunk=part_chunk)
    except ImportError as e:
        print(f"sparse/chunk parts unavailable: {e}")
    import triton

    meta = dict(
        device="dry run" if DRY else torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        python=platform.python_version(),
        copy_bw_gbs=args.copy_bw / 1e9,
        matmul_tflops=args.mm_rate / 1e12,
        date=time.strftime("%Y-%m-%d"),
        command=" ".join(sys.argv),
    )
    for p in args.parts:
        if p == "copy":  # measured above for every run
            continue
        if p not in parts:
            print(f"unknown part {p!r}; known: {sorted(parts)}")
            continue
        t_part = time.time()
        parts[p](args, rows)
        print(f"part {p}: {time.time() - t_part:.0f} s (total {time.time() - t0:.0f} s)")
        meta["seconds"] = time.time() - t0
        Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))  # after every part
    meta["seconds"] = time.time() - t0
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
