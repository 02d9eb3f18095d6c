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
        q.put((rank, results))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_symmetric_memory_all_reduce_equals_nccl():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = 29600 + int(time.time()) % 1000
    procs = [ctx.Process(target=_reduce_worker, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=300) for _ in range(2))
    for p in procs:
        p.join(timeout=60)
    for rank, results in got.items():
        for row in results:
            if row[0] == "uses_symm":
                assert row[2], f"rank {rank}: symmetric memory not set up for {row[1]}: {row[3]}"
            elif row[0] == "eager":
                assert row[3], f"rank {rank}: {row[1]} {row[2]} differs from NCCL"
                assert row[4], f"rank {rank}: {row[1]} {row[2]} ranks hold different bits"
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
            assert len(stats["verify_graph_sizes"]) >= 2, f"{name}: replayed {stats['verify_graph_sizes']}"
            assert stats["all_reduce"] == "symmetric memory", f"{name}: {stats['all_reduce']}"
    finally:
        ray.shutdown()
