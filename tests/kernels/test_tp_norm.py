"""The fused tensor-parallel all-reduce + residual add + RMSNorm kernel (`specray.kernels.tp_norm`).

Owns no data. Without CUDA the kernel runs under Triton's CPU interpreter: each "rank" is a forked
process that launches the kernel on its own partial, and the int64 address tables point at shared-memory
CPU tensors (the same addresses in every process), so the flag barrier really pairs the processes'
programs. Oracles: the module's reference (sum in fp32 in rank order, round once, add the residual, round,
RMSNorm: the unfused path's rounding for 2 ranks) for exact bits, and an
independent float64 formula written here for closeness. Also checked: every rank gets the same bits, the
residual is updated in place, the flags end at zero, and a rank waits for a late peer's partial.
"""

import multiprocessing as mp
import time

import pytest
import torch

from specray.kernels.tp_norm import (
    MAX_HIDDEN,
    MAX_PROGRAMS,
    all_reduce_add_rms_norm,
    all_reduce_add_rms_norm_ref,
)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="simulates ranks as CPU threads")
EPS = 1e-5


class Ranks:
    """W simulated ranks: partials [T, H] and zeroed flag arrays in shared memory, with the kernel's address
    tables. Each rank runs in a forked process (its own interpreter state, the same addresses)."""

    def __init__(self, world: int, rows: int, hidden: int, dtype: torch.dtype, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.parts = [torch.randn(rows, hidden, generator=gen).to(dtype).share_memory_() for _ in range(world)]
        self.flags = [torch.zeros(MAX_PROGRAMS * world, dtype=torch.int32).share_memory_() for _ in range(world)]
        self.part_table = torch.tensor([p.data_ptr() for p in self.parts], dtype=torch.int64)
        self.flag_table = torch.tensor([f.data_ptr() for f in self.flags], dtype=torch.int64)
        self.weight = (1 + 0.5 * torch.randn(hidden, generator=gen)).to(dtype)
        self.residual = torch.randn(rows, hidden, generator=gen).to(dtype)
        # per rank: the output, the returned residual, and whether it was the given tensor (updated in place)
        self.outs = torch.zeros(world, rows, hidden, dtype=dtype).share_memory_()
        self.res_outs = torch.zeros(world, rows, hidden, dtype=dtype).share_memory_()
        self.in_place = torch.zeros(world, dtype=torch.int32).share_memory_()
        self.world, self.rows = world, rows

    def _rank_main(self, rank: int, with_residual: bool, before, calls: int = 1) -> None:
        if before is not None:
            before(rank)
        for _ in range(calls):  # back to back on the same flags: a fast rank waits until its last signal is taken
            res = self.residual.clone() if with_residual else None
            out, new_res = all_reduce_add_rms_norm(self.part_table, self.flag_table, rank, self.rows, res,
                                                   self.weight, EPS)
        self.outs[rank].copy_(out)
        self.res_outs[rank].copy_(new_res)
        self.in_place[rank] = int(new_res is res)

    def run(self, with_residual: bool, before=None, timeout: float = 120.0, calls: int = 1) -> None:
        """Launch every rank's kernel (`calls` times) in its own forked process; `before(rank)` runs there
        first."""
        run_forked(self._rank_main, [(r, with_residual, before, calls) for r in range(self.world)], timeout,
                   "a rank is still waiting at the barrier")


def run_forked(target, rank_args: list[tuple], timeout: float, stuck: str) -> None:
    """`target(*args)` for each rank's args in its own forked process; fails with `stuck` if one hangs."""
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=target, args=args) for args in rank_args]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, stuck
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def same(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal bits in 16-bit dtypes; in fp32 within a few ulps (the sum of squares' order and rsqrt differ)."""
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=4e-7, atol=1e-7)
    else:
        assert torch.equal(got, want)


def independent(parts, residual, weight) -> torch.Tensor:
    """float64 all-reduce + add + RMSNorm (no intermediate rounding)."""
    h = sum(p.double() for p in parts)
    if residual is not None:
        h = h + residual.double()
    return weight.double() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_residual", [True, False])
def test_two_ranks_match_the_unfused_rounding_and_agree(dtype, with_residual):
    ranks = Ranks(2, rows=3, hidden=96, dtype=dtype)  # 96: a masked (non power of two) row
    want_out, want_res = all_reduce_add_rms_norm_ref(ranks.parts, ranks.residual if with_residual else None,
                                                     ranks.weight, EPS)
    ranks.run(with_residual)
    for rank in range(2):
        same(ranks.outs[rank], want_out)
        assert torch.equal(ranks.res_outs[rank], want_res), f"rank {rank}"  # sums and adds round exactly
        assert ranks.in_place[rank] == int(with_residual)
    assert torch.equal(ranks.outs[0], ranks.outs[1])
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    close = independent(ranks.parts, ranks.residual if with_residual else None, ranks.weight)
    assert ((want_out.double() - close).norm() / close.norm()).item() < tol
    assert all(int(f.abs().sum()) == 0 for f in ranks.flags)


def test_more_rows_than_programs_and_four_ranks():
    ranks = Ranks(2, rows=MAX_PROGRAMS + 3, hidden=16, dtype=torch.bfloat16, seed=1)  # 2 rows per program
    want = all_reduce_add_rms_norm_ref(ranks.parts, ranks.residual, ranks.weight, EPS)
    ranks.run(True, calls=3)
    for rank in range(2):
        assert torch.equal(ranks.outs[rank], want[0]) and torch.equal(ranks.res_outs[rank], want[1])
    four = Ranks(4, rows=2, hidden=32, dtype=torch.float32, seed=2)
    want = all_reduce_add_rms_norm_ref(four.parts, four.residual, four.weight, EPS)
    four.run(True)
    for rank in range(4):
        same(four.outs[rank], want[0])
        assert torch.equal(four.res_outs[rank], want[1]) and torch.equal(four.outs[rank], four.outs[0])
    assert all(int(f.abs().sum()) == 0 for f in ranks.flags + four.flags)


def test_a_rank_waits_for_a_late_peer_partial():
    """Rank 1 writes its partial only after rank 0's kernel has started; rank 0 must still sum it."""
    ranks = Ranks(2, rows=2, hidden=32, dtype=torch.float32, seed=3)
    late = ranks.parts[1].clone()
    ranks.parts[1].fill_(float("nan"))  # what rank 0 would read without the barrier

    def before(rank: int) -> None:
        if rank == 1:
            time.sleep(1.0)  # rank 0 is in its kernel by now, waiting at the barrier
            ranks.parts[1].copy_(late)

    ranks.run(True, before=before)
    want = all_reduce_add_rms_norm_ref([ranks.parts[0], late], ranks.residual, ranks.weight, EPS)
    for rank in range(2):
        assert torch.isfinite(ranks.outs[rank]).all()
        same(ranks.outs[rank], want[0])
        assert torch.equal(ranks.res_outs[rank], want[1])


def test_bad_input_is_refused_before_any_launch():
    ranks = Ranks(2, rows=2, hidden=32, dtype=torch.float32)
    with pytest.raises(ValueError, match="residual must be"):
        all_reduce_add_rms_norm(ranks.part_table, ranks.flag_table, 0, 2, ranks.residual[:1], ranks.weight, EPS)
    with pytest.raises(ValueError, match="exceeds"):
        w = torch.ones(MAX_HIDDEN + 1)
        all_reduce_add_rms_norm(ranks.part_table, ranks.flag_table, 0, 1, None, w, EPS)
    assert all(int(f.abs().sum()) == 0 for f in ranks.flags)


# ---- push protocol ---------------------------------------------------------------------------------------
class PushRanks:
    """W simulated ranks with push regions [2 sites, W slots, rows * H] in shared memory, all slots empty (-0.0
    bits). `parts[c][r]` is rank r's partial [rows, H] of call c; call c uses site c % 2, as O and down do."""

    def __init__(self, world: int, rows: int, hidden: int, dtype: torch.dtype, calls: int, seed: int = 0):
        from specray.kernels.tp_norm import empty_bits

        gen = torch.Generator().manual_seed(seed)
        self.parts = [[torch.randn(rows, hidden, generator=gen).to(dtype) for _ in range(world)] for _ in range(calls)]
        int_dtype, empty = empty_bits(dtype)
        self.regions = [torch.full((2, world, rows * hidden), empty, dtype=int_dtype).view(dtype).share_memory_()
                        for _ in range(world)]
        self.flags = torch.zeros(world, dtype=torch.int64)  # not read by the push kernel
        # rank r reads its own slots; rank r writes slot r of every rank's region
        self.part_tables = [[torch.tensor([self.regions[r][s, k].data_ptr() for k in range(world)]) for s in range(2)]
                            for r in range(world)]
        self.push_tables = [[torch.tensor([self.regions[j][s, r].data_ptr() for j in range(world)]) for s in range(2)]
                            for r in range(world)]
        self.weight = (1 + 0.5 * torch.randn(hidden, generator=gen)).to(dtype)
        self.residual = torch.randn(rows, hidden, generator=gen).to(dtype)
        self.outs = torch.zeros(calls, world, rows, hidden, dtype=dtype).share_memory_()
        self.res_outs = torch.zeros(calls, world, rows, hidden, dtype=dtype).share_memory_()
        self.world, self.rows, self.hidden, self.calls, self.int_dtype = world, rows, hidden, calls, int_dtype

    def _rank_main(self, rank: int, produce, before) -> None:
        from specray.kernels.tp_norm import push_rows

        for c in range(self.calls):
            site = c % 2
            if before is not None:
                before(rank, c)
            own = self.regions[rank][site, rank].view(self.rows, self.hidden)
            if produce is None:
                own.copy_(self.parts[c][rank])  # as cuBLAS would, then the push kernel
                push_rows(own, self.push_tables[rank][site])
            else:
                produce(rank, c, own, self.push_tables[rank][site])
            res = self.residual.clone()
            out, new_res = all_reduce_add_rms_norm(self.part_tables[rank][site], self.flags, rank, self.rows, res,
                                                   self.weight, EPS, push=True)
            self.outs[c, rank].copy_(out)
            self.res_outs[c, rank].copy_(new_res)

    def run(self, produce=None, before=None, timeout: float = 180.0) -> None:
        run_forked(self._rank_main, [(r, produce, before) for r in range(self.world)], timeout,
                   "a rank is still waiting for a peer's partial")

    def check(self, parts=None) -> None:
        """Every call on every rank equals the reference; the peers' slots are empty again at the end."""
        from specray.kernels.tp_norm import empty_bits

        for c in range(self.calls):
            want_out, want_res = all_reduce_add_rms_norm_ref((parts or self.parts)[c], self.residual, self.weight,
                                                             EPS)
            for r in range(self.world):
                same(self.outs[c, r], want_out)
                assert torch.equal(self.res_outs[c, r], want_res), f"call {c} rank {r}"
                assert torch.equal(self.outs[c, r], self.outs[c, 0])
        empty = empty_bits(self.regions[0].dtype)[1]
        for r in range(self.world):
            for k in range(self.world):
                if k != r:
                    assert bool((self.regions[r][:, k].view(self.int_dtype) == empty).all()), f"rank {r} slot {k}"


@pytest.mark.parametrize("dtype,world", [(torch.bfloat16, 2), (torch.float32, 2), (torch.float16, 3)])
def test_push_sums_match_the_reference_and_slots_empty_again(dtype, world):
    ranks = PushRanks(world, rows=3, hidden=48, dtype=dtype, calls=4, seed=4)
    ranks.run()
    ranks.check()


def test_push_a_negative_zero_partial_is_summed_not_waited_for():
    """A partial element of -0.0 is what an empty slot holds: the writer must store it as +0.0, else its peer
    would wait forever. The sum differs from the reference at most in a zero's sign."""
    ranks = PushRanks(2, rows=2, hidden=32, dtype=torch.bfloat16, calls=2, seed=5)
    for c in range(2):
        ranks.parts[c][0][0, :5] = -0.0
        ranks.parts[c][1][0, :3] = -0.0  # elements 0..2: both -0.0, the sum is a zero
    ranks.run()
    fixed = [[torch.where(p == 0, torch.zeros_like(p), p) for p in call] for call in ranks.parts]
    ranks.check(fixed)


def test_push_a_rank_waits_for_a_late_peer():
    ranks = PushRanks(2, rows=2, hidden=32, dtype=torch.float32, calls=3, seed=6)

    def before(rank: int, call: int) -> None:
        if rank == 1 and call == 1:
            time.sleep(1.0)  # rank 0 is polling its slot 1 of region 1 by now

    ranks.run(before=before)
    ranks.check()


def test_push_from_the_gemv_epilogue():
    """One row: each rank's GEMV writes its product straight into every rank's slot (`gemv(push=...)`)."""
    from specray.kernels.gemv import GemvConfig, gemv

    k, hidden, world = 64, 32, 2
    gen = torch.Generator().manual_seed(7)
    weights = [(torch.randn(hidden, k, generator=gen) * 0.1).to(torch.bfloat16) for _ in range(world)]
    xs = [[torch.randn(1, k, generator=gen).to(torch.bfloat16) for _ in range(world)] for _ in range(3)]
    ranks = PushRanks(world, rows=1, hidden=hidden, dtype=torch.bfloat16, calls=3, seed=8)
    cfg = GemvConfig(4, 32, 1, 1)
    for c in range(3):  # the partials the reference sums: the same GEMV without push
        ranks.parts[c] = [gemv(xs[c][r], weights[r], cfg) for r in range(world)]

    def produce(rank, call, own, push_table) -> None:
        got = gemv(xs[call][rank], weights[rank], cfg, out=own, push=push_table)
        assert got is own

    ranks.run(produce=produce)
    ranks.check()
