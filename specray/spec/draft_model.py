"""`draft_model` proposer: a separate small model with the target's tokenizer, optionally with SpecExtend's
Cross-model Retrieval.

Owns the draft model, its own paged KV cache, and per request a `_DraftState`: the draft context
(token ids at draft positions 0..W-1), how many of them have K/V in the draft cache, which target
tokens they cover, and for retrieval the latest chunk scores.

Retrieval (when `speculative_config.retrieval` is set): every `refresh_every` steps the target's
last-layer attention of the last accepted token, averaged over heads, is summed... (mean) into
`chunk_size`-token chunks; the draft context becomes the top `top_k_chunks` chunks plus the most
recent chunk and the partial tail, in their original order, at contiguous positions 0..W-1. Right
after prefill (no scores yet) it is the most recent `top_k_chunks` chunks. Between refreshes the
accepted tokens are appended. The draft's K/V are re-encoded from the selected tokens at each
refresh, so the draft cache holds only the working set: its bytes stay bounded as the context grows
(a stored full-context draft cache would not). This differs from SpecExtend's gather of stored
pre-RoPE keys, which keeps a full-length draft cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from specray.config import SpeculativeConfig
from specray.engine.attention import TorchAttentionBackend, TritonAttentionBackend, gather_kv
from specray.engine.kv_cache import KVCache, KVCacheSpec, PageAllocator, pages_needed
from specray.engine.model_runner import ModelRunner
from specray.engine.sampler import first_argmax
from specray.engine.sequence import Sequence
from specray.errors import ConfigError
from specray.models.arch import ModelArch
from specray.models.decoder import DecoderLM
from specray.spec.proposers import draft_tree, warp_rows
from specray.spec.step import commit_kv, forward_tree_nodes
from specray.spec.types import AcceptResult, DraftTree

if TYPE_CHECKING:
    from specray.engine.llm_engine import LLMEngine


@dataclass
class _DraftState:
    ctx: list[int] = field(default_factory=list)  # draft context tokens, draft positions 0..len-1
    num_encoded: int = 0  # ctx[:num_encoded] have K/V in the draft cache
    covered: int = 0  # target tokens [0, covered) are accounted for in ctx
    pages: list[int] = field(default_factory=list)
    steps_since_refresh: int = 0
    chunk_scores: torch.Tensor | None = None  # [n_complete_chunks] pending a refresh
    # token path from the root -> scratch index, for nodes whose K/V the draft wrote this step (builders
    # may re-index nodes, e.g. the dynamic tree's rerank, so nodes are matched by their path)
    expanded: dict[tuple[int, ...], int] = field(default_factory=dict)


def _path(tree: DraftTree, node: int) -> tuple[int, ...]:
    out = []
    while node != -1:
        out.append(tree.tokens[node])
        node = tree.parents[node]
    return tuple(reversed(out))


class DraftModelProposer:
    def __init__(self, engine: LLMEngine, cfg: SpeculativeConfig):
        from specray.models.loader import load_checkpoint

        self.engine = engine
        self.cfg = cfg
        self.retrieval = cfg.retrieval
        self.needs_target_q = cfg.retrieval is not None
        self.max_nodes = max(cfg.tree.num_nodes, cfg.tree.max_build_nodes)
        ckpt = load_checkpoint(cfg.model, load_tokenizer=False)
        arch = ModelArch.from_hf_config(ckpt.hf_config)
        if arch.vocab_size != engine.arch.vocab_size:
            raise ConfigError(
                f"speculative_config.model: the draft's vocabulary has {arch.vocab_size} tokens, the target's "
                f"{engine.arch.vocab_size}; a draft model must share the target's tokenizer"
            )
        r = cfg.retrieval
        if r is not None:
            if r.budget_tokens >= engine.max_model_len:
                raise ConfigError(
                    f"speculative_config.retrieval: top_k_chunks x chunk_size = {r.budget_tokens} tokens is not "
                    f"smaller than the context (max_model_len = {engine.max_model_len})"
                )
            depth = cfg.tree.max_depth
            self.max_ctx = r.budget_tokens + 2 * r.chunk_size + r.refresh_every * (depth + 1) + self.max_nodes
        else:
            self.max_ctx = engine.max_model_len + self.max_nodes
        if self.max_ctx > arch.max_position_embeddings and r is None:
            raise ConfigError(
                f"speculative_config.model: the draft supports {arch.max_position_embeddings} positions, "
                f"max_model_len is {engine.max_model_len}; enable retrieval or lower max_model_len"
            )
        self.arch = arch
        self.model = DecoderLM.empty(arch, self.max_ctx + 1, engine.dtype, engine.device)
        self.model.load_weights(ckpt.weights)
        self.model.eval()
        if engine.device.type == "cuda" and engine.config.fused_ops:
            self.model.use_fused_ops(True)
        page_size = engine.cache.spec.page_size
        per_seq = pages_needed(self.max_ctx, page_size)
        num_pages = 1 + engine.config.scheduler.max_num_seqs * per_seq if r is not None else engine.cache.num_pages
        self.cache = KVCache(KVCacheSpec.of(arch, page_size, engine.dtype), num_pages, engine.device)
        self.allocator = PageAllocator(num_pages)
        if engine.device.type == "cuda":
            backend = TritonAttentionBackend(self.cache, arch.num_heads, engine.config.scheduler.max_num_seqs,
                                             self.max_ctx)
        else:
            backend = TorchAttentionBackend(self.cache)
        # CUDA: chain steps (one token per sequence) replay the draft's decode graphs; encoding and tree
        # drafting stay eager
        graphs = engine.device.type == "cuda" and engine.config.cuda_graphs
        graph_sizes = engine.config.graph_batch_sizes() if graphs else ()
        self.runner = ModelRunner(self.model, self.cache, backend, engine.sampler, self.max_ctx, graph_sizes)
        # CUDA, retrieval: a refresh re-encodes the whole working set (at most budget + 2 chunks) from position 0;
        # that encode replays a captured graph of its length bucket instead of ~75 eager launches per 2 layers
        self.fresh = None
        if graphs and r is not None:
            from specray.engine.fresh_graphs import FreshEncodeGraphs

            if FreshEncodeGraphs.supports(arch):
                self.fresh = FreshEncodeGraphs(self.runner, r.budget_tokens + 2 * r.chunk_size)
        self.chunk = engine.config.scheduler.max_num_batched_tokens
        self.states: dict[str, _DraftState] = {}
        self.num_refreshes = 0  # working-set rebuilds from target chunk scores
        self.peak_kv_bytes = 0
        # host seconds per part (each ends with the host waiting for its GPU work, or not: see the spans)
        self.timings = {"rebuild_s": 0.0, "encode_s": 0.0, "chains_s": 0.0, "commit_s": 0.0}
        # CUDA: the context encoding's device time too (`encode_s` is the host's: launches, plus any wait)
        self._encode_events = None
        if engine.device.type == "cuda":
            self._encode_events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self.timings["encode_gpu_s"] = 0.0
        self._encoded = False  # an encode was recorded between the events and not counted yet

    # ---- memory ----------------------------------------------------------------------------------
    def kv_bytes(self) -> int:
        """Draft KV bytes held by live requests (bounded by the working set under retrieval)."""
        return sum(len(s.pages) for s in self.states.values()) * self.cache.spec.bytes_per_page

    def _ensure_pages(self, st: _DraftState, num_tokens: int) -> None:
        need = pages_needed(num_tokens, self.cache.spec.page_size) - len(st.pages)
        if need > 0:
            st.pages.extend(self.allocator.allocate(need))
        self.peak_kv_bytes = max(self.peak_kv_bytes, self.kv_bytes())

    # ---- context maintenance ---------------------------------------------------------------------
    def _recent_selection(self, n_ctx: int) -> list[int]:
        r = self.retrieval
        start = max(0, (n_ctx // r.chunk_size - r.top_k_chunks) * r.chunk_size)
        return list(range(start, n_ctx))

    def _scored_selection(self, n_ctx: int, scores: torch.Tensor) -> list[int]:
        r = self.retrieval
        n_complete = min(n_ctx // r.chunk_size, scores.shape[0])
        last = n_complete - 1  # the most recent complete chunk is always kept
        candidates = scores[: max(last, 0)]
        k = min(r.top_k_chunks, candidates.shape[0])
        chosen = sorted(torch.topk(candidates, k).indices.tolist()) if k > 0 else []
        positions = [p for c in chosen for p in range(c * r.chunk_size, (c + 1) * r.chunk_size)]
        return positions + list(range(max(last, 0) * r.chunk_size, n_ctx))

    def _rebuild(self, seq: Sequence, st: _DraftState, target: list[int]) -> None:
        t0 = time.perf_counter()
        n_ctx = len(target) - 1  # committed context; the last token is the root
        if st.chunk_scores is None:
            positions = self._recent_selection(n_ctx)
        else:
            positions = self._scored_selection(n_ctx, st.chunk_scores)
            self.num_refreshes += 1
        self.allocator.free(st.pages)
        st.ctx = [target[p] for p in positions]
        st.num_encoded = 0
        st.covered = n_ctx
        st.steps_since_refresh = 0
        st.chunk_scores = None
        self.timings["rebuild_s"] += time.perf_counter() - t0

    def _catch_up(self, seq: Sequence, st: _DraftState) -> None:
        """Append the target's new committed tokens to the draft context (encoded later, batched)."""
        n_ctx = len(seq.prompt_ids) + len(seq.output_ids) - 1
        if st.covered < n_ctx:
            st.ctx.extend(seq.token_slice(st.covered, n_ctx))
            st.covered = n_ctx
        self._ensure_pages(st, len(st.ctx) + self.max_nodes)

    def _encode(self, states: list[_DraftState]) -> None:
        """Encode every state's pending context tokens: a whole context from position 0 (a refresh) through
        the fresh-encode graphs when they are there, the rest in batched eager forwards within the budget."""
        if self.fresh is not None:
            for st in states:
                if st.num_encoded == 0 and self.fresh.fits(len(st.ctx)):
                    self.fresh.run(st.pages, st.ctx)
                    st.num_encoded = len(st.ctx)
        while True:
            pending = [st for st in states if st.num_encoded < len(st.ctx)]
            if not pending:
                return
            budget = max(1, self.chunk // len(pending))
            spans = [(st.num_encoded, min(len(st.ctx), st.num_encoded + budget)) for st in pending]
            ranges = [list(range(a, b)) for a, b in spans]
            self.runner.forward_tokens(
                pages=[st.pages for st in pending],
                tokens=[st.ctx[a:b] for st, (a, b) in zip(pending, spans, strict=True)],
                positions=ranges, cache_positions=ranges, seq_lens=[b for _, b in spans], logits_rows=[],
            )
            for st, (_, b) in zip(pending, spans, strict=True):
                st.num_encoded = b

    def _greedy_chains(self, roots: list[int], states: list[_DraftState]) -> list[DraftTree]:
        """Greedy chains for all sequences: the depths are queued back to back, each taking the previous
        depth's argmax as its input ids on the device (`launch_greedy_decode`, as async scheduling does), and
        the host reads the tokens once at the end instead of once per depth. Same forwards, same tokens."""
        length = self.cfg.tree.length
        launches = []
        ids = None
        for depth in range(length):
            # each sequence's last token at draft position len(ctx) + depth (from depth 1 on, on the device)
            inputs = self.runner.host_inputs([st.pages for st in states], [[r] for r in roots],
                                             [len(st.ctx) + depth for st in states])
            launches.append(self.runner.launch_greedy_decode(inputs, ids))
            ids = launches[-1].tokens
        drafted = [self.runner.collect(launch) for launch in launches]  # [depth][B]
        trees = []
        for b, (root, st) in enumerate(zip(roots, states, strict=True)):
            toks = [root] + [drafted[d][b] for d in range(length)]
            for depth in range(length):
                st.expanded[tuple(toks[: depth + 1])] = depth
            trees.append(DraftTree.chain(root, toks[1:]))
        return trees

    def _chains(self, seqs: list[Sequence], states: list[_DraftState]) -> list[DraftTree]:
        """Chains for all sequences in lock-step: one batched draft forward per depth."""
        length = self.cfg.tree.length
        roots = [seq.output_ids[-1] if seq.output_ids else seq.prompt_ids[-1] for seq in seqs]
        if all(seq.params.greedy for seq in seqs):
            return self._greedy_chains(roots, states)
        tokens = [[r] for r in roots]
        rows: list[list[torch.Tensor]] = [[] for _ in seqs]
        graphed = self.runner.graphed(len(states))
        for depth in range(length):
            if graphed:
                # each sequence's last token at draft position len(ctx) + depth
                inputs = self.runner.host_inputs([st.pages for st in states], [[t[-1]] for t in tokens],
                                                 [len(st.ctx) + depth for st in states])
                logits = self.runner.replay(inputs)  # [B, V]
            else:
                logits = self.runner.forward_tokens(
                    pages=[st.pages for st in states], tokens=[[t[-1]] for t in tokens],
                    positions=[[len(st.ctx) + depth] for st in states],
                    cache_positions=[[len(st.ctx) + depth] for st in states],
                    seq_lens=[len(st.ctx) + depth + 1 for st in states],
                )  # [B, V]
            sampled = [b for b, seq in enumerate(seqs) if not seq.params.greedy]
            probs = warp_rows(logits[sampled], [seqs[b].params for b in sampled]) if sampled else None
            greedy = first_argmax(logits).tolist()
            for b, (seq, st) in enumerate(zip(seqs, states, strict=True)):
                st.expanded[tuple(tokens[b])] = depth
                if seq.params.greedy:
                    tokens[b].append(greedy[b])
            for j, b in enumerate(sampled):
                gen = seqs[b].generator if seqs[b].generator is not None else self.engine.sampler.generator
                rows[b].append(probs[j])
                tokens[b].append(int(torch.multinomial(probs[j], 1, generator=gen).item()))
        trees = []
        for seq, toks, r in zip(seqs, tokens, rows, strict=True):
            if seq.params.greedy:
                trees.append(DraftTree.chain(toks[0], toks[1:]))
            else:
                probs = torch.stack(r + [torch.zeros_like(r[0])])  # [N, V]
                trees.append(DraftTree(toks, [-1, *range(length)], list(range(length + 1)), probs, True))
        return trees

    # ---- Proposer protocol -----------------------------------------------------------------------
    @torch.inference_mode()
    def prepare(self, seqs: list[Sequence]) -> list[_DraftState]:
        """Everything of `propose` before drafting: each sequence's draft state made or refreshed (a retrieval
        rebuild), caught up with its committed tokens and encoded. Idempotent: `propose` calls it again, and a
        prepared sequence then has nothing left to do (a separate draft prepares as soon as the target's
        commit arrives, while the target finishes its step)."""
        states = []
        for seq in seqs:
            st = self.states.get(seq.request_id)
            if st is None:
                st = self.states[seq.request_id] = _DraftState()
                if self.retrieval is not None:
                    self._rebuild(seq, st, seq.prompt_ids + seq.output_ids)
            elif self.retrieval is not None and st.chunk_scores is not None:
                self._rebuild(seq, st, seq.prompt_ids + seq.output_ids)
            self._catch_up(seq, st)  # slices only the new tokens: no copy of the whole context per call
            st.expanded = {}
            states.append(st)
        if any(st.num_encoded < len(st.ctx) for st in states):
            t0 = time.perf_counter()
            if self._encode_events is not None:
                self._encode_events[0].record()
            self._encode(states)
            if self._encode_events is not None:
                self._encode_events[1].record()
                self._encoded = True
            self.timings["encode_s"] += time.perf_counter() - t0
        return states

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence]) -> list[DraftTree]:
        states = self.prepare(seqs)
        t1 = time.perf_counter()
        if self.cfg.tree.kind == "chain":
            trees = self._chains(seqs, states)
            self.timings["chains_s"] += time.perf_counter() - t1
            self._count_encode_gpu()
            return trees
        trees = []
        for seq, st in zip(seqs, states, strict=True):
            w = len(st.ctx)

            def logits_fn(tree: DraftTree, nodes: list[int], st=st, w=w) -> torch.Tensor:
                for i in nodes:
                    st.expanded[_path(tree, i)] = i
                return forward_tree_nodes(self.runner, st.pages, tree, nodes, w)

            gen = seq.generator if seq.generator is not None else self.engine.sampler.generator
            trees.append(draft_tree(self.cfg.tree, seq.prompt_ids[-1] if not seq.output_ids else seq.output_ids[-1],
                                    logits_fn, seq.params, gen))
        self._count_encode_gpu()
        return trees

    def _count_encode_gpu(self) -> None:
        """Add the device time of the context encoding since the last count (its kernels have run: drafting
        read tokens back to the host since) to `timings["encode_gpu_s"]`."""
        if self._encode_events is not None and self._encoded:
            self._encoded = False
            self._encode_events[1].synchronize()
            self.timings["encode_gpu_s"] += 1e-3 * self._encode_events[0].elapsed_time(self._encode_events[1])

    @torch.inference_mode()
    def commit(
        self, seqs: list[Sequence], trees: list[DraftTree], results: list[AcceptResult],
        target_q: list[torch.Tensor] | None = None,
    ) -> None:
        t0 = time.perf_counter()
        for i, (seq, tree, res) in enumerate(zip(seqs, trees, results, strict=True)):
            st = self.states[seq.request_id]
            w = len(st.ctx)
            src: list[int] = []  # scratch index of each accepted node whose K/V the draft wrote
            for node in res.path:
                idx = st.expanded.get(_path(tree, node))
                if idx is None:
                    break
                src.append(idx)
            encoded = len(src)
            commit_kv(self.cache, st.pages, w, src)
            st.ctx.extend(tree.tokens[j] for j in res.path)
            st.num_encoded = w + encoded
            st.covered += len(res.path)
            st.steps_since_refresh += 1
            if self.retrieval is not None and st.steps_since_refresh >= self.retrieval.refresh_every:
                st.chunk_scores = self._chunk_scores(seq, target_q[i])
        self.timings["commit_s"] += time.perf_counter() - t0

    def _chunk_scores(self, seq: Sequence, q: torch.Tensor) -> torch.Tensor:
        """Chunk means of the target's last-layer attention of the last accepted token (head average)."""
        eng = self.engine
        n = seq.num_computed  # keys 0..n-1, the last accepted token's own key included
        layer = eng.arch.num_layers - 1
        k, _ = gather_kv(eng.cache, layer, torch.tensor(seq.pages, device=eng.device), n)  # [n, Hkv, D]
        group = q.shape[0] // k.shape[1]
        k = k.float().repeat_interleave(group, dim=1)  # [n, Hq, D]
        scores = torch.einsum("hd,nhd->hn", q.float(), k) * eng.arch.head_dim**-0.5
        probs = torch.softmax(scores, dim=-1).mean(dim=0)  # [n]
        c = self.retrieval.chunk_size
        n_complete = n // c
        return probs[: n_complete * c].view(n_complete, c).mean(dim=1).cpu()

    def release(self, request_id: str) -> None:
        st = self.states.pop(request_id, None)
        if st is not None:
            self.allocator.free(st.pages)
