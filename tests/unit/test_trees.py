"""Draft-tree builders against brute-force references on a synthetic deterministic draft.

The draft's next-token log-probs are a seeded hash of the node's full token path (V = 12), so the
selection each builder should make is recomputed here by plain-Python enumeration of every
candidate (fp32 arithmetic, the same tie rule) and compared node for node."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from specray.spec.trees import (
    build_beam,
    build_chain,
    build_chain_sampled,
    build_dynamic,
    build_tree_sampled,
    dynamic_pool_size,
    stable_topk,
    tree_size,
    validate_beam,
    validate_chain,
    validate_dynamic,
    validate_sampled_tree,
)
from specray.spec.types import DraftTree

V = 12
ROOT = 5


def _seed(path: tuple[int, ...], salt: int) -> int:
    return zlib.crc32(np.asarray((salt, *path), dtype=np.int64).tobytes())


def smooth_logp(path: tuple[int, ...]) -> torch.Tensor:
    """Continuous log-probs (no ties in practice). [V] fp32."""
    g = torch.Generator().manual_seed(_seed(path, 1))
    return torch.log_softmax(2.0 * torch.randn(V, generator=g), dim=-1)


def tied_logp(path: tuple[int, ...]) -> torch.Tensor:
    """Quantised scores in {0, -0.25, ..., -1.75}: exact fp32 sums, many ties (including ties between
    a node and its child). Not normalised; builders do not care. [V] fp32."""
    g = torch.Generator().manual_seed(_seed(path, 2))
    return -torch.randint(0, 8, (V,), generator=g).float() / 4


def probs_of(path: tuple[int, ...]) -> torch.Tensor:
    """Warped draft probs with a zero entry. [V] fp32."""
    p = torch.softmax(smooth_logp(path), dim=-1)
    p[_seed(path, 3) % V] = 0.0
    return p / p.sum()


def paths_of(tree: DraftTree) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = []
    for i, tok in enumerate(tree.tokens):
        out.append((tok,) if i == 0 else out[tree.parents[i]] + (tok,))
    return out


class Recorder:
    """An expand callback over a path -> row function that records each call's node count."""

    def __init__(self, fn):
        self.fn = fn
        self.calls: list[int] = []

    def __call__(self, tree: DraftTree, nodes: list[int]) -> torch.Tensor:
        self.calls.append(len(nodes))
        paths = paths_of(tree)
        return torch.stack([self.fn(paths[i]) for i in nodes])


def f32(x: float) -> np.float32:
    return np.float32(x)


# ------------------------------------------------------------------------------------------------
# brute-force references (plain Python, fp32 sums, explicit tie keys)


def ref_chain(length: int, fn) -> list[int]:
    path = (ROOT,)
    for _ in range(length):
        row = fn(path).tolist()
        path = path + (max(range(V), key=lambda t: (row[t], -t)),)
    return list(path[1:])


def ref_beam(shape: list[int], fn) -> list[list[tuple[int, ...]]]:
    """Per level, the kept paths in rank order: every (node of the previous level, token) scored by
    cumulative fp32 log-prob, sorted by (score desc, parent rank, token)."""
    level: list[tuple[tuple[int, ...], np.float32 | None]] = [((ROOT,), None)]
    levels = []
    for width in shape:
        cands = []
        for rank, (path, cum) in enumerate(level):
            row = fn(path).tolist()
            for t in range(V):
                score = f32(row[t]) if cum is None else f32(cum + f32(row[t]))
                cands.append((-float(score), rank, t, path + (t,), score))
        cands.sort(key=lambda c: c[:3])
        level = [(c[3], c[4]) for c in cands[:width]]
        levels.append([p for p, _ in level])
    return levels


def ref_dynamic(depth: int, top_k: int, budget: int, fn) -> tuple[list[tuple[int, ...]], list[float], list[int]]:
    """EAGLE-2 by enumeration. Returns (pool paths in drafting order, their scores, kept pool indices)."""
    pool_paths: list[tuple[int, ...]] = []
    pool_cum: list[np.float32] = []
    to_expand: list[tuple[tuple[int, ...], np.float32 | None]] = [((ROOT,), None)]
    for d in range(depth):
        new = []
        for path, cum in to_expand:
            row = fn(path).tolist()
            best = sorted(range(V), key=lambda t: (-row[t], t))[:top_k]
            for t in best:
                new.append((path + (t,), f32(row[t]) if cum is None else f32(cum + f32(row[t]))))
        pool_paths += [p for p, _ in new]
        pool_cum += [c for _, c in new]
        if d + 1 < depth:
            order = sorted(range(len(new)), key=lambda i: (-float(new[i][1]), i))[:top_k]
            to_expand = [new[i] for i in order]
    ranked = sorted(range(len(pool_paths)), key=lambda i: (-float(pool_cum[i]), i))
    return pool_paths, [float(c) for c in pool_cum], sorted(ranked[:budget])


# ------------------------------------------------------------------------------------------------
# chain


@pytest.mark.parametrize("fn", [smooth_logp, tied_logp])
def test_chain_is_argmax_rollout(fn):
    rec = Recorder(fn)
    tree = build_chain(ROOT, 6, rec)
    assert tree.tokens == [ROOT, *ref_chain(6, fn)]
    assert tree.parents == [-1, 0, 1, 2, 3, 4, 5] and tree.depths == list(range(7))
    assert rec.calls == [1] * 6
    assert tree.num_nodes == tree_size("chain", length=6) == 7
    assert tree.draft_probs is None and not tree.sampled_children


# ------------------------------------------------------------------------------------------------
# beam


@pytest.mark.parametrize("fn", [smooth_logp, tied_logp])
@pytest.mark.parametrize("shape", [[4, 16, 16, 16, 16], [3, 5, 2], [1, 1, 1], [12, 40]])
def test_beam_matches_enumeration(fn, shape):
    rec = Recorder(fn)
    tree = build_beam(ROOT, shape, rec)
    assert tree.num_nodes == tree_size("beam", shape=shape) == 1 + sum(shape)
    assert rec.calls == [1, *shape[:-1]]  # once per depth, batched over the whole previous level
    paths = paths_of(tree)
    expected = ref_beam(shape, fn)
    start = 1
    for d, level in enumerate(expected, start=1):
        got = paths[start : start + len(level)]
        assert got == level, f"depth {d}"
        assert all(tree.depths[i] == d for i in range(start, start + len(level)))
        start += len(level)


def test_beam_default_shape_has_69_nodes():
    rec = Recorder(smooth_logp)
    tree = build_beam(ROOT, [4, 16, 16, 16, 16], rec)
    assert tree.num_nodes == 69 and tree.max_depth == 5 and len(rec.calls) == 5
    # Distinct (parent, token) pairs: no duplicate siblings.
    pairs = {(tree.parents[i], tree.tokens[i]) for i in range(1, 69)}
    assert len(pairs) == 68


def test_beam_width_larger_than_candidates():
    with pytest.raises(ValueError, match="shape"):
        build_beam(ROOT, [13], Recorder(smooth_logp))


# ------------------------------------------------------------------------------------------------
# dynamic


@pytest.mark.parametrize("fn", [smooth_logp, tied_logp])
@pytest.mark.parametrize("depth,top_k,budget", [(5, 4, 30), (6, 10, 60), (1, 5, 5), (3, 3, 21), (4, 2, 1), (7, 8, 255)])
def test_dynamic_matches_enumeration(fn, depth, top_k, budget):
    rec = Recorder(fn)
    tree = build_dynamic(ROOT, depth, top_k, budget, rec)
    assert tree.num_nodes == budget + 1 == tree_size("dynamic", budget=budget)
    assert rec.calls == [1] + [top_k] * (depth - 1)

    pool_paths, pool_cum, kept = ref_dynamic(depth, top_k, budget, fn)
    assert len(pool_paths) == dynamic_pool_size(depth, top_k)
    kept_paths = [(ROOT, *pool_paths[i][1:]) for i in kept]
    assert paths_of(tree)[1:] == kept_paths  # same nodes, same BFS / drafting order

    # Properties, independently of the reference's ordering.
    assert tree.tokens[0] == ROOT and tree.depths == sorted(tree.depths)
    got = set(paths_of(tree))
    assert all(p[:-1] in got for p in got if len(p) > 1)  # ancestor-closed
    scores = {p: c for p, c in zip(pool_paths, pool_cum, strict=True)}
    kept_scores = sorted((scores[p] for p in paths_of(tree)[1:]), reverse=True)
    assert kept_scores == sorted(pool_cum, reverse=True)[:budget]


def test_dynamic_closure_with_increasing_scores():
    """Scores that grow along a path (not log-probs) still give a valid, ancestor-closed tree."""

    def rising(path: tuple[int, ...]) -> torch.Tensor:
        return tied_logp(path) + 3.0

    tree = build_dynamic(ROOT, 4, 3, 12, Recorder(rising))
    assert tree.num_nodes == 13
    got = set(paths_of(tree))
    assert all(p[:-1] in got for p in got if len(p) > 1)


# ------------------------------------------------------------------------------------------------
# sampled builders


def test_chain_sampled():
    rec = Recorder(probs_of)
    tree = build_chain_sampled(ROOT, 4, rec, torch.Generator().manual_seed(0))
    again = build_chain_sampled(ROOT, 4, Recorder(probs_of), torch.Generator().manual_seed(0))
    assert tree.tokens == again.tokens and torch.equal(tree.draft_probs, again.draft_probs)
    assert tree.sampled_children and tree.parents == [-1, 0, 1, 2, 3] and rec.calls == [1] * 4
    assert tree.draft_probs.shape == (5, V) and tree.draft_probs.dtype == torch.float32
    paths = paths_of(tree)
    for i in range(4):
        assert torch.equal(tree.draft_probs[i], probs_of(paths[i]))
        assert tree.draft_probs[i, tree.tokens[i + 1]] > 0  # drawn from a token with mass
    assert not tree.draft_probs[4].any()


def test_chain_sampled_draws_follow_the_distribution():
    probs = probs_of((ROOT,))
    gen = torch.Generator().manual_seed(1)
    n = 4000
    counts = torch.zeros(V)
    for _ in range(n):
        counts[build_chain_sampled(ROOT, 1, lambda t, nodes: probs.unsqueeze(0), gen).tokens[1]] += 1
    assert counts[probs == 0].sum() == 0
    assert torch.allclose(counts / n, probs, atol=0.03)


def test_tree_sampled():
    rec = Recorder(probs_of)
    widths = [3, 2, 2]
    tree = build_tree_sampled(ROOT, widths, rec, torch.Generator().manual_seed(0))
    assert tree.num_nodes == 1 + 3 + 6 + 12 == tree_size("tree_sampled", widths=widths)
    assert rec.calls == [1, 3, 6] and tree.sampled_children
    kids = tree.children()
    for u in range(tree.num_nodes):
        d = tree.depths[u]
        assert len(kids[u]) == (widths[d] if d < len(widths) else 0)
        if kids[u]:
            assert kids[u] == list(range(kids[u][0], kids[u][0] + widths[d]))  # contiguous
    paths = paths_of(tree)
    for u in range(tree.num_nodes):
        if kids[u]:
            assert torch.equal(tree.draft_probs[u], probs_of(paths[u]))
            assert all(tree.draft_probs[u, tree.tokens[c]] > 0 for c in kids[u])
        else:
            assert not tree.draft_probs[u].any()


def test_tree_sampled_keeps_duplicates():
    one_hot = torch.zeros(1, V)
    one_hot[0, 3] = 1.0
    tree = build_tree_sampled(ROOT, [4], lambda t, nodes: one_hot.expand(len(nodes), V), None)
    assert tree.tokens == [ROOT, 3, 3, 3, 3]


# ------------------------------------------------------------------------------------------------
# validation, sizes, stable top-k


def test_validation_names_the_field():
    for bad in (0, -1):
        with pytest.raises(ValueError, match="length"):
            validate_chain(bad)
    with pytest.raises(ValueError, match="length"):
        validate_chain(256)
    validate_chain(255)
    with pytest.raises(ValueError, match="shape"):
        validate_beam([])
    with pytest.raises(ValueError, match="shape"):
        validate_beam([4, 0])
    with pytest.raises(ValueError, match="shape"):
        validate_beam([128, 128])  # 257 nodes
    validate_beam([128, 127])
    with pytest.raises(ValueError, match="depth"):
        validate_dynamic(0, 4, 10)
    with pytest.raises(ValueError, match="top_k"):
        validate_dynamic(3, 0, 10)
    with pytest.raises(ValueError, match="budget"):
        validate_dynamic(3, 4, 0)
    with pytest.raises(ValueError, match="budget"):
        validate_dynamic(20, 10, 256)
    with pytest.raises(ValueError, match="budget"):
        validate_dynamic(2, 2, 7)  # pool is 2 + 4 = 6
    validate_dynamic(2, 2, 6)
    with pytest.raises(ValueError, match="widths"):
        validate_sampled_tree([])
    with pytest.raises(ValueError, match="widths"):
        validate_sampled_tree([16, 16])  # 273 nodes
    with pytest.raises(ValueError, match="budget"):
        build_dynamic(ROOT, 3, 4, 0, Recorder(smooth_logp))
    with pytest.raises(ValueError, match="top_k"):
        build_dynamic(ROOT, 2, 13, 5, Recorder(smooth_logp))  # more than V


def test_tree_size():
    assert tree_size("chain", length=5) == tree_size("chain_sampled", length=5) == 6
    assert tree_size("beam", shape=[4, 16, 16, 16, 16]) == 69
    assert tree_size("dynamic", budget=60) == 61
    assert tree_size("tree_sampled", widths=[3, 2]) == 10
    with pytest.raises(ValueError):
        tree_size("beam")
    with pytest.raises(ValueError):
        tree_size("nope", length=3)


def test_stable_topk_ties():
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, float("-inf")], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    vals, idx = stable_topk(x, 2)
    assert idx.tolist() == [[1, 2], [0, 1]] and vals.tolist() == [[3.0, 3.0], [0.0, 0.0]]
    vals, idx = stable_topk(x, 5)
    assert idx.tolist() == [[1, 2, 4, 3, 0], [0, 1, 2, 3, 4]]
    x = torch.tensor([[float("-inf"), 1.0, float("-inf"), float("-inf")]])
    assert stable_topk(x, 3)[1].tolist() == [[1, 0, 2]]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (7, 50), generator=g).float()
    vals, idx = stable_topk(x, 9)
    for r in range(7):
        ref = sorted(range(50), key=lambda c: (-x[r, c].item(), c))[:9]
        assert idx[r].tolist() == ref
