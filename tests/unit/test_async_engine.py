"""AsyncLLMEngine: concurrent streams equal the sync engine; cancelling a stream frees its pages."""

from __future__ import annotations

import asyncio

import pytest

from specray.config import CacheConfig, EngineConfig, SchedulerConfig
from specray.engine.async_engine import AsyncLLMEngine
from specray.engine.llm_engine import LLMEngine
from specray.engine.sampling_params import SamplingParams
from specray.errors import PromptTooLongError
from tests.support.tiny import make_checkpoint


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("m"), "qwen2")
    return LLMEngine(EngineConfig(model=str(path), device="cpu", dtype="float32",
                                  cache=CacheConfig(page_size=8, num_pages=128),
                                  scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64,
                                                            max_model_len=200)))


def test_streams_match_sync_and_cancel_frees_pages(engine):
    prompts = [[5 + i, 6, 7, 8 + i] * (i + 1) for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = [o.token_ids for o in engine.generate(prompts, params)]

    async def main():
        aengine = AsyncLLMEngine(engine)

        async def consume(p):
            toks, n = [], 0
            async for out in aengine.generate(p, params):
                toks += out.new_token_ids
                n += 1
            assert out.finished and out.token_ids == toks
            return toks

        got = await asyncio.gather(*(consume(p) for p in prompts))

        # a consumer that walks away mid-stream: its request is aborted, pages freed
        gen = aengine.generate([9, 9, 9], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
        async for out in gen:
            if len(out.token_ids) >= 3:
                break
        await gen.aclose()
        pages_after_cancel = engine.pages_in_use()

        with pytest.raises(PromptTooLongError):
            async for _ in aengine.generate(list(range(3, 250)), params):
                pass
        await aengine.shutdown()
        return got, pages_after_cancel

    got, pages = asyncio.run(main())
    assert got == expected
    assert pages == 0
    assert not engine.has_unfinished_requests()
