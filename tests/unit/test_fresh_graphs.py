"""`FreshEncodeGraphs` on CPU (its static padded forward run eagerly, the dense reference backend's
`fresh_causal` path): the K/V equal the engine's eager encode, padding stays in the scratch page, buckets."""

from __future__ import annotations

import pytest

from specray.config import CacheConfig, EngineConfig, SchedulerConfig
from specray.engine.fresh_graphs import FreshEncodeGraphs, bucket_sizes
from specray.engine.llm_engine import LLMEngine
from tests.support.fresh_encode import check_against_eager
from tests.support.tiny import make_checkpoint


def test_bucket_sizes():
    assert bucket_sizes(100, 32) == (32, 64, 96, 100)
    assert bucket_sizes(64, 32) == (32, 64)
    assert bucket_sizes(5, 64) == (5,)
    with pytest.raises(ValueError):
        bucket_sizes(0, 64)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fresh_encode_equals_eager_encode(tmp_path, family):
    path = make_checkpoint(tmp_path / "m", family, tokenizer=False)
    engine = LLMEngine(EngineConfig(
        model=str(path), device="cpu", dtype="float32", skip_tokenizer_init=True,
        cache=CacheConfig(page_size=8, num_pages=40),
        scheduler=SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=256, max_model_len=256),
    ))
    fresh = FreshEncodeGraphs(engine.runner, max_tokens=100, step=32, capture=False)
    assert fresh.sizes == (32, 64, 96, 100)
    # inside a bucket, exactly a bucket, one past it, the last (short) bucket
    check_against_eager(engine.runner, fresh, [1, 20, 32, 33, 97, 100], atol=1e-5, rtol=1e-5)
    assert not fresh.fits(101) and not fresh.fits(0)
    with pytest.raises(ValueError, match="1..100"):
        fresh.run([1], list(range(101)))
