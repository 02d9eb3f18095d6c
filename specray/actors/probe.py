"""Host-side health of one engine process: what its garbage collector, scheduler and host ops cost.

Owns, per process, the garbage-collector timer (`GcTimer`, installed once through `gc.callbacks`) and
nothing else. `host_counters()` snapshots cumulative counters (GC time and passes by generation, CPU
time, voluntary and involuntary context switches) so a caller can diff two snapshots over a timed
window. `probe()` times a fixed set of host operations in the calling thread: a pure-Python loop,
small CPU tensors, pinned host-to-device copies, kernel launches and launch-plus-sync round trips.

Both exist to compare processes that run the same engine code: the driver, a Ray task and a Ray
actor (`benchmarks/distributed.py`, overhead section). They read clocks and `/proc`; nothing here
changes how the engine runs.
"""

from __future__ import annotations

import gc
import os
import resource
import statistics
import sys
import threading
import time
from typing import Any

import torch


class GcTimer:
    """Wall time and passes of the garbage collector, by generation, since install."""

    _installed: GcTimer | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self.passes = [0, 0, 0]
        self._t0 = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            gen = min(int(info.get("generation", 0)), 2)
            self.seconds[gen] += time.perf_counter() - self._t0
            self.passes[gen] += 1

    @classmethod
    def install(cls) -> GcTimer:
        with cls._lock:
            if cls._installed is None:
                cls._installed = cls()
                gc.callbacks.append(cls._installed._callback)
            return cls._installed


def host_counters() -> dict[str, float]:
    """Cumulative counters of this process (diff two snapshots for a window)."""
    timer = GcTimer.install()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out: dict[str, float] = {"cpu_user_s": ru.ru_utime, "cpu_sys_s": ru.ru_stime,
                             "voluntary_switches": ru.ru_nvcsw, "involuntary_switches": ru.ru_nivcsw}
    for g in range(3):
        out[f"gc{g}_s"] = timer.seconds[g]
        out[f"gc{g}_passes"] = timer.passes[g]
    return out


def _median_us(fn, repeats: int, inner: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) / inner * 1e6)
    return statistics.median(times)


def _python_work() -> None:
    d: dict[int, int] = {}
    acc = []
    for i in range(2000):
        d[i & 63] = d.get(i & 63, 0) + i
        acc.append((i, d[i & 63]))


def probe(device: torch.device) -> dict[str, Any]:
    """Time host operations in this thread (µs per operation, median of 7 repeats) and describe the process."""
    out: dict[str, Any] = {
        "pid": os.getpid(),
        "python_2k_loop_us": _median_us(_python_work, 7, 1),
        "threads": threading.active_count(),
        "os_threads": _proc_status("Threads"),
        "cpus_allowed": len(os.sched_getaffinity(0)),
        "affinity": sorted(os.sched_getaffinity(0))[:8],
        "loadavg_1m": os.getloadavg()[0],
        "switch_interval_s": sys.getswitchinterval(),
        "gc_tracked_objects": len(gc.get_objects()),
        "gc_threshold": gc.get_threshold(),
        "gc_frozen": gc.get_freeze_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    vals = list(range(16))
    out["cpu_tensor_us"] = _median_us(lambda: [torch.tensor(vals, dtype=torch.int32) for _ in range(200)], 7, 200)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out["gpu"] = {"name": props.name, "pci_bus_id": getattr(props, "pci_bus_id", None),
                      "uuid": str(getattr(props, "uuid", ""))}
        x = torch.zeros(16, device=device)
        host = torch.zeros(16, pin_memory=True)

        def launches() -> None:
            for _ in range(500):
                x.add_(1)
            torch.cuda.synchronize(device)

        def copies() -> None:
            for _ in range(200):
                x.copy_(host, non_blocking=True)
            torch.cuda.synchronize(device)

        def round_trips() -> None:
            for _ in range(100):
                x.add_(1)
                x[0].item()

        launches()
        out["launch_us"] = _median_us(launches, 7, 500)
        out["pinned_h2d_us"] = _median_us(copies, 7, 200)
        out["launch_sync_us"] = _median_us(round_trips, 7, 100)
    return out


def _proc_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None
