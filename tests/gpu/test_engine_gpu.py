"""On CUDA: the engine with the Triton decode kernel and CUDA graphs equals HF `generate()` (fp32), and a
padded graph batch equals solo runs."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from specray.config import CacheConfig, EngineConfig, SchedulerConfig
from specray.engine.llm_engine import LLMEngine
from specray.engine.sampling_params import SamplingParams
from tests.support.tiny import make_checkpoint
from tests.unit.test_async_scheduling import _scripted_run


def _engine(path, **kw):
    return LLMEngine(EngineConfig(
        model=str(path), device="cuda", dtype="float32", cuda_graph_batch_sizes=(1, 2, 4, 8),
        cache=CacheConfig(page_size=16, num_pages=256),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=512), **kw,
    ))


def test_cuda_graph_greedy_matches_hf(tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    path = make_checkpoint(tmp_path / "m", "llama")
    engine = _engine(path)
    assert engine.runner.graphs, "CUDA graphs were not captured"
    prompts = [list(range(5, 60)), [9, 10, 11], list(range(30, 230))]
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    for p, o in zip(prompts, outs, strict=True):
        ref = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=64, min_new_tokens=64,
                          do_sample=False, pad_token_id=0, eos_token_id=None)[0, len(p):].tolist()
        assert o.token_ids == ref
    solo = [_engine(path).generate([p], SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))[0]
            for p in prompts]
    assert [o.token_ids for o in solo] == [o.token_ids for o in outs]
    assert engine.pages_in_use() == 0


def test_async_scheduling_on_graphs_equals_sync(tmp_path):
    """Steps launched ahead through the graphs (staging buffers reused while a step is in flight): the same
    tokens as without async scheduling, through stops on a token, an abort, arrivals and a sampled request."""
    torch.backends.cuda.matmul.allow_tf32 = False
    path = make_checkpoint(tmp_path / "m", "llama")
    sync = _engine(path, async_scheduling=False)
    stop = _scripted_run(sync, stop_token=-1)["b"][5]
    ref = _scripted_run(_engine(path, async_scheduling=False), stop)
    engine = _engine(path, async_scheduling=True)
    assert _scripted_run(engine, stop) == ref
    assert engine.async_stats["ahead_used"] > 10 and engine.runner.decode_timings["num_replays"] > 10
    assert engine.pages_in_use() == 0
