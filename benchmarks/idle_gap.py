"""Does a GPU run the same work slower after it sat idle? GPU time of one fixed CUDA graph (bf16 GEMVs over
weights far larger than L2, about 4 ms: the size of a draft or verify phase) replayed back to back, and
replayed after the host waits `gap` ms with the GPU idle, as a separate draft and its target do while the
other one works.

Timing: CUDA events around each replay (GPU time only: the idle gap itself is not in it); median of
`--reps` replays per gap. The waits busy-spin on the host, so the host stays awake and only the GPU idles.

    python benchmarks/idle_gap.py --out idle_gap.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time

import torch
import torch.nn.functional as F


def build_graph(calls: int, copies: int, n: int, k: int) -> torch.cuda.CUDAGraph:
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(3):
            torch.matmul(x, ws[i % copies].t(), out=out)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            torch.matmul(x, ws[i % copies].t(), out=out)
            F.silu(out, inplace=True)  # a small kernel after each GEMV, as in a decoder layer
    g._keep = (ws, x, out)  # type: ignore[attr-defined]
    return g


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def measure(g: torch.cuda.CUDAGraph, gap_s: float, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        spin(gap_s)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="idle_gap.json")
    ap.add_argument("--gaps-ms", type=float, nargs="+", default=[0.0, 0.2, 1.0, 2.0, 4.0, 6.0, 10.0])
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--calls", type=int, default=400)
    args = ap.parse_args()
    g = build_graph(args.calls, copies=16, n=4096, k=4096)
    measure(g, 0.0, 10)  # warm-up
    rows = []
    for rnd in range(2):  # two passes in alternating order: a drift in time shows as a disagreement
        for gap in (args.gaps_ms if rnd == 0 else list(reversed(args.gaps_ms))):
            t = measure(g, gap / 1e3, args.reps)
            rows.append({"pass": rnd, "gap_ms": gap, "median_ms": statistics.median(t), "min_ms": min(t),
                         "max_ms": max(t)})
            print(f"pass {rnd} gap {gap:5.1f} ms: GPU median {rows[-1]['median_ms']:.3f} ms "
                  f"(min {min(t):.3f}, max {max(t):.3f})", flush=True)
    base = statistics.median(r["median_ms"] for r in rows if r["gap_ms"] == 0.0)
    for r in rows:
        r["vs_back_to_back"] = r["median_ms"] / base
    meta = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "calls": args.calls, "shape": [4096, 4096], "reps": args.reps}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
