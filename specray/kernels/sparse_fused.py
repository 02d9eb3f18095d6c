"""Fused Triton kernels of UNIQUE sparse page attention: page scoring with top-k selection, and attention over
the selected pages with the split-KV merge, in two launches or in one (host wrapper:
``specray.kernels.sparse_pages.SparsePageAttention``, ``pipeline="fused2"`` or ``"fused1"``).

Owns no data. The workspace belongs to ``SparsePageAttention`` (RH = rows * Hkv, one entry per (row, KV head)):
    cand:      [RH, NC, K_PAD] int64   each score chunk's top K_PAD, packed (score key << 32 | column), descending
    sel_val:   [RH, K] fp32            scores of the kept columns (+inf forced, -inf unused slot)
    sel_idx:   [RH, K] int64           kept page-table columns
    sel_page:  [RH, K] int32           their page ids, -1 for an unused slot
    part_o:    [RH, S, G, D] fp32      per-split normalised outputs; part_lse: [RH, S, G] fp32 (natural log)
    sync:      [3 * RH_CAP + 1] int32  zero between launches: score counters [RH], selection-ready flags [RH],
                                       split counters [RH], then the ticket of the single-launch mode

One kernel, three modes (constexpr MODE):
  1 score:  program p = (rh, chunk) scores CHUNK page-table columns (one [CHUNK, D] load of the page means per
            KV head; the max over the GQA group comes from one dot with the group's [G, D] queries), takes their
            top K_PAD by a bitonic top-k and stores them as candidates. The last of the NC chunk programs of a
            (row, KV head) (atomic counter) merges the NC * K_PAD candidates into the selection and resets the
            counter. With NC = 1 the chunk's top-k is the selection.
  2 attend: program p = (rh, split) attends to BLOCKS_PER_SPLIT blocks of the entry list (entry e < K: the
            e-th selected page, entry K: the partial last page) with an fp32 online softmax. With S = 1 it writes
            the output; else it stores its partial and the last of the S split programs (atomic counter) merges
            them by their LSEs into the output and resets the counter.
  0 both:   one launch of NS + NA programs. Each program first takes a ticket (atomic counter): tickets [0, NS)
            score, tickets [NS, NS + NA) attend. An attending program spins until the selection of its (row,
            KV head) is published (flag set by the merging score program). This cannot deadlock: a ticket is
            taken only by a program that is already running, so when any program attends, every score ticket
            is held by a running (or finished) program, and scoring never waits. The last ticket holder resets
            the ticket; the merging attend program resets the flag.

Memory ordering of the hand-offs (publish: every thread stores, CTA barrier, then one acq_rel/release atomic
at GPU scope; consume: acquire atomic, CTA barrier, then loads that bypass L1 (``.cg``), so no stale line of
an earlier read on the same SM is used). Counters return to zero at the end of every launch, so consecutive
launches and CUDA-graph replays reuse the workspace; an aborted launch would leave them dirty
(``SparsePageAttention.reset_sync`` clears them).

Selection order (the tie rule): descending score, ties broken towards the larger page-table column (the more
recent page). The sink/recent pages score +inf, so they are always among the K kept; columns of incomplete
pages score -inf and are unused slots when a prefix has fewer than K complete pages.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["fused_sparse_kernel"]

_INT64_MIN: tl.constexpr = tl.constexpr(-(2**63))


@triton.jit
def _score_chunk_topk(
    q_ptr,  # [R, Hq, D]
    page_row,  # this row's page-table row (int32)
    mean_ptr,  # [num_pages, Hkv, D] fp32 or q's dtype
    std_ptr,  # [num_pages, Hkv] fp32
    row,
    kv_head,
    chunk,
    n_full,  # complete pages of the row's prefix
    width,  # P, page-table columns
    std_weight,
    sink_pages,
    recent_pages,
    stride_qr,
    stride_qh,
    stride_mp,
    stride_mh,
    stride_sp,
    stride_sh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
    K_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """[K_PAD] int64: the chunk's best columns, packed (order-preserving score key << 32 | column), descending."""
    cols = chunk * CHUNK + tl.arange(0, CHUNK)  # [CHUNK] page-table columns
    full = cols < n_full
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g

    q_ptrs = q_ptr + row.to(tl.int64) * stride_qr + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [G_PAD, BLOCK_D]
    qf = q.to(tl.float32)
    q_norm = tl.sqrt(tl.sum(qf * qf, axis=1))  # [G_PAD]

    # the page ids are loaded under the table width, not the prefix, so this load need not wait for n_full
    pages = tl.load(page_row + cols, mask=cols < width, other=0).to(tl.int64)  # [CHUNK]
    m_ptrs = mean_ptr + pages[:, None] * stride_mp + kv_head * stride_mh + offs_d[None, :]
    mean = tl.load(m_ptrs, mask=full[:, None] & d_mask[None, :], other=0.0)  # [CHUNK, BLOCK_D]
    std = tl.load(std_ptr + pages * stride_sp + kv_head * stride_sh, mask=full, other=0.0)  # [CHUNK]

    if mean.dtype == tl.float32:
        a = qf
    else:
        a = q
    if INTERPRET:  # the CPU interpreter multiplies bf16 bit patterns as integers in tl.dot
        a = a.to(tl.float32)
        mean = mean.to(tl.float32)
    s = tl.dot(a, tl.trans(mean), input_precision=DOT_PRECISION)  # [G_PAD, CHUNK] fp32
    s = s + std_weight * q_norm[:, None] * std[None, :]
    s = tl.where(g_mask[:, None], s, float("-inf"))
    best = tl.max(s, axis=0)  # [CHUNK] max over the GQA group
    forced = (cols < sink_pages) | (cols >= n_full - recent_pages)
    best = tl.where(forced, float("inf"), best)
    best = tl.where(full, best, float("-inf"))

    bits = best.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # int32 ordered like the floats
    packed = (key.to(tl.int64) << 32) | cols.to(tl.int64)
    packed = tl.where(cols < width, packed, _INT64_MIN)  # past the table: below every real column
    return tl.topk(packed, K_PAD)


@triton.jit
def _write_selection(
    best,  # [K_PAD] int64 packed, descending
    page_row,
    rh,
    sel_val_ptr,
    sel_idx_ptr,
    sel_page_ptr,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
):
    """Store the first K of ``best``: score, page-table column and page id (-1 for an unused slot)."""
    offs = tl.arange(0, K_PAD)
    keep = offs < K
    cols = best & 0xFFFFFFFF
    key = (best >> 32).to(tl.int32)
    val = tl.where(key >= 0, key, key ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
    used = keep & (val > float("-inf"))
    page = tl.load(page_row + cols, mask=used, other=-1)
    base = rh.to(tl.int64) * K
    tl.store(sel_val_ptr + base + offs, val, mask=keep)
    tl.store(sel_idx_ptr + base + offs, cols, mask=keep)
    tl.store(sel_page_ptr + base + offs, page, mask=keep)


@triton.jit
def _score_role(
    p,  # score program index: rh * num_chunks + chunk
    q_ptr,
    page_table_ptr,
    prefix_lens_ptr,
    mean_ptr,
    std_ptr,
    cand_ptr,
    sel_val_ptr,
    sel_idx_ptr,
    sel_page_ptr,
    score_cnt_ptr,  # [RH] int32
    flag_ptr,  # [RH] int32
    std_weight,
    width,
    sink_pages,
    recent_pages,
    num_chunks,
    stride_qr,
    stride_qh,
    stride_ptr,
    stride_mp,
    stride_mh,
    stride_sp,
    stride_sh,
    NUM_KV_HEADS: tl.constexpr,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
    CAND_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    SIGNAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    rh = p // num_chunks
    chunk = p - rh * num_chunks
    row = rh // NUM_KV_HEADS
    kv_head = rh - row * NUM_KV_HEADS
    n_full = tl.load(prefix_lens_ptr + row) // PAGE_SIZE
    page_row = page_table_ptr + row.to(tl.int64) * stride_ptr
    top = _score_chunk_topk(
        q_ptr, page_row, mean_ptr, std_ptr, row, kv_head, chunk, n_full, width, std_weight, sink_pages,
        recent_pages, stride_qr, stride_qh, stride_mp, stride_mh, stride_sp, stride_sh,
        HEAD_DIM, BLOCK_D, GROUP, GROUP_PAD, CHUNK, K_PAD, DOT_PRECISION, INTERPRET,
    )  # fmt: skip
    if num_chunks == 1:
        _write_selection(top, page_row, rh, sel_val_ptr, sel_idx_ptr, sel_page_ptr, K, K_PAD)
        if SIGNAL:
            tl.debug_barrier()  # every thread's selection stores precede the release
            tl.atomic_xchg(flag_ptr + rh, 1, sem="release", scope="gpu")
    else:
        cand_row = cand_ptr + rh.to(tl.int64) * num_chunks * K_PAD
        tl.store(cand_row + chunk * K_PAD + tl.arange(0, K_PAD), top)
        tl.debug_barrier()  # every thread's candidate stores precede the release below
        done = tl.atomic_add(score_cnt_ptr + rh, 1, sem="acq_rel", scope="gpu")
        if done == num_chunks - 1:  # last chunk of this (row, KV head): merge the candidates
            tl.debug_barrier()
            offs_c = tl.arange(0, CAND_PAD)
            in_range = offs_c < num_chunks * K_PAD
            cand = tl.load(cand_row + offs_c, mask=in_range, other=0, cache_modifier=".cg")
            cand = tl.where(in_range, cand, _INT64_MIN)
            best = tl.topk(cand, K_PAD)
            _write_selection(best, page_row, rh, sel_val_ptr, sel_idx_ptr, sel_page_ptr, K, K_PAD)
            tl.atomic_xchg(score_cnt_ptr + rh, 0, sem="relaxed", scope="gpu")
            if SIGNAL:
                tl.debug_barrier()
                tl.atomic_xchg(flag_ptr + rh, 1, sem="release", scope="gpu")


@triton.jit
def _attend_entries(
    blk,
    q,  # [G_PAD, BLOCK_D]
    m_i,  # [G_PAD] fp32 running max (log2 domain)
    l_i,  # [G_PAD] fp32 running sum
    acc,  # [G_PAD, BLOCK_D] fp32
    sel_row,  # this (row, KV head)'s K selected page ids (int32, -1 unused)
    tail_page,  # page id of the partial last page
    tail,  # tokens of the partial page
    k_head,
    v_head,
    qk_scale_log2,
    stride_kp,
    stride_kt,
    stride_vp,
    stride_vt,
    K: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Online-softmax update with block ``blk`` of the entry list (BLOCK_N // PAGE_SIZE entries)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    entry = blk * (BLOCK_N // PAGE_SIZE) + offs_n // PAGE_SIZE  # [BLOCK_N]
    in_page = offs_n % PAGE_SIZE
    is_sel = entry < K
    sel = tl.load(sel_row + entry, mask=is_sel, other=-1, cache_modifier=".cg")
    valid = (sel >= 0) | ((entry == K) & (in_page < tail))
    page = tl.where(is_sel, sel, tail_page).to(tl.int64)
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
def _merge_group(
    part_o_rh,  # this (row, KV head)'s partials [S, G, D] fp32
    part_lse_rh,  # [S, G] fp32
    o_row,  # output row [Hq, D]
    lse_row,  # [Hq] fp32
    kv_head,
    num_splits,
    stride_oh,
    stride_lh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    """Merge the splits of the G query heads of one (row, KV head) by their LSEs into the final output."""
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < HEAD_DIM
    for g in tl.static_range(GROUP):
        lse_s = tl.load(part_lse_rh + offs_s * GROUP + g, mask=s_mask, other=float("-inf"), cache_modifier=".cg")
        part = tl.load(
            part_o_rh + offs_s[:, None] * (GROUP * HEAD_DIM) + g * HEAD_DIM + offs_d[None, :],
            mask=s_mask[:, None] & d_mask[None, :], other=0.0, cache_modifier=".cg",
        )  # fmt: skip  # [SPLITS_PAD, BLOCK_D]
        m = tl.max(lse_s, axis=0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        w = tl.exp(lse_s - m_safe)  # 0 for empty splits
        denom = tl.sum(w, axis=0)
        nonempty = denom > 0.0
        safe = tl.where(nonempty, denom, 1.0)
        out = tl.sum(part * w[:, None], axis=0) / safe  # [BLOCK_D]
        lse = tl.where(nonempty, m_safe + tl.log(safe), float("-inf"))
        head = kv_head * GROUP + g
        tl.store(o_row + head * stride_oh + offs_d, out.to(o_row.dtype.element_ty), mask=d_mask)
        tl.store(lse_row + head * stride_lh, lse)


@triton.jit
def _attend_role(
    p,  # attend program index: rh * num_splits + split
    q_ptr,
    k_ptr,
    v_ptr,
    page_table_ptr,
    prefix_lens_ptr,
    sel_page_ptr,
    part_o_ptr,
    part_lse_ptr,
    o_ptr,
    lse_ptr,
    split_cnt_ptr,  # [RH] int32
    flag_ptr,  # [RH] int32
    qk_scale_log2,
    num_splits,
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
    stride_lr,
    stride_lh,
    NUM_KV_HEADS: tl.constexpr,
    K: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCKS_PER_SPLIT: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    WAIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    rh = p // num_splits
    split = p - rh * num_splits
    row = rh // NUM_KV_HEADS
    kv_head = rh - row * NUM_KV_HEADS

    prefix = tl.load(prefix_lens_ptr + row)
    n_full = prefix // PAGE_SIZE
    tail = prefix - n_full * PAGE_SIZE
    page_row = page_table_ptr + row.to(tl.int64) * stride_ptr
    tail_page = tl.load(page_row + n_full, mask=tail > 0, other=0)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    q_ptrs = q_ptr + row.to(tl.int64) * stride_qr + heads[:, None] * stride_qh + offs_d[None, :]
    if BLOCK_D == HEAD_DIM:
        q = tl.load(q_ptrs, mask=g_mask[:, None], other=0.0)
    else:
        q = tl.load(q_ptrs, mask=g_mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)

    if WAIT:  # single launch: spin until the selection of this (row, KV head) is published
        ready = tl.atomic_add(flag_ptr + rh, 0, sem="acquire", scope="gpu")
        while ready == 0:
            ready = tl.atomic_add(flag_ptr + rh, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], dtype=tl.float32)
    sel_row = sel_page_ptr + rh.to(tl.int64) * K
    k_head = k_ptr + kv_head.to(tl.int64) * stride_kh
    v_head = v_ptr + kv_head.to(tl.int64) * stride_vh
    for i in range(BLOCKS_PER_SPLIT):
        m_i, l_i, acc = _attend_entries(
            split * BLOCKS_PER_SPLIT + i, q, m_i, l_i, acc, sel_row, tail_page, tail, k_head, v_head,
            qk_scale_log2, stride_kp, stride_kt, stride_vp, stride_vt,
            K, HEAD_DIM, BLOCK_D, PAGE_SIZE, BLOCK_N, DOT_PRECISION, INTERPRET,
        )  # fmt: skip

    nonempty = l_i > 0.0
    safe_l = tl.where(nonempty, l_i, 1.0)
    out = acc / safe_l[:, None]  # [G_PAD, BLOCK_D]
    lse = tl.where(nonempty, (m_i + tl.log2(safe_l)) * 0.6931471805599453, float("-inf"))  # natural log
    o_row = o_ptr + row.to(tl.int64) * stride_or
    lse_row = lse_ptr + row.to(tl.int64) * stride_lr
    d_ok = offs_d[None, :] < HEAD_DIM
    if num_splits == 1:
        o_ptrs = o_row + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=g_mask[:, None] & d_ok)
        tl.store(lse_row + heads * stride_lh, lse, mask=g_mask)
        if WAIT:
            tl.atomic_xchg(flag_ptr + rh, 0, sem="relaxed", scope="gpu")
    else:
        part_o_rh = part_o_ptr + rh.to(tl.int64) * num_splits * (GROUP * HEAD_DIM)
        part_lse_rh = part_lse_ptr + rh.to(tl.int64) * num_splits * GROUP
        po_ptrs = part_o_rh + split * (GROUP * HEAD_DIM) + offs_g[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(po_ptrs, out, mask=g_mask[:, None] & d_ok)
        tl.store(part_lse_rh + split * GROUP + offs_g, lse, mask=g_mask)
        tl.debug_barrier()  # every thread's partial stores precede the release below
        done = tl.atomic_add(split_cnt_ptr + rh, 1, sem="acq_rel", scope="gpu")
        if done == num_splits - 1:  # last split of this (row, KV head): merge
            tl.debug_barrier()
            _merge_group(
                part_o_rh, part_lse_rh, o_row, lse_row, kv_head, num_splits, stride_oh, stride_lh,
                GROUP, HEAD_DIM, BLOCK_D, SPLITS_PAD,
            )  # fmt: skip
            tl.atomic_xchg(split_cnt_ptr + rh, 0, sem="relaxed", scope="gpu")
            if WAIT:  # every split of this (row, KV head) is past its wait
                tl.atomic_xchg(flag_ptr + rh, 0, sem="relaxed", scope="gpu")


# Runtime sizes that vary between plans are not specialised (no recompilation per batch or table width); the
# branches on them (one chunk, one split) are cheap scalar tests.
@triton.jit(
    do_not_specialize=[
        "rh_cap", "width", "sink_pages", "recent_pages", "num_chunks", "num_splits", "num_score_programs",
        "num_programs",
    ]
)  # fmt: skip
def fused_sparse_kernel(
    q_ptr,  # [R, Hq, D]
    k_ptr,  # [num_pages, page_size, Hkv, D]
    v_ptr,
    page_table_ptr,  # [R, P] int32
    prefix_lens_ptr,  # [R] int32
    mean_ptr,  # [num_pages, Hkv, D]
    std_ptr,  # [num_pages, Hkv] fp32
    cand_ptr,  # [RH, NC, K_PAD] int64
    sel_val_ptr,  # [RH, K] fp32
    sel_idx_ptr,  # [RH, K] int64
    sel_page_ptr,  # [RH, K] int32
    part_o_ptr,  # [RH, S, G, D] fp32
    part_lse_ptr,  # [RH, S, G] fp32
    o_ptr,  # [R, Hq, D]
    lse_ptr,  # [R, Hq] fp32
    sync_ptr,  # [3 * rh_cap + 1] int32
    rh_cap,
    std_weight,
    qk_scale_log2,
    width,
    sink_pages,
    recent_pages,
    num_chunks,
    num_splits,
    num_score_programs,  # RH * NC (mode 0)
    num_programs,  # RH * (NC + S) (mode 0)
    stride_qr,
    stride_qh,
    stride_kp,
    stride_kt,
    stride_kh,
    stride_vp,
    stride_vt,
    stride_vh,
    stride_ptr,
    stride_mp,
    stride_mh,
    stride_sp,
    stride_sh,
    stride_or,
    stride_oh,
    stride_lr,
    stride_lh,
    NUM_KV_HEADS: tl.constexpr,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
    CAND_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCKS_PER_SPLIT: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    MODE: tl.constexpr,  # 0 score + attend (one launch), 1 score, 2 attend
    SCORE_PRECISION: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    score_cnt_ptr = sync_ptr
    flag_ptr = sync_ptr + rh_cap
    split_cnt_ptr = sync_ptr + 2 * rh_cap
    pid = tl.program_id(0)
    if MODE == 1:
        _score_role(
            pid, q_ptr, page_table_ptr, prefix_lens_ptr, mean_ptr, std_ptr, cand_ptr, sel_val_ptr, sel_idx_ptr,
            sel_page_ptr, score_cnt_ptr, flag_ptr, std_weight, width, sink_pages, recent_pages, num_chunks,
            stride_qr, stride_qh, stride_ptr, stride_mp, stride_mh, stride_sp, stride_sh,
            NUM_KV_HEADS, K, K_PAD, CHUNK, CAND_PAD, HEAD_DIM, BLOCK_D, GROUP, GROUP_PAD, PAGE_SIZE, False,
            SCORE_PRECISION, INTERPRET,
        )  # fmt: skip
    elif MODE == 2:
        _attend_role(
            pid, q_ptr, k_ptr, v_ptr, page_table_ptr, prefix_lens_ptr, sel_page_ptr, part_o_ptr, part_lse_ptr,
            o_ptr, lse_ptr, split_cnt_ptr, flag_ptr, qk_scale_log2, num_splits,
            stride_qr, stride_qh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh, stride_ptr,
            stride_or, stride_oh, stride_lr, stride_lh,
            NUM_KV_HEADS, K, HEAD_DIM, BLOCK_D, GROUP, GROUP_PAD, PAGE_SIZE, BLOCK_N, BLOCKS_PER_SPLIT, SPLITS_PAD,
            False, DOT_PRECISION, INTERPRET,
        )  # fmt: skip
    else:
        ticket_ptr = sync_ptr + 3 * rh_cap
        ticket = tl.atomic_add(ticket_ptr, 1, sem="relaxed", scope="gpu")
        if ticket == num_programs - 1:  # every ticket is taken: ready for the next launch
            tl.atomic_xchg(ticket_ptr, 0, sem="relaxed", scope="gpu")
        if ticket < num_score_programs:
            _score_role(
                ticket, q_ptr, page_table_ptr, prefix_lens_ptr, mean_ptr, std_ptr, cand_ptr, sel_val_ptr,
                sel_idx_ptr, sel_page_ptr, score_cnt_ptr, flag_ptr, std_weight, width, sink_pages, recent_pages,
                num_chunks, stride_qr, stride_qh, stride_ptr, stride_mp, stride_mh, stride_sp, stride_sh,
                NUM_KV_HEADS, K, K_PAD, CHUNK, CAND_PAD, HEAD_DIM, BLOCK_D, GROUP, GROUP_PAD, PAGE_SIZE, True,
                SCORE_PRECISION, INTERPRET,
            )  # fmt: skip
        else:
            _attend_role(
                ticket - num_score_programs, q_ptr, k_ptr, v_ptr, page_table_ptr, prefix_lens_ptr, sel_page_ptr,
                part_o_ptr, part_lse_ptr, o_ptr, lse_ptr, split_cnt_ptr, flag_ptr, qk_scale_log2, num_splits,
                stride_qr, stride_qh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh, stride_ptr,
                stride_or, stride_oh, stride_lr, stride_lh,
                NUM_KV_HEADS, K, HEAD_DIM, BLOCK_D, GROUP, GROUP_PAD, PAGE_SIZE, BLOCK_N, BLOCKS_PER_SPLIT,
                SPLITS_PAD, True, DOT_PRECISION, INTERPRET,
            )  # fmt: skip
