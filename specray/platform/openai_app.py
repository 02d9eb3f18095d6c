"""The OpenAI-compatible serving core, independent of the transport (FastAPI, Ray Serve handles).

`OpenAIServing` owns one engine's public face: its served model name, its arm label and its
`ServerMetrics`. Everything enters through one async generator,

    handle(method, path, body, headers) -> yields one head {status, headers, media_type},
                                           then the body as bytes chunks

(one chunk for JSON, one per SSE event for streams). The FastAPI app (`make_fastapi_app`), the Ray
Serve deployment's HTTP ingress and its `dispatch` handle method all go through it, so every path
shares the same parsing, errors and metrics.

Request flow for `/v1/completions` and `/v1/chat/completions`: raw body -> JSON (malformed: 422)
-> pydantic model (schema error: 422, FastAPI's `detail` list) -> model name (unknown: 404) ->
unsupported parameters such as `n > 1` (400) -> prompt token ids (chat through the model's chat
template) -> `SamplingParams` (out of range: 400) -> `AsyncLLMEngine.generate`. The first engine
output is awaited before the head is sent, so an over-long prompt is a 400 with the numbers even
for streams. When the consumer stops iterating (client disconnect), the engine generator is closed,
which aborts the request and frees its KV pages.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from specray.engine.async_engine import AsyncLLMEngine, EngineDeadError
from specray.engine.sequence import RequestOutput
from specray.errors import ModelNotFoundError, SpecrayError
from specray.platform.metrics import ServerMetrics
from specray.platform.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    ResponseMetrics,
    SpecDecodeMetrics,
    UsageInfo,
    error_response,
    new_id,
)

Head = dict[str, Any]  # {"status": int, "headers": dict[str, str], "media_type": str}
JSON = "application/json"
SSE = "text/event-stream"

# path -> (allowed method, handler name)
ROUTES: dict[str, tuple[str, str]] = {
    "/v1/completions": ("POST", "_completions"),
    "/v1/chat/completions": ("POST", "_chat"),
    "/v1/models": ("GET", "_models"),
    "/health": ("GET", "_health"),
    "/metrics": ("GET", "_metrics"),
}


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 detail: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.detail = status, message, param, detail


def _status_of(e: BaseException) -> int:
    if isinstance(e, ModelNotFoundError):
        return 404
    if isinstance(e, EngineDeadError):
        return 503
    if isinstance(e, SpecrayError | ValueError):  # RequestError, PromptTooLongError, CheckpointError, ...
        return 400
    return 500


def _sse(obj: BaseModel | dict[str, Any] | str) -> bytes:
    if isinstance(obj, BaseModel):
        payload = obj.model_dump_json()
    elif isinstance(obj, dict):
        payload = json.dumps(obj)
    else:
        payload = obj
    return b"data: " + payload.encode() + b"\n\n"


def _validation_detail(e: ValidationError) -> list[dict[str, Any]]:
    detail = json.loads(e.json(include_url=False))
    for d in detail:
        d["loc"] = ["body", *d.get("loc", [])]
    return detail


class OpenAIServing:
    """Request -> engine -> response for one engine (one arm)."""

    def __init__(self, engine: AsyncLLMEngine, served_model_name: str, arm: str = "default"):
        self.engine = engine
        self.llm = engine.engine  # LLMEngine (or a DistributedEngine with the same methods)
        self.served_model_name = served_model_name
        self.arm = arm
        self.metrics = ServerMetrics(self.llm, served_model_name, arm)

    # ---- entry point -------------------------------------------------------------------------
    async def handle(self, method: str, path: str, body: bytes = b"",
                     headers: dict[str, str] | None = None) -> AsyncIterator[Head | bytes]:
        """Yield the head dict, then bytes chunks. Never raises for bad input: errors are responses."""
        path = "/" + path.split("?", 1)[0].strip("/")
        route = ROUTES.get(path)
        try:
            if route is None:
                raise HTTPError(404, f"no route {path}; routes: {', '.join(ROUTES)}")
            if method.upper() != route[0]:
                raise HTTPError(405, f"{path} accepts {route[0]}, got {method.upper()}")
            handler = getattr(self, route[1])
            agen = handler(body)
        except HTTPError as e:
            for item in self._error(e):
                yield item
            return
        try:
            async for item in agen:
                yield item
        finally:
            await agen.aclose()

    def _error(self, e: HTTPError) -> list[Head | bytes]:
        err = error_response(e.status, e.message, e.param, e.detail)
        return [self._head(e.status, JSON), err.model_dump_json(exclude_none=True).encode()]

    def _head(self, status: int, media_type: str, extra: dict[str, str] | None = None) -> Head:
        headers = {"x-specray-arm": self.arm}
        headers.update(extra or {})
        return {"status": status, "headers": headers, "media_type": media_type}

    # ---- simple routes ---------------------------------------------------------------------------
    async def _health(self, body: bytes) -> AsyncIterator[Head | bytes]:
        if self.engine.errored is not None:
            for item in self._error(HTTPError(503, f"engine failed: {self.engine.errored!r}")):
                yield item
            return
        yield self._head(200, JSON)
        yield b""

    async def _metrics(self, body: bytes) -> AsyncIterator[Head | bytes]:
        text, content_type = self.metrics.exposition()
        yield self._head(200, content_type)
        yield text

    async def _models(self, body: bytes) -> AsyncIterator[Head | bytes]:
        card = ModelCard(id=self.served_model_name, root=str(self.llm.config.model),
                         max_model_len=self.llm.max_model_len)
        yield self._head(200, JSON)
        yield ModelList(data=[card]).model_dump_json().encode()

    # ---- generation ----------------------------------------------------------------------------
    def _parse(self, body: bytes, cls: type[CompletionRequest] | type[ChatCompletionRequest]):
        try:
            data = json.loads(body or b"")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            detail = [{"type": "json_invalid", "loc": ["body", getattr(e, "pos", 0)], "msg": "JSON decode error",
                       "input": {}, "ctx": {"error": str(e)}}]
            raise HTTPError(422, f"the request body is not valid JSON: {e}", detail=detail) from None
        try:
            req = cls.model_validate(data)
        except ValidationError as e:
            detail = _validation_detail(e)
            first = detail[0]
            where = ".".join(str(p) for p in first["loc"][1:]) or "body"
            raise HTTPError(422, f"invalid request: {where}: {first['msg']} ({len(detail)} error(s))",
                            param=where, detail=detail) from None
        if req.model != self.served_model_name:
            raise HTTPError(404, f"The model `{req.model}` does not exist; this server serves "
                                 f"`{self.served_model_name}`.", param="model")
        return req

    async def _completions(self, body: bytes) -> AsyncIterator[Head | bytes]:
        async for item in self._generate(body, chat=False):
            yield item

    async def _chat(self, body: bytes) -> AsyncIterator[Head | bytes]:
        async for item in self._generate(body, chat=True):
            yield item

    def _prepare(self, body: bytes, chat: bool):
        """-> (request, prompt token ids, SamplingParams); raises HTTPError."""
        t_cls = ChatCompletionRequest if chat else CompletionRequest
        req = self._parse(body, t_cls)
        try:
            req.check_supported()
            if chat:
                prompt_ids = self.llm.encode_chat([m.as_template_dict() for m in req.messages])
            else:
                prompt_ids = self.llm.encode(req.single_prompt())
            params = req.to_sampling_params(default_max_tokens=None if chat else 16)
        except Exception as e:  # noqa: BLE001 - template errors (jinja) are the client's too
            status = _status_of(e)
            if status == 500 and type(e).__module__.startswith("jinja2"):
                status = 400
            raise HTTPError(status, str(e)) from None
        return req, prompt_ids, params

    async def _generate(self, body: bytes, chat: bool) -> AsyncIterator[Head | bytes]:
        t0 = time.monotonic()
        try:
            req, prompt_ids, params = self._prepare(body, chat)
        except HTTPError as e:
            for item in self._error(e):
                yield item
            return
        request_id = new_id("chatcmpl" if chat else "cmpl")
        gen = self.engine.generate(prompt_ids, params, request_id)
        timing: _Timing | None = None
        try:
            try:
                first = await gen.__anext__()  # add_request errors (prompt too long, ...) surface here
            except Exception as e:  # noqa: BLE001
                for item in self._error(HTTPError(_status_of(e), str(e))):
                    yield item
                return
            timing = _Timing(t0)
            timing.saw(first)
            head = self._head(200, SSE if req.stream else JSON,
                              {"x-request-id": request_id, **({"cache-control": "no-cache"} if req.stream else {})})
            if req.stream:
                events = self._stream_events(req, request_id, first, gen, chat, timing)
                yield head
                try:
                    async for event in events:
                        yield event
                finally:
                    await events.aclose()
                return
            last = first
            try:
                if not first.finished:
                    async for out in gen:
                        timing.saw(out)
                        last = out
            except Exception as e:  # noqa: BLE001 - the engine died mid-request: 503, not a hang or a bare 500
                for item in self._error(HTTPError(_status_of(e), str(e))):
                    yield item
                return
            self._record(timing, last)
            resp = self._full_response(req, request_id, last, chat)
            yield head
            yield resp.model_dump_json().encode()
        finally:
            await gen.aclose()  # no-op when finished; aborts (frees pages) when the client went away
            if timing is not None and not timing.recorded:
                self.metrics.observe_aborted()

    async def _stream_events(self, req, request_id: str, first: RequestOutput,
                             gen: AsyncIterator[RequestOutput], chat: bool, timing: _Timing) -> AsyncIterator[bytes]:
        model = self.served_model_name
        if chat:  # OpenAI opens a chat stream with the role
            yield _sse(ChatCompletionChunk(id=request_id, model=model, choices=[
                ChatChunkChoice(delta=DeltaMessage(role="assistant", content=""))]))
        out = first
        try:
            while True:
                if out.delta_text or out.finished or (req.return_token_ids and out.new_token_ids):
                    yield _sse(self._chunk(req, request_id, out, chat))
                if out.finished:
                    break
                out = await gen.__anext__()
                timing.saw(out)
        except Exception as e:  # noqa: BLE001 - the head is sent: report in-band, as vLLM does
            err = error_response(_status_of(e), str(e))
            yield _sse(err.model_dump_json(exclude_none=True))
            yield _sse("[DONE]")
            return
        self._record(timing, out)
        if req.include_usage:
            usage_chunk_cls = ChatCompletionChunk if chat else CompletionChunk
            yield _sse(usage_chunk_cls(id=request_id, model=model, choices=[], usage=self._usage(out),
                                       metrics=self._spec_metrics(out)))
        yield _sse("[DONE]")

    # ---- response builders -----------------------------------------------------------------------
    def _chunk(self, req, request_id: str, out: RequestOutput, chat: bool) -> BaseModel:
        fin = out.finish_reason if out.finished else None
        stop = out.stop_reason if out.finished else None
        ids = out.new_token_ids if req.return_token_ids else None
        usage = self._usage(out) if (req.stream_options and req.stream_options.continuous_usage_stats) else None
        metrics = self._spec_metrics(out) if out.finished else None
        if chat:
            choice = ChatChunkChoice(delta=DeltaMessage(content=out.delta_text), finish_reason=fin, stop_reason=stop,
                                     token_ids=ids)
            return ChatCompletionChunk(id=request_id, model=self.served_model_name, choices=[choice], usage=usage,
                                       metrics=metrics)
        choice = CompletionChoice(text=out.delta_text, finish_reason=fin, stop_reason=stop, token_ids=ids)
        return CompletionChunk(id=request_id, model=self.served_model_name, choices=[choice], usage=usage,
                               metrics=metrics)

    def _full_response(self, req, request_id: str, out: RequestOutput, chat: bool) -> BaseModel:
        ids = list(out.token_ids) if req.return_token_ids else None
        prompt_ids = list(out.prompt_token_ids) if req.return_token_ids else None
        common = dict(id=request_id, model=self.served_model_name, usage=self._usage(out),
                      metrics=self._spec_metrics(out))
        if chat:
            choice = ChatChoice(message=AssistantMessage(content=out.text), finish_reason=out.finish_reason,
                                stop_reason=out.stop_reason, token_ids=ids)
            return ChatCompletionResponse(choices=[choice], prompt_token_ids=prompt_ids, **common)
        choice = CompletionChoice(text=out.text, finish_reason=out.finish_reason, stop_reason=out.stop_reason,
                                  prompt_token_ids=prompt_ids, token_ids=ids)
        return CompletionResponse(choices=[choice], **common)

    @staticmethod
    def _usage(out: RequestOutput) -> UsageInfo:
        n_in, n_out = len(out.prompt_token_ids), len(out.token_ids)
        return UsageInfo(prompt_tokens=n_in, completion_tokens=n_out, total_tokens=n_in + n_out)

    def _spec_metrics(self, out: RequestOutput) -> ResponseMetrics | None:
        if out.spec_metrics is not None:
            return ResponseMetrics(speculative_decoding=SpecDecodeMetrics(**out.spec_metrics))
        if getattr(self.llm, "spec", None) is not None:  # speculation on, but no step drafted for this request
            return ResponseMetrics(speculative_decoding=SpecDecodeMetrics())
        return None

    def _record(self, timing: _Timing, out: RequestOutput) -> None:
        timing.recorded = True
        e2e = time.monotonic() - timing.t0
        self.metrics.observe_finished(timing.ttft, e2e, len(out.prompt_token_ids), len(out.token_ids),
                                      out.finish_reason)


class _Timing:
    """Server-side latency of one request, from the moment it was handled."""

    def __init__(self, t0: float):
        self.t0 = t0
        self.ttft: float | None = None
        self.recorded = False  # finished and observed; False at close = aborted

    def saw(self, out: RequestOutput) -> None:
        if self.ttft is None and out.new_token_ids:
            self.ttft = time.monotonic() - self.t0


# ---- FastAPI -------------------------------------------------------------------------------------


async def respond(serving: OpenAIServing, request: Request) -> Response:
    """Run one Starlette request through `serving.handle` and return a Starlette response
    (a `StreamingResponse` for SSE). Shared by `make_fastapi_app` and the Ray Serve deployment."""
    path = request.url.path
    root = request.scope.get("root_path") or ""
    if root and root != "/" and path.startswith(root):
        path = path[len(root):] or "/"
    body = await request.body()
    agen = serving.handle(request.method, path, body, dict(request.headers))
    head = await agen.__anext__()
    assert isinstance(head, dict)
    if head["media_type"] == SSE:
        return StreamingResponse(agen, status_code=head["status"], headers=head["headers"], media_type=SSE)
    chunks = [c async for c in agen]
    return Response(b"".join(chunks), status_code=head["status"], headers=head["headers"],
                    media_type=head["media_type"])


def make_fastapi_app(serving: OpenAIServing):
    """A FastAPI app with the OpenAI routes of one engine (for uvicorn or tests without Ray)."""
    from fastapi import FastAPI

    app = FastAPI(title="specray", description="OpenAI-compatible speculative-decoding server")

    async def endpoint(request: Request):
        return await respond(serving, request)

    for path, (method, _) in ROUTES.items():
        app.add_api_route(path, endpoint, methods=[method], name=path.strip("/").replace("/", "_"))
    app.state.serving = serving
    return app
