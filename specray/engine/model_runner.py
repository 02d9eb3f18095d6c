"""Model runner: turns a scheduled batch into one forward pass, and samples the next tokens.

Owns the device-side step inputs (flat `input_ids [T]`, `positions [T]`, `slot_mapping [T]`, page
tables `[S, P]`, `seq_lens [S]`), and on CUDA the captured decode graphs with their static buffers,
one graph per batch size in `cuda_graph_batch_sizes` (a batch is padded up to the next size;
padding rows write into the scratch page).

Greedy decode steps can also be launched without waiting for them (`launch_greedy_decode`, then
`collect`): the tokens stay on the device, where the next step can take them as its input ids, and
a pinned copy reaches the host when the step is done. The engine uses this to launch step N+1
before it reads step N's tokens (`EngineConfig.async_scheduling`). Host staging buffers are
therefore rewritten only after the device has read their previous contents (an event each).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from specray.engine.attention import AttentionBackend, AttentionMetadata, TreeAttention
from specray.engine.kv_cache import SCRATCH_PAGE, KVCache, pages_needed
from specray.engine.page_table import PageTableMirror, TableDelta
from specray.engine.sampler import Sampler, first_argmax
from specray.engine.scheduler import ScheduledBatch
from specray.models.decoder import DecoderLM

# flat step inputs built on the host: ids [T], positions [T], slots [T], query_start_loc [S+1],
# seq_lens [S], page table [S][P]
HostInputs = tuple[list[int], list[int], list[int], list[int], list[int], list[list[int]]]


@dataclass
class DecodeLaunch:
    """A greedy decode step queued on the device whose tokens the host has not read yet."""

    tokens: torch.Tensor  # [bs] int64 on the device: the step's greedy tokens
    host_tokens: torch.Tensor  # [bs] int64 on the host (pinned on CUDA), valid once `done` has passed
    done: torch.cuda.Event | None  # recorded after the device-to-host copy (None on CPU: already done)
    replay_events: tuple[torch.cuda.Event, torch.cuda.Event] | None  # a graph replay's start and end
    host_s: float  # host time spent launching it


class ModelRunner:
    def __init__(
        self,
        model: DecoderLM,
        cache: KVCache,
        backend: AttentionBackend,
        sampler: Sampler,
        max_model_len: int,
        graph_batch_sizes: tuple[int, ...] = (),
    ):
        self.model = model
        self.cache = cache
        self.backend = backend
        self.sampler = sampler
        self.page_size = cache.spec.page_size
        self.device = cache.k[0].device
        self.max_pages = pages_needed(max_model_len, self.page_size)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_batch_sizes = tuple(sorted(graph_batch_sizes))
        # graphed decode steps: host time before the replay is launched (inputs, plan, copies), time
        # waiting for the sampled tokens after it, and the replay's GPU time (CUDA events, read after the sync)
        self.decode_timings = {"host_s": 0.0, "wait_s": 0.0, "gpu_s": 0.0, "num_replays": 0}
        if self.graph_batch_sizes:
            self._capture_graphs()
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._staged = torch.cuda.Event()  # recorded after the device read `h_inputs`
            self._staged.record()

    # ---- inputs --------------------------------------------------------------------------------
    def batch_inputs(self, batch: ScheduledBatch) -> HostInputs:
        seqs, counts = batch.seqs, batch.num_new_tokens
        tokens = [s.token_slice(s.num_computed, s.num_computed + n) for s, n in zip(seqs, counts, strict=True)]
        return self.host_inputs([s.pages for s in seqs], tokens, [s.num_computed for s in seqs])

    def host_inputs(self, pages: list[list[int]], tokens: list[list[int]], starts: list[int]) -> HostInputs:
        """Inputs of a forward in which sequence i (KV pages `pages[i]`) runs `tokens[i]` at positions
        starts[i], starts[i] + 1, ...; page tables padded with the scratch page."""
        ps = self.page_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        for seq_pages, toks, start in zip(pages, tokens, starts, strict=True):
            n = len(toks)
            ids += toks
            pos = range(start, start + n)
            positions += pos
            slots += [seq_pages[p // ps] * ps + p % ps for p in pos]
            qsl.append(qsl[-1] + n)
            seq_lens.append(start + n)
        width = max(len(p) for p in pages)
        table = [p + [SCRATCH_PAGE] * (width - len(p)) for p in pages]
        return ids, positions, slots, qsl, seq_lens, table

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> list[int | None]:
        """Run the batch; return the sampled token for each sequence whose tokens are all computed
        after this step (None for a sequence still in the middle of its prefill)."""
        sample_rows = [
            i for i, (s, n) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True))
            if s.num_computed + n == s.num_tokens
        ]
        t0 = time.perf_counter()
        inputs = self.batch_inputs(batch)
        graphed = batch.decode_only and self.graphed(len(batch.seqs))
        if graphed:
            self._events[0].record()
            logits = self.replay(inputs)
            self._events[1].record()
        else:
            logits = self.run_eager(inputs, batch.decode_only, sample_rows)
        if not sample_rows:
            return [None] * len(batch.seqs)
        seqs = [batch.seqs[i] for i in sample_rows]
        t1 = time.perf_counter()
        tokens = self.sampler(logits, [s.params for s in seqs], [s.generator for s in seqs]).tolist()
        if graphed:
            self._count_replay(t1 - t0, time.perf_counter() - t1, self._events)
        result: list[int | None] = [None] * len(batch.seqs)
        for i, t in zip(sample_rows, tokens, strict=True):
            result[i] = t
        return result

    def graphed(self, num_seqs: int) -> bool:
        """Whether a decode step of `num_seqs` sequences runs through a captured graph."""
        return self._graph_size(num_seqs) is not None

    @torch.inference_mode()
    def launch_greedy_decode(self, inputs: HostInputs, ids: torch.Tensor | None = None) -> DecodeLaunch:
        """Queue a decode step (one token per sequence, every row greedy) and its argmax, and start
        copying the tokens to the host; do not wait. `ids` [bs] int64 on the device, if given, are
        the input ids instead of `inputs[0]` (the previous launch's `tokens`)."""
        t0 = time.perf_counter()
        bs = len(inputs[4])
        events = None
        if self.graphed(bs):
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record()
            logits = self.replay(inputs, ids_dev=ids)  # [bs, V]
            events[1].record()
        else:
            logits = self.run_eager(inputs, True, list(range(bs)), ids)  # [bs, V]
        tokens = first_argmax(logits)  # [bs]: the sampler's result for greedy rows
        done = None
        host = tokens
        if tokens.is_cuda:
            host = torch.empty(bs, dtype=torch.int64, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        return DecodeLaunch(tokens, host, done, events, time.perf_counter() - t0)

    def collect(self, launch: DecodeLaunch) -> list[int]:
        """Wait for a launched step and return its tokens."""
        t0 = time.perf_counter()
        if launch.done is not None:
            launch.done.synchronize()
        tokens = launch.host_tokens.tolist()
        if launch.replay_events is not None:
            self._count_replay(launch.host_s, time.perf_counter() - t0, launch.replay_events)
        return tokens

    def _count_replay(self, host_s: float, wait_s: float, events: tuple[torch.cuda.Event, torch.cuda.Event]) -> None:
        """Add one graphed decode step to `decode_timings` (its start and end events have passed)."""
        t = self.decode_timings
        t["host_s"] += host_s
        t["wait_s"] += wait_s
        t["gpu_s"] += 1e-3 * events[0].elapsed_time(events[1])
        t["num_replays"] += 1

    @torch.inference_mode()
    def forward_tokens(
        self,
        pages: list[list[int]],
        tokens: list[list[int]],
        positions: list[list[int]],
        cache_positions: list[list[int]],
        seq_lens: list[int],
        trees: list[TreeAttention | None] | None = None,
        logits_rows: list[int] | None = None,
        capture_layer: int | None = None,
    ) -> torch.Tensor:
        """A free-form forward (speculative steps): sequence s feeds `tokens[s]` at RoPE `positions[s]`,
        writes their K/V at cache positions `cache_positions[s]` of its page table `pages[s]`, and
        attends to its first `seq_lens[s]` cache entries (tree-masked where `trees[s]` is given).
        Returns fp32 logits [R, V] of the flat token rows `logits_rows` (all rows when None; an empty
        list writes the K/V only and skips the LM head, returning [0, V])."""
        ps = self.page_size
        flat_ids = [t for ts in tokens for t in ts]
        flat_pos = [p for ps_ in positions for p in ps_]
        slots = [pg[c // ps] * ps + c % ps for pg, cs in zip(pages, cache_positions, strict=True) for c in cs]
        qsl = [0]
        for ts in tokens:
            qsl.append(qsl[-1] + len(ts))
        width = max(len(p) for p in pages)
        table = [p + [SCRATCH_PAGE] * (width - len(p)) for p in pages]
        ids_t, pos_t, rows_t, meta = self._stage(
            (flat_ids, flat_pos, slots, qsl, seq_lens, table), logits_rows or [], all(len(t) == 1 for t in tokens),
            trees=trees, capture_layer=capture_layer)
        meta.positions = pos_t  # the attention masks follow the given positions
        hidden = self.model(ids_t, pos_t, self.backend, meta)
        if logits_rows is not None and not logits_rows:
            vocab = getattr(self.model, "full_arch", self.model.arch).vocab_size  # a TP shard's arch is its slice
            return torch.empty(0, vocab, dtype=torch.float32, device=self.device)
        if logits_rows is not None:
            hidden = hidden[rows_t]
        return self.model.compute_logits(hidden)

    def _stage(self, inputs: HostInputs, rows: list[int], decode_only: bool, skip_ids: bool = False,
               **meta_extra) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Upload an eager step's host inputs (and the token rows `rows`) in one copy; returns the ids [T]
        (empty with `skip_ids`), positions [T], rows [R] and the step's attention metadata."""
        ids, positions, slots, qsl, seq_lens, table = inputs
        ids_t, pos_t, slot_t, table_t, lens_t, qsl_t, rows_t = self.upload(
            [] if skip_ids else ids, positions, slots, [e for row in table for e in row], seq_lens, qsl, rows)
        meta = AttentionMetadata(
            slot_mapping=slot_t, page_tables=table_t.view(len(table), len(table[0]) if table else 0).int(),
            seq_lens=lens_t.int(), query_start_loc=qsl_t.int(), decode_only=decode_only,
            seq_lens_cpu=list(seq_lens), query_start_loc_cpu=qsl, **meta_extra,
        )
        return ids_t, pos_t, rows_t, meta

    def upload(self, *rows: list[int]) -> list[torch.Tensor]:
        """Host int lists -> int64 tensors on the device, one per list. On CUDA they travel as one pinned,
        non-blocking copy: the host neither waits for the stream (a `torch.tensor(..., device=cuda)` from
        pageable memory does, once per tensor) nor reuses the pinned block before the copy has read it
        (torch's caching host allocator holds it until then)."""
        sizes = [len(r) for r in rows]
        flat = torch.tensor([x for r in rows for x in r], dtype=torch.int64)  # [sum(sizes)]
        if self.device.type == "cuda":
            flat = flat.pin_memory().to(self.device, non_blocking=True)
        else:
            flat = flat.to(self.device)
        return list(flat.split(sizes))

    @torch.inference_mode()
    def all_token_logits(self, batch: ScheduledBatch) -> torch.Tensor:
        """[T, V] fp32 logits of every token of the batch (scoring / perplexity; eager)."""
        return self.run_eager(self.batch_inputs(batch), batch.decode_only, None)

    def commit_kv(self, pages: list[int], prefix_len: int, path: list[int]) -> None:
        """Move accepted tree nodes' K/V into place (see `specray.spec.step.commit_kv`)."""
        from specray.spec.step import commit_kv

        commit_kv(self.cache, pages, prefix_len, path)

    def run_eager(self, inputs: HostInputs, decode_only: bool, sample_rows: list[int] | None,
                  ids_dev: torch.Tensor | None = None) -> torch.Tensor:
        """Eager forward of host inputs; fp32 logits of the last token of each of `sample_rows` (all
        tokens when None). `ids_dev` [T] int64 on the device, if given, replaces `inputs[0]`."""
        qsl = inputs[3]
        last = [] if sample_rows is None else [qsl[i + 1] - 1 for i in sample_rows]
        ids_t, pos_t, last_t, meta = self._stage(inputs, last, decode_only, skip_ids=ids_dev is not None)
        hidden = self.model(ids_t if ids_dev is None else ids_dev, pos_t, self.backend, meta)
        if sample_rows is None:
            return self.model.compute_logits(hidden)
        return self.model.compute_logits(hidden[last_t])

    # ---- CUDA graphs ---------------------------------------------------------------------------
    def _graph_size(self, bs: int) -> int | None:
        for size in self.graph_batch_sizes:
            if size >= bs:
                return size
        return None

    def _capture_graphs(self) -> None:
        max_bs = self.graph_batch_sizes[-1]
        dev = self.device
        # one pinned host staging buffer and one device buffer: a single H2D copy per step
        self.h_inputs = torch.zeros(4, max_bs, dtype=torch.int64, pin_memory=True)
        self.tables = PageTableMirror(max_bs, self.max_pages, dev)  # [max_bs, P], uploaded as deltas
        self.g_inputs = torch.zeros(4, max_bs, dtype=torch.int64, device=dev)
        self.g_ids, self.g_pos, self.g_slots = self.g_inputs[0], self.g_inputs[1], self.g_inputs[2]  # slot 0: scratch
        self.g_seq_lens = torch.ones(max_bs, dtype=torch.int32, device=dev)
        self.g_table = self.tables.device_table
        self.g_logits: dict[int, torch.Tensor] = {}
        pool = None
        for bs in reversed(self.graph_batch_sizes):
            meta = AttentionMetadata(
                slot_mapping=self.g_slots[:bs], page_tables=self.g_table[:bs], seq_lens=self.g_seq_lens[:bs],
                query_start_loc=torch.arange(bs + 1, dtype=torch.int32, device=dev), decode_only=True,
                seq_lens_cpu=[], query_start_loc_cpu=[],
            )

            def run(bs=bs, meta=meta) -> torch.Tensor:
                hidden = self.model(self.g_ids[:bs], self.g_pos[:bs], self.backend, meta)
                return self.model.compute_logits(hidden)

            with torch.inference_mode():
                run()  # warm-up: compiles kernels, allocates workspaces outside the graph
                torch.cuda.synchronize(dev)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.g_logits[bs] = run()
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize(dev)

    def replay(self, inputs: HostInputs, ids_dev: torch.Tensor | None = None) -> torch.Tensor:
        """Decode step through the captured graph of the smallest size that fits; logits [bs, V].
        `ids_dev` [bs] on the device, if given, replaces `inputs[0]`."""
        return self.replay_delta(inputs[:5], self.table_delta(inputs), ids_dev)

    def table_delta(self, inputs: HostInputs) -> TableDelta:
        """What `inputs`' page tables change in the graphs' device table (padding rows: emptied)."""
        return self.tables.diff(inputs[5], self._graph_size(len(inputs[4])))

    def replay_delta(self, inputs: tuple[list[int], ...], delta: TableDelta,
                     ids_dev: torch.Tensor | None = None) -> torch.Tensor:
        """`replay` with the page tables given as a delta against the graphs' device table."""
        ids, positions, slots, _, seq_lens = inputs
        bs = len(seq_lens)
        size = self._graph_size(bs)
        pad = size - bs
        h = self.h_inputs
        self._staged.synchronize()  # a step launched ahead may not have read the last contents yet
        h[:, :size] = torch.tensor(
            [ids + [0] * pad, positions + [0] * pad, slots + [0] * pad, seq_lens + [1] * pad], dtype=torch.int64
        )
        self.g_inputs[:, :size].copy_(h[:, :size], non_blocking=True)
        self._staged.record()
        if ids_dev is not None:
            self.g_ids[:bs].copy_(ids_dev)
        self.g_seq_lens[:size].copy_(self.g_inputs[3, :size])  # int64 -> int32 on the device
        self.tables.apply(delta)
        self.graphs[size].replay()
        return self.g_logits[size][:bs]
