"""`PageTableMirror`: page tables uploaded as deltas against the graphs' device table.

Oracle: the dense table the runner used to build every step (zeros, then each row's pages written
from column 0). After every step the host copy and the device table must equal it, and a second
mirror that only receives the deltas (a tensor-parallel follower) must equal the first."""

from __future__ import annotations

import random

import pytest
import torch

from specray.engine.page_table import PageTableMirror, _common_prefix

ROWS, MAX_PAGES = 4, 40


def dense(tables: list[list[int]]) -> torch.Tensor:
    want = torch.zeros(ROWS, MAX_PAGES, dtype=torch.int32)
    for r, t in enumerate(tables):
        want[r, : len(t)] = torch.tensor(t, dtype=torch.int32)
    return want


def test_common_prefix():
    assert _common_prefix([1, 2, 3], [1, 2, 3, 4]) == 3
    assert _common_prefix([1, 2, 3, 4], [1, 2]) == 2
    assert _common_prefix([5, 2, 3], [1, 2, 3]) == 0
    for n in range(1, 40):
        for k in range(n):
            a = list(range(1, n + 1))
            b = a[:k] + [0] + a[k + 1:]
            assert _common_prefix(a, b) == k


def test_deltas_keep_both_mirrors_equal_to_the_dense_table():
    rng = random.Random(3)
    leader = PageTableMirror(ROWS, MAX_PAGES, torch.device("cpu"))
    follower = PageTableMirror(ROWS, MAX_PAGES, torch.device("cpu"))
    seqs = [[rng.randrange(1, 500) for _ in range(rng.randrange(1, 10))] for _ in range(ROWS)]
    sizes_changed = 0
    for step in range(300):
        op = rng.random()
        i = rng.randrange(ROWS)
        if op < 0.5 and len(seqs[i]) < MAX_PAGES:
            seqs[i].append(rng.randrange(1, 500))  # a decode step crossed a page boundary
        elif op < 0.6 and len(seqs[i]) > 1:
            del seqs[i][rng.randrange(1, len(seqs[i])):]  # rollback / preemption frees the tail
        elif op < 0.7:
            seqs[i] = [rng.randrange(1, 500) for _ in range(rng.randrange(1, 12))]  # another sequence in the row
        elif op < 0.75:
            seqs[i][rng.randrange(len(seqs[i]))] = rng.randrange(1, 500)  # one page swapped in the middle
        bs = rng.randrange(1, ROWS + 1)
        size = rng.randrange(bs, ROWS + 1)
        width = max(len(s) for s in seqs[:bs])
        tables = [s + [0] * (width - len(s)) for s in seqs[:bs]]  # padded like the runner's host inputs
        delta = leader.diff(tables, size)
        assert leader.diff(tables, size) == delta  # diff is pure
        leader.apply(delta)
        follower.apply(delta)
        sizes_changed += bool(delta)
        want = dense(tables + [[] for _ in range(size - bs)])
        assert torch.equal(leader.host[:size], want[:size]), step
        assert torch.equal(leader.device_table[:size], want[:size]), step
        assert torch.equal(follower.device_table, leader.device_table)
        assert leader.diff(tables, size) == []  # nothing left to send
    assert sizes_changed > 100


def test_an_unchanged_table_sends_nothing_and_one_new_page_sends_one_entry():
    m = PageTableMirror(ROWS, MAX_PAGES, torch.device("cpu"))
    pages = list(range(1, 31))
    m.apply(m.diff([pages], 1))
    assert m.diff([pages], 1) == []
    assert m.diff([pages + [77]], 1) == [(0, 30, [77], 30)]


def test_bad_tables_are_refused():
    m = PageTableMirror(ROWS, MAX_PAGES, torch.device("cpu"))
    with pytest.raises(ValueError, match="exceeds"):
        m.diff([list(range(1, MAX_PAGES + 2))], 1)
    with pytest.raises(ValueError, match="tables for"):
        m.diff([[1], [2]], 1)
