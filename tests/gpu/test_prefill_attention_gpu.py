"""On CUDA: the Triton backend's context chunks (prefill, chunked prefill, a draft's context encoding) run
SDPA's memory-efficient kernel, not its math fallback, and equal dense fp32 attention over the same paged
cache."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend

from specray.engine import attention
from specray.engine.attention import (
    AttentionMetadata,
    TritonAttentionBackend,
    dense_attention,
    gather_kv,
    visibility_mask,
)
from specray.engine.kv_cache import KVCache, KVCacheSpec


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_prefill_chunks_use_fused_sdpa_and_match_dense(dtype: torch.dtype, head_dim: int, monkeypatch) -> None:
    hq, hkv, ps = 8, 2, 16
    cache = KVCache(KVCacheSpec(1, hkv, head_dim, ps, dtype), 64, torch.device("cuda"))
    backend = TritonAttentionBackend(cache, hq, 4, 1024)
    g = torch.Generator(device="cuda").manual_seed(0)
    tables = [list(range(1, 31)), list(range(31, 61))]
    # sequence 0: a 300-token prefix already cached, then a 77-token chunk; sequence 1: a fresh 45-token prompt
    prefix = 300
    kc = torch.randn(prefix, hkv, head_dim, device="cuda", generator=g).to(dtype)
    slots0 = torch.tensor([tables[0][p // ps] * ps + p % ps for p in range(prefix)], device="cuda")
    cache.k[0].view(-1, hkv, head_dim)[slots0] = kc
    cache.v[0].view(-1, hkv, head_dim)[slots0] = torch.randn_like(kc)
    n0, n1 = 77, 45
    seq_lens = [prefix + n0, n1]
    qsl = [0, n0, n0 + n1]
    positions = list(range(prefix, prefix + n0)) + list(range(n1))
    slots = [tables[0][p // ps] * ps + p % ps for p in range(prefix, prefix + n0)]
    slots += [tables[1][p // ps] * ps + p % ps for p in range(n1)]
    t = n0 + n1
    q = torch.randn(t, hq, head_dim, device="cuda", generator=g).to(dtype)
    k = torch.randn(t, hkv, head_dim, device="cuda", generator=g).to(dtype)
    v = torch.randn(t, hkv, head_dim, device="cuda", generator=g).to(dtype)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device="cuda"), page_tables=torch.tensor(tables, dtype=torch.int32,
                                                                                   device="cuda"),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device="cuda"), decode_only=False,
        seq_lens_cpu=seq_lens, query_start_loc_cpu=qsl, positions=torch.tensor(positions, device="cuda"),
    )
    scale = head_dim**-0.5
    # the memory-efficient kernel alone: a call it cannot serve (e.g. 3-D inputs) raises instead of falling back
    monkeypatch.setattr(attention, "PREFILL_SDPA_BACKENDS", [SDPBackend.EFFICIENT_ATTENTION])
    out = backend.forward(0, q, k, v, meta, scale, None)
    for s in range(2):
        a, b = qsl[s], qsl[s + 1]
        ks, vs = gather_kv(cache, 0, meta.page_tables[s], seq_lens[s])
        mask = visibility_mask(meta.positions[a:b], seq_lens[s], None)
        ref = dense_attention(q[a:b].float(), ks.float(), vs.float(), mask, scale)
        tol = 2e-2 if dtype == torch.bfloat16 else 2e-4
        torch.testing.assert_close(out[a:b].float(), ref, atol=tol, rtol=tol)
