"""The engine on the Triton attention backend (decode through the paged split-KV kernel) gives the same
greedy tokens as the dense torch reference backend. On CPU the kernel runs under TRITON_INTERPRET=1."""

from __future__ import annotations

import torch

from specray.config import CacheConfig, EngineConfig, SchedulerConfig
from specray.engine.llm_engine import LLMEngine
from specray.engine.sampling_params import SamplingParams
from tests.support.tiny import make_checkpoint


def test_triton_backend_matches_torch_backend(tmp_path):
    path = make_checkpoint(tmp_path / "m", "mistral", max_position_embeddings=256)  # sliding window 24
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def run(backend: str):
        engine = LLMEngine(EngineConfig(
            model=str(path), device=device, dtype="float32", attention_backend=backend,
            cache=CacheConfig(page_size=8, num_pages=64),
            scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128),
        ))
        prompts = [list(range(5, 45)), [7, 8, 9], list(range(100, 120))]
        return engine.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))

    ref = [o.token_ids for o in run("torch")]
    got = [o.token_ids for o in run("triton")]
    assert got == ref
