"""UNIQUE page statistics and sparse page attention (Triton) against the dense fp32 torch references.

Owns no data: every test builds fresh random inputs (tests/support/sparse_inputs.py). The tie rule of the Triton
selection (larger column wins) is checked on built ties. Without CUDA the kernels run under Triton's CPU
interpreter (TRITON_INTERPRET=1), so the shapes are small; tests/gpu runs them at size.
"""

from dataclasses import dataclass

import pytest
import torch

from specray.kernels.page_stats import PageStats
from specray.kernels.reference import page_stats_reference, paged_decode_reference
from specray.kernels.sparse_pages import SparsePageAttention
from tests.support.sparse_inputs import (
    REL_TOL,
    SparseCase,
    check_sparse,
    compare_to_reference,
    paged_inputs,
    selected_sets,
    sparse_case,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


@dataclass(frozen=True)
class Case:
    prefixes: tuple[int, ...]
    rows_per_seq: int
    num_kv_heads: int
    group: int
    head_dim: int
    page_size: int
    dtype: torch.dtype
    budget: int
    sink: int = 1
    recent: int = 2
    std_weight: float = 0.5
    mean_dtype: torch.dtype = F32
    splits: int | None = None
    select: str = "triton"
    select_block: int = 4096
    seed: int = 0

    @property
    def id(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        md = "" if self.mean_dtype == F32 else "-mean16"
        return (
            f"{dt}{md}-d{self.head_dim}-ps{self.page_size}-g{self.group}-kv{self.num_kv_heads}-n{self.rows_per_seq}"
            f"-b{self.budget}-s{self.splits}-{self.select}{self.select_block}-len{'_'.join(map(str, self.prefixes))}"
        )


CASES = [
    # GQA 1, ps 8, budget 4 pages: rows above (100, 41), at (32) and below (24, 3, 0) the budget, partial pages
    # (selection in 8-score blocks: two blocks of the 14-column table)
    Case((100, 3, 41, 0, 24, 32), 1, 2, 1, 64, 8, F32, 32, recent=1, select_block=8, seed=1),
    # GQA 4, d128, ps 16, N = 5 rows per sequence, 2 splits
    Case((150, 40), 5, 2, 4, 128, 16, BF16, 64, splits=2, seed=2),
    # GQA 7 (padded to 16 rows), fp16 with fp16 page means, no recent pages, std weight 2
    Case((200, 17, 5), 1, 1, 7, 64, 16, F16, 48, recent=0, std_weight=2.0, mean_dtype=F16, seed=3),
    # GQA 7, d128, ps 8, N = 5, bf16 means, 3 splits, no sink
    Case((90, 8), 5, 1, 7, 128, 8, BF16, 40, sink=0, recent=1, mean_dtype=BF16, splits=3, seed=4),
    # GQA 4, fp32, ps 16, d64, std weight 0 (plain mean scoring), many splits (some empty), torch.topk selection
    Case((180, 47, 16), 1, 2, 4, 64, 16, F32, 64, std_weight=0.0, splits=8, select="torch", seed=5),
]


def make_attn(case: Case, sc: SparseCase) -> SparsePageAttention:
    rows, width = sc.row_tables.shape
    return SparsePageAttention(
        rows + 3, case.num_kv_heads * case.group, case.num_kv_heads, case.head_dim, case.page_size, width + 2,
        DEVICE, budget_tokens=max(case.budget, 64), block_n=16, selection_backend=case.select,
        select_block=case.select_block,
    )  # fmt: skip


def run_checked(attn: SparsePageAttention, sc: SparseCase, case: Case) -> None:
    """Plan + run into poisoned outputs (and a poisoned selection); out/lse and the selection against the fp32
    reference."""
    attn.plan(
        sc.row_tables, sc.row_prefix, case.budget, std_weight=case.std_weight, sink_pages=case.sink,
        recent_pages=case.recent, num_splits=case.splits,
    )  # fmt: skip
    out = torch.full_like(sc.q, float("nan"))
    lse = torch.full(sc.q.shape[:2], float("nan"), dtype=torch.float32, device=DEVICE)
    attn.sel_vals.fill_(float("nan"))
    scale = case.head_dim**-0.5
    got_out, got_lse = attn.run(sc.q, sc.inputs.k_cache, sc.inputs.v_cache, sc.stats.layer(0), scale, out, lse)
    assert got_out is out and got_lse is lse
    opts = dict(std_weight=case.std_weight, sink_pages=case.sink, recent_pages=case.recent)
    compare_to_reference(attn, sc, out, lse, case.budget, independent_stats=case.mean_dtype == F32, **opts)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_sparse_page_attention_matches_reference(case: Case) -> None:
    sc = sparse_case(
        list(case.prefixes), case.rows_per_seq, case.num_kv_heads, case.group, case.head_dim, case.page_size,
        case.dtype, DEVICE, mean_dtype=case.mean_dtype, seed=case.seed,
    )  # fmt: skip
    run_checked(make_attn(case, sc), sc, case)


def test_workspace_reuse_with_in_place_changes() -> None:
    """Repeated runs on one workspace: the same plan with q and prefix lengths changed in place, then a new plan
    with other rows and another split count, then the first rows again."""
    case = Case((260, 77, 130), 1, 2, 4, 64, 8, BF16, 32, recent=1, splits=3, seed=21)
    sc = sparse_case(list(case.prefixes), 1, 2, 4, 64, 8, BF16, DEVICE, seed=case.seed)
    attn = make_attn(case, sc)
    run_checked(attn, sc, case)
    assert attn._plan["num_splits"] == 3
    gen = torch.Generator().manual_seed(22)
    sc.q.copy_(torch.randn(sc.q.shape, generator=gen).to(sc.q.dtype))
    sc.row_prefix.copy_(torch.tensor([199, 77, 64], dtype=torch.int32))
    run_checked(attn, sc, case)
    other = sparse_case([150, 260], 1, 2, 4, 64, 8, BF16, DEVICE, seed=23)
    run_checked(attn, other, Case((150, 260), 1, 2, 4, 64, 8, BF16, 32, recent=1, splits=2, seed=23))
    run_checked(attn, sc, case)


def test_one_page_budget() -> None:
    """K = 1: only the recent page, or only the best page, is kept."""
    for sink, recent, seed in ((0, 1, 31), (0, 0, 32)):
        case = Case((70, 5, 9), 1, 1, 2, 64, 8, F32, 8, sink=sink, recent=recent, seed=seed)
        sc = sparse_case(list(case.prefixes), 1, 1, 2, 64, 8, F32, DEVICE, seed=seed)
        attn = SparsePageAttention(
            3, 2, 1, 64, 8, sc.row_tables.shape[1], DEVICE, budget_tokens=8, sink_pages=sink, recent_pages=recent,
        )  # fmt: skip
        run_checked(attn, sc, case)


def test_full_budget_equals_dense_attention_and_workspace_reuse() -> None:
    """With a budget covering every page the result is dense attention over the prefix; a second plan with
    other rows reuses the same workspace."""
    attn = SparsePageAttention(8, 8, 2, 64, 8, 12, DEVICE, budget_tokens=128, block_n=32)
    for seed, lens in ((11, [45, 7, 0]), (12, [88, 31])):
        sc = sparse_case(lens, 1, 2, 4, 64, 8, F32, DEVICE, seed=seed)
        attn.plan(sc.row_tables, sc.row_prefix)
        out, lse = attn.run(sc.q, sc.inputs.k_cache, sc.inputs.v_cache, sc.stats.layer(0), 0.125)
        ref_out, ref_lse = paged_decode_reference(
            sc.q, sc.inputs.k_cache, sc.inputs.v_cache, sc.row_tables, sc.row_prefix, 0.125
        )
        rel = ((out - ref_out).norm() / ref_out.norm()).item()
        assert rel <= REL_TOL[F32]
        torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mean_dtype", [F32, BF16])
def test_page_stats_match_reference(mean_dtype: torch.dtype) -> None:
    """update (one layer) and update_all (every layer, one launch), with negative padding ids skipped."""
    base = paged_inputs([40, 19], 2, 64, 8, BF16, DEVICE, seed=20)
    layers = [base.k_cache, base.k_cache * 2 + 1, base.k_cache.flip(-1).contiguous()]
    stats = PageStats(layers, mean_dtype=mean_dtype)
    ok = base.full_pages[:4]
    minus = torch.tensor([-1], dtype=torch.int32, device=DEVICE)
    ids = torch.cat([ok[:2], minus, ok[2:]])
    stats.update(1, ids)
    assert torch.all(stats.std[0] == 0) and torch.all(stats.std[2] == 0)
    stats.update_all(torch.cat([ids, minus - 4]))
    tol = 1e-6 if mean_dtype == F32 else 8e-3
    for layer in range(3):
        mean, std = page_stats_reference(layers[layer], ok)
        torch.testing.assert_close(stats.mean[layer, ok.long()].float(), mean, rtol=tol, atol=tol)
        torch.testing.assert_close(stats.std[layer, ok.long()], std, rtol=1e-5, atol=1e-5)
        untouched = torch.ones(layers[0].shape[0], dtype=torch.bool, device=DEVICE)
        untouched[ok.long()] = False
        assert torch.all(stats.std[layer, untouched] == 0)


def test_input_validation() -> None:
    sc = sparse_case([40, 9], 1, 2, 4, 64, 8, F32, DEVICE, seed=30)
    attn = SparsePageAttention(2, 8, 2, 64, 8, 8, DEVICE, budget_tokens=32)
    with pytest.raises(ValueError, match="plan"):
        attn.run(sc.q, sc.inputs.k_cache, sc.inputs.v_cache, sc.stats.layer(0), 0.125)
    with pytest.raises(ValueError, match="int32"):
        attn.plan(sc.row_tables.long(), sc.row_prefix)
    with pytest.raises(ValueError, match="prefix_lens"):
        attn.plan(sc.row_tables, sc.row_prefix.long())
    with pytest.raises(ValueError, match="rows"):
        attn.plan(sc.row_tables.repeat(2, 1), sc.row_prefix.repeat(2))
    with pytest.raises(ValueError, match="max_pages"):
        attn.plan(torch.zeros(2, 9, dtype=torch.int32, device=DEVICE), sc.row_prefix)
    with pytest.raises(ValueError, match="exceed the budget"):
        attn.plan(sc.row_tables, sc.row_prefix, 16, sink_pages=1, recent_pages=2)
    with pytest.raises(ValueError, match="workspace"):
        attn.plan(sc.row_tables, sc.row_prefix, 64)
    attn.plan(sc.row_tables, sc.row_prefix)
    k, v, stats = sc.inputs.k_cache, sc.inputs.v_cache, sc.stats.layer(0)
    with pytest.raises(ValueError, match="q must be"):
        attn.run(sc.q[:1], k, v, stats, 0.125)
    with pytest.raises(ValueError, match="dtype"):
        attn.run(sc.q.to(F16), k, v, stats, 0.125)
    with pytest.raises(ValueError, match="k_cache"):
        attn.run(sc.q, k[:, :4], v, stats, 0.125)
    with pytest.raises(ValueError, match="differ"):
        attn.run(sc.q, k, v[:-1], stats, 0.125)
    with pytest.raises(ValueError, match="stats mean"):
        attn.run(sc.q, k, v, (stats.mean[:-1], stats.std), 0.125)
    with pytest.raises(ValueError, match="stats std"):
        attn.run(sc.q, k, v, (stats.mean, stats.std.half()), 0.125)
    with pytest.raises(ValueError, match="lse_out"):
        attn.run(sc.q, k, v, stats, 0.125, lse_out=torch.empty(2, 8, dtype=F16, device=DEVICE))
    with pytest.raises(ValueError, match="multiple"):
        SparsePageAttention(2, 6, 4, 64, 8, 8, DEVICE)
    with pytest.raises(ValueError, match="head_dim"):
        SparsePageAttention(2, 8, 2, 60, 8, 8, DEVICE)
    with pytest.raises(ValueError, match="page_size"):
        SparsePageAttention(2, 8, 2, 64, 12, 8, DEVICE)
    with pytest.raises(ValueError, match="mean_dtype"):
        PageStats([k], mean_dtype=F16)
    with pytest.raises(ValueError, match="differs"):
        PageStats([k, k[:-1]])
    with pytest.raises(ValueError, match="page_ids"):
        PageStats([k]).update(0, torch.tensor([1, 2], device=DEVICE))


def test_tied_scores_follow_the_tie_rule() -> None:
    """Identical pages tie exactly: the reference may keep any of them (the kernel is then checked on the pages it
    kept), the Triton selection keeps the larger columns. The keys and the query are small integers, so every
    summation order gives the same fp32 score (exact ties in the kernels too)."""
    sc = sparse_case([80, 43], 1, 1, 4, 64, 8, F32, DEVICE, seed=40)
    k, v = sc.inputs.k_cache, sc.inputs.v_cache
    gen = torch.Generator().manual_seed(41)
    src = sc.inputs.page_tables[0, 0].long()
    k[src] = torch.randint(-3, 4, k[src].shape, generator=gen).float().to(DEVICE)
    sc.q[0] = torch.randint(-3, 4, sc.q[0].shape, generator=gen).float().to(DEVICE)
    for col in range(1, 10):  # the first sequence's complete pages all equal its first page
        k[sc.inputs.page_tables[0, col].long()] = k[src]
        v[sc.inputs.page_tables[0, col].long()] = v[src] + col  # values differ: the kept pages matter
    sc.stats.update(0, sc.inputs.full_pages)
    attn = SparsePageAttention(2, 4, 1, 64, 8, sc.row_tables.shape[1], DEVICE, budget_tokens=32, block_n=16)
    check_sparse(attn, sc, 32, sink_pages=1, recent_pages=1)
    # columns 1..8 tie for the 2 free slots of 4 (sink 0 and recent 9 forced): the tie rule keeps 8 and 7
    assert selected_sets(attn)[0][0] == {0, 7, 8, 9}
