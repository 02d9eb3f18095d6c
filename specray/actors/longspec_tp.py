"""The LongSpec draft layer sharded with the target's tensor parallelism.

`ShardedLongSpecProposer` is `LongSpecProposer` with its `GlideDraftLayer` cut like the target (q/k/v,
cross q and gate/up column-parallel by head / column; both o_proj and down_proj row-parallel with an
all-reduce), its ring buffers and tree scratch holding this rank's KV heads only, and its
cross-attention reading this rank's shard of the target's last-layer KV cache. Embedding and LM head
are the target's vocabulary-parallel ones.

Every draft forward holds collectives, so all target ranks run it together: the leader builds the
trees (the builders see the all-gathered logits) and announces each draft operation in its step plan
(op "longspec"); followers apply it to their own mirror instance:

    ("catch_up", [(request id, P, start, tokens)])   ring catch-up to the committed length P
    ("drafter", request id, pages, n_keys)            gather the target's last-layer K/V for a tree build
    ("logits", tokens, parents, depths, nodes)        one builder callback on the current partial tree
    ("commit", [(request id, accepted tokens)])       push accepted tokens into the rings
    ("release", request id)
"""

from __future__ import annotations

from typing import Any

import torch

from specray.engine.attention import gather_kv
from specray.models.tensor_parallel import RowParallelLinear
from specray.models.tp_comm import TPAllReduce
from specray.spec.longspec import GlideDraftLayer, LongSpecProposer, _Drafter, _RingState
from specray.spec.proposers import draft_tree
from specray.spec.types import DraftTree


@torch.no_grad()
def shard_glide(full: GlideDraftLayer, local, rank: int, tp: int, reduce: TPAllReduce) -> GlideDraftLayer:
    """Rank `rank`'s slice of a full draft layer (`local`: the target's rank-local `ModelArch`)."""
    dev, dtype = full.input_layernorm.weight.device, full.input_layernorm.weight.dtype
    out = GlideDraftLayer(local, full.window).to(device=dev, dtype=dtype)
    qs, kvs, inter = local.q_size, local.kv_size, local.intermediate_size
    fq, fkv, finter = full.q_size, full.kv_size, full.mlp.intermediate

    def rows(t: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
        return torch.cat([t[a:b] for a, b in spans])

    qkv_rows = [(rank * qs, (rank + 1) * qs), (fq + rank * kvs, fq + (rank + 1) * kvs),
                (fq + fkv + rank * kvs, fq + fkv + (rank + 1) * kvs)]
    out.self_attn.qkv_proj.weight.copy_(rows(full.self_attn.qkv_proj.weight, qkv_rows))
    out.self_attn.qkv_proj.bias.copy_(rows(full.self_attn.qkv_proj.bias, qkv_rows))
    out.cross_attn.q_proj.weight.copy_(full.cross_attn.q_proj.weight[rank * qs : (rank + 1) * qs])
    out.cross_attn.q_proj.bias.copy_(full.cross_attn.q_proj.bias[rank * qs : (rank + 1) * qs])
    out.mlp.gate_up_proj.weight.copy_(rows(full.mlp.gate_up_proj.weight, [
        (rank * inter, (rank + 1) * inter), (finter + rank * inter, finter + (rank + 1) * inter)]))
    for name in ("input_layernorm", "post_self_attention_layernorm", "post_cross_attention_layernorm"):
        getattr(out, name).weight.copy_(getattr(full, name).weight)
    for owner, attr, src, width in ((out.self_attn, "o_proj", full.self_attn.o_proj.weight, qs),
                                    (out.cross_attn, "o_proj", full.cross_attn.o_proj.weight, qs),
                                    (out.mlp, "down_proj", full.mlp.down_proj.weight, inter)):
        lin = RowParallelLinear(width, src.shape[0], bias=False, device=dev, dtype=dtype)
        lin.weight.copy_(src[:, rank * width : (rank + 1) * width])
        lin.reduce = reduce
        setattr(owner, attr, lin)
    return out.eval()


class ShardedLongSpecProposer(LongSpecProposer):
    def __init__(self, engine, cfg, window: int | None = None):
        super().__init__(engine, cfg, window)  # builds (or loads) the full layer, then it is cut
        world = engine.world
        self.local = engine.model.arch
        self.layer = shard_glide(self.layer, self.local, world.rank, world.layout.tp_size,
                                 engine.model.reduce)
        cap = self.scratch_k.shape[0]
        shape = (cap, self.local.num_kv_heads, self.local.head_dim)
        self.scratch_k = torch.zeros(shape, dtype=self.dtype, device=self.device)  # [S, Hkv/tp, D]
        self.scratch_v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.leader = world.rank == 0
        self._drafter_now: _Drafter | None = None

    def _new_state(self) -> _RingState:
        shape = (self.window, self.local.num_kv_heads, self.local.head_dim)
        return _RingState(
            k=torch.zeros(shape, dtype=self.dtype, device=self.device),
            v=torch.zeros(shape, dtype=self.dtype, device=self.device),
            pos=torch.full((self.window,), -1, dtype=torch.int64, device=self.device),
        )

    def ring_bytes(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.window * self.local.num_kv_heads * self.local.head_dim * elem

    def _announce(self, *msg: Any) -> None:
        if self.leader:
            self.engine.runner._announce("longspec", *msg)

    # ---- operations shared by the leader and the followers ----------------------------------------
    def _apply_catch_up(self, items: list[tuple[str, int, int, list[int]]]) -> list[_RingState]:
        states, pending = [], []
        for rid, P, start, tokens in items:
            st = self.states.get(rid)
            if st is None or st.covered > P:
                st = self.states[rid] = self._new_state()
            if tokens:
                pending.append((st, tokens, start))
            st.covered = st.root_pos = P
            states.append(st)
        self._push(pending)
        self.peak_kv_bytes = max(self.peak_kv_bytes, self.kv_bytes())
        return states

    def _make_drafter(self, rid: str, pages: list[int], n_keys: int) -> _Drafter:
        eng = self.engine
        table = torch.tensor(pages, dtype=torch.int64, device=eng.device)
        k, v = gather_kv(eng.cache, self.last_layer, table, n_keys)  # [P, Hkv/tp, D]
        self._drafter_now = _Drafter(self, self.states[rid], k, v)
        return self._drafter_now

    def _apply_commit(self, items: list[tuple[str, list[int]]]) -> None:
        pending = []
        for rid, tokens in items:
            st = self.states[rid]
            pending.append((st, tokens, st.root_pos))
            st.covered = st.root_pos + len(tokens)
        self._push(pending)

    def apply(self, op: str, *args: Any) -> None:
        """A follower executes one announced draft operation."""
        with torch.inference_mode():
            if op == "catch_up":
                self._apply_catch_up(*args)
            elif op == "drafter":
                self._make_drafter(*args)
            elif op == "logits":
                tokens, parents, depths, nodes = args
                self._drafter_now.logits(DraftTree(tokens, parents, depths), nodes)
            elif op == "commit":
                self._apply_commit(*args)
            elif op == "release":
                self.states.pop(args[0], None)
            else:
                raise RuntimeError(f"unknown longspec plan {op!r}")

    # ---- the leader's Proposer protocol -----------------------------------------------------------
    @torch.inference_mode()
    def propose(self, seqs) -> list[DraftTree]:
        items = []
        for seq in seqs:
            st = self.states.get(seq.request_id)
            P = seq.num_tokens - 1
            covered = 0 if st is None or st.covered > P else st.covered
            start = max(covered, P - self.window)
            items.append((seq.request_id, P, start, seq.token_slice(start, P) if start < P else []))
        self._announce("catch_up", items)
        states = self._apply_catch_up(items)
        trees = []
        for seq, st in zip(seqs, states, strict=True):
            n_keys = min(seq.num_computed, st.root_pos)
            self._announce("drafter", seq.request_id, list(seq.pages), n_keys)
            drafter = self._make_drafter(seq.request_id, list(seq.pages), n_keys)

            def logits(tree: DraftTree, nodes: list[int], drafter=drafter) -> torch.Tensor:
                self._announce("logits", list(tree.tokens), list(tree.parents), list(tree.depths), list(nodes))
                return drafter.logits(tree, nodes)

            root = seq.output_ids[-1] if seq.output_ids else seq.prompt_ids[-1]
            gen = seq.generator if seq.generator is not None else self.engine.sampler.generator
            trees.append(draft_tree(self.cfg.tree, root, logits, seq.params, gen))
        return trees

    @torch.inference_mode()
    def commit(self, seqs, trees, results, target_q=None) -> None:
        items = []
        for seq, tree, res in zip(seqs, trees, results, strict=True):
            st = self.states.get(seq.request_id)
            if st is None or st.covered != st.root_pos:
                continue
            items.append((seq.request_id, [tree.tokens[i] for i in res.path]))
        self._announce("commit", items)
        self._apply_commit(items)

    def release(self, request_id: str) -> None:
        if self.states.pop(request_id, None) is not None:
            self._announce("release", request_id)
