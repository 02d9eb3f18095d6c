"""Two decode-step fusions against the kernels they replace, side by side, at the Llama-3.1-8B shapes of TP=1 and
of one TP=2 shard (bf16, batch 1), each timed as a CUDA graph of one call per layer over 32 layers' worth of
distinct weights / caches (so no call finds its operands in L2):

  silu_down  `fused.silu_mul` + the down-projection GEMV   vs  the gated GEMV (`gemv(..., gated=True)`)
  rope_kv    `rotary.rope_` + `write_kv` (two index_copy)  vs  `rotary.rope_store_` (one kernel)

Prints µs per layer for both and their ratio; a ratio above 1 means the fusion is slower at that shape.

    python benchmarks/fusions.py --out fusions.json
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch
from gemv import graph_time  # benchmarks/gemv.py, beside this script

from specray.engine.attention import write_kv
from specray.engine.kv_cache import KVCache, KVCacheSpec
from specray.kernels import fused, rotary
from specray.kernels.gemv import choose_config, gemv
from specray.models.arch import ModelArch
from specray.models.rope import RotaryEmbedding

LAYERS = 32
SHAPES = {"tp1": dict(inter=14336, q_heads=32, kv_heads=8), "tp2": dict(inter=7168, q_heads=16, kv_heads=4)}
HIDDEN, HEAD_DIM, PAGE, CTX = 4096, 128, 16, 32768


def silu_down(inter: int, iters: int) -> dict:
    dev, dt = torch.device("cuda"), torch.bfloat16
    ws = [torch.randn(HIDDEN, inter, device=dev, dtype=dt) * inter**-0.5 for _ in range(LAYERS)]
    gate_up = torch.randn(1, 2 * inter, device=dev, dtype=dt)
    act = torch.empty(1, inter, device=dev, dtype=dt)
    out = torch.empty(1, HIDDEN, device=dev, dtype=dt)
    cfg = choose_config(HIDDEN, inter)
    assert torch.equal(gemv(gate_up, ws[0], cfg, gated=True), gemv(fused.silu_mul(gate_up), ws[0], cfg))
    t_two = graph_time(lambda i: gemv(fused.silu_mul(gate_up, out=act), ws[i % LAYERS], cfg, out=out), iters)
    t_one = graph_time(lambda i: gemv(gate_up, ws[i % LAYERS], cfg, out=out, gated=True), iters)
    return {"unfused_us": t_two * 1e6, "fused_us": t_one * 1e6, "fused_over_unfused": t_one / t_two}


def rope_kv(q_heads: int, kv_heads: int, iters: int) -> dict:
    dev, dt = torch.device("cuda"), torch.bfloat16
    arch = ModelArch(family="llama", vocab_size=128, hidden_size=q_heads * HEAD_DIM, intermediate_size=128,
                     num_layers=LAYERS, num_heads=q_heads, num_kv_heads=kv_heads, head_dim=HEAD_DIM,
                     rms_norm_eps=1e-5, max_position_embeddings=CTX)
    cache = KVCache(KVCacheSpec.of(arch, PAGE, dt), CTX // PAGE + 1, dev)
    rope = RotaryEmbedding(arch.rope, HEAD_DIM, CTX, dev)
    qkv = torch.randn(1, (q_heads + 2 * kv_heads) * HEAD_DIM, device=dev, dtype=dt)
    q, k, v = qkv.split([q_heads * HEAD_DIM, kv_heads * HEAD_DIM, kv_heads * HEAD_DIM], dim=-1)
    q, k, v = q.view(1, q_heads, HEAD_DIM), k.view(1, kv_heads, HEAD_DIM), v.view(1, kv_heads, HEAD_DIM)
    pos = torch.tensor([CTX - 5], device=dev)
    slots = torch.tensor([CTX - 5], device=dev)

    def two(i: int) -> None:
        rotary.rope_(q, k, pos, rope.cos, rope.sin)
        write_kv(cache, i % LAYERS, k, v, slots)

    def one(i: int) -> None:
        rotary.rope_store_(q, k, v, pos, rope.cos, rope.sin, cache.k[i % LAYERS], cache.v[i % LAYERS], slots)

    t_two, t_one = graph_time(two, iters), graph_time(one, iters)
    return {"unfused_us": t_two * 1e6, "fused_us": t_one * 1e6, "fused_over_unfused": t_one / t_two}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=LAYERS * 4)
    ap.add_argument("--out", default="fusions.json")
    args = ap.parse_args()
    rows = []
    for name, s in SHAPES.items():
        for op, res in (("silu_down", silu_down(s["inter"], args.iters)),
                        ("rope_kv", rope_kv(s["q_heads"], s["kv_heads"], args.iters))):
            rows.append({"shape": name, "op": op, **res})
            print(f"{name} {op:9s} unfused {res['unfused_us']:7.2f} us  fused {res['fused_us']:7.2f} us  "
                  f"x{res['fused_over_unfused']:.3f}", flush=True)
    meta = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "iters": args.iters, "layers": LAYERS}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
