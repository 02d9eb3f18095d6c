"""CUDA attention backend for `sparse_self` drafting: UNIQUE sparse pages through the Triton kernels.

Owns the per-page key statistics of the target's KV cache (``PageStats``: mean [L, pages, Hkv, D] and
std [L, pages, Hkv], kept current for every complete page of every running sequence) and one
``SparsePageAttention`` workspace. A drafting forward attends, per query row,
  * to the row's committed prefix through the kernel: per KV head the top pages by
    `max_g q.mean + std_weight * |q| * std` under `budget_tokens`, the sink and recent pages, and the
    partial last page (output + LSE), and
  * to the tree nodes drafted so far (ancestor-or-self mask);
the two partitions are merged exactly by their LSEs, in one launch of the Hybrid Tree Attention merge kernel
(`HybridTreeAttention.merge_with_prefix`), with the tree index tensors planned once per step. The torch
reference of the same selection is `specray.spec.sparse_self.SparsePageBackend`.
"""

from __future__ import annotations

import torch

from specray.config import SparseConfig
from specray.engine.attention import AttentionMetadata, TritonAttentionBackend, write_kv
from specray.engine.kv_cache import KVCache
from specray.engine.sequence import Sequence
from specray.kernels.sparse_pages import PageStats, SparsePageAttention


class TritonSparsePageBackend:
    def __init__(self, cache: KVCache, cfg: SparseConfig, num_q_heads: int, max_rows: int, max_model_len: int,
                 tree_backend: TritonAttentionBackend):
        spec = cache.spec
        self.cache, self.cfg = cache, cfg
        dev = cache.k[0].device
        self.stats = PageStats.for_cache(cache, mean_dtype=cache.k[0].dtype)  # half the scoring bytes
        self.max_pages = -(-max_model_len // spec.page_size) + 1
        self.attn = SparsePageAttention(
            max_rows, num_q_heads, spec.num_kv_heads, spec.head_dim, spec.page_size, self.max_pages, dev,
            budget_tokens=cfg.budget_tokens, std_weight=cfg.std_weight, sink_pages=cfg.sink_pages,
            recent_pages=cfg.recent_pages,
        )
        self.max_rows = max_rows
        self.tree_backend = tree_backend  # plans the step's tree part (slots, mask) once; its kernel merges
        self._done: dict[str, list[int]] = {}  # request -> pages whose statistics are current
        self._step: AttentionMetadata | None = None

    def refresh_stats(self, seqs: list[Sequence]) -> None:
        """Compute the statistics of pages that filled since the last call (all layers, one launch)."""
        ps = self.cache.spec.page_size
        new: list[int] = []
        for seq in seqs:
            done = self._done.get(seq.request_id, [])
            full = seq.pages[: seq.num_computed // ps]
            if full[: len(done)] != done:  # pages were replaced (preemption): start over
                done = []
            new.extend(full[len(done):])
            self._done[seq.request_id] = list(full)
        if new:
            self.stats.update_all(torch.tensor(new, dtype=torch.int32, device=self.stats.device))

    def release(self, request_id: str) -> None:
        self._done.pop(request_id, None)

    def _plan(self, meta: AttentionMetadata) -> None:
        qsl = meta.query_start_loc_cpu
        rows, prefix = [], []
        for s, seq_len in enumerate(meta.seq_lens_cpu):
            n_q = qsl[s + 1] - qsl[s]
            m = meta.trees[s].key_positions.shape[0]
            rows.extend([s] * n_q)
            prefix.extend([seq_len - m] * n_q)
        dev = meta.page_tables.device
        width = min(meta.page_tables.shape[1], self.max_pages)
        idx = torch.tensor(rows, dtype=torch.int64, device=dev)
        self._tables = meta.page_tables[idx, :width].contiguous()  # [R, P]
        self._prefix = torch.tensor(prefix, dtype=torch.int32, device=dev)
        self.attn.plan(self._tables, self._prefix)
        self.tree_backend.plan_ragged_tree(meta)
        self._step = meta

    def forward(self, layer, q, k, v, meta: AttentionMetadata, scale, sliding_window):
        if meta.trees is None or sliding_window is not None:
            raise ValueError("the Triton sparse drafting backend takes tree steps without a sliding window")
        write_kv(self.cache, layer, k, v, meta.slot_mapping)
        if layer == 0 or self._step is not meta:
            self._plan(meta)
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        o_p, lse_p = self.attn.run(q, kc, vc, self.stats.layer(layer), scale)  # [R, Hq, D], [R, Hq]
        # tree part (ancestor-or-self among the drafted nodes) + exact LSE merge: one Triton launch
        return self.tree_backend.tree_kernel.merge_with_prefix(q, kc, vc, o_p, lse_p, scale)
