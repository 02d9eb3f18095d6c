"""Hybrid Tree Attention at full size on CUDA against the dense fp32 reference (fresh random inputs,
poisoned outputs and workspace): ragged batches, page sizes 8/16, head dims 64/128, GQA 1/4/7,
N = 1, 5, 69, 128, bf16 and fp16."""

from __future__ import annotations

import pytest
import torch

from specray.kernels.reference_tree import tree_attention_reference
from tests.kernels.test_tree_attention import check, make_case, run_kernel

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ps,d", [(16, 128), (8, 64)])
@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("n", [1, 5, 69, 128])
def test_tree_attention_full_size(dtype, ps, d, group, n):
    hkv = 8 if group < 7 else 4
    prefix_lens = [4000, 17, 1500, 0, 2777][: 3 if n >= 69 else 5]
    n_qs = [n] + [max(1, n - 3 * i) for i in range(1, len(prefix_lens))]
    c = make_case(prefix_lens, n_qs, n, group * hkv, hkv, d, ps, dtype, "cuda", seed=n * 31 + group)
    out, lse = run_kernel(c, d**-0.5, "cuda")
    ref_out, ref_lse = tree_attention_reference(scale=d**-0.5, **c)
    check(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("num_splits", [None, 1, 4, 7, 11, 16])
@pytest.mark.parametrize("hq,hkv", [(32, 8), (12, 2)])
def test_batch8_tree_split_counts(num_splits, hq, hkv):
    """Batch 8 of 69-node trees (Llama-8B and Qwen2.5-1.5B attention shapes), the wave-aware default split
    count and explicit ones (the count is a runtime kernel argument), against the fp32 reference."""
    prefix_lens = [3000, 17, 2500, 0, 1200, 64, 2999, 700]
    n_qs = [69, 69, 40, 69, 1, 69, 69, 12]
    c = make_case(prefix_lens, n_qs, 69, hq, hkv, 128, 16, torch.bfloat16, "cuda", seed=hq + (num_splits or 0))
    kw = {} if num_splits is None else {"num_splits": num_splits}
    out, lse = run_kernel(c, 128**-0.5, "cuda", **kw)
    ref_out, ref_lse = tree_attention_reference(scale=128**-0.5, **c)
    check(out, lse, ref_out, ref_lse, torch.bfloat16)
