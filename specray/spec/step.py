"""One speculative step for a batch of decoding sequences: propose, verify, accept, commit, feed back.

Owns the step's scratch bookkeeping, the engine-wide spec-decode counters (vLLM's names) and the
phase timings (draft / verify / commit). The target's tree K/V is written to scratch cache slots
`P .. P+N-1` past the committed length P; the accepted path's entries are then moved to `P .. P+d`
for every layer.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from specray.config import SpeculativeConfig
from specray.engine.attention import TreeAttention
from specray.engine.kv_cache import KVCache, pages_needed
from specray.engine.model_runner import ModelRunner
from specray.engine.sequence import Sequence
from specray.spec.proposers import Proposer, warp_rows
from specray.spec.types import AcceptResult, DraftTree, SpecStats
from specray.spec.verify import verify_greedy, verify_sampling

if TYPE_CHECKING:
    from specray.engine.llm_engine import LLMEngine


def tree_attention(
    tree: DraftTree, prefix_len: int, device: torch.device | str = "cpu", rows: list[int] | None = None
) -> TreeAttention:
    """Tree keys at positions prefix_len + depth; queries are all nodes, or only `rows`."""
    depths = torch.tensor(tree.depths, dtype=torch.int64)
    mask = tree.ancestor_mask() if rows is None else tree.ancestor_mask()[rows]
    return TreeAttention(mask=mask.to(device), key_positions=(prefix_len + depths).to(device))


def forward_tree_nodes(
    runner: ModelRunner, pages: list[int], tree: DraftTree, nodes: list[int], base: int
) -> torch.Tensor:
    """Drafting forward of one sequence's tree `nodes` (node i at position base + depth, K/V written to
    cache position base + i), attending to the first `base` cache entries and their tree ancestors.
    Returns logits [len(nodes), V]."""
    return runner.forward_tokens(
        pages=[pages], tokens=[[tree.tokens[i] for i in nodes]],
        positions=[[base + tree.depths[i] for i in nodes]], cache_positions=[[base + i for i in nodes]],
        seq_lens=[base + tree.num_nodes], trees=[tree_attention(tree, base, runner.device, rows=nodes)],
    )


@torch.inference_mode()
def commit_kv(cache: KVCache, pages: list[int], prefix_len: int, path: list[int]) -> None:
    """Move the K/V of accepted tree nodes (scratch slot P+i) to their final slots (P+depth), all layers."""
    moves = [(i, d) for d, i in enumerate(path) if i != d]
    if not moves:
        return
    ps = cache.spec.page_size

    def slot(pos: int) -> int:
        return pages[pos // ps] * ps + pos % ps

    dev = cache.k[0].device
    src = torch.tensor([slot(prefix_len + i) for i, _ in moves], dtype=torch.int64, device=dev)
    dst = torch.tensor([slot(prefix_len + d) for _, d in moves], dtype=torch.int64, device=dev)
    for layer_cache in (*cache.k, *cache.v):
        flat = layer_cache.view(-1, *layer_cache.shape[2:])
        flat.index_copy_(0, dst, flat.index_select(0, src))  # gather first: sources may overlap targets


class SpeculativeDecoder:
    def __init__(self, engine: LLMEngine, proposer: Proposer, spec_cfg: SpeculativeConfig):
        self.engine = engine
        self.proposer = proposer
        self.spec_cfg = spec_cfg
        tree_cfg = spec_cfg.tree
        self.max_nodes = max(tree_cfg.num_nodes, tree_cfg.max_build_nodes)  # scratch slots to reserve
        self.stats = SpecStats()
        self.timings = {"draft_s": 0.0, "verify_s": 0.0, "commit_s": 0.0}
        self.capture_layer = engine.arch.num_layers - 1 if getattr(proposer, "needs_target_q", False) else None
        # CUDA: verification replays a captured graph per batch size (None: eager)
        self.verify_graphs = engine.build_verify_graphs(tree_cfg.num_nodes, self.capture_layer)

    def _sync(self) -> None:
        if self.engine.device.type == "cuda":
            torch.cuda.synchronize(self.engine.device)

    def _reserve(self, seqs: list[Sequence]) -> bool:
        """Pages for P + max_nodes scratch slots per sequence; False (nothing held) if they don't fit."""
        eng = self.engine
        ps = eng.cache.spec.page_size
        extra = [max(0, pages_needed(s.num_computed + self.max_nodes, ps) - len(s.pages)) for s in seqs]
        fits = all(s.num_computed + self.max_nodes <= eng.max_model_len for s in seqs)
        if not fits or not eng.allocator.can_allocate(sum(extra)):
            return False
        for s, n in zip(seqs, extra, strict=True):
            s.pages.extend(eng.allocator.allocate(n))
        return True

    def _trim(self, seq: Sequence) -> None:
        keep = pages_needed(seq.num_computed + 1, self.engine.cache.spec.page_size)
        if len(seq.pages) > keep:
            extra = seq.pages[keep:]
            del seq.pages[keep:]
            self.engine.allocator.free(extra)

    def _verify_eager(self, seqs: list[Sequence], trees: list[DraftTree], prefix: list[int]):
        eng = self.engine
        logits = eng.runner.forward_tokens(
            pages=[s.pages for s in seqs],
            tokens=[t.tokens for t in trees],
            positions=[[p + d for d in t.depths] for p, t in zip(prefix, trees, strict=True)],
            cache_positions=[list(range(p, p + t.num_nodes)) for p, t in zip(prefix, trees, strict=True)],
            seq_lens=[p + t.num_nodes for p, t in zip(prefix, trees, strict=True)],
            trees=[tree_attention(t, p, eng.device) for p, t in zip(prefix, trees, strict=True)],
            capture_layer=self.capture_layer,
        )  # [sum N, V]
        node_q = eng.backend.captured_q if self.capture_layer is not None else None  # [sum N, Hq, D]
        return logits, node_q

    def step(self, seqs: list[Sequence]) -> list[list[int]] | None:
        """New tokens for each sequence (accepted drafts + bonus), or None to run a plain AR step."""
        if not self._reserve(seqs):
            return None
        eng = self.engine
        t0 = time.perf_counter()
        trees = self.proposer.propose(seqs)
        self._sync()
        t1 = time.perf_counter()

        prefix = [s.num_computed for s in seqs]  # P: the root sits at P
        graphs = self.verify_graphs
        if graphs is not None and graphs.size_for(len(seqs)) and all(t.num_nodes <= graphs.n for t in trees):
            logits, node_q = graphs.run(seqs, trees, prefix)
        else:
            logits, node_q = self._verify_eager(seqs, trees, prefix)
        row_params = [s.params for s, t in zip(seqs, trees, strict=True) for _ in range(t.num_nodes)]
        probs = None if all(p.greedy for p in row_params) else warp_rows(logits, row_params)  # [sum N, V]
        results: list[AcceptResult] = []
        offset = 0
        for seq, tree in zip(seqs, trees, strict=True):
            rows = slice(offset, offset + tree.num_nodes)
            offset += tree.num_nodes
            if seq.params.greedy:
                results.append(verify_greedy(tree, logits[rows]))
            else:
                gen = seq.generator if seq.generator is not None else eng.sampler.generator
                results.append(verify_sampling(tree, probs[rows], gen))
        self._sync()
        t2 = time.perf_counter()

        out: list[list[int]] = []
        last_q = []
        offset = 0
        for tree, res in zip(trees, results, strict=True):
            if node_q is not None:
                last_q.append(node_q[offset + res.path[-1]])  # [Hq, D] the last accepted node's query
            offset += tree.num_nodes
        for seq, tree, res, p in zip(seqs, trees, results, prefix, strict=True):
            eng.runner.commit_kv(seq.pages, p, res.path)
            seq.num_computed = p + len(res.path)
            self.stats.record(tree, res)
            if seq.spec_stats is None:
                seq.spec_stats = SpecStats()
            seq.spec_stats.record(tree, res)
            out.append(res.new_tokens(tree))
        self.proposer.commit(seqs, trees, results, last_q or None)
        for seq in seqs:
            self._trim(seq)
        self._sync()
        t3 = time.perf_counter()
        self.timings["draft_s"] += t1 - t0
        self.timings["verify_s"] += t2 - t1
        self.timings["commit_s"] += t3 - t2
        return out
