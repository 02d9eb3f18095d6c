"""The shared-memory control-plane channel against an oracle of the messages sent: every reader, in
another process, gets every message in order and intact, including messages larger than a slot (split
over several) and more messages than the ring has slots (the writer must wait for slow readers)."""

from __future__ import annotations

import multiprocessing as mp
import os
import random

import pytest

from specray.actors.shm_channel import ShmChannel, channel_path


def _messages(seed: int, n: int) -> list[object]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        size = rng.choice([0, 1, 10, 300, 5000])  # 5000 ints pickle to several 4 KiB slots
        out.append((i, "op", [rng.randrange(1 << 40) for _ in range(size)]))
    return out


def _reader(path: str, readers: int, index: int, n: int, slow: bool, spin: float, q) -> None:
    chan = ShmChannel.attach(path, readers, index, num_slots=4, slot_bytes=4096, spin_s=spin)
    got = []
    for _ in range(n):
        got.append(chan.read(timeout=60))
        if slow and len(got) % 7 == 0:
            import time

            time.sleep(0.01)
    q.put((index, got))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("spin", [0, 0.01])  # CPU worlds never busy-wait; GPU worlds spin first
def test_readers_get_every_message_in_order(tmp_path, spin):
    n, readers = 60, 2
    path = channel_path(f"test{os.getpid()}-{spin}", "plan")
    writer = ShmChannel.create(path, readers, num_slots=4, slot_bytes=4096, spin_s=spin)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_reader, args=(path, readers, i, n, i == 1, spin, q)) for i in range(readers)]
    for p in procs:
        p.start()
    try:
        sent = _messages(0, n)
        for m in sent:
            writer.write(m)
        results = dict(q.get(timeout=90) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
        writer.unlink()
        writer.close()
    assert results[0] == sent
    assert results[1] == sent


def test_read_timeout_and_wrong_end(tmp_path):
    path = channel_path(f"test{os.getpid()}", "t")
    w = ShmChannel.create(path, 1, num_slots=2, slot_bytes=64)
    r = ShmChannel.attach(path, 1, 0, num_slots=2, slot_bytes=64)
    w.unlink()  # both ends stay mapped
    assert not os.path.exists(path)
    with pytest.raises(TimeoutError):
        r.read(timeout=0.2)
    with pytest.raises(RuntimeError, match="reader end"):
        r.write(1)
    with pytest.raises(RuntimeError, match="writer end"):
        w.read()
    import threading

    got = []
    t = threading.Thread(target=lambda: got.append(r.read(timeout=30)))
    t.start()
    w.write({"a": list(range(100))})  # 100 ints: several 64-byte slots through a 2-slot ring
    t.join(timeout=30)
    assert got == [{"a": list(range(100))}]


def test_waiter_spins_for_its_time_then_backs_off(monkeypatch):
    """A wait busy-checks (no sleep call at all) until `spin_s` has passed, then yields, then sleeps."""
    import specray.actors.shm_channel as S

    now = [100.0]
    sleeps: list[float] = []
    monkeypatch.setattr(S.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(S.time, "sleep", sleeps.append)
    wait = S._Waiter(0.05)
    for _ in range(1, 10 * S._CLOCK_EVERY):
        now[0] += 1e-6  # 10 µs of polling per 10 checks: far less than 50 ms
        wait()
    assert sleeps == []
    now[0] += 0.05
    wait()  # check 10 * _CLOCK_EVERY reads the clock
    assert sleeps == [0] and wait.checks == 10 * S._CLOCK_EVERY  # the spin is over: yield
    for _ in range(1, 1_000):
        wait()
    assert sleeps[-1] == 50e-6  # then short sleeps
    no_spin = S._Waiter(0.0)
    no_spin()
    assert sleeps[-1] == 0 and len(sleeps) == 1_001  # CPU worlds: back off from the first check


def test_spin_config_and_layout_default():
    """`control_plane_spin_ms` and `tp_fused_sum` are validated with a message naming the field; a world's spin is
    the configured one on every channel, else 2 ms on the NCCL step-plan channel and none elsewhere."""
    from specray.actors.shm_channel import DEFAULT_SPIN_S
    from specray.actors.world import Layout
    from specray.config import EngineConfig
    from specray.errors import ConfigError

    for bad in (-1, 20_000, True, "fast", float("nan")):
        with pytest.raises(ConfigError, match="control_plane_spin_ms"):
            EngineConfig(control_plane_spin_ms=bad)
    with pytest.raises(ConfigError, match="tp_fused_sum"):
        EngineConfig(tp_fused_sum="scatter")
    assert EngineConfig(control_plane_spin_ms=0).control_plane_spin_ms == 0
    nccl, gloo = Layout(2, True, "nccl"), Layout(2, True, "gloo")
    assert nccl.channel_spin_s("plan") == DEFAULT_SPIN_S == 0.002
    assert nccl.channel_spin_s("to_draft") == nccl.channel_spin_s("from_draft") == 0.0
    assert gloo.channel_spin_s("plan") == gloo.channel_spin_s("to_draft") == 0.0
    assert all(Layout(2, True, "nccl", 0.01).channel_spin_s(c) == 0.01 for c in ("plan", "to_draft", "from_draft"))


def test_a_waiting_reader_sleeps_on_its_doorbell_and_wakes_on_a_message(monkeypatch):
    """A reader with no spin sleeps on its doorbell: over a 0.4 s wait its thread uses little CPU, and the ring
    wakes it as soon as the message is written (the long sleeps' limit is raised to 5 s here, so past the
    short sleeps only a ring can end one in time)."""
    import threading
    import time

    import specray.actors.shm_channel as S

    monkeypatch.setattr(S, "_BELL_LONG_S", 5.0)

    path = channel_path(f"test{os.getpid()}", "bell")
    w = ShmChannel.create(path, 1, num_slots=2, slot_bytes=64)
    r = ShmChannel.attach(path, 1, 0, num_slots=2, slot_bytes=64)
    w.unlink()
    assert not os.path.exists(f"{path}.bell0")  # the doorbells' names go with the ring's
    got: list = []

    def read() -> None:
        cpu0 = time.thread_time()
        got.append(r.read(timeout=30))
        got.append(time.perf_counter())
        got.append(time.thread_time() - cpu0)

    t = threading.Thread(target=read)
    t.start()
    time.sleep(0.4)
    sent_at = time.perf_counter()
    w.write(("step", [1, 2, 3]))
    t.join(timeout=30)
    msg, woke_at, cpu = got
    assert msg == ("step", [1, 2, 3])
    assert woke_at - sent_at < 0.5  # the ring woke it, not a long sleep's 5 s limit
    assert cpu < 0.05, f"the waiting reader used {cpu:.3f} s of CPU in 0.4 s"
    w.close()
    r.close()


def test_rings_left_unread_neither_block_the_writer_nor_lose_a_message():
    """70,000 messages read without the reader ever sleeping leave more rings than a FIFO holds (64 KiB):
    the writer drops the extra ones; the reader's next sleep wakes early once, then waits for the next ring."""
    import threading

    path = channel_path(f"test{os.getpid()}", "full")
    w = ShmChannel.create(path, 1, num_slots=4, slot_bytes=64)
    r = ShmChannel.attach(path, 1, 0, num_slots=4, slot_bytes=64)
    w.unlink()
    for i in range(70_000):
        w.write(i)
        assert r.read(timeout=5) == i
    got = []
    t = threading.Thread(target=lambda: got.append(r.read(timeout=30)))
    t.start()
    t.join(timeout=0.3)
    assert t.is_alive() and not got  # stale rings drained, nothing read that was not sent
    w.write("last")
    t.join(timeout=30)
    assert got == ["last"]
    w.close()
    r.close()


def test_doorbell_sleeps_are_short_first_then_long(monkeypatch):
    """Past its spin, a reader's wait sleeps on the doorbell: `_BELL_SHORT_WAITS` sleeps of 50 µs (a shallow
    idle state, quick to wake), then 10 ms ones; a ring ends a sleep early and is drained."""
    import specray.actors.shm_channel as S

    limits: list[float] = []
    ready = [False]
    drained: list[int] = []
    monkeypatch.setattr(S.select, "select", lambda r, w, x, t: (limits.append(t), (r if ready[0] else [], [], []))[1])
    monkeypatch.setattr(S.os, "read", lambda fd, n: (drained.append(fd), b"\0")[1])
    wait = S._Waiter(0.0, bell=42)
    for _ in range(S._BELL_SHORT_WAITS + 3):
        wait()
    assert limits == [S._BELL_SHORT_S] * S._BELL_SHORT_WAITS + [S._BELL_LONG_S] * 3
    assert S._BELL_SHORT_S == 50e-6 and S._BELL_LONG_S == 0.01 and drained == []
    ready[0] = True
    wait()
    assert drained == [42]
