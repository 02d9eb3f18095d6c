"""Shared by the GPU tests of the fused tensor-parallel all-reduce + RMSNorm (`tests/gpu/test_tp_gpu.py`,
`tests/gpu/test_tp_one_rank_gpu.py`): the comparison of a fused result with its unfused reference, and a chain
of dependent fused calls captured in one CUDA graph and replayed. Owns no data."""

from __future__ import annotations

from collections.abc import Callable

import torch


def within_a_norm_rounding(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The norm's sum of squares may reduce in another order: a rounding step at most, on few elements."""
    rtol = 1e-5 if a.dtype == torch.float32 else 2 ** -7
    return bool(torch.allclose(a.float(), b.float(), rtol=rtol, atol=0) and (a != b).float().mean().item() < 1e-2)


def replay_in_graph(chain: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], h0: torch.Tensor,
                    r0: torch.Tensor, replays: int) -> torch.Tensor:
    """`chain(h, residual)` warmed up on a side stream, captured in a CUDA graph on static copies of h0 and r0,
    then replayed `replays` times from fresh copies; returns the graph's output after the last replay."""
    static_h, static_r = h0.clone(), r0.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        chain(static_h.clone(), static_r.clone())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(static_h, static_r)
    for _ in range(replays):
        static_h.copy_(h0)
        static_r.copy_(r0)
        graph.replay()
    torch.cuda.synchronize()
    return out
