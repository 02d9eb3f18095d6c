"""The fused all-reduce path on a one-rank NCCL world (any single GPU): the symmetric-memory set-up
(`TPAllReduce(fuse_norm=True)`), the fused kernel with W = 1, and the L2 prefetch forked beside it, eagerly and
captured in a CUDA graph. Oracle: with one rank the sum is the partial itself, so four dependent fused calls
must match `specray.kernels.fused.add_rms_norm` on the partials (within one bf16 rounding step of the norm)."""

from __future__ import annotations

import os
import time

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")


def test_one_rank_fused_sums_with_the_prefetch_eager_and_in_a_graph():
    import torch.distributed as dist

    from specray.kernels import fused
    from specray.models.tp_comm import PendingSum, TPAllReduce
    from tests.support.fused_chain import replay_in_graph, within_a_norm_rounding

    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    port = 29900 + int(time.time()) % 90
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, device_id=dev)
    try:
        red = TPAllReduce(None, dtype=torch.bfloat16, device=dev, symmetric_memory=True, max_bytes=1 << 20,
                          fuse_norm=True)
        assert red.uses_symmetric_memory, red.fallback_reason
        assert red.fuses_norm, red.fuse_reason
        red.prefetch_bytes = 4 << 20
        H, rows, eps = 4096, 5, 1e-5
        g = torch.Generator(device=dev).manual_seed(0)
        w = (1 + 0.3 * torch.randn(H, device=dev, generator=g)).bfloat16()
        nxt = torch.randn(4096, 4096, device=dev, generator=g).bfloat16()  # the "next projection"
        before = nxt.clone()

        def chain(h, resid, reference: bool):
            for i in range(4):
                if reference:
                    h, resid = fused.add_rms_norm(h * 0.5, resid, w, eps)
                else:
                    part = red.partial_region(i % 2, rows, H)
                    torch.mul(h, 0.5, out=part)
                    red.publish(i % 2, part)
                    h, resid = PendingSum(red, i % 2, part, nxt).reduce_norm(resid, w, eps)
            return h

        h0 = torch.randn(rows, H, device=dev, generator=g).bfloat16()
        r0 = torch.randn(rows, H, device=dev, generator=g).bfloat16()
        want = chain(h0.clone(), r0.clone(), True)

        assert within_a_norm_rounding(chain(h0.clone(), r0.clone(), False), want)
        out = replay_in_graph(lambda h, r: chain(h, r, False), h0, r0, replays=20)
        assert within_a_norm_rounding(out, want)
        assert torch.equal(nxt, before)  # the prefetch only reads
    finally:
        dist.destroy_process_group()
