"""Batch-1 GEMV: the Triton kernel of `specray.kernels.gemv` against cuBLAS (`F.linear`) on the projections
of a Llama-3.1-8B layer, whole (TP=1) and as one rank's shard at TP=2, bf16.

Each timing replays a CUDA graph of `--iters` calls that rotate over enough weight copies (>= 4x L2 and
>= 256 MiB) that no call finds its weight in L2, as in a decoder where every layer has its own weights.
Bandwidth = weight bytes / time; the copy bandwidth (`decode.copy_bandwidth`: bytes read + written) is recorded.

    python benchmarks/gemv.py --out gemv.json
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json

import torch
from decode import copy_bandwidth  # benchmarks/decode.py, beside this script

from specray.kernels.gemv import GemvConfig, fits, gemv, gemv_ref

SHAPES = {  # name: (N, K)
    "qkv_tp1": (6144, 4096), "o_tp1": (4096, 4096), "gate_up_tp1": (28672, 4096), "down_tp1": (4096, 14336),
    "qkv_tp2": (3072, 4096), "o_tp2": (4096, 2048), "gate_up_tp2": (14336, 4096), "down_tp2": (4096, 7168),
}


def graph_time(fn, iters: int) -> float:
    """Seconds per call: `fn(i)` for i < iters captured in one graph, median of 5 replays."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(3):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(iters):
            fn(i)
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / iters)
    return sorted(times)[2]


def bench_shape(name: str, n: int, k: int, configs: list[GemvConfig], iters: int, l2: int) -> list[dict]:
    nbytes = n * k * 2
    copies = max(2, -(-max(4 * l2, 256 << 20) // nbytes))
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
    ref = gemv_ref(x, ws[0])
    t_cublas = graph_time(lambda i: torch.matmul(x, ws[i % copies].t(), out=out), iters)
    rows = [{"shape": name, "N": n, "K": k, "impl": "cublas", "us": t_cublas * 1e6, "tb_s": nbytes / t_cublas / 1e12}]
    for cfg in configs:
        if not fits(x, ws[0], cfg):
            continue
        try:
            got = gemv(x, ws[0], cfg)
            err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
            t = graph_time(lambda i, cfg=cfg: gemv(x, ws[i % copies], cfg, out=out), iters)
        except Exception as e:  # noqa: BLE001 - a config that does not compile: skip it
            rows.append({"shape": name, "impl": "triton", "cfg": list(cfg), "error": f"{type(e).__name__}: {e}"})
            continue
        rows.append({"shape": name, "N": n, "K": k, "impl": "triton", "cfg": list(cfg), "us": t * 1e6,
                     "tb_s": nbytes / t / 1e12, "rel_err": err, "vs_cublas": t_cublas / t})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--block-n", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--block-k", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--out", default="gemv.json")
    args = ap.parse_args()
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    bw = copy_bandwidth()
    configs = [GemvConfig(*c) for c in itertools.product(args.block_n, args.block_k, args.warps, args.stages)]
    rows = []
    for name in args.shapes:
        n, k = SHAPES[name]
        shape_rows = bench_shape(name, n, k, configs, args.iters, l2)
        rows += shape_rows
        timed = sorted((r for r in shape_rows if "us" in r and r["impl"] == "triton"), key=lambda r: r["us"])
        cub = shape_rows[0]
        print(f"{name:12s} N={n:6d} K={k:6d} cublas {cub['us']:7.2f} us {cub['tb_s']:.2f} TB/s", flush=True)
        for r in timed[:3]:
            print(f"   triton {r['cfg']} {r['us']:7.2f} us {r['tb_s']:.2f} TB/s  x{r['vs_cublas']:.3f} "
                  f"err {r['rel_err']:.1e}", flush=True)
    meta = {"device": props.name, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "copy_bandwidth_tb_s": bw / 1e12, "iters": args.iters}
    print(json.dumps(meta))
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
