"""Hybrid Tree Attention kernel against the dense fp32 reference (CPU: Triton interpreter, small shapes)."""

from __future__ import annotations

import pytest
import torch

from specray.kernels.reference_tree import tree_attention_reference
from specray.kernels.tree_attention import HybridTreeAttention, choose_tree_splits, estimate_ctas_per_sm

TOL = {torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def random_tree_mask(n: int, gen: torch.Generator) -> torch.Tensor:
    """[n, n] bool ancestor-or-self mask of a random tree whose node 0 is the root."""
    mask = torch.eye(n, dtype=torch.bool)
    for j in range(1, n):
        parent = int(torch.randint(0, j, (1,), generator=gen))
        mask[j] |= mask[parent]
    return mask


def make_case(prefix_lens, n_qs, n_max, hq, hkv, d, ps, dtype, device, seed=0, with_tree=True):
    gen = torch.Generator().manual_seed(seed)
    b = len(prefix_lens)
    pages_per_seq = [-(-(p + n_max) // ps) for p in prefix_lens]
    num_pages = sum(pages_per_seq) + 3
    perm = torch.randperm(num_pages, generator=gen)  # scattered pages
    tables = torch.zeros(b, max(pages_per_seq), dtype=torch.int32)
    nxt = 0
    for i, n in enumerate(pages_per_seq):
        tables[i, :n] = perm[nxt : nxt + n].to(torch.int32)
        nxt += n
    k = torch.randn(num_pages, ps, hkv, d, generator=gen).to(dtype)
    v = torch.randn(num_pages, ps, hkv, d, generator=gen).to(dtype)
    t = sum(n_qs)
    q = torch.randn(t, hq, d, generator=gen).to(dtype)
    indptr = torch.tensor([0] + list(torch.tensor(n_qs).cumsum(0)), dtype=torch.int32)
    slots = torch.zeros(b, n_max, dtype=torch.int64)
    mask = torch.zeros(b, n_max, n_max, dtype=torch.bool)
    for i, (p, n) in enumerate(zip(prefix_lens, n_qs, strict=True)):
        pos = torch.arange(p, p + n)
        slots[i, :n] = tables[i].long()[pos // ps] * ps + pos % ps
        mask[i, :n, :n] = random_tree_mask(n, gen)
    args = dict(
        q=q,
        k_cache=k,
        v_cache=v,
        qo_indptr=indptr,
        prefix_lens=torch.tensor(prefix_lens, dtype=torch.int32),
        page_tables=tables,
        tree_slots=slots if with_tree else None,
        tree_mask=mask if with_tree else None,
    )
    return {key: (val.to(device) if isinstance(val, torch.Tensor) else val) for key, val in args.items()}


def run_kernel(c, scale, device, **kw):
    t, hq, d = c["q"].shape
    b, n_max = c["prefix_lens"].shape[0], (c["tree_slots"].shape[1] if c["tree_slots"] is not None else 1)
    att = HybridTreeAttention(t, b, n_max, hq, c["k_cache"].shape[2], d, int(c["prefix_lens"].max()), device, **kw)
    att.part_o.fill_(float("nan"))  # poison the workspace and the outputs
    att.part_lse.fill_(float("nan"))
    out = torch.full_like(c["q"], float("nan"))
    lse = torch.full((t, hq), float("nan"), device=device)
    att.plan(c["qo_indptr"], c["prefix_lens"], c["page_tables"], c["tree_slots"], c["tree_mask"])
    return att.run(c["q"], c["k_cache"], c["v_cache"], scale, out=out, lse=lse)


def check(out, lse, ref_out, ref_lse, dtype):
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "unwritten elements"
    err = (out.float() - ref_out).abs().max() / ref_out.abs().max()
    assert err <= TOL[dtype], f"relative error {err:.2e}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    assert (lse[finite] - ref_lse[finite]).abs().max() <= TOL[dtype] * max(1.0, float(ref_lse[finite].abs().max()))


CASES = [
    # dtype, page_size, head_dim, group, n_max, prefix_lens, n_q per sequence, splits
    (torch.float32, 16, 64, 1, 5, [37, 0, 130], [5, 3, 1], 3),
    (torch.bfloat16, 8, 128, 4, 69, [100, 21], [69, 40], 2),
    (torch.float16, 16, 64, 7, 5, [45, 200, 16], [5, 5, 2], 4),
    (torch.float32, 8, 64, 4, 128, [50], [128], 1),
    (torch.bfloat16, 16, 128, 4, 1, [93, 7, 260], [1, 1, 1], 3),
]


@pytest.mark.parametrize("dtype,ps,d,group,n_max,prefix_lens,n_qs,splits", CASES)
def test_tree_attention_matches_reference(dtype, ps, d, group, n_max, prefix_lens, n_qs, splits):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hkv = 2
    c = make_case(prefix_lens, n_qs, n_max, group * hkv, hkv, d, ps, dtype, device, seed=hash((ps, d, group)) % 1000)
    scale = d**-0.5
    out, lse = run_kernel(c, scale, device, num_splits=splits, block_m=32 if device == "cpu" else 64)
    ref_out, ref_lse = tree_attention_reference(scale=scale, **c)
    check(out, lse, ref_out, ref_lse, dtype)


def test_prefix_only_decode_matches_reference():
    """N = 1 without a tree part: plain split-KV decode over the paged prefix (returns its LSE)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    c = make_case([33, 77, 16], [1, 1, 1], 1, 8, 2, 64, 16, torch.float32, device, seed=3, with_tree=False)
    out, lse = run_kernel(c, 0.125, device, num_splits=2)
    ref_out, ref_lse = tree_attention_reference(scale=0.125, **c)
    check(out, lse, ref_out, ref_lse, torch.float32)


def test_bad_inputs_are_named():
    att = HybridTreeAttention(8, 2, 4, 8, 2, 64, 64, "cpu", num_splits=1)
    with pytest.raises(ValueError, match="num_q_heads"):
        HybridTreeAttention(8, 2, 4, 6, 4, 64, 64, "cpu")
    with pytest.raises(ValueError, match="max_nodes"):
        HybridTreeAttention(8, 2, 200, 8, 2, 64, 64, "cpu")
    with pytest.raises(RuntimeError, match="plan"):
        att.run(torch.zeros(2, 8, 64), torch.zeros(4, 16, 2, 64), torch.zeros(4, 16, 2, 64), 1.0)
    with pytest.raises(ValueError, match="prefix_lens"):
        att.plan(torch.tensor([0, 1], dtype=torch.int32), torch.tensor([3]), torch.zeros(1, 2, dtype=torch.int32))
    att.plan(
        torch.tensor([0, 1], dtype=torch.int32),
        torch.tensor([3], dtype=torch.int32),
        torch.zeros(1, 2, dtype=torch.int32),
    )
    with pytest.raises(ValueError, match="dtype"):
        att.run(
            torch.zeros(1, 8, 64),
            torch.zeros(4, 16, 2, 64, dtype=torch.bfloat16),
            torch.zeros(4, 16, 2, 64, dtype=torch.bfloat16),
            1.0,
        )


def test_tree_drafting_queries_subset_of_keys():
    """Tree drafting: the queries are the newest nodes, the tree keys every node drafted so far (M != N)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m_max = 9
    c = make_case([40, 70], [9, 6], m_max, 8, 2, 64, 8, torch.float32, device, seed=5)
    tree_lens = torch.tensor([9, 6], dtype=torch.int32, device=device)
    # keep the last 3 (resp. 2) nodes as queries: their mask rows, all keys
    keep = [list(range(6, 9)), list(range(4, 6))]
    q = torch.cat([c["q"][0:9][keep[0]], c["q"][9:15][keep[1]]])
    mask = torch.zeros(2, 3, m_max, dtype=torch.bool, device=device)
    mask[0, :3] = c["tree_mask"][0, keep[0]]
    mask[1, :2] = c["tree_mask"][1, keep[1]]
    indptr = torch.tensor([0, 3, 5], dtype=torch.int32, device=device)
    att = HybridTreeAttention(5, 2, 3, 8, 2, 64, 70, device, num_splits=2, block_m=16)
    att.plan(indptr, c["prefix_lens"], c["page_tables"], c["tree_slots"], mask, tree_lens)
    out = torch.full_like(q, float("nan"))
    out, lse = att.run(q, c["k_cache"], c["v_cache"], 0.125, out=out)
    ref_out, ref_lse = tree_attention_reference(
        q,
        c["k_cache"],
        c["v_cache"],
        indptr,
        c["prefix_lens"],
        c["page_tables"],
        c["tree_slots"],
        mask,
        0.125,
        tree_lens,
    )
    check(out, lse, ref_out, ref_lse, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_with_prefix_equals_full_reference(dtype):
    """The tree part merged with a prefix result computed elsewhere (here: the reference's prefix-only
    attention, as the sparse-page kernel would give) equals attention over prefix and tree together."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    c = make_case([37, 90], [5, 3], 5, 8, 2, 64, 16, dtype, device, seed=11)
    no_tree = dict(c, tree_slots=None, tree_mask=None)
    o_p, lse_p = tree_attention_reference(scale=0.125, **no_tree)
    att = HybridTreeAttention(8, 2, 5, 8, 2, 64, 90, device, num_splits=1)
    att.plan(c["qo_indptr"], c["prefix_lens"], c["page_tables"], c["tree_slots"], c["tree_mask"])
    out = att.merge_with_prefix(c["q"], c["k_cache"], c["v_cache"], o_p.to(c["q"].dtype), lse_p, 0.125)
    ref_out, _ = tree_attention_reference(scale=0.125, **c)
    assert out.dtype == dtype
    assert (out.float() - ref_out).abs().max() / ref_out.abs().max() <= TOL[dtype]


def test_wave_aware_split_choice():
    """choose_tree_splits on H100 sizes (132 SMs, 2 resident programs per SM): the batch-1 picks the sweeps
    measured best, whole waves at batch 8, the bounds, and at least 4 KV blocks per split."""
    llama_rows, qwen_rows = 3 * 8, 7 * 2  # row tiles x kv heads of one 69-node tree (128- / 64-row tiles)
    assert choose_tree_splits(llama_rows, 16384, 132, 32) == 11
    assert choose_tree_splits(qwen_rows, 16384, 132, 64) == 19
    assert choose_tree_splits(8 * llama_rows, 16384, 132, 32) == 4  # 768 programs: 2.9 waves of 264
    assert choose_tree_splits(8 * qwen_rows, 16384, 132, 64) == 7  # 784 programs: 2.97 waves
    assert choose_tree_splits(4096, 1 << 17, 132, 32) == 1  # a big batch fills the GPU alone
    assert choose_tree_splits(1, 100, 132, 64) == 1  # too short to split
    assert choose_tree_splits(1, 1 << 20, 132, 64, max_splits=8) == 8
    for programs in (1, 5, 24, 100, 500):
        for prefix in (0, 300, 5000, 70000):
            s = choose_tree_splits(programs, prefix, 132, 64)
            blocks = -(-prefix // 64)
            assert 1 <= s <= 32 and (s == 1 or -(-blocks // s) >= 4)
    assert estimate_ctas_per_sm(128, 32, 8, 3, 128) == 2 and estimate_ctas_per_sm(64, 32, 4, 2, 128) == 4
    with pytest.raises(ValueError):
        choose_tree_splits(0, 100)


def test_many_splits_with_empty_ones():
    """More splits than KV blocks for the short sequences (empty splits merge as -inf), runtime split count."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    c = make_case([70, 3, 0], [4, 2, 3], 4, 8, 2, 64, 16, torch.float32, device, seed=8)
    out, lse = run_kernel(c, 0.125, device, num_splits=7, block_m=16)
    ref_out, ref_lse = tree_attention_reference(scale=0.125, **c)
    check(out, lse, ref_out, ref_lse, torch.float32)
