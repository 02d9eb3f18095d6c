"""OpenAI request models -> SamplingParams, unsupported-parameter errors, and the serving core's
error statuses driven in-process (no Ray, no HTTP) through `OpenAIServing.handle`."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import ValidationError

from specray.engine.sampling_params import SamplingParams
from specray.errors import RequestError
from specray.platform.protocol import ChatCompletionRequest, CompletionRequest


def test_sampling_params_mapping_and_defaults():
    req = CompletionRequest.model_validate({
        "model": "m", "prompt": "hi", "temperature": 0.5, "top_p": 0.9, "top_k": 7, "min_p": 0.05, "seed": 3,
        "stop": "END", "ignore_eos": True, "max_tokens": 12,
    })
    p = req.to_sampling_params(default_max_tokens=16)
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.seed, p.stop, p.ignore_eos, p.max_tokens) == (
        0.5, 0.9, 7, 0.05, 3, ("END",), True, 12)
    d = CompletionRequest.model_validate({"model": "m", "prompt": [5, 6]}).to_sampling_params(default_max_tokens=16)
    assert (d.temperature, d.top_p, d.max_tokens) == (1.0, 1.0, 16)  # OpenAI defaults; legacy 16 tokens
    chat = ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                {"type": "text", "text": "b"}]}],
        "max_completion_tokens": 5, "max_tokens": 99, "stream": True, "stream_options": {"include_usage": True},
    })
    assert chat.to_sampling_params(default_max_tokens=None).max_tokens == 5  # the newer name wins
    assert chat.include_usage
    assert chat.messages[0].as_template_dict() == {"role": "user", "content": "ab"}


def test_single_prompt_forms():
    assert CompletionRequest(model="m", prompt="x").single_prompt() == "x"
    assert CompletionRequest(model="m", prompt=[4, 5]).single_prompt() == [4, 5]
    assert CompletionRequest(model="m", prompt=[[4, 5]]).single_prompt() == [4, 5]
    with pytest.raises(RequestError, match="batched prompts"):
        CompletionRequest(model="m", prompt=["a", "b"]).single_prompt()


@pytest.mark.parametrize("extra, match", [
    ({"n": 2}, "n=2 is not supported"),
    ({"logprobs": 3}, "logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"echo": True}, "echo"),
    ({"stream_options": {"include_usage": True}}, "stream=true"),
])
def test_unsupported_parameters_are_named(extra, match):
    req = CompletionRequest.model_validate({"model": "m", "prompt": "x", **extra})
    with pytest.raises(RequestError, match=match):
        req.check_supported()


def test_schema_errors():
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": []})
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "max_tokens": "many"})
    with pytest.raises(RequestError, match="max_tokens must be at least 1"):  # ranges: SamplingParams, a 400
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "max_tokens": 0}).to_sampling_params(16)


@pytest.fixture(scope="module")
def serving(tmp_path_factory):
    from specray.config import CacheConfig, EngineConfig, SchedulerConfig
    from specray.engine.async_engine import AsyncLLMEngine
    from specray.engine.llm_engine import LLMEngine
    from specray.platform.openai_app import OpenAIServing
    from tests.support.tiny import make_checkpoint

    path = make_checkpoint(tmp_path_factory.mktemp("m"), "llama")
    engine = LLMEngine(EngineConfig(model=str(path), device="cpu", dtype="float32",
                                    cache=CacheConfig(page_size=8, num_pages=64),
                                    scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64,
                                                              max_model_len=64)))
    return OpenAIServing(AsyncLLMEngine(engine), "tiny", arm="a")


def _call(serving, method, path, body: bytes | dict = b""):
    if isinstance(body, dict):
        body = json.dumps(body).encode()

    async def run():
        items = [x async for x in serving.handle(method, path, body, {})]
        await serving.engine.shutdown()
        return items

    items = asyncio.run(run())
    head, chunks = items[0], items[1:]
    assert isinstance(head, dict) and all(isinstance(c, bytes) for c in chunks)
    return head, b"".join(chunks)


@pytest.mark.parametrize("method, path, body, status, needle", [
    ("POST", "/v1/completions", b"{nope", 422, "not valid JSON"),
    ("POST", "/v1/completions", {"model": "tiny"}, 422, "prompt"),
    ("POST", "/v1/completions", {"model": "other", "prompt": "w5"}, 404, "`other` does not exist"),
    ("POST", "/v1/completions", {"model": "tiny", "prompt": "w5", "n": 2}, 400, "n=2"),
    ("POST", "/v1/completions", {"model": "tiny", "prompt": "w5 " * 70}, 400, "70 tokens"),
    ("POST", "/v1/completions", {"model": "tiny", "prompt": "w5", "top_p": 0}, 400, "top_p"),
    ("GET", "/v1/completions", b"", 405, "accepts POST"),
    ("GET", "/nowhere", b"", 404, "no route"),
])
def test_errors_in_process(serving, method, path, body, status, needle):
    head, payload = _call(serving, method, path, body)
    assert head["status"] == status
    assert head["headers"]["x-specray-arm"] == "a"
    err = json.loads(payload)["error"]
    assert err["code"] == status and needle in err["message"]
    assert serving.llm.pages_in_use() == 0


def test_completion_in_process(serving):
    head, payload = _call(serving, "POST", "/v1/completions",
                          {"model": "tiny", "prompt": "w5 w6 w7", "max_tokens": 5, "temperature": 0,
                           "ignore_eos": True, "return_token_ids": True})
    assert head["status"] == 200 and head["media_type"] == "application/json"
    resp = json.loads(payload)
    ref = serving.llm.generate(["w5 w6 w7"], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert resp["choices"][0]["token_ids"] == ref.token_ids
    assert resp["choices"][0]["text"] == ref.text
    assert resp["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert resp["metrics"] is None  # no speculation on this engine


def test_build_app_validates_args_and_engine_fields(tmp_path):
    from specray.errors import ConfigError
    from specray.platform.serve import apps_from_config, build_app, deployment_options

    with pytest.raises(ConfigError, match="unknown build_app arg 'engines'"):
        build_app({"engines": {}})
    with pytest.raises(ConfigError, match="speculative_config.method"):
        build_app({"engine": {"model": "m", "speculative_config": {"method": "medusa"}}})
    with pytest.raises(ConfigError, match="either `engine`"):
        build_app({"engine": {}, "config": "x.yaml"})
    with pytest.raises(ConfigError, match="does not exist"):
        build_app({"config": str(tmp_path / "missing.yaml")})
    bad = tmp_path / "serve.yaml"
    bad.write_text("applications:\n  - name: a\n    import_path: specray.platform.serve:no_such_builder\n")
    with pytest.raises(ConfigError, match="applications\\[0\\].import_path"):
        apps_from_config(bad)
    from specray.config import EngineConfig

    assert deployment_options(EngineConfig(device="cpu")) == {"num_cpus": 1, "num_gpus": 0}
    assert deployment_options(EngineConfig(device="cuda")) == {"num_cpus": 1, "num_gpus": 1}
    # a tensor-parallel engine's replica holds no GPU itself: its shard actors' placement group does
    assert deployment_options(EngineConfig(device="cuda", tensor_parallel_size=2)) == {"num_cpus": 1, "num_gpus": 0}


def test_fastapi_app_without_ray(serving):
    """`make_fastapi_app` (uvicorn-style use) goes through the same core: JSON, SSE and errors."""
    from fastapi.testclient import TestClient

    from specray.engine.async_engine import AsyncLLMEngine
    from specray.platform.openai_app import OpenAIServing, make_fastapi_app

    app = make_fastapi_app(OpenAIServing(AsyncLLMEngine(serving.llm), "tiny"))
    with TestClient(app) as client:
        assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
        assert client.get("/health").status_code == 200
        body = {"model": "tiny", "messages": [{"role": "user", "content": "w5"}], "max_tokens": 4,
                "ignore_eos": True, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
        r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [], "max_tokens": 2})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "messages"]
        assert "specray:kv_cache_pages_in_use" in client.get("/metrics").text
    assert serving.llm.pages_in_use() == 0


def test_engine_failure_is_503_and_unhealthy(serving, monkeypatch):
    from specray.engine.async_engine import AsyncLLMEngine
    from specray.platform.openai_app import OpenAIServing

    broken = OpenAIServing(AsyncLLMEngine(serving.llm), "tiny")
    calls = {"n": 0}
    real_step = serving.llm.step

    def failing_step():
        calls["n"] += 1
        if calls["n"] > 2:  # the prefill and first decode work, then the "worker" dies
            raise RuntimeError("device lost")
        return real_step()

    monkeypatch.setattr(serving.llm, "step", failing_step)
    body = json.dumps({"model": "tiny", "prompt": "w5 w6", "max_tokens": 20, "ignore_eos": True}).encode()

    async def run():
        plain = [x async for x in broken.handle("POST", "/v1/completions", body, {})]
        health = [x async for x in broken.handle("GET", "/health")]
        await broken.engine.shutdown()
        return plain, health

    plain, health = asyncio.run(run())
    assert plain[0]["status"] == 503 and b"device lost" in plain[1]
    assert health[0]["status"] == 503
    assert serving.llm.pages_in_use() == 0
