"""Matrix-vector products for decode at batch 1 in Triton: ``y = x @ W^T`` for one row of x.

Data owned here: none. The weight [N, K] (row-major, the `nn.Linear` layout), the input rows and the output
belong to the caller.

One program computes BLOCK_N outputs over the whole of K: it walks K in BLOCK_K chunks, multiplies each
[BLOCK_N, BLOCK_K] weight tile by the matching slice of x and keeps fp32 partial sums, then reduces them
once. No split-K, no atomics: the result is deterministic and needs no second kernel (cuBLAS
picks split-K plus a reduce kernel for the narrow shapes of a tensor-parallel shard). Every weight byte is
read once, so the kernel is bound by memory bandwidth; `benchmarks/gemv.py` compares it with cuBLAS.

With `gated` the input row is an MLP's gate_up [1, 2K] and the kernel multiplies by ``silu(gate) * up``, each
element rounded as `specray.kernels.fused.silu_mul` rounds it, so the result has the bits of silu_mul followed
by the plain GEMV, without the silu_mul kernel (the down projection at batch 1).

With `push` (tensor parallelism, `specray.kernels.tp_norm`'s push protocol) the epilogue stores the result,
-0.0 written as +0.0, to every address of a table instead of `out`: this rank's slot in every rank's region.

Layouts: x [1, K] (unit last stride), weight [N, K] contiguous, out [1, N] contiguous.
Shapes need N % BLOCK_N == 0 and K % BLOCK_K == 0 (the caller checks `fits`). 16-bit dtypes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from specray.kernels.fused import _to_dtype
from specray.kernels.tp_norm import positive_zero

__all__ = ["GemvConfig", "choose_config", "fits", "gemv", "gemv_ref"]


class GemvConfig(tuple):
    """(block_n, block_k, num_warps, num_stages)."""

    def __new__(cls, block_n: int = 8, block_k: int = 512, num_warps: int = 4, num_stages: int = 3):
        return super().__new__(cls, (block_n, block_k, num_warps, num_stages))


DEFAULT = GemvConfig()


def choose_config(n: int, k: int) -> GemvConfig | None:
    """The launch for an [N, K] weight, or None when no block shape divides it.

    Measured on an H200 for the Llama-3.1-8B projections at TP=1 and TP=2 (`benchmarks/gemv.py`, every
    choice within 2% of the best of 18 launches): 16-row tiles when that still gives 768+ programs
    (gate/up), 8-row tiles for 512+ programs over K <= 4096 (QKV and O at TP=1), else 4-row tiles (QKV at
    TP=2, down); a K block of 256 (512 for 4-row tiles), 4 warps, 2 pipeline stages (4 for 4-row tiles)."""
    if n % 16 == 0 and n // 16 >= 768:
        block_n = 16
    elif n % 8 == 0 and n // 8 >= 512 and k <= 4096:
        block_n = 8
    elif n % 4 == 0:
        block_n = 4
    else:
        return None
    block_k = 512 if block_n == 4 else 256
    while block_k > 32 and k % block_k:
        block_k //= 2
    if k % block_k:
        return None
    return GemvConfig(block_n, block_k, 4, 4 if block_n == 4 else 2)


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 product (plus bias) rounded once to x.dtype."""
    y = x.float() @ weight.float().t()
    return (y if bias is None else y + bias.float()).to(x.dtype)


def fits(x: torch.Tensor, weight: torch.Tensor, cfg: GemvConfig, gated: bool = False) -> bool:
    n, k = weight.shape
    block_n, block_k = cfg[0], cfg[1]
    return (x.dim() == 2 and x.shape[0] == 1 and x.shape[1] == (2 * k if gated else k) and x.stride(-1) == 1
            and x.dtype == weight.dtype and x.dtype in (torch.float16, torch.bfloat16) and weight.is_contiguous()
            and n % block_n == 0 and k % block_k == 0)


@triton.jit
def _gemv_kernel(
    x_ptr,  # [K], or [2K] (gate, up) with GATED
    w_ptr,  # [N, K]
    b_ptr,  # [N] (read only with HAS_BIAS)
    y_ptr,  # [N] (not written with PUSH)
    push_ptr,  # [W] int64 addresses of [N] outputs (read only with PUSH)
    K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PUSH: tl.constexpr,
    W: tl.constexpr,
    GATED: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    cols = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :]  # [BLOCK_N, BLOCK_K]
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        w = tl.load(w_ptrs + k, eviction_policy="evict_first").to(tl.float32)
        if GATED:  # silu(gate) rounded to the dtype, times up, rounded: as the silu_mul kernel
            gate = tl.load(x_ptr + k + cols).to(tl.float32)
            up = tl.load(x_ptr + K + k + cols).to(tl.float32)
            act = _to_dtype(gate / (1.0 + tl.exp(-gate)), x_ptr.dtype.element_ty, INTERPRET).to(tl.float32)
            x = _to_dtype(act * up, x_ptr.dtype.element_ty, INTERPRET).to(tl.float32)  # [BLOCK_K]
        else:
            x = tl.load(x_ptr + k + cols).to(tl.float32)  # [BLOCK_K]
        acc += w * x[None, :]
    y = tl.sum(acc, axis=1)  # [BLOCK_N]
    if HAS_BIAS:
        y += tl.load(b_ptr + rows).to(tl.float32)
    dtype = y_ptr.dtype.element_ty
    if PUSH:
        yc = positive_zero(y.to(dtype))
        for r in tl.static_range(W):
            dst = tl.load(push_ptr + r).to(tl.pointer_type(dtype))
            tl.store(dst + rows, yc)
    else:
        tl.store(y_ptr + rows, y.to(dtype))


def gemv(x: torch.Tensor, weight: torch.Tensor, cfg: GemvConfig | None = None,
         out: torch.Tensor | None = None, bias: torch.Tensor | None = None,
         push: torch.Tensor | None = None, gated: bool = False) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` for x [1, K]; out [1, N] (a new tensor unless given). With `push` ([W] int64
    addresses) the result goes to those W places instead, and `out` (required: one of them, this rank's own
    slot) is returned. With `gated`, x is [1, 2K] (gate, up) and ``silu(gate) * up`` is the input row."""
    cfg = DEFAULT if cfg is None else cfg
    if not fits(x, weight, cfg, gated):
        raise ValueError(f"gemv does not take x {tuple(x.shape)} {x.dtype} with weight {tuple(weight.shape)} "
                         f"{weight.dtype} and blocks {cfg[:2]}")
    m, n = x.shape[0], weight.shape[0]
    if out is None:
        if push is not None:
            raise ValueError("gemv with push needs `out`: this rank's own slot")
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_n, block_k, warps, stages = cfg
    _gemv_kernel[(n // block_n,)](x, weight, bias if bias is not None else weight, out,
                                  push if push is not None else weight, K=weight.shape[1],
                                  BLOCK_N=block_n, BLOCK_K=block_k, HAS_BIAS=bias is not None,
                                  PUSH=push is not None, W=push.numel() if push is not None else 1, GATED=gated,
                                  INTERPRET=bool(triton.knobs.runtime.interpret), num_warps=warps, num_stages=stages)
    return out
