"""On CUDA, speculative steps (verification replayed from CUDA graphs through the static-shape Hybrid Tree
Attention) give AR's greedy tokens (fp32) for every proposer."""

from __future__ import annotations

import pytest
import torch

from specray.config import (
    CacheConfig,
    EngineConfig,
    RetrievalConfig,
    SchedulerConfig,
    SparseConfig,
    SpeculativeConfig,
    TreeConfig,
)
from specray.engine.llm_engine import LLMEngine
from specray.engine.sampling_params import SamplingParams
from tests.support.tiny import make_checkpoint, perturbed_copy


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec_gpu")
    target = make_checkpoint(root / "t", "qwen2", vocab_size=128, max_position_embeddings=512, tokenizer=False)
    return target, perturbed_copy(target, root / "d", scale=0.3, num_hidden_layers=1)


def _engine(target, spec):
    torch.backends.cuda.matmul.allow_tf32 = False
    return LLMEngine(EngineConfig(
        model=str(target), device="cuda", dtype="float32", skip_tokenizer_init=True, cuda_graph_batch_sizes=(1, 2, 4),
        cache=CacheConfig(page_size=16, num_pages=128),
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=128, max_model_len=400),
        speculative_config=spec,
    ))


SPECS = {
    "ngram": lambda d: SpeculativeConfig(method="ngram", num_speculative_tokens=4),
    "draft_beam": lambda d: SpeculativeConfig(method="draft_model", model=str(d), tree=TreeConfig(kind="beam")),
    "draft_retrieval_chain": lambda d: SpeculativeConfig(
        method="draft_model", model=str(d), retrieval=RetrievalConfig(chunk_size=8, top_k_chunks=4)),
    "sparse_self": lambda d: SpeculativeConfig(
        method="sparse_self", sparse=SparseConfig(page_size=4, budget_tokens=24)),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_spec_with_verify_graphs_equals_ar(models, name):
    target, draft = models
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (150, 90, 121)]
    params = SamplingParams(temperature=0, max_tokens=96, ignore_eos=True)
    ref = [o.token_ids for o in _engine(target, None).generate(prompts, params)]
    engine = _engine(target, SPECS[name](draft))
    assert engine.spec.verify_graphs is not None
    assert [o.token_ids for o in engine.generate(prompts, params)] == ref
    assert engine.spec.verify_graphs.graphs, "verification never replayed a graph"
    if name == "draft_retrieval_chain":  # the working-set refreshes replayed the fresh-encode graphs
        assert engine.spec.proposer.num_refreshes > 0 and engine.spec.proposer.fresh.num_runs > 0
    assert engine.pages_in_use() == 0
