"""Async scheduling (`EngineConfig.async_scheduling`): greedy decode step N+1 is launched, with step N's
device-side argmax as its input ids, before the host reads step N's tokens.

Oracles: HF `generate()` for the tokens, and the same engine without async scheduling for runs whose
batch changes under the step launched ahead (stops on a token, aborts, arrivals, preemption, sampled
rows). On CPU the steps run eagerly, so what these check is the bookkeeping: which launched-ahead steps
are used or dropped, page accounting, and that a dropped step's K/V writes never leak into the output.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from specray.config import CacheConfig, EngineConfig, SchedulerConfig
from specray.engine.llm_engine import LLMEngine
from specray.engine.sampling_params import SamplingParams
from specray.errors import ConfigError
from tests.support.tiny import make_checkpoint


def _engine(path, async_scheduling: bool, num_pages: int = 256, max_num_seqs: int = 8) -> LLMEngine:
    return LLMEngine(EngineConfig(
        model=str(path), device="cpu", dtype="float32", async_scheduling=async_scheduling,
        cache=CacheConfig(page_size=4, num_pages=num_pages),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=64)))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("llama"), "llama")


def test_async_greedy_matches_hf_generate(llama):
    prompts = [[5, 9, 17, 33, 4, 8, 100, 7, 21, 90, 11], [44, 45, 46], list(range(10, 40))]
    max_new = [23, 9, 16]  # requests finish at different steps: the batch shrinks under a launched step
    engine = _engine(llama, async_scheduling=True)
    outs = engine.generate(prompts, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in max_new])
    hf = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).eval()
    for prompt, n, out in zip(prompts, max_new, outs, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
        assert out.token_ids == ref
    stats = engine.async_stats
    assert stats["ahead_used"] > 10  # most decode steps ran launched ahead
    # a request ending by length is known before its last token: no step is launched ahead for nothing
    assert stats["ahead_launched"] == stats["ahead_used"]
    assert engine.pages_in_use() == 0  # pages taken for steps launched ahead are freed with their sequence


def _scripted_run(engine: LLMEngine, stop_token: int) -> dict[str, list[int]]:
    """Stops on a token, an abort, arrivals while others decode, and a sampled request beside greedy ones."""
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (7, 13, 4, 21, 9)]
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    engine.add_request("a", prompts[0], greedy)
    engine.add_request("b", prompts[1], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                       stop_token_ids=[stop_token]))
    tokens: dict[str, list[int]] = {}
    step = 0
    while engine.has_unfinished_requests() or step < 12:
        if step == 3:
            engine.add_request("c", prompts[2], greedy)
        if step == 6:
            engine.abort("a")
        if step == 8:
            engine.add_request("d", prompts[3], SamplingParams(temperature=0.9, seed=7, max_tokens=12,
                                                               ignore_eos=True))
        if step == 12:
            engine.add_request("e", prompts[4], greedy)
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        step += 1
    return tokens


def test_async_run_with_stops_aborts_and_arrivals_equals_sync(llama):
    probe = _engine(llama, async_scheduling=False)
    ref_b = _scripted_run(probe, stop_token=-1)["b"]  # without a stop: pick its 6th token as the stop
    stop = ref_b[5]
    sync = _scripted_run(_engine(llama, async_scheduling=False), stop)
    engine = _engine(llama, async_scheduling=True)
    got = _scripted_run(engine, stop)
    assert got == sync
    assert got["b"][-1] == stop and len(got["b"]) <= 6
    assert len(got["a"]) < 30  # aborted mid-run
    stats = engine.async_stats
    assert stats["ahead_launched"] > stats["ahead_used"] > 0  # a stop token or an abort drops a launched step
    assert engine.pages_in_use() == 0


def test_async_under_page_pressure_equals_sync(llama):
    """A cache so small that steps launched ahead find no free page and requests get preempted."""
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (9, 14, 6, 11)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ref = [o.token_ids for o in _engine(llama, False, num_pages=22).generate(prompts, params)]
    engine = _engine(llama, True, num_pages=22)
    assert [o.token_ids for o in engine.generate(prompts, params)] == ref
    assert engine.pages_in_use() == 0


def test_async_scheduling_must_be_a_bool():
    with pytest.raises(ConfigError, match="async_scheduling"):
        EngineConfig(async_scheduling="yes")


def test_async_with_every_slot_taken_keeps_launching_ahead(llama):
    """Requests waiting for a sequence slot cannot join the next batch, so steps are still launched ahead;
    when a request finishes, the waiting one is admitted and the output equals the sync engine's."""
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (8, 5, 12, 6)]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (12, 20, 9, 15)]
    ref = [o.token_ids for o in _engine(llama, False, max_num_seqs=2).generate(prompts, params)]
    engine = _engine(llama, True, max_num_seqs=2)
    assert [o.token_ids for o in engine.generate(prompts, params)] == ref
    assert engine.async_stats["ahead_used"] > 20  # ~52 decode steps; the two waiting requests did not stop them
    assert engine.pages_in_use() == 0
