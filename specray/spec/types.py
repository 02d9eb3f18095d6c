"""Data passed between proposers, the verifier and the engine during one speculative step.

Terminology (vLLM's): a *draft* is one proposal for one sequence; *draft tokens* are its non-root
nodes; *accepted tokens* are the draft tokens the target kept; the *bonus* token is the one the
target samples after the last accepted node, so every step emits accepted + 1 tokens.

`DraftTree` owns one sequence's proposal. Node 0 is the root: the sequence's last committed token,
whose K/V the target has not computed yet, at position `L - 1` for a sequence of L tokens. Node i
sits at position `L - 1 + depths[i]`. Nodes are in topological order (`parents[i] < i`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DraftTree:
    tokens: list[int]  # [N] node tokens; tokens[0] = root
    parents: list[int]  # [N] parent node index; parents[0] = -1
    depths: list[int]  # [N] depth; depths[0] = 0
    # Sampling only. draft_probs[i] is the (warped) draft distribution the children of node i were
    # proposed from, [N, V] fp32. With sampled_children=True the children of node i are i.i.d. draws
    # from draft_probs[i] and are verified with min(1, p/q); otherwise children are deterministic
    # candidates, verified as point masses (accept x with probability p(x), else zero it and renormalise),
    # which is exact for any candidate set.
    draft_probs: torch.Tensor | None = None
    sampled_children: bool = False

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if not (len(self.parents) == len(self.depths) == n) or n < 1:
            raise ValueError(
                f"tree arrays disagree: {n} tokens, {len(self.parents)} parents, {len(self.depths)} depths"
            )
        if self.parents[0] != -1 or self.depths[0] != 0:
            raise ValueError("node 0 must be the root (parent -1, depth 0)")
        for i in range(1, n):
            p = self.parents[i]
            if not 0 <= p < i or self.depths[i] != self.depths[p] + 1:
                raise ValueError(f"node {i}: parent {p} / depth {self.depths[i]} is not a valid tree edge")

    @property
    def num_nodes(self) -> int:
        return len(self.tokens)

    @property
    def num_draft_tokens(self) -> int:
        return len(self.tokens) - 1

    @property
    def max_depth(self) -> int:
        return max(self.depths)

    def children(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in self.tokens]
        for i in range(1, len(self.tokens)):
            out[self.parents[i]].append(i)
        return out

    def ancestor_mask(self) -> torch.Tensor:
        """[N, N] bool: mask[i, j] is True iff node j is node i or one of its ancestors."""
        n = len(self.tokens)
        mask = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            mask[i, i] = True
            if i:
                mask[i] |= mask[self.parents[i]]
        return mask

    @classmethod
    def chain(cls, root: int, tokens: list[int]) -> DraftTree:
        n = len(tokens)
        return cls([root, *tokens], [-1, *range(n)], list(range(n + 1)))


@dataclass
class AcceptResult:
    path: list[int]  # accepted node indices, starting with the root (0)
    bonus: int  # token sampled by the target after the last accepted node

    @property
    def num_accepted(self) -> int:  # accepted draft tokens (the root is not a draft token)
        return len(self.path) - 1

    def new_tokens(self, tree: DraftTree) -> list[int]:
        return [tree.tokens[i] for i in self.path[1:]] + [self.bonus]


@dataclass
class SpecStats:
    """Per-request counters, vLLM's spec-decode names."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    def record(self, tree: DraftTree, result: AcceptResult) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += tree.num_draft_tokens
        self.num_accepted_tokens += result.num_accepted
        depth = tree.max_depth
        if len(self.accepted_per_pos) < depth:
            self.accepted_per_pos.extend([0] * (depth - len(self.accepted_per_pos)))
        for d in range(result.num_accepted):
            self.accepted_per_pos[d] += 1

    def as_dict(self) -> dict[str, float]:
        drafts = max(self.num_drafts, 1)
        return {
            "mean_acceptance_length": 1.0 + self.num_accepted_tokens / drafts if self.num_drafts else 1.0,
            "draft_acceptance_rate": self.num_accepted_tokens / max(self.num_draft_tokens, 1),
            "num_spec_steps": self.num_drafts,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
        }
