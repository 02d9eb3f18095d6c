"""The step-plan protocol without Ray: two processes in a gloo world run `ShardEngine`s (rank 0 leads, rank 1
follows its plans) with a colocated `draft_model` proposer whose Cross-model Retrieval scores are summed
over both shards, or with the LongSpec draft layer sharded like the target; greedy output equals the
in-process single-rank engine with the same config, and so do the drafts (same acceptance counts)."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from specray.config import (
    CacheConfig,
    EngineConfig,
    RetrievalConfig,
    SchedulerConfig,
    SpeculativeConfig,
    TreeConfig,
)
from specray.engine.llm_engine import LLMEngine
from specray.engine.sampling_params import SamplingParams
from tests.support.tiny import make_checkpoint, perturbed_copy

PARAMS = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


def _config(target, draft) -> EngineConfig:
    if draft is None:  # LongSpec: a deterministic random draft layer attached to the target
        spec = SpeculativeConfig(method="longspec", tree=TreeConfig(kind="beam", shape=(2, 4, 4)), window=16)
    else:
        spec = SpeculativeConfig(method="draft_model", model=str(draft), tree=TreeConfig(kind="beam", shape=(2, 4, 4)),
                                 retrieval=RetrievalConfig(chunk_size=8, top_k_chunks=3, refresh_every=2))
    return EngineConfig(
        model=str(target), device="cpu", dtype="float32", skip_tokenizer_init=True,
        cache=CacheConfig(page_size=8, num_pages=48),
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=200),
        speculative_config=spec,
    )


def _record_trees(engine) -> list[list[list[int]]]:
    """The node tokens of every tree the engine's proposer returns, step by step."""
    log: list[list[list[int]]] = []
    propose = engine.spec.proposer.propose

    def recording(seqs):
        trees = propose(seqs)
        log.append([t.tokens for t in trees])
        return trees

    engine.spec.proposer.propose = recording
    return log


def _rank(rank: int, config: EngineConfig, rendezvous: str, prompts, out: str) -> None:
    from specray.actors.shard import ShardEngine, follow
    from specray.actors.world import Layout, init_world

    torch.set_num_threads(1)
    world = init_world(rank, Layout(2, False, "gloo"), "", 0, torch.device("cpu"), init_method=rendezvous)
    engine = ShardEngine(config, world)
    if rank == 1:
        follow(engine)
        _leave()
    trees = _record_trees(engine)
    outs = engine.generate(prompts, PARAMS)
    stats = {"plans": engine.runner.timings["num_plans"], "drafts": engine.spec.stats.num_drafts,
             "refreshes": getattr(engine.spec.proposer, "num_refreshes", None),
             "accepted": engine.spec.stats.num_accepted_tokens, "pages": engine.pages_in_use(), "trees": trees}
    engine.stop_followers()
    torch.save({"tokens": [o.token_ids for o in outs], **stats}, out)
    _leave()


def _leave() -> None:
    """Both ranks meet, destroy the gloo group and exit at once: under load, a gloo worker's interpreter
    teardown has SIGABRT'ed after its results were saved (the same guard as test_tensor_parallel)."""
    import os

    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


@pytest.mark.parametrize("method", ["draft_model", "longspec"])
def test_tp2_colocated_draft_follows_plans(tmp_path, method):
    family = "qwen2" if method == "draft_model" else "llama"
    target = make_checkpoint(tmp_path / "t", family, vocab_size=128, tokenizer=False)
    draft = perturbed_copy(target, tmp_path / "d", scale=0.1, num_hidden_layers=1) if method == "draft_model" else None
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (60, 41)]
    config = _config(target, draft)
    single = LLMEngine(config)
    single_trees = _record_trees(single)
    reference = [o.token_ids for o in single.generate(prompts, PARAMS)]
    out = tmp_path / "tp.pt"
    mp.spawn(_rank, args=(config, f"file://{tmp_path}/rendezvous", prompts, str(out)), nprocs=2, join=True)
    got = torch.load(out)
    assert got["tokens"] == reference
    assert got["plans"] > 0 and got["pages"] == 0
    # the sharded draft proposed exactly the single-rank draft's trees
    assert got["trees"] == single_trees and len(single_trees) > 0
    assert (got["drafts"], got["accepted"]) == (single.spec.stats.num_drafts, single.spec.stats.num_accepted_tokens)
    if method == "draft_model":
        assert got["refreshes"] > 0 and got["accepted"] > 0
