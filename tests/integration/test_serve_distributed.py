"""Serving a tensor-parallel engine: a Ray Serve app whose replica runs a `DistributedEngine` (TP=2 shard
actors in a gloo world plus a separate draft actor with Cross-model Retrieval), over real HTTP with the
official `openai` client. Oracle: the in-process single-rank `LLMEngine` of the same model (greedy tokens)."""

from __future__ import annotations

import socket

import openai
import pytest

from specray.config import EngineConfig, load_engine_config
from specray.engine.llm_engine import LLMEngine
from specray.engine.sampling_params import SamplingParams
from tests.support.tiny import make_checkpoint, perturbed_copy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tp2_separate_draft_over_http_equals_single_rank(tmp_path):
    import ray
    from ray import serve

    from specray.platform.serve import build_app

    target = make_checkpoint(tmp_path / "t", "llama", vocab_size=128, max_position_embeddings=512, tokenizer=False)
    draft = perturbed_copy(target, tmp_path / "d", scale=0.2, num_hidden_layers=1)
    engine = {
        "model": str(target), "device": "cpu", "dtype": "float32", "seed": 0, "skip_tokenizer_init": True,
        "tensor_parallel_size": 2,
        "cache": {"page_size": 8, "num_pages": 256},
        "scheduler": {"max_num_seqs": 4, "max_num_batched_tokens": 64, "max_model_len": 256},
        "speculative_config": {"method": "draft_model", "model": str(draft), "draft_placement": "separate",
                               "tree": {"kind": "chain", "length": 3},
                               "retrieval": {"chunk_size": 8, "top_k_chunks": 4, "refresh_every": 2}},
    }
    prompts = [list(range(3, 70)), [5, 6, 7, 8] * 6]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    single = load_engine_config({"engine": dict(engine, tensor_parallel_size=1, speculative_config=None)})
    assert isinstance(single, EngineConfig)
    want = [o.token_ids for o in LLMEngine(single).generate(prompts, params)]

    port = _free_port()
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"engine": engine, "served_model_name": "tiny-tp2"}), name="tp2", route_prefix="/")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=120)
        got = []
        for p in prompts:
            r = client.completions.create(model="tiny-tp2", prompt=p, max_tokens=20, temperature=0,
                                          extra_body={"ignore_eos": True, "return_token_ids": True})
            got.append(r.choices[0].model_extra["token_ids"])
            spec = r.model_extra["metrics"]["speculative_decoding"]
            assert spec["num_spec_steps"] > 0
        assert got == want
        with pytest.raises(openai.BadRequestError, match="256"):  # over-context prompt: 400 with the numbers
            client.completions.create(model="tiny-tp2", prompt=[i % 100 for i in range(300)], max_tokens=4)
    finally:
        serve.shutdown()
        ray.shutdown()
