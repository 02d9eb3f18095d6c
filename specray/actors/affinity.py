"""CPU placement of an engine's processes (`EngineConfig.cpu_affinity`).

Owns nothing but the mapping from an engine member (shard rank, then the draft) to the CPUs of one physical
core. Each member runs one busy host thread (the leader's step loop, a follower's plan loop, the draft's
serve loop); left to the OS scheduler, two of them can share a physical core's hardware threads, and one
side's control-plane spin then slows the other's host work. With "cores" each member gets a physical core of
its own, all of its hardware threads, from the cores this process may use: member i takes core 1 + i (the
first core is left to the OS and Ray's daemons). Off by default: two engines on one node would share cores.
"""

from __future__ import annotations

import os
from pathlib import Path


def physical_cores(cpus: set[int] | None = None) -> list[list[int]]:
    """The allowed CPUs grouped by physical core (hardware-thread siblings together), in CPU order."""
    cpus = set(os.sched_getaffinity(0)) if cpus is None else cpus
    cores: dict[tuple[str, str], list[int]] = {}
    for cpu in sorted(cpus):
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            key = ((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip())
        except OSError:  # no topology (containers, non-Linux): every CPU is its own core
            key = (str(cpu), "")
        cores.setdefault(key, []).append(cpu)
    return sorted(cores.values(), key=lambda c: c[0])


def core_for(index: int, cores: list[list[int]]) -> list[int]:
    """CPUs of member `index`'s core: core 1 + index, wrapping around (core 0 only when there is one)."""
    if len(cores) == 1:
        return cores[0]
    return cores[1 + index % (len(cores) - 1)]


def pin_process(cpus: list[int]) -> None:
    """Pin every thread of this process (and so the threads it starts later) to `cpus`."""
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else [0]:
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, PermissionError):  # a thread that just exited; a thread we may not move
            pass
