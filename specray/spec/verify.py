"""Tree verification: given a `DraftTree` and the target's outputs at its nodes, pick the accepted path
and the bonus token (an `AcceptResult`).

Owns no state. `verify_greedy` follows the target's argmax down the tree. `verify_sampling` is
lossless multi-candidate rejection sampling: the emitted tokens are distributed exactly as if the
target had sampled them one by one from its (warped) distributions.

Both are vectorised over the tree's nodes: every random number any node could need is drawn up
front (independently per node, so the draws off the accepted path change nothing), the per-node
work is done as [N, ...] tensor ops, and the walk down the tree runs on the host after one transfer.

Sampling, at the current node u with target distribution p = target_probs[u]:
  * sampled children (tree.sampled_children, children i.i.d. from q = tree.draft_probs[u]): for each
    child x in order, accept with probability min(1, p[x] / q[x]); on rejection p <- norm(max(p - q, 0)).
    Each round is one step of standard speculative sampling against the current residual with a
    fresh independent draw from q, so by induction the node's outcome (accepted child's token, or
    the bonus drawn from the final residual) is distributed as p. The residual sequence does not
    depend on which tokens were rejected, so it is computed for all nodes at once. Rejection in a
    round has probability sum(max(p - q, 0)), the residual's mass. When that mass is (numerically)
    zero, p == q and the round accepts bar rounding; a rejection there is rounding noise, and
    normalising the noise would give a meaningless distribution, so the residual is left as it was
    (p itself is the exact distribution in that case). The bias is at most the cut-off, 1e-6.
  * deterministic candidates: accepting child x with probability p[x], else zeroing p[x] and
    renormalising, child after child, then drawing the bonus from what is left, yields each child's
    token with probability p[x] and any other token y with probability p[y]. That is the same law as
    drawing y ~ p once and moving to the first child whose token is y (stopping with bonus y if
    none), which is what is done: one draw per node.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from specray.engine.sampler import first_argmax
from specray.spec.trees import sample_tokens
from specray.spec.types import AcceptResult, DraftTree

_ZERO_MASS = 1e-6  # a residual lighter than this is rounding noise: the round accepts (see docstring)
_ZERO_MASS_T = torch.tensor(_ZERO_MASS)  # 0-dim CPU tensor: a scalar operand on any device, no re-wrapping


def _check(tree: DraftTree, target: Tensor, what: str) -> None:
    if target.dim() != 2 or target.shape[0] != tree.num_nodes:
        raise ValueError(f"{what} has shape {tuple(target.shape)}, expected [{tree.num_nodes}, V]")


def _walk(tree: DraftTree, choice: list[int]) -> AcceptResult:
    """Follow `choice[u]` (the token the target picks at node u) down the tree from the root."""
    children = tree.children()
    path = [0]
    node = 0
    while True:
        tok = choice[node]
        nxt = next((c for c in children[node] if tree.tokens[c] == tok), None)
        if nxt is None:
            return AcceptResult(path=path, bonus=tok)
        path.append(nxt)
        node = nxt


def verify_greedy(tree: DraftTree, target_logits: Tensor) -> AcceptResult:
    """Greedy verification. target_logits: [N, V] (logits or probs; only the argmax matters, ties to
    the lowest id). Moves from the root to the first child carrying the target's argmax while one
    exists; the bonus is the argmax at the last accepted node."""
    _check(tree, target_logits, "target_logits")
    return _walk(tree, first_argmax(target_logits).tolist())


def verify_sampling(
    tree: DraftTree,
    target_probs: Tensor,
    generator: torch.Generator | None = None,
) -> AcceptResult:
    """Lossless rejection-sampling verification (see the module docstring).

    target_probs: [N, V] warped target distributions (rows sum to 1), row i conditioned on the path
    to node i. When tree.sampled_children, tree.draft_probs ([N, V]) is required, its rows of nodes
    with children summing to 1 (as `warp_logits` gives; they are not renormalised here). All
    randomness comes from `generator` (None: torch's default), which must live on target_probs'
    device."""
    _check(tree, target_probs, "target_probs")
    p = target_probs.float()  # [N, V]
    if not tree.sampled_children:
        return _walk(tree, sample_tokens(p, 1, generator).view(-1).tolist())

    if tree.draft_probs is None:
        raise ValueError("tree.sampled_children is set but tree.draft_probs is None")
    if tree.draft_probs.shape != p.shape:
        raise ValueError(f"draft_probs has shape {tuple(tree.draft_probs.shape)}, expected {tuple(p.shape)}")
    children = tree.children()
    num_kids = [len(c) for c in children]
    max_kids = max(num_kids)
    if max_kids == 0:  # a lone root: the bonus is a plain draw from the target
        return AcceptResult(path=[0], bonus=int(sample_tokens(p[:1], 1, generator).item()))
    device = p.device
    num = tree.num_nodes
    # Host-built per-node index data (numpy builds it several times faster than torch.tensor from
    # lists): child tokens, padded with 0, and the child count.
    kid_np = np.zeros((num, max_kids), dtype=np.int64)  # [N, K]
    for u, kids in enumerate(children):
        kid_np[u, : len(kids)] = [tree.tokens[c] for c in kids]
    kid_tok = torch.from_numpy(kid_np).to(device)  # [N, K]
    kid_count = torch.from_numpy(np.asarray(num_kids, dtype=np.int64).reshape(num, 1)).to(device)  # [N, 1]
    q = tree.draft_probs.to(device=device, dtype=torch.float32)  # [N, V]; rows sum to 1 (leaves: 0)

    # Residual after j rejections at a node: r_j = max(p - c_j q, 0) / m_j (p's own scale, no need to
    # normalise it), with c_0 = 0, m_0 = sum(p), c_{j+1} = c_j + m_j: on the support of r_j,
    # r_j - q = (p - (c_j + m_j) q) / m_j, and off it both sides are <= 0. Only the masses need the
    # vocabulary, so each round is one [N, V] pass; the rest works on the children's entries.
    m = p.sum(dim=-1, keepdim=True)  # [N, 1]
    c = torch.zeros_like(m)  # [N, 1]
    c_hist, m_hist = [c], [m]
    for _ in range(max_kids - 1):
        c_next = c + m
        m_next = torch.addcmul(p, c_next, q, value=-1.0).relu_().sum(dim=-1, keepdim=True)  # [N, 1]
        # The round's rejection probability is m_next / m. If that is ~0, p == q up to rounding: the
        # round accepts bar rounding noise, and a (measure-zero) rejection there keeps the residual
        # as it is rather than normalising noise (bias at most _ZERO_MASS).
        keep = m_next.le(m * _ZERO_MASS_T)  # [N, 1]
        c = torch.where(keep, c, c_next)
        m = torch.where(keep, m, m_next)
        c_hist.append(c)
        m_hist.append(m)
    c_next = c + m  # after the last round only c is needed (for the bonus)
    m_next = torch.addcmul(p, c_next, q, value=-1.0).relu_().sum(dim=-1, keepdim=True)
    c_hist.append(torch.where(m_next.le(m * _ZERO_MASS_T), c, c_next))
    cs = torch.cat(c_hist, dim=1)  # [N, K + 1]
    ms = torch.cat(m_hist, dim=1)  # [N, K]
    # Child j is tested against r_j: accept iff u < r_j[x] / q[x] (u < 1, so no min(1, .) needed;
    # m_j > 0 always). A token q gives no mass to (so not a draw from q) gets r / 0 = inf (accept) if
    # r_j allows it, else 0 / 0 = NaN, and u < NaN is False (reject).
    q_x = q.gather(1, kid_tok)  # [N, K]
    r_x = torch.addcmul(p.gather(1, kid_tok), cs[:, :-1], q_x, value=-1.0).relu_()  # [N, K] unnormalised
    ratio = r_x / (ms * q_x)  # [N, K]
    # Bonus distribution at a node whose children were all rejected (leaves: c = 0, i.e. p).
    final = torch.addcmul(p, cs.gather(1, kid_count), q, value=-1.0).relu_()  # [N, V] unnormalised

    uniforms = torch.rand(num, max_kids, device=device, generator=generator)  # [N, K]
    bonus = sample_tokens(final, 1, generator)  # [N, 1]
    host = torch.cat([uniforms.lt(ratio), bonus], dim=1).tolist()  # [N][K + 1] one transfer: accepts, bonus

    path = [0]
    node = 0
    while children[node]:
        acc = host[node]
        nxt = next((c for j, c in enumerate(children[node]) if acc[j]), None)
        if nxt is None:
            break
        path.append(nxt)
        node = nxt
    return AcceptResult(path=path, bonus=host[node][max_kids])


def verify_batch(
    trees: Sequence[DraftTree],
    targets: Tensor | Sequence[Tensor],
    greedy: bool | Sequence[bool],
    generators: Sequence[torch.Generator | None] | None = None,
) -> list[AcceptResult]:
    """Verify several sequences' trees. targets: one [N_i, V] tensor per tree, or all of them packed
    as [sum N_i, V] in tree order; greedy trees read it as logits (argmax), sampling trees as warped
    probs. greedy: one flag for all or one per tree; generators: one per tree (None: default RNG).
    The greedy trees share one argmax and one host transfer."""
    num = len(trees)
    flags = [greedy] * num if isinstance(greedy, bool) else list(greedy)
    gens = list(generators) if generators is not None else [None] * num
    if len(flags) != num or len(gens) != num:
        raise ValueError(f"{num} trees, {len(flags)} greedy flags, {len(gens)} generators")
    if isinstance(targets, Tensor):
        sizes = [t.num_nodes for t in trees]
        if targets.dim() != 2 or targets.shape[0] != sum(sizes):
            raise ValueError(f"packed targets have shape {tuple(targets.shape)}, expected [{sum(sizes)}, V]")
        parts: Sequence[Tensor] = torch.split(targets, sizes)
    else:
        parts = targets
        if len(parts) != num:
            raise ValueError(f"{num} trees but {len(parts)} target tensors")

    results: list[AcceptResult | None] = [None] * num
    greedy_ids = [i for i in range(num) if flags[i]]
    if greedy_ids:
        for i in greedy_ids:
            _check(trees[i], parts[i], f"targets[{i}]")
        argmax = torch.cat([first_argmax(parts[i]) for i in greedy_ids]).tolist()
        offset = 0
        for i in greedy_ids:
            n = trees[i].num_nodes
            results[i] = _walk(trees[i], argmax[offset : offset + n])
            offset += n
    for i in range(num):
        if not flags[i]:
            results[i] = verify_sampling(trees[i], parts[i], gens[i])
    return [r for r in results if r is not None]
