"""`draft_model` speculation in the distributed engine: colocated in the leader shard, or in its own actor.

Colocated, `ColocatedDraftProposer` is the in-process `DraftModelProposer` whose Cross-model Retrieval
scores come from all target shards (`shard.chunk_scores`: each rank sums its heads, one all-reduce).

Separate, the draft model lives in the draft actor (`DraftWorker`, its own device) and the leader holds
a `RemoteDraftProposer` stub. One round trip per speculative step, over the shared-memory channels
`to_draft` / `from_draft`:

    leader -> draft  ("step", events, batch)   events: ("commit", request ids, [(path, bonus)], {id: chunk
                                               scores}) of the previous step, ("release", id); batch: per
                                               sequence (id, prompt, outputs, params) when new to the
                                               draft, else (id, None, new tokens, None)
    draft -> leader  (trees, refresh_due)      the DraftTrees; which sequences need chunk scores at the
                                               next commit (every `refresh_every` steps)
    leader -> draft  ("events", events, None)  when a request ends (release its draft pages now; no reply);
                                               without `overlap`, also each commit as soon as the leader has
                                               it (no reply): see "early prepare" below
    leader -> draft  ("stop", events, None)    shutdown

The draft keeps a mirror of each request's tokens and runs the unchanged `DraftModelProposer` on it, so
it proposes what an in-process draft would.

Early prepare (without `overlap`): the leader sends each commit the moment it has it (after the retrieval
scores), not with the next step request. The draft applies it, appends each continuing sequence's new
tokens (the accepted path and the bonus: what the engine appends unless the request ends, and an ended
request is released) and runs the proposer's `prepare`: a due retrieval rebuild and the context encode.
That runs while the leader finishes its step (commit, output processing, the next schedule); the step
request then finds only the chains to draft. A step request whose tokens extend the prepared ones (a
plain decode step ran in between) appends the rest; one that does not match drops the sequence's draft
state, which is rebuilt from its tokens (`stats["prepare_misses"]`; the engine never sends that).

With `overlap`, right after replying the draft guesses the
step's outcome (the draft's top path fully accepted, the bonus = the draft's argmax after its leaf),
commits that guess and drafts the next trees while the target verifies. If the next message confirms
the guess, the trees are sent at once; otherwise the guessed state is rolled back (context, pages and
counters restored; the accepted tokens are re-encoded rather than taken from clobbered tree slots).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from specray.actors import world as W
from specray.config import EngineConfig, SpeculativeConfig
from specray.engine.sampler import Sampler, first_argmax
from specray.engine.sampling_params import SamplingParams
from specray.engine.sequence import Sequence
from specray.models.arch import ModelArch
from specray.spec.draft_model import DraftModelProposer, _path
from specray.spec.step import forward_tree_nodes
from specray.spec.types import AcceptResult, DraftTree


def _score_items(seqs, trees, results, target_q, due) -> tuple[list[str], list, list | None]:
    """The sequences whose retrieval refresh falls on this commit, with their captured query rows (and
    the leader's copies of those queries)."""
    rids, items, queries, offset = [], [], [], 0
    for i, (seq, tree, res) in enumerate(zip(seqs, trees, results, strict=True)):
        if due(seq.request_id):
            rids.append(seq.request_id)
            items.append((list(seq.pages), seq.num_computed, offset + res.path[-1]))
            queries.append(None if target_q is None else target_q[i])
        offset += tree.num_nodes
    return rids, items, (queries if target_q is not None else None)


class ColocatedDraftProposer(DraftModelProposer):
    """The draft model in the leader's process; retrieval scores gathered over all target shards."""

    def __init__(self, engine, cfg: SpeculativeConfig):
        super().__init__(engine, cfg)
        self._scores: dict[str, torch.Tensor] = {}

    def commit(self, seqs, trees, results, target_q=None) -> None:
        if self.retrieval is not None:
            from specray.actors.shard import chunk_scores

            every = self.retrieval.refresh_every
            rids, items, qs = _score_items(seqs, trees, results, target_q,
                                           lambda r: self.states[r].steps_since_refresh + 1 >= every)
            scores = chunk_scores(self.engine, items, self.retrieval.chunk_size, qs)
            self._scores = dict(zip(rids, scores, strict=True))
        super().commit(seqs, trees, results, [None] * len(seqs))

    def _chunk_scores(self, seq, q) -> torch.Tensor:
        return self._scores.pop(seq.request_id)


class RemoteDraftProposer:
    """The leader's stand-in for the draft actor (the `Proposer` protocol over `to_draft` / `from_draft`)."""

    def __init__(self, engine, cfg: SpeculativeConfig):
        self.engine, self.cfg = engine, cfg
        self.retrieval = cfg.retrieval
        self.needs_target_q = cfg.retrieval is not None
        self.tx, self.rx = engine.world.to_draft, engine.world.from_draft
        self.sent: dict[str, int] = {}  # request id -> tokens the draft has seen
        self.events: list[tuple] = []
        self.refresh_due: dict[str, bool] = {}
        self.early = not engine.config.overlap  # send each commit at once: the draft prepares the next step
        self.timings = {"draft_wait_s": 0.0, "scores_s": 0.0, "num_exchanges": 0}

    def propose(self, seqs) -> list[DraftTree]:
        batch = []
        for seq in seqs:
            rid, known = seq.request_id, self.sent.get(seq.request_id)
            if known is None:
                batch.append((rid, list(seq.prompt_ids), list(seq.output_ids), seq.params))
            else:
                batch.append((rid, None, seq.token_slice(known, seq.num_tokens), None))
            self.sent[rid] = seq.num_tokens
        t0 = time.perf_counter()
        self.tx.write(("step", self.events, batch))
        self.events = []
        trees, due = self.rx.read()
        self.timings["draft_wait_s"] += time.perf_counter() - t0
        self.timings["num_exchanges"] += 1
        self.refresh_due = {s.request_id: d for s, d in zip(seqs, due, strict=True)}
        dev = self.engine.device
        for t in trees:
            if t.draft_probs is not None:
                t.draft_probs = t.draft_probs.to(dev)
        return trees

    def commit(self, seqs, trees, results, target_q=None) -> None:
        scores: dict[str, Any] = {}
        if self.retrieval is not None:
            from specray.actors.shard import chunk_scores

            t0 = time.perf_counter()
            rids, items, qs = _score_items(seqs, trees, results, target_q, lambda r: self.refresh_due.get(r, False))
            found = chunk_scores(self.engine, items, self.retrieval.chunk_size, qs)
            scores = {r: c.numpy() for r, c in zip(rids, found, strict=True)}  # numpy: cheap to pickle
            self.timings["scores_s"] += time.perf_counter() - t0
        self.events.append(("commit", [s.request_id for s in seqs], [(r.path, r.bonus) for r in results], scores))
        if self.early:
            self.tx.write(("events", self.events, None))
            self.events = []

    def release(self, request_id: str) -> None:
        """Forget a finished or aborted request; the draft frees its pages at once (per request, not per step)."""
        if self.sent.pop(request_id, None) is not None:
            self.events.append(("release", request_id))
            self.tx.write(("events", self.events, None))
            self.events = []

    def stop(self) -> None:
        self.tx.write(("stop", self.events, None))
        self.events = []


# ---- the draft actor's side -------------------------------------------------------------------------
@dataclass
class _CacheView:
    spec: Any
    num_pages: int


@dataclass
class TargetView:
    """What `DraftModelProposer` reads from its engine, for a draft that runs without the target."""

    arch: ModelArch
    max_model_len: int
    dtype: torch.dtype
    device: torch.device
    config: EngineConfig
    cache: _CacheView
    sampler: Sampler


@dataclass
class MirrorSeq:
    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None

    token_slice = Sequence.token_slice  # tokens [start, end) of prompt + outputs, without joining them


@dataclass
class _Snapshot:
    ctx_len: int
    num_encoded: int
    covered: int
    num_pages: int
    steps: int
    num_outputs: int


class DraftProposer(DraftModelProposer):
    """`DraftModelProposer` whose retrieval scores arrive from the target with each commit."""

    scores: dict[str, torch.Tensor]

    def _chunk_scores(self, seq, q) -> torch.Tensor:
        return self.scores.pop(seq.request_id)


class DraftWorker:
    """The draft actor's state: the draft proposer, the request mirrors, the last trees, an overlap guess."""

    def __init__(self, view: TargetView, cfg: SpeculativeConfig, world: W.World, overlap: bool):
        self.view, self.cfg, self.world, self.overlap = view, cfg, world, overlap
        self.proposer = DraftProposer(view, cfg)
        self.proposer.scores = {}
        self.mirror: dict[str, MirrorSeq] = {}
        self.trees: dict[str, DraftTree] = {}
        self.guess: dict[str, Any] | None = None
        # steps answered, overlap guesses made and confirmed, and the seconds between reading a step
        # request and writing its reply (the actor's own work: commit, encode, draft, copy the trees out;
        # an overlap guess drafted after the reply is not included)
        self.stats = {"guesses": 0, "guess_hits": 0, "steps": 0, "busy_s": 0.0, "prepares": 0, "prepare_s": 0.0,
                      "prepare_misses": 0}
        self.prepared: dict[str, list[int]] = {}  # request id -> new tokens appended by an early prepare

    # ---- one exchange ---------------------------------------------------------------------------
    @torch.inference_mode()
    def serve(self) -> None:
        rx, tx = self.world.to_draft, self.world.from_draft
        while True:
            op, events, batch = rx.read()
            t0 = time.perf_counter()
            if self.guess is not None and not (op == "step" and self._guess_holds(events, batch)):
                self._rollback()
            if op == "stop":
                return
            if op == "events":  # commits / releases with no step to draft
                self._step(events, [])
                if not self.overlap:
                    self._prepare_early(events)
                    self.stats["prepare_s"] += time.perf_counter() - t0
                continue
            if self.guess is not None:  # confirmed: the next trees are ready
                reply, self.guess = self.guess["reply"], None
                self.stats["guess_hits"] += 1
                self._apply_releases(events)
            else:
                reply = self._step(events, batch)
            tx.write(reply)
            self.stats["busy_s"] += time.perf_counter() - t0
            self.stats["steps"] += 1
            if self.overlap:
                self._make_guess(batch)

    def _apply_releases(self, events) -> None:
        for ev in events:
            if ev[0] == "release":
                self._release(ev[1])

    def _release(self, rid: str) -> None:
        self.proposer.release(rid)
        self.mirror.pop(rid, None)
        self.trees.pop(rid, None)
        self.prepared.pop(rid, None)

    def _prepare_early(self, events) -> None:
        """After a commit: each committed sequence that is still live gets its new tokens and is prepared."""
        seqs = []
        for ev in events:
            if ev[0] != "commit":
                continue
            for rid, (path, bonus) in zip(ev[1], ev[2], strict=True):
                if rid not in self.mirror or rid in self.prepared:
                    continue
                new = AcceptResult(list(path), bonus).new_tokens(self.trees[rid])
                self.mirror[rid].output_ids.extend(new)
                self.prepared[rid] = new
                seqs.append(self.mirror[rid])
        if seqs:
            self.proposer.prepare(seqs)
            self.stats["prepares"] += 1

    def _take_prepared(self, rid: str, tokens: list[int]) -> list[int]:
        """A step request's new tokens for a sequence, less those an early prepare appended already."""
        new = self.prepared.pop(rid, None)
        if new is None:
            return tokens
        if tokens[: len(new)] == new:
            return tokens[len(new):]
        # not the tokens the commit implied: forget the prepared state; the draft state is rebuilt
        self.stats["prepare_misses"] += 1
        del self.mirror[rid].output_ids[len(self.mirror[rid].output_ids) - len(new):]
        self.proposer.release(rid)
        return tokens

    def _commit(self, rids: list[str], results: list[AcceptResult], scores: dict) -> None:
        seqs = [self.mirror[r] for r in rids]
        self.proposer.scores.update({r: torch.from_numpy(v) for r, v in scores.items()})
        self.proposer.commit(seqs, [self.trees[r] for r in rids], results, [None] * len(seqs))

    def _step(self, events, batch) -> tuple[list[DraftTree], list[bool]]:
        for ev in events:
            if ev[0] == "commit":
                _, rids, results, scores = ev
                self._commit(rids, [AcceptResult(list(p), b) for p, b in results], scores)
            else:
                self._release(ev[1])
        seqs = []
        for rid, prompt, tokens, params in batch:
            if prompt is not None:
                self.prepared.pop(rid, None)
                gen = None
                if params.seed is not None:
                    gen = torch.Generator(device=self.view.device).manual_seed(params.seed)
                self.mirror[rid] = MirrorSeq(rid, list(prompt), list(tokens), params, gen)
            else:
                self.mirror[rid].output_ids.extend(self._take_prepared(rid, list(tokens)))
            seqs.append(self.mirror[rid])
        return self._propose(seqs)

    def _propose(self, seqs: list[MirrorSeq]) -> tuple[list[DraftTree], list[bool]]:
        if not seqs:
            return [], []
        trees = self.proposer.propose(seqs)
        for s, t in zip(seqs, trees, strict=True):
            self.trees[s.request_id] = t
        out = [DraftTree(t.tokens, t.parents, t.depths, None if t.draft_probs is None else t.draft_probs.cpu(),
                         t.sampled_children) for t in trees]
        return out, [self._due(s.request_id) for s in seqs]

    def _due(self, rid: str) -> bool:
        r = self.proposer.retrieval
        return r is not None and self.proposer.states[rid].steps_since_refresh + 1 >= r.refresh_every

    # ---- overlap --------------------------------------------------------------------------------
    def _make_guess(self, batch) -> None:
        rids = [b[0] for b in batch]
        if not rids or any(self._due(r) for r in rids):
            return  # a retrieval refresh needs the target's scores: no guess this step
        states = self.proposer.states
        snaps = {r: _Snapshot(len(states[r].ctx), states[r].num_encoded, states[r].covered, len(states[r].pages),
                              states[r].steps_since_refresh, len(self.mirror[r].output_ids))
                 for r in rids}
        results = []
        for r in rids:
            tree, st = self.trees[r], states[r]
            kids = tree.children()
            path = [0]
            while kids[path[-1]]:
                path.append(kids[path[-1]][0])
            leaf = path[-1]
            # the draft's next token after its leaf (K/V written to the leaf's own tree slot)
            logits = forward_tree_nodes(self.proposer.runner, st.pages, tree, [leaf], snaps[r].ctx_len)
            st.expanded = {**st.expanded, _path(tree, leaf): leaf}
            results.append(AcceptResult(path, int(first_argmax(logits[:1])[0])))
        self.stats["guesses"] += 1
        self._commit(rids, results, {})
        seqs = []
        for r, res in zip(rids, results, strict=True):
            self.mirror[r].output_ids.extend(res.new_tokens(self.trees[r]))
            seqs.append(self.mirror[r])
        old_trees = {r: self.trees[r] for r in rids}
        reply = self._propose(seqs)
        self.guess = {"rids": rids, "results": [(res.path, res.bonus) for res in results], "reply": reply,
                      "snaps": snaps, "trees": old_trees,
                      "tokens": [res.new_tokens(old_trees[r]) for r, res in zip(rids, results, strict=True)]}

    def _guess_holds(self, events, batch) -> bool:
        g = self.guess
        commits = [ev for ev in events if ev[0] == "commit"]
        if len(commits) != 1 or commits[0][1] != g["rids"] or commits[0][3]:
            return False
        if [tuple(p) for p, _ in commits[0][2]] != [tuple(p) for p, _ in g["results"]]:
            return False
        if [b for _, b in commits[0][2]] != [b for _, b in g["results"]]:
            return False
        if any(ev[0] == "release" and ev[1] in g["rids"] for ev in events):
            return False
        if [b[0] for b in batch] != g["rids"] or any(b[1] is not None for b in batch):
            return False
        return [list(b[2]) for b in batch] == g["tokens"]

    def _rollback(self) -> None:
        g, self.guess = self.guess, None
        states = self.proposer.states
        for r, snap in g["snaps"].items():
            st = states[r]
            del st.ctx[snap.ctx_len:]
            st.num_encoded, st.covered, st.steps_since_refresh = snap.num_encoded, snap.covered, snap.steps
            extra = st.pages[snap.num_pages:]
            del st.pages[snap.num_pages:]
            self.proposer.allocator.free(extra)
            st.expanded = {}  # the guess moved/overwrote tree slots: the real commit re-encodes
            del self.mirror[r].output_ids[snap.num_outputs:]
            self.trees[r] = g["trees"][r]
