"""One request's state while it lives in the engine, and what `LLMEngine.step()` returns for it.

`Sequence` owns the request's token ids (prompt + generated), its KV page table, how many tokens
have their K/V in the cache (`num_computed`), its sampling generator and its detokenizer state.
`RequestOutput` is the immutable per-step view handed to callers.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from specray.engine.sampling_params import RequestMetrics, SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_output_tokens: int  # max_tokens, capped by max_model_len - prompt length
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V is in the cache
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None  # stop | length | abort | error
    stop_reason: str | int | None = None
    detokenizer: Any = None  # IncrementalDetokenizer when the engine has a tokenizer
    text: str = ""  # output text after stop-string truncation
    sent_text_len: int = 0  # chars already streamed
    num_preemptions: int = 0
    spec_stats: Any = None  # specray.spec.types.SpecStats once a speculative step ran
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(arrival_time=time.monotonic()))

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    def token_slice(self, start: int, end: int) -> list[int]:
        n_prompt = len(self.prompt_ids)
        if end <= n_prompt:
            return self.prompt_ids[start:end]
        if start >= n_prompt:
            return self.output_ids[start - n_prompt : end - n_prompt]
        return self.prompt_ids[start:] + self.output_ids[: end - n_prompt]

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # all generated tokens so far
    new_token_ids: list[int]  # generated in this step
    text: str  # generated text so far (a possible stop-string prefix is held back until decided)
    delta_text: str  # text not returned before
    finished: bool
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    metrics: RequestMetrics | None = None
    error: str | None = None
    # metrics.speculative_decoding: mean_acceptance_length, draft_acceptance_rate, num_spec_steps, ...
    spec_metrics: dict[str, float] | None = None
