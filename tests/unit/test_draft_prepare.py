"""The separate draft's early prepare, against the tokens the engine then sends with the step request: a
request that extends the prepared tokens (a plain decode step ran in between) appends only the rest; one
that contradicts them (never sent by the engine) rolls the mirror back and drops the draft state."""

from __future__ import annotations

from types import SimpleNamespace

from specray.actors.draft import DraftWorker, MirrorSeq
from specray.engine.sampling_params import SamplingParams


def _worker(prepared: dict[str, list[int]]) -> tuple[DraftWorker, list[str]]:
    released: list[str] = []
    w = DraftWorker.__new__(DraftWorker)  # no model: only the bookkeeping under test
    w.mirror = {"a": MirrorSeq("a", [1, 2], [3, 4, 5], SamplingParams(temperature=0))}  # 4, 5 were prepared
    w.prepared = dict(prepared)
    w.stats = {"prepare_misses": 0}
    w.proposer = SimpleNamespace(release=released.append)
    return w, released


def test_step_tokens_that_extend_the_prepared_ones_append_the_rest():
    w, released = _worker({"a": [4, 5]})
    assert w._take_prepared("a", [4, 5]) == []
    assert w._take_prepared("a", [9]) == [9]  # nothing prepared any more: all of it
    w, _ = _worker({"a": [4, 5]})
    assert w._take_prepared("a", [4, 5, 6, 7]) == [6, 7]
    assert released == [] and w.stats["prepare_misses"] == 0 and w.prepared == {}


def test_step_tokens_that_contradict_the_prepared_ones_drop_them():
    w, released = _worker({"a": [4, 5]})
    assert w._take_prepared("a", [4, 8]) == [4, 8]
    assert w.mirror["a"].output_ids == [3]  # back to before the prepare
    assert released == ["a"] and w.stats["prepare_misses"] == 1 and w.prepared == {}
