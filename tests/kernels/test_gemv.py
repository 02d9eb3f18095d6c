"""The batch-1 Triton GEMV (`specray.kernels.gemv`) and its use by the decoder's `Linear` layers.

Owns no data: random weights and inputs per test. Oracles: a float64 product (the kernel accumulates in fp32
and rounds once, so it is within a rounding step of it) and `F.linear`. Without CUDA the kernel runs under
Triton's CPU interpreter on small shapes; with CUDA the same tests run compiled, plus the real Llama-3.1-8B
projection shapes.
"""

import pytest
import torch
import torch.nn.functional as F

from specray.kernels.gemv import GemvConfig, choose_config, gemv, gemv_ref
from specray.models.decoder import Linear

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def within_a_rounding_step(got: torch.Tensor, x, w, b=None) -> None:
    want = x.double() @ w.double().t()
    if b is not None:
        want = want + b.double()
    ulp = torch.finfo(got.dtype).eps * want.abs().clamp_min(1e-3)
    assert ((got.double() - want).abs() <= 1.01 * ulp + 1e-6 * want.abs().max()).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,cfg", [((32, 64), GemvConfig(8, 16, 4, 2)), ((64, 96), GemvConfig(4, 32, 4, 4)),
                                       ((48, 128), GemvConfig(16, 128, 4, 2))])
def test_gemv_is_the_product_rounded_once(dtype, shape, cfg):
    g = torch.Generator().manual_seed(sum(shape))
    n, k = shape
    w = torch.randn(n, k, generator=g).to(dtype).to(DEVICE)
    x = torch.randn(1, k, generator=g).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=g).to(dtype).to(DEVICE)
    within_a_rounding_step(gemv(x, w, cfg), x, w)
    got = gemv(x, w, cfg, bias=b)
    within_a_rounding_step(got, x, w, b)
    out = torch.full((1, n), float("nan"), dtype=dtype, device=DEVICE)
    assert gemv(x, w, cfg, out=out) is out and torch.equal(out, gemv(x, w, cfg))
    torch.testing.assert_close(got, gemv_ref(x, w, b), rtol=2 * torch.finfo(dtype).eps, atol=1e-3)


def test_gemv_refuses_what_it_cannot_do():
    w = torch.randn(32, 64).bfloat16().to(DEVICE)
    with pytest.raises(ValueError, match="does not take"):
        gemv(torch.randn(2, 64).bfloat16().to(DEVICE), w, GemvConfig(8, 16, 4, 2))  # two rows
    with pytest.raises(ValueError, match="does not take"):
        gemv(torch.randn(1, 64).bfloat16().to(DEVICE), w, GemvConfig(8, 48, 4, 2))  # K % BLOCK_K
    with pytest.raises(ValueError, match="does not take"):
        gemv(torch.randn(1, 64).to(DEVICE), w.float(), GemvConfig(8, 16, 4, 2))  # fp32


def test_choose_config_divides_the_shape_or_declines():
    for n, k in [(6144, 4096), (4096, 2048), (14336, 4096), (4096, 7168), (1152, 896), (4864 * 2, 896)]:
        cfg = choose_config(n, k)
        assert cfg is not None and n % cfg[0] == 0 and k % cfg[1] == 0, (n, k, cfg)
    # the measured best launches of benchmarks/gemv.py (H200)
    assert choose_config(3072, 4096) == (4, 512, 4, 4) and choose_config(28672, 4096) == (16, 256, 4, 2)
    assert choose_config(4096, 4096) == (8, 256, 4, 2) and choose_config(4096, 14336) == (4, 512, 4, 4)
    assert choose_config(30, 64) is None  # no block of 4, 8 or 16 rows divides 30
    assert choose_config(64, 36) is None  # no power-of-two K block >= 32 divides 36


def test_linear_uses_the_gemv_for_one_row_only():
    g = torch.Generator().manual_seed(0)
    lin = Linear(64, 32, bias=True).to(torch.bfloat16).to(DEVICE)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(32, 64, generator=g))
        lin.bias.copy_(torch.randn(32, generator=g))
    lin.use_gemv(True)
    assert lin.fused and lin.gemv_config is not None
    one = torch.randn(1, 64, generator=g).bfloat16().to(DEVICE)
    many = torch.randn(3, 64, generator=g).bfloat16().to(DEVICE)
    with torch.no_grad():
        within_a_rounding_step(lin(one), one, lin.weight, lin.bias)
        assert torch.equal(lin(many), F.linear(many, lin.weight, lin.bias))  # more than one row: F.linear
        lin.use_gemv(False)
        assert not lin.fused and torch.equal(lin(one), F.linear(one, lin.weight, lin.bias))
    fp32 = Linear(64, 32).to(DEVICE)
    fp32.use_gemv(True)
    assert not fp32.fused  # 16-bit weights only
    x = torch.randn(3, 64, generator=g).to(DEVICE)
    with torch.no_grad():
        for bias in (True, False):  # `project` into a given tensor (a tensor-parallel region): same product
            layer = Linear(64, 32, bias=bias).to(DEVICE)
            out = torch.full((3, 32), float("nan"), device=DEVICE)
            assert layer.project(x, out=out) is out
            torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias))
        lin.use_gemv(True)
        out = torch.full((1, 32), float("nan"), dtype=torch.bfloat16, device=DEVICE)
        assert lin.project(one, out=out) is out and torch.equal(out, lin(one))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real shapes need a GPU")
@pytest.mark.parametrize("n,k", [(6144, 4096), (3072, 4096), (4096, 2048), (4096, 7168), (14336, 4096)])
def test_gemv_real_shapes(n, k):
    g = torch.Generator(device="cuda").manual_seed(n + k)
    w = torch.randn(n, k, device="cuda", generator=g).bfloat16() * 0.02
    x = torch.randn(1, k, device="cuda", generator=g).bfloat16()
    within_a_rounding_step(gemv(x, w, choose_config(n, k)), x, w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gated_gemv_equals_silu_mul_then_gemv_bit_for_bit(dtype):
    """`gated`: the input row is silu(gate) * up computed inside the GEMV, rounded as the silu_mul kernel rounds
    it, so the result has exactly the bits of silu_mul followed by the plain GEMV; and it is within a rounding
    step of the float64 product with silu_mul_ref's row."""
    from specray.kernels.fused import silu_mul, silu_mul_ref

    g = torch.Generator().manual_seed(11)
    n, k = 32, 128
    cfg = GemvConfig(4, 64, 1, 1)
    w = (torch.randn(n, k, generator=g) * 0.1).to(dtype).to(DEVICE)
    gate_up = (torch.randn(1, 2 * k, generator=g) * 2).to(dtype).to(DEVICE)
    got = gemv(gate_up, w, cfg, gated=True)
    act = silu_mul(gate_up)
    assert torch.equal(act, silu_mul_ref(gate_up))
    assert torch.equal(got, gemv(act, w, cfg))
    within_a_rounding_step(got, act, w)
    with pytest.raises(ValueError):
        gemv(gate_up[:, :k], w, cfg, gated=True)  # gated wants [1, 2K]


def test_mlp_fused_down_projection_runs_gated_gemv_for_one_row(monkeypatch):
    """A fused MLP hands gate_up to the down projection: one row runs the gated GEMV (no silu_mul kernel), more
    rows run silu_mul then F.linear; both equal the eager MLP's silu(gate) * up path."""
    from types import SimpleNamespace

    import specray.kernels.fused as fused_mod
    import specray.kernels.gemv as gemv_mod
    from specray.models.decoder import MLP

    mlp = MLP(SimpleNamespace(hidden_size=64, intermediate_size=128)).to(DEVICE, torch.bfloat16)
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    calls = {"gemv_gated": 0, "silu_mul": 0}
    real_gemv, real_silu = gemv_mod.gemv, fused_mod.silu_mul

    def spy_gemv(*a, **kw):
        calls["gemv_gated"] += bool(kw.get("gated"))
        return real_gemv(*a, **kw)

    def spy_silu(*a, **kw):
        calls["silu_mul"] += 1
        return real_silu(*a, **kw)

    monkeypatch.setattr(gemv_mod, "gemv", spy_gemv)
    monkeypatch.setattr(fused_mod, "silu_mul", spy_silu)
    for rows in (1, 3):
        x = (torch.randn(rows, 64, generator=g)).to(torch.bfloat16).to(DEVICE)
        mlp.fused = False
        mlp.gate_up_proj.use_gemv(False)
        mlp.down_proj.use_gemv(False)
        eager = mlp(x)
        mlp.fused = True
        mlp.gate_up_proj.use_gemv(True)
        mlp.down_proj.use_gemv(True)
        calls.update(gemv_gated=0, silu_mul=0)
        got = mlp(x)
        assert calls == ({"gemv_gated": 1, "silu_mul": 0} if rows == 1 else {"gemv_gated": 0, "silu_mul": 1})
        # the earlier fused path, silu_mul kernel then the down projection, on the same gate_up: the same bits
        want = mlp.down_proj(real_silu(mlp.gate_up_proj(x)))
        assert torch.equal(got, want)
        # and close to the eager MLP (cuBLAS/CPU products round their sums differently from the GEMV)
        torch.testing.assert_close(got.float(), eager.float(), rtol=0.05, atol=2e-2)


def test_row_parallel_pushes_from_the_gemv_or_publishes_and_alternates_regions():
    """`RowParallelLinear` with the push protocol: one bf16 row runs the GEMV with the push table (no separate
    publish), more rows run `project` into the region and then `publish`; two fused sums in a row on one region are
    refused. Oracle: the plain product, and the calls recorded by a stand-in reducer."""
    from specray.models.tensor_parallel import RowParallelLinear
    from specray.models.tp_comm import PendingSum, TPAllReduce

    class Reducer(TPAllReduce):
        def __init__(self):
            super().__init__(None)
            self.push, self.published = True, []
            self.buf = torch.zeros(2, 8 * 32, dtype=torch.bfloat16, device=DEVICE)
            self.push_tables = [torch.tensor([self.buf[s].data_ptr()], device=DEVICE) for s in range(2)]  # own slot

        def can_fuse(self, rows, hidden, dtype):
            return True

        def partial_region(self, site, rows, hidden):
            return self.buf[site, : rows * hidden].view(rows, hidden)

        def publish(self, site, part):
            self.published.append((site, part.shape[0]))

    g = torch.Generator().manual_seed(13)
    lin = RowParallelLinear(64, 32, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(32, 64, generator=g) * 0.1)
    lin = lin.to(DEVICE, torch.bfloat16)
    lin.use_gemv(True)
    lin.reduce = red = Reducer()
    for site, rows in ((0, 1), (1, 3), (0, 1)):
        lin.site = site
        x = torch.randn(rows, 64, generator=g).to(torch.bfloat16).to(DEVICE)
        with torch.inference_mode():
            got = lin(x)
        assert isinstance(got, PendingSum) and got.site == site
        assert torch.equal(red.buf[site, : rows * 32].view(rows, 32), got.partial)
        within_a_rounding_step(got.partial, x, lin.weight)
    assert red.published == [(1, 3)]  # the one-row sums were pushed by the GEMV itself
    with pytest.raises(RuntimeError, match="in a row on region 0"), torch.inference_mode():
        lin(torch.randn(1, 64, generator=g).to(torch.bfloat16).to(DEVICE))
