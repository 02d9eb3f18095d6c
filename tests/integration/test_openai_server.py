"""The OpenAI-compatible server end to end: a real Ray Serve app on loopback, built from a Serve config
YAML through `build_app`, serving a tiny random llama with `sparse_self` speculation, driven by the
official `openai` client and raw HTTP.

Oracles: the in-process `LLMEngine.generate` of the same config (and of plain AR decoding) for the
greedy tokens; the tiny tokenizer's chat template counted by hand for prompt usage; the engine's own
page count (through the `specray:kv_cache_pages_in_use` gauge and a handle call) for disconnects.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import openai
import pytest
import yaml

from specray.config import load_engine_config
from specray.engine.llm_engine import LLMEngine
from specray.engine.sampling_params import SamplingParams
from tests.support.tiny import make_checkpoint

MODEL = "tiny-llama"
APP = "specray-test"
MAX_MODEL_LEN = 320


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _engine_cfg(path) -> dict:
    return {
        "model": str(path), "device": "cpu", "dtype": "float32", "seed": 0,
        "cache": {"page_size": 8, "num_pages": 400},
        "scheduler": {"max_num_seqs": 8, "max_num_batched_tokens": 128, "max_model_len": MAX_MODEL_LEN},
        "speculative_config": {"method": "sparse_self", "num_speculative_tokens": 3,
                               "sparse": {"page_size": 8, "budget_tokens": 48, "sink_pages": 1, "recent_pages": 2}},
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import ray
    from ray import serve

    from specray.platform.serve import apps_from_config

    root = tmp_path_factory.mktemp("serve")
    ckpt = make_checkpoint(root / "tiny", "llama", max_position_embeddings=512)
    engine_cfg = _engine_cfg(ckpt)
    (root / "engine.yaml").write_text(yaml.safe_dump({"engine": engine_cfg}))
    serve_yaml = root / "serve.yaml"
    serve_yaml.write_text(yaml.safe_dump({"applications": [{
        "name": APP, "route_prefix": "/", "import_path": "specray.platform.serve:build_app",
        "args": {"config": str(root / "engine.yaml"), "served_model_name": MODEL},
    }]}))
    apps, _ = apps_from_config(serve_yaml)
    port = _free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        (name, prefix, app), = apps
        handle = serve.run(app, name=name, route_prefix=prefix)
        base = f"http://127.0.0.1:{port}"
        yield {"base": base, "handle": handle, "engine_cfg": engine_cfg,
               "client": openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)}
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def local_engines(server):
    cfg = load_engine_config(server["engine_cfg"])
    ar = dict(server["engine_cfg"], speculative_config=None)
    return LLMEngine(cfg), LLMEngine(load_engine_config(ar))


def _metrics(base: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base + "/metrics", timeout=30).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _metric(m: dict, name: str, **labels) -> float:
    want = {"model_name": MODEL, "arm": "default", **labels}
    return sum(v for (n, lab), v in m.items() if n == name and dict(lab) == want)


def _words(n: int, start: int = 5) -> str:
    return " ".join(f"w{3 + (start + 7 * i) % 250}" for i in range(n))


def test_models_and_health(server):
    models = server["client"].models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].model_extra["max_model_len"] == MAX_MODEL_LEN
    assert httpx.get(server["base"] + "/health", timeout=30).status_code == 200


def test_completion(server):
    r = server["client"].completions.create(model=MODEL, prompt="w5 w6 w7", max_tokens=8, temperature=0,
                                            extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.model == MODEL
    assert r.choices[0].finish_reason == "length" and r.choices[0].text.strip()
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (3, 8, 11)
    spec = r.model_extra["metrics"]["speculative_decoding"]
    assert spec["mean_acceptance_length"] >= 1.0 and spec["num_spec_steps"] >= 1


def test_chat(server):
    r = server["client"].chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "w9"}, {"role": "user", "content": "w5 w6"}],
        max_completion_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content.strip()
    # the tiny chat template renders "system w9 user w5 w6 w3 ": 6 word tokens
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (6, 6)
    assert r.model_extra["metrics"]["speculative_decoding"]["num_draft_tokens"] >= 3


@pytest.mark.parametrize("chat", [False, True])
def test_streaming_with_usage(server, chat):
    client = server["client"]
    kw = dict(model=MODEL, max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    if chat:
        msgs = [{"role": "user", "content": _words(40)}]
        full = client.chat.completions.create(messages=msgs, **kw).choices[0].message.content
        chunks = list(client.chat.completions.create(messages=msgs, stream=True,
                                                     stream_options={"include_usage": True}, **kw))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[0].choices[0].delta.role == "assistant"
    else:
        full = client.completions.create(prompt=_words(40), **kw).choices[0].text
        chunks = list(client.completions.create(prompt=_words(40), stream=True,
                                                stream_options={"include_usage": True}, **kw))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert len(chunks) >= 3
    assert text == full
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 20
    assert all(c.usage is None for c in chunks[:-1])
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert last.model_extra["metrics"]["speculative_decoding"]["num_spec_steps"] >= 1


def test_greedy_over_http_equals_engine(server, local_engines):
    spec_engine, ar_engine = local_engines
    prompts = [_words(n, start=s) for n, s in ((60, 1), (9, 2), (130, 3))]  # longer than the 48-token sparse budget
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    want = [o.token_ids for o in spec_engine.generate(prompts, params)]
    assert want == [o.token_ids for o in ar_engine.generate(prompts, params)]  # lossless: equals plain AR
    got = []
    for p in prompts:
        r = server["client"].completions.create(model=MODEL, prompt=p, max_tokens=40, temperature=0,
                                                extra_body={"ignore_eos": True, "return_token_ids": True})
        got.append(r.choices[0].model_extra["token_ids"])
    assert got == want


def test_twenty_concurrent_streams(server):
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[int, str]:
        stream = await client.completions.create(
            model=MODEL, prompt=_words(8 + i, start=i), max_tokens=12, temperature=0.8, seed=i, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True, "top_k": 20, "min_p": 0.01})
        n, reasons = 0, []
        async for c in stream:
            if c.usage is not None:
                n = c.usage.completion_tokens
            reasons += [ch.finish_reason for ch in c.choices if ch.finish_reason]
        return n, reasons

    async def main():
        client = openai.AsyncOpenAI(base_url=server["base"] + "/v1", api_key="x", max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(20)))
        finally:
            await client.close()

    results = asyncio.run(main())
    assert results == [(12, ["length"])] * 20


def test_disconnect_mid_stream_frees_pages(server):
    base = server["base"]
    before = _metrics(base)
    body = {"model": MODEL, "prompt": _words(50), "max_tokens": MAX_MODEL_LEN - 60, "temperature": 0,
            "ignore_eos": True, "stream": True}
    held = None
    with httpx.Client(timeout=60) as c, c.stream("POST", base + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        events = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                events += 1
            if events == 3:
                held = _metric(_metrics(base), "specray:kv_cache_pages_in_use")
                break
    # the connection is closed here, long before 260 tokens were generated
    assert held is not None and held >= 7  # 50 prompt tokens in pages of 8, plus generated ones
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = _metrics(base)
        if _metric(m, "specray:kv_cache_pages_in_use") == 0:
            break
        time.sleep(0.2)
    assert _metric(m, "specray:kv_cache_pages_in_use") == 0
    assert server["handle"].pages_in_use.remote().result() == 0
    aborted = "specray:request_success_total"
    assert _metric(m, aborted, finished_reason="abort") == _metric(before, aborted, finished_reason="abort") + 1
    assert _metric(m, aborted, finished_reason="length") == _metric(before, aborted, finished_reason="length")


def test_bad_requests_get_clear_errors_and_server_stays_healthy(server):
    client, base = server["client"], server["base"]
    n = MAX_MODEL_LEN + 20
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt=_words(n), max_tokens=4, stream=stream)
        assert e.value.status_code == 400
        assert f"{n} tokens" in str(e.value) and str(MAX_MODEL_LEN) in str(e.value)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "w5"}])
    assert e.value.status_code == 404 and "no-such-model" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="w5", n=2)
    assert "n=2 is not supported" in str(e.value)
    r = httpx.post(base + "/v1/chat/completions", content=b'{"model": "tiny-llama", "messages": [',
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 422 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(base + "/v1/chat/completions", json={"model": MODEL}, timeout=30)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "messages"]
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="w5", temperature=-1)
    # still healthy and serving, and nothing leaked
    assert httpx.get(base + "/health", timeout=30).status_code == 200
    r = client.completions.create(model=MODEL, prompt="w5 w6", max_tokens=3, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3
    assert server["handle"].pages_in_use.remote().result() == 0


def test_metrics_names_and_spec_counters_increase(server):
    base = server["base"]
    before = _metrics(base)
    server["client"].completions.create(model=MODEL, prompt=_words(130), max_tokens=24, temperature=0,
                                        extra_body={"ignore_eos": True})
    after = _metrics(base)
    for name in ("specray:spec_decode_num_drafts_total", "specray:spec_decode_num_draft_tokens_total",
                 "specray:spec_decode_num_accepted_tokens_total"):
        assert _metric(after, name) > _metric(before, name), name
    assert _metric(after, "specray:spec_decode_num_drafts_total") * 3 == pytest.approx(
        _metric(after, "specray:spec_decode_num_draft_tokens_total"))  # chains of 3
    per_pos = sum(_metric(after, "specray:spec_decode_num_accepted_tokens_per_pos_total", position=str(p))
                  for p in range(3))
    assert per_pos == _metric(after, "specray:spec_decode_num_accepted_tokens_total")
    for hist in ("specray:time_to_first_token_seconds", "specray:time_per_output_token_seconds",
                 "specray:e2e_request_latency_seconds"):
        assert _metric(after, hist + "_count") == _metric(before, hist + "_count") + 1, hist
    for gauge in ("specray:num_requests_running", "specray:num_requests_waiting", "specray:kv_cache_pages_in_use"):
        assert (gauge, (("arm", "default"), ("model_name", MODEL))) in after, gauge


def test_dispatch_handle_contract(server):
    """The A/B ingress calls `dispatch` through a streaming handle: a head dict, then bytes."""
    from specray.platform.serve import dispatch_stream

    h = server["handle"]
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "w5"}], "max_tokens": 4,
                       "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}).encode()
    items = list(dispatch_stream(h, "POST", "/v1/chat/completions", body, {"content-type": "application/json"}))
    head, chunks = items[0], items[1:]
    assert head["status"] == 200 and head["media_type"] == "text/event-stream"
    assert head["headers"]["x-specray-arm"] == "default"
    assert all(isinstance(c, bytes) and c.startswith(b"data: ") and c.endswith(b"\n\n") for c in chunks)
    assert chunks[-1] == b"data: [DONE]\n\n"
    assert json.loads(chunks[-2][6:])["usage"]["completion_tokens"] == 4
    items = list(dispatch_stream(h, "POST", "/v1/completions", b'{"model": "x", "prompt": "w5"}', {}))
    assert items[0]["status"] == 404 and len(items) == 2 and b"does not exist" in items[1]
    # cancelling a dispatch stream (what the A/B ingress does when its client leaves) frees the pages
    body = json.dumps({"model": MODEL, "prompt": _words(50), "max_tokens": MAX_MODEL_LEN - 60, "stream": True,
                       "ignore_eos": True, "temperature": 0}).encode()
    gen = dispatch_stream(h, "POST", "/v1/completions", body, {})
    it = iter(gen)
    assert next(it)["status"] == 200
    next(it), next(it)
    assert h.pages_in_use.remote().result() > 0
    gen.cancel()
    deadline = time.monotonic() + 30
    while h.pages_in_use.remote().result() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert h.pages_in_use.remote().result() == 0
