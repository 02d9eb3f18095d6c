"""RoPE in Triton: rotate q and k in place (``rope_``), optionally also writing the rotated k and v into a paged
K/V cache in the same launch (``rope_store_``, one kernel per layer instead of RoPE plus two index copies).

Data owned here: none. ``rope_`` rotates the caller's ``q`` and ``k`` in place; ``rope_store_`` does the same and
writes the rotated k and v into the caller's K/V cache at the given slots. No workspace is kept. The conventions
are those of `specray.kernels.fused` (one launch per op, no host sync, CUDA-graph capturable once compiled, an
exact torch reference ``rope_ref``, round-to-nearest-even on the bits under the CPU interpreter).

Layouts:
    rope_:        q [T, Hq, D], k [T, Hkv, D] (any token/head stride, unit last stride), positions [T],
                  cos/sin [P, D] fp32 (rotate-half tables, cat([freqs, freqs]))
    rope_store_:  as rope_, plus v [T, Hkv, D], slots [T], k_cache/v_cache [..., Hkv, D] (e.g. the paged
                  [pages, page_size, Hkv, D]; viewable as [S, Hkv, D], slot = page * page_size + offset)
Supported dtypes: float32, float16, bfloat16 (q, k, v in one dtype; the fp32 tables, the integer positions /
slots and rope_store_'s caches, which may be in another of the three dtypes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from specray.kernels.fused import _SUPPORTED_DTYPES, _to_dtype

__all__ = ["rope_", "rope_ref", "rope_store_"]

_ROPE_MAX_HEADS = 16  # heads per RoPE program


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
