"""On CUDA: the captured fresh-encode graphs (flash / memory-efficient causal SDPA, the Triton backend, fused
RoPE + K/V store) write the K/V that the engine's eager encode writes (masked memory-efficient SDPA), for
lengths inside, at and past a bucket's end, and nothing past the sequence except into the scratch page."""

from __future__ import annotations

import pytest
import torch

from specray.config import CacheConfig, EngineConfig, SchedulerConfig
from specray.engine.fresh_graphs import FreshEncodeGraphs
from specray.engine.llm_engine import LLMEngine
from tests.support.fresh_encode import check_against_eager
from tests.support.tiny import make_checkpoint


@pytest.mark.parametrize(("dtype", "tol"), [("float32", 2e-4), ("bfloat16", 3e-2)])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_captured_fresh_encode_equals_eager(tmp_path, family, dtype, tol):
    torch.backends.cuda.matmul.allow_tf32 = False
    path = make_checkpoint(tmp_path / "m", family, tokenizer=False, max_position_embeddings=512)
    engine = LLMEngine(EngineConfig(
        model=str(path), device="cuda", dtype=dtype, skip_tokenizer_init=True, cuda_graph_batch_sizes=(1,),
        cache=CacheConfig(page_size=16, num_pages=40),
        scheduler=SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=512, max_model_len=512),
    ))
    fresh = FreshEncodeGraphs(engine.runner, max_tokens=200, step=64)
    assert set(fresh.graphs) == {64, 128, 192, 200}
    check_against_eager(engine.runner, fresh, [1, 50, 64, 65, 199, 200], atol=tol, rtol=tol)
    assert fresh.num_runs == 6
