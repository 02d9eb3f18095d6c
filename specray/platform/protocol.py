"""OpenAI-compatible request and response models (pydantic), with vLLM's extra sampling parameters.

Owns the wire shapes of `/v1/completions` and `/v1/chat/completions`: what a client may send
(`CompletionRequest`, `ChatCompletionRequest`) and what it gets back (full responses, SSE chunks,
`UsageInfo`, `ErrorResponse`). Requests are parsed from the raw body here, turned into the engine's
`SamplingParams` by `to_sampling_params`, and responses are serialised with `model_dump_json`.

Non-OpenAI knobs follow vLLM: `top_k`, `min_p`, `seed`, `ignore_eos`, `stop_token_ids`,
`skip_special_tokens`, `include_stop_str_in_output` and `return_token_ids` (OpenAI clients send them
through `extra_body`). Fields we accept but cannot honour are rejected with a 400 that names them, so
nothing is silently ignored; unknown fields are ignored, as vLLM does.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from specray.engine.sampling_params import SamplingParams
from specray.errors import RequestError


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage on every chunk


class _SamplingRequest(BaseModel):
    """The fields shared by completions and chat: model, sampling and stopping, streaming."""

    model_config = ConfigDict(extra="ignore")

    model: str
    # value ranges are checked by SamplingParams (400 with the field's name), not here (422)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM extra; 0 or -1 = off
    min_p: float | None = None  # vLLM extra
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM extra
    ignore_eos: bool = False  # vLLM extra
    skip_special_tokens: bool = True  # vLLM extra
    include_stop_str_in_output: bool = False  # vLLM extra
    return_token_ids: bool = False  # vLLM extra: prompt and output token ids in the response
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # accepted for compatibility; any value other than the default is a 400 (see `check_supported`)
    logprobs: Any = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        """Raise `RequestError` for parameters this server cannot honour (names the field)."""
        if self.n != 1:
            raise RequestError(f"n={self.n} is not supported: this server returns exactly one choice (n=1)")
        if self.best_of not in (None, 1):
            raise RequestError(f"best_of={self.best_of} is not supported; only 1")
        if self.logprobs not in (None, False, 0) or self.top_logprobs:
            raise RequestError("logprobs are not supported by this server")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0.0):
                raise RequestError(f"{name} is not supported by this server (only 0)")
        if self.repetition_penalty not in (None, 1.0):
            raise RequestError("repetition_penalty is not supported by this server (only 1)")
        if self.logit_bias:
            raise RequestError("logit_bias is not supported by this server")
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only allowed when stream=true")

    def effective_max_tokens(self) -> int | None:
        return self.max_tokens

    def to_sampling_params(self, default_max_tokens: int | None) -> SamplingParams:
        """OpenAI defaults: temperature 1, top_p 1; max_tokens None = up to the context length
        (completions default to 16 tokens, as OpenAI's legacy endpoint does)."""
        max_tokens = self.effective_max_tokens()
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            seed=self.seed,
            max_tokens=default_max_tokens if max_tokens is None else max_tokens,
            stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    # one prompt: text or token ids; a list holding exactly one prompt is accepted too
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise RequestError("echo is not supported by this server")
        if self.suffix:
            raise RequestError("suffix is not supported by this server")

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, str):
            return p
        if not p:
            raise RequestError("prompt is empty")
        if all(isinstance(t, int) for t in p):
            return list(p)  # token ids
        if len(p) != 1:
            raise RequestError(f"batched prompts are not supported: got {len(p)} prompts, send one per request")
        return p[0]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ... pass through to the template

    role: str
    content: str | list[TextPart] | None = None

    def as_template_dict(self) -> dict[str, Any]:
        d = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            d["content"] = "".join(part.text for part in self.content)
        elif self.content is None:
            d["content"] = ""
        return d


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens

    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---- responses ------------------------------------------------------------------------------------


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SpecDecodeMetrics(BaseModel):
    """Per-request speculative-decoding statistics (vLLM's `metrics.speculative_decoding` names).
    mean_acceptance_length = 1 + accepted / drafts (the bonus token included)."""

    model_config = ConfigDict(extra="allow")

    mean_acceptance_length: float = 1.0
    draft_acceptance_rate: float = 0.0
    num_spec_steps: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0


class ResponseMetrics(BaseModel):
    speculative_decoding: SpecDecodeMetrics | None = None


def _now() -> int:
    return int(time.time())


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    metrics: ResponseMetrics | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    metrics: ResponseMetrics | None = None
    prompt_token_ids: list[int] | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionChunk(BaseModel):
    """One SSE event of a chat stream; the usage-only last chunk has `choices=[]`."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
    metrics: ResponseMetrics | None = None


class CompletionChunk(BaseModel):
    """One SSE event of a completions stream (OpenAI uses `text_completion` for chunks too)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    metrics: ResponseMetrics | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "specray"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    """OpenAI's error envelope; 422s also carry FastAPI's `detail` list of validation errors."""

    error: ErrorInfo
    detail: list[dict[str, Any]] | None = None


ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    405: "MethodNotAllowed",
    422: "UnprocessableEntityError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


def error_response(status: int, message: str, param: str | None = None,
                   detail: list[dict[str, Any]] | None = None) -> ErrorResponse:
    return ErrorResponse(
        error=ErrorInfo(message=message, type=ERROR_TYPES.get(status, "Error"), param=param, code=status),
        detail=detail,
    )
