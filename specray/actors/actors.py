"""The Ray actors of a distributed engine: target shards (rank 0 is the leader) and the draft actor.

Ray only carries control and per-request traffic: start (`setup_device`, `init_world`, `build`), the
long-running loops (`follow` on follower shards, `serve` on the draft, the leader's step thread),
`add_request` / `abort` per request, one streaming generator (`stream`) that yields the leader's
`RequestOutput` batches as they are produced, `stats` and `stop`. Per step, shards and draft talk over
torch.distributed only (see `shard.py`, `draft.py`).

A `TargetShard` owns its `ShardEngine`; the leader also owns the step thread, the engine lock that
serialises `add_request` / `abort` with `step()`, and the output queue the stream drains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import threading
import time
import traceback
from typing import Any

import torch

from specray.actors import world as W
from specray.actors.probe import GcTimer, host_counters
from specray.config import EngineConfig
from specray.engine.sampling_params import SamplingParams


class _Member:
    """Device setup and world membership, common to shards and the draft."""

    device: torch.device = torch.device("cpu")
    world: W.World | None = None

    def node_info(self) -> tuple[str, list[str]]:
        import ray

        return ray.util.get_node_ip_address(), [str(g) for g in ray.get_gpu_ids()]

    def setup_device(self, use_gpu: bool, visible: list[str] | None = None, local_index: int = 0,
                     pin: int | None = None) -> str:
        """GPU: see `visible` (the node's engine GPUs, so NCCL can use peer links) and use
        `cuda:local_index`; before anything touches CUDA. CPU: one torch thread per bundle CPU.
        `pin`: this member's index for `EngineConfig.cpu_affinity` "cores" (see `specray.actors.affinity`)."""
        if pin is not None:
            from specray.actors.affinity import core_for, physical_cores, pin_process

            pin_process(core_for(pin, physical_cores()))
        if use_gpu:
            if visible:
                os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(visible)
            self.device = torch.device(f"cuda:{local_index}")
            torch.cuda.set_device(self.device)
        else:
            import ray

            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
            torch.set_num_threads(max(1, int(cpus)))
        return str(self.device)

    def _use_device(self) -> None:
        if self.device.type == "cuda":  # the current device is per thread
            torch.cuda.set_device(self.device)

    def free_address(self) -> tuple[str, int]:
        return W.free_address()

    def init_world(self, rank: int, layout: W.Layout, address: str, port: int) -> None:
        self._use_device()
        self.world = W.init_world(rank, layout, address, port, self.device)

    def ping(self) -> bool:
        return True

    def probe(self) -> dict[str, Any]:
        """Host operation timings of this process (`probe.probe`), in a Ray call thread."""
        from specray.actors.probe import probe

        self._use_device()
        return probe(self.device)

    def pid(self) -> int:
        return os.getpid()


class TargetShard(_Member):
    def __init__(self) -> None:
        self.engine = None
        self._lock = threading.Lock()
        self._waiters: list[None] = []  # one entry per control call waiting for the lock (list ops are atomic)
        self._wake = threading.Event()
        self._out: queue.Queue = queue.Queue()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.loop_timings = {"step_s": 0.0, "num_steps": 0}
        self._profile: dict[str, Any] | None = None  # see profile()

    def build(self, config: EngineConfig) -> dict[str, Any]:
        from specray.actors.shard import ShardEngine

        GcTimer.install()
        self._use_device()
        self.engine = ShardEngine(config, self.world)
        return {"num_pages": self.engine.cache.num_pages, "max_model_len": self.engine.max_model_len}

    # ---- followers ------------------------------------------------------------------------------
    def follow(self) -> None:
        from specray.actors.shard import follow

        self._use_device()
        follow(self.engine)

    # ---- leader ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="specray-leader", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        self._use_device()
        eng = self.engine
        while not self._stopping:
            if not eng.has_unfinished_requests():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            with self._lock:
                t0 = time.perf_counter()
                try:
                    if self._profile is not None:
                        self._profile_tick()
                    outs = eng.step()
                    self.loop_timings["step_s"] += time.perf_counter() - t0
                    self.loop_timings["num_steps"] += 1
                except Exception as e:  # noqa: BLE001 - the driver fails every pending request
                    self._out.put(("error", f"leader step failed: {e!r}\n{traceback.format_exc()}"))
                    return
                stats = self._counts()
            if outs:  # the driver keeps the prompt and the tokens so far: send only what is new
                self._out.put(("outputs", [dataclasses.replace(o, prompt_token_ids=[], token_ids=[]) for o in outs],
                               stats))
            if self._waiters:  # let control calls (add_request, abort, counts) take the lock between steps
                time.sleep(0)
            # otherwise straight on: the output stream's thread runs while this one waits (the draft, the
            # device), where a yield here made every step wait for it (0.35 ms per step on 2 H200s)

    @contextlib.contextmanager
    def _control(self):
        """The engine lock, for a control call: the step loop yields between steps while one waits."""
        self._waiters.append(None)
        try:
            self._lock.acquire()
        finally:
            self._waiters.pop()
        try:
            yield
        finally:
            self._lock.release()

    def profile(self, num_steps: int) -> None:
        """Profile the next `num_steps` leader steps (torch.profiler, CPU and CUDA, graph kernels included);
        `profile_result()` returns the kernel table once they ran."""
        with self._control():  # between steps: a window still open is closed first
            if self._profile is not None and self._profile["prof"] is not None:
                self._profile["prof"].__exit__(None, None, None)
            self._profile = {"left": num_steps + 1, "prof": None, "table": None}

    def _profile_tick(self) -> None:
        p = self._profile
        cuda = self.engine.device.type == "cuda"
        if p["prof"] is None and p["left"] > 0:
            from torch.profiler import ProfilerActivity, profile

            p["prof"] = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
            p["prof"].__enter__()
        p["left"] -= 1
        if p["left"] == 0 and p["prof"] is not None:
            if cuda:
                torch.cuda.synchronize()
            p["prof"].__exit__(None, None, None)
            p["table"] = p["prof"].key_averages().table(sort_by="device_time_total" if cuda else "cpu_time_total",
                                                        row_limit=40,
                                                        max_name_column_width=70)
            p["prof"], p["left"] = None, -1

    def profile_result(self) -> str | None:
        return None if self._profile is None else self._profile["table"]

    def _counts(self) -> dict[str, int]:
        eng = self.engine
        return {"num_running": eng.num_running, "num_waiting": eng.num_waiting, "pages_in_use": eng.pages_in_use()}

    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams | None) -> None:
        with self._control():
            self.engine.add_request(request_id, prompt, params)
        self._wake.set()

    def abort(self, request_id: str) -> bool:
        with self._control():
            return self.engine.abort(request_id)

    def stream(self):
        """Streaming generator: one item per batch of outputs, until stop or error."""
        while True:
            items = [self._out.get()]
            while True:
                try:
                    items.append(self._out.get_nowait())
                except queue.Empty:
                    break
            yield items
            if any(it[0] in ("error", "stopped") for it in items):
                return

    def counts(self) -> dict[str, int]:
        with self._control():
            return self._counts()

    def stats(self) -> dict[str, Any]:
        """Counters only the step thread writes; read without the lock (a snapshot may be one step
        stale), so a busy loop never delays it."""
        eng = self.engine
        out: dict[str, Any] = {"plan": dict(getattr(eng.runner, "timings", {})), "loop": dict(self.loop_timings),
                               "decode": dict(eng.runner.decode_timings), "host": host_counters(),
                               "async": dict(eng.async_stats)}
        reduce = getattr(eng.model, "reduce", None)  # TP > 1: how the shards all-reduce
        out["all_reduce"] = None if reduce is None else (
            "symmetric memory" if reduce.uses_symmetric_memory else f"torch.distributed ({reduce.fallback_reason})")
        if reduce is not None:
            out["all_reduce_rmsnorm"] = ("fused" if reduce.fuses_norm and eng.model.layers[0].mlp.down_proj.site == 1
                                         else reduce.fuse_reason)
        if eng.spec is not None:
            graphs = eng.spec.verify_graphs
            out["verify_graph_sizes"] = sorted(graphs.graphs) if graphs is not None else []
            out["spec"] = {"num_drafts": eng.spec.stats.num_drafts,
                           "num_draft_tokens": eng.spec.stats.num_draft_tokens,
                           "num_accepted_tokens": eng.spec.stats.num_accepted_tokens,
                           **eng.spec.timings, **dict(getattr(eng.spec.proposer, "timings", {}))}
            out["num_refreshes"] = getattr(eng.spec.proposer, "num_refreshes", None)
        return out

    def stop(self) -> None:
        """Graceful stop: end the step thread, release the followers and the draft."""
        self._stopping = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._control():
            self.engine.stop_followers()
            proposer = getattr(self.engine.spec, "proposer", None)
            if proposer is not None and hasattr(proposer, "stop"):
                proposer.stop()
        self._out.put(("stopped",))


class DraftHost(_Member):
    def __init__(self) -> None:
        self.worker = None

    def build(self, config: EngineConfig, target_num_pages: int, max_model_len: int) -> None:
        from specray.actors.draft import DraftWorker, TargetView, _CacheView
        from specray.engine.kv_cache import KVCacheSpec
        from specray.engine.llm_engine import _DTYPES
        from specray.engine.sampler import Sampler
        from specray.models.arch import ModelArch
        from specray.models.loader import load_checkpoint

        GcTimer.install()
        self._use_device()
        arch = ModelArch.from_hf_config(load_checkpoint(config.model, load_tokenizer=False).hf_config)
        dtype = _DTYPES.get(config.dtype) or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        view = TargetView(
            arch=arch, max_model_len=max_model_len, dtype=dtype, device=self.device, config=config,
            cache=_CacheView(KVCacheSpec.of(arch, config.cache.page_size, dtype), target_num_pages),
            sampler=Sampler(torch.Generator(device=self.device).manual_seed(config.seed)),
        )
        self.worker = DraftWorker(view, config.speculative_config, self.world, config.overlap)

    def serve(self) -> None:
        self._use_device()
        self.worker.serve()

    def stats(self) -> dict[str, Any]:
        w = self.worker
        return {**w.stats, "host": host_counters(), "num_refreshes": w.proposer.num_refreshes,
                "kv_bytes": w.proposer.kv_bytes(),
                "proposer": dict(w.proposer.timings)}
