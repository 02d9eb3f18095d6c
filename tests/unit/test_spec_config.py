"""Bad speculation configs fail at load with the field named; the n-gram lookup; KV commit moves."""

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
    load_engine_config,
)
from specray.engine.kv_cache import KVCache, KVCacheSpec
from specray.engine.llm_engine import LLMEngine
from specray.errors import ConfigError
from specray.spec.ngram import lookup
from specray.spec.step import commit_kv
from tests.support.tiny import make_checkpoint


@pytest.mark.parametrize(
    "tree, field",
    [
        ({"kind": "beam", "shape": []}, "tree.shape"),
        ({"kind": "beam", "shape": [4, 0, 2]}, "tree.shape"),
        ({"kind": "chain", "length": 0}, "tree.length"),
        ({"kind": "beam", "shape": [16] * 17}, "nodes"),
        ({"kind": "dynamic", "depth": 3, "top_k": 4, "budget": 300}, "nodes"),
        ({"kind": "dynamic", "depth": 0}, "depth"),
        ({"kind": "star"}, "tree.kind"),
    ],
)
def test_bad_trees(tree, field):
    with pytest.raises(ConfigError, match=field):
        load_engine_config({"speculative_config": {"method": "ngram", "tree": tree}})


def test_bad_spec_fields():
    with pytest.raises(ConfigError, match="speculative_config.model is required"):
        SpeculativeConfig(method="draft_model")
    with pytest.raises(ConfigError, match="speculative_config.method"):
        SpeculativeConfig(method="medusa")
    with pytest.raises(ConfigError, match="retrieval applies to method 'draft_model'"):
        SpeculativeConfig(method="ngram", retrieval=RetrievalConfig())
    with pytest.raises(ConfigError, match="retrieval.chunk_size"):
        RetrievalConfig(chunk_size=0)
    with pytest.raises(ConfigError, match="sparse.budget_tokens"):
        SparseConfig(page_size=16, budget_tokens=8)
    with pytest.raises(ConfigError, match="num_speculative_tokens"):
        SpeculativeConfig(method="ngram", num_speculative_tokens=0)
    assert SpeculativeConfig(method="ngram", num_speculative_tokens=3).tree.num_nodes == 4
    cfg = load_engine_config({"speculative_config": {"method": "draft_model", "model": "/d",
                                                     "tree": {"kind": "beam", "shape": [4, 16, 16, 16, 16]},
                                                     "retrieval": {}}})
    assert cfg.speculative_config.tree.num_nodes == 69
    assert cfg.speculative_config.retrieval.budget_tokens == 1024


def _engine(target, spec, max_model_len=256):
    return LLMEngine(EngineConfig(
        model=str(target), device="cpu", dtype="float32", skip_tokenizer_init=True,
        cache=CacheConfig(page_size=8, num_pages=64),
        scheduler=SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64, max_model_len=max_model_len),
        speculative_config=spec,
    ))


def test_draft_with_other_vocabulary_and_budgets_larger_than_context(tmp_path):
    target = make_checkpoint(tmp_path / "t", "llama", vocab_size=128, tokenizer=False)
    other = make_checkpoint(tmp_path / "o", "llama", vocab_size=100, tokenizer=False)
    with pytest.raises(ConfigError, match="speculative_config.model.*100 tokens.*128"):
        _engine(target, SpeculativeConfig(method="draft_model", model=str(other)))
    with pytest.raises(ConfigError, match="speculative_config.retrieval.*1024 tokens.*max_model_len = 256"):
        _engine(target, SpeculativeConfig(method="draft_model", model=str(target), retrieval=RetrievalConfig()))
    with pytest.raises(ConfigError, match="speculative_config.sparse.budget_tokens"):
        _engine(target, SpeculativeConfig(method="sparse_self"))  # 512-token budget, 256-token context


def test_ngram_lookup():
    toks = [1, 2, 3, 4, 5, 9, 1, 2, 3]
    assert lookup(toks, 1, 3, 2) == [4, 5]
    assert lookup([1, 2, 3], 2, 3, 4) == []
    assert lookup([7, 8, 7, 8, 7], 1, 2, 3) == [8, 7]


def test_commit_kv_moves_accepted_entries_all_layers():
    spec = KVCacheSpec(num_layers=3, num_kv_heads=2, head_dim=4, page_size=4, dtype=torch.float32)
    cache = KVCache(spec, 8, torch.device("cpu"))
    for t in (*cache.k, *cache.v):
        t.normal_()
    pages = [5, 2, 7]
    before = [t.clone() for t in (*cache.k, *cache.v)]
    prefix, path = 3, [0, 2, 5, 6]  # node i lives at cache position prefix + i

    def at(t, pos):
        return t[pages[pos // 4], pos % 4]

    commit_kv(cache, pages, prefix, path)
    for t, old in zip((*cache.k, *cache.v), before, strict=True):
        for depth, node in enumerate(path):
            assert torch.equal(at(t, prefix + depth), at(old, prefix + node))
        assert torch.equal(at(t, 0), at(old, 0))  # the committed prefix is untouched
