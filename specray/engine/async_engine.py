"""`AsyncLLMEngine`: an asyncio front for `LLMEngine`, with one async generator per request.

Owns the background step loop and a queue of `RequestOutput`s per live request. Engine calls
(`add_request`, `abort`, `step`) are serialised by one lock; `step` runs in a worker thread so the
event loop keeps serving. A consumer that stops iterating (client disconnect) aborts its request,
which frees its pages at once. If a step raises, every pending request ends with that error.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

from specray.config import EngineConfig
from specray.engine.llm_engine import LLMEngine
from specray.engine.sampling_params import SamplingParams
from specray.engine.sequence import RequestOutput


class EngineDeadError(RuntimeError):
    """The engine loop failed; pending and new requests end with this error."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._lock: asyncio.Lock | None = None
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._ids = itertools.count()
        self.errored: BaseException | None = None

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncLLMEngine:
        return cls(LLMEngine(config))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def _ensure_started(self) -> None:
        if self._task is None or self._task.done():
            self._lock = asyncio.Lock()
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="specray-engine-loop")

    async def _loop(self) -> None:
        assert self._lock is not None and self._wakeup is not None
        while True:
            if not self.engine.has_unfinished_requests():
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            async with self._lock:
                try:
                    outputs = await asyncio.to_thread(self.engine.step)
                except Exception as e:  # noqa: BLE001 - every pending request gets the error
                    self.errored = e
                    for rid, q in list(self._queues.items()):
                        q.put_nowait(EngineDeadError(f"engine step failed: {e!r}"))
                        self.engine.abort(rid)
                    self._queues.clear()
                    continue
            for out in outputs:
                q = self._queues.get(out.request_id)
                if q is not None:
                    q.put_nowait(out)
            await asyncio.sleep(0)

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield a `RequestOutput` per new token; the last has `finished=True`. Bad input raises
        before the first yield (`RequestError` and subclasses)."""
        self._ensure_started()
        assert self._lock is not None and self._wakeup is not None
        request_id = request_id or f"req-{next(self._ids)}"
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        async with self._lock:
            self.engine.add_request(request_id, prompt, params)
            self._queues[request_id] = queue
        self._wakeup.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                await self.abort(request_id)

    async def abort(self, request_id: str) -> bool:
        if self._lock is None:
            return self.engine.abort(request_id)
        async with self._lock:
            return self.engine.abort(request_id)

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
            self._task = None
