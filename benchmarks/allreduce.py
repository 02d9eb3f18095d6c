"""Small all-reduce latency between the GPUs of one host, as tensor-parallel decode issues it: one
[batch, hidden] bf16 activation per all-reduce, 65 of them back to back inside one CUDA graph (the 2
per layer of a 32-layer model, plus the embedding), replayed and timed; µs per all-reduce.

Contenders, side by side in one run: NCCL (`dist.all_reduce`) and PyTorch symmetric memory
(`torch.ops.symm_mem.one_shot_all_reduce_out` and `two_shot_all_reduce_`, peer loads over NVLink; no
multicast). Each result is checked against the NCCL sum. Command (2 GPUs):

    python3 benchmarks/allreduce.py --out allreduce.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")


def _graph_time(fn, reps: int = 20) -> float:
    """Median ms of one replay of a graph holding `fn()`."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(reps):
        dist.barrier()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def _worker(rank: int, world: int, port: int, args, q) -> None:
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=dev)
    group = dist.group.WORLD
    n_ops = args.ops
    rows = []
    for tokens in args.tokens:
        numel = tokens * args.hidden
        x = torch.randn(numel, device=dev, dtype=torch.bfloat16) * (rank + 1)
        ref = x.clone()
        dist.all_reduce(ref, group=group)
        row = {"tokens": tokens, "bytes": numel * 2}

        nccl_buf = x.clone()

        def nccl(nccl_buf=nccl_buf) -> None:
            for _ in range(n_ops):
                dist.all_reduce(nccl_buf, group=group)

        try:
            row["nccl_us"] = 1e3 * _graph_time(nccl) / n_ops
        except Exception as e:  # noqa: BLE001 - report, go on
            row["nccl_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        try:
            import torch.distributed._symmetric_memory as symm_mem

            if hasattr(symm_mem, "enable_symm_mem_for_group"):
                symm_mem.enable_symm_mem_for_group(group.group_name)
            buf = symm_mem.empty(numel, dtype=torch.bfloat16, device=dev)
            symm_mem.rendezvous(buf, group.group_name)
            out = torch.empty_like(buf)
            buf.copy_(x)
            torch.ops.symm_mem.one_shot_all_reduce_out(buf, "sum", group.group_name, out)
            torch.cuda.synchronize()
            row["one_shot_max_err"] = (out.float() - ref.float()).abs().max().item()

            def one_shot(buf=buf, out=out) -> None:
                for _ in range(n_ops):
                    buf.copy_(out)  # the activation lands in the symmetric buffer first
                    torch.ops.symm_mem.one_shot_all_reduce_out(buf, "sum", group.group_name, out)

            row["one_shot_us"] = 1e3 * _graph_time(one_shot) / n_ops
            buf.copy_(x)
            torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", group.group_name)
            torch.cuda.synchronize()
            row["two_shot_max_err"] = (buf.float() - ref.float()).abs().max().item()

            def two_shot(buf=buf) -> None:
                for _ in range(n_ops):
                    torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", group.group_name)

            row["two_shot_us"] = 1e3 * _graph_time(two_shot) / n_ops
        except Exception as e:  # noqa: BLE001
            row["symm_mem_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
    if rank == 0:
        q.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="allreduce.json")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 5, 8, 64])
    ap.add_argument("--ops", type=int, default=65)
    ap.add_argument("--world", type=int, default=min(2, torch.cuda.device_count()))
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = 29500 + int(time.time()) % 1000
    procs = [ctx.Process(target=_worker, args=(r, args.world, port, args, q)) for r in range(args.world)]
    for p in procs:
        p.start()
    rows = q.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
    meta = {"device": torch.cuda.get_device_name(), "world": args.world, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "ops_per_graph": args.ops}
    with open(args.out, "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=2)
    print(json.dumps(meta))
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
