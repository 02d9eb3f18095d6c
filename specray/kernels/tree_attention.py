"""Hybrid Tree Attention in Triton: verification (and tree drafting) of N query tokens per sequence.

Each sequence b has `n_b` query tokens (tree nodes, 1 <= n_b <= N_MAX) that attend to
  part one: the sequence's committed paged prefix, keys 0 .. prefix_len-1, with no mask;
  part two: the tree nodes' own keys (stored at cache slots `tree_slots[b, :m_b]`), masked by
            `tree_mask[b, i, j]` (query i may see node j: ancestor-or-self).
The two softmax partitions are merged exactly by their log-sum-exps (LongSpec's Hybrid Tree Attention).

Data owned here: ``HybridTreeAttention`` owns one fp32 split-KV workspace, allocated once in the
constructor and reused by every layer:
    part_o:   [max_tokens, Hq, S, D] fp32, per-split normalised prefix outputs
    part_lse: [max_tokens, Hq, S]    fp32, per-split natural-log LSE (-inf for an empty split)
``plan`` stores the step's index tensors (no copies, no host syncs); ``run`` launches two kernels:

  kernel 1 (grid B*M_TILES x Hkv x S): one program per (sequence, row tile, kv head, split). A row
     is a (query token, GQA head) pair, rows of one sequence are token-major: row r -> token r // G,
     head r % G, so one [BLOCK_M, D] query tile covers BLOCK_M / G tokens of the GQA group and every
     K/V block loaded from HBM serves all of them through `tl.dot` (the point of the kernel: a
     69-node tree reads the prefix once per row tile, not once per node).
  kernel 2 (grid B*M_TILES x Hkv): merges the splits, computes the tree part over the sequence's
     <= N_MAX node keys with the tree mask, and merges both; writes out [T, Hq, D] and lse [T, Hq].

Layout (shared with ``specray.kernels.reference_tree.tree_attention_reference``):
    q:           [T, Hq, D], tokens of sequence b at rows qo_indptr[b] .. qo_indptr[b+1]-1
    k/v_cache:   [num_pages, page_size, Hkv, D]
    qo_indptr:   [B+1] int32
    prefix_lens: [B] int32, committed keys per sequence (0 allowed)
    page_tables: [B, P] int32 (any row stride)
    tree_slots:  [B, M_MAX] int64 flat cache slots (page * page_size + offset) of the tree keys
    tree_mask:   [B, N_MAX, M_MAX] bool (verification: M = N, the nodes themselves; tree drafting:
                 the queries are the newest nodes and the keys every node drafted so far)
    tree_lens:   [B] int32 tree keys per sequence (default: its query count)
Every index tensor lives on the device and is read inside the kernels, so launches depend only on
static sizes and can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from specray.kernels.paged_decode import _attend_block  # the paged online-softmax block, shared with decode
from specray.kernels.tree_launch import choose_tree_splits, default_tiles, estimate_ctas_per_sm

__all__ = ["HybridTreeAttention", "choose_tree_splits", "default_tiles", "estimate_ctas_per_sm"]

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _tree_prefix_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    qo_indptr_ptr,
    prefix_lens_ptr,
    page_table_ptr,
    part_o_ptr,  # [T, Hq, S, D] fp32
    part_lse_ptr,  # [T, Hq, S] fp32
    qk_scale_log2,
    max_pages,
    stride_pl,
    num_splits,
    stride_qt,
    stride_qh,
    stride_kp,
    stride_kt,
    stride_kh,
    stride_vp,
    stride_vt,
    stride_vh,
    stride_ptb,
    stride_pot,
    stride_poh,
    stride_pos,
    stride_plt,
    stride_plh,
    stride_pls,
    GROUP: tl.constexpr,
    M_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    seq = tl.program_id(0) // M_TILES
    tile = tl.program_id(0) % M_TILES
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    qo_start = tl.load(qo_indptr_ptr + seq)
    n_q = tl.load(qo_indptr_ptr + seq + 1) - qo_start
    prefix_len = tl.load(prefix_lens_ptr + seq * stride_pl)

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    tok = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_mask = tok < n_q
    offs_d = tl.arange(0, BLOCK_D)
    t_idx = (qo_start + tok).to(tl.int64)
    q = tl.load(
        q_ptr + t_idx[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_mask[:, None],
        other=0.0,
    )  # [BLOCK_M, D]

    n_blocks = tl.cdiv(prefix_len, BLOCK_N)
    n_blocks = tl.where(tile * BLOCK_M < n_q * GROUP, n_blocks, 0)  # an empty row tile reads nothing
    per_split = tl.cdiv(n_blocks, num_splits)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, n_blocks)

    kv_start = prefix_len * 0  # the prefix is attended without a window
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    page_row = page_table_ptr + seq.to(tl.int64) * stride_ptb
    k_head = k_ptr + kv_head.to(tl.int64) * stride_kh
    v_head = v_ptr + kv_head.to(tl.int64) * stride_vh
    if INTERPRET:  # the interpreter cannot take tensor bounds in range()
        blk = lo
        while blk < hi:
            m_i, l_i, acc = _attend_block(
                blk,
                q,
                m_i,
                l_i,
                acc,
                page_row,
                k_head,
                v_head,
                prefix_len,
                kv_start,
                max_pages,
                qk_scale_log2,
                stride_kp,
                stride_kt,
                stride_vp,
                stride_vt,
                BLOCK_D,
                BLOCK_D,
                PAGE_SIZE,
                BLOCK_N,
                DOT_PRECISION,
                INTERPRET,
            )
            blk += 1
    else:
        for blk in range(lo, hi):
            m_i, l_i, acc = _attend_block(
                blk,
                q,
                m_i,
                l_i,
                acc,
                page_row,
                k_head,
                v_head,
                prefix_len,
                kv_start,
                max_pages,
                qk_scale_log2,
                stride_kp,
                stride_kt,
                stride_vp,
                stride_vt,
                BLOCK_D,
                BLOCK_D,
                PAGE_SIZE,
                BLOCK_N,
                DOT_PRECISION,
                INTERPRET,
            )

    nonempty = l_i > 0.0
    safe_l = tl.where(nonempty, l_i, 1.0)
    out = acc / safe_l[:, None]
    lse = tl.where(nonempty, (m_i + tl.log2(safe_l)) * 0.6931471805599453, float("-inf"))
    po = part_o_ptr + t_idx[:, None] * stride_pot + head[:, None] * stride_poh + split * stride_pos + offs_d[None, :]
    tl.store(po, out, mask=row_mask[:, None])
    tl.store(part_lse_ptr + t_idx * stride_plt + head * stride_plh + split * stride_pls, lse, mask=row_mask)


@triton.jit
def _merge_split(m, den, acc, po_ptrs, pl_ptrs, row_mask):
    """Online LSE merge of one split's partial rows (po_ptrs [BLOCK_M, D], pl_ptrs [BLOCK_M]) into (m, den, acc)."""
    lse_s = tl.load(pl_ptrs, mask=row_mask, other=float("-inf"))
    o_s = tl.load(po_ptrs, mask=row_mask[:, None], other=0.0)
    m_new = tl.maximum(m, lse_s)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    a = tl.exp(m - m_safe)
    w = tl.exp(lse_s - m_safe)
    den = den * a + w
    acc = acc * a[:, None] + o_s * w[:, None]
    return m_new, den, acc


@triton.jit
def _tree_merge_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    qo_indptr_ptr,
    tree_lens_ptr,
    tree_slots_ptr,
    tree_mask_ptr,
    part_o_ptr,
    part_lse_ptr,
    o_ptr,
    lse_ptr,
    qk_scale,
    num_splits,
    stride_qt,
    stride_qh,
    stride_kslot,
    stride_kh,
    stride_vslot,
    stride_vh,
    stride_tsb,
    stride_tmb,
    stride_tmi,
    stride_pot,
    stride_poh,
    stride_pos,
    stride_plt,
    stride_plh,
    stride_pls,
    stride_ot,
    stride_oh,
    stride_lt,
    stride_lh,
    GROUP: tl.constexpr,
    M_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_TREE: tl.constexpr,
    N_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    seq = tl.program_id(0) // M_TILES
    tile = tl.program_id(0) % M_TILES
    kv_head = tl.program_id(1)

    qo_start = tl.load(qo_indptr_ptr + seq)
    n_q = tl.load(qo_indptr_ptr + seq + 1) - qo_start
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_mask = tok < n_q
    offs_d = tl.arange(0, BLOCK_D)
    t_idx = (qo_start + tok).to(tl.int64)

    # merge the prefix splits (natural-log domain); m stays finite (0) while every part is empty
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    den = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    po_rows = part_o_ptr + t_idx[:, None] * stride_pot + head[:, None] * stride_poh + offs_d[None, :]  # split 0
    pl_rows = part_lse_ptr + t_idx * stride_plt + head * stride_plh
    if INTERPRET:  # the interpreter cannot take tensor bounds in range()
        s = num_splits * 0
        while s < num_splits:
            m, den, acc = _merge_split(m, den, acc, po_rows + s * stride_pos, pl_rows + s * stride_pls, row_mask)
            s += 1
    else:
        for s in range(num_splits):
            m, den, acc = _merge_split(m, den, acc, po_rows + s * stride_pos, pl_rows + s * stride_pls, row_mask)

    if HAS_TREE:
        q = tl.load(
            q_ptr + t_idx[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
            mask=row_mask[:, None],
            other=0.0,
        )  # [BLOCK_M, D]
        offs_j = tl.arange(0, N_PAD)
        j_mask = offs_j < tl.load(tree_lens_ptr + seq)
        slots = tl.load(tree_slots_ptr + seq.to(tl.int64) * stride_tsb + offs_j, mask=j_mask, other=0)
        kt = tl.load(
            k_ptr + slots[:, None] * stride_kslot + kv_head * stride_kh + offs_d[None, :],
            mask=j_mask[:, None],
            other=0.0,
        )  # [N_PAD, D]
        vt = tl.load(
            v_ptr + slots[:, None] * stride_vslot + kv_head * stride_vh + offs_d[None, :],
            mask=j_mask[:, None],
            other=0.0,
        )
        vis = (
            tl.load(
                tree_mask_ptr + seq.to(tl.int64) * stride_tmb + tok[:, None] * stride_tmi + offs_j[None, :],
                mask=row_mask[:, None] & j_mask[None, :],
                other=0,
            )
            != 0
        )  # [BLOCK_M, N_PAD]
        if INTERPRET:
            q = q.to(tl.float32)
            kt = kt.to(tl.float32)
        s_t = tl.dot(q, tl.trans(kt), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, N_PAD]
        s_t = tl.where(vis, s_t, float("-inf"))
        m_t = tl.max(s_t, axis=1)
        m_new = tl.maximum(m, m_t)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s_t - m_safe[:, None])  # [BLOCK_M, N_PAD], 0 where masked
        a = tl.exp(m - m_safe)
        den = den * a + tl.sum(p, axis=1)
        p_in = p.to(vt.dtype)
        if INTERPRET:
            p_in = p_in.to(tl.float32)
            vt = vt.to(tl.float32)
        acc = acc * a[:, None] + tl.dot(p_in, vt, input_precision=DOT_PRECISION)
        m = m_new

    nonempty = den > 0.0
    safe = tl.where(nonempty, den, 1.0)
    out = acc / safe[:, None]
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    lse = tl.where(nonempty, m_safe + tl.log(safe), float("-inf"))
    tl.store(
        o_ptr + t_idx[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=row_mask[:, None],
    )
    tl.store(lse_ptr + t_idx * stride_lt + head * stride_lh, lse, mask=row_mask)


class HybridTreeAttention:
    """Hybrid Tree Attention with a preallocated split-KV workspace (CUDA-graph capturable).

    Args:
        max_tokens: largest T (query tokens of the whole step) ``run`` accepts.
        max_batch: largest B.
        max_nodes: N_MAX, the most query tokens of one sequence (<= 128 with a tree).
        num_q_heads, num_kv_heads, head_dim: Hq (a multiple of Hkv), Hkv, D (a power of two, 16..256).
        max_prefix: the longest committed prefix expected (chooses the split count).
        device: where the workspace lives.
        block_m, block_n: row tile (query tokens x GQA heads) and KV block (tokens); None = `default_tiles`.
        num_splits: KV splits per (sequence, row tile, kv head); None = `choose_tree_splits` for the device's
            SM count (8 off CUDA) and `ctas_per_sm` (None = `estimate_ctas_per_sm` of the launch shape).
        num_warps, num_stages: Triton launch parameters; None = `default_tiles`.

    After a compiled (CUDA) ``run``, ``compiled`` holds the two launched kernels (registers, shared memory).
    """

    def __init__(
        self,
        max_tokens: int,
        max_batch: int,
        max_nodes: int,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        max_prefix: int,
        device: torch.device | str,
        *,
        block_m: int | None = None,
        block_n: int | None = None,
        num_splits: int | None = None,
        num_warps: int | None = None,
        num_stages: int | None = None,
        ctas_per_sm: int | None = None,
    ):
        if num_q_heads % num_kv_heads:
            raise ValueError(f"num_q_heads={num_q_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        if head_dim & (head_dim - 1) or not 16 <= head_dim <= 256:
            raise ValueError(f"head_dim must be a power of two in [16, 256], got {head_dim}")
        if not 1 <= max_nodes <= 128:
            raise ValueError(f"max_nodes must be in [1, 128], got {max_nodes}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.hq, self.hkv, self.d = num_q_heads, num_kv_heads, head_dim
        self.group = num_q_heads // num_kv_heads
        self.max_tokens, self.max_batch, self.max_nodes = max_tokens, max_batch, max_nodes
        tile = default_tiles(num_kv_heads, max_nodes * self.group, max_batch)
        block_m = block_m or tile["block_m"]
        block_n = block_n or tile["block_n"]
        num_warps = num_warps or tile["num_warps"]
        num_stages = num_stages or tile["num_stages"]
        self.block_m, self.block_n = block_m, block_n
        self.m_tiles = -(-max_nodes * self.group // block_m)
        if num_splits is None:
            cuda = self.device.type == "cuda"
            sms = torch.cuda.get_device_properties(self.device).multi_processor_count if cuda else 8
            occupancy = ctas_per_sm or estimate_ctas_per_sm(block_m, block_n, num_warps, num_stages, head_dim)
            num_splits = choose_tree_splits(
                max_batch * self.m_tiles * num_kv_heads, max_prefix, sms, block_n, ctas_per_sm=occupancy
            )
        if num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        self.num_splits = num_splits
        self.compiled: tuple = ()
        self.num_warps, self.num_stages = num_warps, num_stages
        self.part_o = torch.empty(max_tokens, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=device)
        self.part_lse = torch.empty(max_tokens, num_q_heads, num_splits, dtype=torch.float32, device=device)
        self._plan: tuple | None = None

    def plan(
        self,
        qo_indptr: torch.Tensor,  # [B+1] int32
        prefix_lens: torch.Tensor,  # [B] int32 (any stride)
        page_tables: torch.Tensor,  # [B, P] int32 (any row stride)
        tree_slots: torch.Tensor | None = None,  # [B, M_MAX] int64 flat cache slots of the tree keys
        tree_mask: torch.Tensor | None = None,  # [B, NQ_MAX, M_MAX] bool: query i may see tree key j
        tree_lens: torch.Tensor | None = None,  # [B] int32 tree keys per sequence; None = its query count
    ) -> None:
        """Record the step's index tensors (used by every ``run`` until the next plan). No host sync."""
        b = prefix_lens.shape[0]
        if not 1 <= b <= self.max_batch or qo_indptr.shape != (b + 1,):
            raise ValueError(
                f"expected 1 <= B <= {self.max_batch} and qo_indptr [B+1], got B={b}, "
                f"qo_indptr {tuple(qo_indptr.shape)}"
            )
        for name, t, dt in (
            ("qo_indptr", qo_indptr, torch.int32),
            ("prefix_lens", prefix_lens, torch.int32),
            ("page_tables", page_tables, torch.int32),
        ):
            if t.dtype != dt or t.device != self.device:
                raise ValueError(f"{name} must be {dt} on {self.device}, got {t.dtype} on {t.device}")
        if page_tables.dim() != 2 or page_tables.shape[0] != b or page_tables.stride(1) != 1:
            raise ValueError(f"page_tables must be [B, P] with unit column stride, got {tuple(page_tables.shape)}")
        if (tree_slots is None) != (tree_mask is None):
            raise ValueError("give tree_slots and tree_mask together, or neither")
        if tree_slots is not None:
            m = tree_slots.shape[1]
            if (
                tree_slots.shape != (b, m)
                or tree_mask.dim() != 3
                or tree_mask.shape[0] != b
                or tree_mask.shape[2] != m
                or m > 128
                or tree_mask.shape[1] > self.max_nodes
            ):
                raise ValueError(
                    f"tree_slots [B, M<=128] and tree_mask [B, N<={self.max_nodes}, M], got "
                    f"{tuple(tree_slots.shape)} and {tuple(tree_mask.shape)}"
                )
            if tree_slots.dtype != torch.int64 or tree_mask.dtype != torch.bool:
                raise ValueError("tree_slots must be int64 and tree_mask bool")
            if tree_slots.stride(1) != 1 or tree_mask.stride(2) != 1:
                raise ValueError("tree_slots and tree_mask need a unit last stride")
            if tree_lens is None:
                tree_lens = qo_indptr[1:] - qo_indptr[:-1]
        self._plan = (qo_indptr, prefix_lens, page_tables, tree_lens, tree_slots, tree_mask)

    def merge_with_prefix(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
        v_cache: torch.Tensor,
        o_prefix: torch.Tensor,  # [T, Hq, D] attention over a prefix computed elsewhere (e.g. sparse pages)
        lse_prefix: torch.Tensor,  # [T, Hq] fp32 its natural-log LSE (-inf: empty)
        scale: float,
    ) -> torch.Tensor:  # [T, Hq, D]
        """Only kernel 2: the planned tree part merged with a given prefix result, one launch per layer."""
        if self._plan is None or self._plan[4] is None:
            raise RuntimeError("call plan() with tree_slots and tree_mask before merge_with_prefix()")
        t = q.shape[0]
        if o_prefix.shape != q.shape or lse_prefix.shape != q.shape[:2] or lse_prefix.dtype != torch.float32:
            raise ValueError(f"o_prefix must be {tuple(q.shape)} and lse_prefix {tuple(q.shape[:2])} fp32")
        out = torch.empty_like(q)
        lse = torch.empty(t, self.hq, dtype=torch.float32, device=q.device)
        # the prefix result as one "split": [T, Hq, 1, D] and [T, Hq, 1]
        self._launch_merge(q, k_cache, v_cache, o_prefix.unsqueeze(2), lse_prefix.unsqueeze(2), 1, out, lse, scale)
        return out

    def run(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
        v_cache: torch.Tensor,
        scale: float,
        out: torch.Tensor | None = None,  # [T, Hq, D]
        lse: torch.Tensor | None = None,  # [T, Hq] fp32
    ) -> tuple[torch.Tensor, torch.Tensor]:  # out [T, Hq, D], lse [T, Hq] fp32
        if self._plan is None:
            raise RuntimeError("call plan() before run()")
        qo_indptr, prefix_lens, page_tables = self._plan[:3]
        t = q.shape[0]
        if q.dim() != 3 or q.shape[1:] != (self.hq, self.d) or t > self.max_tokens or q.stride(2) != 1:
            raise ValueError(f"q must be [T<={self.max_tokens}, {self.hq}, {self.d}], got {tuple(q.shape)}")
        if q.dtype not in _DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
            raise ValueError(f"q and the cache must share a dtype among {_DTYPES}, got {q.dtype}/{k_cache.dtype}")
        if k_cache.shape != v_cache.shape or k_cache.dim() != 4 or k_cache.shape[2:] != (self.hkv, self.d):
            raise ValueError(f"k/v cache must be [pages, page_size, {self.hkv}, {self.d}], got {tuple(k_cache.shape)}")
        if (
            k_cache.stride(3) != 1
            or k_cache.stride(1) != self.hkv * self.d
            or k_cache.stride(0) != k_cache.shape[1] * k_cache.stride(1)
            or v_cache.stride() != k_cache.stride()
        ):
            raise ValueError("k/v cache must be contiguous (tree keys are read by flat slot)")
        b = prefix_lens.shape[0]
        if out is None:
            out = torch.empty_like(q)
        if lse is None:
            lse = torch.empty(t, self.hq, dtype=torch.float32, device=q.device)
        interp = q.device.type != "cuda"
        prec = "ieee" if q.dtype == torch.float32 else "tf32"
        grid1 = (b * self.m_tiles, self.hkv, self.num_splits)
        k1 = _tree_prefix_split_kernel[grid1](
            q,
            k_cache,
            v_cache,
            qo_indptr,
            prefix_lens,
            page_tables,
            self.part_o,
            self.part_lse,
            scale * _LOG2E,
            page_tables.shape[1],
            prefix_lens.stride(0),
            self.num_splits,
            q.stride(0),
            q.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            v_cache.stride(0),
            v_cache.stride(1),
            v_cache.stride(2),
            page_tables.stride(0),
            self.part_o.stride(0),
            self.part_o.stride(1),
            self.part_o.stride(2),
            self.part_lse.stride(0),
            self.part_lse.stride(1),
            self.part_lse.stride(2),
            GROUP=self.group,
            M_TILES=self.m_tiles,
            BLOCK_M=self.block_m,
            BLOCK_D=self.d,
            PAGE_SIZE=k_cache.shape[1],
            BLOCK_N=self.block_n,
            DOT_PRECISION=prec,
            INTERPRET=interp,
            num_warps=self.num_warps,
            num_stages=self.num_stages,
        )
        k2 = self._launch_merge(q, k_cache, v_cache, self.part_o, self.part_lse, self.num_splits, out, lse, scale)
        self.compiled = (k1, k2)
        return out, lse

    def _launch_merge(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        part_o: torch.Tensor,  # [T, Hq, S, D] prefix partial outputs (S = num_splits)
        part_lse: torch.Tensor,  # [T, Hq, S] fp32 natural-log LSE per split
        num_splits: int,
        out: torch.Tensor,  # [T, Hq, D]
        lse: torch.Tensor,  # [T, Hq] fp32
        scale: float,
    ):
        """Kernel 2 (the planned tree part, when there is one, LSE-merged with the prefix splits); returns
        the compiled kernel."""
        qo_indptr, prefix_lens, _, tree_lens, tree_slots, tree_mask = self._plan
        has_tree = tree_slots is not None
        n_pad = max(16, triton.next_power_of_2(tree_slots.shape[1])) if has_tree else 16
        dummy = qo_indptr
        return _tree_merge_kernel[(prefix_lens.shape[0] * self.m_tiles, self.hkv)](
            q, k_cache, v_cache, qo_indptr,
            tree_lens if has_tree else dummy, tree_slots if has_tree else dummy, tree_mask if has_tree else dummy,
            part_o, part_lse, out, lse, scale, num_splits,
            q.stride(0), q.stride(1), k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
            tree_slots.stride(0) if has_tree else 0,
            tree_mask.stride(0) if has_tree else 0,
            tree_mask.stride(1) if has_tree else 0,
            part_o.stride(0), part_o.stride(1), part_o.stride(2),
            part_lse.stride(0), part_lse.stride(1), part_lse.stride(2),
            out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
            GROUP=self.group, M_TILES=self.m_tiles, BLOCK_M=self.block_m, BLOCK_D=self.d, HAS_TREE=has_tree,
            N_PAD=n_pad, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            INTERPRET=q.device.type != "cuda", num_warps=self.num_warps,
        )  # fmt: skip
