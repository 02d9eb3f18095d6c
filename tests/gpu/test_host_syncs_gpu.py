"""On CUDA: the eager forwards (a context chunk, a draft's context encoding, a decode row) only queue work.

A host sync inside one (a pageable `torch.tensor(..., device=cuda)`, an `.item()`) makes the host wait for
everything queued before it, so host-bound work stops overlapping the device. The oracle is torch's own
sync detector (`torch.cuda.set_sync_debug_mode`), which flags every synchronizing CUDA call."""

from __future__ import annotations

import warnings

import torch

from specray.config import CacheConfig, EngineConfig, SchedulerConfig
from specray.engine.llm_engine import LLMEngine
from tests.support.tiny import make_checkpoint


def _syncs(fn) -> list[str]:
    """Where `fn` synchronized with the device: 'file:line message' of each flagged call."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return [f"{w.filename}:{w.lineno} {w.message}" for w in caught
            if "synchroniz" in str(w.message) and "prototype feature" not in str(w.message)]


def test_eager_forwards_do_not_wait_for_the_device(tmp_path):
    path = make_checkpoint(tmp_path / "m", "llama")
    engine = LLMEngine(EngineConfig(
        model=str(path), device="cuda", dtype="bfloat16", cuda_graph_batch_sizes=(1, 2),
        cache=CacheConfig(page_size=16, num_pages=64),
        scheduler=SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=256, max_model_len=512),
    ))
    runner = engine.runner
    pages = [list(range(1, 17)), list(range(17, 33))]

    def forwards() -> list[torch.Tensor]:
        outs = [
            # two sequences' first chunks, K/V only (a draft's context encoding)
            runner.forward_tokens(pages, [list(range(3, 203)), list(range(5, 45))], [list(range(200)), list(range(40))],
                                  [list(range(200)), list(range(40))], [200, 40], logits_rows=[]),
            # a second chunk attending to the first, logits of its last row (chunked prefill)
            runner.forward_tokens(pages[:1], [list(range(7, 57))], [list(range(200, 250))], [list(range(200, 250))],
                                  [250], logits_rows=[49]),
            # one decode row per sequence (the eager decode kernel), every row's logits
            runner.forward_tokens(pages, [[9], [11]], [[250], [40]], [[250], [40]], [251, 41]),
        ]
        inputs = runner.host_inputs(pages, [[13], [15]], [251, 41])
        outs.append(runner.run_eager(inputs, True, [0, 1]))
        return outs

    assert _syncs(lambda: torch.tensor([1, 2], device="cuda")), "the detector misses a pageable host-to-device copy"
    first = forwards()  # compiles the kernels; may sync
    flagged = _syncs(forwards)
    assert not flagged, "host syncs in eager forwards:\n" + "\n".join(flagged)
    again = forwards()  # the same inputs rewrite the same K/V: the results are unchanged
    for a, b in zip(first, again, strict=True):
        torch.testing.assert_close(a, b)
    assert first[0].shape == (0, engine.arch.vocab_size) and first[1].shape == (1, engine.arch.vocab_size)
