"""Incremental detokenization and stop-string matching for streamed output.

`IncrementalDetokenizer` owns one request's output ids and the text emitted from them so far. It
decodes only a short window of ids per step (a prefix/read offset pair over prompt + output ids),
so the cost per token stays bounded, and it holds text back while the window's decoded tail ends
in U+FFFD (an incomplete UTF-8 sequence split across byte-level tokens).

`find_stop` and `stop_holdback` are stateless helpers over the output text: the first looks for a
stop string completed by the newest text, the second says how many trailing characters must not be
streamed yet because they could be the start of a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

from specray.models.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
# Prompt ids decoded ahead of the first output token, so tokenizers whose decoding of a token
# depends on what precedes it (a leading-space marker, a split character) see some context.
_PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    """Turns a request's output ids into text deltas, one `append` per engine step.

    `text` (the concatenation of the deltas) equals `tokenizer.decode(output_ids)` once the request
    ends and `flush()` has run; mid-stream it lags only by an incomplete trailing character. One
    exception, on purpose: with a prompt, SentencePiece-style decoders keep the first output word's
    leading space (decode(prompt) + text == decode(prompt + output)), which a standalone decode of
    the output drops.

    State: `_ids` = the last few prompt ids + all output ids. Text decoded from
    `_ids[_prefix_offset:_read_offset]` is `_prefix_text` and has been emitted; ids from
    `_read_offset` on have not been turned into text yet (their decoded tail was incomplete).
    Each step decodes only `_ids[_prefix_offset:]`, so the cost per token stays bounded.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_ids[max(0, len(prompt_ids) - _PROMPT_CONTEXT) :])
        self._ids: list[int] = context  # context prompt ids + all output ids
        self._num_context = len(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text = self._decode(0, len(context))  # decode of ids[prefix:read]
        self._text = ""

    def _decode(self, start: int, end: int) -> str:
        if end <= start:
            return ""
        return self.tokenizer.decode(self._ids[start:end], skip_special_tokens=self.skip_special_tokens)

    @property
    def output_ids(self) -> list[int]:
        return self._ids[self._num_context :]

    @property
    def text(self) -> str:
        """All output text emitted so far (the concatenation of the deltas returned)."""
        return self._text

    @property
    def num_pending_ids(self) -> int:
        """Output ids received but not yet turned into text (an incomplete character)."""
        return len(self._ids) - self._read_offset

    def append(self, new_ids: Sequence[int]) -> str:
        """Add generated ids; return the text they complete (possibly "")."""
        out: list[str] = []
        for token_id in new_ids:  # one id at a time: a complete prefix of a chunk is emitted at once
            self._ids.append(int(token_id))
            new_text = self._decode(self._prefix_offset, len(self._ids))
            if len(new_text) > len(self._prefix_text) and not new_text.endswith(_REPLACEMENT):
                delta = new_text[len(self._prefix_text) :]
                self._prefix_offset = self._read_offset
                self._read_offset = len(self._ids)
                self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
                out.append(delta)
        delta = "".join(out)
        self._text += delta
        return delta

    def flush(self) -> str:
        """At the end of a request: emit what is still held back, U+FFFD included."""
        if self._read_offset == len(self._ids):
            return ""
        new_text = self._decode(self._prefix_offset, len(self._ids))
        delta = new_text[len(self._prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        self._text += delta
        return delta


def find_stop(text: str, new_text_len: int, stops: Sequence[str], include_stop: bool) -> int | None:
    """Where to cut `text` for the first stop string completed by its last `new_text_len` chars.

    Only matches that end inside the new text are looked for (older ones were checked on earlier
    steps), so the scan covers at most the last new_text_len + len(stop) - 1 chars per stop. Among
    several new matches the one that completes first wins (ties: the one starting first). Returns
    the end of the match if `include_stop` else its start, or None.
    """
    if new_text_len <= 0 or not stops:
        return None
    old_len = len(text) - new_text_len
    best: tuple[int, int] | None = None  # (end, start)
    for stop in stops:
        if not stop:
            continue
        start = text.find(stop, max(0, old_len - len(stop) + 1))
        if start < 0:
            continue
        match = (start + len(stop), start)
        if best is None or match < best:
            best = match
    if best is None:
        return None
    return best[0] if include_stop else best[1]


def stop_holdback(text: str, stops: Sequence[str]) -> int:
    """How many trailing chars of `text` are a proper prefix of some stop string (0 if none).

    A streamer sends `text[:len(text) - stop_holdback(text, stops)]`, so a stop string that is
    later completed and cut away never has its start streamed. The sent length never decreases.
    """
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return hold
