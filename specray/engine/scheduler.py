"""Continuous-batching scheduler: waiting and running queues, chunked prefill, page admission, preemption.

Owns the queues and decides, each step, which sequences compute how many tokens under the token
budget `max_num_batched_tokens`:

1. Running sequences first, in admission order: a decode takes 1 token, an unfinished prefill takes
   the next chunk of what budget is left, so a 32K-token prompt never stalls running decodes.
2. Then waiting sequences are admitted (FCFS) only when pages for their whole prompt (+1 token) are
   free; otherwise they wait, they do not fail.
3. A decode that needs a page when none is free preempts the most recently admitted running
   sequence (its pages are freed and it is recomputed later).

Page ownership: a sequence's `pages` are allocated here and freed here (finish, abort, preempt).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from specray.config import SchedulerConfig
from specray.engine.kv_cache import PageAllocator, pages_needed
from specray.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    # sequences that could not grow even alone (cache too small): finished with reason "length"
    out_of_pages: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.seqs

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def decode_only(self) -> bool:
        return all(n == 1 for n in self.num_new_tokens)


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, allocator: PageAllocator, page_size: int):
        self.cfg = cfg
        self.allocator = allocator
        self.page_size = page_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    # ---- queue management ----------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark finished and free its pages at once (finish, abort or error)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = seq.finish_reason or reason
        self.allocator.free(seq.pages)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.free(seq.pages)
        seq.num_computed = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    # ---- one step ------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.cfg.max_num_batched_tokens
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_uncomputed, budget)
            if n <= 0:
                continue
            if not self._grow(seq, seq.num_computed + n, batch):
                continue
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n

        while budget > 0 and self.can_admit():
            seq = self.waiting[0]
            need = pages_needed(seq.num_tokens + 1, self.page_size) - len(seq.pages)
            if not self.allocator.can_allocate(need):
                break  # FCFS: it waits for pages to free up
            self.waiting.popleft()
            seq.pages.extend(self.allocator.allocate(need))
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed, budget)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        return batch

    def can_admit(self) -> bool:
        """Whether a waiting sequence may join the running ones (a free sequence slot; pages decide later)."""
        return bool(self.waiting) and len(self.running) < self.cfg.max_num_seqs

    def reserve_next_token(self, seqs: list[Sequence]) -> bool:
        """Give each decoding sequence pages for one more K/V entry past its next step's (num_computed + 2),
        all or none and without preempting: a step launched ahead of its scheduling (async scheduling)
        needs them, and `schedule()` then finds them in place."""
        need = [pages_needed(s.num_computed + 2, self.page_size) - len(s.pages) for s in seqs]
        if not self.allocator.can_allocate(sum(n for n in need if n > 0)):
            return False
        for seq, n in zip(seqs, need, strict=True):
            if n > 0:
                seq.pages.extend(self.allocator.allocate(n))
        return True

    def _grow(self, seq: Sequence, num_tokens: int, batch: ScheduledBatch) -> bool:
        """Give `seq` pages for `num_tokens` K/V entries, preempting later sequences if needed."""
        need = pages_needed(num_tokens, self.page_size) - len(seq.pages)
        while need > 0 and not self.allocator.can_allocate(need):
            victim = self.running[-1]
            if victim in batch.seqs:  # never preempt what this step already scheduled
                victim = seq
            if victim is seq:
                if len(self.running) == 1 and self.allocator.num_used == len(seq.pages):
                    batch.out_of_pages.append(seq)  # alone and still no room: the cache is too small
                    return False
                self._preempt(seq)
                return False
            self._preempt(victim)
        if need > 0:
            seq.pages.extend(self.allocator.allocate(need))
        return True
