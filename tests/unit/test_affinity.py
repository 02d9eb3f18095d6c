"""`specray.actors.affinity`: CPUs grouped by physical core from the kernel's topology, one core per engine
member, and pinning that every thread of the process (and threads started later) obeys."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from specray.actors.affinity import core_for, physical_cores, pin_process
from specray.config import EngineConfig
from specray.errors import ConfigError


def test_cores_partition_the_allowed_cpus_by_sibling_lists():
    allowed = set(os.sched_getaffinity(0))
    cores = physical_cores(allowed)
    assert sorted(c for core in cores for c in core) == sorted(allowed)
    for core in cores:  # the oracle: the kernel's own sibling list of each CPU
        sib = Path(f"/sys/devices/system/cpu/cpu{core[0]}/topology/thread_siblings_list")
        if sib.exists():
            text = sib.read_text().strip()
            listed = set()
            for part in text.split(","):
                a, _, b = part.partition("-")
                listed.update(range(int(a), int(b or a) + 1))
            assert set(core) == listed & allowed


def test_members_take_cores_after_the_first_and_wrap():
    cores = [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert [core_for(i, cores) for i in range(4)] == [[1, 5], [2, 6], [3, 7], [1, 5]]
    assert core_for(3, [[0, 1]]) == [0, 1]


def test_pin_process_moves_every_thread_and_new_ones_inherit():
    before = os.sched_getaffinity(0)
    target = physical_cores()[0]
    seen: dict[str, set[int]] = {}
    started, stop = threading.Event(), threading.Event()

    def worker() -> None:
        started.set()
        stop.wait(5)
        seen["old"] = os.sched_getaffinity(0)

    t = threading.Thread(target=worker)
    t.start()
    started.wait(5)
    try:
        pin_process(target)
        late = threading.Thread(target=lambda: seen.__setitem__("new", os.sched_getaffinity(0)))
        late.start()
        late.join()
        stop.set()
        t.join()
        assert seen["old"] == set(target) and seen["new"] == set(target) and os.sched_getaffinity(0) == set(target)
    finally:
        pin_process(sorted(before))
    assert os.sched_getaffinity(0) == before


def test_config_rejects_an_unknown_affinity():
    assert EngineConfig(model="m", cpu_affinity="cores").cpu_affinity == "cores"
    with pytest.raises(ConfigError, match="cpu_affinity"):
        EngineConfig(model="m", cpu_affinity="numa")
