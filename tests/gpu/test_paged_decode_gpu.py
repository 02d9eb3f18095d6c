"""Paged decode attention on CUDA at realistic sizes, against the dense torch reference.

Owns no data: each test builds fresh random inputs on the GPU. Skipped without CUDA (tests/gpu/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from specray.kernels.paged_decode import PagedDecodeAttention, choose_num_splits
from specray.kernels.reference import paged_decode_reference

REL_TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 1e-2}
LSE_TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-3}
BAD_PAGE = 2**31 - 1
LONG_LENS = [32768, 1, 17, 5000, 12345, 31999, 100, 2048]


def make_inputs(
    seq_lens: list[int],
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: torch.dtype,
    *,
    window: int | None = None,
    seed: int = 0,
    max_pages: int | None = None,
) -> dict[str, torch.Tensor]:
    """Random q / paged KV with shuffled page ids; unused cache slots and page-table padding are poison."""
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(seed)
    batch = len(seq_lens)
    pages_per_seq = [max(1, -(-n // page_size)) for n in seq_lens]
    max_pages = max_pages or max(pages_per_seq) + 1
    num_pages = sum(pages_per_seq) + 7
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    q = torch.randn(batch, num_q_heads, head_dim, generator=gen, device=dev).to(dtype)  # [B, Hq, D]
    k_cache = torch.randn(shape, generator=gen, device=dev).to(dtype)
    v_cache = torch.randn(shape, generator=gen, device=dev).to(dtype)
    valid = torch.zeros(num_pages, page_size, dtype=torch.bool, device=dev)  # slots of visible tokens
    page_tables = torch.full((batch, max_pages), BAD_PAGE, dtype=torch.int32, device=dev)  # [B, P]
    perm = torch.randperm(num_pages, generator=gen, device=dev)
    used = 0
    for b, n in enumerate(seq_lens):
        ids = perm[used : used + pages_per_seq[b]]
        used += pages_per_seq[b]
        page_tables[b, : ids.numel()] = ids.int()
        start = 0 if window is None else max(0, n - window)
        pos = torch.arange(start, n, device=dev)
        valid[ids.long()[pos // page_size], pos % page_size] = True
    k_cache[~valid] = float("nan")
    v_cache[~valid] = float("nan")
    return {
        "q": q,
        "k_cache": k_cache,
        "v_cache": v_cache,
        "page_tables": page_tables,
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32, device=dev),
    }


def check(out: torch.Tensor, lse: torch.Tensor, inputs: dict, scale: float, window: int | None) -> None:
    dtype = inputs["q"].dtype
    assert not torch.isnan(out).any(), "output has unwritten (NaN) elements"
    assert not torch.isnan(lse).any(), "lse has unwritten (NaN) elements"
    ref_out, ref_lse = paged_decode_reference(**inputs, scale=scale, sliding_window=window)
    rel = ((out.float() - ref_out.float()).norm() / ref_out.float().norm()).item()
    assert rel <= REL_TOL[dtype], f"relative error {rel:.3e} > {REL_TOL[dtype]}"
    torch.testing.assert_close(lse, ref_lse, rtol=LSE_TOL[dtype], atol=LSE_TOL[dtype])


def run_poisoned(attn: PagedDecodeAttention, inputs: dict, scale: float, window: int | None):
    q = inputs["q"]
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:2], float("nan"), dtype=torch.float32, device=q.device)
    attn.run(**inputs, scale=scale, sliding_window=window, out=out, lse_out=lse)
    return out, lse


@pytest.mark.parametrize(
    "page_size,window,num_splits",
    [
        (16, None, None),
        (16, None, 1),
        (8, None, None),
        (32, None, 7),
        (16, 4096, None),
        (16, 1, 3),
        (16, None, 128),
    ],
)
def test_long_context_bf16(page_size: int, window: int | None, num_splits: int | None) -> None:
    """32 q / 8 kv heads, d=128, bf16, ragged sequence lengths up to 32K."""
    batch, hq, hkv, d = len(LONG_LENS), 32, 8, 128
    splits = num_splits or choose_num_splits(batch, hkv, max(LONG_LENS))
    inputs = make_inputs(LONG_LENS, hq, hkv, d, page_size, torch.bfloat16, window=window, seed=page_size)
    attn = PagedDecodeAttention(batch, hq, hkv, d, splits, "cuda")
    out, lse = run_poisoned(attn, inputs, d**-0.5, window)
    check(out, lse, inputs, d**-0.5, window)


@pytest.mark.parametrize(
    "dtype,hq,hkv,d,page_size",
    [
        (torch.float32, 32, 8, 128, 16),
        (torch.float16, 28, 4, 128, 16),  # GQA 7
        (torch.bfloat16, 8, 8, 64, 8),  # GQA 1
        (torch.bfloat16, 16, 2, 256, 16),  # GQA 8, d=256
        (torch.float32, 28, 4, 64, 32),
    ],
)
def test_dtypes_and_group_sizes(dtype: torch.dtype, hq: int, hkv: int, d: int, page_size: int) -> None:
    lens = [4097, 1, 300, 2500]
    inputs = make_inputs(lens, hq, hkv, d, page_size, dtype, seed=hq + d)
    for splits in (1, choose_num_splits(len(lens), hkv, max(lens))):
        attn = PagedDecodeAttention(len(lens), hq, hkv, d, splits, "cuda")
        out, lse = run_poisoned(attn, inputs, d**-0.5, None)
        check(out, lse, inputs, d**-0.5, None)


def test_cuda_graph_replay_with_new_lengths() -> None:
    """Capture once with short sequences, then replay on other lengths and page tables written in place
    (partials poisoned with NaN before every replay)."""
    batch, hq, hkv, d, ps, max_pages = 4, 32, 8, 128, 16, 256
    attn = PagedDecodeAttention(batch, hq, hkv, d, 16, "cuda")
    first = make_inputs([1, 2, 3, 4], hq, hkv, d, ps, torch.bfloat16, seed=1, max_pages=max_pages)
    second = make_inputs([4000, 1, 999, 2048], hq, hkv, d, ps, torch.bfloat16, seed=2, max_pages=max_pages)
    # Static buffers the graph reads; the KV cache is shared (same number of pages in both).
    num_pages = max(first["k_cache"].shape[0], second["k_cache"].shape[0])
    k_cache = torch.zeros(num_pages, ps, hkv, d, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    static = {k: first[k].clone() for k in ("q", "page_tables", "seq_lens")}
    out = torch.empty_like(static["q"])
    lse = torch.empty(batch, hq, dtype=torch.float32, device="cuda")

    def load(inputs: dict) -> None:
        for name in ("q", "page_tables", "seq_lens"):
            static[name].copy_(inputs[name])
        n = inputs["k_cache"].shape[0]
        k_cache[:n].copy_(inputs["k_cache"])
        v_cache[:n].copy_(inputs["v_cache"])

    def step() -> None:
        attn.run(**static, k_cache=k_cache, v_cache=v_cache, scale=d**-0.5, out=out, lse_out=lse)

    load(first)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    for inputs in (second, first, second, second):
        load(inputs)
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        attn.partial_out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check(out, lse, dict(static, k_cache=k_cache, v_cache=v_cache), d**-0.5, None)


@pytest.mark.parametrize("hq,hkv,splits", [(32, 8, 50), (12, 2, 128), (28, 4, 33)])
def test_repeated_runs_are_deterministic(hq: int, hkv: int, splits: int) -> None:
    """Many back-to-back launches on one workspace, partials poisoned with NaN before each: a merge that
    read a stale or unwritten partial would give NaN or a different result, so every run must equal the
    first bit for bit."""
    lens = [32768, 1, 9000] if hkv > 2 else [131072]
    inputs = make_inputs(lens, hq, hkv, 128, 16, torch.bfloat16, seed=splits)
    attn = PagedDecodeAttention(len(lens), hq, hkv, 128, splits, "cuda")
    first_out, first_lse = run_poisoned(attn, inputs, 128**-0.5, None)
    check(first_out, first_lse, inputs, 128**-0.5, None)
    for _ in range(50):
        attn.partial_out.fill_(float("nan"))
        attn.partial_lse.fill_(float("nan"))
        out, lse = run_poisoned(attn, inputs, 128**-0.5, None)
        assert torch.equal(out, first_out) and torch.equal(lse, first_lse)
