"""Hybrid Tree Attention (prefix through the paged split-KV kernel with LSE, tree part dense, exact LSE
merge) equals dense masked attention (the torch reference backend) on random trees and ragged prefixes."""

from __future__ import annotations

import pytest
import torch

from specray.engine.attention import AttentionMetadata, TorchAttentionBackend, TreeAttention, TritonAttentionBackend
from specray.engine.kv_cache import KVCache, KVCacheSpec
from specray.spec.types import DraftTree


def _random_tree(n: int, g: torch.Generator) -> DraftTree:
    parents, depths = [-1], [0]
    for i in range(1, n):
        p = int(torch.randint(0, i, (1,), generator=g))
        parents.append(p)
        depths.append(depths[p] + 1)
    return DraftTree(list(range(n)), parents, depths)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("hq, hkv", [(4, 2), (7, 1)])
def test_hybrid_tree_matches_dense(dtype, tol, hq, hkv):
    g = torch.Generator().manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    d, ps = 64, 8
    spec = KVCacheSpec(num_layers=1, num_kv_heads=hkv, head_dim=d, page_size=ps, dtype=dtype)
    cache = KVCache(spec, 40, torch.device(device))
    cache.k[0].normal_(generator=None)
    cache.v[0].normal_()
    prefixes, sizes = [37, 0, 16], [5, 9, 1]
    trees = [_random_tree(n, g) for n in sizes]
    perm = torch.randperm(39, generator=g) + 1  # shuffled, non-contiguous pages; 0 is the scratch page
    pages, used = [], 0
    for p, n in zip(prefixes, sizes, strict=True):
        k = -(-(p + n) // ps)
        pages.append(perm[used : used + k].tolist())
        used += k
    width = max(len(x) for x in pages)
    qsl = [0]
    for n in sizes:
        qsl.append(qsl[-1] + n)
    q = torch.randn(qsl[-1], hq, d, generator=g).to(device, dtype)
    slots = torch.tensor([pg[(p + i) // ps] * ps + (p + i) % ps
                          for pg, p, n in zip(pages, prefixes, sizes, strict=True) for i in range(n)], device=device)
    meta = AttentionMetadata(
        slot_mapping=slots,
        page_tables=torch.tensor([x + [0] * (width - len(x)) for x in pages], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([p + n for p, n in zip(prefixes, sizes, strict=True)], dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device), decode_only=False,
        seq_lens_cpu=[p + n for p, n in zip(prefixes, sizes, strict=True)], query_start_loc_cpu=qsl,
        positions=torch.tensor([p + dd for p, t in zip(prefixes, trees, strict=True) for dd in t.depths],
                               device=device),
        trees=[TreeAttention(t.ancestor_mask().to(device), (p + torch.tensor(t.depths)).to(device))
               for p, t in zip(prefixes, trees, strict=True)],
    )
    k_new = torch.randn(qsl[-1], hkv, d, generator=g).to(device, dtype)
    v_new = torch.randn(qsl[-1], hkv, d, generator=g).to(device, dtype)
    ref = TorchAttentionBackend(cache).forward(0, q, k_new, v_new, meta, d**-0.5, None).float()
    triton_backend = TritonAttentionBackend(cache, hq, 16, 64)
    got = triton_backend.forward(0, q, k_new, v_new, meta, d**-0.5, None).float()
    assert torch.isfinite(got).all()
    rel = (got - ref).norm() / ref.norm()
    assert rel < tol, rel
