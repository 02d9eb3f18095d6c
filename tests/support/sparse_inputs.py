"""Random paged inputs and checks shared by the sparse page attention and chunk score tests (CPU interpreter
and GPU). Owns no data: every helper builds fresh tensors from a seed.

Every cache slot that no valid token uses is NaN and page-table padding is an out-of-range page id, so a kernel
that reads past a prefix or a page table's end produces NaN (or faults) instead of a plausible result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specray.kernels.page_stats import PageStats
from specray.kernels.reference import sparse_page_attention_reference, unique_page_scores_reference
from specray.kernels.sparse_pages import SparsePageAttention

BAD_PAGE = 2**31 - 1
REL_TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 1e-2}
LSE_TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-3}


@dataclass
class PagedInputs:
    k_cache: torch.Tensor  # [num_pages, page_size, Hkv, D]
    v_cache: torch.Tensor  # [num_pages, page_size, Hkv, D]
    page_tables: torch.Tensor  # [S, P] int32, padded with BAD_PAGE
    lens: torch.Tensor  # [S] int32
    full_pages: torch.Tensor  # [n] int32 ids of the complete pages of every sequence


def paged_inputs(
    lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    seed: int = 0,
    extra_pages: int = 3,
    extra_columns: int = 1,
) -> PagedInputs:
    """Random K/V for sequences of ``lens`` tokens in shuffled pages; unused slots NaN."""
    gen = torch.Generator().manual_seed(seed)
    pages_per_seq = [-(-n // page_size) for n in lens]
    num_pages = sum(pages_per_seq) + extra_pages
    width = max(max(pages_per_seq), 1) + extra_columns
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen)
    v_cache = torch.randn(shape, generator=gen)
    valid = torch.zeros(num_pages, page_size, dtype=torch.bool)
    page_tables = torch.full((len(lens), width), BAD_PAGE, dtype=torch.int32)
    perm = torch.randperm(num_pages, generator=gen)
    used, full = 0, []
    for s, n in enumerate(lens):
        ids = perm[used : used + pages_per_seq[s]]
        used += pages_per_seq[s]
        page_tables[s, : ids.numel()] = ids.int()
        pos = torch.arange(n)
        valid[ids[pos // page_size], pos % page_size] = True
        full.append(ids[: n // page_size])
    k_cache[~valid] = float("nan")
    v_cache[~valid] = float("nan")
    return PagedInputs(
        k_cache.to(dtype).to(device),
        v_cache.to(dtype).to(device),
        page_tables.to(device),
        torch.tensor(lens, dtype=torch.int32, device=device),
        torch.cat(full).int().to(device),
    )


@dataclass
class SparseCase:
    inputs: PagedInputs
    stats: PageStats
    q: torch.Tensor  # [R, Hq, D]
    row_tables: torch.Tensor  # [R, P] int32
    row_prefix: torch.Tensor  # [R] int32


def sparse_case(
    prefix_lens: list[int],
    rows_per_seq: int,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    page_size: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    mean_dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> SparseCase:
    """Sequences with the given prefixes, ``rows_per_seq`` query rows each, statistics of the complete pages."""
    inputs = paged_inputs(prefix_lens, num_kv_heads, head_dim, page_size, dtype, device, seed=seed)
    stats = PageStats([inputs.k_cache], mean_dtype=mean_dtype)
    stats.update(0, inputs.full_pages)
    gen = torch.Generator().manual_seed(seed + 1000)
    rows = len(prefix_lens) * rows_per_seq
    q = torch.randn(rows, num_kv_heads * group, head_dim, generator=gen).to(dtype).to(device)
    row_tables = inputs.page_tables.repeat_interleave(rows_per_seq, dim=0).contiguous()
    row_prefix = inputs.lens.repeat_interleave(rows_per_seq).contiguous()
    return SparseCase(inputs, stats, q, row_tables, row_prefix)


def selected_sets(attn: SparsePageAttention) -> list[list[set[int]]]:
    vals, idx = (t.cpu() for t in attn.selection())
    return [
        [{int(c) for c, v in zip(idx[r, h], vals[r, h], strict=True) if v > float("-inf")} for h in range(idx.shape[1])]
        for r in range(idx.shape[0])
    ]


def check_sparse(
    attn: SparsePageAttention,
    case: SparseCase,
    budget_tokens: int,
    *,
    std_weight: float = 0.5,
    sink_pages: int = 1,
    recent_pages: int = 2,
    num_splits: int | None = None,
    independent_stats: bool = True,
) -> None:
    """Plan + run with poisoned outputs; compare out/lse with the fp32 reference and the selected page sets.
    ``independent_stats``: the reference recomputes the statistics from the keys (fp32 means only)."""
    q = case.q
    scale = q.shape[-1] ** -0.5
    attn.plan(
        case.row_tables, case.row_prefix, budget_tokens, std_weight=std_weight, sink_pages=sink_pages,
        recent_pages=recent_pages, num_splits=num_splits,
    )  # fmt: skip
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:2], float("nan"), dtype=torch.float32, device=q.device)
    got_out, got_lse = attn.run(q, case.inputs.k_cache, case.inputs.v_cache, case.stats.layer(0), scale, out, lse)
    assert got_out is out and got_lse is lse
    compare_to_reference(attn, case, out, lse, budget_tokens, std_weight=std_weight, sink_pages=sink_pages,
                         recent_pages=recent_pages, independent_stats=independent_stats)


def compare_to_reference(
    attn: SparsePageAttention,
    case: SparseCase,
    out: torch.Tensor,
    lse: torch.Tensor,
    budget_tokens: int,
    *,
    std_weight: float = 0.5,
    sink_pages: int = 1,
    recent_pages: int = 2,
    independent_stats: bool = True,
) -> None:
    """out/lse of the last run fully written and equal to the fp32 reference; the selection equal to the
    reference's up to exactly tied scores."""
    q, dtype = case.q, case.q.dtype
    assert not torch.isnan(out).any(), "output has unwritten (NaN) elements"
    assert not torch.isnan(lse).any(), "lse has unwritten (NaN) elements"
    mean, std = (None, None) if independent_stats else case.stats.layer(0)
    args = (q, case.inputs.k_cache, case.inputs.v_cache, case.row_tables, case.row_prefix, q.shape[-1] ** -0.5)
    opts = dict(mean=mean, std=std, std_weight=std_weight, sink_pages=sink_pages, recent_pages=recent_pages)
    ref_out, ref_lse, ref_sel = sparse_page_attention_reference(*args, budget_tokens, **opts)
    got_sel = selected_sets(attn)
    if got_sel != ref_sel:
        check_near_ties(case, got_sel, ref_sel, mean, std, std_weight, sink_pages, recent_pages)
        ref_out, ref_lse, _ = sparse_page_attention_reference(*args, budget_tokens, **opts, selected=got_sel)
    rel = ((out.float() - ref_out.float()).norm() / ref_out.float().norm().clamp_min(1e-30)).item()
    assert rel <= REL_TOL[dtype], f"relative error {rel:.3e} > {REL_TOL[dtype]}"
    tol = LSE_TOL[dtype]
    torch.testing.assert_close(lse, ref_lse.to(lse.device), rtol=tol, atol=tol)


def check_near_ties(
    case: SparseCase,
    got: list[list[set[int]]],
    ref: list[list[set[int]]],
    mean: torch.Tensor | None,
    std: torch.Tensor | None,
    std_weight: float,
    sink_pages: int,
    recent_pages: int,
    rtol: float = 2e-6,
) -> None:
    """A kernel selection may differ from the reference's only by pages whose fp32 reference scores tie (within
    rounding) with the selection boundary, the lowest score the reference kept."""
    scores = unique_page_scores_reference(
        case.q, case.inputs.k_cache, case.row_tables, case.row_prefix, mean=mean, std=std, std_weight=std_weight
    )
    page_size = case.inputs.k_cache.shape[1]
    for r, (got_row, ref_row) in enumerate(zip(got, ref, strict=True)):
        n_full = int(case.row_prefix[r]) // page_size
        forced = set(range(min(sink_pages, n_full))) | set(range(max(0, n_full - recent_pages), n_full))
        for h, (g, e) in enumerate(zip(got_row, ref_row, strict=True)):
            if g == e:
                continue
            assert len(g) == len(e) and forced <= g, f"row {r} head {h}: kept {sorted(g)}, reference {sorted(e)}"
            sc = scores[r][h].double()
            boundary = min(float(sc[c]) for c in e - forced)
            tol = rtol * float(sc.abs().max()) + 1e-6
            for c in g ^ e:
                assert abs(float(sc[c]) - boundary) <= tol, (
                    f"row {r} head {h}: page {c} (score {float(sc[c]):.7g}) differs from the reference selection "
                    f"and is not tied with its boundary {boundary:.7g}"
                )
