"""Launch-parameter sweep of the split-KV paged decode attention kernel for few KV heads per GPU.

What it measures: the GPU time of one ``specray.kernels.paged_decode.PagedDecodeAttention.run`` call
(split kernel + merge kernel) at batch 1, context 32768, head_dim 128, bf16, engine page size
(``CacheConfig.page_size``, 16), for Llama-3.1-8B attention shapes per tensor-parallel rank:
16 q / 4 kv heads (TP=2) and 32 q / 8 kv heads (TP=1). It sweeps the number of KV splits, block_n,
num_warps and num_stages to find a better split rule than ``choose_num_splits`` when there are few
KV heads (so few (sequence, kv head) programs) per GPU.

Method:
  * One random paged KV cache (normal values) with a random page permutation, so a sequence's pages
    are not contiguous; page tables int32. The cache holds ``--layers`` disjoint copies of the context
    ("layers", separate pages; by default enough to exceed L2 several times over) and consecutive calls
    rotate through them, so a call does not read KV left in L2 by the previous one (as in a real model).
  * Per config: build the kernel, run it once (compiles outside any capture), check the output and LSE
    against ``specray.kernels.reference.paged_decode_reference`` (fp32 dense, computed once per head
    shape; every config is compared, which costs nothing extra), then capture ``--iters`` calls in ONE
    CUDA graph and time 5 replays; us/call = median replay time / iters (launch overhead excluded).
  * Bandwidth = KV bytes read (batch * context * Hkv * head_dim * 2 (K and V) * 2 bytes) / time, in TB/s,
    and as a fraction of the device-to-device copy bandwidth (2 GiB bf16 copy, bytes read + written,
    median of 10) measured once at the start.
  * Grid: phase 1 sweeps splits x block_n at the constructor's default warps/stages; phase 2 sweeps
    warps x stages for the 3 best (splits, block_n) pairs of each head shape (``--full-product``: the
    whole splits x block_n x warps x stages product instead). ``--splits`` always gets the default
    ``choose_num_splits(batch, Hkv, context, num_sms)`` added. Configs that fail to compile or launch
    (e.g. out of shared memory / registers) are recorded as skipped with the error string.

Output: one table per head shape sorted by time (top 10 plus the current default's row, marked *),
and all rows (plus skipped ones, device name, SM count, L2 size, torch/triton versions, date) in --out.

GPU (about 2-3 minutes on an H100/H200 with the default grid, mostly Triton compiles):

    python benchmarks/decode_splits.py --out $OUT/decode_splits.json

CPU check of the code path (Triton interpreter, context 256, one config, no CUDA graphs, torch timer):

    TRITON_INTERPRET=1 python benchmarks/decode_splits.py --cpu-smoke
"""

from __future__ import annotations

import os
import sys

if "--cpu-smoke" in sys.argv:  # must precede the first Triton import: @triton.jit reads it at decoration
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import inspect  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specray.config import CacheConfig  # noqa: E402
from specray.kernels.paged_decode import PagedDecodeAttention, choose_num_splits  # noqa: E402
from specray.kernels.reference import paged_decode_reference  # noqa: E402

DTYPE = torch.bfloat16
HEAD_DIM = 128
DEFAULT_SPLITS = (16, 24, 32, 48, 64, 80, 99, 128, 160, 198, 256)
REPLAYS = 5
TOP_PAIRS = 3  # phase 2: warps x stages for this many best (splits, block_n) pairs per head shape
# bf16 inputs, fp32 accumulation, p rounded to bf16 before P@V, bf16 output: output errors are ~2e-3 of
# the output scale; the LSE (fp32 scores of the same bf16 inputs) should agree to ~1e-5, and a split that
# drops 1/256 of the keys would move it by ~4e-3, so its tolerance is the sharper test.
OUT_TOL = 1e-2  # max |out - ref| / max |ref|
LSE_TOL = 2e-3  # max |lse - ref_lse| (natural log)


@dataclass
class Inputs:
    """One head shape's paged cache (``layers`` disjoint contexts), query, outputs and fp32 reference."""

    hq: int
    hkv: int
    q: torch.Tensor  # [B, Hq, D]
    k: torch.Tensor  # [num_pages, page_size, Hkv, D]
    v: torch.Tensor
    tables: list[torch.Tensor]  # per layer [B, P] int32, random distinct pages
    lens: torch.Tensor  # [B] int32
    out: torch.Tensor  # [B, Hq, D] preallocated destination
    lse: torch.Tensor  # [B, Hq] fp32
    ref_out: torch.Tensor
    ref_lse: torch.Tensor
    kv_bytes: int  # K and V bytes one call reads

    @property
    def scale(self) -> float:
        return self.q.shape[-1] ** -0.5


def parse_heads(text: str) -> tuple[int, int]:
    """'16:4' -> (16, 4)."""
    try:
        hq, hkv = (int(x) for x in text.split(":"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected Hq:Hkv, got {text!r}") from e
    if hkv < 1 or hq % hkv:
        raise argparse.ArgumentTypeError(f"Hq must be a positive multiple of Hkv, got {text!r}")
    return hq, hkv


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=32768, help="KV tokens per sequence")
    p.add_argument("--heads", type=parse_heads, nargs="+", default=[(16, 4), (32, 8)], help="Hq:Hkv pairs")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=HEAD_DIM)
    p.add_argument("--page-size", type=int, default=CacheConfig().page_size, help="default: the engine's")
    p.add_argument("--splits", type=int, nargs="+", default=list(DEFAULT_SPLITS), help="+ choose_num_splits")
    p.add_argument("--block-n", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--iters", type=int, default=200, help="calls captured in one CUDA graph")
    p.add_argument("--layers", type=int, default=0, help="disjoint KV copies to rotate through (0: auto)")
    p.add_argument("--full-product", action="store_true", help="sweep splits x block_n x warps x stages")
    p.add_argument("--top", type=int, default=10, help="rows per printed table")
    p.add_argument("--out", type=Path, default=None, help="JSON path for all rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu-smoke", action="store_true", help="Triton interpreter on CPU, tiny shapes, one config")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.context, args.heads, args.batch, args.iters = 256, [(16, 4)], 1, 3
        args.splits, args.block_n, args.warps, args.stages = [2], [64], [4], [2]
    return args


def kernel_defaults(head_dim: int) -> dict[str, int]:
    """The constructor's default block_n / num_warps / num_stages (read from the class, not copied)."""
    params = inspect.signature(PagedDecodeAttention.__init__).parameters
    probe = PagedDecodeAttention(1, 1, 1, head_dim, 1, "cpu")  # resolves block_n=None
    return {"block_n": probe.block_n, "num_warps": params["num_warps"].default,
            "num_stages": params["num_stages"].default}  # fmt: skip


def device_info(device: torch.device) -> dict[str, object]:
    if device.type != "cuda":
        return {"name": platform.processor() or "cpu", "num_sms": 8, "l2_bytes": 0}
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "num_sms": props.multi_processor_count, "l2_bytes": getattr(props, "L2_cache_size", 0)}


def copy_bandwidth(device: torch.device, nbytes: int, iters: int = 10) -> float:
    """Bytes/s of a device-to-device copy of ``nbytes`` (bf16), counting bytes read plus written (median)."""
    src = torch.empty(nbytes // 2, dtype=DTYPE, device=device).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    times = [timed(lambda: dst.copy_(src), device) for _ in range(iters)]
    return 2 * nbytes / statistics.median(times)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one fn() call: CUDA events on a GPU, the wall clock on CPU."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1e3


def auto_layers(kv_bytes: int, l2_bytes: int, free_bytes: int) -> int:
    """Enough disjoint KV copies to exceed L2 about 4x (at least 256 MiB in all), within half the free memory."""
    want = math.ceil(max(4 * l2_bytes, 256 << 20) / kv_bytes)
    return max(1, min(16, want, free_bytes // 2 // kv_bytes))


def build_inputs(args: argparse.Namespace, hq: int, hkv: int, device: torch.device, layers: int) -> Inputs:
    """Random paged cache (random page permutation), query, int32 page tables, and the fp32 reference."""
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    b, d, ctx, ps = args.batch, args.head_dim, args.context, args.page_size
    pages_per_seq = -(-ctx // ps)
    num_pages = layers * b * pages_per_seq
    perm = torch.randperm(num_pages, generator=gen).to(torch.int32)
    tables = [t.contiguous().to(device) for t in perm.view(layers, b, pages_per_seq).unbind(0)]
    k = torch.empty(num_pages, ps, hkv, d, dtype=DTYPE, device=device).normal_()
    v = torch.empty_like(k).normal_()
    q = torch.randn(b, hq, d, generator=gen).to(DTYPE).to(device)
    lens = torch.full((b,), ctx, dtype=torch.int32, device=device)
    ref_out, ref_lse = paged_decode_reference(q, k, v, tables[0], lens, d**-0.5)
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, dtype=torch.float32, device=device)
    kv_bytes = b * ctx * hkv * d * 2 * k.element_size()
    return Inputs(hq, hkv, q, k, v, tables, lens, out, lse, ref_out.float(), ref_lse, kv_bytes)


def check(inp: Inputs) -> dict[str, float | bool]:
    """Errors of the last layer-0 call's output/LSE against the fp32 reference."""
    out_err = ((inp.out.float() - inp.ref_out).abs().max() / inp.ref_out.abs().max().clamp_min(1e-30)).item()
    lse_err = (inp.lse - inp.ref_lse).abs().max().item()
    return {"out_rel_err": out_err, "lse_abs_err": lse_err, "ok": out_err <= OUT_TOL and lse_err <= LSE_TOL}


def time_graph(call: Callable[[int], object], iters: int) -> float:
    """Seconds per call: ``iters`` calls captured in one CUDA graph, median of REPLAYS replays / iters."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for i in range(iters):
            call(i)
    graph.replay()  # warm-up
    times = [timed(graph.replay, torch.device("cuda")) for _ in range(REPLAYS)]
    del graph
    return statistics.median(times) / iters


def time_eager_cpu(call: Callable[[int], object], iters: int) -> float:
    """Seconds per call on CPU (interpreter): torch.utils.benchmark's timer, no graphs."""
    from torch.utils.benchmark import Timer

    return Timer("call(0)", globals={"call": call}).timeit(iters).median


def measure(inp: Inputs, cfg: dict[str, int], args: argparse.Namespace, device: torch.device) -> dict:
    """One config: construct, first run (compile) + correctness check, then timing. Errors -> skipped row."""
    row: dict = {"hq": inp.hq, "hkv": inp.hkv, **cfg, "programs": args.batch * inp.hkv * cfg["splits"]}
    try:
        att = PagedDecodeAttention(
            args.batch, inp.hq, inp.hkv, args.head_dim, cfg["splits"], device,
            block_n=cfg["block_n"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )  # fmt: skip

        def call(i: int) -> object:
            layer = inp.tables[i % len(inp.tables)]
            return att.run(inp.q, inp.k, inp.v, layer, inp.lens, inp.scale, out=inp.out, lse_out=inp.lse)

        t0 = time.perf_counter()
        call(0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        row["first_call_s"] = time.perf_counter() - t0  # compile (or disk-cache load) + one run
        row |= check(inp)
        t = time_graph(call, args.iters) if device.type == "cuda" else time_eager_cpu(call, args.iters)
    except Exception as e:  # noqa: BLE001 -- out of shared memory / registers, compile errors: record, go on
        return row | {"skipped": f"{type(e).__name__}: {e}"[:500]}
    return row | {"us": t * 1e6, "tbps": inp.kv_bytes / t / 1e12}


def phase1_grid(args: argparse.Namespace, splits: list[int], defaults: dict[str, int]) -> list[dict[str, int]]:
    """splits x block_n at the default warps/stages (the whole product with --full-product)."""
    block_ns = sorted(set(args.block_n) | {defaults["block_n"]})
    warps, stages = [defaults["num_warps"]], [defaults["num_stages"]]
    if args.full_product:
        warps, stages = sorted(set(args.warps) | set(warps)), sorted(set(args.stages) | set(stages))
    return [
        {"splits": s, "block_n": bn, "num_warps": w, "num_stages": st}
        for s, bn, w, st in itertools.product(splits, block_ns, warps, stages)
    ]


def phase2_grid(args: argparse.Namespace, done: list[dict]) -> list[dict[str, int]]:
    """warps x stages for the TOP_PAIRS fastest (splits, block_n) pairs of phase 1, minus configs already run."""
    ok = sorted((r for r in done if "us" in r), key=lambda r: r["us"])
    pairs: list[tuple[int, int]] = []
    for r in ok:
        if (r["splits"], r["block_n"]) not in pairs:
            pairs.append((r["splits"], r["block_n"]))
    seen = {(r["splits"], r["block_n"], r["num_warps"], r["num_stages"]) for r in done}
    return [
        {"splits": s, "block_n": bn, "num_warps": w, "num_stages": st}
        for (s, bn), w, st in itertools.product(pairs[:TOP_PAIRS], args.warps, args.stages)
        if (s, bn, w, st) not in seen
    ]


def run_grid(inp: Inputs, grid: list[dict[str, int]], args: argparse.Namespace, device: torch.device,
             copy_bw: float, phase: int) -> list[dict]:  # fmt: skip
    rows = []
    for cfg in grid:
        row = measure(inp, cfg, args, device) | {"phase": phase}
        if "us" in row:
            row["copy_frac"] = row["tbps"] * 1e12 / copy_bw
        rows.append(row)
        tag = f"S={cfg['splits']:>3} bn={cfg['block_n']:>3} w={cfg['num_warps']} st={cfg['num_stages']}"
        if "us" in row:
            bad = "" if row["ok"] else f"  CHECK FAILED out {row['out_rel_err']:.2e} lse {row['lse_abs_err']:.2e}"
            print(f"  {inp.hq}:{inp.hkv} {tag}: {row['us']:8.2f} us {row['tbps']:5.2f} TB/s "
                  f"({row['first_call_s']:.1f} s first call){bad}", flush=True)  # fmt: skip
        else:
            print(f"  {inp.hq}:{inp.hkv} {tag}: skipped ({row['skipped'][:100]})", flush=True)
    return rows


def sweep_shape(args: argparse.Namespace, hq: int, hkv: int, device: torch.device, info: dict,
                copy_bw: float, defaults: dict[str, int]) -> list[dict]:  # fmt: skip
    """Both phases for one head shape; marks the default config's row."""
    default_splits = choose_num_splits(args.batch, hkv, args.context, num_sms=info["num_sms"])
    splits = sorted(set(args.splits) | {default_splits})
    kv_bytes = args.batch * args.context * hkv * args.head_dim * 2 * 2
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 1 << 30
    layers = args.layers or auto_layers(kv_bytes, info["l2_bytes"], free)
    print(f"\n{hq}:{hkv}: default S={default_splits}, {layers} layer(s) of {kv_bytes / 2**20:.0f} MiB", flush=True)
    inp = build_inputs(args, hq, hkv, device, layers)
    rows = run_grid(inp, phase1_grid(args, splits, defaults), args, device, copy_bw, phase=1)
    if not args.full_product:
        rows += run_grid(inp, phase2_grid(args, rows), args, device, copy_bw, phase=2)
    default_cfg = {"splits": default_splits, **defaults}
    for r in rows:
        r["is_default"] = all(r[k] == v for k, v in default_cfg.items())
        r["layers"] = layers
    del inp
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict], hq: int, hkv: int, top: int) -> None:
    """Fastest ``top`` rows of one head shape, plus the default's row (marked *), and a count of skips."""
    ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
    default = next((r for r in ok if r["is_default"]), None)
    shown = ok[:top] + ([default] if default is not None and default not in ok[:top] else [])
    header = ["rank", "splits", "block_n", "warps", "stages", "programs", "us", "TB/s", "% copy", "vs default", "check"]
    lines = []
    for r in shown:
        speed = f"{default['us'] / r['us']:.3f}x" if default else "-"
        lines.append([f"{ok.index(r) + 1}{'*' if r['is_default'] else ''}", r["splits"], r["block_n"],
                      r["num_warps"], r["num_stages"], r["programs"], f"{r['us']:.2f}", f"{r['tbps']:.3f}",
                      f"{100 * r['copy_frac']:.1f}", speed, "ok" if r["ok"] else "FAIL"])  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=True)]
    print(f"\nHq={hq} Hkv={hkv}: {len(ok)} configs timed, {len(rows) - len(ok)} skipped (* = current default)")
    for line in [header, *lines]:
        print("  ".join(str(x).rjust(w) for x, w in zip(line, widths, strict=True)))


def write_json(path: Path, args: argparse.Namespace, info: dict, copy_bw: float, defaults: dict,
               rows: list[dict]) -> None:  # fmt: skip
    meta = {
        "device": info, "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "argv": sys.argv,
        "copy_bw_bytes_per_s": copy_bw, "kernel_defaults": defaults, "dtype": str(DTYPE),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\nwrote {len(rows)} rows to {path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        sys.exit("no CUDA device: run with --cpu-smoke (TRITON_INTERPRET=1) to check the code path")
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    info = device_info(device)
    copy_bw = copy_bandwidth(device, 64 << 20 if args.cpu_smoke else 2 << 30)
    defaults = kernel_defaults(args.head_dim)
    print(f"{info['name']}: {info['num_sms']} SMs, copy {copy_bw / 1e12:.3f} TB/s (read + written); "
          f"kernel defaults {defaults}; ctx {args.context}, batch {args.batch}, page {args.page_size}")  # fmt: skip
    rows: list[dict] = []
    for hq, hkv in args.heads:
        shape_rows = sweep_shape(args, hq, hkv, device, info, copy_bw, defaults)
        print_table(shape_rows, hq, hkv, args.top)
        rows += shape_rows
    if args.out is not None:
        write_json(args.out, args, info, copy_bw, defaults, rows)
    failed = [r for r in rows if "us" in r and not r["ok"]]
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; {len(failed)} config(s) failed the reference check")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
