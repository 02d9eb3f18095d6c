"""Cross-model Retrieval chunk scores (Triton) against the dense fp32 torch reference.

Owns no data: every test builds fresh random inputs (tests/support/sparse_inputs.py). Without CUDA the kernels
run under Triton's CPU interpreter (TRITON_INTERPRET=1), so the shapes are small; tests/gpu runs them at size.
"""

import pytest
import torch

from specray.kernels.chunk_scores import ChunkScores
from specray.kernels.reference import chunk_scores_reference
from tests.support.sparse_inputs import REL_TOL, paged_inputs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def check_chunk_scores(cs: ChunkScores, lens, num_kv_heads, group, head_dim, page_size, dtype, seed) -> None:
    inputs = paged_inputs(lens, num_kv_heads, head_dim, page_size, dtype, DEVICE, seed=seed, extra_columns=2)
    gen = torch.Generator().manual_seed(seed + 1)
    # a peaked softmax (|q| ~ 2 sqrt(D)) so that chunk scores span orders of magnitude
    q = (2 * torch.randn(len(lens), num_kv_heads * group, head_dim, generator=gen)).to(dtype).to(DEVICE)
    scale = head_dim**-0.5
    cs.plan(inputs.page_tables, inputs.lens)
    out = torch.full((len(lens), cs.max_chunks), float("nan"), device=DEVICE)
    assert cs.run(q, inputs.k_cache, scale, out=out) is out
    assert not torch.isnan(out).any(), "chunk scores have unwritten (NaN) elements"
    ref = chunk_scores_reference(q, inputs.k_cache, inputs.page_tables, inputs.lens, scale, cs.chunk_size)
    assert ref.shape == out.shape
    fin = torch.isfinite(ref)
    assert torch.equal(fin, torch.isfinite(out)), "complete-chunk columns differ from the reference"
    assert torch.all(out[~fin] == float("-inf"))
    rel = ((out[fin] - ref[fin]).norm() / ref[fin].norm().clamp_min(1e-30)).item()
    assert rel <= REL_TOL[dtype], f"relative error {rel:.3e} > {REL_TOL[dtype]}"
    # each sequence's ranking of its chunks is the reference's wherever scores are not near-ties
    for b in range(len(lens)):
        n = int(fin[b].sum())
        if n > 1:
            top = torch.topk(ref[b, :n], min(3, n)).values[-1]
            assert torch.equal(out[b, :n] >= top * 1.01, ref[b, :n] >= top * 1.01)


CASES = [
    # lens below, at and above a chunk, an empty sequence; GQA 1, ps 8, 2 chunks per program
    ((100, 3, 200, 0, 64, 31), 2, 1, 64, 8, F32, dict(chunks_per_program=2, block_c=16), 1),
    # GQA 4, d128, ps 16, bf16; 19 chunks so the reductions take two 16-chunk blocks
    ((600, 33), 2, 4, 128, 16, BF16, dict(block_c=16), 2),
    # GQA 7, fp16, ps 16, d64
    ((96, 130), 1, 7, 64, 16, F16, dict(chunks_per_program=3), 3),
    # GQA 7, bf16, ps 8, d128, 16-token chunks
    ((77, 40), 1, 7, 128, 8, BF16, dict(chunk_size=16), 4),
]


@pytest.mark.parametrize(
    "lens, hkv, group, head_dim, page_size, dtype, opts, seed",
    CASES,
    ids=[f"{str(c[5]).removeprefix('torch.')}-d{c[3]}-ps{c[4]}-g{c[2]}-len{'_'.join(map(str, c[0]))}" for c in CASES],
)
def test_chunk_scores_match_reference(lens, hkv, group, head_dim, page_size, dtype, opts, seed) -> None:
    width = max(-(-n // page_size) for n in lens) + 2
    cs = ChunkScores(len(lens) + 1, hkv * group, hkv, head_dim, page_size, width + 1, DEVICE, **opts)
    check_chunk_scores(cs, list(lens), hkv, group, head_dim, page_size, dtype, seed)


def test_workspace_reuse_and_default_out() -> None:
    cs = ChunkScores(4, 8, 2, 64, 8, 20, DEVICE, block_c=16)
    check_chunk_scores(cs, [130, 64, 5], 2, 4, 64, 8, F32, 10)
    check_chunk_scores(cs, [33], 2, 4, 64, 8, F32, 11)
    inputs = paged_inputs([70], 2, 64, 8, F32, DEVICE, seed=12)
    cs.plan(inputs.page_tables, inputs.lens)
    q = torch.randn(1, 8, 64, device=DEVICE)
    out = cs.run(q, inputs.k_cache, 0.125)
    assert out.shape == (1, inputs.page_tables.shape[1] * 8 // 32) and out.dtype == F32


def test_input_validation() -> None:
    inputs = paged_inputs([40, 9], 2, 64, 8, F32, DEVICE, seed=13)
    cs = ChunkScores(2, 8, 2, 64, 8, 8, DEVICE)
    q = torch.randn(2, 8, 64, device=DEVICE)
    with pytest.raises(ValueError, match="plan"):
        cs.run(q, inputs.k_cache, 0.125)
    with pytest.raises(ValueError, match="int32"):
        cs.plan(inputs.page_tables.long(), inputs.lens)
    with pytest.raises(ValueError, match="seq_lens"):
        cs.plan(inputs.page_tables, inputs.lens.long())
    with pytest.raises(ValueError, match="batch size"):
        cs.plan(inputs.page_tables.repeat(2, 1), inputs.lens.repeat(2))
    with pytest.raises(ValueError, match="max_pages"):
        cs.plan(torch.zeros(2, 9, dtype=torch.int32, device=DEVICE), inputs.lens)
    cs.plan(inputs.page_tables, inputs.lens)
    with pytest.raises(ValueError, match="q must be"):
        cs.run(q[:1], inputs.k_cache, 0.125)
    with pytest.raises(ValueError, match="k_cache"):
        cs.run(q, inputs.k_cache.half(), 0.125)
    with pytest.raises(ValueError, match="k_cache"):
        cs.run(q, inputs.k_cache[:, :4], 0.125)
    with pytest.raises(ValueError, match="out"):
        cs.run(q, inputs.k_cache, 0.125, out=torch.empty(2, cs.max_chunks + 1, device=DEVICE))
    with pytest.raises(ValueError, match="multiple"):
        ChunkScores(2, 6, 4, 64, 8, 8, DEVICE)
    with pytest.raises(ValueError, match="chunk_size"):
        ChunkScores(2, 8, 2, 64, 8, 8, DEVICE, chunk_size=24)
