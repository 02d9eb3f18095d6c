"""Correctness tests of the fused Triton elementwise kernels (RMSNorm, add+RMSNorm, RoPE, SiLU*mul).

Owns no data: every test builds fresh random inputs (never zeros). Each kernel is checked against its
``*_ref`` in specray.kernels.fused and against an independent plain-torch formula written here. Without
CUDA the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1, which tests/conftest.py sets
before triton is imported), so the shapes are tiny; with CUDA the same tests run compiled on the GPU.
"""

import pytest
import torch

from specray.kernels import fused, rotary

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
REL_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.bfloat16]
EPS = 1e-6


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    assert torch.isfinite(got).all(), "output has non-finite values (unwritten NaN poison?)"
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    """Random values bounded away from zero (|v| >= 0.05 * scale), so nothing passes by accident."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(*shape, generator=gen, dtype=torch.float64)
    v = torch.where(v.abs() < 0.05, torch.copysign(torch.full_like(v, 0.05), v), v)
    return (v * scale + shift).to(dtype).to(DEVICE)


def nan_like(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def rope_tables(max_pos: int, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    freqs = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float().to(DEVICE), emb.sin().float().to(DEVICE)


# ---------------------------------------------------------------------------------------------------------
# independent formulas (fp64, no intermediate rounding)
# ---------------------------------------------------------------------------------------------------------


def rms_formula(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xd = x.double()
    return w.double() * xd / torch.sqrt((xd * xd).sum(-1, keepdim=True) / x.shape[-1] + eps)


def rope_formula(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) as complex numbers by angle pos * theta^(-2i/D)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d)
    angle = positions.double()[:, None, None] * inv  # [T, 1, D/2]
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2 :].double()) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1)


def silu_formula(gate_up: torch.Tensor) -> torch.Tensor:
    gu = gate_up.double()
    inter = gu.shape[-1] // 2
    g, u = gu[:, :inter], gu[:, inter:]
    return g / (1.0 + torch.exp(-g)) * u


# ---------------------------------------------------------------------------------------------------------
# rms_norm / add_rms_norm
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [64, 96])
@pytest.mark.parametrize("tokens", [1, 3, 17])
def test_rms_norm(tokens: int, hidden: int, dtype: torch.dtype) -> None:
    x = randn(tokens, hidden, dtype=dtype, seed=tokens * 1000 + hidden, scale=3.0)
    w = randn(hidden, dtype=dtype, seed=7, scale=0.3, shift=1.0)
    out = nan_like((tokens, hidden), dtype)
    got = fused.rms_norm(x, w, EPS, out=out)
    assert got is out
    ref = fused.rms_norm_ref(x, w, EPS)
    assert rel_err(got, ref) <= REL_TOL[dtype]
    assert rel_err(got, rms_formula(x, w, EPS)) <= REL_TOL[dtype]
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    fresh = fused.rms_norm(x, w, EPS)  # allocating path
    assert fresh.shape == x.shape and fresh.dtype == dtype and fresh.is_contiguous()
    assert torch.equal(fresh, got)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [64, 96])
@pytest.mark.parametrize("tokens", [1, 3, 17])
def test_add_rms_norm_updates_residual_in_place(tokens: int, hidden: int, dtype: torch.dtype) -> None:
    seed = tokens * 1000 + hidden
    x = randn(tokens, hidden, dtype=dtype, seed=seed)
    residual = randn(tokens, hidden, dtype=dtype, seed=seed + 1, scale=4.0)
    w = randn(hidden, dtype=dtype, seed=8, scale=0.3, shift=1.0)
    x0, residual0 = x.clone(), residual.clone()
    out = nan_like((tokens, hidden), dtype)

    got, new_residual = fused.add_rms_norm(x, residual, w, EPS, out=out)
    assert got is out and new_residual is residual
    ref_out, ref_h = fused.add_rms_norm_ref(x0, residual0, w, EPS)
    assert torch.equal(x, x0), "x must not be modified"
    assert torch.equal(residual, x0 + residual0), "residual must hold x + residual in the dtype"
    assert torch.equal(residual, ref_h)
    assert rel_err(got, ref_out) <= REL_TOL[dtype]
    # independent: torch's own dtype add, then the fp64 formula on the rounded sum
    assert rel_err(got, rms_formula(x0 + residual0, w, EPS)) <= REL_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_strided_rows_chunked_path_and_in_place(dtype: torch.dtype, monkeypatch) -> None:
    """Row-strided views, rows wider than one block (two-pass path) and out=x."""
    tokens, hidden = 5, 96
    big = randn(tokens, hidden + 40, dtype=dtype, seed=3, scale=2.0)
    x = big[:, 8 : 8 + hidden]  # row stride hidden + 40
    w = randn(hidden, dtype=dtype, seed=4, scale=0.3, shift=1.0)
    ref = fused.rms_norm_ref(x, w, EPS)
    single = fused.rms_norm(x, w, EPS)
    monkeypatch.setattr(fused, "_MAX_BLOCK_H", 32)  # 3 chunks of 32 columns
    chunked = fused.rms_norm(x, w, EPS, out=nan_like((tokens, hidden), dtype))
    for got in (single, chunked):
        assert rel_err(got, ref) <= REL_TOL[dtype]
        assert rel_err(got, rms_formula(x, w, EPS)) <= REL_TOL[dtype]
    if dtype != torch.float32 and DEVICE.type == "cpu":  # on a GPU the reduction orders may differ
        assert torch.equal(single, chunked)

    residual = randn(tokens, hidden, dtype=dtype, seed=5, scale=3.0)
    ref_out, ref_h = fused.add_rms_norm_ref(x, residual, w, EPS)
    out, new_res = fused.add_rms_norm(x, residual, w, EPS, out=nan_like((tokens, hidden), dtype))
    assert torch.equal(new_res, ref_h)
    assert rel_err(out, ref_out) <= REL_TOL[dtype]

    before = big.clone()
    fused.rms_norm(x, w, EPS, out=x)  # in place through a strided view (chunked)
    assert rel_err(x, ref) <= REL_TOL[dtype]
    assert torch.equal(big[:, :8], before[:, :8]) and torch.equal(big[:, 8 + hidden :], before[:, 8 + hidden :])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_per_head_on_fused_qkv_view(dtype: torch.dtype) -> None:
    """3-D [T, N, D] per-head norm of a q view split from a fused qkv output (non-uniform row stride)."""
    tokens, num_heads, num_kv, head_dim = 3, 4, 2, 64
    qkv = randn(tokens, (num_heads + 2 * num_kv) * head_dim, dtype=dtype, seed=11, scale=2.0)
    q = qkv[:, : num_heads * head_dim].view(tokens, num_heads, head_dim)
    w = randn(head_dim, dtype=dtype, seed=12, scale=0.3, shift=1.0)
    out = nan_like((tokens, num_heads, head_dim), dtype)
    got = fused.rms_norm(q, w, EPS, out=out)
    ref = fused.rms_norm_ref(q.reshape(-1, head_dim), w, EPS).view(tokens, num_heads, head_dim)
    assert rel_err(got, ref) <= REL_TOL[dtype]
    assert rel_err(got, rms_formula(q, w, EPS)) <= REL_TOL[dtype]
    flat = fused.rms_norm(q.reshape(-1, head_dim).contiguous(), w, EPS)  # the [T*heads, D] form
    assert torch.equal(flat.view_as(got), got)


def test_rms_norm_fp16_and_empty() -> None:
    x = randn(3, 64, dtype=torch.float16, seed=21, scale=2.0)
    w = randn(64, dtype=torch.float16, seed=22, scale=0.3, shift=1.0)
    got = fused.rms_norm(x, w, EPS)
    assert rel_err(got, fused.rms_norm_ref(x, w, EPS)) <= REL_TOL[torch.float16]
    assert fused.rms_norm(x[:0], w, EPS).shape == (0, 64)
    out, res = fused.add_rms_norm(x[:0], x[:0].clone(), w, EPS)
    assert out.shape == (0, 64) and res.shape == (0, 64)


def test_norm_input_validation() -> None:
    x = randn(3, 64, dtype=torch.bfloat16, seed=1)
    w = randn(64, dtype=torch.bfloat16, seed=2)
    with pytest.raises(ValueError, match="weight"):
        fused.rms_norm(x, w.float(), EPS)
    with pytest.raises(ValueError, match="weight"):
        fused.rms_norm(x, w[:32], EPS)
    with pytest.raises(ValueError, match="stride"):
        fused.rms_norm(x.t(), randn(3, dtype=torch.bfloat16, seed=3), EPS)
    with pytest.raises(ValueError, match="dtype"):
        fused.rms_norm(x.double(), w.double(), EPS)
    with pytest.raises(ValueError, match="residual"):
        fused.add_rms_norm(x, x.float(), w, EPS)
    with pytest.raises(ValueError, match="dims"):
        fused.add_rms_norm(x.view(3, 2, 32), x.view(3, 2, 32).clone(), w[:32], EPS)
    with pytest.raises(ValueError, match="out"):
        fused.rms_norm(x, w, EPS, out=torch.empty(3, 64, device=DEVICE))


# ---------------------------------------------------------------------------------------------------------
# rope_
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", [(4, 2), (7, 1)], ids=lambda h: f"hq{h[0]}-hkv{h[1]}")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("tokens", [1, 3, 17])
def test_rope_on_fused_qkv_views(tokens: int, head_dim: int, heads: tuple[int, int], dtype: torch.dtype) -> None:
    num_q, num_kv = heads
    max_pos = 4096
    cos, sin = rope_tables(max_pos, head_dim)
    seed = tokens * 100 + head_dim + num_q
    gen = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, max_pos, (tokens,), generator=gen).to(DEVICE)
    qkv = randn(tokens, (num_q + 2 * num_kv) * head_dim, dtype=dtype, seed=seed, scale=2.0)
    q_size, kv_size = num_q * head_dim, num_kv * head_dim
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q = q.view(tokens, num_q, head_dim)  # token stride (num_q + 2 * num_kv) * head_dim: not contiguous
    k = k.view(tokens, num_kv, head_dim)
    q0, k0, v0 = q.clone(), k.clone(), v.clone()

    assert rotary.rope_(q, k, positions, cos, sin) is None
    ref_q, ref_k = rotary.rope_ref(q0, k0, positions, cos, sin)
    assert torch.equal(v, v0), "v (after k in the fused buffer) must be untouched"
    for got, ref, orig in ((q, ref_q, q0), (k, ref_k, k0)):
        assert rel_err(got, ref) <= REL_TOL[dtype]
        assert rel_err(got, rope_formula(orig, positions)) <= REL_TOL[dtype]
        if dtype == torch.float32:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_rope_eager_formula_int32_positions_and_fp16() -> None:
    """Against the eager decoder formula (cos/sin rounded to the dtype, each product rounded), int32 positions,
    contiguous fp16 q/k and a padded half dim (D = 80)."""
    tokens, num_q, num_kv, head_dim = 5, 3, 1, 80
    cos, sin = rope_tables(64, head_dim)
    positions = torch.tensor([0, 63, 5, 5, 17], dtype=torch.int32, device=DEVICE)
    for dtype in (torch.float16, torch.bfloat16):
        q = randn(tokens, num_q, head_dim, dtype=dtype, seed=31)
        k = randn(tokens, num_kv, head_dim, dtype=dtype, seed=32)
        q0, k0 = q.clone(), k.clone()
        rotary.rope_(q, k, positions, cos, sin)
        c = cos[positions.long()].unsqueeze(1).to(dtype)
        s = sin[positions.long()].unsqueeze(1).to(dtype)
        half = head_dim // 2
        for got, x in ((q, q0), (k, k0)):
            eager = x * c + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * s
            assert rel_err(got, eager) <= REL_TOL[dtype]
            assert rel_err(got, rope_formula(x, positions)) <= REL_TOL[dtype]
        assert torch.equal(q[0], q0[0]) and torch.equal(k[0], k0[0])  # position 0 is the identity


def test_rope_input_validation() -> None:
    cos, sin = rope_tables(16, 64)
    q = randn(2, 4, 64, dtype=torch.bfloat16, seed=1)
    k = randn(2, 2, 64, dtype=torch.bfloat16, seed=2)
    pos = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="dtype"):
        rotary.rope_(q, k.float(), pos, cos, sin)
    with pytest.raises(ValueError, match="positions"):
        rotary.rope_(q, k, pos.float(), cos, sin)
    with pytest.raises(ValueError, match="cos"):
        rotary.rope_(q, k, pos, cos.bfloat16(), sin)
    with pytest.raises(ValueError, match="stride"):
        rotary.rope_(q.transpose(1, 2).contiguous().transpose(1, 2), k, pos, cos, sin)
    rotary.rope_(q[:0], k[:0], pos[:0], cos, sin)  # no tokens: no launch


# ---------------------------------------------------------------------------------------------------------
# silu_mul
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("inter", [64, 96])
@pytest.mark.parametrize("tokens", [1, 3, 17])
def test_silu_mul(tokens: int, inter: int, dtype: torch.dtype) -> None:
    gate_up = randn(tokens, 2 * inter, dtype=dtype, seed=tokens * 1000 + inter, scale=3.0)
    out = nan_like((tokens, inter), dtype)
    got = fused.silu_mul(gate_up, out=out)
    assert got is out
    ref = fused.silu_mul_ref(gate_up)
    assert rel_err(got, ref) <= REL_TOL[dtype]
    assert rel_err(got, silu_formula(gate_up)) <= REL_TOL[dtype]
    gate, up = gate_up.split(inter, dim=-1)
    eager = torch.nn.functional.silu(gate) * up
    assert rel_err(got, eager) <= REL_TOL[dtype]
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_silu_mul_strided_multiblock_fp16_and_validation(monkeypatch) -> None:
    monkeypatch.setattr(fused, "_SILU_BLOCK", 32)  # 3 column blocks per row, last one partial
    tokens, inter = 4, 80
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        big = randn(tokens, 2 * inter + 16, dtype=dtype, seed=41, scale=3.0)
        gate_up = big[:, 16:]  # row stride 2 * inter + 16
        got = fused.silu_mul(gate_up, out=nan_like((tokens, inter), dtype))
        assert rel_err(got, fused.silu_mul_ref(gate_up)) <= REL_TOL[dtype]
        assert rel_err(got, silu_formula(gate_up)) <= REL_TOL[dtype]
    assert fused.silu_mul(gate_up[:0]).shape == (0, inter)
    with pytest.raises(ValueError, match="2I"):
        fused.silu_mul(gate_up[:, :-1])
    with pytest.raises(ValueError, match="stride"):
        fused.silu_mul(gate_up.t())
    with pytest.raises(ValueError, match="out"):
        fused.silu_mul(gate_up, out=torch.empty(tokens, inter + 1, device=DEVICE))
