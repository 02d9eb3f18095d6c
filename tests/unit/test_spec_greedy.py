"""Greedy losslessness: every proposer with every tree kind gives output identical, token for token, to
AR decoding over 128 tokens, for a batch of 3 sequences of different lengths whose prompts are longer
than the retrieval budget and the sparse-page budget (so retrieval and page selection are exercised)."""

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

TREES = {
    "chain": TreeConfig(kind="chain", length=4),
    "beam": TreeConfig(kind="beam", shape=(4, 16, 16, 16, 16)),
    "dynamic": TreeConfig(kind="dynamic", depth=4, top_k=4, budget=16),
}
MAX_TOKENS = 128


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    target = make_checkpoint(root / "target", "qwen2", vocab_size=128, max_position_embeddings=512,
                             tokenizer=False)
    draft = perturbed_copy(target, root / "draft", scale=0.3, num_hidden_layers=1)
    return target, draft


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in (150, 90, 121)]


def _engine(target, spec: SpeculativeConfig | None) -> LLMEngine:
    return LLMEngine(EngineConfig(
        model=str(target), device="cpu", dtype="float32", skip_tokenizer_init=True,
        cache=CacheConfig(page_size=8, num_pages=160),
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=400),
        speculative_config=spec,
    ))


@pytest.fixture(scope="module")
def reference(models, prompts):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [o.token_ids for o in _engine(models[0], None).generate(prompts, params)]


def _spec(method: str, tree: str, draft) -> SpeculativeConfig:
    kw = {}
    if method == "draft_model":
        kw = {"model": str(draft)}
    if method == "draft_model+retrieval":
        method = "draft_model"
        kw = {"model": str(draft), "retrieval": RetrievalConfig(chunk_size=8, top_k_chunks=4, refresh_every=4)}
    if method == "sparse_self":
        kw = {"sparse": SparseConfig(page_size=4, budget_tokens=24, sink_pages=1, recent_pages=2)}
    return SpeculativeConfig(method=method, tree=TREES[tree], **kw)


@pytest.mark.parametrize("tree", list(TREES))
@pytest.mark.parametrize("method", ["ngram", "draft_model", "draft_model+retrieval", "sparse_self"])
def test_greedy_output_equals_ar(models, prompts, reference, method, tree):
    engine = _engine(models[0], _spec(method, tree, models[1]))
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    assert [o.token_ids for o in outs] == reference
    stats = engine.spec.stats
    assert stats.num_drafts > 0
    assert engine.pages_in_use() == 0
    if method != "ngram":  # a perturbed / sparse copy of the target must get drafts accepted
        assert stats.num_accepted_tokens > 0
    for o in outs:
        m = o.spec_metrics
        assert m is not None and m["mean_acceptance_length"] >= 1.0
        assert m["num_spec_steps"] > 0
    if method.startswith("draft_model"):
        proposer = engine.spec.proposer
        assert proposer.kv_bytes() == 0  # released
    if method == "draft_model+retrieval":
        assert proposer.num_refreshes > 0  # working sets rebuilt from the target's chunk scores
        # bounded: 3 sequences x a working set of <= (4+2) chunks of 8 + tail + tree scratch, far below
        # the ~270-token contexts
        per_token = proposer.cache.spec.bytes_per_page // 8
        assert proposer.peak_kv_bytes <= 3 * (6 * 8 + 4 * 5 + 16 + 8 + TREES[tree].max_build_nodes) * per_token


def test_streamed_new_tokens_add_up_to_the_output_when_a_stop_token_cuts_a_step(models, prompts, reference):
    """A speculative step may accept tokens past a stop token; the step's `new_token_ids` must hold only
    the tokens kept, so a client that concatenates them (the distributed engine's driver does) gets the
    final `token_ids`. The oracle is AR's output cut at the stop token."""
    target, draft = models
    stop = reference[0][40]  # a token that occurs in AR's output: the run stops at its first occurrence
    cut = reference[0][: reference[0].index(stop) + 1]
    engine = _engine(target, SpeculativeConfig(method="draft_model", model=str(draft), tree=TREES["chain"]))
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, stop_token_ids=[stop])
    engine.add_request("r", prompts[0], params)
    streamed, final = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            streamed.extend(out.new_token_ids)
            final = out
    assert final.finished and final.finish_reason == "stop"
    assert final.token_ids == cut
    assert streamed == cut
