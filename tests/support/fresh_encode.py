"""Shared check for `FreshEncodeGraphs`: its padded static encode against the engine's own eager encode."""

from __future__ import annotations

import torch

from specray.engine.fresh_graphs import FreshEncodeGraphs
from specray.engine.kv_cache import SCRATCH_PAGE
from specray.engine.model_runner import ModelRunner

SENTINEL = 7.0


def kv_rows(runner: ModelRunner, layer: int, pages: list[int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, Hkv, D] keys and values at cache positions 0..n-1 of page table `pages`."""
    k, v = runner.cache.k[layer], runner.cache.v[layer]
    idx = torch.tensor(pages, device=k.device)
    return k[idx].flatten(0, 1)[:n], v[idx].flatten(0, 1)[:n]


def check_against_eager(runner: ModelRunner, fresh: FreshEncodeGraphs, lengths: list[int], atol: float,
                        rtol: float) -> None:
    """For each n: the fresh encode's K/V equal an eager `forward_tokens` encode of the same tokens (into other
    pages), and it writes nothing past position n-1 except into the scratch page."""
    per_seq = -(-max(lengths) // runner.page_size) + 1
    pages_a = list(range(1, 1 + per_seq))
    pages_b = list(range(1 + per_seq, 1 + 2 * per_seq))
    assert SCRATCH_PAGE not in pages_a + pages_b and 1 + 2 * per_seq <= runner.cache.k[0].shape[0]
    g = torch.Generator().manual_seed(0)
    vocab = runner.model.arch.vocab_size
    for n in lengths:
        tokens = torch.randint(0, vocab, (n,), generator=g).tolist()
        for cache in (*runner.cache.k, *runner.cache.v):
            cache.fill_(SENTINEL)
        fresh.run(pages_a, tokens)
        runner.forward_tokens([pages_b], [tokens], [list(range(n))], [list(range(n))], [n], logits_rows=[])
        for layer in range(runner.model.arch.num_layers):
            ka, va = kv_rows(runner, layer, pages_a, per_seq * runner.page_size)
            kb, vb = kv_rows(runner, layer, pages_b, n)
            torch.testing.assert_close(ka[:n].float(), kb.float(), atol=atol, rtol=rtol, msg=f"K, n={n}, layer {layer}")
            torch.testing.assert_close(va[:n].float(), vb.float(), atol=atol, rtol=rtol, msg=f"V, n={n}, layer {layer}")
            assert bool((ka[n:] == SENTINEL).all()) and bool((va[n:] == SENTINEL).all()), \
                f"n={n}: the padding wrote into the sequence's own pages"
