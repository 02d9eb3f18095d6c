"""Fused RMSNorm / add+RMSNorm / RoPE / SiLU*mul kernels on CUDA at Llama-3-8B sizes, against their torch refs.

Owns no data: each test builds fresh random inputs on the GPU. Skipped without CUDA (tests/gpu/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from specray.kernels import fused, rotary

DEV = torch.device("cuda")
HIDDEN, INTER, NUM_Q, NUM_KV, HEAD_DIM = 4096, 14336, 32, 8, 128
EPS = 1e-5
MAX_POS = 131072
REL_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    assert torch.isfinite(got).all(), "output has non-finite values (unwritten NaN poison?)"
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    gen = torch.Generator(device=DEV).manual_seed(seed)
    v = torch.randn(*shape, generator=gen, device=DEV)
    v = torch.where(v.abs() < 0.05, torch.copysign(torch.full_like(v, 0.05), v), v)  # never zero
    return (v * scale + shift).to(dtype)


def check(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert rel_err(got, ref) <= REL_TOL[dtype]
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    else:  # at most ~2 rounding steps apart element by element
        torch.testing.assert_close(got, ref, rtol=1.6e-2 if dtype == torch.bfloat16 else 2.5e-3, atol=1e-5)


def rope_tables() -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / 500000.0 ** (torch.arange(0, HEAD_DIM, 2, device=DEV, dtype=torch.int64).float() / HEAD_DIM)
    freqs = torch.arange(MAX_POS, device=DEV, dtype=torch.int64).float()[:, None] * inv[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("tokens", [1, 4096])
def test_norms(tokens: int, dtype: torch.dtype) -> None:
    x = randn(tokens, HIDDEN, dtype=dtype, seed=1, scale=3.0)
    residual = randn(tokens, HIDDEN, dtype=dtype, seed=2, scale=5.0)
    w = randn(HIDDEN, dtype=dtype, seed=3, scale=0.2, shift=1.0)
    out = torch.full_like(x, float("nan"))
    check(fused.rms_norm(x, w, EPS, out=out), fused.rms_norm_ref(x, w, EPS), dtype)

    ref_out, ref_h = fused.add_rms_norm_ref(x, residual, w, EPS)
    out.fill_(float("nan"))
    got, new_res = fused.add_rms_norm(x, residual, w, EPS, out=out)
    assert new_res is residual
    torch.testing.assert_close(residual, ref_h, rtol=0, atol=0)
    check(got, ref_out, dtype)


@pytest.mark.parametrize("hidden", [8192, 16384, 5120])
def test_norm_wide_rows(hidden: int) -> None:
    """8192: one block per row; 16384: two-pass chunked path; 5120: padded block."""
    dtype = torch.bfloat16
    x = randn(257, hidden, dtype=dtype, seed=4, scale=2.0)
    residual = randn(257, hidden, dtype=dtype, seed=5)
    w = randn(hidden, dtype=dtype, seed=6, scale=0.2, shift=1.0)
    check(fused.rms_norm(x, w, EPS), fused.rms_norm_ref(x, w, EPS), dtype)
    ref_out, ref_h = fused.add_rms_norm_ref(x, residual, w, EPS)
    got, _ = fused.add_rms_norm(x, residual, w, EPS)
    torch.testing.assert_close(residual, ref_h, rtol=0, atol=0)
    check(got, ref_out, dtype)


@pytest.mark.parametrize("tokens", [1, 4096])
def test_rope_and_qk_norm_on_fused_qkv(tokens: int) -> None:
    dtype = torch.bfloat16
    cos, sin = rope_tables()
    positions = torch.randint(0, MAX_POS, (tokens,), device=DEV, generator=torch.Generator(device=DEV).manual_seed(7))
    q_size, kv_size = NUM_Q * HEAD_DIM, NUM_KV * HEAD_DIM
    qkv = randn(tokens, q_size + 2 * kv_size, dtype=dtype, seed=8, scale=2.0)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q, k = q.view(tokens, NUM_Q, HEAD_DIM), k.view(tokens, NUM_KV, HEAD_DIM)

    w = randn(HEAD_DIM, dtype=dtype, seed=9, scale=0.2, shift=1.0)  # per-head q norm on the strided view
    check(fused.rms_norm(q, w, EPS), fused.rms_norm_ref(q, w, EPS), dtype)

    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    rotary.rope_(q, k, positions, cos, sin)
    ref_q, ref_k = rotary.rope_ref(q0, k0, positions, cos, sin)
    assert torch.equal(v, v0)
    check(q, ref_q, dtype)
    check(k, ref_k, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("tokens", [1, 4096])
def test_silu_mul(tokens: int, dtype: torch.dtype) -> None:
    gate_up = randn(tokens, 2 * INTER, dtype=dtype, seed=10, scale=3.0)
    out = torch.full((tokens, INTER), float("nan"), dtype=dtype, device=DEV)
    check(fused.silu_mul(gate_up, out=out), fused.silu_mul_ref(gate_up), dtype)


def test_cuda_graph_capture_and_replay() -> None:
    """All four ops captured in one CUDA graph; replays on new input data match the references."""
    dtype, tokens = torch.bfloat16, 1
    cos, sin = rope_tables()
    x = randn(tokens, HIDDEN, dtype=dtype, seed=11)
    residual = randn(tokens, HIDDEN, dtype=dtype, seed=12)
    w = randn(HIDDEN, dtype=dtype, seed=13, scale=0.2, shift=1.0)
    qkv = randn(tokens, (NUM_Q + 2 * NUM_KV) * HEAD_DIM, dtype=dtype, seed=14)
    gate_up = randn(tokens, 2 * INTER, dtype=dtype, seed=15)
    positions = torch.zeros(tokens, dtype=torch.int64, device=DEV)
    q = qkv[:, : NUM_Q * HEAD_DIM].view(tokens, NUM_Q, HEAD_DIM)
    k = qkv[:, NUM_Q * HEAD_DIM : (NUM_Q + NUM_KV) * HEAD_DIM].view(tokens, NUM_KV, HEAD_DIM)
    normed = torch.empty_like(x)
    normed2 = torch.empty_like(x)
    act = torch.empty(tokens, INTER, dtype=dtype, device=DEV)

    def step() -> None:
        fused.rms_norm(x, w, EPS, out=normed)
        fused.add_rms_norm(x, residual, w, EPS, out=normed2)
        rotary.rope_(q, k, positions, cos, sin)
        fused.silu_mul(gate_up, out=act)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    for seed in (100, 200):
        x.copy_(randn(tokens, HIDDEN, dtype=dtype, seed=seed))
        residual.copy_(randn(tokens, HIDDEN, dtype=dtype, seed=seed + 1))
        qkv.copy_(randn(*qkv.shape, dtype=dtype, seed=seed + 2))
        gate_up.copy_(randn(*gate_up.shape, dtype=dtype, seed=seed + 3))
        positions.fill_(seed * 37)
        x0, res0, q0, k0 = x.clone(), residual.clone(), q.clone(), k.clone()
        graph.replay()
        torch.cuda.synchronize()
        check(normed, fused.rms_norm_ref(x0, w, EPS), dtype)
        ref_out, ref_h = fused.add_rms_norm_ref(x0, res0, w, EPS)
        check(normed2, ref_out, dtype)
        torch.testing.assert_close(residual, ref_h, rtol=0, atol=0)
        ref_q, ref_k = rotary.rope_ref(q0, k0, positions, cos, sin)
        check(q, ref_q, dtype)
        check(k, ref_k, dtype)
        check(act, fused.silu_mul_ref(gate_up), dtype)
