"""A target shard: one tensor-parallel rank's engine, and the step plan that keeps the ranks in lock-step.

Every target rank builds a `ShardEngine` (an `LLMEngine` whose model is its `TPDecoderLM` shard, whose
KV cache holds its KV heads and whose page count all ranks agree on). Rank 0 is the leader: it runs the
scheduler, the speculative decoder and the sampler, and its `PlanRunner` broadcasts, before each
forward, a small host-side plan over `tp_cpu_group`:

    ("eager",  (host inputs, decode_only, sample_rows), moves)   prefill / decode, eager
    ("replay", (host inputs but the tables, table delta), moves) decode through the CUDA graph
    ("eager_ahead" / "replay_ahead", same args, moves)           a decode step launched before the leader
                                                                 read the last one's tokens: its input ids
                                                                 are the argmax of the last decode logits
    ("tokens", (forward_tokens kwargs,), moves)                  eager tree verification (tree masks on host)
    ("verify", (N, sizes, capture layer, size, staged), moves)   tree verification through the CUDA graph
    ("scores", (items, chunk_size), moves)                       retrieval chunk scores
    ("longspec", (op, ...), moves)                               a sharded LongSpec draft step (longspec_tp)
    ("stop",   (), moves)

`moves` are the accepted-path K/V moves (`commit_kv`) the leader made since its last plan; a follower
applies them first, so its cache matches the leader's before the next forward reads it. Followers run
`follow()`: receive a plan, run the same forward on their shard (the collectives inside pair up with
the leader's), drop the outputs. No Ray call happens per step.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
import torch.distributed as dist

from specray.actors import world as W
from specray.config import EngineConfig, SpeculativeConfig
from specray.engine.attention import TreeAttention, gather_kv
from specray.engine.kv_cache import KVCacheSpec
from specray.engine.llm_engine import LLMEngine
from specray.engine.model_runner import HostInputs, ModelRunner
from specray.engine.sampler import first_argmax
from specray.errors import ConfigError
from specray.models.checkpoint import Checkpoint
from specray.models.decoder import DecoderLM
from specray.models.tensor_parallel import TPContext, TPDecoderLM
from specray.models.tp_comm import TPAllReduce

# chunk-score request of one sequence: (page table, number of keys, row of the captured query)
ScoreItem = tuple[list[int], int, int]


def check_distributed_config(config: EngineConfig) -> None:
    """ConfigError for speculation setups the distributed engine does not run."""
    spec = config.speculative_config
    if spec is None or spec.method == "none":
        return
    if spec.draft_placement == "separate" and spec.method != "draft_model":
        raise ConfigError(
            f"speculative_config.draft_placement 'separate' runs a 'draft_model' proposer; got method {spec.method!r}"
        )
    if spec.draft_tensor_parallel_size != 1:
        raise ConfigError(
            f"speculative_config.draft_tensor_parallel_size must be 1 (got {spec.draft_tensor_parallel_size}): "
            "a separate draft runs on one device"
        )
    if config.tensor_parallel_size > 1 and spec.method == "sparse_self":
        raise ConfigError(
            f"speculative_config.method {spec.method!r} selects pages over all KV heads and is not sharded yet; "
            f"with tensor_parallel_size {config.tensor_parallel_size} use 'draft_model', 'longspec' or 'ngram'"
        )


class PlanRunner(ModelRunner):
    """The leader's runner: announces every forward to the follower shards before running it."""

    def __init__(self, world: W.World, *args: Any, **kwargs: Any):
        self.world = world
        self.pending_moves: list[tuple[list[int], int, list[int]]] = []
        self.timings = {"plan_s": 0.0, "num_plans": 0}
        super().__init__(*args, **kwargs)

    def _announce(self, op: str, *args: Any) -> None:
        if self.world.layout.tp_size == 1:
            self.pending_moves.clear()
            return
        t0 = time.perf_counter()
        self.world.plan.write((op, args, self.pending_moves))
        self.pending_moves = []
        self.timings["plan_s"] += time.perf_counter() - t0
        self.timings["num_plans"] += 1

    def run_eager(self, inputs: HostInputs, decode_only: bool, sample_rows: list[int] | None,
                  ids_dev: torch.Tensor | None = None) -> torch.Tensor:
        # ids on the device (a step launched ahead): every rank takes the argmax of its own last logits
        self._announce("eager" if ids_dev is None else "eager_ahead", inputs, decode_only, sample_rows)
        return super().run_eager(inputs, decode_only, sample_rows, ids_dev)

    def replay(self, inputs: HostInputs, ids_dev: torch.Tensor | None = None) -> torch.Tensor:
        # the page tables travel as a delta against the graphs' table, which every rank mirrors
        delta = self.table_delta(inputs)
        self._announce("replay" if ids_dev is None else "replay_ahead", inputs[:5], delta)
        return self.replay_delta(inputs[:5], delta, ids_dev)

    def forward_tokens(self, pages, tokens, positions, cache_positions, seq_lens, trees=None, logits_rows=None,
                       capture_layer=None) -> torch.Tensor:
        host_trees = None
        if trees is not None:
            # numpy: pickles several times faster than torch tensors
            host_trees = [None if t is None else (t.mask.cpu().numpy(), t.key_positions.cpu().numpy()) for t in trees]
        self._announce("tokens", dict(pages=pages, tokens=tokens, positions=positions, cache_positions=cache_positions,
                                      seq_lens=seq_lens, trees=host_trees, logits_rows=logits_rows,
                                      capture_layer=capture_layer))
        return super().forward_tokens(pages, tokens, positions, cache_positions, seq_lens, trees, logits_rows,
                                      capture_layer)

    def commit_kv(self, pages: list[int], prefix_len: int, path: list[int]) -> None:
        super().commit_kv(pages, prefix_len, path)
        if self.world.layout.tp_size > 1 and any(i != d for d, i in enumerate(path)):
            self.pending_moves.append((list(pages), prefix_len, list(path)))

    def stop_followers(self) -> None:
        self._announce("stop")


@torch.inference_mode()
def chunk_scores(engine: ShardEngine, items: list[ScoreItem], chunk_size: int,
                 queries: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Cross-model Retrieval scores for each item: the target's last-layer attention probabilities of
    the captured query row over the sequence's keys, averaged over all heads (each rank sums its own
    heads; one all-reduce adds the ranks), then averaged per `chunk_size`-token chunk. The leader may
    pass the rows' queries (`[Hq/tp, D]` each, as the speculative decoder extracted them: with TP = 1
    verification may replay a CUDA graph whose rows are padded). Returns [n // chunk_size] fp32 CPU
    tensors."""
    if isinstance(engine.runner, PlanRunner):
        engine.runner._announce("scores", items, chunk_size)
    if not items:
        return []
    dev = engine.device
    layer = engine.arch.num_layers - 1
    q_all = getattr(engine.backend, "captured_q", None)  # [rows, Hq/tp, D] of the last verification forward
    sums = []
    for i, (pages, n, row) in enumerate(items):
        k, _ = gather_kv(engine.cache, layer, torch.tensor(pages, device=dev), n)  # [n, Hkv/tp, D]
        q = (q_all[row] if queries is None else queries[i]).float()  # [Hq/tp, D]
        k = k.float().repeat_interleave(q.shape[0] // k.shape[1], dim=1)  # [n, Hq/tp, D]
        scores = torch.einsum("hd,nhd->hn", q, k) * engine.arch.head_dim**-0.5
        sums.append(torch.softmax(scores, dim=-1).sum(dim=0))  # [n]
    flat = torch.cat(sums)
    if engine.world.layout.tp_size > 1:
        dist.all_reduce(flat, group=engine.world.tp_group)
    probs = flat / engine.arch.num_heads
    out, offset = [], 0
    for _, n, _ in items:
        p = probs[offset : offset + n]
        offset += n
        m = n // chunk_size
        out.append(p[: m * chunk_size].view(m, chunk_size).mean(dim=1).cpu())
    return out


class ShardEngine(LLMEngine):
    """One target rank. Rank 0 (leader) is a full engine; followers only hold the model shard, the
    KV-cache shard and a plain runner, and execute the leader's plans."""

    def __init__(self, config: EngineConfig, world: W.World, checkpoint: Checkpoint | None = None):
        self.world = world
        self.graph_serial = 0  # the leader's count of verification graph sets it has made
        cfg = config
        if world.rank != 0:
            cfg = dataclasses.replace(cfg, speculative_config=None, skip_tokenizer_init=True, overlap=False)
        super().__init__(cfg, checkpoint)
        self.mirror = None  # a follower's copy of a sharded draft (LongSpec) that runs in the leader's plans
        self.follower_graphs: tuple[int, Any] | None = None  # a follower's (serial, VerifyGraphs) of the leader
        spec = config.speculative_config
        if world.rank != 0 and spec is not None and spec.method == "longspec" and world.layout.tp_size > 1:
            from specray.actors.longspec_tp import ShardedLongSpecProposer

            self.mirror = ShardedLongSpecProposer(self, spec, window=spec.window)

    @property
    def is_leader(self) -> bool:
        return self.world.rank == 0

    def _build_model(self, ckpt: Checkpoint) -> DecoderLM:
        tp = self.world.layout.tp_size
        if tp == 1:
            return super()._build_model(ckpt)
        reduce = TPAllReduce(self.world.tp_group, dtype=self.dtype, device=self.device,
                             symmetric_memory=not self.config.disable_custom_all_reduce,
                             fuse_norm=self.config.fused_ops and self.config.fuse_allreduce_rmsnorm,
                             push=self.config.tp_fused_sum == "push", cpu_group=self.world.tp_cpu_group)
        ctx = TPContext(rank=self.world.rank, size=tp, group=self.world.tp_group, all_reduce=reduce)
        model = TPDecoderLM.empty_shard(self.arch, ctx, self.max_model_len + 1, self.dtype, self.device)
        model.load_shard(ckpt.weights)
        return model

    def _num_pages(self, spec: KVCacheSpec) -> int:
        n = super()._num_pages(spec)
        if self.world.layout.tp_size > 1:  # every shard must hand out the same page ids
            t = torch.tensor([n], dtype=torch.int64)
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.world.tp_cpu_group)
            n = int(t.item())
        return n

    def _build_runner(self, graph_sizes: tuple[int, ...]) -> ModelRunner:
        # every shard captures the same decode graphs, replayed together in lock-step ("replay" plans)
        args = (self.model, self.cache, self.backend, self.sampler, self.max_model_len, graph_sizes)
        return PlanRunner(self.world, *args) if self.is_leader else ModelRunner(*args)

    def _build_proposer(self, cfg: SpeculativeConfig):
        if cfg.method == "draft_model":
            from specray.actors.draft import ColocatedDraftProposer, RemoteDraftProposer

            cls = RemoteDraftProposer if cfg.draft_placement == "separate" else ColocatedDraftProposer
            return cls(self, cfg)
        if cfg.method == "longspec" and self.world.layout.tp_size > 1:
            from specray.actors.longspec_tp import ShardedLongSpecProposer

            return ShardedLongSpecProposer(self, cfg, window=cfg.window)
        return super()._build_proposer(cfg)

    def build_verify_graphs(self, num_nodes: int, capture_layer: int | None):
        """With TP > 1 the leader's verification graphs announce each replay (op "verify" with the staged
        inputs), and every follower replays its own copy of the graph, captured at the same step."""
        graphs = super().build_verify_graphs(num_nodes, capture_layer)
        if graphs is None or self.world.layout.tp_size == 1:
            return graphs
        self.graph_serial += 1
        serial, runner = self.graph_serial, self.runner  # the serial names this set of graphs to the followers

        def announce(size: int, rows: list[int]) -> None:
            runner._announce("verify", serial, graphs.n, graphs.sizes, graphs.capture_layer, size,
                             graphs.staged(size), rows)

        graphs.announce = announce
        return graphs

    def follow_verify(self, serial: int, num_nodes: int, sizes: tuple[int, ...], capture_layer: int | None,
                      size: int, staged: tuple, rows: list[int]) -> None:
        """A follower's half of a graphed verification: its copy of the leader's graph set `serial` (made on
        first use, replacing an older set), the leader's staged inputs, the replay (its collectives pair
        with the leader's; a size is captured on both sides at the same step). With a capture layer, the
        real rows' queries become `backend.captured_q`, packed as the leader's, for the next chunk scores."""
        from specray.spec.verify_graph import VerifyGraphs

        if self.follower_graphs is None or self.follower_graphs[0] != serial:
            self.follower_graphs = None  # free the old set's graphs before capturing new ones
            self.follower_graphs = (serial, VerifyGraphs(self, num_nodes, tuple(sizes), capture_layer))
        graphs = self.follower_graphs[1]
        graphs.load_staged(size, staged)
        graphs.launch(size)
        if capture_layer is not None:
            index = torch.tensor(rows, dtype=torch.int64, device=self.device)
            self.backend.captured_q = graphs.q_out[size][index]  # [real rows, Hq/tp, D]

    def stop_followers(self) -> None:
        if isinstance(self.runner, PlanRunner):
            self.runner.stop_followers()


@torch.inference_mode()
def follow(engine: ShardEngine) -> None:
    """A follower's loop: execute the leader's plans until "stop"."""
    runner, plan = engine.runner, engine.world.plan
    last = None  # logits [bs, V] of the plan before, if it was a decode step: "_ahead" plans take their argmax
    while True:
        op, args, moves = plan.read()
        for pages, prefix_len, path in moves:
            runner.commit_kv(pages, prefix_len, path)
        if op == "stop":
            return
        if op.endswith("_ahead"):  # the logits are all-gathered: every rank's argmax is the leader's
            if last is None or last.shape[0] != len(args[0][4]):
                raise RuntimeError(f"step plan {op!r} does not follow a decode step of its batch")
            ids = first_argmax(last)
            last = (runner.run_eager(*args, ids) if op == "eager_ahead" else runner.replay_delta(*args, ids))
            continue
        last = None
        if op == "eager":
            out = runner.run_eager(*args)
            last = out if args[1] else None  # decode_only: one row per sequence
        elif op == "replay":
            last = runner.replay_delta(*args)
        elif op == "tokens":
            kw = dict(args[0])
            if kw["trees"] is not None:
                dev = engine.device
                kw["trees"] = [None if t is None else TreeAttention(torch.from_numpy(t[0]).to(dev),
                                                                     torch.from_numpy(t[1]).to(dev))
                               for t in kw["trees"]]
            runner.forward_tokens(**kw)
        elif op == "verify":
            engine.follow_verify(*args)
        elif op == "scores":
            chunk_scores(engine, *args)
        elif op == "longspec":
            engine.mirror.apply(*args)
        else:
            raise RuntimeError(f"unknown step plan {op!r}")
