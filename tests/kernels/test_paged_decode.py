"""Correctness tests of the Triton paged decode attention against the dense torch reference.

Owns no data: every test builds fresh random inputs. Without CUDA the kernels run under Triton's CPU
interpreter (TRITON_INTERPRET=1, which tests/conftest.py sets before triton is imported), so the shapes are
tiny; with CUDA the same tests run compiled on the GPU.
"""

import math
from dataclasses import dataclass

import pytest
import torch

from specray.kernels.paged_decode import PagedDecodeAttention, choose_num_splits
from specray.kernels.reference import paged_decode_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
REL_TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 1e-2}
LSE_TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-3}
BAD_PAGE = 2**31 - 1  # page-table padding: reading it would fault (or read far out of bounds)


@dataclass(frozen=True)
class Case:
    seq_lens: tuple[int, ...]
    num_kv_heads: int
    group: int
    head_dim: int
    page_size: int
    dtype: torch.dtype
    num_splits: int
    block_n: int | None = None
    window: int | None = None
    seed: int = 0

    @property
    def id(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        win = f"-w{self.window}" if self.window else ""
        return (
            f"{dt}-d{self.head_dim}-ps{self.page_size}-g{self.group}-kv{self.num_kv_heads}"
            f"-s{self.num_splits}-bn{self.block_n}{win}-len{'_'.join(map(str, self.seq_lens))}"
        )


def make_inputs(
    seq_lens: list[int],
    num_kv_heads: int,
    group: int,
    head_dim: int,
    page_size: int,
    dtype: torch.dtype,
    *,
    window: int | None = None,
    extra_pages: int = 3,
    seed: int = 0,
    device: torch.device = DEVICE,
) -> dict[str, torch.Tensor]:
    """Random q and paged KV cache with shuffled page ids; every slot no valid token uses is NaN."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(seq_lens)
    pages_per_seq = [max(1, math.ceil(n / page_size)) for n in seq_lens]
    max_pages = max(pages_per_seq) + 1  # one padding column beyond the longest sequence
    num_pages = sum(pages_per_seq) + extra_pages
    num_q_heads = num_kv_heads * group

    q = torch.randn(batch, num_q_heads, head_dim, generator=gen).to(dtype)  # [B, Hq, D]
    k_cache = torch.full((num_pages, page_size, num_kv_heads, head_dim), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    page_tables = torch.full((batch, max_pages), BAD_PAGE, dtype=torch.int32)  # [B, P]
    perm = torch.randperm(num_pages, generator=gen).tolist()
    for b, n in enumerate(seq_lens):
        ids = [perm.pop() for _ in range(pages_per_seq[b])]
        page_tables[b, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        start = 0 if window is None else max(0, n - window)
        for pos in range(start, n):  # only visible tokens get finite values
            page, slot = ids[pos // page_size], pos % page_size
            k_cache[page, slot] = torch.randn(num_kv_heads, head_dim, generator=gen)
            v_cache[page, slot] = torch.randn(num_kv_heads, head_dim, generator=gen)
    return {
        "q": q.to(device),
        "k_cache": k_cache.to(dtype).to(device),
        "v_cache": v_cache.to(dtype).to(device),
        "page_tables": page_tables.to(device),
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32, device=device),
    }


def run_and_check(attn: PagedDecodeAttention, inputs: dict, window: int | None, dtype: torch.dtype) -> None:
    q = inputs["q"]
    scale = q.shape[-1] ** -0.5
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:2], float("nan"), dtype=torch.float32, device=q.device)
    got_out, got_lse = attn.run(**inputs, scale=scale, sliding_window=window, out=out, lse_out=lse)
    assert got_out is out and got_lse is lse
    assert not torch.isnan(out).any(), "output has unwritten (NaN) elements"
    assert not torch.isnan(lse).any(), "lse has unwritten (NaN) elements"

    ref_out, ref_lse = paged_decode_reference(**inputs, scale=scale, sliding_window=window)
    rel = ((out.float() - ref_out.float()).norm() / ref_out.float().norm().clamp_min(1e-30)).item()
    assert rel <= REL_TOL[dtype], f"relative error {rel:.3e} > {REL_TOL[dtype]}"
    tol = LSE_TOL[dtype]
    torch.testing.assert_close(lse, ref_lse, rtol=tol, atol=tol)


F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
CASES = [
    # one split, GQA 1, blocks of 16 = 2 pages of 8
    Case((1, 13, 40), 2, 1, 64, 8, F32, 1, block_n=16, seed=1),
    # GQA 4, block of 32 spans 2 pages of 16; len 100 -> 4 blocks over 3 splits (last split empty)
    Case((17, 1, 64, 100), 2, 4, 64, 16, F32, 3, block_n=32, seed=2),
    # GQA 7 (padded to 16), d=128, block of 16 spans 2 pages of 8, 4 splits
    Case((33, 5), 1, 7, 128, 8, F32, 4, block_n=16, seed=3),
    # bf16, default block (64 tokens = 4 pages of 16), ragged lengths
    Case((70, 129, 1), 2, 4, 128, 16, BF16, 2, seed=4),
    # bf16, GQA 7, many more splits than blocks
    Case((9, 50), 2, 7, 64, 8, BF16, 8, seed=5),
    # sliding window: start inside a block, windows longer / shorter than the sequence
    Case((1, 20, 21, 75), 2, 4, 64, 16, F32, 3, block_n=16, window=20, seed=6),
    Case((1, 30, 47), 1, 7, 128, 8, BF16, 2, block_n=32, window=1, seed=7),
    Case((200, 3), 1, 1, 64, 8, F32, 1, block_n=32, window=50, seed=8),
    # fp16, page of 32 larger than the 16-token block
    Case((45, 3), 2, 4, 64, 32, F16, 2, block_n=16, seed=9),
    # head_dim 96 (padded to 128 inside the kernel), GQA 1
    Case((37, 8), 2, 1, 96, 16, F32, 2, block_n=16, seed=10),
    # several blocks per split (19 and 17 blocks over 4 splits), GQA 7 and 1 at d=128
    Case((300, 257), 1, 7, 128, 16, F32, 4, block_n=16, seed=13),
    Case((130, 64, 1), 2, 1, 128, 16, BF16, 3, block_n=16, seed=14),
    Case((90, 33), 1, 4, 128, 8, F16, 5, block_n=16, window=40, seed=15),
    # padding slot of a batch (seq_len 0), one split and several
    Case((0, 11), 1, 4, 64, 8, F32, 1, block_n=16, seed=11),
    Case((11, 0), 1, 4, 64, 8, BF16, 3, block_n=16, seed=12),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_reference(case: Case) -> None:
    inputs = make_inputs(
        list(case.seq_lens),
        case.num_kv_heads,
        case.group,
        case.head_dim,
        case.page_size,
        case.dtype,
        window=case.window,
        seed=case.seed,
    )
    batch = len(case.seq_lens)
    attn = PagedDecodeAttention(
        max_batch_size=batch + 2,  # workspace larger than the batch used
        num_q_heads=case.num_kv_heads * case.group,
        num_kv_heads=case.num_kv_heads,
        head_dim=case.head_dim,
        num_splits=case.num_splits,
        device=DEVICE,
        block_n=case.block_n,
    )
    run_and_check(attn, inputs, case.window, case.dtype)


def test_repeated_runs_reuse_the_workspace() -> None:
    """Repeated runs on one workspace (poisoned once with NaN), ragged batches of several sizes, outputs
    poisoned before every run: each run matches the reference."""
    attn = PagedDecodeAttention(4, 8, 2, 64, 3, DEVICE, block_n=16)
    attn.partial_out.fill_(float("nan"))
    attn.partial_lse.fill_(float("nan"))
    batches = ((31, [40, 0, 21]), (32, [5]), (31, [40, 0, 21]))
    for seed, lens in batches:
        inputs = make_inputs(lens, 2, 4, 64, 8, F32, seed=seed)
        run_and_check(attn, inputs, None, F32)


def test_empty_sequence_gives_zero_output_and_neg_inf_lse() -> None:
    inputs = make_inputs([0, 5], 1, 4, 64, 8, F32, seed=23)
    attn = PagedDecodeAttention(2, 4, 1, 64, 2, DEVICE, block_n=16)
    out, lse = attn.run(**inputs, scale=0.125)
    assert torch.all(out[0] == 0)
    assert torch.all(torch.isneginf(lse[0]))
    assert torch.isfinite(lse[1]).all()


def test_strided_q_and_out_and_workspace_reuse() -> None:
    """q and out as views into wider buffers; a second call on new data reuses the workspace."""
    attn = PagedDecodeAttention(4, 8, 2, 64, 3, DEVICE, block_n=16)
    for seed, lens in ((24, [23, 7]), (25, [2, 41, 16])):
        inputs = make_inputs(lens, 2, 4, 64, 8, F32, seed=seed)
        q = inputs.pop("q")
        batch = q.shape[0]
        qkv = torch.randn(batch, 12, 64, device=DEVICE)  # fused q|k|v heads, q = first 8
        qkv[:, :8] = q
        q_view = qkv[:, :8]
        out_buf = torch.full((batch, 8, 80), float("nan"), device=DEVICE)
        out_view = out_buf[:, :, 8:72]
        out, lse = attn.run(q_view, **inputs, scale=0.125, out=out_view)
        ref_out, ref_lse = paged_decode_reference(q, **inputs, scale=0.125)
        assert not torch.isnan(out_view).any()
        assert torch.isnan(out_buf[:, :, :8]).all() and torch.isnan(out_buf[:, :, 72:]).all()
        rel = ((out_view - ref_out).norm() / ref_out.norm()).item()
        assert rel <= 1e-3
        torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-4)


def test_input_validation() -> None:
    attn = PagedDecodeAttention(2, 8, 2, 64, 2, DEVICE)
    good = make_inputs([5, 9], 2, 4, 64, 8, F32, seed=26)

    def call(**over):
        args = dict(good, scale=0.125) | over
        attn.run(**args)

    with pytest.raises(ValueError, match="batch size"):
        call(q=torch.randn(3, 8, 64, device=DEVICE))
    with pytest.raises(ValueError, match="heads"):
        call(q=torch.randn(2, 4, 64, device=DEVICE))
    with pytest.raises(ValueError, match="dtype"):
        call(q=good["q"].to(torch.float16))
    with pytest.raises(ValueError, match="dtype"):
        call(q=good["q"].to(torch.float64))
    with pytest.raises(ValueError, match="contiguous"):
        call(q=torch.randn(2, 64, 8, device=DEVICE).transpose(1, 2))
    with pytest.raises(ValueError, match="kv heads"):
        kc = torch.randn(4, 8, 1, 64, device=DEVICE)
        call(k_cache=kc, v_cache=kc)
    with pytest.raises(ValueError, match="differ"):
        call(v_cache=good["v_cache"][:-1])
    with pytest.raises(ValueError, match="int32"):
        call(page_tables=good["page_tables"].long())
    with pytest.raises(ValueError, match="int32"):
        call(seq_lens=good["seq_lens"].long())
    with pytest.raises(ValueError, match="page_tables"):
        call(page_tables=good["page_tables"][:1])
    with pytest.raises(ValueError, match="sliding_window"):
        call(sliding_window=0)
    with pytest.raises(ValueError, match="out"):
        call(out=torch.empty(2, 8, 64, dtype=torch.bfloat16, device=DEVICE))
    with pytest.raises(ValueError, match="lse_out"):
        call(lse_out=torch.empty(2, 8, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="multiple"):
        PagedDecodeAttention(2, 6, 4, 64, 2, DEVICE)
    with pytest.raises(ValueError, match="head_dim"):
        PagedDecodeAttention(2, 8, 2, 60, 2, DEVICE)
    with pytest.raises(ValueError, match="num_splits"):
        PagedDecodeAttention(2, 8, 2, 64, 0, DEVICE)


def test_choose_num_splits() -> None:
    # Short sequences never get splits shorter than the minimum.
    assert choose_num_splits(1, 8, 100) == 1
    # A single long sequence is split to fill the GPU, bounded by max_splits.
    assert 8 <= choose_num_splits(1, 8, 32768) <= 128
    # A big batch already fills the GPU.
    assert choose_num_splits(256, 8, 32768) == 1
    # Monotone in max_seq_len.
    values = [choose_num_splits(2, 8, n) for n in (1, 256, 1024, 4096, 32768)]
    assert values == sorted(values)
    with pytest.raises(ValueError):
        choose_num_splits(0, 8, 10)
