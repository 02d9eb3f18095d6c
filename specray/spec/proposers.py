"""The `Proposer` protocol, the factory that builds one from a `SpeculativeConfig`, and the shared
tree-drafting helper that turns a model's next-token distributions into a `DraftTree`.

A proposer owns its per-request drafting state (draft KV cache, retrieval selection, ...), keyed by
request id. The engine calls `propose` for a batch of decoding sequences, then `commit` with what
the target accepted, and `release` when a request ends.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

from specray.config import SpeculativeConfig, TreeConfig
from specray.engine.sampler import warp_logits
from specray.engine.sampling_params import SamplingParams
from specray.spec.types import AcceptResult, DraftTree

if TYPE_CHECKING:
    from specray.engine.llm_engine import LLMEngine
    from specray.engine.sequence import Sequence


class Proposer(Protocol):
    def propose(self, seqs: list[Sequence]) -> list[DraftTree]: ...

    def commit(
        self, seqs: list[Sequence], trees: list[DraftTree], results: list[AcceptResult],
        target_q: list[torch.Tensor] | None = None,
    ) -> None: ...

    def release(self, request_id: str) -> None: ...


# logits of the next token after each listed node of the partial tree: [len(nodes), V] fp32
LogitsFn = Callable[[DraftTree, list[int]], torch.Tensor]


def draft_tree(
    tree_cfg: TreeConfig, root: int, logits_fn: LogitsFn, params: SamplingParams, generator: torch.Generator | None
) -> DraftTree:
    """Build the configured tree from a draft model. Greedy requests get deterministic trees; sampled
    requests with a chain get children drawn from the warped draft distribution (verified with
    min(1, p/q)); sampled requests with beam/dynamic trees get deterministic candidates (verified as
    point masses), which is exact as well."""
    from specray.spec import trees

    def log_probs(tree: DraftTree, nodes: list[int]) -> torch.Tensor:
        return torch.log_softmax(logits_fn(tree, nodes).float(), dim=-1)

    if tree_cfg.kind == "chain" and not params.greedy:
        def probs(tree: DraftTree, nodes: list[int]) -> torch.Tensor:
            return warp_request(logits_fn(tree, nodes), params)

        return trees.build_chain_sampled(root, tree_cfg.length, probs, generator)
    if tree_cfg.kind == "chain":
        return trees.build_chain(root, tree_cfg.length, log_probs)
    if tree_cfg.kind == "beam":
        return trees.build_beam(root, tree_cfg.shape, log_probs)
    return trees.build_dynamic(root, tree_cfg.depth, tree_cfg.top_k, tree_cfg.budget, log_probs)


def warp_request(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[n, V] logits -> [n, V] probabilities under one request's temperature/top-k/top-p/min-p."""
    return warp_rows(logits, [params] * logits.shape[0])


def warp_rows(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """[R, V] logits -> [R, V] probabilities, row r warped with params[r] (one batched call)."""
    knobs = torch.tensor(
        [[p.temperature, float(p.effective_top_k), p.top_p, p.min_p] for p in params], dtype=torch.float32
    ).to(logits.device)  # [R, 4]
    return warp_logits(logits.float(), knobs[:, 0], knobs[:, 1].long(), knobs[:, 2], knobs[:, 3])


def build_proposer(engine: LLMEngine, cfg: SpeculativeConfig | None = None) -> Proposer | None:
    """The proposer for `cfg` (default: the engine's own speculative_config) attached to `engine`."""
    cfg = cfg if cfg is not None else engine.config.speculative_config
    if cfg is None or cfg.method == "none":
        return None
    if cfg.method == "ngram":
        from specray.spec.ngram import NgramProposer

        return NgramProposer(cfg)
    if cfg.method == "draft_model":
        from specray.spec.draft_model import DraftModelProposer

        return DraftModelProposer(engine, cfg)
    if cfg.method == "sparse_self":
        from specray.spec.sparse_self import SparseSelfProposer

        return SparseSelfProposer(engine, cfg)
    if cfg.method == "longspec":
        from specray.spec.longspec import LongSpecProposer

        return LongSpecProposer(engine, cfg, window=cfg.window)
    from specray.errors import ConfigError

    raise ConfigError(f"speculative_config.method {cfg.method!r} is not implemented yet")
