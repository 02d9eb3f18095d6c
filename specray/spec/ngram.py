"""Prompt-lookup (n-gram) proposer: the cheap, model-free baseline (vLLM's `ngram` method).

Owns no per-request state: each step it finds the most recent earlier occurrence of the sequence's
last n tokens (n from `prompt_lookup_max` down to `prompt_lookup_min`) and proposes the tokens that
followed it as a chain of up to the configured length.
"""

from __future__ import annotations

import torch

from specray.config import SpeculativeConfig
from specray.engine.sequence import Sequence
from specray.spec.types import AcceptResult, DraftTree


def lookup(tokens: list[int], n_min: int, n_max: int, k: int) -> list[int]:
    """The (up to) k tokens that followed the latest earlier match of the last n tokens."""
    size = len(tokens)
    for n in range(min(n_max, size - 1), n_min - 1, -1):
        tail = tokens[size - n :]
        for start in range(size - n - 1, -1, -1):
            if tokens[start : start + n] == tail:
                follow = tokens[start + n : start + n + k]
                if follow:
                    return follow
    return []


class NgramProposer:
    def __init__(self, cfg: SpeculativeConfig):
        self.cfg = cfg
        self.length = cfg.tree.max_depth  # a chain as deep as the configured tree

    def propose(self, seqs: list[Sequence]) -> list[DraftTree]:
        out = []
        for seq in seqs:
            tokens = seq.prompt_ids + seq.output_ids
            follow = lookup(tokens, self.cfg.prompt_lookup_min, self.cfg.prompt_lookup_max, self.length)
            out.append(DraftTree.chain(tokens[-1], follow))
        return out

    def commit(
        self, seqs: list[Sequence], trees: list[DraftTree], results: list[AcceptResult],
        target_q: list[torch.Tensor] | None = None,
    ) -> None:
        pass

    def release(self, request_id: str) -> None:
        pass
