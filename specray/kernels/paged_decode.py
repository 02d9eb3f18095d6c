"""Split-KV (flash-decoding style) paged decode attention in Triton.

Data owned here: ``PagedDecodeAttention`` owns one fp32 workspace, allocated once at construction
and reused by every call (and every layer, since calls on one stream run one after another):
    partial_out: [max_batch_size, num_q_heads, num_splits, head_dim] fp32, per-split normalised output
    partial_lse: [max_batch_size, num_q_heads, num_splits] fp32, per-split natural-log LSE (-inf if empty)
The KV cache, page tables, sequence lengths and outputs belong to the caller.

Layout (shared with ``specray.kernels.reference.paged_decode_reference``):
    q:           [B, Hq, D] one query token per sequence, Hq = G * Hkv (GQA)
    k/v_cache:   [num_pages, page_size, Hkv, D]
    page_tables: [B, P] int32 page ids; padding past a sequence's last page is never read
    seq_lens:    [B] int32 number of valid KV tokens (the decoded token's own K/V already written)

Kernel 1 runs one program per (sequence, kv head, split). It loads the G query heads of its GQA group
as one [G_PAD, D] tile (G padded to a power of two >= 16 so ``tl.dot`` gets legal shapes), walks its
share of the sequence's visible KV in blocks of BLOCK_N tokens (page ids gathered per token from the
page table, so a block may span several pages or part of one), and keeps an fp32 online softmax.
The split ranges are computed inside the kernel from ``seq_lens`` read from device memory, so the
launch grid and every shape depend only on static sizes: a call does no host sync and can be captured
in a CUDA graph. Kernel 2 merges the splits by their LSE. With one split, kernel 1 writes the final
output directly and kernel 2 is skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["PagedDecodeAttention", "choose_num_splits"]

_LOG2E = 1.4426950408889634
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def choose_num_splits(
    batch: int,
    num_kv_heads: int,
    max_seq_len: int,
    num_sms: int = 132,
    *,
    min_tokens_per_split: int = 128,
    max_splits: int = 128,
) -> int:
    """Number of KV splits so that the split kernel fills the GPU without tiny splits.

    Aims for about ``4 * num_sms`` programs in the (batch, kv head, split) grid. On an H200 (bf16, d=128,
    64-token blocks, batch 1, 32K, `benchmarks/decode_splits.py`) about 512 programs were fastest both with
    8 KV heads (64 splits: 1.05x the 400 programs of the earlier 3 * num_sms rule) and with the 4 KV heads
    of a TP=2 shard (128 splits: 1.07x); more splits only add merge traffic. A split never gets fewer than
    ``min_tokens_per_split`` tokens of the longest sequence and there are at most ``max_splits``.
    The result depends only on its arguments (not on the live sequence lengths), so choose it from
    the configured maximum context and batch size when building ``PagedDecodeAttention``.
    """
    if batch < 1 or num_kv_heads < 1 or num_sms < 1:
        raise ValueError("batch, num_kv_heads and num_sms must be >= 1")
    programs = batch * num_kv_heads
    wanted = -(-4 * num_sms // programs)
    by_length = max(1, -(-max(max_seq_len, 1) // min_tokens_per_split))
    return max(1, min(wanted, by_length, max_splits))


@triton.jit
def _attend_block(
    blk,
    q,  # [G_PAD, BLOCK_D] query tile of the GQA group
    m_i,  # [G_PAD] fp32 running max (log2 domain)
    l_i,  # [G_PAD] fp32 running sum
    acc,  # [G_PAD, BLOCK_D] fp32 unnormalised output
    page_row,  # pointer to this sequence's page-table row
    k_head,  # k_cache pointer offset to this kv head
    v_head,  # v_cache pointer offset to this kv head
    seq_len,
    kv_start,
    max_pages,
    qk_scale_log2,
    stride_kp,
    stride_kt,
    stride_vp,
    stride_vt,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Online-softmax update with the keys/values of token block ``blk`` (BLOCK_N tokens)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    tok = blk * BLOCK_N + offs_n  # [BLOCK_N] token positions
    tok_mask = (tok < seq_len) & (tok >= kv_start)
    slot = tok // PAGE_SIZE  # page-table column of each token
    page = tl.load(page_row + slot, mask=tok_mask & (slot < max_pages), other=0).to(tl.int64)
    in_page = tok % PAGE_SIZE
    k_off = page[:, None] * stride_kp + in_page[:, None] * stride_kt + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
    v_off = page[:, None] * stride_vp + in_page[:, None] * stride_vt + offs_d[None, :]
    if BLOCK_D == HEAD_DIM:
        kv_mask = tok_mask[:, None]
    else:
        kv_mask = tok_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(k_head + k_off, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(v_head + v_off, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]

    if INTERPRET:
        # Triton's CPU interpreter multiplies bf16 bit patterns as integers in tl.dot: upcast there
        # (after the same bf16 rounding of p as on the GPU). Compiled code keeps 16-bit dot inputs.
        q = q.to(tl.float32)
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2  # [G_PAD, BLOCK_N] fp32
    s = tl.where(tok_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    p_in = p.to(v.dtype)  # [G_PAD, BLOCK_N] in the cache dtype: both dot inputs 16-bit, or both fp32
    if INTERPRET:
        p_in = p_in.to(tl.float32)
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p_in, v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _paged_decode_split_kernel(
    q_ptr,  # [B, Hq, D]
    k_ptr,  # [num_pages, page_size, Hkv, D]
    v_ptr,  # [num_pages, page_size, Hkv, D]
    page_table_ptr,  # [B, P] int32
    seq_lens_ptr,  # [B] int32
    o_ptr,  # [B, Hq, S, D] fp32 partials, or [B, Hq, D] final output when NUM_SPLITS == 1
    lse_ptr,  # [B, Hq, S] fp32 partials, or [B, Hq] final lse when NUM_SPLITS == 1
    qk_scale_log2,  # softmax scale * log2(e)
    window,  # sliding window size (read only when HAS_WINDOW)
    max_pages,  # P
    stride_qb,
    stride_qh,
    stride_kp,
    stride_kt,
    stride_kh,
    stride_vp,
    stride_vt,
    stride_vh,
    stride_ptb,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    stride_ls,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    batch_idx = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + batch_idx)
    if HAS_WINDOW:
        kv_start = tl.maximum(seq_len - window, 0)
    else:
        kv_start = seq_len * 0
    # Blocks are aligned to multiples of BLOCK_N tokens; every block in [blk_lo, blk_hi) holds at
    # least one visible key, so the running max is finite after the first block.
    blk_lo = kv_start // BLOCK_N
    blk_hi = tl.cdiv(seq_len, BLOCK_N)
    blocks_per_split = tl.cdiv(tl.maximum(blk_hi - blk_lo, 0), NUM_SPLITS)
    my_lo = blk_lo + split * blocks_per_split
    my_hi = tl.minimum(my_lo + blocks_per_split, blk_hi)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    heads = kv_head * GROUP + offs_g  # [G_PAD] query heads of this GQA group

    q_ptrs = q_ptr + batch_idx.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
    if BLOCK_D == HEAD_DIM:
        q = tl.load(q_ptrs, mask=g_mask[:, None], other=0.0)  # [G_PAD, D]
    else:
        q = tl.load(q_ptrs, mask=g_mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)  # running max, log2 domain
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], dtype=tl.float32)

    page_row = page_table_ptr + batch_idx.to(tl.int64) * stride_ptb
    k_head = k_ptr + kv_head.to(tl.int64) * stride_kh
    v_head = v_ptr + kv_head.to(tl.int64) * stride_vh
    if INTERPRET:
        # Triton's CPU interpreter (numpy >= 2.4) cannot take tensor loop bounds in range(); the
        # compiled kernel keeps the for loop so that Triton can software-pipeline the KV loads.
        blk = my_lo
        while blk < my_hi:
            m_i, l_i, acc = _attend_block(
                blk,
                q,
                m_i,
                l_i,
                acc,
                page_row,
                k_head,
                v_head,
                seq_len,
                kv_start,
                max_pages,
                qk_scale_log2,
                stride_kp,
                stride_kt,
                stride_vp,
                stride_vt,
                HEAD_DIM,
                BLOCK_D,
                PAGE_SIZE,
                BLOCK_N,
                DOT_PRECISION,
                INTERPRET,
            )
            blk += 1
    else:
        for blk in range(my_lo, my_hi):
            m_i, l_i, acc = _attend_block(
                blk,
                q,
                m_i,
                l_i,
                acc,
                page_row,
                k_head,
                v_head,
                seq_len,
                kv_start,
                max_pages,
                qk_scale_log2,
                stride_kp,
                stride_kt,
                stride_vp,
                stride_vt,
                HEAD_DIM,
                BLOCK_D,
                PAGE_SIZE,
                BLOCK_N,
                DOT_PRECISION,
                INTERPRET,
            )

    nonempty = l_i > 0.0
    safe_l = tl.where(nonempty, l_i, 1.0)
    out = acc / safe_l[:, None]  # [G_PAD, BLOCK_D]; all zeros for an empty split
    lse = tl.where(nonempty, (m_i + tl.log2(safe_l)) * 0.6931471805599453, float("-inf"))  # natural log

    o_ptrs = (
        o_ptr + batch_idx.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :]
    )
    if BLOCK_D == HEAD_DIM:
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=g_mask[:, None])
    else:
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=g_mask[:, None] & (offs_d[None, :] < HEAD_DIM))
    lse_ptrs = lse_ptr + batch_idx.to(tl.int64) * stride_lb + heads * stride_lh + split * stride_ls
    tl.store(lse_ptrs, lse, mask=g_mask)


@triton.jit
def _merge_splits_kernel(
    part_o_ptr,  # [B, Hq, S, D] fp32
    part_lse_ptr,  # [B, Hq, S] fp32
    o_ptr,  # [B, Hq, D]
    lse_ptr,  # [B, Hq] fp32
    stride_pob,
    stride_poh,
    stride_pos,
    stride_plb,
    stride_plh,
    stride_ob,
    stride_oh,
    stride_lb,
    stride_lh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    batch_idx = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)

    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NUM_SPLITS
    d_mask = offs_d < HEAD_DIM

    lse_s = tl.load(
        part_lse_ptr + batch_idx * stride_plb + head * stride_plh + offs_s, mask=s_mask, other=float("-inf")
    )  # [S_PAD]
    m = tl.max(lse_s, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_safe)  # 0 for empty splits
    denom = tl.sum(w, axis=0)

    po_ptrs = part_o_ptr + batch_idx * stride_pob + head * stride_poh + offs_s[:, None] * stride_pos
    part = tl.load(po_ptrs + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :], other=0.0)  # [S_PAD, D]
    nonempty = denom > 0.0
    safe_denom = tl.where(nonempty, denom, 1.0)
    out = tl.sum(part * w[:, None], axis=0) / safe_denom  # [BLOCK_D]; zeros if every split is empty
    lse = tl.where(nonempty, m_safe + tl.log(safe_denom), float("-inf"))

    tl.store(o_ptr + batch_idx * stride_ob + head * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty), mask=d_mask)
    tl.store(lse_ptr + batch_idx * stride_lb + head * stride_lh, lse)


class PagedDecodeAttention:
    """Paged decode attention with a preallocated split-KV workspace (CUDA-graph capturable).

    Args:
        max_batch_size: largest batch ``run`` accepts (sizes the workspace).
        num_q_heads, num_kv_heads: Hq and Hkv; Hq must be a multiple of Hkv (any group size).
        head_dim: D, a multiple of 8 in [16, 256] (non-powers of two are padded with masks).
        num_splits: KV splits per (sequence, kv head); see ``choose_num_splits``.
        device: device of the workspace; every tensor given to ``run`` must live there.
        block_n: KV tokens per inner-loop block (power of two >= 16; independent of the page size).
        num_warps, num_stages: Triton launch parameters of the split kernel.

    Call ``run`` once before capturing it in a CUDA graph so that Triton compiles outside the capture.
    Calls that share one instance must not run concurrently (one stream): they share the workspace.
    """

    def __init__(
        self,
        max_batch_size: int,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        num_splits: int,
        device: torch.device | str,
        *,
        block_n: int | None = None,
        num_warps: int = 4,
        num_stages: int = 2,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if num_kv_heads < 1 or num_q_heads < 1 or num_q_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_q_heads ({num_q_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})"
            )
        if not (16 <= head_dim <= 256 and head_dim % 8 == 0):
            raise ValueError(f"head_dim must be a multiple of 8 in [16, 256], got {head_dim}")
        if num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        block_d = triton.next_power_of_2(head_dim)
        if block_n is None:
            # Measured on H100 (bf16, batch 1, 32K-128K, BENCHMARKS.md): 64-token blocks with 2 stages beat
            # 32-token blocks with 3 by 4-10% at d=128 (up to 256 keeps 32); at d=64 64 was already best.
            block_n = 64 if head_dim <= 128 else 32
        if block_n < 16 or block_n & (block_n - 1):
            raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")

        self.max_batch_size = max_batch_size
        self.num_q_heads = num_q_heads
        self.num_kv_heads = num_kv_heads
        self.group_size = num_q_heads // num_kv_heads
        self.head_dim = head_dim
        self.num_splits = num_splits
        self.device = torch.device(device)
        self.block_n = block_n
        self.block_d = block_d
        self.group_pad = max(16, triton.next_power_of_2(self.group_size))
        self.num_warps = num_warps
        self.num_stages = num_stages
        # Workspace, only used when num_splits > 1.
        ws_splits = num_splits if num_splits > 1 else 0
        self.partial_out = torch.empty(  # [max_B, Hq, S, D] fp32
            max_batch_size, num_q_heads, ws_splits, head_dim, dtype=torch.float32, device=self.device
        )
        self.partial_lse = torch.empty(  # [max_B, Hq, S] fp32
            max_batch_size, num_q_heads, ws_splits, dtype=torch.float32, device=self.device
        )
        self.device = self.partial_out.device  # resolved, e.g. "cuda" -> "cuda:0"

    def _check_inputs(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        page_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        sliding_window: int | None,
        out: torch.Tensor | None,
        lse_out: torch.Tensor | None,
    ) -> None:
        if q.dim() != 3:
            raise ValueError(f"q must be [batch, num_q_heads, head_dim], got shape {tuple(q.shape)}")
        batch, num_q_heads, head_dim = q.shape
        if not 1 <= batch <= self.max_batch_size:
            raise ValueError(f"batch size {batch} must be in [1, max_batch_size={self.max_batch_size}]")
        if num_q_heads != self.num_q_heads or head_dim != self.head_dim:
            raise ValueError(
                f"q has {num_q_heads} heads of dim {head_dim}, expected {self.num_q_heads} heads of dim {self.head_dim}"
            )
        if q.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"q dtype {q.dtype} not supported (float16, bfloat16, float32)")
        for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            if cache.dim() != 4:
                raise ValueError(
                    f"{name} must be [num_pages, page_size, num_kv_heads, head_dim], got {tuple(cache.shape)}"
                )
            if cache.dtype != q.dtype:
                raise ValueError(f"{name} dtype {cache.dtype} differs from q dtype {q.dtype}")
            if cache.shape[2] != self.num_kv_heads or cache.shape[3] != self.head_dim:
                raise ValueError(
                    f"{name} has {cache.shape[2]} kv heads of dim {cache.shape[3]}, expected "
                    f"{self.num_kv_heads} of dim {self.head_dim}"
                )
            if cache.stride(3) != 1:
                raise ValueError(f"{name} must be contiguous in head_dim (stride(3) == 1)")
        if k_cache.shape != v_cache.shape:
            raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
        if q.stride(2) != 1:
            raise ValueError("q must be contiguous in head_dim (stride(2) == 1)")
        if page_tables.dim() != 2 or page_tables.shape[0] != batch:
            raise ValueError(f"page_tables must be [{batch}, max_pages], got {tuple(page_tables.shape)}")
        if page_tables.dtype != torch.int32:
            raise ValueError(f"page_tables must be int32, got {page_tables.dtype}")
        if page_tables.stride(1) != 1:
            raise ValueError("page_tables rows must be contiguous (stride(1) == 1)")
        if seq_lens.shape != (batch,) or seq_lens.dtype != torch.int32:
            raise ValueError(
                f"seq_lens must be int32 of shape ({batch},), got {seq_lens.dtype} {tuple(seq_lens.shape)}"
            )
        if not seq_lens.is_contiguous():
            raise ValueError("seq_lens must be contiguous")
        if sliding_window is not None and (isinstance(sliding_window, bool) or not 1 <= sliding_window < 2**31):
            raise ValueError(f"sliding_window must be None or an int in [1, 2**31), got {sliding_window}")
        if out is not None:
            if out.shape != q.shape or out.dtype != q.dtype:
                raise ValueError(f"out must be {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")
            if out.stride(2) != 1:
                raise ValueError("out must be contiguous in head_dim (stride(2) == 1)")
        if lse_out is not None and (lse_out.shape != (batch, num_q_heads) or lse_out.dtype != torch.float32):
            raise ValueError(
                f"lse_out must be ({batch}, {num_q_heads}) float32, got {tuple(lse_out.shape)} {lse_out.dtype}"
            )
        tensors = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "page_tables": page_tables}
        tensors |= {"seq_lens": seq_lens, "out": out, "lse_out": lse_out}
        for name, t in tensors.items():
            if t is not None and t.device != self.device:
                raise ValueError(f"{name} is on {t.device}, expected {self.device}")

    def run(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        page_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        scale: float,
        sliding_window: int | None = None,
        out: torch.Tensor | None = None,
        lse_out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode attention for one query token per sequence.

        Args:
            q: [B, Hq, D] (B <= max_batch_size), fp16/bf16/fp32, stride(2) == 1.
            k_cache, v_cache: [num_pages, page_size, Hkv, D], same dtype as q, stride(3) == 1.
            page_tables: [B, P] int32; seq_lens: [B] int32 with seq_len <= P * page_size (not checked:
                checking would need a host sync).
            scale: softmax scale. sliding_window: None, or W >= 1 (key j visible iff j > seq_len-1-W).
            out: optional [B, Hq, D] q.dtype destination; lse_out: optional [B, Hq] fp32 destination.

        Returns:
            (out [B, Hq, D] q.dtype, lse [B, Hq] fp32 natural-log LSE; -inf and zero output for a
            sequence with no visible key).
        """
        self._check_inputs(q, k_cache, v_cache, page_tables, seq_lens, sliding_window, out, lse_out)
        batch = q.shape[0]
        if out is None:
            out = torch.empty_like(q, memory_format=torch.contiguous_format)
        if lse_out is None:
            lse_out = torch.empty(batch, self.num_q_heads, dtype=torch.float32, device=q.device)

        direct = self.num_splits == 1
        if direct:
            o_buf, o_strides = out, (out.stride(0), out.stride(1), 0)
            l_buf, l_strides = lse_out, (lse_out.stride(0), lse_out.stride(1), 0)
        else:
            o_buf, l_buf = self.partial_out, self.partial_lse
            o_strides = (o_buf.stride(0), o_buf.stride(1), o_buf.stride(2))
            l_strides = (l_buf.stride(0), l_buf.stride(1), l_buf.stride(2))

        grid = (batch, self.num_kv_heads, self.num_splits)
        _paged_decode_split_kernel[grid](
            q,
            k_cache,
            v_cache,
            page_tables,
            seq_lens,
            o_buf,
            l_buf,
            float(scale) * _LOG2E,
            int(sliding_window or 0),
            page_tables.shape[1],
            q.stride(0),
            q.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            v_cache.stride(0),
            v_cache.stride(1),
            v_cache.stride(2),
            page_tables.stride(0),
            *o_strides,
            *l_strides,
            HEAD_DIM=self.head_dim,
            BLOCK_D=self.block_d,
            GROUP=self.group_size,
            GROUP_PAD=self.group_pad,
            PAGE_SIZE=k_cache.shape[1],
            BLOCK_N=self.block_n,
            NUM_SPLITS=self.num_splits,
            HAS_WINDOW=sliding_window is not None,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            INTERPRET=bool(triton.knobs.runtime.interpret),
            num_warps=self.num_warps,
            num_stages=self.num_stages,
        )
        if not direct:
            _merge_splits_kernel[(batch, self.num_q_heads)](
                self.partial_out,
                self.partial_lse,
                out,
                lse_out,
                self.partial_out.stride(0),
                self.partial_out.stride(1),
                self.partial_out.stride(2),
                self.partial_lse.stride(0),
                self.partial_lse.stride(1),
                out.stride(0),
                out.stride(1),
                lse_out.stride(0),
                lse_out.stride(1),
                HEAD_DIM=self.head_dim,
                BLOCK_D=self.block_d,
                NUM_SPLITS=self.num_splits,
                SPLITS_PAD=triton.next_power_of_2(self.num_splits),
                num_warps=4,
            )
        return out, lse_out
