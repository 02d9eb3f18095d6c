"""specray.actors.probe: the GC timer counts real collections, and the probe times host operations."""

import gc

import torch

from specray.actors.probe import host_counters, probe


def test_gc_timer_counts_full_collections() -> None:
    before = host_counters()
    for _ in range(3):
        gc.collect()
    after = host_counters()
    assert after["gc2_passes"] - before["gc2_passes"] == 3
    assert after["gc2_s"] > before["gc2_s"]
    assert after["cpu_user_s"] + after["cpu_sys_s"] >= before["cpu_user_s"] + before["cpu_sys_s"]


def test_probe_on_cpu() -> None:
    out = probe(torch.device("cpu"))
    assert out["python_2k_loop_us"] > 0 and out["cpu_tensor_us"] > 0
    assert out["cpus_allowed"] >= 1 and out["os_threads"] >= 1
    assert "launch_us" not in out  # no device work on a CPU probe
