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
    round has probability sum(max(p - q, 0)), the residual's mass; when that mass is (numerically)
    zero, p == q and the round accepts with certainty, so it is treated as an acceptance (a
    rejection there is only rounding noise, and normalising the noise would be wrong).
  * deterministic candidates: accepting child x with probability p[x], else zeroing p[x] and
    renormalising, child after child, then drawing the bonus from what is left, yields each child's
    token with probability p[x] and any other token y with probability p[y]. That is the same law as
    drawing y ~ p once and moving to the first child whose token is y (stopping with bonus y if
    none), which is what is done: one draw per node.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from specray.spec.types import AcceptResult, DraftTree

_TINY = 1e-30  # floor for exponential noise
_ZERO_MASS = 1e-6  # a residual lighter than this is rounding noise: the round accepts (see docstring)


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
    return _walk(tree, target_logits.argmax(dim=-1).tolist())


def _draw(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One token per row of non-negative (not necessarily normalised) probs [R, V] -> [R] int64,
    by the exponential race argmax(p / E), E ~ Exp(1)."""
    noise = torch.empty(probs.shape, dtype=torch.float32, device=probs.device)
    noise.exponential_(generator=generator)
    return (probs / noise.clamp_(min=_TINY)).argmax(dim=-1)


def verify_sampling(
    tree: DraftTree,
    target_probs: Tensor,
    generator: torch.Generator | None = None,
) -> AcceptResult:
    """Lossless rejection-sampling verification (see the module docstring).

    target_probs: [N, V] warped target distributions (rows sum to 1), row i conditioned on the path
    to node i. tree.draft_probs ([N, V]) is required when tree.sampled_children. All randomness comes
    from `generator` (None: torch's default), which must live on target_probs' device."""
    _check(tree, target_probs, "target_probs")
    p = target_probs.float()  # [N, V]
    if not tree.sampled_children:
        return _walk(tree, _draw(p, generator).tolist())

    if tree.draft_probs is None:
        raise ValueError("tree.sampled_children is set but tree.draft_probs is None")
    if tree.draft_probs.shape != p.shape:
        raise ValueError(f"draft_probs has shape {tuple(tree.draft_probs.shape)}, expected {tuple(p.shape)}")
    children = tree.children()
    num_kids = [len(c) for c in children]
    max_kids = max(num_kids)
    if max_kids == 0:  # a lone root: the bonus is a plain draw from the target
        return AcceptResult(path=[0], bonus=int(_draw(p[:1], generator).item()))
    device = p.device
    num = tree.num_nodes
    kid_tok = torch.tensor(
        [[tree.tokens[c] for c in kids] + [0] * (max_kids - len(kids)) for kids in children], device=device
    )  # [N, K] child tokens, padded
    q = tree.draft_probs.to(device=device, dtype=torch.float32)  # [N, V]; leaf rows 0
    q = q / q.sum(dim=-1, keepdim=True).clamp_(min=_TINY)

    # Residual after j rejections at a node: r_j = max(p - c_j q, 0) / m_j (p's own scale, no need to
    # normalise it), with c_0 = 0, m_0 = sum(p), c_{j+1} = c_j + m_j: on the support of r_j,
    # r_j - q = (p - (c_j + m_j) q) / m_j, and off it both sides are <= 0. Only the masses need the
    # vocabulary, so each round is one [N, V] pass; the rest works on the children's entries.
    c = torch.zeros(num, 1, device=device)  # [N, 1]
    m = p.sum(dim=-1, keepdim=True)  # [N, 1]
    c_hist, m_hist, degenerate = [c], [m], []
    for _ in range(max_kids):
        c_next = c + m
        m_next = (p - c_next * q).clamp_(min=0.0).sum(dim=-1, keepdim=True)  # [N, 1]
        # Rejection probability of this round = m_next / m; ~0 means p == q and the round accepts.
        deg = m_next <= _ZERO_MASS * m  # [N, 1]
        degenerate.append(deg)
        c = torch.where(deg, c, c_next)  # a (measure-zero) rejection there leaves the residual as is
        m = torch.where(deg, m, m_next)
        c_hist.append(c)
        m_hist.append(m)
    cs = torch.cat(c_hist, dim=1)  # [N, K + 1]
    ms = torch.cat(m_hist, dim=1)  # [N, K + 1]
    # Child j is tested against r_j: accept with min(1, r_j[x] / q[x]). A token q gives no mass to
    # (not drawable from q) gets ratio inf if the residual allows it, 0 otherwise.
    q_x = q.gather(1, kid_tok)  # [N, K]
    r_x = (p.gather(1, kid_tok) - cs[:, :-1] * q_x).clamp_(min=0.0)  # [N, K] unnormalised r_j[x]
    ratio = (r_x / (ms[:, :-1] * q_x).clamp_(min=_TINY)).clamp_(max=1.0)  # [N, K]
    accept_prob = torch.where(torch.cat(degenerate, dim=1) & (r_x > 0), 1.0, ratio)  # [N, K]
    # Bonus distribution at a node whose children were all rejected (leaves: c = 0, i.e. p).
    c_final = cs.gather(1, torch.tensor(num_kids, device=device).unsqueeze(1))  # [N, 1]
    final = (p - c_final * q).clamp_(min=0.0)  # [N, V] unnormalised

    uniforms = torch.rand(num, max_kids, device=device, generator=generator)  # [N, K]
    accepted = (uniforms < accept_prob).tolist()  # [N][K]
    bonus = _draw(final, generator).tolist()  # [N]

    path = [0]
    node = 0
    while children[node]:
        acc = accepted[node]
        nxt = next((c for j, c in enumerate(children[node]) if acc[j]), None)
        if nxt is None:
            break
        path.append(nxt)
        node = nxt
    return AcceptResult(path=path, bonus=bonus[node])


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
        argmax = torch.cat([parts[i].argmax(dim=-1) for i in greedy_ids]).tolist()
        offset = 0
        for i in greedy_ids:
            n = trees[i].num_nodes
            results[i] = _walk(trees[i], argmax[offset : offset + n])
            offset += n
    for i in range(num):
        if not flags[i]:
            results[i] = verify_sampling(trees[i], parts[i], gens[i])
    return [r for r in results if r is not None]
