"""`DistributedEngine`: the `LLMEngine` interface over Ray actors (tensor-parallel target shards, and a
separate draft actor when `speculative_config.draft_placement` is `separate`).

Owns, in the caller's process: the tokenizer (encode / encode_chat / detokenized text arrives from the
leader), the set of live request ids, the queue of `RequestOutput` batches that a reader thread fills
from the leader's streaming generator, the health state and the actor handles. `step()` has
`LLMEngine.step()`'s meaning (outputs of requests that made progress) so `AsyncLLMEngine` drives it
unchanged; it blocks briefly for the next batch instead of computing it.

Faults: a monitor thread watches the followers' and the draft's loop calls and the leader's stream.
When any actor dies the engine turns unhealthy within about a second; `step()` then raises
`EngineUnhealthyError` (an `EngineDeadError`) once for every pending request, new requests are
refused, and `restart()` replaces all actors.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Iterable
from typing import Any

from specray.actors import placement
from specray.actors.shard import check_distributed_config
from specray.actors.world import Layout
from specray.config import EngineConfig
from specray.engine.async_engine import EngineDeadError
from specray.engine.sampling_params import SamplingParams
from specray.engine.sequence import RequestOutput
from specray.errors import RequestError, SpecrayError
from specray.models.arch import ModelArch
from specray.models.tensor_parallel import check_tp


class EngineUnhealthyError(EngineDeadError):
    """An actor of the distributed engine died; pending and new requests fail until `restart()`."""


class DistributedEngine:
    def __init__(self, config: EngineConfig, local_ray: dict[str, Any] | None = None):
        from specray.models.loader import load_checkpoint

        check_distributed_config(config)
        self.config = config
        want_tok = not config.skip_tokenizer_init
        ckpt = load_checkpoint(config.model, load_tokenizer=want_tok and config.tokenizer is None)
        self.arch = ModelArch.from_hf_config(ckpt.hf_config)
        check_tp(self.arch, config.tensor_parallel_size)
        self.tokenizer = None
        if want_tok:
            self.tokenizer = ckpt.tokenizer if config.tokenizer is None else _load_tokenizer(config.tokenizer)
        self.max_model_len = config.scheduler.max_model_len or self.arch.max_position_embeddings
        self._local_ray = local_ray or {}
        self._gen = 0  # incremented per start: threads of replaced actors cannot touch the new state
        self._live: set[str] = set()
        # live request -> (its id on the leader, prompt ids, tokens so far). The leader sees a fresh id per
        # add_request, so outputs still queued for an aborted request never reach a new one of the same id.
        self._streams: dict[str, tuple[str, list[int], list[int]]] = {}
        self._owner: dict[str, str] = {}  # id on the leader -> request id
        self._num_added = 0
        self._orphans: set[str] = set()  # pending when restart() was called: they fail at the next step
        self._counts = {"num_running": 0, "num_waiting": 0, "pages_in_use": 0}
        self._start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> DistributedEngine:
        return cls(config)

    # ---- lifecycle ------------------------------------------------------------------------------
    def _start(self) -> None:
        import ray

        cfg = self.config
        placement.connect(cfg.ray_address, **self._local_ray)
        spec = cfg.speculative_config
        separate = spec is not None and spec.method == "draft_model" and spec.draft_placement == "separate"
        use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and placement.cluster_has_gpus())
        tp = cfg.tensor_parallel_size
        self._gen += 1
        self._error: str | None = None
        self._stopping = False
        self._outq: queue.Queue = queue.Queue()
        self._pg = placement.engine_placement_group(
            tp, separate, use_gpu, draft_gpu_fraction=spec.draft_gpu_fraction if separate else 1.0
        )
        from specray.actors.actors import DraftHost, TargetShard

        shard_cls, draft_cls = ray.remote(TargetShard), ray.remote(DraftHost)
        self._shards = [shard_cls.options(**self._pg.actor_options(r)).remote() for r in range(tp)]
        self._draft = draft_cls.options(**self._pg.actor_options(tp)).remote() if separate else None
        members = self._shards + ([self._draft] if self._draft is not None else [])
        try:
            # GPU: every shard sees the engine's GPUs of its node (STRICT_PACK: one node), in rank order, and
            # uses cuda:<rank>, so NCCL can use peer links between them
            visible = [ids[0] for _, ids in ray.get([m.node_info.remote() for m in self._shards])] if use_gpu else None
            pin = cfg.cpu_affinity == "cores"  # member i (shard ranks, then the draft) on core 1 + i
            setups = [s.setup_device.remote(use_gpu, visible, r, r if pin else None)
                      for r, s in enumerate(self._shards)]
            if self._draft is not None:
                setups.append(self._draft.setup_device.remote(use_gpu, None, 0, tp if pin else None))
            _gather(setups)
            address, port = ray.get(self._shards[0].free_address.remote())
            spin = None if cfg.control_plane_spin_ms is None else cfg.control_plane_spin_ms / 1e3
            layout = Layout(tp, separate, "nccl" if use_gpu else "gloo", spin)
            _gather([m.init_world.remote(r, layout, address, port) for r, m in enumerate(members)])
            infos = _gather([s.build.remote(cfg) for s in self._shards])
            if self._draft is not None:
                ray.get(self._draft.build.remote(cfg, infos[0]["num_pages"], infos[0]["max_model_len"]))
        except Exception as e:  # a failed start leaves no actors or reserved bundles behind
            self._kill()
            cause = getattr(e, "cause", None)
            raise (cause if isinstance(cause, SpecrayError) else e) from None
        self._watch = [s.follow.remote() for s in self._shards[1:]]
        if self._draft is not None:
            self._watch.append(self._draft.serve.remote())
        ray.get(self._shards[0].start.remote())
        stream = self._shards[0].stream.options(num_returns="streaming").remote()
        args = (self._gen, stream, list(self._watch))
        threading.Thread(target=self._read, args=args, name="specray-dist-reader", daemon=True).start()
        threading.Thread(target=self._watch_actors, args=args, name="specray-dist-monitor", daemon=True).start()

    def _read(self, gen: int, stream: Any, watch: list[Any]) -> None:
        import ray

        outq = self._outq
        try:
            for ref in stream:
                for item in ray.get(ref):
                    if item[0] == "error":
                        self._fail(item[1], gen)
                    elif gen == self._gen:
                        outq.put(item)
        except Exception as e:  # noqa: BLE001 - the leader died
            self._fail(f"the leader shard died: {type(e).__name__}: {str(e)[:300]}", gen)
        self._fail("the leader shard's output stream ended", gen)

    def _watch_actors(self, gen: int, stream: Any, watch: list[Any]) -> None:
        import ray

        while gen == self._gen and not self._stopping and self._error is None and watch:
            done, _ = ray.wait(watch, num_returns=1, timeout=0.5)
            if done:
                try:
                    ray.get(done[0])
                    self._fail("a shard or draft loop exited", gen)
                except Exception as e:  # noqa: BLE001
                    self._fail(f"a shard or draft actor died: {type(e).__name__}: {str(e)[:300]}", gen)
                return

    def _fail(self, message: str, gen: int | None = None) -> None:
        if (gen is None or gen == self._gen) and self._error is None and not self._stopping:
            self._error = message
            self._outq.put(("error", message))

    def _kill(self) -> None:
        import ray

        for a in [*getattr(self, "_shards", []), *([self._draft] if getattr(self, "_draft", None) else [])]:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead
                pass
        if getattr(self, "_pg", None) is not None:
            self._pg.remove()
            self._pg = None

    def shutdown(self, graceful: bool = True) -> None:
        import ray

        if graceful and self._error is None and not self._stopping:
            self._stopping = True
            try:
                ray.get(self._shards[0].stop.remote(), timeout=10)
                ray.get(self._watch, timeout=10)
            except Exception:  # noqa: BLE001 - killed below anyway
                pass
        self._stopping = True
        self._kill()

    def restart(self) -> None:
        """Replace every actor. Requests still pending fail with `EngineUnhealthyError` at the next step."""
        self._orphans |= self._live
        self._live = set()
        self._streams.clear()
        self._owner.clear()
        self.shutdown(graceful=self._error is None)
        self._start()

    @property
    def healthy(self) -> bool:
        return self._error is None

    def check_health(self) -> None:
        if self._error is not None:
            raise EngineUnhealthyError(self._error)

    # ---- requests -------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this engine has no tokenizer: pass prompt token ids")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        if self.tokenizer is None:
            raise RequestError("this engine has no tokenizer: chat needs one")
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages), add_special_tokens=False)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None) -> None:
        import ray

        self.check_health()
        if request_id in self._live:
            raise RequestError(f"request id {request_id!r} is already in use")
        ids = self.encode(prompt)
        leader_id = f"{request_id}#{self._num_added}"
        self._num_added += 1
        self._live.add(request_id)
        self._streams[request_id] = (leader_id, ids, [])
        self._owner[leader_id] = request_id
        try:
            self._call(self._shards[0].add_request.remote(leader_id, ids, params))
        except ray.exceptions.RayTaskError as e:
            self._forget(request_id)
            cause = getattr(e, "cause", None)
            raise (cause if isinstance(cause, SpecrayError) else e) from None
        except ray.exceptions.RayActorError as e:
            self._forget(request_id)
            self._fail(f"the leader shard died: {e!r}")
            self.check_health()
        except EngineUnhealthyError:
            self._forget(request_id)
            raise

    def abort(self, request_id: str) -> bool:

        if request_id in self._orphans:
            self._orphans.discard(request_id)
            return True
        if request_id not in self._live:
            return False
        leader_id = self._streams[request_id][0]
        self._forget(request_id)
        if self._error is not None:
            return True
        try:
            return self._call(self._shards[0].abort.remote(leader_id))
        except Exception:  # noqa: BLE001 - the monitor reports the dead actor
            return True

    def _forget(self, request_id: str) -> None:
        """The request is no longer live here (finished, aborted or refused): drop its stream state."""
        self._live.discard(request_id)
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            self._owner.pop(stream[0], None)

    def has_unfinished_requests(self) -> bool:
        return bool(self._live or self._orphans)

    @property
    def num_running(self) -> int:
        return self._counts["num_running"]

    @property
    def num_waiting(self) -> int:
        return self._counts["num_waiting"]

    def pages_in_use(self) -> int:
        """KV pages held on the target shards (a control call to the leader)."""

        return self._call(self._shards[0].counts.remote())["pages_in_use"]

    def step(self, timeout_s: float = 0.1) -> list[RequestOutput]:
        """Outputs of the requests that made progress since the last call; waits up to `timeout_s`
        for the first batch. Raises `EngineUnhealthyError` when an actor died (pending requests end)."""
        if self._orphans:
            failed, self._orphans = sorted(self._orphans), set()
            raise EngineUnhealthyError(f"the engine was restarted; {len(failed)} pending requests failed: {failed[:8]}")
        deadline = time.monotonic() + timeout_s
        items = []
        while not items and self._live and self._error is None:
            try:
                items.append(self._outq.get(timeout=max(0.0, min(0.05, deadline - time.monotonic()))))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    break
        while True:
            try:
                items.append(self._outq.get_nowait())
            except queue.Empty:
                break
        if self._error is not None:
            failed, self._live = sorted(self._live), set()
            self._streams.clear()
            self._owner.clear()
            raise EngineUnhealthyError(f"{self._error} ({len(failed)} pending requests failed: {failed[:8]})")
        outputs: list[RequestOutput] = []
        for item in items:
            if item[0] != "outputs":
                continue
            self._counts = item[2]
            for out in item[1]:
                rid = self._owner.get(out.request_id)
                if rid is not None:
                    # the leader streams only the new tokens: put back the id, the prompt and all tokens so far
                    _, prompt, tokens = self._streams[rid]
                    tokens.extend(out.new_token_ids)
                    out = dataclasses.replace(out, request_id=rid, prompt_token_ids=prompt, token_ids=list(tokens))
                    outputs.append(out)
                    if out.finished:
                        self._forget(rid)
        return outputs

    def generate(
        self, prompts: Iterable[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Run prompts to completion; outputs in prompt order."""
        from specray.engine.llm_engine import generate_all

        return generate_all(self, prompts, params)

    def stats(self) -> dict[str, Any]:
        """Leader timings (plan broadcasts, draft exchange, spec phases) and draft-actor counters."""

        out = self._call(self._shards[0].stats.remote())
        if self._draft is not None:
            out["draft"] = self._call(self._draft.stats.remote())
        return out

    def _call(self, ref: Any) -> Any:
        """Wait for a control call, but never past the engine turning unhealthy (a leader stuck in a
        collective with a dead peer would otherwise hold the caller forever)."""
        import ray

        while True:
            self.check_health()
            done, _ = ray.wait([ref], timeout=0.25)
            if done:
                return ray.get(ref)

    def actor_pids(self) -> dict[str, Any]:
        import ray

        return {"shards": ray.get([s.pid.remote() for s in self._shards]),
                "draft": ray.get(self._draft.pid.remote()) if self._draft is not None else None}

    @property
    def shards(self) -> list[Any]:
        return list(self._shards)

    @property
    def draft_actor(self) -> Any:
        return self._draft


def _gather(refs: list[Any]) -> list[Any]:
    """`ray.get` of calls that run collectives together: the first failure raises at once (the other
    ranks may wait forever on the failed one inside a collective)."""
    import ray

    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done[0])
    return ray.get(refs)


def _load_tokenizer(ref: str):
    from pathlib import Path

    from specray.models.loader import load_checkpoint
    from specray.models.tokenizer import Tokenizer

    tok = Path(ref)
    if tok.is_dir() and not (tok / "config.json").exists():
        return Tokenizer.from_hf_dir(tok)
    return load_checkpoint(ref).tokenizer
