"""CUDA graphs of the target's tree-verification forward.

Owns the static input buffers and one captured graph per batch size: B sequences x N nodes, where N
is the configured tree's node count (shorter trees, e.g. n-gram chains, are padded; a padding node
sees only itself and writes into its sequence's reserved scratch slots; a padding sequence writes into
the scratch page). Attention runs through `TritonAttentionBackend`'s static-shape Hybrid Tree Attention
(`TreeBatch`), so a replay does no host sync.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from specray.engine.attention import AttentionMetadata, TreeBatch
from specray.engine.kv_cache import SCRATCH_PAGE
from specray.engine.page_table import PageTableMirror, TableDelta
from specray.engine.sequence import Sequence
from specray.spec.types import DraftTree

if TYPE_CHECKING:
    from specray.engine.llm_engine import LLMEngine


class VerifyGraphs:
    def __init__(self, engine: LLMEngine, num_nodes: int, batch_sizes: tuple[int, ...], capture_layer: int | None):
        self.engine = engine
        self.n = num_nodes
        self.sizes = tuple(sorted(batch_sizes))
        self.capture_layer = capture_layer
        dev = engine.device
        b_max, n = self.sizes[-1], num_nodes
        self.max_pages = engine.runner.max_pages
        self.h_tok = torch.zeros(3, b_max * n, dtype=torch.int64, pin_memory=True)  # ids, positions, slots
        self.h_seq = torch.zeros(b_max, dtype=torch.int64, pin_memory=True)  # prefix lengths
        self.h_tree_slots = torch.zeros(b_max, n, dtype=torch.int64, pin_memory=True)
        self.h_mask = torch.zeros(b_max, n, n, dtype=torch.bool, pin_memory=True)
        self.d_tok = torch.zeros_like(self.h_tok, device=dev)
        self.d_seq = torch.zeros(b_max, dtype=torch.int64, device=dev)
        self.d_tree_slots = torch.zeros(b_max, n, dtype=torch.int64, device=dev)
        self.d_mask = torch.eye(n, dtype=torch.bool, device=dev).repeat(b_max, 1, 1)
        self.tables = PageTableMirror(b_max, self.max_pages, dev)  # uploaded as deltas
        self.d_tables = self.tables.device_table  # [b_max, P]
        self.delta: TableDelta = []  # the staged batch's page-table changes
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.q_out: dict[int, torch.Tensor] = {}
        self._pool = None
        # called before each launch with (size, real rows): a tensor-parallel leader sends the staged
        # inputs to its followers
        self.announce: Callable[[int, list[int]], None] | None = None

    def size_for(self, batch: int) -> int | None:
        return next((s for s in self.sizes if s >= batch), None)

    def _forward(self, b: int) -> torch.Tensor:
        eng = self.engine
        n, r = self.n, b * self.n
        dev = eng.device
        prefix = self.d_seq[:b].to(torch.int32)
        tb = TreeBatch(
            row_tables=self.d_tables[:b].repeat_interleave(n, dim=0),
            row_prefix_lens=prefix.repeat_interleave(n),
            tree_slots=self.d_tree_slots[:b],
            tree_mask=self.d_mask[:b],
        )
        meta = AttentionMetadata(
            slot_mapping=self.d_tok[2, :r], page_tables=self.d_tables[:b], seq_lens=prefix + n,
            query_start_loc=torch.arange(0, r + 1, n, dtype=torch.int32, device=dev), decode_only=False,
            seq_lens_cpu=[], query_start_loc_cpu=[], positions=self.d_tok[1, :r], capture_layer=self.capture_layer,
            tree_batch=tb,
        )
        hidden = eng.model(self.d_tok[0, :r], self.d_tok[1, :r], eng.backend, meta)
        return eng.model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture(self, b: int) -> None:
        ps = self.engine.cache.spec.page_size
        # the warm-up forward runs on the static buffers: point every write at the scratch page first, so
        # it cannot touch a live sequence's slots left there by an earlier replay
        self.d_tok.zero_()
        self.d_tok[2].fill_(SCRATCH_PAGE * ps)
        self.d_tree_slots.fill_(SCRATCH_PAGE * ps)
        self.d_seq.zero_()
        self.d_tables.zero_()
        self.d_mask.copy_(torch.eye(self.n, dtype=torch.bool, device=self.d_mask.device).expand_as(self.d_mask))
        self._forward(b)  # warm-up: Triton compiles, workspaces are allocated outside the graph
        torch.cuda.synchronize(self.engine.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self.logits[b] = self._forward(b)
            if self.capture_layer is not None:
                self.q_out[b] = self.engine.backend.captured_q
        self._pool = graph.pool()
        self.graphs[b] = graph
        self.tables.restore()  # the warm-up zeroed the device tables; the mirror's host copy is the truth

    def _stage(self, seqs: list[Sequence], trees: list[DraftTree], prefix: list[int], size: int) -> list[int]:
        """Fill the pinned host buffers for a batch padded to `size`; the rows of the real nodes."""
        n = self.n
        ps = self.engine.cache.spec.page_size
        self.h_tok[:, : size * n].zero_()
        self.h_tree_slots[:size].zero_()
        self.h_mask[:size] = torch.eye(n, dtype=torch.bool)
        self.h_seq[:size].zero_()
        self.delta = self.tables.diff([seq.pages for seq in seqs], size)
        rows: list[int] = []
        for i, (seq, tree, p) in enumerate(zip(seqs, trees, prefix, strict=True)):
            k = tree.num_nodes
            pages = seq.pages
            slots = [pages[(p + j) // ps] * ps + (p + j) % ps for j in range(n)]
            base = i * n
            self.h_tok[0, base : base + k] = torch.tensor(tree.tokens)
            self.h_tok[1, base : base + n] = torch.tensor([p + d for d in tree.depths] + [p] * (n - k))
            self.h_tok[2, base : base + n] = torch.tensor(slots)
            self.h_tree_slots[i] = torch.tensor(slots)
            self.h_mask[i, :k, :k] = tree.ancestor_mask()
            self.h_seq[i] = p
            rows.extend(range(base, base + k))
        for i in range(len(seqs), size):  # padding sequences write into the scratch page
            self.h_tok[2, i * n : (i + 1) * n] = SCRATCH_PAGE * ps
            self.h_tree_slots[i] = SCRATCH_PAGE * ps
        return rows

    def staged(self, size: int) -> tuple:
        """The staged host inputs of a `size` batch as numpy arrays, and the page-table delta, for a
        tensor-parallel follower's `load_staged` (its mirror has seen the same deltas)."""
        n = self.n
        return (self.h_tok[:, : size * n].numpy().copy(), self.h_seq[:size].numpy().copy(),
                self.h_tree_slots[:size].numpy().copy(), self.h_mask[:size].numpy().copy(),
                self.delta)

    def load_staged(self, size: int, arrays: tuple) -> None:
        tok, seq, tree_slots, mask = (torch.from_numpy(a) for a in arrays[:4])
        self.delta = arrays[4]
        n = self.n
        self.h_tok[:, : size * n] = tok
        self.h_seq[:size] = seq
        self.h_tree_slots[:size] = tree_slots
        self.h_mask[:size] = mask

    def launch(self, size: int) -> None:
        """Capture the `size` graph on first use, copy the staged inputs to the device and replay it."""
        if size not in self.graphs:
            self._capture(size)
        n = self.n
        self.d_tok[:, : size * n].copy_(self.h_tok[:, : size * n], non_blocking=True)
        self.d_seq[:size].copy_(self.h_seq[:size], non_blocking=True)
        self.d_tree_slots[:size].copy_(self.h_tree_slots[:size], non_blocking=True)
        self.d_mask[:size].copy_(self.h_mask[:size], non_blocking=True)
        self.tables.apply(self.delta)
        self.graphs[size].replay()

    @torch.inference_mode()
    def run(
        self, seqs: list[Sequence], trees: list[DraftTree], prefix: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [sum n_i, V] of the real nodes (tree order, sequence after sequence), and the last
        layer's post-RoPE queries of those rows when a capture layer is set."""
        size = self.size_for(len(seqs))
        rows = self._stage(seqs, trees, prefix, size)
        if self.announce is not None:
            self.announce(size, rows)
        self.launch(size)
        index = torch.tensor(rows, dtype=torch.int64, device=self.engine.device)
        q = self.q_out[size][index] if self.capture_layer is not None else None
        return self.logits[size][index], q
