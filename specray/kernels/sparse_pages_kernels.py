"""Triton kernels of UNIQUE sparse page attention (the host wrapper is ``specray.kernels.sparse_pages``).

Owns no data. ``score_pages_kernel`` writes one fp32 score per (row, KV head, page-table column);
``sparse_attention_kernel`` reads the kept columns (``torch.topk`` of those scores) and writes split-KV
partial outputs/LSEs, or the final ones when there is a single split.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def score_pages_kernel(
    q_ptr,  # [R, Hq, D]
    page_table_ptr,  # [R, P] int32
    prefix_lens_ptr,  # [R] int32
    mean_ptr,  # [num_pages, Hkv, D] fp32 or q's dtype
    std_ptr,  # [num_pages, Hkv] fp32
    scores_ptr,  # [R, Hkv, P] fp32 out
    std_weight,
    max_pages,  # P
    sink_pages,
    recent_pages,
    stride_qr,
    stride_qh,
    stride_ptr,
    stride_mp,
    stride_mh,
    stride_sp,
    stride_sh,
    stride_scr,
    stride_sch,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Program (row, kv head, block of BLOCK_P page-table columns): max over the GQA group of
    q.mean + std_weight * |q| * std per complete page; +inf for forced pages, -inf for the rest."""
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    pblk = tl.program_id(2)

    n_full = tl.load(prefix_lens_ptr + row) // PAGE_SIZE
    slots = pblk * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P] page-table columns
    full = slots < n_full
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g

    q_ptrs = q_ptr + row.to(tl.int64) * stride_qr + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [G_PAD, BLOCK_D]
    qf = q.to(tl.float32)
    q_norm = tl.sqrt(tl.sum(qf * qf, axis=1))  # [G_PAD]

    pages = tl.load(page_table_ptr + row.to(tl.int64) * stride_ptr + slots, mask=full, other=0).to(tl.int64)
    m_ptrs = mean_ptr + pages[:, None] * stride_mp + kv_head * stride_mh + offs_d[None, :]
    mean = tl.load(m_ptrs, mask=full[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_P, BLOCK_D]
    std = tl.load(std_ptr + pages * stride_sp + kv_head * stride_sh, mask=full, other=0.0)  # [BLOCK_P]

    if mean.dtype == tl.float32:
        a = qf
    else:
        a = q
    if INTERPRET:  # the CPU interpreter multiplies bf16 bit patterns as integers in tl.dot
        a = a.to(tl.float32)
        mean = mean.to(tl.float32)
    s = tl.dot(a, tl.trans(mean), input_precision=DOT_PRECISION)  # [G_PAD, BLOCK_P] fp32
    s = s + std_weight * q_norm[:, None] * std[None, :]
    s = tl.where(g_mask[:, None], s, float("-inf"))
    best = tl.max(s, axis=0)  # [BLOCK_P]
    forced = (slots < sink_pages) | (slots >= n_full - recent_pages)
    best = tl.where(forced, float("inf"), best)
    best = tl.where(full, best, float("-inf"))
    sc_ptrs = scores_ptr + row.to(tl.int64) * stride_scr + kv_head * stride_sch + slots
    tl.store(sc_ptrs, best, mask=slots < max_pages)


@triton.jit
def _sparse_block(
    blk,
    q,  # [G_PAD, BLOCK_D]
    m_i,  # [G_PAD] fp32 running max (log2 domain)
    l_i,  # [G_PAD] fp32 running sum
    acc,  # [G_PAD, BLOCK_D] fp32
    page_row,  # this row's page-table row
    sel_val_row,  # this (row, kv head)'s K selected scores
    sel_idx_row,  # this (row, kv head)'s K selected page-table columns (int64)
    k_head,
    v_head,
    n_full,
    tail,  # tokens of the partial page
    qk_scale_log2,
    stride_kp,
    stride_kt,
    stride_vp,
    stride_vt,
    NUM_SEL: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Online-softmax update with block ``blk`` of the entry list: BLOCK_N // PAGE_SIZE entries, entry e < K
    being the e-th selected page and entry K the partial page."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    entry = blk * (BLOCK_N // PAGE_SIZE) + offs_n // PAGE_SIZE  # [BLOCK_N]
    in_page = offs_n % PAGE_SIZE
    is_sel = entry < NUM_SEL
    val = tl.load(sel_val_row + entry, mask=is_sel, other=float("-inf"))
    col = tl.load(sel_idx_row + entry, mask=is_sel, other=0)
    valid = (is_sel & (val > float("-inf"))) | ((entry == NUM_SEL) & (in_page < tail))
    col = tl.where(is_sel, col, n_full)
    page = tl.load(page_row + col, mask=valid, other=0).to(tl.int64)
    k_off = page[:, None] * stride_kp + in_page[:, None] * stride_kt + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
    v_off = page[:, None] * stride_vp + in_page[:, None] * stride_vt + offs_d[None, :]
    if BLOCK_D == HEAD_DIM:
        kv_mask = valid[:, None]
    else:
        kv_mask = valid[:, None] & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(k_head + k_off, mask=kv_mask, other=0.0)
    v = tl.load(v_head + v_off, mask=kv_mask, other=0.0)
    if INTERPRET:
        q = q.to(tl.float32)
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2  # [G_PAD, BLOCK_N]
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # block and history empty: keep zeros
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    p_in = p.to(v.dtype)
    if INTERPRET:
        p_in = p_in.to(tl.float32)
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p_in, v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def sparse_attention_kernel(
    q_ptr,  # [R, Hq, D]
    k_ptr,  # [num_pages, page_size, Hkv, D]
    v_ptr,
    page_table_ptr,  # [R, P] int32
    prefix_lens_ptr,  # [R] int32
    sel_val_ptr,  # [R * Hkv, K] fp32
    sel_idx_ptr,  # [R * Hkv, K] int64
    o_ptr,  # [R, Hq, S, D] fp32 partials, or [R, Hq, D] final output when NUM_SPLITS == 1
    lse_ptr,  # [R, Hq, S] fp32 partials, or [R, Hq] final lse when NUM_SPLITS == 1
    qk_scale_log2,
    stride_qr,
    stride_qh,
    stride_kp,
    stride_kt,
    stride_kh,
    stride_vp,
    stride_vt,
    stride_vh,
    stride_ptr,
    stride_or,
    stride_oh,
    stride_os,
    stride_lr,
    stride_lh,
    stride_ls,
    NUM_KV_HEADS: tl.constexpr,
    NUM_SEL: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCKS_PER_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Program (row, kv head, split): blocks [split * BLOCKS_PER_SPLIT, +BLOCKS_PER_SPLIT) of the entry list."""
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    prefix = tl.load(prefix_lens_ptr + row)
    n_full = prefix // PAGE_SIZE
    tail = prefix - n_full * PAGE_SIZE

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    q_ptrs = q_ptr + row.to(tl.int64) * stride_qr + heads[:, None] * stride_qh + offs_d[None, :]
    if BLOCK_D == HEAD_DIM:
        q = tl.load(q_ptrs, mask=g_mask[:, None], other=0.0)
    else:
        q = tl.load(q_ptrs, mask=g_mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], dtype=tl.float32)
    page_row = page_table_ptr + row.to(tl.int64) * stride_ptr
    sel_off = (row.to(tl.int64) * NUM_KV_HEADS + kv_head) * NUM_SEL
    k_head = k_ptr + kv_head.to(tl.int64) * stride_kh
    v_head = v_ptr + kv_head.to(tl.int64) * stride_vh
    for i in range(BLOCKS_PER_SPLIT):
        m_i, l_i, acc = _sparse_block(
            split * BLOCKS_PER_SPLIT + i, q, m_i, l_i, acc, page_row, sel_val_ptr + sel_off, sel_idx_ptr + sel_off,
            k_head, v_head, n_full, tail, qk_scale_log2, stride_kp, stride_kt, stride_vp, stride_vt,
            NUM_SEL, HEAD_DIM, BLOCK_D, PAGE_SIZE, BLOCK_N, DOT_PRECISION, INTERPRET,
        )  # fmt: skip

    nonempty = l_i > 0.0
    safe_l = tl.where(nonempty, l_i, 1.0)
    out = acc / safe_l[:, None]
    lse = tl.where(nonempty, (m_i + tl.log2(safe_l)) * 0.6931471805599453, float("-inf"))  # natural log
    o_ptrs = o_ptr + row.to(tl.int64) * stride_or + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :]
    if BLOCK_D == HEAD_DIM:
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=g_mask[:, None])
    else:
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=g_mask[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(lse_ptr + row.to(tl.int64) * stride_lr + heads * stride_lh + split * stride_ls, lse, mask=g_mask)


@triton.jit
def _write_selection(row, best, sel_val_ptr, sel_idx_ptr, rh, K: tl.constexpr, K_PAD: tl.constexpr):
    """Store the first K of ``best`` ([K_PAD] packed, descending): column and its score."""
    offs_k = tl.arange(0, K_PAD)
    keep = offs_k < K
    cols = best & 0xFFFFFFFF
    val = tl.load(row + cols, mask=keep, other=float("-inf"))
    tl.store(sel_val_ptr + rh * K + offs_k, val, mask=keep)
    tl.store(sel_idx_ptr + rh * K + offs_k, cols, mask=keep)


@triton.jit
def select_pages_kernel(
    scores_ptr,  # [R * Hkv, P] fp32 (+inf forced, -inf unused)
    cand_ptr,  # [R * Hkv, NUM_BLOCKS, K_PAD] int64 packed candidates (written when NUM_BLOCKS > 1)
    sel_val_ptr,  # [R * Hkv, K] fp32 out (when NUM_BLOCKS == 1)
    sel_idx_ptr,  # [R * Hkv, K] int64 out (when NUM_BLOCKS == 1)
    width,  # P
    stride_s,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    NUM_BLOCKS: tl.constexpr,
):
    """Program (row x kv head, block of BLOCK columns): the block's K_PAD largest scores, by a bitonic top-k over
    the scores packed with their column as int64 (order-preserving int32 key << 32 | column; ties go to the
    larger column). With one block this is the selection; else ``merge_selection_kernel`` merges the blocks."""
    rh = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    row = scores_ptr + rh * stride_s
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < width
    s = tl.load(row + cols, mask=in_row, other=float("-inf"))
    bits = s.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # int32 ordered like the floats
    packed = (key.to(tl.int64) << 32) | cols.to(tl.int64)
    packed = tl.where(in_row, packed, -(2**63))
    top = tl.topk(packed, K_PAD)  # [K_PAD] descending
    if NUM_BLOCKS == 1:
        _write_selection(row, top, sel_val_ptr, sel_idx_ptr, rh, K, K_PAD)
    else:
        tl.store(cand_ptr + (rh * NUM_BLOCKS + blk) * K_PAD + tl.arange(0, K_PAD), top)


@triton.jit
def merge_selection_kernel(
    scores_ptr,  # [R * Hkv, P] fp32
    cand_ptr,  # [R * Hkv, NUM_CAND] int64 packed candidates
    sel_val_ptr,  # [R * Hkv, K] fp32 out
    sel_idx_ptr,  # [R * Hkv, K] int64 out
    stride_s,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    NUM_CAND: tl.constexpr,
    CAND_PAD: tl.constexpr,
):
    """Program (row x kv head): top K of the blocks' candidates."""
    rh = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, CAND_PAD)
    cand = tl.load(cand_ptr + rh * NUM_CAND + offs, mask=offs < NUM_CAND, other=-(2**63))
    best = tl.topk(cand, K_PAD)
    _write_selection(scores_ptr + rh * stride_s, best, sel_val_ptr, sel_idx_ptr, rh, K, K_PAD)
