"""A single-writer, multi-reader message ring in shared memory: the per-step control plane of one engine.

Owns one memory-mapped file under /dev/shm: a header with the writer's sequence number and one read
sequence per reader, then `num_slots` slots of `slot_bytes` payload each. A message is pickled and cut
into slot-sized chunks; the writer waits for a slot that every reader has consumed, copies the chunk in,
and only then publishes it by bumping the write sequence, so a reader never sees a half-written chunk.

All processes of an engine sit on one node (the placement group is `STRICT_PACK`), so this replaces a
gloo object broadcast (two TCP collectives and pickling into tensors: about 1-2 ms per step) with a
memory copy and a poll (tens of µs). With `spin_s` > 0 a reader first busy-checks for that many seconds
(a GPU engine's step-plan channel: each plan is seen within a microsecond). Then it sleeps on its doorbell:
a FIFO next to the ring, one per reader, into which the writer puts a byte after each chunk it publishes.
The sleeper wakes when the message is there, where a sleep-and-poll back-off wakes up to a sleep's
length late. Its first sleeps are short (50 µs; see `_BELL_SHORT_S`), later ones long, so an idle engine
costs almost no CPU. Bytes left from chunks read without sleeping only cause one early wake-up; a full
FIFO drops the byte, since one is already pending. A writer waiting for a free slot (rare) polls: 1,000
yields, then 50 µs and 1 ms sleeps. A busy waiter slows the process that is working: on 2 H200s a 50 ms
spin made the separate-draft step 0.6 ms slower, and even a 2 ms spin cost it 0.43 and 0.57 ms against
none (BENCHMARKS.md), so the draft exchange, whose waits span a whole draft or verify phase, does not spin
by default (`world.Layout.channel_spin_s`). CPU (gloo) engines use no spin at all: their shards need every
core for compute, and spinning waiters starve them and Ray's own daemons.

Ordering relies on the writer's stores becoming visible in program order (x86-64 TSO: the data before
the sequence number); the sequence words are 8-byte aligned, so each is written and read whole.
"""

from __future__ import annotations

import mmap
import os
import pickle
import select
import time
from pathlib import Path

_LINE = 64  # one cache line per sequence word: no false sharing between readers
_SLOT_HEADER = 16  # u64 chunk length, u64 1 if it is the message's last chunk


DEFAULT_SPIN_S = 0.002  # GPU worlds: seconds of busy checks before yielding (see the module docstring)
_CLOCK_EVERY = 256  # busy checks between clock reads
# a doorbell sleep ends after this even without a ring (and the ring is checked again). The first
# `_BELL_SHORT_WAITS` sleeps of a wait are short: a CPU idle governor that sees only short sleeps keeps the
# core in a shallow idle state, which wakes within µs when the ring comes. On 2 H200s long sleeps from the
# start made the draft exchange 0.28 ms per step against 0.12-0.15 ms for a 50 µs sleep-poll. A wait that
# lasts (an idle engine) goes on in long sleeps: almost no CPU.
_BELL_SHORT_S = 50e-6
_BELL_SHORT_WAITS = 500
_BELL_LONG_S = 0.01


class _Waiter:
    """Poll policy of one wait, called once per failed check: busy checks for `spin_s` seconds; then, with a
    doorbell (a reader's FIFO, read end, non-blocking), a sleep until it rings or a time limit passes: 50 µs
    for the first `_BELL_SHORT_WAITS` sleeps, then 10 ms; without one, 1,000 yields, then 50 µs sleeps, then
    1 ms sleeps. `checks` counts the calls."""

    __slots__ = ("checks", "spin_until", "spinning", "slept", "bell")

    def __init__(self, spin_s: float, bell: int | None = None):
        self.spinning = spin_s > 0
        self.spin_until = time.perf_counter() + spin_s if self.spinning else 0.0
        self.checks = self.slept = 0
        self.bell = bell

    def __call__(self) -> None:
        self.checks += 1
        if self.spinning:
            if self.checks % _CLOCK_EVERY or time.perf_counter() < self.spin_until:
                return
            self.spinning = False
        self.slept += 1
        if self.bell is not None:
            limit = _BELL_SHORT_S if self.slept <= _BELL_SHORT_WAITS else _BELL_LONG_S
            if select.select([self.bell], [], [], limit)[0]:
                try:
                    os.read(self.bell, 4096)  # every pending ring: the caller checks the ring itself next
                except BlockingIOError:
                    pass
            return
        if self.slept < 1_000:
            time.sleep(0)
        elif self.slept < 11_000:
            time.sleep(50e-6)
        else:
            time.sleep(1e-3)


class ShmChannel:
    """One end of a channel: the writer (`reader=None`) or reader number `reader` of `num_readers`."""

    def __init__(self, path: str, num_readers: int, num_slots: int, slot_bytes: int, reader: int | None,
                 spin_s: float = 0.0):
        if num_readers < 1 or num_slots < 1 or slot_bytes < 1:
            raise ValueError(f"bad channel shape: readers {num_readers}, slots {num_slots}, slot bytes {slot_bytes}")
        self.path, self.num_readers, self.num_slots, self.slot_bytes = path, num_readers, num_slots, slot_bytes
        self.reader, self.spin_s = reader, spin_s
        self._slot_stride = _SLOT_HEADER + slot_bytes
        self._data_off = -(-(_LINE * (1 + num_readers)) // 4096) * 4096
        size = self._data_off + num_slots * self._slot_stride
        if reader is None:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.ftruncate(fd, size)
        else:
            fd = os.open(path, os.O_RDWR)
        try:
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._words = memoryview(self._mm).cast("Q")  # u64 view: index = byte offset // 8
        self._seq = 0  # next chunk this end writes or reads
        self._bells: list[int] = []  # the writer: each reader's doorbell (FIFO opened read-write: never blocks)
        self._bell: int | None = None  # a reader: its own doorbell's read end
        if reader is None:
            for r in range(num_readers):
                os.mkfifo(self._bell_path(r), 0o600)
                self._bells.append(os.open(self._bell_path(r), os.O_RDWR | os.O_NONBLOCK))
        else:
            self._seq = self._words[self._read_word(reader)]
            self._bell = os.open(self._bell_path(reader), os.O_RDONLY | os.O_NONBLOCK)

    @classmethod
    def create(cls, path: str, num_readers: int, num_slots: int = 8, slot_bytes: int = 1 << 20,
               spin_s: float = 0.0) -> ShmChannel:
        return cls(path, num_readers, num_slots, slot_bytes, None, spin_s)

    @classmethod
    def attach(cls, path: str, num_readers: int, reader: int, num_slots: int = 8, slot_bytes: int = 1 << 20,
               spin_s: float = 0.0) -> ShmChannel:
        return cls(path, num_readers, num_slots, slot_bytes, reader, spin_s)

    def _bell_path(self, reader: int) -> str:
        return f"{self.path}.bell{reader}"

    def unlink(self) -> None:
        """Remove the names; the mappings and doorbells stay valid (every end attaches before the creator
        unlinks)."""
        Path(self.path).unlink(missing_ok=True)
        for r in range(self.num_readers if self.reader is None else 0):
            Path(self._bell_path(r)).unlink(missing_ok=True)

    def close(self) -> None:
        for fd in self._bells + ([self._bell] if self._bell is not None else []):
            os.close(fd)
        self._bells, self._bell = [], None
        self._words.release()
        self._mm.close()

    def _ring(self) -> None:
        for fd in self._bells:
            try:
                os.write(fd, b"\0")
            except BlockingIOError:  # full: the reader has rings pending already
                pass

    @staticmethod
    def _read_word(reader: int) -> int:
        return _LINE * (1 + reader) // 8

    # ---- writer ---------------------------------------------------------------------------------
    def write(self, obj: object) -> None:
        """Publish one message to every reader; waits while the ring is full."""
        if self.reader is not None:
            raise RuntimeError("write on a reader end of a channel")
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        view = memoryview(data)
        chunks = max(1, -(-len(data) // self.slot_bytes))
        words, mm = self._words, self._mm
        for c in range(chunks):
            seq = self._seq
            wait = None  # made on the first failed check: no clock read when the slot is free at once
            while seq - min(words[self._read_word(r)] for r in range(self.num_readers)) >= self.num_slots:
                wait = wait or _Waiter(self.spin_s)
                wait()
            part = view[c * self.slot_bytes : (c + 1) * self.slot_bytes]
            off = self._data_off + (seq % self.num_slots) * self._slot_stride
            mm[off + _SLOT_HEADER : off + _SLOT_HEADER + len(part)] = part
            words[off // 8] = len(part)
            words[off // 8 + 1] = int(c == chunks - 1)
            self._seq = seq + 1
            words[0] = seq + 1  # publish after the data
            self._ring()

    # ---- reader ---------------------------------------------------------------------------------
    def read(self, timeout: float | None = None) -> object:
        """The next message; TimeoutError after `timeout` seconds without one (None: wait forever)."""
        if self.reader is None:
            raise RuntimeError("read on the writer end of a channel")
        words, mm = self._words, self._mm
        parts: list[bytes] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            seq = self._seq
            wait = None  # made on the first failed check: no clock read when a message is already there
            while words[0] <= seq:
                wait = wait or _Waiter(self.spin_s, self._bell)
                wait()
                if (deadline is not None and (wait.checks % 1024 == 0 or not wait.spinning)
                        and time.monotonic() > deadline):
                    raise TimeoutError(f"no message on {self.path} within {timeout} s")
            off = self._data_off + (seq % self.num_slots) * self._slot_stride
            n, last = words[off // 8], words[off // 8 + 1]
            parts.append(mm[off + _SLOT_HEADER : off + _SLOT_HEADER + n])
            self._seq = seq + 1
            words[self._read_word(self.reader)] = seq + 1  # the slot is free again
            if last:
                return pickle.loads(parts[0] if len(parts) == 1 else b"".join(parts))


def channel_path(tag: str, name: str) -> str:
    """/dev/shm (tmpfs) where it exists, else the temp dir."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else os.environ.get("TMPDIR", "/tmp")
    return os.path.join(base, f"specray-{tag}-{name}")
