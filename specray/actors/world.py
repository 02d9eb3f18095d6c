"""The torch.distributed world of one distributed engine: who is which rank, and the process groups.

Owns the layout (`Layout`: tensor-parallel ranks `0 .. tp-1`, then the draft rank when the draft is a
separate actor) and, per process, the initialised `World`: the data-plane `tp_group` (NCCL on GPUs,
gloo on CPU) for all-reduce / all-gather of activations and logits, and two gloo groups that carry
small host objects: `tp_cpu_group` (rank 0's per-step plan to the other shards) and `spec_cpu_group`
(target rank 0 <-> draft: tree tokens one way, accepted tokens and retrieval chunk scores back).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# idle shards wait on the next plan inside a gloo collective: that wait must not time out; dead peers
# are detected through Ray, not through collective timeouts
_IDLE_TIMEOUT = timedelta(days=30)


@dataclass(frozen=True)
class Layout:
    tp_size: int
    separate_draft: bool
    backend: str  # "nccl" | "gloo"

    @property
    def world_size(self) -> int:
        return self.tp_size + int(self.separate_draft)

    @property
    def draft_rank(self) -> int | None:
        return self.tp_size if self.separate_draft else None


@dataclass
class World:
    rank: int
    layout: Layout
    device: torch.device
    tp_group: Any = None
    tp_cpu_group: Any = None
    spec_cpu_group: Any = None

    @property
    def is_target(self) -> bool:
        return self.rank < self.layout.tp_size

    @property
    def tp_rank(self) -> int:
        return self.rank


def free_address() -> tuple[str, int]:
    """This node's IP and a free TCP port (rank 0 hosts the rendezvous)."""
    try:
        import ray

        ip = ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray: loopback
        ip = "127.0.0.1"
    with socket.socket() as s:
        s.bind(("", 0))
        return ip, s.getsockname()[1]


def init_world(rank: int, layout: Layout, address: str, port: int, device: torch.device,
               init_method: str | None = None) -> World:
    """Join the world (every rank calls this concurrently) and create the groups in the same order on
    every rank, as torch.distributed requires. `init_method` (e.g. "file:///tmp/x") replaces the TCP
    rendezvous at address:port."""
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group(
        backend=layout.backend, init_method=init_method or f"tcp://{address}:{port}", world_size=layout.world_size,
        rank=rank, timeout=_IDLE_TIMEOUT,
    )
    tp_ranks = list(range(layout.tp_size))
    world = World(rank=rank, layout=layout, device=device)
    tp_group = dist.new_group(tp_ranks, timeout=_IDLE_TIMEOUT)
    tp_cpu = dist.new_group(tp_ranks, backend="gloo", timeout=_IDLE_TIMEOUT) if layout.backend != "gloo" else tp_group
    spec_cpu = None
    if layout.separate_draft:
        spec_cpu = dist.new_group([0, layout.draft_rank], backend="gloo", timeout=_IDLE_TIMEOUT)
    if world.is_target:
        world.tp_group, world.tp_cpu_group = tp_group, tp_cpu
    if rank in (0, layout.draft_rank):
        world.spec_cpu_group = spec_cpu
    return world


def send(obj: Any, dst: int, group: Any) -> None:
    dist.send_object_list([obj], dst=dst, group=group)


def recv(src: int, group: Any) -> Any:
    box: list[Any] = [None]
    dist.recv_object_list(box, src=src, group=group)
    return box[0]


def broadcast(obj: Any, src: int, group: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]
