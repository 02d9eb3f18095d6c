"""Cross-model Retrieval chunk scores: one query per sequence against all keys of one layer, softmax per
query head, averaged over the heads and over each complete ``chunk_size``-token chunk (the chunk mean of
``DraftModelProposer._chunk_scores``), without materialising the [Hq, L] probability matrix.

Data owned here: ``ChunkScores`` owns an fp32 workspace allocated once at construction:
    chunk_lse: [max_batch_size, Hq, max_chunks_all] per-chunk log2-sum-exp2 of the scaled logits of each
               query head (chunks include the partial tail; entries past the sequence are not written)
    head_lse:  [max_batch_size, Hq] log2-sum-exp2 over all keys of each head
The KV cache, page tables, sequence lengths and the output belong to the caller.

One pass over the keys (they are read once; values are never read):
    1. ``_chunk_lse_kernel``, program (sequence, KV head, CHUNKS_PER_PROG chunks): the logits of the G query
       heads of the group against each chunk's keys -> chunk_lse[b, h, c] = log2 sum_t exp2(s_ht).
    2. ``_head_lse_kernel``, program (sequence, query head): head_lse = log2 sum_c exp2(chunk_lse).
    3. ``_chunk_mean_kernel``, program (sequence, BLOCK_C chunks):
       score[b, c] = sum_h exp2(chunk_lse[b, h, c] - head_lse[b, h]) / (Hq * chunk_size).
This is exact: sum_t in c of softmax_h(t) = exp(lse_h(c) - lse_h). No host sync; CUDA-graph capturable.

Output: [B, max_chunks] fp32 with max_chunks = (P * page_size) // chunk_size for page tables [B, P]. Column c of
sequence b is the mean probability of keys [c * chunk_size, (c + 1) * chunk_size) for c < seq_len // chunk_size;
columns past the complete chunks (the partial tail chunk included) are -inf, so a top-k never picks them.
The tail's keys still take part in each head's softmax normaliser.

Usage::

    cs = ChunkScores(max_batch_size, Hq, Hkv, D, page_size, max_pages, device)   # once
    cs.plan(page_tables, seq_lens)                                                 # per step
    scores = cs.run(q, cache.k[last_layer], scale)                                # [B, max_chunks]
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["ChunkScores"]

_LOG2E = 1.4426950408889634
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _chunk_lse_kernel(
    q_ptr,  # [B, Hq, D]
    k_ptr,  # [num_pages, page_size, Hkv, D]
    page_table_ptr,  # [B, P] int32
    seq_lens_ptr,  # [B] int32
    chunk_lse_ptr,  # [B, Hq, C_all] fp32 out (log2 domain)
    qk_scale_log2,
    max_pages,
    num_chunks,  # C_all of this plan: cdiv(P * page_size, CHUNK)
    stride_qb,
    stride_qh,
    stride_kp,
    stride_kt,
    stride_kh,
    stride_ptb,
    stride_cb,
    stride_ch,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    CHUNK: tl.constexpr,
    CHUNKS_PER_PROG: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    cblk = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, CHUNK)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [G_PAD, BLOCK_D]
    if INTERPRET:  # the CPU interpreter multiplies bf16 bit patterns as integers in tl.dot
        q = q.to(tl.float32)
    page_row = page_table_ptr + b.to(tl.int64) * stride_ptb
    k_head = k_ptr + kv_head.to(tl.int64) * stride_kh
    out_row = chunk_lse_ptr + b.to(tl.int64) * stride_cb + heads * stride_ch  # [G_PAD]
    # Chunks at or past cdiv(seq_len, CHUNK) are never read by the reductions: skip them without a store.
    if cblk * (CHUNKS_PER_PROG * CHUNK) < seq_len:
        for i in range(CHUNKS_PER_PROG):
            c = cblk * CHUNKS_PER_PROG + i
            tok = c * CHUNK + offs_n  # [CHUNK]
            tok_mask = tok < seq_len
            slot = tok // PAGE_SIZE
            page = tl.load(page_row + slot, mask=tok_mask & (slot < max_pages), other=0).to(tl.int64)
            k_off = page[:, None] * stride_kp + (tok % PAGE_SIZE)[:, None] * stride_kt + offs_d[None, :]
            k = tl.load(k_head + k_off, mask=tok_mask[:, None] & d_mask[None, :], other=0.0)  # [CHUNK, BLOCK_D]
            if INTERPRET:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2  # [G_PAD, CHUNK]
            s = tl.where(tok_mask[None, :], s, float("-inf"))
            m = tl.max(s, axis=1)
            m_safe = tl.where(m == float("-inf"), 0.0, m)
            l_sum = tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
            lse = tl.where(l_sum > 0.0, m_safe + tl.log2(tl.where(l_sum > 0.0, l_sum, 1.0)), float("-inf"))
            tl.store(out_row + c, lse, mask=g_mask & (c < num_chunks))


@triton.jit
def _head_lse_kernel(
    chunk_lse_ptr,  # [B, Hq, C_all] fp32
    seq_lens_ptr,  # [B] int32
    head_lse_ptr,  # [B, Hq] fp32 out (log2 domain)
    stride_cb,
    stride_ch,
    stride_hb,
    CHUNK: tl.constexpr,
    BLOCK_C: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    n_chunks = tl.cdiv(tl.load(seq_lens_ptr + b), CHUNK)  # the partial tail counts in the normaliser
    row = chunk_lse_ptr + b.to(tl.int64) * stride_cb + h * stride_ch
    offs = tl.arange(0, BLOCK_C)
    m_i = tl.full([BLOCK_C], float("-inf"), dtype=tl.float32)  # per-lane running max
    l_i = tl.zeros([BLOCK_C], dtype=tl.float32)  # per-lane sum of exp2(x - m_i)
    start = n_chunks * 0
    if INTERPRET:  # the interpreter cannot take tensor bounds in range()
        while start < n_chunks:
            x = tl.load(row + start + offs, mask=start + offs < n_chunks, other=float("-inf"))
            m_new = tl.maximum(m_i, x)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.exp2(x - m_safe)
            m_i = m_new
            start += BLOCK_C
    else:
        for start in range(0, n_chunks, BLOCK_C):
            x = tl.load(row + start + offs, mask=start + offs < n_chunks, other=float("-inf"))
            m_new = tl.maximum(m_i, x)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.exp2(x - m_safe)
            m_i = m_new
    m = tl.max(m_i, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(l_i * tl.exp2(m_i - m_safe), axis=0)
    lse = tl.where(total > 0.0, m_safe + tl.log2(tl.where(total > 0.0, total, 1.0)), float("-inf"))
    tl.store(head_lse_ptr + b.to(tl.int64) * stride_hb + h, lse)


@triton.jit
def _chunk_mean_kernel(
    chunk_lse_ptr,  # [B, Hq, C_all] fp32
    head_lse_ptr,  # [B, Hq] fp32
    seq_lens_ptr,  # [B] int32
    out_ptr,  # [B, max_chunks] fp32 out
    max_chunks,
    inv_norm,  # 1 / (Hq * CHUNK)
    stride_cb,
    stride_ch,
    stride_hb,
    stride_ob,
    NUM_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0)
    cblk = tl.program_id(1)
    n_complete = tl.load(seq_lens_ptr + b) // CHUNK
    offs_c = cblk * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_h = tl.arange(0, HEADS_PAD)
    h_mask = offs_h < NUM_HEADS
    c_mask = offs_c < n_complete
    head_lse = tl.load(head_lse_ptr + b.to(tl.int64) * stride_hb + offs_h, mask=h_mask, other=0.0)  # [H_PAD]
    x = tl.load(
        chunk_lse_ptr + b.to(tl.int64) * stride_cb + offs_h[:, None] * stride_ch + offs_c[None, :],
        mask=h_mask[:, None] & c_mask[None, :],
        other=float("-inf"),
    )  # [H_PAD, BLOCK_C]
    head_lse = tl.where(head_lse == float("-inf"), 0.0, head_lse)  # empty sequence: no complete chunk
    p = tl.exp2(x - head_lse[:, None])  # [H_PAD, BLOCK_C]; 0 where masked
    score = tl.sum(p, axis=0) * inv_norm
    score = tl.where(c_mask, score, float("-inf"))
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + offs_c, score, mask=offs_c < max_chunks)


class ChunkScores:
    """Chunk scores of one query per sequence over one layer's paged keys, with a preallocated workspace.

    Args:
        max_batch_size: most sequences ``plan`` accepts.
        num_q_heads, num_kv_heads, head_dim: Hq (a multiple of Hkv), Hkv, D (a multiple of 8 in [16, 256]).
        page_size: tokens per KV page.
        max_pages: widest page table ``plan`` accepts (P); the workspace holds cdiv(P * page_size, chunk_size)
            chunks per head.
        device: device of the workspace and of every tensor given to ``plan``/``run``.
        chunk_size: tokens per chunk (a power of two >= 16; Cross-model Retrieval uses 32).
        chunks_per_program: chunks each program of the key pass handles (tuning knob).
        block_c: chunks per program of the two reduction kernels.
        num_warps: of the key pass.
    """

    def __init__(
        self,
        max_batch_size: int,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        max_pages: int,
        device: torch.device | str,
        *,
        chunk_size: int = 32,
        chunks_per_program: int = 4,
        block_c: int = 256,
        num_warps: int = 4,
    ) -> None:
        if max_batch_size < 1 or max_pages < 1 or page_size < 1 or chunks_per_program < 1:
            raise ValueError("max_batch_size, max_pages, page_size and chunks_per_program must be >= 1")
        if num_kv_heads < 1 or num_q_heads < 1 or num_q_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_q_heads ({num_q_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})"
            )
        if not (16 <= head_dim <= 256 and head_dim % 8 == 0):
            raise ValueError(f"head_dim must be a multiple of 8 in [16, 256], got {head_dim}")
        for name, val in (("chunk_size", chunk_size), ("block_c", block_c)):
            if val < 16 or val & (val - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {val}")
        self.max_batch_size = max_batch_size
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.group_size = num_q_heads // num_kv_heads
        self.group_pad = max(16, triton.next_power_of_2(self.group_size))
        self.page_size, self.max_pages, self.chunk_size = page_size, max_pages, chunk_size
        self.chunks_per_program, self.block_c, self.num_warps = chunks_per_program, block_c, num_warps
        self.max_chunks_all = -(-max_pages * page_size // chunk_size)
        dev = torch.device(device)
        self.chunk_lse = torch.empty(max_batch_size, num_q_heads, self.max_chunks_all, dtype=torch.float32, device=dev)
        self.head_lse = torch.empty(max_batch_size, num_q_heads, dtype=torch.float32, device=dev)
        self.device = self.chunk_lse.device
        self._plan: tuple[torch.Tensor, torch.Tensor] | None = None

    def plan(self, page_tables: torch.Tensor, seq_lens: torch.Tensor) -> None:
        """page_tables: [B, P] int32 (P <= max_pages, rows contiguous); seq_lens: [B] int32 keys per sequence
        (<= P * page_size, not checked: it would need a host sync). Kept by reference."""
        if page_tables.dim() != 2 or page_tables.dtype != torch.int32 or page_tables.stride(1) != 1:
            raise ValueError(
                f"page_tables must be [B, P] int32 with contiguous rows, got {page_tables.dtype} "
                f"{tuple(page_tables.shape)}"
            )
        batch, width = page_tables.shape
        if not 1 <= batch <= self.max_batch_size:
            raise ValueError(f"batch size {batch} must be in [1, max_batch_size={self.max_batch_size}]")
        if not 1 <= width <= self.max_pages:
            raise ValueError(f"page_tables width {width} must be in [1, max_pages={self.max_pages}]")
        if seq_lens.shape != (batch,) or seq_lens.dtype != torch.int32 or not seq_lens.is_contiguous():
            raise ValueError(
                f"seq_lens must be contiguous int32 of shape ({batch},), got {seq_lens.dtype} {tuple(seq_lens.shape)}"
            )
        for name, t in (("page_tables", page_tables), ("seq_lens", seq_lens)):
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device}, expected {self.device}")
        self._plan = (page_tables, seq_lens)

    @property
    def max_chunks(self) -> int:
        """Output width of the planned step: (P * page_size) // chunk_size."""
        if self._plan is None:
            raise ValueError("call plan() first")
        return self._plan[0].shape[1] * self.page_size // self.chunk_size

    def run(
        self, q: torch.Tensor, k_cache: torch.Tensor, scale: float, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q: [B, Hq, D] (fp16/bf16/fp32, stride(2) == 1); k_cache: [num_pages, page_size, Hkv, D] of q's dtype;
        scale: softmax scale; out: optional [B, max_chunks] fp32. Returns [B, max_chunks] fp32 (see module doc)."""
        if self._plan is None:
            raise ValueError("call plan() before run()")
        page_tables, seq_lens = self._plan
        batch, width = page_tables.shape
        if q.dim() != 3 or q.shape != (batch, self.num_q_heads, self.head_dim):
            raise ValueError(
                f"q must be [{batch}, {self.num_q_heads}, {self.head_dim}] (batch, heads, head_dim of the plan), "
                f"got {tuple(q.shape)}"
            )
        if q.dtype not in _SUPPORTED_DTYPES or q.stride(2) != 1:
            raise ValueError(f"q must be float16/bfloat16/float32 with stride(2) == 1, got {q.dtype}")
        expected = (self.page_size, self.num_kv_heads, self.head_dim)
        if k_cache.dim() != 4 or tuple(k_cache.shape[1:]) != expected:
            dims = ", ".join(map(str, expected))
            raise ValueError(f"k_cache must be [num_pages, {dims}], got {tuple(k_cache.shape)}")
        if k_cache.dtype != q.dtype or k_cache.stride(3) != 1:
            raise ValueError(f"k_cache must be {q.dtype} (q's dtype) with stride(3) == 1, got {k_cache.dtype}")
        max_chunks = width * self.page_size // self.chunk_size
        if out is None:
            out = torch.empty(batch, max_chunks, dtype=torch.float32, device=q.device)
        elif out.shape != (batch, max_chunks) or out.dtype != torch.float32 or out.stride(1) != 1:
            raise ValueError(f"out must be ({batch}, {max_chunks}) float32, got {tuple(out.shape)} {out.dtype}")
        for name, t in (("q", q), ("k_cache", k_cache), ("out", out)):
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device}, expected {self.device}")
        interpret = bool(triton.knobs.runtime.interpret)
        num_chunks = -(-width * self.page_size // self.chunk_size)
        cl, hl = self.chunk_lse, self.head_lse
        grid = (batch, self.num_kv_heads, triton.cdiv(num_chunks, self.chunks_per_program))
        _chunk_lse_kernel[grid](
            q, k_cache, page_tables, seq_lens, cl, float(scale) * _LOG2E, width, num_chunks,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            page_tables.stride(0), cl.stride(0), cl.stride(1),
            HEAD_DIM=self.head_dim, BLOCK_D=triton.next_power_of_2(self.head_dim), GROUP=self.group_size,
            GROUP_PAD=self.group_pad, PAGE_SIZE=self.page_size, CHUNK=self.chunk_size,
            CHUNKS_PER_PROG=self.chunks_per_program, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            INTERPRET=interpret, num_warps=self.num_warps,
        )  # fmt: skip
        _head_lse_kernel[(batch, self.num_q_heads)](
            cl, seq_lens, hl, cl.stride(0), cl.stride(1), hl.stride(0),
            CHUNK=self.chunk_size, BLOCK_C=self.block_c, INTERPRET=interpret, num_warps=4,
        )  # fmt: skip
        if max_chunks > 0:
            _chunk_mean_kernel[(batch, triton.cdiv(max_chunks, self.block_c))](
                cl, hl, seq_lens, out, max_chunks, 1.0 / (self.num_q_heads * self.chunk_size),
                cl.stride(0), cl.stride(1), hl.stride(0), out.stride(0),
                NUM_HEADS=self.num_q_heads, HEADS_PAD=triton.next_power_of_2(self.num_q_heads),
                CHUNK=self.chunk_size, BLOCK_C=self.block_c, num_warps=4,
            )  # fmt: skip
        return out
