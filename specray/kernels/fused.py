"""Fused elementwise kernels of the decoder layer in Triton: RMSNorm, residual add + RMSNorm, SiLU*mul (RoPE, with
or without the paged K/V cache store, is in `specray.kernels.rotary`, which shares this module's conventions).

Data owned here: none. Every kernel reads its inputs and writes either a fresh output tensor (optionally a
caller-given ``out``) or, where documented, updates a caller's tensor in place (``add_rms_norm`` writes the
new residual stream into ``residual``). No workspace is kept.

Each op is one kernel launch, does no host sync (shapes and strides only, never tensor values), and is
therefore CUDA-graph capturable once it has been compiled (call it once before capturing). Each has an
exact torch reference ``*_ref`` in this file that defines its semantics; the kernels compute in fp32 from
the stored dtype and round where the reference rounds, so fp32 results agree to a few ulps (reduction
order, rsqrt/exp approximations, FMA contraction) and 16-bit results to within one rounding step.
Under Triton's CPU interpreter (``triton.knobs.runtime.interpret``), whose fp32 -> bf16 cast truncates, the
kernels round to nearest-even on the bits themselves (``_to_dtype``) so that they match the GPU.

Layouts:
    rms_norm:     x [T, H] (or [T, N, H]: per-head norm of a strided q/k view), weight [H] -> out x.shape
    add_rms_norm: x [T, H], residual [T, H] (updated in place to x + residual), weight [H] -> out [T, H]
    silu_mul:     gate_up [T, 2I] (gate = first I columns, up = last I) -> out [T, I]
Supported dtypes: float32, float16, bfloat16 (every tensor of an op in one dtype).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

__all__ = [
    "add_rms_norm",
    "add_rms_norm_ref",
    "rms_norm",
    "rms_norm_ref",
    "silu_mul",
    "silu_mul_ref",
]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Widest row chunk one RMSNorm program holds in registers; wider rows (H > 8192) take two passes over
# chunks of this size. A module constant so that tests can shrink it to exercise the chunked path.
_MAX_BLOCK_H = 8192
_NORM_TILE = 2048  # target elements per RMSNorm program when rows are short (several rows per program)
_SILU_BLOCK = 1024  # output columns per SiLU*mul program


# ----------------------------------------------------------------------------------------------------------
# torch references (the semantics)
# ----------------------------------------------------------------------------------------------------------


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm: normalise in fp32, round to x.dtype, then ``weight * n`` in x.dtype."""
    xf = x.float()
    n = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    # == weight * n for weight.dtype == x.dtype: torch multiplies 16-bit operands in fp32 (exactly, the
    # product of two 16-bit floats fits in fp32) and rounds once.
    return (weight.float() * n.float()).to(x.dtype)


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm_ref(h), h) with ``h = x + residual`` in x.dtype (fp32 sum rounded once). Does not mutate."""
    h = (x.float() + residual.float()).to(x.dtype)
    return rms_norm_ref(h, weight, eps), h


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` in gate_up.dtype: silu in fp32 rounded to the dtype, then the product rounded."""
    inter = gate_up.shape[-1] // 2
    gate, up = gate_up[..., :inter], gate_up[..., inter:]
    return (F.silu(gate.float()).to(gate_up.dtype).float() * up.float()).to(gate_up.dtype)


@triton.jit
def _to_dtype(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 ``x`` rounded to nearest-even in ``dtype``, as compiled code does.

    Triton's CPU interpreter truncates fp32 -> bf16 casts; there the rounding is done on the bits first
    (NaNs are passed through unchanged), so interpreter results match the GPU's.
    """
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        bits = (bits >> 16) << 16  # two's-complement wrap-around keeps the bit pattern exact
        x = tl.where(x == x, bits.to(tl.float32, bitcast=True), x)
    return x.to(dtype)


# ----------------------------------------------------------------------------------------------------------
# RMSNorm (optionally with the residual add)
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # rows of H elements; row r at (r // inner) * stride_xo + (r % inner) * stride_xi
    res_ptr,  # same row layout (read when HAS_RESIDUAL, then overwritten with x + residual)
    w_ptr,  # [H]
    out_ptr,  # rows of H elements, same row decomposition
    n_rows,
    inner,  # rows per outer index (1 for a 2-D tensor, N for [T, N, H])
    stride_xo,
    stride_xi,
    stride_ro,
    stride_ri,
    stride_oo,
    stride_oi,
    eps,
    H: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,  # cdiv(H, BLOCK_H)
    HAS_RESIDUAL: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    outer = rows64 // inner
    within = rows64 % inner
    x_row = x_ptr + outer * stride_xo + within * stride_xi  # [BLOCK_T] pointers
    o_row = out_ptr + outer * stride_oo + within * stride_oi
    r_row = res_ptr + outer * stride_ro + within * stride_ri
    cols = tl.arange(0, BLOCK_H)
    dtype = out_ptr.dtype.element_ty

    if NUM_CHUNKS == 1:
        # The whole row stays in registers: one read of each input, one write of each output.
        col_mask = cols < H
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)  # [BLOCK_T, BLOCK_H]
        if HAS_RESIDUAL:
            r = tl.load(r_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            h = _to_dtype(x + r, dtype, INTERPRET)
            tl.store(r_row[:, None] + cols[None, :], h, mask=mask)
            x = h.to(tl.float32)
        inv = tl.rsqrt(tl.sum(x * x, axis=1) / H + eps)  # [BLOCK_T]
        n = _to_dtype(x * inv[:, None], dtype, INTERPRET)
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)  # [BLOCK_H]
        out = _to_dtype(w[None, :] * n.to(tl.float32), dtype, INTERPRET)
        tl.store(o_row[:, None] + cols[None, :], out, mask=mask)
    else:
        # Pass 1: sum of squares over chunks (writing x + residual on the way); pass 2: normalise.
        acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
        for c in range(NUM_CHUNKS):
            cc = c * BLOCK_H + cols
            mask = row_mask[:, None] & (cc < H)[None, :]
            x = tl.load(x_row[:, None] + cc[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                r = tl.load(r_row[:, None] + cc[None, :], mask=mask, other=0.0).to(tl.float32)
                h = _to_dtype(x + r, dtype, INTERPRET)
                tl.store(r_row[:, None] + cc[None, :], h, mask=mask)
                x = h.to(tl.float32)
            acc += x * x
        inv = tl.rsqrt(tl.sum(acc, axis=1) / H + eps)  # [BLOCK_T]
        if HAS_RESIDUAL:
            tl.debug_barrier()  # pass 2 re-reads the rounded sum written to residual in pass 1
        for c in range(NUM_CHUNKS):
            cc = c * BLOCK_H + cols
            col_mask = cc < H
            mask = row_mask[:, None] & col_mask[None, :]
            if HAS_RESIDUAL:
                x = tl.load(r_row[:, None] + cc[None, :], mask=mask, other=0.0).to(tl.float32)
            else:
                x = tl.load(x_row[:, None] + cc[None, :], mask=mask, other=0.0).to(tl.float32)
            n = _to_dtype(x * inv[:, None], dtype, INTERPRET)
            w = tl.load(w_ptr + cc, mask=col_mask, other=0.0).to(tl.float32)
            out = _to_dtype(w[None, :] * n.to(tl.float32), dtype, INTERPRET)
            tl.store(o_row[:, None] + cc[None, :], out, mask=mask)


def _row_layout(t: torch.Tensor) -> tuple[int, int, int]:
    """(inner, stride_outer, stride_inner) of the rows of a 2-D [R, H] or 3-D [T, N, H] tensor."""
    if t.dim() == 2:
        return 1, t.stride(0), 0
    return t.shape[1], t.stride(0), t.stride(1)


def _check_norm_args(x: torch.Tensor, weight: torch.Tensor, eps: float, dims: tuple[int, ...]) -> None:
    if x.dim() not in dims:
        raise ValueError(f"x must have {' or '.join(map(str, dims))} dims, got shape {tuple(x.shape)}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"x dtype {x.dtype} not supported (float16, bfloat16, float32)")
    hidden = x.shape[-1]
    if hidden < 1:
        raise ValueError("x must have a non-empty last dim")
    if x.stride(-1) != 1:
        raise ValueError("x must be contiguous in its last dim (stride(-1) == 1)")
    if weight.shape != (hidden,) or weight.dtype != x.dtype:
        raise ValueError(f"weight must be ({hidden},) {x.dtype}, got {tuple(weight.shape)} {weight.dtype}")
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device}, x on {x.device}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def _check_out(out: torch.Tensor, like: torch.Tensor, name: str = "out") -> None:
    if out.shape != like.shape or out.dtype != like.dtype:
        raise ValueError(f"{name} must be {tuple(like.shape)} {like.dtype}, got {tuple(out.shape)} {out.dtype}")
    if out.device != like.device:
        raise ValueError(f"{name} is on {out.device}, expected {like.device}")
    if out.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim (stride(-1) == 1)")


def _norm_launch(x, residual, weight, out, eps: float) -> None:
    hidden = x.shape[-1]
    n_rows = x.numel() // hidden
    if n_rows == 0:
        return
    block_h = min(triton.next_power_of_2(hidden), _MAX_BLOCK_H)
    num_chunks = triton.cdiv(hidden, block_h)
    block_t = max(1, _NORM_TILE // block_h)
    tile = block_t * block_h
    num_warps = 16 if tile >= 8192 else 8 if tile >= 2048 else 4
    inner, sxo, sxi = _row_layout(x)
    _, soo, soi = _row_layout(out)
    _, sro, sri = _row_layout(residual) if residual is not None else (1, 0, 0)
    _rms_norm_kernel[(triton.cdiv(n_rows, block_t),)](
        x,
        residual if residual is not None else x,
        weight,
        out,
        n_rows,
        inner,
        sxo,
        sxi,
        sro,
        sri,
        soo,
        soi,
        float(eps),
        H=hidden,
        BLOCK_T=block_t,
        BLOCK_H=block_h,
        NUM_CHUNKS=num_chunks,
        HAS_RESIDUAL=residual is not None,
        INTERPRET=bool(triton.knobs.runtime.interpret),
        num_warps=num_warps,
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm over the last dim with the semantics of ``rms_norm_ref`` (HF LlamaRMSNorm).

    Args:
        x: [T, H], or [T, N, H] for a per-head norm of a strided q/k view (e.g. split from a fused qkv output);
            fp32/fp16/bf16, stride(-1) == 1, any other strides.
        weight: [H], contiguous, x.dtype.
        eps: added to the mean square.
        out: optional destination of x's shape and dtype with stride(-1) == 1 (may be x itself: each program
            reads its rows before writing them).

    Returns:
        out (a new tensor of x's shape, contiguous, unless ``out`` was given).
    """
    _check_norm_args(x, weight, eps, (2, 3))
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    else:
        _check_out(out, x)
    _norm_launch(x, None, weight, out, eps)
    return out


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm: ``h = x + residual`` (in x.dtype), ``out = rms_norm(h)``.

    IN PLACE: ``residual`` is overwritten with h, and that same tensor is returned as the new residual.

    Args:
        x: [T, H] fp32/fp16/bf16, stride(1) == 1 (any row stride).
        residual: [T, H], x.dtype, stride(1) == 1; receives x + residual.
        weight: [H], contiguous, x.dtype.
        eps: added to the mean square.
        out: optional [T, H] x.dtype destination with stride(1) == 1 (may be x itself).

    Returns:
        (out, residual): the normalised h (a new contiguous tensor unless ``out`` was given) and ``residual``.
    """
    _check_norm_args(x, weight, eps, (2,))
    _check_out(residual, x, "residual")
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    else:
        _check_out(out, x)
    _norm_launch(x, residual, weight, out, eps)
    return out, residual


# ----------------------------------------------------------------------------------------------------------
# SiLU(gate) * up
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _silu_mul_kernel(
    gu_ptr,  # [T, 2I]
    out_ptr,  # [T, I]
    inter,  # I
    stride_gt,
    stride_ot,
    BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    row = gu_ptr + tok * stride_gt
    gate = tl.load(row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(row + inter + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    # torch rounds silu's fp32 result to the dtype before multiplying
    act = _to_dtype(gate / (1.0 + tl.exp(-gate)), dtype, INTERPRET).to(tl.float32)
    tl.store(out_ptr + tok * stride_ot + cols, _to_dtype(act * up, dtype, INTERPRET), mask=mask)


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate_up[:, :I]) * gate_up[:, I:]`` with the semantics of ``silu_mul_ref``.

    The silu is computed in fp32 and rounded to the dtype, then the product of the two dtype values is
    computed in fp32 and rounded, exactly as eager torch does for ``F.silu(gate) * up`` (the fp32 rounding
    in between is a no-op for fp32 inputs).

    Args:
        gate_up: [T, 2I] fp32/fp16/bf16, stride(1) == 1, any row stride.
        out: optional [T, I] destination of gate_up.dtype with stride(1) == 1.

    Returns:
        out [T, I] (a new contiguous tensor unless ``out`` was given).
    """
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.shape[1] == 0:
        raise ValueError(f"gate_up must be [T, 2I] with I >= 1, got shape {tuple(gate_up.shape)}")
    if gate_up.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"gate_up dtype {gate_up.dtype} not supported (float16, bfloat16, float32)")
    if gate_up.stride(1) != 1:
        raise ValueError("gate_up must be contiguous in its last dim (stride(1) == 1)")
    num_tokens, inter = gate_up.shape[0], gate_up.shape[1] // 2
    if out is None:
        out = torch.empty(num_tokens, inter, dtype=gate_up.dtype, device=gate_up.device)
    else:
        _check_out(out, gate_up[:, :inter])
    if num_tokens == 0:
        return out
    block = min(_SILU_BLOCK, triton.next_power_of_2(inter))
    _silu_mul_kernel[(num_tokens, triton.cdiv(inter, block))](
        gate_up,
        out,
        inter,
        gate_up.stride(0),
        out.stride(0),
        BLOCK=block,
        INTERPRET=bool(triton.knobs.runtime.interpret),
        num_warps=4,
    )
    return out
