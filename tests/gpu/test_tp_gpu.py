"""Tensor parallelism on 2 GPUs of one host.

- `TPAllReduce` with symmetric memory: its sums equal NCCL's bit for bit (2 ranks: a + b rounded once
  either way), every rank holds the same bits, and the same holds when the reductions are replayed from
  a CUDA graph.
- `DistributedEngine` with TP=2 (NCCL, symmetric-memory all-reduce, decode and tree-verification CUDA
  graphs replayed in lock-step on both shards) gives, in fp32, the greedy tokens of the in-process
  single-GPU `LLMEngine` without speculation (the oracle), for ngram and for a draft model with
  Cross-model Retrieval, also when the batch grows into a larger graph after a smaller one was captured
  (the followers' retrieval queries come from the replayed size); the leader replayed both sizes.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
    pytest.mark.timeout(900),
]
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")


def _reduce_worker(rank: int, port: int, q) -> None:
    import torch.distributed as dist

    from specray.models.tp_comm import TPAllReduce

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, device_id=dev)
    try:
        results = []
        for dtype in (torch.bfloat16, torch.float32):
            red = TPAllReduce(None, dtype=dtype, device=dev, symmetric_memory=True, max_bytes=1 << 20)
            results.append(("uses_symm", str(dtype), red.uses_symmetric_memory, red.fallback_reason))
            g = torch.Generator(device=dev).manual_seed(100 + rank)
            for shape in ((1, 4096), (5, 4096), (69, 1536), (300, 1024)):  # the last is over max_bytes (NCCL)
                x = torch.randn(*shape, device=dev, generator=g).to(dtype)
                ref = x.clone()
                dist.all_reduce(ref)
                out = red(x.clone())
                gathered = [torch.empty_like(out) for _ in range(2)]
                dist.all_gather(gathered, out)
                results.append(("eager", str(dtype), shape, torch.equal(out, ref), torch.equal(*gathered)))
            # ten dependent reductions captured in one graph, replayed on fresh input
            x = torch.randn(5, 4096, device=dev, generator=g).to(dtype) * 0.1
            static = x.clone()

            def chain(t, red=red):
                for _ in range(10):
                    t = red(t) * 0.5
                return t

            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                chain(static.clone())
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out_g = chain(static)
            fresh = torch.randn(5, 4096, device=dev, generator=g).to(dtype) * 0.1
            static.copy_(fresh)
            dist.barrier()
            graph.replay()
            torch.cuda.synchronize()
            ref = fresh.clone()
            for _ in range(10):
                dist.all_reduce(ref)
                ref = ref * 0.5
            results.append(("graph", str(dtype), torch.equal(out_g, ref)))
            for push in (True, False):
                results += _fused_norm_checks(rank, dtype, dev, push)
        q.put((rank, results))
        dist.barrier()
    except Exception:  # the parent reports it at once instead of waiting for a result that never comes
        import traceback

        q.put((rank, [("error", traceback.format_exc())]))
        raise
    finally:
        dist.destroy_process_group()


def _fused_norm_checks(rank: int, dtype: torch.dtype, dev: torch.device, push: bool) -> list[tuple]:
    """The fused all-reduce + add + RMSNorm (push or pull protocol) against NCCL followed by the unfused
    `add_rms_norm` kernel: eagerly for several row counts and both regions, then 16 dependent calls (alternating
    regions, no other kernel between them) captured in one graph and replayed 50 times; in bf16 also one-row
    partials written by the GEMV's push epilogue."""
    import torch.distributed as dist

    from specray.kernels import fused
    from specray.kernels.gemv import choose_config, gemv
    from specray.models.tp_comm import PendingSum, TPAllReduce
    from tests.support.fused_chain import replay_in_graph, within_a_norm_rounding

    red = TPAllReduce(None, dtype=dtype, device=dev, symmetric_memory=True, max_bytes=1 << 20, fuse_norm=True,
                      push=push)
    mode = f"{dtype} {'push' if push else 'pull'}"
    out_rows: list[tuple] = [("fuses", mode, red.fuses_norm, red.fuse_reason)]
    H, eps = 4096, 1e-5
    common = torch.Generator(device=dev).manual_seed(7)  # the same on both ranks
    own = torch.Generator(device=dev).manual_seed(200 + rank)
    w = (1 + 0.3 * torch.randn(H, device=dev, generator=common)).to(dtype)
    max_rows = (1 << 20) // (H * w.element_size())

    def unfused(partial, resid):
        s = partial.clone()
        dist.all_reduce(s)
        return fused.add_rms_norm(s, resid, w, eps)

    for rows in (1, 5, min(69, max_rows - 1), max_rows):  # fp32: 64 rows fit 1 MB
        for site in (0, 1, 0):
            partial = torch.randn(rows, H, device=dev, generator=own).to(dtype)
            resid = torch.randn(rows, H, device=dev, generator=common).to(dtype)
            ref_out, ref_res = unfused(partial, resid.clone())
            part = red.partial_region(site, rows, H)
            part.copy_(partial)
            red.publish(site, part)
            out, res = PendingSum(red, site, part).reduce_norm(resid.clone(), w, eps)
            both = [torch.empty_like(out) for _ in range(2)]
            dist.all_gather(both, out)
            out_rows.append(("fused", mode, rows, site, torch.equal(res, ref_res),
                             within_a_norm_rounding(out, ref_out), torch.equal(*both)))
    if dtype == torch.bfloat16 and push:  # the O / down GEMV at TP=2 shapes, pushing from its epilogue
        for k in (2048, 7168):
            weight = (torch.randn(H, k, device=dev, generator=own) * k**-0.5).to(dtype)
            cfg = choose_config(H, k)
            gated = k == 7168  # down: silu(gate) * up inside the GEMV
            for site in (0, 1, 0):
                x = torch.randn(1, 2 * k if gated else k, device=dev, generator=own).to(dtype)
                resid = torch.randn(1, H, device=dev, generator=common).to(dtype)
                ref_out, ref_res = unfused(gemv(fused.silu_mul(x) if gated else x, weight, cfg), resid.clone())
                part = gemv(x, weight, cfg, out=red.partial_region(site, 1, H), push=red.push_tables[site],
                            gated=gated)
                out, res = PendingSum(red, site, part).reduce_norm(resid.clone(), w, eps)
                both = [torch.empty_like(out) for _ in range(2)]
                dist.all_gather(both, out)
                out_rows.append(("fused", f"{mode} gemv K={k}", 1, site, torch.equal(res, ref_res),
                                 within_a_norm_rounding(out, ref_out), torch.equal(*both)))

    rows, scale = 5, 0.5 + rank  # each rank scales its partial differently

    def chain(h, resid, reference):
        for i in range(16):
            if reference:
                h, resid = unfused(h * scale, resid)
            else:
                part = red.partial_region(i % 2, rows, H)
                torch.mul(h, scale, out=part)
                red.publish(i % 2, part)
                h, resid = PendingSum(red, i % 2, part).reduce_norm(resid, w, eps)
        return h

    h0 = torch.randn(rows, H, device=dev, generator=common).to(dtype)
    r0 = torch.randn(rows, H, device=dev, generator=common).to(dtype)
    out_g = replay_in_graph(lambda h, r: chain(h, r, False), h0, r0, replays=50)
    ref = chain(h0.clone(), r0.clone(), True)
    out_rows.append(("fused_graph", mode, within_a_norm_rounding(out_g, ref)))
    return out_rows


def test_symmetric_memory_all_reduce_equals_nccl():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = 29600 + int(time.time()) % 1000
    procs = [ctx.Process(target=_reduce_worker, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = {}
    for _ in range(2):
        rank, rows = q.get(timeout=300)
        got[rank] = rows
        if rows and rows[0][0] == "error":  # its peer may now wait in a collective forever
            break
    for p in procs:
        p.join(timeout=60 if len(got) == 2 else 5)
        if p.is_alive():
            p.kill()
    for rank, results in got.items():
        for row in results:
            assert row[0] != "error", f"rank {rank} failed:\n{row[1]}"
            if row[0] == "uses_symm":
                assert row[2], f"rank {rank}: symmetric memory not set up for {row[1]}: {row[3]}"
            elif row[0] == "eager":
                assert row[3], f"rank {rank}: {row[1]} {row[2]} differs from NCCL"
                assert row[4], f"rank {rank}: {row[1]} {row[2]} ranks hold different bits"
            elif row[0] == "fuses":
                assert row[2], f"rank {rank}: no fused all-reduce + RMSNorm for {row[1]}: {row[3]}"
            elif row[0] == "fused":
                assert row[4], f"rank {rank}: {row[1]} rows {row[2]} site {row[3]}: the residual sum differs"
                assert row[5], f"rank {rank}: {row[1]} rows {row[2]} site {row[3]}: the norm differs"
                assert row[6], f"rank {rank}: {row[1]} rows {row[2]}: ranks hold different bits"
            else:
                assert row[2], f"rank {rank}: {row[1]} graph replay differs from NCCL"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tests.support.tiny import make_checkpoint, perturbed_copy

    root = tmp_path_factory.mktemp("tp_gpu")
    # head_dim 32, 8 q / 4 kv heads: each rank holds 4 / 2
    target = make_checkpoint(root / "t", "qwen2", vocab_size=128, tokenizer=False, hidden_size=256,
                             intermediate_size=512, num_attention_heads=8, num_key_value_heads=4)
    return target, perturbed_copy(target, root / "d", scale=0.3, num_hidden_layers=1)


def _config(target, tp, spec=None):
    from specray.config import CacheConfig, EngineConfig, SchedulerConfig

    return EngineConfig(
        model=str(target), device="cuda", dtype="float32", skip_tokenizer_init=True, cuda_graph_batch_sizes=(1, 2, 4),
        cache=CacheConfig(page_size=16, num_pages=128), tensor_parallel_size=tp,
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=128, max_model_len=400),
        speculative_config=spec,
    )


def test_tp2_graphed_verification_equals_single_gpu_ar(models):
    ray = pytest.importorskip("ray")
    from specray.actors.engine import DistributedEngine
    from specray.config import RetrievalConfig, SpeculativeConfig, TreeConfig
    from specray.engine.llm_engine import LLMEngine
    from specray.engine.sampling_params import SamplingParams

    torch.backends.cuda.matmul.allow_tf32 = False
    target, draft = models
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (150, 90, 121)]
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    ref = [o.token_ids for o in LLMEngine(_config(target, 1)).generate(prompts, params)]
    specs = {
        "ar": None,  # plain decode: the decode graphs, their page tables sent to the follower as deltas
        "ngram": SpeculativeConfig(method="ngram", num_speculative_tokens=4),
        "draft_retrieval": SpeculativeConfig(
            method="draft_model", model=str(draft), tree=TreeConfig(kind="chain", length=4),
            retrieval=RetrievalConfig(chunk_size=8, top_k_chunks=4), draft_placement="separate",
            draft_gpu_fraction=0.5),
    }
    ray.init(num_gpus=2, include_dashboard=False)
    try:
        for name, spec in specs.items():
            engine = DistributedEngine(_config(target, 2, spec))
            try:
                # one request first (the batch-1 graph is captured), then all three: the batch grows into a
                # larger graph, whose retrieval queries the followers must read from the replayed size
                first = [o.token_ids for o in engine.generate(prompts[:1], params)]
                outs = [o.token_ids for o in engine.generate(prompts, params)]
                stats = engine.stats()
            finally:
                engine.shutdown()
            assert first == ref[:1] and outs == ref, name
            if spec is None:
                assert stats["decode"]["num_replays"] >= 64, f"{name}: {stats['decode']}"
                assert stats["async"]["ahead_used"] >= 32, f"{name}: {stats['async']}"  # replay_ahead plans
            else:
                assert len(stats["verify_graph_sizes"]) >= 2, f"{name}: replayed {stats['verify_graph_sizes']}"
            assert stats["all_reduce"] == "symmetric memory", f"{name}: {stats['all_reduce']}"
            assert stats["all_reduce_rmsnorm"] == "fused", f"{name}: {stats['all_reduce_rmsnorm']}"
    finally:
        ray.shutdown()
