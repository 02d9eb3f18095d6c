"""Draft-tree builders: turn a proposer's next-token distributions into a `DraftTree`.

Owns no model and no state. A proposer hands a builder an *expand* callback that, given the partial
tree built so far and some of its node indices, runs the draft model on those nodes and returns the
draft's next-token scores for each; a builder calls it once per depth level, batched over every node
of that level it wants to grow, and decides which (node, token) pairs become the next level.

Deterministic builders (greedy decoding, or sampling verified with point-mass candidates) read
log-probs: `build_chain` (argmax rollout), `build_beam` (LongSpec's level-wise beam) and
`build_dynamic` (EAGLE-2's expand-then-rerank tree). Sampling builders read warped probabilities and
draw children i.i.d. from them, recording the distribution in `DraftTree.draft_probs`:
`build_chain_sampled` and `build_tree_sampled` (SpecInfer-style).

Ties are broken deterministically everywhere: among equal scores the lower (node index, token id)
wins, so a tree depends only on the expand callback's values, never on `torch.topk`'s tie order.

`tree_size` and the `*_size` helpers give the node count N (root included) of a configuration
without running anything; the `validate_*` helpers raise `ValueError` naming the offending field.
`stable_topk` (deterministic ties) and `sample_tokens` (exponential-race draws from a generator)
are the tensor primitives the builders and the verifier share.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from specray.spec.types import DraftTree

MAX_TREE_NODES = 256  # N limit, root included

# (partial tree, node indices) -> [len(nodes), V] fp32: draft log-probs (or warped probs for the
# *_sampled builders) of the token following each of those nodes.
ExpandFn = Callable[[DraftTree, list[int]], Tensor]


# ----------------------------------------------------------------------------------------------
# sizes and validation


def validate_chain(length: int) -> None:
    if not isinstance(length, int) or length <= 0:
        raise ValueError(f"length must be a positive int, got {length!r}")
    if length + 1 > MAX_TREE_NODES:
        raise ValueError(f"length={length} gives {length + 1} nodes, more than the limit {MAX_TREE_NODES}")


def _validate_widths(name: str, widths: Sequence[int]) -> None:
    if len(widths) == 0:
        raise ValueError(f"{name} must be non-empty")
    for w in widths:
        if not isinstance(w, int) or w <= 0:
            raise ValueError(f"{name} entries must be positive ints, got {list(widths)!r}")


def validate_beam(shape: Sequence[int]) -> None:
    _validate_widths("shape", shape)
    n = beam_size(shape)
    if n > MAX_TREE_NODES:
        raise ValueError(f"shape={list(shape)} gives {n} nodes, more than the limit {MAX_TREE_NODES}")


def validate_dynamic(depth: int, top_k: int, budget: int) -> None:
    if not isinstance(depth, int) or depth <= 0:
        raise ValueError(f"depth must be a positive int, got {depth!r}")
    if not isinstance(top_k, int) or top_k <= 0:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    if not isinstance(budget, int) or budget <= 0:
        raise ValueError(f"budget must be a positive int, got {budget!r}")
    if budget + 1 > MAX_TREE_NODES:
        raise ValueError(f"budget={budget} gives {budget + 1} nodes, more than the limit {MAX_TREE_NODES}")
    pool = dynamic_pool_size(depth, top_k)
    if budget > pool:
        raise ValueError(f"budget={budget} exceeds the {pool} nodes drafted with depth={depth}, top_k={top_k}")


def validate_sampled_tree(widths: Sequence[int]) -> None:
    _validate_widths("widths", widths)
    n = sampled_tree_size(widths)
    if n > MAX_TREE_NODES:
        raise ValueError(f"widths={list(widths)} gives {n} nodes, more than the limit {MAX_TREE_NODES}")


def chain_size(length: int) -> int:
    return length + 1


def beam_size(shape: Sequence[int]) -> int:
    return 1 + sum(shape)


def dynamic_pool_size(depth: int, top_k: int) -> int:
    """Nodes drafted (root excluded) before the rerank: top_k at depth 1, top_k**2 at each later depth."""
    return top_k + (depth - 1) * top_k * top_k


def dynamic_size(budget: int) -> int:
    return budget + 1


def sampled_tree_size(widths: Sequence[int]) -> int:
    n, level = 1, 1
    for w in widths:
        level *= w
        n += level
    return n


def tree_size(
    kind: str,
    *,
    length: int | None = None,
    shape: Sequence[int] | None = None,
    budget: int | None = None,
    widths: Sequence[int] | None = None,
) -> int:
    """N (root included) of a tree kind: "chain"/"chain_sampled" (length), "beam" (shape),
    "dynamic" (budget), "tree_sampled" (widths)."""
    if kind in ("chain", "chain_sampled"):
        if length is None:
            raise ValueError(f"tree_size({kind!r}) needs length")
        return chain_size(length)
    if kind == "beam":
        if shape is None:
            raise ValueError("tree_size('beam') needs shape")
        return beam_size(shape)
    if kind == "dynamic":
        if budget is None:
            raise ValueError("tree_size('dynamic') needs budget")
        return dynamic_size(budget)
    if kind == "tree_sampled":
        if widths is None:
            raise ValueError("tree_size('tree_sampled') needs widths")
        return sampled_tree_size(widths)
    raise ValueError(f"unknown tree kind {kind!r}")


# ----------------------------------------------------------------------------------------------
# helpers


def stable_topk(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Row-wise top-k with deterministic ties. x: [R, C] -> (values, indices) [R, k], each row sorted
    by value descending, equal values in increasing column order. O(C) per row, no host sync."""
    num_rows, num_cols = x.shape
    if not 0 < k <= num_cols:
        raise ValueError(f"top-{k} of {num_cols} candidates")
    kth = torch.topk(x, k, dim=-1).values[:, -1:]  # [R, 1] the k-th largest value
    greater = x > kth  # [R, C]
    equal = x == kth  # [R, C]
    need = k - greater.sum(dim=-1, keepdim=True)  # [R, 1] how many of the ties to take
    selected = greater | (equal & (torch.cumsum(equal, dim=-1) <= need))  # [R, C], exactly k per row
    # The k selected columns of each row in increasing order: top-k of a distinct integer key.
    key = torch.where(selected, num_cols - torch.arange(num_cols, device=x.device), 0)  # [R, C] int64
    cols = torch.sort(torch.topk(key, k, dim=-1).indices, dim=-1).values  # [R, k] ascending columns
    vals = x.gather(1, cols)  # [R, k]
    order = torch.sort(vals, dim=-1, descending=True, stable=True).indices  # [R, k]
    return vals.gather(1, order), cols.gather(1, order)


def sample_tokens(probs: Tensor, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
    """num_samples i.i.d. draws per row of non-negative (not necessarily normalised) fp32 probs [R, V]
    -> [R, num_samples] int64, by the exponential race argmax(p / E), E ~ Exp(1) (one fused pass;
    torch.multinomial costs far more per call on CPU). All noise from `generator` (None: default)."""
    rows, vocab = probs.shape
    if num_samples == 1:  # the common case, one op less
        noise = torch.empty(rows, vocab, dtype=torch.float32, device=probs.device)  # [R, V]
        noise.exponential_(generator=generator).clamp_(min=1e-30)  # a 0 would make 0 / 0 = NaN win
        return probs.div(noise).argmax(dim=-1, keepdim=True)  # [R, 1]
    noise = torch.empty(rows, num_samples, vocab, dtype=torch.float32, device=probs.device)  # [R, S, V]
    noise.exponential_(generator=generator).clamp_(min=1e-30)
    return probs.unsqueeze(1).div(noise).argmax(dim=-1)  # [R, S]


def _check_rows(out: Tensor, nodes: list[int], what: str) -> Tensor:
    if out.dim() != 2 or out.shape[0] != len(nodes):
        raise ValueError(f"expand returned {what} of shape {tuple(out.shape)} for {len(nodes)} nodes")
    return out.float()


# ----------------------------------------------------------------------------------------------
# deterministic builders (read log-probs)


def build_chain(root: int, length: int, expand: ExpandFn) -> DraftTree:
    """Greedy chain: each node's child is the argmax (lowest id on ties) of its draft log-probs.
    N = length + 1; expand is called `length` times, once per depth, on the newest node."""
    validate_chain(length)
    tokens = [root]
    for _ in range(length):
        tree = DraftTree.chain(root, tokens[1:])
        logp = _check_rows(expand(tree, [len(tokens) - 1]), [0], "log-probs")  # [1, V]
        tokens.append(int(logp.argmax(dim=-1).item()))  # torch.argmax returns the first maximum
    return DraftTree.chain(root, tokens[1:])


def build_beam(root: int, shape: Sequence[int], expand: ExpandFn) -> DraftTree:
    """LongSpec's beam tree. Depth 1 holds the top-shape[0] tokens of the root; depth d > 1 expands
    every node of depth d-1 and keeps the top-shape[d-1] (node, token) pairs over that whole level x
    vocabulary by cumulative log-prob (parent cumulative + child log-prob).

    N = 1 + sum(shape); nodes are level by level, each level in rank order (score descending, ties
    to the lower parent index, then the lower token id). expand is called once per depth."""
    validate_beam(shape)
    tokens, parents, depths = [root], [-1], [0]
    level = [0]  # node indices of the newest level
    cum: Tensor | None = None  # [len(level)] cumulative log-probs of the newest level (None: root)
    for d, width in enumerate(shape, start=1):
        tree = DraftTree(list(tokens), list(parents), list(depths))
        logp = _check_rows(expand(tree, level), level, "log-probs")  # [n, V]
        vocab = logp.shape[1]
        scores = logp if cum is None else cum.to(logp.device).unsqueeze(1) + logp  # [n, V]
        if width > scores.numel():
            raise ValueError(f"shape[{d - 1}]={width} exceeds the {scores.numel()} candidates at depth {d}")
        cum, flat = stable_topk(scores.reshape(1, -1), width)  # [1, w] each
        cum = cum[0]
        flat_list = flat[0].tolist()
        start = len(tokens)
        for f in flat_list:
            tokens.append(f % vocab)
            parents.append(level[f // vocab])
            depths.append(d)
        level = list(range(start, len(tokens)))
    return DraftTree(tokens, parents, depths)


def build_dynamic(root: int, depth: int, top_k: int, budget: int, expand: ExpandFn) -> DraftTree:
    """EAGLE-2's dynamic tree. Depth 1: the root's top_k children. Each later depth expands the
    top_k nodes of the newest level by cumulative log-prob (ties to the lower node index), each
    getting its top_k children (ties to the lower token id), so the pool holds
    top_k + (depth - 1) * top_k**2 drafted nodes. Then all drafted nodes are re-ranked by cumulative
    log-prob and the best `budget` kept, ancestor-closed: nodes are taken best-first from the
    frontier of the kept set (a node whose parent is kept), which is exactly the global top `budget`
    under (score descending, index ascending) whenever scores do not increase along a path (true for
    log-probs), and stays a valid tree otherwise.

    N = budget + 1; nodes in BFS order (depth, then drafting order), root first. expand is called
    `depth` times."""
    validate_dynamic(depth, top_k, budget)
    tokens, parents, depths = [root], [-1], [0]
    level_cums: list[Tensor] = []  # [n * k] cumulative log-probs of each drafted level, node order
    to_expand = [0]
    to_expand_cum: Tensor | None = None  # [len(to_expand)] (None: root)
    for d in range(1, depth + 1):
        tree = DraftTree(list(tokens), list(parents), list(depths))
        logp = _check_rows(expand(tree, to_expand), to_expand, "log-probs")  # [n, V]
        if top_k > logp.shape[1]:
            raise ValueError(f"top_k={top_k} exceeds the vocabulary size {logp.shape[1]}")
        n = len(to_expand)
        child_logp, child_tok = stable_topk(logp, top_k)  # [n, k] each
        child_cum = child_logp if to_expand_cum is None else to_expand_cum.unsqueeze(1) + child_logp  # [n, k]
        level_cum = child_cum.reshape(-1)  # [n * k] in (parent, rank) order = node index order
        level_cums.append(level_cum)
        if d < depth:  # the level's best top_k go on; fetched with the tokens in one transfer
            best_cum, best = stable_topk(level_cum.unsqueeze(0), top_k)  # [1, k]; the level has >= k nodes
            host = torch.cat([child_tok.reshape(-1), best[0]]).tolist()
            to_expand_cum = best_cum[0]
        else:
            host = child_tok.reshape(-1).tolist()
        start = len(tokens)
        tokens.extend(host[: n * top_k])
        for parent in to_expand:
            parents.extend([parent] * top_k)
        depths.extend([d] * (n * top_k))
        to_expand = [start + i for i in host[n * top_k :]]
    cum_all = [0.0, *torch.cat(level_cums).tolist()]  # every drafted node's score, node order

    # Rerank: best-first growth from the root over (score descending, index ascending).
    children: list[list[int]] = [[] for _ in tokens]
    for i in range(1, len(tokens)):
        children[parents[i]].append(i)
    kept = [0]
    frontier = [(-cum_all[c], c) for c in children[0]]
    heapq.heapify(frontier)
    while len(kept) < budget + 1:
        _, node = heapq.heappop(frontier)
        kept.append(node)
        for c in children[node]:
            heapq.heappush(frontier, (-cum_all[c], c))
    kept.sort()  # drafting order is level by level, so this is BFS / topological
    remap = {old: new for new, old in enumerate(kept)}
    return DraftTree(
        [tokens[i] for i in kept],
        [-1] + [remap[parents[i]] for i in kept[1:]],
        [depths[i] for i in kept],
    )


# ----------------------------------------------------------------------------------------------
# sampling builders (read warped probabilities)


def build_chain_sampled(
    root: int,
    length: int,
    expand_probs: ExpandFn,
    generator: torch.Generator | None = None,
) -> DraftTree:
    """A chain whose every token is drawn from the draft's warped distribution at its parent.
    draft_probs: [length + 1, V], row i the distribution node i's child was drawn from, last row 0."""
    validate_chain(length)
    tokens = [root]
    rows: list[Tensor] = []
    for _ in range(length):
        tree = DraftTree.chain(root, tokens[1:])
        probs = _check_rows(expand_probs(tree, [len(tokens) - 1]), [0], "probs")  # [1, V]
        rows.append(probs[0])
        tokens.append(int(sample_tokens(probs, 1, generator).item()))
    draft_probs = torch.stack(rows + [torch.zeros_like(rows[0])])  # [N, V]
    return DraftTree([root, *tokens[1:]], [-1, *range(length)], list(range(length + 1)), draft_probs, True)


def build_tree_sampled(
    root: int,
    widths: Sequence[int],
    expand_probs: ExpandFn,
    generator: torch.Generator | None = None,
) -> DraftTree:
    """SpecInfer-style sampled tree: every node of depth d gets widths[d] children drawn i.i.d.
    (with replacement, duplicates kept as separate nodes) from its warped draft distribution.
    N = 1 + w0 + w0*w1 + ...; children of a node are contiguous, in draw order; expand_probs is
    called once per level except the last. draft_probs: [N, V], leaf rows 0."""
    validate_sampled_tree(widths)
    tokens, parents, depths = [root], [-1], [0]
    rows: list[Tensor] = []  # [n_level, V] per expanded level
    level = [0]
    for d, width in enumerate(widths, start=1):
        tree = DraftTree(list(tokens), list(parents), list(depths))
        probs = _check_rows(expand_probs(tree, level), level, "probs")  # [n, V]
        rows.append(probs)
        draws = sample_tokens(probs, width, generator).tolist()  # [n, w]
        start = len(tokens)
        for parent, toks in zip(level, draws, strict=True):
            tokens.extend(toks)
            parents.extend([parent] * width)
            depths.extend([d] * width)
        level = list(range(start, len(tokens)))
    expanded = torch.cat(rows)  # [N - len(leaves), V]; BFS order, so exactly the non-leaf nodes
    leaves = torch.zeros(len(level), expanded.shape[1], dtype=expanded.dtype, device=expanded.device)
    return DraftTree(tokens, parents, depths, torch.cat([expanded, leaves]), True)
