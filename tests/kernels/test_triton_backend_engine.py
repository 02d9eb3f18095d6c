"""The engine on the Triton attention backend (decode through the paged split-KV kernel), with and without
the fused Triton norm/RoPE/SiLU ops, gives the same greedy tokens as the dense torch reference backend.
On CPU the kernels run under TRITON_INTERPRET=1."""

from __future__ import annotations

import pytest
import torch

from specray.config import CacheConfig, EngineConfig, SchedulerConfig
from specray.engine.llm_engine import LLMEngine
from specray.engine.sampling_params import SamplingParams
from tests.support.tiny import make_checkpoint


@pytest.mark.parametrize("family", ["mistral", "qwen3"])  # sliding window; q/k norm
def test_triton_backend_and_fused_ops_match_torch_backend(tmp_path, family):
    path = make_checkpoint(tmp_path / "m", family, max_position_embeddings=256)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def run(backend: str, fused: bool):
        engine = LLMEngine(EngineConfig(
            model=str(path), device=device, dtype="float32", attention_backend=backend, fused_ops=fused,
            cache=CacheConfig(page_size=8, num_pages=64),
            scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128),
        ))
        engine.model.use_fused_ops(fused)  # on CPU too (interpreter)
        prompts = [list(range(5, 45)), [7, 8, 9], list(range(100, 120))]
        return [o.token_ids for o in engine.generate(prompts, SamplingParams(temperature=0, max_tokens=12,
                                                                             ignore_eos=True))]

    ref = run("torch", False)
    assert run("triton", False) == ref
    assert run("triton", True) == ref


def test_speculative_steps_on_the_triton_backend_equal_ar(tmp_path):
    """Tree verification and tree drafting through Hybrid Tree Attention give AR's greedy tokens."""
    from specray.config import SpeculativeConfig, TreeConfig
    from tests.support.tiny import perturbed_copy

    target = make_checkpoint(tmp_path / "t", "qwen2", vocab_size=128, max_position_embeddings=256, tokenizer=False)
    draft = perturbed_copy(target, tmp_path / "d", scale=0.3, num_hidden_layers=1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prompts = [list(range(5, 45)), [7, 8, 9, 7, 8, 9, 7, 8], list(range(100, 120))]

    def run(backend: str, spec):
        engine = LLMEngine(EngineConfig(
            model=str(target), device=device, dtype="float32", attention_backend=backend, skip_tokenizer_init=True,
            cache=CacheConfig(page_size=8, num_pages=64),
            scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128),
            speculative_config=spec,
        ))
        outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
        return [o.token_ids for o in outs]

    ref = run("torch", None)
    beam = SpeculativeConfig(method="draft_model", model=str(draft), tree=TreeConfig(kind="beam", shape=(2, 2)))
    assert run("triton", beam) == ref
    assert run("triton", SpeculativeConfig(method="ngram", num_speculative_tokens=3)) == ref


def test_sparse_self_drafting_through_triton_kernels_equals_ar(tmp_path):
    """sparse_self on the Triton backend drafts through the UNIQUE kernels (page statistics, scoring,
    selection, sparse attention) with a budget small enough that selection drops pages; still AR's tokens."""
    from specray.config import SparseConfig, SpeculativeConfig, TreeConfig
    from specray.spec.sparse_backend import TritonSparsePageBackend

    target = make_checkpoint(tmp_path / "t", "llama", vocab_size=128, max_position_embeddings=256, tokenizer=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prompts = [list(range(5, 75)), list(range(100, 127)) * 2]

    def engine(backend, spec=None):
        return LLMEngine(EngineConfig(
            model=str(target), device=device, dtype="float32", attention_backend=backend, skip_tokenizer_init=True,
            cache=CacheConfig(page_size=8, num_pages=64),
            scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128),
            speculative_config=spec,
        ))

    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    ref = [o.token_ids for o in engine("torch").generate(prompts, params)]
    spec = SpeculativeConfig(method="sparse_self", tree=TreeConfig(kind="chain", length=3),
                             sparse=SparseConfig(page_size=8, budget_tokens=32, sink_pages=1, recent_pages=2))
    eng = engine("triton", spec)
    assert isinstance(eng.spec.proposer.backend, TritonSparsePageBackend)
    assert [o.token_ids for o in eng.generate(prompts, params)] == ref
    assert eng.spec.stats.num_drafts > 0
