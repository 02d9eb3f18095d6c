"""The tensor-parallel all-reduce fused with the residual add and RMSNorm that follow it: one Triton kernel.

Data owned here: none. The caller (`specray.models.tp_comm.TPAllReduce`) owns the symmetric-memory regions
that hold the ranks' partial sums and the int32 flag arrays of the pull protocol's barrier; this module gets
their addresses as int64 tables, one entry per rank in rank order (peer memory is addressed directly, over
NVLink).

A row-parallel layer (O, down) writes its partial output straight into symmetric memory (push: into its slot of
every rank's region; pull: into its own region; see below). Then, per row:

    s = round(sum over ranks r, in rank order, of partial_r)      (fp32 sum, rounded once to the dtype)
    h = round(s + residual)     residual <- h                       (without a residual: residual_out <- s)
    out = rms_norm(h) * weight                                       (as `specray.kernels.fused.rms_norm_ref`)

Every rank gets the same bits. With 2 ranks (any dtype) or fp32 this equals the unfused path (PyTorch's one-shot
all-reduce, then `add_rms_norm`) up to the norm's reduction order. With more ranks in 16 bits it does not: the
one-shot kernel rounds after every pairwise add, this kernel once after an fp32 sum (at least as accurate).

Two protocols move the partials; the sum, the add and the norm are the same in both.

Push (`push=True`, the default of `TPAllReduce`): every rank's region holds one slot per rank. A rank writes its
partial into slot [rank] of every rank's region, its own included (the GEMV does it in its epilogue,
`specray.kernels.gemv`; other producers call `push_rows`). Empty slots hold -0.0 in every element, and a
pushed partial never does: the writers store -0.0 as +0.0 (the sum can differ from the unfused path only in
the sign of a zero). The norm kernel polls its own region until no element of a peer's slot is -0.0, reads the
slots (local memory, no NVLink read on the critical path) and writes -0.0 back over the peers' slots. No flags
and no barrier: one NVLink write latency instead of a flag round trip plus a remote read. Slots are reused
safely because O and down alternate between two regions: a peer writes a region again only after its norm of
the next call, which needs this rank's partial of that call, which this rank pushes only after its own norm
(and the reset) of the region finished.

Pull (`push=False`): each rank's partial stays in its own region and the norm kernel reads the peers' over
NVLink after a barrier (per program, before any row is read): program p of rank i sets flag [p, i] of every
peer from 0 to 1 (compare-and-swap, release, system scope; it waits while the peer has not yet taken the
previous signal) and then waits for each peer's flag [p, peer] in its own array to be 1 and resets it to 0
(acquire).
The partials were written by an earlier kernel on each rank's stream, so once the barrier passes every
peer's partial is complete. The flags end at 0 on every rank after each call.

Region reuse (pull): the caller alternates two regions (O uses one, down the other). A rank writes a region again
only two fused calls later, after the barrier of the call in between, which a peer passes only after its
kernel for the earlier call (and its reads of that region) finished. So no barrier is needed at the end.

The grid never exceeds `MAX_PROGRAMS` (pull: all programs resident at once, so barriers pair up without
deadlock); a program takes `ROWS` consecutive rows.

Layouts: partials [n_rows, H] contiguous per rank; residual, out [n_rows, H] with unit last stride;
weight [H]. float32, float16, bfloat16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from specray.kernels.fused import _to_dtype, add_rms_norm_ref, rms_norm_ref

__all__ = ["MAX_HIDDEN", "MAX_PROGRAMS", "all_reduce_add_rms_norm", "all_reduce_add_rms_norm_ref", "empty_bits",
           "push_rows"]

MAX_PROGRAMS = 128  # programs per call, and rows of the flag array
MAX_HIDDEN = 8192  # one row in registers


def all_reduce_add_rms_norm_ref(
    partials: list[torch.Tensor], residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, new residual) of the fused op from the ranks' partials [T, H] (rank order): an fp32 sum rounded
    once, then `add_rms_norm_ref`. Does not mutate."""
    acc = torch.zeros(partials[0].shape, dtype=torch.float32, device=partials[0].device)
    for p in partials:
        acc += p.float()
    s = acc.to(partials[0].dtype)
    if residual is None:
        return rms_norm_ref(s, weight, eps), s
    return add_rms_norm_ref(s, residual, weight, eps)


def empty_bits(dtype: torch.dtype) -> tuple[torch.dtype, int]:
    """(integer view dtype, value) of -0.0 in `dtype`: what an empty push slot holds in every element."""
    return (torch.int32, -(1 << 31)) if dtype == torch.float32 else (torch.int16, -(1 << 15))


@triton.jit
def positive_zero(x):
    """`x` with every -0.0 stored as +0.0, done on the bits: a pushed partial never looks empty."""
    if x.dtype == tl.float32:
        bits = x.to(tl.int32, bitcast=True)
        return tl.where(bits == -2147483648, 0, bits).to(tl.int32).to(tl.float32, bitcast=True)
    else:
        bits = x.to(tl.int16, bitcast=True)
        return tl.where(bits == -32768, 0, bits).to(tl.int16).to(x.dtype, bitcast=True)


@triton.jit
def _count_empty(v, mask):
    """How many elements of `v` under `mask` are -0.0 (an empty slot's value)."""
    if v.dtype == tl.float32:
        empty = v.to(tl.int32, bitcast=True) == -2147483648
    else:
        empty = v.to(tl.int16, bitcast=True) == -32768
    return tl.sum((empty & mask).to(tl.int32), axis=0)


@triton.jit
def _empty_like(v):
    """-0.0 in every element, from the bits (a float constant -0.0 could be folded to +0.0)."""
    if v.dtype == tl.float32:
        return tl.full(v.shape, -2147483648, tl.int32).to(tl.float32, bitcast=True)
    else:
        return tl.full(v.shape, -32768, tl.int16).to(v.dtype, bitcast=True)


@triton.jit
def _barrier(flags_ptr, rank, pid, W: tl.constexpr):
    """Signal every peer's flag [pid, rank], then take every peer's signal [pid, peer] in our own array."""
    mine = tl.load(flags_ptr + rank).to(tl.pointer_type(tl.int32))
    for p in tl.static_range(W):
        if p != rank:
            peer = tl.load(flags_ptr + p).to(tl.pointer_type(tl.int32))
            while tl.atomic_cas(peer + pid * W + rank, 0, 1, sem="release", scope="sys") != 0:
                pass
    for p in tl.static_range(W):
        if p != rank:
            while tl.atomic_cas(mine + pid * W + p, 1, 0, sem="acquire", scope="sys") != 1:
                pass
    tl.debug_barrier()


@triton.jit
def _ar_add_rms_norm_kernel(
    parts_ptr,  # [W] int64 addresses of the ranks' partials [n_rows, H]
    flags_ptr,  # [W] int64 addresses of the ranks' int32 flags [MAX_PROGRAMS, W]
    res_ptr,  # [n_rows, H] residual (read and overwritten), or the residual output without HAS_RESIDUAL
    w_ptr,  # [H]
    out_ptr,  # [n_rows, H]
    n_rows,
    rank,
    stride_r,
    stride_o,
    eps,
    H: tl.constexpr,
    BLOCK_H: tl.constexpr,
    W: tl.constexpr,
    ROWS: tl.constexpr,  # rows per program
    HAS_RESIDUAL: tl.constexpr,
    PUSH: tl.constexpr,  # parts_ptr: this rank's own slots, filled by the peers (see the module docstring)
    INTERPRET: tl.constexpr,
):
    pid = tl.program_id(0)
    if not PUSH:
        _barrier(flags_ptr, rank, pid, W)
    dtype = out_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < H
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)  # [BLOCK_H]
    for j in tl.static_range(ROWS):
        row = pid * ROWS + j
        if row < n_rows:
            acc = tl.zeros([BLOCK_H], dtype=tl.float32)
            for r in tl.static_range(W):
                part = tl.load(parts_ptr + r).to(tl.pointer_type(dtype))
                ptrs = part + row.to(tl.int64) * H + cols
                v = tl.load(ptrs, mask=cmask, other=0.0, volatile=True)  # [BLOCK_H]
                if PUSH:
                    if r != rank:  # wait until the peer's whole row landed, then empty the slot again
                        while _count_empty(v, cmask) > 0:
                            v = tl.load(ptrs, mask=cmask, other=0.0, volatile=True)
                        tl.store(ptrs, _empty_like(v), mask=cmask)
                acc += v.to(tl.float32)
            x = _to_dtype(acc, dtype, INTERPRET)
            r_row = res_ptr + row.to(tl.int64) * stride_r + cols
            if HAS_RESIDUAL:
                res = tl.load(r_row, mask=cmask, other=0.0).to(tl.float32)
                x = _to_dtype(x.to(tl.float32) + res, dtype, INTERPRET)
            tl.store(r_row, x, mask=cmask)
            xf = x.to(tl.float32)
            inv = tl.rsqrt(tl.sum(xf * xf, axis=0) / H + eps)
            n = _to_dtype(xf * inv, dtype, INTERPRET)
            out = _to_dtype(w * n.to(tl.float32), dtype, INTERPRET)
            tl.store(out_ptr + row.to(tl.int64) * stride_o + cols, out, mask=cmask)


def all_reduce_add_rms_norm(
    parts_table: torch.Tensor,
    flags_table: torch.Tensor,
    rank: int,
    n_rows: int,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    push: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the ranks' partials [n_rows, H] (addresses in `parts_table` [W] int64), add `residual` (updated
    in place), RMSNorm. Returns (out, residual); without a residual, a new tensor holding the sum.

    Every rank of the group must make the same call (same n_rows) at the same point of its stream: the
    kernel waits for its peers. Pull: `parts_table` holds the ranks' own regions and `flags_table` [W] int64
    the addresses of the flag arrays, all zero between calls. Push: `parts_table` holds this rank's W slots
    (slot r filled by rank r) and `flags_table` is not read.
    """
    world = parts_table.numel()
    hidden = weight.shape[0]
    if hidden > MAX_HIDDEN:
        raise ValueError(f"hidden size {hidden} exceeds {MAX_HIDDEN}")
    if not 1 <= n_rows:
        raise ValueError(f"n_rows must be >= 1, got {n_rows}")
    if residual is None:
        residual_out = torch.empty(n_rows, hidden, dtype=weight.dtype, device=weight.device)
    else:
        if residual.shape != (n_rows, hidden) or residual.dtype != weight.dtype or residual.stride(-1) != 1:
            raise ValueError(f"residual must be ({n_rows}, {hidden}) {weight.dtype} with unit last stride, got "
                             f"{tuple(residual.shape)} {residual.dtype}")
        residual_out = residual
    out = torch.empty(n_rows, hidden, dtype=weight.dtype, device=weight.device)
    rows = triton.cdiv(n_rows, MAX_PROGRAMS)
    grid = triton.cdiv(n_rows, rows)
    block_h = triton.next_power_of_2(hidden)
    _ar_add_rms_norm_kernel[(grid,)](
        parts_table, flags_table, residual_out, weight, out, n_rows, rank, residual_out.stride(0), out.stride(0),
        float(eps), H=hidden, BLOCK_H=block_h, W=world, ROWS=rows, HAS_RESIDUAL=residual is not None, PUSH=push,
        INTERPRET=bool(triton.knobs.runtime.interpret), num_warps=8 if block_h >= 4096 else 4,
    )
    return out, residual_out


@triton.jit
def _push_rows_kernel(
    src_ptr,  # [n, H] this rank's partial
    push_ptr,  # [W] int64: slot [rank] of every rank's region
    stride_s,
    H: tl.constexpr,
    BLOCK_H: tl.constexpr,
    W: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < H
    v = positive_zero(tl.load(src_ptr + row * stride_s + cols, mask=cmask, other=0.0))
    for r in tl.static_range(W):
        dst = tl.load(push_ptr + r).to(tl.pointer_type(src_ptr.dtype.element_ty))
        tl.store(dst + row * H + cols, v, mask=cmask)


def push_rows(src: torch.Tensor, push_table: torch.Tensor) -> None:
    """Write this rank's partial src [n, H] (unit last stride) into slot [rank] of every rank's region (the
    addresses in `push_table` [W] int64), -0.0 stored as +0.0: for producers other than the push GEMV."""
    n, hidden = src.shape
    if src.stride(-1) != 1 or hidden > MAX_HIDDEN:
        raise ValueError(f"push_rows takes [n, <= {MAX_HIDDEN}] rows with unit last stride, got {tuple(src.shape)}")
    block_h = triton.next_power_of_2(hidden)
    _push_rows_kernel[(n,)](src, push_table, src.stride(0), H=hidden, BLOCK_H=block_h, W=push_table.numel(),
                            num_warps=8 if block_h >= 4096 else 4)
