"""Fused elementwise kernels of the decoder layer in Triton: RMSNorm, residual add + RMSNorm, RoPE (optionally
with the paged K/V cache store), SiLU*mul.

Data owned here: none. Every kernel reads its inputs and writes either a fresh output tensor (optionally a
caller-given ``out``) or, where documented, updates a caller's tensor in place (``add_rms_norm`` writes the
new residual stream into ``residual``; ``rope_`` rotates ``q`` and ``k`` in place; ``rope_store_`` does the
same and also writes the rotated k and v into the caller's K/V cache at the given slots). No workspace is kept.

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
    rope_:        q [T, Hq, D], k [T, Hkv, D] (any token/head stride, unit last stride), positions [T],
                  cos/sin [P, D] fp32 (rotate-half tables, cat([freqs, freqs]))
    rope_store_:  as rope_, plus v [T, Hkv, D], slots [T], k_cache/v_cache [..., Hkv, D] (e.g. the paged
                  [pages, page_size, Hkv, D]; viewable as [S, Hkv, D], slot = page * page_size + offset)
    silu_mul:     gate_up [T, 2I] (gate = first I columns, up = last I) -> out [T, I]
Supported dtypes: float32, float16, bfloat16 (every tensor of an op in one dtype, except the fp32 RoPE tables,
the integer positions / slots and rope_store_'s caches, which may be in another of the three dtypes).
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
    "rope_",
    "rope_ref",
    "rope_store_",
    "silu_mul",
    "silu_mul_ref",
]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Widest row chunk one RMSNorm program holds in registers; wider rows (H > 8192) take two passes over
# chunks of this size. A module constant so that tests can shrink it to exercise the chunked path.
_MAX_BLOCK_H = 8192
_NORM_TILE = 2048  # target elements per RMSNorm program when rows are short (several rows per program)
_ROPE_MAX_HEADS = 16  # heads per RoPE program
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


def rope_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE ``x*c + rotate_half(x)*s`` in fp32 from x and the fp32 tables, rounded once.

    Returns new (q, k); does not mutate. (The eager decoder path rounds cos/sin to the 16-bit dtype first
    and rounds each product and the sum; that differs from this by a few 16-bit rounding steps.)
    """
    c = cos[positions].float().unsqueeze(1)  # [T, 1, D]
    s = sin[positions].float().unsqueeze(1)

    def rot(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        half = xf.shape[-1] // 2
        return (xf * c + torch.cat([-xf[..., half:], xf[..., :half]], dim=-1) * s).to(x.dtype)

    return rot(q), rot(k)


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
# RoPE
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _rope_heads(
    base,  # pointer to this token's head 0
    stride_h,
    head0,
    n_heads,
    c1,  # [BLOCK_HALF] fp32 cos of the first half
    c2,  # [BLOCK_HALF] fp32 cos of the second half
    s1,
    s2,
    dst,  # pointer to this token's head 0 in the cache (STORE), else unused
    stride_dh,
    keep,  # scalar bool: write to dst (STORE: the token's slot is >= 0)
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    STORE: tl.constexpr,
    CAST: tl.constexpr,  # dst has another dtype than base
    INTERPRET: tl.constexpr,
):
    """Rotates heads [head0, head0 + BLOCK_HEADS) (those < n_heads) of one token in place; with STORE also
    writes the rotated heads (rounded to base's dtype, then cast to dst's) to dst."""
    heads = head0 + tl.arange(0, BLOCK_HEADS)
    offs = tl.arange(0, BLOCK_HALF)
    mask = (heads < n_heads)[:, None] & (offs < HALF)[None, :]
    p1 = base + heads[:, None] * stride_h + offs[None, :]  # [BLOCK_HEADS, BLOCK_HALF] first halves
    p2 = p1 + HALF
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * c1[None, :] - x2 * s1[None, :]
    o2 = x2 * c2[None, :] + x1 * s2[None, :]
    r1 = _to_dtype(o1, base.dtype.element_ty, INTERPRET)
    r2 = _to_dtype(o2, base.dtype.element_ty, INTERPRET)
    tl.store(p1, r1, mask=mask)
    tl.store(p2, r2, mask=mask)
    if STORE:
        d1 = dst + heads[:, None] * stride_dh + offs[None, :]
        _store_cast(d1, r1, mask & keep, CAST, INTERPRET)
        _store_cast(d1 + HALF, r2, mask & keep, CAST, INTERPRET)


@triton.jit
def _store_cast(ptr, x, mask, CAST: tl.constexpr, INTERPRET: tl.constexpr):
    """Stores x at ptr, rounded to nearest-even in ptr's dtype when CAST (as torch's ``.to(dtype)``)."""
    if CAST:
        x = _to_dtype(x.to(tl.float32), ptr.dtype.element_ty, INTERPRET)
    tl.store(ptr, x, mask=mask)


@triton.jit
def _copy_heads(
    src,  # pointer to this token's head 0
    stride_h,
    head0,
    n_heads,
    dst,  # pointer to this token's head 0 in the cache
    stride_dh,
    keep,  # scalar bool: write at all
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    CAST: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Copies heads [head0, head0 + BLOCK_HEADS) (those < n_heads) of one token from src to dst."""
    heads = head0 + tl.arange(0, BLOCK_HEADS)
    offs = tl.arange(0, BLOCK_HALF)
    mask = (heads < n_heads)[:, None] & (offs < HALF)[None, :]
    s1 = src + heads[:, None] * stride_h + offs[None, :]  # [BLOCK_HEADS, BLOCK_HALF] first halves
    d1 = dst + heads[:, None] * stride_dh + offs[None, :]
    smask = mask & keep
    _store_cast(d1, tl.load(s1, mask=smask, other=0.0), smask, CAST, INTERPRET)
    _store_cast(d1 + HALF, tl.load(s1 + HALF, mask=smask, other=0.0), smask, CAST, INTERPRET)


@triton.jit
def _rope_kernel(
    q_ptr,  # [T, Hq, D]
    k_ptr,  # [T, Hkv, D]
    pos_ptr,  # [T] int32/int64
    cos_ptr,  # [P, D] fp32
    sin_ptr,  # [P, D] fp32
    v_ptr,  # [T, Hkv, D] (read when STORE)
    slot_ptr,  # [T] int32/int64 cache slots (read when STORE)
    kc_ptr,  # [S, Hkv, D] key cache, flat slots (written when STORE)
    vc_ptr,  # [S, Hkv, D] value cache (written when STORE)
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_pos,
    stride_cos,
    stride_sin,
    stride_vt,
    stride_vh,
    stride_slot,
    stride_kcs,
    stride_kch,
    stride_vcs,
    stride_vch,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HALF: tl.constexpr,  # D // 2
    BLOCK_HALF: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    NUM_Q_BLOCKS: tl.constexpr,  # cdiv(Hq, BLOCK_HEADS); program_id(1) beyond it covers k (and v) heads
    STORE: tl.constexpr,  # also write rotated k and v to the caches at the token's slot
    CAST: tl.constexpr,  # the caches' dtype differs from k/v's
    INTERPRET: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    pos = tl.load(pos_ptr + tok * stride_pos).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    dmask = offs < HALF
    # Both halves of the tables are read, so the kernel matches rope_ref for any table.
    c1 = tl.load(cos_ptr + pos * stride_cos + offs, mask=dmask, other=0.0)
    c2 = tl.load(cos_ptr + pos * stride_cos + HALF + offs, mask=dmask, other=0.0)
    s1 = tl.load(sin_ptr + pos * stride_sin + offs, mask=dmask, other=0.0)
    s2 = tl.load(sin_ptr + pos * stride_sin + HALF + offs, mask=dmask, other=0.0)
    if hb < NUM_Q_BLOCKS:
        _rope_heads(
            q_ptr + tok * stride_qt, stride_qh, hb * BLOCK_HEADS, NUM_Q_HEADS, c1, c2, s1, s2,
            q_ptr, 0, False, HALF, BLOCK_HALF, BLOCK_HEADS, False, False, INTERPRET,
        )  # fmt: skip
    else:
        head0 = (hb - NUM_Q_BLOCKS) * BLOCK_HEADS
        if STORE:
            slot = tl.load(slot_ptr + tok * stride_slot).to(tl.int64)
            keep = slot >= 0  # a negative slot (padding) writes nothing to the caches
            _rope_heads(
                k_ptr + tok * stride_kt, stride_kh, head0, NUM_KV_HEADS, c1, c2, s1, s2,
                kc_ptr + slot * stride_kcs, stride_kch, keep, HALF, BLOCK_HALF, BLOCK_HEADS, True, CAST, INTERPRET,
            )  # fmt: skip
            _copy_heads(
                v_ptr + tok * stride_vt, stride_vh, head0, NUM_KV_HEADS, vc_ptr + slot * stride_vcs, stride_vch,
                keep, HALF, BLOCK_HALF, BLOCK_HEADS, CAST, INTERPRET,
            )  # fmt: skip
        else:
            _rope_heads(
                k_ptr + tok * stride_kt, stride_kh, head0, NUM_KV_HEADS, c1, c2, s1, s2,
                k_ptr, 0, False, HALF, BLOCK_HALF, BLOCK_HEADS, False, False, INTERPRET,
            )  # fmt: skip


def _check_rope_args(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> None:
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q and k must be [T, heads, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    num_tokens, _, head_dim = q.shape
    if k.shape[0] != num_tokens or k.shape[2] != head_dim:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)} in tokens or head_dim")
    if head_dim % 2 or head_dim < 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype:
        raise ValueError(f"q and k must share a dtype among float16, bfloat16, float32; got {q.dtype}, {k.dtype}")
    if q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError("q and k must be contiguous in head_dim (stride(2) == 1)")
    if positions.shape != (num_tokens,) or positions.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"positions must be int64/int32 of shape ({num_tokens},), got {positions.dtype} {tuple(positions.shape)}"
        )
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dim() != 2 or table.shape[1] != head_dim or table.dtype != torch.float32:
            raise ValueError(f"{name} must be [P, {head_dim}] float32, got {tuple(table.shape)} {table.dtype}")
        if table.stride(1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim (stride(1) == 1)")
    for name, t in (("k", k), ("positions", positions), ("cos", cos), ("sin", sin)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")


def _rope_launch(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    positions: torch.Tensor,  # [T]
    cos: torch.Tensor,  # [P, D]
    sin: torch.Tensor,  # [P, D]
    store: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None,  # v, slots, k/v cache [S, Hkv, D]
) -> None:
    num_tokens, num_q_heads, head_dim = q.shape
    if num_tokens == 0:
        return
    num_kv_heads = k.shape[1]
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    block_heads = min(_ROPE_MAX_HEADS, triton.next_power_of_2(max(num_q_heads, num_kv_heads, 1)))
    num_q_blocks = triton.cdiv(num_q_heads, block_heads)
    num_blocks = num_q_blocks + triton.cdiv(num_kv_heads, block_heads)
    if num_blocks == 0:
        return
    # rope_ only: the store arguments are never read (STORE=False); k stands in for the pointers
    v, slots, kc, vc = store if store is not None else (k, positions, k, k)
    _rope_kernel[(num_tokens, num_blocks)](
        q,
        k,
        positions,
        cos,
        sin,
        v,
        slots,
        kc,
        vc,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        positions.stride(0),
        cos.stride(0),
        sin.stride(0),
        v.stride(0) if store is not None else 0,
        v.stride(1) if store is not None else 0,
        slots.stride(0) if store is not None else 0,
        kc.stride(0) if store is not None else 0,
        kc.stride(1) if store is not None else 0,
        vc.stride(0) if store is not None else 0,
        vc.stride(1) if store is not None else 0,
        NUM_Q_HEADS=num_q_heads,
        NUM_KV_HEADS=num_kv_heads,
        HALF=half,
        BLOCK_HALF=block_half,
        BLOCK_HEADS=block_heads,
        NUM_Q_BLOCKS=num_q_blocks,
        STORE=store is not None,
        CAST=store is not None and kc.dtype != k.dtype,
        INTERPRET=bool(triton.knobs.runtime.interpret),
        num_warps=4,
    )


def rope_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate-half RoPE applied IN PLACE to q and k in one launch, with the semantics of ``rope_ref``.

    Args:
        q: [T, Hq, D], k: [T, Hkv, D]; one dtype among fp32/fp16/bf16; D even; stride(2) == 1, any token and
            head strides (e.g. views of a fused qkv output). q and k must not overlap.
        positions: [T] int64 or int32; every value must be in [0, P) (not checked: that would need a host sync).
        cos, sin: [P, D] fp32 tables with stride(1) == 1.
    """
    _check_rope_args(q, k, positions, cos, sin)
    _rope_launch(q, k, positions, cos, sin, None)


def rope_store_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """``rope_(q, k, ...)`` and the K/V cache store of the rotated k and of v, in one launch.

    IN PLACE: q and k are rotated exactly as ``rope_`` rotates them (so afterwards they hold ``rope_ref``'s
    values; k is kept rotated too, so a caller may still read it), and for every token t
    ``k_cache.view(-1, Hkv, D)[slots[t]] = k[t].to(cache dtype)`` and likewise v, i.e. the rotated k rounded to
    its own dtype first, then cast (``rope_ref`` followed by ``write_kv``'s ``index_copy_``). A token whose
    slot is negative writes nothing to the caches (its q and k are still rotated). Tokens sharing a slot
    (e.g. padding rows of a CUDA-graph batch, all on the scratch slot) leave one of their values there, as
    ``index_copy_`` does.

    Args:
        q: [T, Hq, D], k: [T, Hkv, D], v: [T, Hkv, D]; one dtype among fp32/fp16/bf16; D even; stride(2) == 1,
            any token and head strides (e.g. views of a fused qkv output). q, k, v and the caches must not overlap.
        positions: [T] int64 or int32, values in [0, P) (not checked: that would need a host sync).
        cos, sin: [P, D] fp32 tables with stride(1) == 1.
        k_cache, v_cache: equal shapes [..., Hkv, D] (e.g. the paged [pages, page_size, Hkv, D]) in one dtype
            among fp32/fp16/bf16, each viewable as [S, Hkv, D] with stride(-1) == 1.
        slots: [T] int64 or int32 flat slot of each token (page * page_size + offset); values < S (not checked).
    """
    _check_rope_args(q, k, positions, cos, sin)
    num_tokens, _, head_dim = k.shape
    if v.shape != k.shape or v.dtype != k.dtype or v.stride(2) != 1:
        raise ValueError(f"v must be {tuple(k.shape)} {k.dtype} with stride(2) == 1, got {tuple(v.shape)} {v.dtype}")
    if slots.shape != (num_tokens,) or slots.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"slots must be int64/int32 of shape ({num_tokens},), got {slots.dtype} {tuple(slots.shape)}")
    heads = tuple(k.shape[1:])
    if k_cache.dim() < 3 or tuple(k_cache.shape[-2:]) != heads or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must share a shape [..., {heads[0]}, {heads[1]}], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_cache.dtype not in _SUPPORTED_DTYPES or v_cache.dtype != k_cache.dtype:
        raise ValueError(
            f"caches must share a dtype among float16, bfloat16, float32; got {k_cache.dtype}, {v_cache.dtype}"
        )
    try:
        kc, vc = k_cache.view(-1, *heads), v_cache.view(-1, *heads)  # [S, Hkv, D] views: no copy
    except RuntimeError as e:
        raise ValueError(f"caches must be viewable as [S, {heads[0]}, {heads[1]}]: {e}") from None
    if kc.stride(2) != 1 or vc.stride(2) != 1:
        raise ValueError("caches must be contiguous in head_dim (stride(-1) == 1)")
    for name, t in (("v", v), ("slots", slots), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    _rope_launch(q, k, positions, cos, sin, (v, slots, kc, vc))


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
