"""Incremental upload of the page tables that captured CUDA graphs read.

`PageTableMirror` owns a device table `[R, P]` int32 (the graphs' static input), a host staging copy
of it (pinned on CUDA), and `rows`, the host's record of what each row holds (its entries up to the
last one written; everything after is `SCRATCH_PAGE`, i.e. 0).

A decode step at 32K context has 2048-page tables, and a sequence's table changes only when it
gains or loses a page (one step in `page_size` during decode). Building, zeroing and copying the
whole table every step cost more host time than the rest of the step's inputs, so a step first
computes a `TableDelta` against `rows` (`diff`, pure), and `apply` writes only the changed ranges
to the host copy and the device. The delta is also what a tensor-parallel leader sends its
followers: their mirrors see the same deltas in the same order, so they stay identical.
"""

from __future__ import annotations

import torch

# (row, start, values, clear_to): row[start : start + len(values)] = values, then
# row[start + len(values) : clear_to] = 0 (clear_to <= start + len(values): nothing to clear)
RowChange = tuple[int, int, list[int], int]
TableDelta = list[RowChange]


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of a and b (slice compares run in C)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class PageTableMirror:
    def __init__(self, num_rows: int, max_pages: int, device: torch.device):
        self.max_pages = max_pages
        pin = device.type == "cuda"
        self.host = torch.zeros(num_rows, max_pages, dtype=torch.int32, pin_memory=pin)  # [R, P]
        self.device_table = torch.zeros(num_rows, max_pages, dtype=torch.int32, device=device)  # [R, P]
        self.rows: list[list[int]] = [[] for _ in range(num_rows)]
        self._copied = torch.cuda.Event() if pin else None  # recorded after the last queued copies

    def diff(self, tables: list[list[int]], size: int) -> TableDelta:
        """Changes that make rows [0, size) hold `tables` (rows from len(tables) on: empty). Pure."""
        if len(tables) > size or size > len(self.rows):
            raise ValueError(f"{len(tables)} tables for {size} of {len(self.rows)} rows")
        delta: TableDelta = []
        for r in range(size):
            new = tables[r] if r < len(tables) else []
            if len(new) > self.max_pages:
                raise ValueError(f"page table of {len(new)} pages exceeds the {self.max_pages} captured")
            old = self.rows[r]
            if new == old:
                continue
            k = _common_prefix(old, new)
            delta.append((r, k, new[k:], len(old)))
        return delta

    def apply(self, delta: TableDelta) -> None:
        """Write `delta` to the host copy and queue its device copies (async from pinned memory).
        The host copy is rewritten in place, so this first waits until the device has run the
        previous delta's copies (a step launched ahead may still have them queued)."""
        if not delta:
            return
        if self._copied is not None:
            self._copied.synchronize()
        for r, start, values, clear_to in delta:
            end = start + len(values)
            if values:
                self.host[r, start:end] = torch.tensor(values, dtype=torch.int32)
            if clear_to > end:
                self.host[r, end:clear_to] = 0
            hi = max(end, clear_to)
            if hi > start:
                self.device_table[r, start:hi].copy_(self.host[r, start:hi], non_blocking=True)
            self.rows[r] = self.rows[r][:start] + values
        if self._copied is not None:
            self._copied.record()

    def restore(self) -> None:
        """Copy the host copy back over the whole device table (after something else, e.g. a graph
        capture's warm-up, wrote the device table directly)."""
        self.device_table.copy_(self.host, non_blocking=True)
        if self._copied is not None:
            self._copied.record()
