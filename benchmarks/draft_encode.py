"""The draft's context encoding on CUDA: host time against device time, and where each goes.

A retrieval refresh re-encodes the draft's working set (about 1K tokens) in one eager `forward_tokens` with
`logits_rows=[]`. This times that forward on a random Llama-3.1-8B-shaped draft of 2 layers (bf16, the
Triton backend, fused ops as the draft runs them): host seconds to queue it, device seconds (CUDA events),
and the wall time until it is done. Each is measured back to back, after the device has idled for
`--idle-ms` (a separate draft's GPU idles while the target verifies), and with a token count not seen
before at every call (a working set after each refresh). Both with the context chunks' SDPA backends
pinned (`attention.PREFILL_SDPA_BACKENDS`, the eager setting) and with SDPA free to pick any; then as the draft
runs it now, a replay of the fresh-encode CUDA graph of the length's bucket (`FreshEncodeGraphs`).
`--profile` adds torch.profiler tables of the top host and device ops.

    python3 benchmarks/draft_encode.py --out results/draft-encode --tokens 1088 --profile
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.distributed import llama8b_hf_config  # noqa: E402
from specray.engine import attention  # noqa: E402
from specray.engine.attention import TritonAttentionBackend  # noqa: E402
from specray.engine.fresh_graphs import FreshEncodeGraphs  # noqa: E402
from specray.engine.kv_cache import KVCache, KVCacheSpec, pages_needed  # noqa: E402
from specray.engine.model_runner import ModelRunner  # noqa: E402
from specray.engine.sampler import Sampler  # noqa: E402
from specray.models.arch import ModelArch  # noqa: E402
from specray.models.decoder import DecoderLM  # noqa: E402


def draft_runner(max_len: int, layers: int) -> ModelRunner:
    """The overhead section's draft shape (`distributed.llama8b_hf_config`), random bf16 weights, fused ops."""
    arch = ModelArch.from_hf_config(llama8b_hf_config(max_len, layers))
    dev = torch.device("cuda")
    model = DecoderLM.empty(arch, max_len + 1, torch.bfloat16, dev)
    g = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
    model.eval()
    model.use_fused_ops(True)
    cache = KVCache(KVCacheSpec.of(arch, 16, torch.bfloat16), 1 + pages_needed(max_len, 16), dev)
    backend = TritonAttentionBackend(cache, arch.num_heads, 1, max_len)
    return ModelRunner(model, cache, backend, Sampler(), max_len)


def encode_inputs(n: int) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Pages, token ids and positions (= cache positions) of one sequence's n-token first chunk."""
    return [list(range(1, 1 + pages_needed(n, 16)))], [[(7 * i) % 128000 for i in range(n)]], [list(range(n))]


def eager_encode(runner: ModelRunner) -> Callable[[int], None]:
    def encode(m: int) -> None:
        pages, ids, pos = encode_inputs(m)
        runner.forward_tokens(pages, ids, pos, pos, [m], logits_rows=[])
    return encode


def graphed_encode(graphs: FreshEncodeGraphs) -> Callable[[int], None]:
    def encode(m: int) -> None:
        pages, ids, _ = encode_inputs(m)
        graphs.run(pages[0], ids[0])
    return encode


def time_encode(encode: Callable[[int], None], n: int, iters: int, idle_s: float,
                fresh: bool = False) -> dict[str, float]:
    """Median host / device / wall ms of `iters` encodes of n tokens (`fresh`: n + 1, n + 2, ... tokens, a
    shape not seen before each time, as a draft's working set after each refresh)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    host, gpu, wall = [], [], []
    for it in range(iters):
        m = n + 1 + it if fresh else n
        torch.cuda.synchronize()
        if idle_s:
            time.sleep(idle_s)
        t0 = time.perf_counter()
        start.record()
        encode(m)
        end.record()
        t1 = time.perf_counter()
        end.synchronize()
        t2 = time.perf_counter()
        host.append(1e3 * (t1 - t0))
        gpu.append(start.elapsed_time(end))
        wall.append(1e3 * (t2 - t0))
    return {"host_ms": statistics.median(host), "gpu_ms": statistics.median(gpu), "wall_ms": statistics.median(wall)}


def profile_tables(runner: ModelRunner, n: int) -> dict[str, str]:
    from torch.profiler import ProfilerActivity, profile

    pages, ids, pos = encode_inputs(n)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            runner.forward_tokens(pages, ids, pos, pos, [n], logits_rows=[])
        torch.cuda.synchronize()
    ka = prof.key_averages()
    return {"by_host": ka.table(sort_by="self_cpu_time_total", row_limit=25),
            "by_device": ka.table(sort_by="self_cuda_time_total", row_limit=15)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/draft-encode")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1088])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--idle-ms", type=float, default=6.0)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "layers": args.layers, "rows": []}
    pinned = attention.PREFILL_SDPA_BACKENDS
    anyone = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    runner = draft_runner(max(args.tokens) + args.iters + 64, args.layers)
    for sdpa, backends in (("pinned", pinned), ("sdpa_default", anyone)):
        attention.PREFILL_SDPA_BACKENDS = backends
        for n in args.tokens:
            time_encode(eager_encode(runner), n, 3, 0.0)  # compile, allocate
            for idle, fresh in ((0.0, False), (args.idle_ms / 1e3, False), (0.0, True)):
                times = time_encode(eager_encode(runner), n, args.iters, idle, fresh)
                row = {"sdpa": sdpa, "tokens": n, "idle_ms": 1e3 * idle, "fresh_shapes": fresh, **times}
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
            if args.profile:
                tables = profile_tables(runner, n)
                (out / f"profile-{sdpa}-{n}.txt").write_text(tables["by_host"] + "\n\n" + tables["by_device"])
    attention.PREFILL_SDPA_BACKENDS = pinned
    # the draft's refresh as it runs now: a replay of the fresh-encode graph of the length's bucket
    t0 = time.perf_counter()
    graphs = FreshEncodeGraphs(runner, max(args.tokens) + args.iters + 1)
    result["graph_capture_s"] = time.perf_counter() - t0
    result["graph_buckets"] = len(graphs.sizes)
    for n in args.tokens:
        for idle, fresh in ((0.0, False), (args.idle_ms / 1e3, False), (0.0, True)):
            times = time_encode(graphed_encode(graphs), n, args.iters, idle, fresh)
            row = {"sdpa": "fresh_graph", "tokens": n, "idle_ms": 1e3 * idle, "fresh_shapes": fresh, **times}
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
    (out / "draft_encode.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
