"""The tensor-parallel all-reduce of one rank: NCCL / gloo, or PyTorch symmetric memory on one host.

Owns, when symmetric memory is in use, one symmetric buffer of `max_bytes` for the model's dtype. It is
allocated and rendezvoused once, when the shard's model is built, so every rank does it at the same point.

A sum of at most `max_bytes` goes through PyTorch's one-shot symmetric-memory kernel. Every rank puts its
partial in its buffer, then reads its peers' buffers over NVLink and sums them in rank order, so all ranks
get the same bits. On 2 H200s that takes 6–8 µs for a decode step's 8 KB activation, against 13 µs for
NCCL (`benchmarks/allreduce.py`). A row-parallel layer issues two of these per transformer layer.

With `fuse_norm`, symmetric memory also holds two partial regions and a flag array for
`specray.kernels.tp_norm`: a row-parallel layer writes its partial output into a region and the RMSNorm that
follows sums the ranks' partials, adds the residual and normalises in one kernel (`PendingSum`), instead of
an all-reduce kernel and a norm kernel. With `push` (the default) each region has one slot per rank and a
rank writes its partial into its slot of every rank's region (the GEMV's epilogue, or `push_rows`); the norm
kernel then waits on its own memory. Without it (pull) the norm kernel reads the peers' regions after a flag
barrier. The tp_norm module docstring describes both.

Everything else uses `torch.distributed.all_reduce`: larger tensors, dtypes the kernel does not take
(it takes bf16 and fp32), CPU worlds (gloo), and hosts where symmetric memory cannot be set up (the
reason is kept in `fallback_reason`). Both paths can be captured in a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

_SYMM_DTYPES = (torch.bfloat16, torch.float32)


def _all_ranks(ok: bool, cpu_group: Any) -> bool:
    """Whether `ok` holds on every rank of `cpu_group` (a gloo all-reduce; None: this rank alone)."""
    if cpu_group is None:
        return ok
    flag = torch.tensor([int(ok)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=cpu_group)
    return bool(flag.item())


def _agreed_step(step: Callable[[], Any], cpu_group: Any, peer_failed: str) -> str:
    """Run one set-up step on every rank; '' when it succeeded everywhere, else this rank's error or
    `peer_failed`. The ranks agree after every step, so one rank's failure never leaves the others waiting in
    a later collective (a rendezvous) it will not join."""
    reason = ""
    try:
        step()
    except Exception as e:  # noqa: BLE001 - no symmetric memory here: say why, the caller falls back
        reason = f"{type(e).__name__}: {e}"
    if not _all_ranks(not reason, cpu_group):
        return reason or peer_failed
    return ""


class PendingSum:
    """A row-parallel layer's partial output [T, H], already in this rank's region `site`, whose sum over the
    ranks the next RMSNorm computes (`reduce_norm`), fused with its residual add. `prefetch`: the weight of
    the projection after the norm, whose start is read into L2 on a side stream while the sum waits for the
    peers (see `specray.kernels.l2_prefetch`)."""

    def __init__(self, reduce: TPAllReduce, site: int, partial: torch.Tensor, prefetch: torch.Tensor | None = None):
        # partial: this rank's own slot of region `site`; with push, already written to every rank's region
        self.reduce, self.site, self.partial, self.prefetch = reduce, site, partial, prefetch

    def reduce_norm(self, residual: torch.Tensor | None, weight: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(normed, new residual); the residual is updated in place."""
        from specray.kernels.tp_norm import all_reduce_add_rms_norm

        r = self.reduce
        side = r.side_stream if self.prefetch is not None and r.prefetch_bytes > 0 else None
        if side is not None:
            main = torch.cuda.current_stream(self.partial.device)
            partial_ready = torch.cuda.Event()
            partial_ready.record(main)
        out = all_reduce_add_rms_norm(r.part_tables[self.site], r.flag_table, r.rank, self.partial.shape[0],
                                      residual, weight, eps, push=r.push)
        if side is not None:  # fork after the norm kernel is queued (it gets the SMs first); join before the
            from specray.kernels.l2_prefetch import l2_prefetch  # next projection

            side.wait_event(partial_ready)
            with torch.cuda.stream(side):
                l2_prefetch(self.prefetch, r.prefetch_bytes, r.sink)
            main.wait_stream(side)
        return out


class TPAllReduce:
    def __init__(self, group: Any = None, *, dtype: torch.dtype | None = None, device: torch.device | None = None,
                 symmetric_memory: bool = False, max_bytes: int = 1 << 21, cpu_group: Any = None,
                 fuse_norm: bool = False, push: bool = True):
        self.group = group
        self.max_bytes = max_bytes
        self.buffer: torch.Tensor | None = None  # [max_bytes // itemsize] symmetric, dtype `dtype`
        self.group_name = ""
        self.copy_in = False  # the op copies the local partial into the buffer itself
        self.fallback_reason = "symmetric memory not requested"
        # fused all-reduce + RMSNorm (`fuse_norm`): two regions of S slots of max_bytes (S = W with push, else 1);
        # per region an int64 [W] table of where the norm reads rank r's partial (push: this rank's slot r;
        # pull: rank r's slot 0) and, with push, one of where this rank writes its partial (slot [rank] of
        # every rank's region); an int64 [W] table of flag arrays (pull's barrier)
        self.push = push
        self._last_site: int | None = None  # region of the last fused sum issued (`claim_site`)
        self.regions: torch.Tensor | None = None  # [2, S, max_bytes // itemsize] symmetric
        self.part_tables: list[torch.Tensor] = []
        self.push_tables: list[torch.Tensor] = []
        self.flag_table: torch.Tensor | None = None
        self.rank = 0
        self.fuse_reason = "fused all-reduce + RMSNorm not requested"
        # L2 prefetch of the next projection's weight beside each fused sum (0: off; set by the model)
        self.prefetch_bytes = 0
        self.side_stream: torch.cuda.Stream | None = None
        self.sink: torch.Tensor | None = None  # [1] int32 scratch of the prefetch kernel
        self._keep: list[Any] = []  # symmetric allocations and handles the tables point into
        if symmetric_memory:
            self.fallback_reason = self._setup(dtype, device, cpu_group)
            if fuse_norm:
                self.fuse_reason = (self._setup_fused(dtype, device, cpu_group) if not self.fallback_reason
                                    else self.fallback_reason)

    @property
    def fuses_norm(self) -> bool:
        return self.regions is not None

    def can_fuse(self, rows: int, hidden: int, dtype: torch.dtype) -> bool:
        """Whether a [rows, hidden] partial of `dtype` fits the fused path."""
        from specray.kernels.tp_norm import MAX_HIDDEN

        regions = self.regions
        return (regions is not None and dtype == regions.dtype and hidden <= MAX_HIDDEN
                and 1 <= rows and rows * hidden <= regions.shape[2])

    def partial_region(self, site: int, rows: int, hidden: int) -> torch.Tensor:
        """This rank's own slot of region `site` (0 or 1) as a [rows, hidden] tensor for a layer's partial
        output (push: the producer must also write it to the peers, `push_tables[site]`)."""
        if self.regions is None or rows * hidden > self.regions.shape[2]:
            raise ValueError(f"a [{rows}, {hidden}] partial does not fit the fused all-reduce regions")
        return self.regions[site, self.rank if self.push else 0, : rows * hidden].view(rows, hidden)

    def claim_site(self, site: int) -> None:
        """Note that the next fused sum uses region `site`. Both protocols need consecutive fused sums to alternate
        regions (see `specray.kernels.tp_norm`): two in a row on one region could let a peer overwrite (pull) or
        empty (push) a partial before this rank read it, and a push rank would then wait forever. Refused here."""
        if site == self._last_site:
            raise RuntimeError(f"two fused all-reduces in a row on region {site}: O and down must alternate")
        self._last_site = site

    def publish(self, site: int, part: torch.Tensor) -> None:
        """Make this rank's partial `part` (its own slot of region `site`, already written) visible to the norm:
        with push, copy it into its slot of every peer's region (`push_rows`); with pull there is nothing to do."""
        if self.push:
            from specray.kernels.tp_norm import push_rows

            push_rows(part, self.push_tables[site])

    def _setup_fused(self, dtype: torch.dtype, device: torch.device, cpu_group: Any) -> str:
        """Allocate and rendezvous the regions (push: every slot empty) and the zeroed flags; '' on success
        (on every rank)."""
        import torch.distributed._symmetric_memory as symm_mem

        from specray.kernels.tp_norm import MAX_PROGRAMS, empty_bits

        elems = self.max_bytes // torch.tensor([], dtype=dtype).element_size()
        world = dist.get_world_size(self.group)
        slots = world if self.push else 1
        got: dict[str, Any] = {}

        def allocate() -> None:
            got["regions"] = symm_mem.empty(2 * slots * elems, dtype=dtype, device=device)
            int_dtype, empty = empty_bits(dtype)
            got["regions"].view(int_dtype).fill_(empty)  # push: -0.0 marks an empty slot
            got["flags"] = symm_mem.empty(MAX_PROGRAMS * world, dtype=torch.int32, device=device)
            got["flags"].zero_()
            torch.cuda.synchronize(device)  # set before any rendezvous, so before any peer can write or signal

        def rendezvous_regions() -> None:
            got["h_regions"] = symm_mem.rendezvous(got["regions"], self.group_name)

        def rendezvous_flags() -> None:
            got["h_flags"] = symm_mem.rendezvous(got["flags"], self.group_name)

        def tables() -> None:
            regions, flags, h_regions, h_flags = got["regions"], got["flags"], got["h_regions"], got["h_flags"]
            rank = h_regions.rank
            views = [h_regions.get_buffer(r, (2 * slots * elems,), dtype) for r in range(world)]
            flag_views = [h_flags.get_buffer(r, (MAX_PROGRAMS * world,), torch.int32) for r in range(world)]
            if views[rank].data_ptr() != regions.data_ptr() or flag_views[rank].data_ptr() != flags.data_ptr():
                raise RuntimeError("symmetric buffer views do not start at the allocations")
            item = regions.element_size()

            def slot(r: int, site: int, k: int) -> int:  # address of rank r's region `site`, slot k
                return views[r].data_ptr() + ((site * slots + k) * elems) * item

            def table(addresses: list[int]) -> torch.Tensor:
                return torch.tensor(addresses, dtype=torch.int64, device=device)

            if self.push:
                got["part_tables"] = [table([slot(rank, s, r) for r in range(world)]) for s in range(2)]
                got["push_tables"] = [table([slot(r, s, rank) for r in range(world)]) for s in range(2)]
            else:
                got["part_tables"] = [table([slot(r, s, 0) for r in range(world)]) for s in range(2)]
                got["push_tables"] = []
            got["flag_table"] = table([v.data_ptr() for v in flag_views])
            got["rank"], got["keep"] = rank, [regions, flags, h_regions, h_flags, views, flag_views]

        for step in (allocate, rendezvous_regions, rendezvous_flags, tables):
            reason = _agreed_step(step, cpu_group, "another rank could not set up the fused all-reduce")
            if reason:  # no fused path: the one-shot kernel and a norm
                return reason
        self.part_tables, self.push_tables, self.flag_table = got["part_tables"], got["push_tables"], got["flag_table"]
        self.regions, self.rank, self._keep = got["regions"].view(2, slots, elems), got["rank"], got["keep"]
        self.side_stream = torch.cuda.Stream(device)
        self.sink = torch.zeros(1, dtype=torch.int32, device=device)
        return ""

    @property
    def uses_symmetric_memory(self) -> bool:
        return self.buffer is not None

    def _setup(self, dtype: torch.dtype | None, device: torch.device | None, cpu_group: Any) -> str:
        """Allocate and rendezvous the buffer; '' on success, else why not. The checks before the allocation
        give every rank the same answer. After the allocation and after the rendezvous the ranks agree over
        `cpu_group` (gloo): one rank's failed allocation cannot leave the others waiting in the rendezvous,
        and a one-shot kernel never pairs with an NCCL call."""
        if device is None or device.type != "cuda":
            return "not a CUDA device"
        if dtype not in _SYMM_DTYPES:
            return f"the one-shot kernel does not take {dtype}"
        if dist.get_backend(self.group) != "nccl":
            return "the tensor-parallel group is not NCCL"
        try:  # the same installation on every rank: the same answer
            import torch.distributed._symmetric_memory as symm_mem
        except ImportError as e:
            return f"no symmetric memory in this torch build ({e})"
        group = self.group if self.group is not None else dist.group.WORLD
        name = group.group_name
        got: dict[str, torch.Tensor] = {}

        def allocate() -> None:
            if hasattr(symm_mem, "enable_symm_mem_for_group"):
                symm_mem.enable_symm_mem_for_group(name)
            got["buf"] = symm_mem.empty(self.max_bytes // torch.tensor([], dtype=dtype).element_size(),
                                        dtype=dtype, device=device)

        # no symmetric memory: NCCL it is, and the reason says why
        reason = (_agreed_step(allocate, cpu_group, "another rank could not allocate symmetric memory")
                  or _agreed_step(lambda: symm_mem.rendezvous(got["buf"], name), cpu_group,
                                  "another rank could not set up symmetric memory"))
        if reason:
            return reason
        self.buffer, self.group_name = got["buf"], name
        self.copy_in = hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out")
        return ""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of `x` over the ranks (any shape): a new tensor on the symmetric path, `x` itself otherwise."""
        buf = self.buffer
        if (buf is None or x.dtype != buf.dtype or x.numel() > buf.numel() or not x.is_contiguous()
                or x.storage_offset() != 0):  # the kernel wants the buffer's alignment
            dist.all_reduce(x, group=self.group)
            return x
        n = x.numel()
        out = torch.empty_like(x)
        if self.copy_in:
            torch.ops.symm_mem.one_shot_all_reduce_copy_out(buf[:n], x.view(-1), "sum", self.group_name, out.view(-1))
        else:
            buf[:n].copy_(x.view(-1))
            torch.ops.symm_mem.one_shot_all_reduce_out(buf[:n], "sum", self.group_name, out.view(-1))
        return out
