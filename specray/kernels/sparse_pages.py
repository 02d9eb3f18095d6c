"""UNIQUE sparse page attention: score pages by their key statistics, keep the top ones under a token budget,
attend to the kept pages (plus the partial last page) with a split-KV kernel that returns output and LSE.

Data owned here: ``SparsePageAttention`` owns its workspace, allocated once at construction (sizes from
``max_rows``, ``max_pages``, ``max_budget_tokens``, ``max_splits``) and reused by every layer and step:
    scores:      [max_rows * Hkv * max_pages] fp32, viewed as [R, Hkv, P]: page score, +inf for the forced
                 sink/recent pages, -inf past the row's complete pages
    sel_vals:    [max_rows * Hkv * max_budget_pages] fp32, viewed as [R, Hkv, K]: scores of the kept pages
                 (+inf for forced sink/recent pages, -inf marks an unused entry when the prefix has fewer than K
                 complete pages)
    sel_idx:     [max_rows * Hkv * max_budget_pages] int64, viewed as [R, Hkv, K]: page-table columns kept
    candidates:  [max_rows * Hkv * cdiv(max_pages, select_block) * K_PAD] int64: per block of select_block
                 scores, its top K_PAD (= max(2, next_pow2(K))) as (order-preserving score key << 32 | column)
    partial_out: [max_rows, Hq, max_splits, D] fp32 and partial_lse: [max_rows, Hq, max_splits] fp32 (split-KV)
The page statistics (``specray.kernels.page_stats.PageStats``), KV cache, page tables, prefix lengths and
outputs belong to the caller. ``PageStats`` is re-exported here.

Layout (shared with ``specray.kernels.reference.sparse_page_attention_reference``):
    q:           [R, Hq, D] one row per query token, Hq = G * Hkv (GQA)
    k/v_cache:   [num_pages, page_size, Hkv, D]
    page_tables: [R, P] int32: the row's sequence's page table (rows of one sequence repeat it)
    prefix_lens: [R] int32: keys 0..prefix_len-1 of the table form the row's prefix (committed tokens only;
                 tree/draft tokens are attended separately and LSE-merged by the caller)

Per row and KV head: complete page c (c < prefix_len // page_size) scores
``max_g (q_g . mean_c + std_weight * ||q_g|| * std_c)`` over the G query heads of the group. The first
``sink_pages`` and last ``recent_pages`` complete pages are always kept, the other
``budget_tokens // page_size - forced`` slots go to the top scores; with at most that many complete pages
every page is kept. Ties: the larger column (more recent page) wins in the triton selection
(``selection_backend="torch"`` leaves ties to ``torch.topk``). The partial last page
(``prefix_len % page_size`` tokens) is always attended.

Usage (``plan`` once per step, ``run`` per layer; no host sync in either, so ``run`` can be captured in a
CUDA graph after one warm-up call that compiles the kernels)::

    stats = PageStats.for_cache(cache)                     # once; stats.update(...) when pages fill
    attn = SparsePageAttention(max_rows, Hq, Hkv, D, page_size, max_pages, device)
    attn.plan(row_page_tables, row_prefix_lens, budget_tokens=512)
    out, lse = attn.run(q, cache.k[l], cache.v[l], stats.layer(l), scale)   # per layer
"""

from __future__ import annotations

import torch
import triton

from specray.kernels.page_stats import LayerPageStats, PageStats
from specray.kernels.paged_decode import _merge_splits_kernel
from specray.kernels.sparse_pages_kernels import (
    merge_selection_kernel,
    score_pages_kernel,
    select_pages_kernel,
    sparse_attention_kernel,
)

__all__ = ["LayerPageStats", "PageStats", "SparsePageAttention"]

_LOG2E = 1.4426950408889634
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class SparsePageAttention:
    """Score, select and attend to UNIQUE pages with a preallocated workspace (CUDA-graph capturable).

    Args:
        max_rows: most query rows ``run`` accepts (R, one per query token).
        num_q_heads, num_kv_heads: Hq and Hkv; Hq must be a multiple of Hkv.
        head_dim: D, a multiple of 8 in [16, 256].
        page_size: tokens per KV page (a power of two); a statistics page is one cache page.
        max_pages: widest page table ``plan`` accepts (P).
        device: device of the workspace; every tensor given to ``plan``/``run`` must live there.
        budget_tokens: default token budget for the complete pages (``plan`` may lower it).
        std_weight, sink_pages, recent_pages: defaults of the selection (``plan`` may override them).
        max_splits: most KV splits per (row, KV head); sizes the split workspace.
        block_n: KV tokens per attention block (power of two >= 16; raised to page_size if smaller).
        block_p: pages per scoring program (power of two >= 16).
        num_warps, num_stages: launch parameters of the attention kernel; score_warps of the scoring kernel.
        selection_backend: "triton" (bitonic top-k over blocks of ``select_block`` scores, one program per
            (row, KV head, block) with ``select_warps`` warps, then a merge of the blocks' candidates when there
            are several) or "torch" (``torch.topk``).
    """

    def __init__(
        self,
        max_rows: int,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        max_pages: int,
        device: torch.device | str,
        *,
        budget_tokens: int = 512,
        std_weight: float = 0.5,
        sink_pages: int = 1,
        recent_pages: int = 2,
        max_splits: int = 16,
        block_n: int | None = None,
        block_p: int = 64,
        num_warps: int = 4,
        num_stages: int = 2,
        score_warps: int = 4,
        selection_backend: str = "triton",
        select_block: int = 1024,
        select_warps: int = 8,
    ) -> None:
        if max_rows < 1 or max_pages < 1 or max_splits < 1:
            raise ValueError(f"max_rows ({max_rows}), max_pages ({max_pages}), max_splits ({max_splits}) must be >= 1")
        if num_kv_heads < 1 or num_q_heads < 1 or num_q_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_q_heads ({num_q_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})"
            )
        if not (16 <= head_dim <= 256 and head_dim % 8 == 0):
            raise ValueError(f"head_dim must be a multiple of 8 in [16, 256], got {head_dim}")
        if page_size < 1 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {page_size}")
        if block_n is None:
            block_n = 64 if head_dim <= 64 else 32
        if block_n < 16 or block_n & (block_n - 1):
            raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
        if block_p < 16 or block_p & (block_p - 1):
            raise ValueError(f"block_p must be a power of two >= 16, got {block_p}")
        if selection_backend not in ("triton", "torch"):
            raise ValueError(f"selection_backend must be 'triton' or 'torch', got {selection_backend!r}")
        if select_block < 2 or select_block & (select_block - 1):
            raise ValueError(f"select_block must be a power of two >= 2, got {select_block}")
        self.max_rows = max_rows
        self.num_q_heads = num_q_heads
        self.num_kv_heads = num_kv_heads
        self.group_size = num_q_heads // num_kv_heads
        self.group_pad = max(16, triton.next_power_of_2(self.group_size))
        self.head_dim = head_dim
        self.block_d = triton.next_power_of_2(head_dim)
        self.page_size = page_size
        self.max_pages = max_pages
        self.max_splits = max_splits
        self.block_n = max(block_n, page_size)
        self.block_p = block_p
        self.num_warps, self.num_stages, self.score_warps = num_warps, num_stages, score_warps
        self.selection_backend, self.select_block, self.select_warps = selection_backend, select_block, select_warps
        self.budget_tokens, self.std_weight = budget_tokens, std_weight
        self.sink_pages, self.recent_pages = sink_pages, recent_pages
        self._check_selection(budget_tokens, sink_pages, recent_pages)
        self.max_budget_pages = budget_tokens // page_size

        dev = torch.device(device)
        f32 = torch.float32
        self.scores = torch.empty(max_rows * num_kv_heads * max_pages, dtype=f32, device=dev)
        self.sel_vals = torch.empty(max_rows * num_kv_heads * self.max_budget_pages, dtype=f32, device=dev)
        self.sel_idx = torch.empty(max_rows * num_kv_heads * self.max_budget_pages, dtype=torch.int64, device=dev)
        k_pad = max(2, triton.next_power_of_2(self.max_budget_pages))  # tl.topk needs k >= 2
        max_blocks = triton.cdiv(max_pages, select_block)  # a multi-block selection uses blocks >= select_block
        self.candidates = torch.empty(  # [max_rows * Hkv * max_blocks * K_PAD] int64 packed top-k per score block
            max_rows * num_kv_heads * max_blocks * k_pad if max_blocks > 1 else 1, dtype=torch.int64, device=dev
        )
        self.partial_out = torch.empty(max_rows, num_q_heads, max_splits, head_dim, dtype=f32, device=dev)
        self.partial_lse = torch.empty(max_rows, num_q_heads, max_splits, dtype=f32, device=dev)
        self.device = self.scores.device
        self._num_sms = (
            torch.cuda.get_device_properties(self.device).multi_processor_count if self.device.type == "cuda" else 132
        )
        self._plan: dict | None = None

    def _check_selection(self, budget_tokens: int, sink_pages: int, recent_pages: int) -> None:
        if budget_tokens < self.page_size:
            raise ValueError(f"budget_tokens ({budget_tokens}) must be >= page_size ({self.page_size})")
        if sink_pages < 0 or recent_pages < 0:
            raise ValueError(f"sink_pages ({sink_pages}) and recent_pages ({recent_pages}) must be >= 0")
        if sink_pages + recent_pages > budget_tokens // self.page_size:
            raise ValueError(
                f"sink_pages + recent_pages ({sink_pages} + {recent_pages}) exceed the budget of "
                f"{budget_tokens // self.page_size} pages (budget_tokens {budget_tokens} // page_size {self.page_size})"
            )

    def plan(
        self,
        page_tables: torch.Tensor,
        prefix_lens: torch.Tensor,
        budget_tokens: int | None = None,
        *,
        std_weight: float | None = None,
        sink_pages: int | None = None,
        recent_pages: int | None = None,
        num_splits: int | None = None,
    ) -> None:
        """Fix the rows of this step. page_tables: [R, P] int32 (P <= max_pages, rows contiguous);
        prefix_lens: [R] int32 with prefix_len <= P * page_size (not checked: it would need a host sync).
        budget_tokens <= the constructor's. Both tensors are kept by reference: the caller may refill them
        in place before a graph replay. num_splits defaults to a heuristic from R, Hkv and the budget."""
        if page_tables.dim() != 2 or page_tables.dtype != torch.int32:
            raise ValueError(f"page_tables must be [R, P] int32, got {page_tables.dtype} {tuple(page_tables.shape)}")
        rows, width = page_tables.shape
        if not 1 <= rows <= self.max_rows:
            raise ValueError(f"rows {rows} must be in [1, max_rows={self.max_rows}]")
        if not 1 <= width <= self.max_pages:
            raise ValueError(f"page_tables width {width} must be in [1, max_pages={self.max_pages}]")
        if page_tables.stride(1) != 1:
            raise ValueError("page_tables rows must be contiguous (stride(1) == 1)")
        if prefix_lens.shape != (rows,) or prefix_lens.dtype != torch.int32 or not prefix_lens.is_contiguous():
            raise ValueError(
                f"prefix_lens must be contiguous int32 of shape ({rows},), got {prefix_lens.dtype} "
                f"{tuple(prefix_lens.shape)}"
            )
        for name, t in (("page_tables", page_tables), ("prefix_lens", prefix_lens)):
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device}, expected {self.device}")
        budget = self.budget_tokens if budget_tokens is None else budget_tokens
        sink = self.sink_pages if sink_pages is None else sink_pages
        recent = self.recent_pages if recent_pages is None else recent_pages
        self._check_selection(budget, sink, recent)
        if budget > self.budget_tokens:
            raise ValueError(f"budget_tokens {budget} exceeds the workspace's {self.budget_tokens}")
        k = min(budget // self.page_size, width)  # pages kept per (row, kv head)
        pages_per_block = self.block_n // self.page_size
        num_blocks = -(-(k + 1) // pages_per_block)  # K selected entries + the partial page
        if num_splits is None:
            wanted = -(-3 * self._num_sms // (rows * self.num_kv_heads))
            num_splits = max(1, min(wanted, num_blocks, self.max_splits))
        if not 1 <= num_splits <= self.max_splits:
            raise ValueError(f"num_splits {num_splits} must be in [1, max_splits={self.max_splits}]")
        self._plan = {
            "page_tables": page_tables,
            "prefix_lens": prefix_lens,
            "rows": rows,
            "width": width,
            "k": k,
            "std_weight": float(self.std_weight if std_weight is None else std_weight),
            "sink": sink,
            "recent": recent,
            "num_splits": num_splits,
            "blocks_per_split": -(-num_blocks // num_splits),
        }

    def selection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the last ``run``'s selection: (scores [R, Hkv, K] fp32, page-table columns [R, Hkv, K]
        int64). An entry is used iff its score > -inf; the partial page is not listed (always attended)."""
        p = self._require_plan()
        n = p["rows"] * self.num_kv_heads * p["k"]
        shape = (p["rows"], self.num_kv_heads, p["k"])
        return self.sel_vals[:n].view(shape), self.sel_idx[:n].view(shape)

    def _require_plan(self) -> dict:
        if self._plan is None:
            raise ValueError("call plan() before run()")
        return self._plan

    def _check_run(self, q, k_cache, v_cache, stats, out, lse_out, plan) -> None:
        rows = plan["rows"]
        if q.dim() != 3 or q.shape != (rows, self.num_q_heads, self.head_dim):
            raise ValueError(
                f"q must be [{rows}, {self.num_q_heads}, {self.head_dim}] (rows, heads, head_dim of the plan), "
                f"got {tuple(q.shape)}"
            )
        if q.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"q dtype {q.dtype} not supported (float16, bfloat16, float32)")
        if q.stride(2) != 1:
            raise ValueError("q must be contiguous in head_dim (stride(2) == 1)")
        expected = (self.page_size, self.num_kv_heads, self.head_dim)
        for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            if cache.dim() != 4 or tuple(cache.shape[1:]) != expected:
                dims = ", ".join(map(str, expected))
                raise ValueError(f"{name} must be [num_pages, {dims}], got {tuple(cache.shape)}")
            if cache.dtype != q.dtype:
                raise ValueError(f"{name} dtype {cache.dtype} differs from q dtype {q.dtype}")
            if cache.stride(3) != 1:
                raise ValueError(f"{name} must be contiguous in head_dim (stride(3) == 1)")
        if k_cache.shape != v_cache.shape:
            raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
        mean, std = stats
        num_pages = k_cache.shape[0]
        if mean.shape != (num_pages, self.num_kv_heads, self.head_dim) or mean.dtype not in (torch.float32, q.dtype):
            raise ValueError(
                f"stats mean must be [{num_pages}, {self.num_kv_heads}, {self.head_dim}] float32 or {q.dtype}, "
                f"got {tuple(mean.shape)} {mean.dtype}"
            )
        if mean.stride(2) != 1:
            raise ValueError("stats mean must be contiguous in head_dim")
        if std.shape != (num_pages, self.num_kv_heads) or std.dtype != torch.float32:
            raise ValueError(
                f"stats std must be [{num_pages}, {self.num_kv_heads}] float32, got {std.dtype} {tuple(std.shape)}"
            )
        if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.stride(2) != 1):
            raise ValueError(
                f"out must be {tuple(q.shape)} {q.dtype} with stride(2) == 1, got {tuple(out.shape)} {out.dtype}"
            )
        if lse_out is not None and (lse_out.shape != q.shape[:2] or lse_out.dtype != torch.float32):
            raise ValueError(
                f"lse_out must be {tuple(q.shape[:2])} float32, got {tuple(lse_out.shape)} {lse_out.dtype}"
            )
        named = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "mean": mean, "std": std, "out": out}
        for name, t in (named | {"lse_out": lse_out}).items():
            if t is not None and t.device != self.device:
                raise ValueError(f"{name} is on {t.device}, expected {self.device}")

    def _select(self, scores: torch.Tensor, sel_vals: torch.Tensor, sel_idx: torch.Tensor) -> None:
        """scores [R, Hkv, P] fp32 -> the top K per (row, KV head): sel_vals / sel_idx [R * Hkv, K]."""
        rows, hkv, width = scores.shape
        k = sel_vals.shape[1]
        if self.selection_backend == "torch":
            torch.topk(scores.view(rows * hkv, width), k, dim=1, sorted=False, out=(sel_vals, sel_idx))
        else:
            k_pad = max(2, triton.next_power_of_2(k))  # tl.topk needs k >= 2
            block = max(k_pad, min(triton.next_power_of_2(width), self.select_block))
            num_blocks = triton.cdiv(width, block)
            select_pages_kernel[(rows * hkv, num_blocks)](
                scores, self.candidates, sel_vals, sel_idx, width, width, K=k, K_PAD=k_pad, BLOCK=block,
                NUM_BLOCKS=num_blocks, num_warps=self.select_warps,
            )  # fmt: skip
            if num_blocks > 1:
                merge_selection_kernel[(rows * hkv,)](
                    scores, self.candidates, sel_vals, sel_idx, width, K=k, K_PAD=k_pad,
                    NUM_CAND=num_blocks * k_pad, CAND_PAD=triton.next_power_of_2(num_blocks * k_pad),
                    num_warps=self.select_warps,
                )  # fmt: skip

    def run(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        stats: LayerPageStats | tuple[torch.Tensor, torch.Tensor],
        scale: float,
        out: torch.Tensor | None = None,
        lse_out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse attention of the planned rows over their selected pages.

        Args:
            q: [R, Hq, D] fp16/bf16/fp32, stride(2) == 1.
            k_cache, v_cache: [num_pages, page_size, Hkv, D] of one layer, q's dtype.
            stats: (mean [num_pages, Hkv, D] fp32 or q's dtype, std [num_pages, Hkv] fp32) of that layer,
                e.g. ``PageStats.layer(l)``.
            scale: softmax scale. out: optional [R, Hq, D] destination; lse_out: optional [R, Hq] fp32.

        Returns:
            (out [R, Hq, D] q.dtype, lse [R, Hq] fp32 natural-log LSE; zeros and -inf for an empty prefix).
        """
        plan = self._require_plan()
        self._check_run(q, k_cache, v_cache, stats, out, lse_out, plan)
        mean, std = stats
        rows, width, k, splits = plan["rows"], plan["width"], plan["k"], plan["num_splits"]
        page_tables, prefix_lens = plan["page_tables"], plan["prefix_lens"]
        hkv = self.num_kv_heads
        if out is None:
            out = torch.empty_like(q, memory_format=torch.contiguous_format)
        if lse_out is None:
            lse_out = torch.empty(rows, self.num_q_heads, dtype=torch.float32, device=q.device)
        interpret = bool(triton.knobs.runtime.interpret)
        scores = self.scores[: rows * hkv * width].view(rows, hkv, width)  # [R, Hkv, P]

        # (a) page scores, forced pages +inf, pages past the complete ones -inf
        score_pages_kernel[(rows, hkv, triton.cdiv(width, self.block_p))](
            q, page_tables, prefix_lens, mean, std, scores,
            plan["std_weight"], width, plan["sink"], plan["recent"],
            q.stride(0), q.stride(1), page_tables.stride(0), mean.stride(0), mean.stride(1),
            std.stride(0), std.stride(1), scores.stride(0), scores.stride(1),
            HEAD_DIM=self.head_dim, BLOCK_D=self.block_d, GROUP=self.group_size, GROUP_PAD=self.group_pad,
            PAGE_SIZE=self.page_size, BLOCK_P=self.block_p,
            DOT_PRECISION="ieee" if mean.dtype == torch.float32 else "tf32", INTERPRET=interpret,
            num_warps=self.score_warps,
        )  # fmt: skip
        # (b) top-K per (row, kv head); -inf entries are unused slots of short prefixes
        sel_vals, sel_idx = (t[: rows * hkv * k].view(rows * hkv, k) for t in (self.sel_vals, self.sel_idx))
        self._select(scores, sel_vals, sel_idx)

        # (c) split-KV attention over the kept pages and the partial page
        direct = splits == 1
        if direct:
            o_buf, o_strides = out, (out.stride(0), out.stride(1), 0)
            l_buf, l_strides = lse_out, (lse_out.stride(0), lse_out.stride(1), 0)
        else:
            o_buf, l_buf = self.partial_out, self.partial_lse
            o_strides = (o_buf.stride(0), o_buf.stride(1), o_buf.stride(2))
            l_strides = (l_buf.stride(0), l_buf.stride(1), l_buf.stride(2))
        sparse_attention_kernel[(rows, hkv, splits)](
            q, k_cache, v_cache, page_tables, prefix_lens, sel_vals, sel_idx, o_buf, l_buf,
            float(scale) * _LOG2E,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), page_tables.stride(0),
            *o_strides, *l_strides,
            NUM_KV_HEADS=hkv, NUM_SEL=k, HEAD_DIM=self.head_dim, BLOCK_D=self.block_d, GROUP=self.group_size,
            GROUP_PAD=self.group_pad, PAGE_SIZE=self.page_size, BLOCK_N=self.block_n, NUM_SPLITS=splits,
            BLOCKS_PER_SPLIT=plan["blocks_per_split"],
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", INTERPRET=interpret,
            num_warps=self.num_warps, num_stages=self.num_stages,
        )  # fmt: skip
        if not direct:
            _merge_splits_kernel[(rows, self.num_q_heads)](
                self.partial_out, self.partial_lse, out, lse_out,
                self.partial_out.stride(0), self.partial_out.stride(1), self.partial_out.stride(2),
                self.partial_lse.stride(0), self.partial_lse.stride(1),
                out.stride(0), out.stride(1), lse_out.stride(0), lse_out.stride(1),
                HEAD_DIM=self.head_dim, BLOCK_D=self.block_d, NUM_SPLITS=splits,
                SPLITS_PAD=triton.next_power_of_2(splits), num_warps=4,
            )  # fmt: skip
        return out, lse_out
