"""Prefetch the start of a weight into the GPU's L2 cache, to overlap a latency-bound kernel with the
memory traffic of the next one.

Data owned here: none. The caller passes the weight (read only) and a one-element int32 scratch tensor, the
sink, that keeps the compiler from dropping the loads. The sink is written only when a block's bit sum hits
one value; nothing reads it.

Use: a tensor-parallel rank waits in the fused all-reduce (the pull protocol's barrier, or the push protocol's
poll) for a few microseconds while its memory bus idles. On a second stream, this kernel meanwhile reads the
first `nbytes` of the next projection's weight (loads marked `evict_last`), so that GEMV finds them in L2
instead of DRAM. The results do not change.

Status: off by default (`EngineConfig.tp_weight_prefetch_mb = 0`). Measured once on 2 H200s (session 6, pull
protocol, 24 MB, BENCHMARKS.md): the TP=2 decode step got slower (4.06 against 3.93 ms), so it stays off. Tested on
CPU (the kernel under the Triton interpreter, the model wiring) and on a GPU inside a captured graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["l2_prefetch"]

_BLOCK = 4096  # int32 words (16 KB) per program


@triton.jit
def _prefetch_kernel(src_ptr, sink_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(src_ptr + offs, mask=offs < n, other=0, eviction_policy="evict_last")  # [BLOCK] int32
    s = tl.sum(x, axis=0)
    tl.store(sink_ptr, s, mask=s == 0x7FFFFFFF)


def l2_prefetch(weight: torch.Tensor, nbytes: int, sink: torch.Tensor) -> None:
    """Read the first min(nbytes, weight bytes) of the contiguous `weight` through L2 (one launch)."""
    if not weight.is_contiguous():
        raise ValueError("l2_prefetch needs a contiguous tensor")
    words = weight.view(-1).view(torch.uint8)[: min(nbytes, weight.numel() * weight.element_size()) // 4 * 4]
    words = words.view(torch.int32)
    n = words.numel()
    if n:
        _prefetch_kernel[(triton.cdiv(n, _BLOCK),)](words, sink, n, BLOCK=_BLOCK, num_warps=8)
