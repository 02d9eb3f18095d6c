"""CUDA graphs of a fresh encode: the K/V of one sequence's first n tokens, written with no cached prefix.

Owns the static step inputs (token ids, positions and cache slots, `[3, L_max]`, pinned on the host and on
the device), one captured graph per length bucket (multiples of `step` up to `max_tokens`) and the memory
pool they share. A run of n tokens replays the smallest bucket L >= n. The L - n padding tokens come after
the real ones, at position 0, with their K/V written into the scratch page; attention is causal over the
step's own keys (`AttentionMetadata.fresh_causal`), so no real token sees them.

Who uses it: a `draft_model` proposer with Cross-model Retrieval re-encodes its whole working set (~1K
tokens) at every refresh. Eager, that forward is about 75 launches per 2 layers and bound by the host
(2.5-3.4 ms of host time on an H200 machine, more in a Ray worker: BENCHMARKS.md, session 9); a replay is
one launch. With `capture=False` (CPU, or tests) the same padded static forward runs eagerly.
"""

from __future__ import annotations

import numpy as np
import torch

from specray.engine.attention import AttentionMetadata
from specray.engine.kv_cache import SCRATCH_PAGE
from specray.engine.model_runner import ModelRunner
from specray.models.arch import ModelArch


def bucket_sizes(max_tokens: int, step: int) -> tuple[int, ...]:
    """Multiples of `step` below `max_tokens`, then `max_tokens` itself."""
    if max_tokens < 1 or step < 1:
        raise ValueError(f"bad fresh-encode buckets: max_tokens {max_tokens}, step {step}")
    return (*range(step, max_tokens, step), max_tokens)


class FreshEncodeGraphs:
    @staticmethod
    def supports(arch: ModelArch) -> bool:
        """Whether a model can use them: attention is causal over the whole chunk, so no sliding windows."""
        return all(w is None for w in arch.sliding_windows)

    def __init__(self, runner: ModelRunner, max_tokens: int, step: int = 64, capture: bool = True):
        if not self.supports(runner.model.arch):
            raise ValueError("fresh-encode graphs attend causally over the whole chunk: no sliding windows")
        self.runner = runner
        self.sizes = bucket_sizes(max_tokens, step)
        self.max_tokens = max_tokens
        self.capture = capture
        dev = runner.device
        pin = dev.type == "cuda"
        self.h = torch.zeros(3, max_tokens, dtype=torch.int64, pin_memory=pin)  # ids, positions, slots
        self.d = torch.zeros(3, max_tokens, dtype=torch.int64, device=dev)
        self._scratch_slot = SCRATCH_PAGE * runner.page_size
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._metas: dict[int, AttentionMetadata] = {}
        self.num_runs = 0
        self._read = None  # CUDA: recorded after the device copied `h` (it is rewritten only after that)
        if capture:
            self._capture_all()
            self._read = torch.cuda.Event()
            self._read.record()

    def fits(self, n: int) -> bool:
        return 0 < n <= self.max_tokens

    def size_for(self, n: int) -> int:
        return next(s for s in self.sizes if s >= n)

    def _meta(self, size: int) -> AttentionMetadata:
        """The bucket's metadata, built before any capture (a graph cannot copy from pageable host memory)."""
        if size not in self._metas:
            dev = self.runner.device
            self._metas[size] = AttentionMetadata(
                slot_mapping=self.d[2, :size], page_tables=torch.zeros(1, 1, dtype=torch.int32, device=dev),
                seq_lens=torch.full((1,), size, dtype=torch.int32, device=dev),
                query_start_loc=torch.tensor([0, size], dtype=torch.int32, device=dev), decode_only=False,
                seq_lens_cpu=[], query_start_loc_cpu=[], fresh_causal=True,
            )
        return self._metas[size]

    def _forward(self, size: int) -> None:
        r = self.runner
        r.model(self.d[0, :size], self.d[1, :size], r.backend, self._meta(size))  # [size, hidden], dropped

    @torch.inference_mode()
    def _capture_all(self) -> None:
        dev = self.runner.device
        self.d.zero_()
        self.d[2].fill_(self._scratch_slot)  # warm-up and capture write only into the scratch page
        pool = None
        for size in reversed(self.sizes):  # largest first: the smaller graphs reuse its pool
            self._meta(size)
            self._forward(size)  # warm-up: kernels compiled, workspaces allocated outside the graph
            torch.cuda.synchronize(dev)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(size)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize(dev)

    @torch.inference_mode()
    def run(self, pages: list[int], tokens: list[int]) -> None:
        """Write the K/V of `tokens` at positions and cache positions 0..n-1 of page table `pages`."""
        n = len(tokens)
        if not self.fits(n):
            raise ValueError(f"a fresh encode of {n} tokens: the graphs take 1..{self.max_tokens}")
        size = self.size_for(n)
        ps = self.runner.page_size
        pos = np.arange(n, dtype=np.int64)
        if self._read is not None:
            self._read.synchronize()  # the previous run's copy has read `h`
        h = self.h.numpy()
        h[0, :n] = tokens
        h[1, :n] = pos
        h[2, :n] = np.asarray(pages, dtype=np.int64)[pos // ps] * ps + pos % ps
        h[:2, n:size] = 0
        h[2, n:size] = self._scratch_slot
        self.d[:, :size].copy_(self.h[:, :size], non_blocking=True)
        if self.capture:
            self._read.record()
            self.graphs[size].replay()
        else:
            self._forward(size)
        self.num_runs += 1
