"""`sparse_self` proposer: the target drafts for itself while attending only to its UNIQUE-selected KV
pages; verification stays dense, so the output is lossless.

Owns the sparse attention backend used for drafting: on the CUDA (Triton) engine backend,
`specray.spec.sparse_backend.TritonSparsePageBackend` (incremental page statistics, Triton scoring,
selection and sparse attention); otherwise the torch reference below, which computes page statistics
from the cache on the fly.
Page score per KV head: max over the GQA group's query heads of `q . mean_k + std_weight * |q| * std_k`,
where mean_k is the page's mean key and std_k the RMS distance of its keys from that mean. The
first `sink_pages` and the last `recent_pages` complete pages are always kept, the partial last page
and the tree nodes are attended densely, and the top pages fill `budget_tokens`.
The draft's tree K/V go to the same scratch slots that verification then overwrites.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from specray.config import SparseConfig, SpeculativeConfig
from specray.engine.attention import dense_attention, gather_kv, write_kv
from specray.engine.kv_cache import KVCache
from specray.engine.model_runner import ModelRunner
from specray.engine.sequence import Sequence
from specray.errors import ConfigError
from specray.spec.proposers import draft_tree
from specray.spec.step import forward_tree_nodes
from specray.spec.types import AcceptResult, DraftTree

if TYPE_CHECKING:
    from specray.engine.llm_engine import LLMEngine


def page_statistics(keys: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [n_pages * page_size, Hkv, D] -> mean [n_pages, Hkv, D], std [n_pages, Hkv] (fp32)."""
    k = keys.float().view(-1, page_size, *keys.shape[1:])  # [P, S, Hkv, D]
    mean = k.mean(dim=1)
    std = (k - mean[:, None]).pow(2).sum(-1).mean(dim=1).sqrt()  # RMS of |k - mean| over the page
    return mean, std


def select_pages(q: torch.Tensor, keys: torch.Tensor, cfg: SparseConfig) -> torch.Tensor:
    """q [n_q, Hq, D], keys [L, Hkv, D] (the committed prefix) -> keep mask [Hkv, n_q, L] bool."""
    n_q, hq, d = q.shape
    length, hkv = keys.shape[0], keys.shape[1]
    ps = cfg.page_size
    n_full = length // ps
    budget = cfg.budget_tokens // ps
    keep = torch.ones(hkv, n_q, length, dtype=torch.bool, device=q.device)
    if n_full <= budget:
        return keep
    mean, std = page_statistics(keys[: n_full * ps], ps)  # [P, Hkv, D], [P, Hkv]
    qg = q.float().view(n_q, hkv, hq // hkv, d)  # [n_q, Hkv, G, D]
    score = torch.einsum("nhgd,phd->nhgp", qg, mean)
    score = score + cfg.std_weight * qg.norm(dim=-1)[..., None] * std.t()[None, :, None, :]
    score = score.amax(dim=2)  # [n_q, Hkv, P]: max over the GQA group
    forced = torch.zeros(n_full, dtype=torch.bool, device=q.device)
    forced[: cfg.sink_pages] = True
    if cfg.recent_pages:
        forced[n_full - cfg.recent_pages :] = True
    score = score.masked_fill(forced, float("inf"))
    top = score.topk(budget, dim=-1).indices  # [n_q, Hkv, budget]
    chosen = torch.zeros(n_q, hkv, n_full, dtype=torch.bool, device=q.device).scatter_(-1, top, True)
    keep[:, :, : n_full * ps] = chosen.permute(1, 0, 2).repeat_interleave(ps, dim=-1)
    return keep


class SparsePageBackend:
    """Attention over UNIQUE-selected pages of each sequence's committed prefix (+ dense tree/tail)."""

    def __init__(self, cache: KVCache, cfg: SparseConfig):
        self.cache = cache
        self.cfg = cfg

    def forward(self, layer, q, k, v, meta, scale, sliding_window):
        write_kv(self.cache, layer, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        qsl = meta.query_start_loc_cpu
        for s, seq_len in enumerate(meta.seq_lens_cpu):
            a, b = qsl[s], qsl[s + 1]
            ks, vs = gather_kv(self.cache, layer, meta.page_tables[s], seq_len)
            mask = meta.mask_for(s, b - a, seq_len, sliding_window, q.device)  # [n_q, L]
            tree = meta.trees[s] if meta.trees is not None else None
            prefix = seq_len - (tree.key_positions.shape[0] if tree is not None else b - a)
            full = mask[None].repeat(ks.shape[1], 1, 1)  # [Hkv, n_q, L]
            full[:, :, :prefix] &= select_pages(q[a:b], ks[:prefix], self.cfg)
            out[a:b] = dense_attention(q[a:b], ks, vs, full, scale).to(q.dtype)
        return out


class SparseSelfProposer:
    def __init__(self, engine: LLMEngine, cfg: SpeculativeConfig):
        if cfg.sparse.budget_tokens >= engine.max_model_len:
            raise ConfigError(
                f"speculative_config.sparse.budget_tokens ({cfg.sparse.budget_tokens}) must be smaller than "
                f"the context (max_model_len = {engine.max_model_len})"
            )
        self.engine = engine
        self.cfg = cfg
        self.backend = SparsePageBackend(engine.cache, cfg.sparse)
        from specray.engine.attention import TritonAttentionBackend

        if isinstance(engine.backend, TritonAttentionBackend) and cfg.sparse.page_size == engine.cache.spec.page_size:
            from specray.spec.sparse_backend import TritonSparsePageBackend

            rows = max(cfg.tree.num_nodes, cfg.tree.max_build_nodes)
            self.backend = TritonSparsePageBackend(engine.cache, cfg.sparse, engine.arch.num_heads, rows,
                                                   engine.max_model_len, engine.backend)
        self.runner = ModelRunner(engine.model, engine.cache, self.backend, engine.sampler, engine.max_model_len)

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence]) -> list[DraftTree]:
        if hasattr(self.backend, "refresh_stats"):
            self.backend.refresh_stats(seqs)
        trees = []
        for seq in seqs:
            p = seq.num_computed

            def logits_fn(tree: DraftTree, nodes: list[int], seq=seq, p=p) -> torch.Tensor:
                return forward_tree_nodes(self.runner, seq.pages, tree, nodes, p)

            gen = seq.generator if seq.generator is not None else self.engine.sampler.generator
            root = seq.output_ids[-1] if seq.output_ids else seq.prompt_ids[-1]
            trees.append(draft_tree(self.cfg.tree, root, logits_fn, seq.params, gen))
        return trees

    def commit(
        self, seqs: list[Sequence], trees: list[DraftTree], results: list[AcceptResult],
        target_q: list[torch.Tensor] | None = None,
    ) -> None:
        pass

    def release(self, request_id: str) -> None:
        if hasattr(self.backend, "release"):
            self.backend.release(request_id)
