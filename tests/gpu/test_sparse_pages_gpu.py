"""UNIQUE sparse page attention, page statistics and Cross-model Retrieval chunk scores on CUDA at realistic
sizes (up to 32K-token prefixes, Llama-3.1-8B head shape), against the dense fp32 torch references.

Sparse attention also runs repeatedly on one workspace and under CUDA-graph replay.

Owns no data: each test builds fresh random inputs (tests/support/sparse_inputs.py). Skipped without CUDA
(tests/gpu/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from specray.kernels.chunk_scores import ChunkScores
from specray.kernels.page_stats import PageStats
from specray.kernels.reference import chunk_scores_reference, page_stats_reference
from specray.kernels.sparse_pages import SparsePageAttention
from tests.support.sparse_inputs import REL_TOL, check_sparse, compare_to_reference, paged_inputs, sparse_case

DEV = torch.device("cuda")
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

SPARSE_CASES = [
    # (prefixes, rows per seq, Hkv, G, D, page size, dtype, mean dtype, budget)
    ((32768, 1, 517, 5000, 12345, 100, 0), 1, 8, 4, 128, 16, BF16, F32, 512),  # Llama-3.1-8B
    ((16384, 700), 5, 8, 4, 128, 16, BF16, BF16, 512),
    ((20000, 300, 4097), 5, 4, 7, 64, 8, F16, F32, 512),
    ((8192, 77, 1000), 1, 8, 1, 128, 8, F32, F32, 256),
    ((30000, 2048), 1, 2, 6, 128, 16, BF16, F32, 1024),  # Qwen2.5-1.5B (12 q / 2 kv heads)
    ((8192, 3000, 17, 600), 3, 2, 7, 128, 16, BF16, BF16, 256),  # ragged rows, GQA 7
]


@pytest.mark.parametrize("case", SPARSE_CASES, ids=lambda c: f"{c[6]}-g{c[3]}-d{c[4]}-ps{c[5]}-n{c[1]}-b{c[8]}")
def test_sparse_page_attention_gpu(case) -> None:
    prefixes, n, hkv, group, d, ps, dtype, mean_dtype, budget = case
    sc = sparse_case(list(prefixes), n, hkv, group, d, ps, dtype, DEV, mean_dtype=mean_dtype, seed=len(prefixes))
    rows, width = sc.row_tables.shape
    attn = SparsePageAttention(rows, hkv * group, hkv, d, ps, width, DEV, budget_tokens=budget)
    for _ in range(2):  # repeated runs on one workspace
        check_sparse(attn, sc, budget, independent_stats=mean_dtype == F32)


def test_sparse_page_attention_cuda_graph_replay() -> None:
    """Captured once; the replay follows in-place changes of q and of the prefix lengths."""
    sc = sparse_case([5000, 300], 2, 8, 4, 128, 16, BF16, DEV, seed=7)
    rows, width = sc.row_tables.shape
    attn = SparsePageAttention(rows, 32, 8, 128, 16, width, DEV)
    attn.plan(sc.row_tables, sc.row_prefix, 512)
    out = torch.empty_like(sc.q)
    lse = torch.empty(rows, 32, dtype=torch.float32, device=DEV)
    args = (sc.q, sc.inputs.k_cache, sc.inputs.v_cache, sc.stats.layer(0), 128**-0.5, out, lse)
    attn.run(*args)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attn.run(*args)
    for prefixes in ([4000, 4000, 290, 290], [5000, 4321, 17, 300]):
        sc.q.copy_(torch.randn_like(sc.q))
        sc.row_prefix.copy_(torch.tensor(prefixes, dtype=torch.int32))
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        graph.replay()
        compare_to_reference(attn, sc, out, lse, 512)


def test_page_stats_all_layers_gpu() -> None:
    base = paged_inputs([32768, 1000], 8, 128, 16, BF16, DEV, seed=3)
    layers = [base.k_cache * (i + 1) for i in range(4)]
    stats = PageStats(layers, mean_dtype=F32)
    ids = base.full_pages
    stats.update_all(torch.cat([ids, torch.full((5,), -1, dtype=torch.int32, device=DEV)]))
    for layer in (0, 3):
        mean, std = page_stats_reference(layers[layer], ids)
        torch.testing.assert_close(stats.mean[layer, ids.long()], mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats.std[layer, ids.long()], std, rtol=1e-5, atol=1e-5)


CHUNK_CASES = [
    # (lens, Hkv, G, D, page size, dtype)
    ((32768, 1, 5000, 12345, 31, 0), 8, 4, 128, 16, BF16),
    ((20000, 4097), 4, 7, 64, 8, F32),
    ((8192, 33), 8, 1, 128, 16, F16),
]


@pytest.mark.parametrize("case", CHUNK_CASES, ids=lambda c: f"{c[5]}-g{c[2]}-d{c[3]}-ps{c[4]}")
def test_chunk_scores_gpu(case) -> None:
    lens, hkv, group, d, ps, dtype = case
    inputs = paged_inputs(list(lens), hkv, d, ps, dtype, DEV, seed=5)
    q = (2 * torch.randn(len(lens), hkv * group, d, device=DEV)).to(dtype)
    cs = ChunkScores(len(lens), hkv * group, hkv, d, ps, inputs.page_tables.shape[1], DEV)
    cs.plan(inputs.page_tables, inputs.lens)
    out = torch.full((len(lens), cs.max_chunks), float("nan"), device=DEV)
    cs.run(q, inputs.k_cache, d**-0.5, out=out)
    assert not torch.isnan(out).any()
    ref = chunk_scores_reference(q, inputs.k_cache, inputs.page_tables, inputs.lens, d**-0.5)
    fin = torch.isfinite(ref)
    assert torch.equal(fin, torch.isfinite(out))
    rel = ((out[fin] - ref[fin]).norm() / ref[fin].norm()).item()
    assert rel <= REL_TOL[dtype], f"relative error {rel:.3e}"
