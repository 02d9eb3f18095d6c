"""The torch.distributed world of one distributed engine: who is which rank, and the process groups.

Owns the layout (`Layout`: tensor-parallel ranks `0 .. tp-1`, then the draft rank when the draft is a
separate actor) and, per process, the initialised `World`: the data-plane `tp_group` (NCCL on GPUs,
gloo on CPU) for all-reduce / all-gather of activations and logits, the gloo `tp_cpu_group` for
start-up agreements, and the per-step control plane in shared memory (`shm_channel`, one node):
`plan` (rank 0's step plan to the other shards), `to_draft` (rank 0 -> draft: tree requests, accepted
tokens, retrieval chunk scores) and `from_draft` (draft -> rank 0: trees).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from specray.actors.shm_channel import DEFAULT_SPIN_S, ShmChannel, channel_path

# idle shards wait on the next plan inside a gloo collective: that wait must not time out; dead peers
# are detected through Ray, not through collective timeouts
_IDLE_TIMEOUT = timedelta(days=30)


@dataclass(frozen=True)
class Layout:
    tp_size: int
    separate_draft: bool
    backend: str  # "nccl" | "gloo"
    # control-plane busy wait before sleeping, every channel; None: the defaults of `channel_spin_s`
    spin_s: float | None = None

    def channel_spin_s(self, channel: str) -> float:
        """Busy-check seconds of one channel's waits. Defaults: CPU (gloo) worlds never busy-wait (see
        shm_channel); on GPUs the step-plan channel does (DEFAULT_SPIN_S: a follower sees each plan at once),
        the draft exchange does not: its waits span a whole draft or verify phase, and on 2 H200s a waiter
        spinning through them slowed the working side (the separate-draft step took 0.43 and 0.57 ms longer
        than without the spin, BENCHMARKS.md)."""
        if self.spin_s is not None:
            return self.spin_s
        return DEFAULT_SPIN_S if self.backend == "nccl" and channel == "plan" else 0.0

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
    plan: ShmChannel | None = None  # rank 0 writes, the other shards read
    to_draft: ShmChannel | None = None  # rank 0 -> the draft
    from_draft: ShmChannel | None = None  # the draft -> rank 0

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
    every = dist.new_group(list(range(layout.world_size)), backend="gloo", timeout=_IDLE_TIMEOUT)
    if world.is_target:
        world.tp_group, world.tp_cpu_group = tp_group, tp_cpu
    _open_channels(world, f"{port}-{os.getpid() if rank == 0 else 0}", every)
    return world


def _open_channels(world: World, tag: str, every: Any) -> None:
    """Rank 0 creates `plan` and `to_draft`, the draft creates `from_draft`; everyone attaches after a
    barrier, and the creators unlink the names after a second one (nothing is left in /dev/shm even if a
    process dies later). The tag (rank 0's port and pid) is broadcast so all ranks use the same names."""
    layout, rank = world.layout, world.rank
    tag = broadcast(tag, 0, every)
    specs = []  # (attribute, writer rank, reader ranks)
    if layout.tp_size > 1:
        specs.append(("plan", 0, list(range(1, layout.tp_size))))
    if layout.separate_draft:
        specs += [("to_draft", 0, [layout.draft_rank]), ("from_draft", layout.draft_rank, [0])]
    made = []
    for attr, writer, readers in specs:
        if rank == writer:
            chan = ShmChannel.create(channel_path(tag, attr), num_readers=len(readers),
                                     spin_s=layout.channel_spin_s(attr))
            setattr(world, attr, chan)
            made.append(chan)
    dist.barrier(group=every)
    for attr, _, readers in specs:
        if rank in readers:
            chan = ShmChannel.attach(channel_path(tag, attr), len(readers), readers.index(rank),
                                     spin_s=layout.channel_spin_s(attr))
            setattr(world, attr, chan)
    dist.barrier(group=every)
    for chan in made:
        chan.unlink()


def broadcast(obj: Any, src: int, group: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]
