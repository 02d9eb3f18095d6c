"""Launch policy of Hybrid Tree Attention's prefix kernel: the tile shape (`default_tiles`) and the number of
KV splits (`choose_tree_splits`, a model of how the programs fill the SMs in waves, with resident programs
per SM from `estimate_ctas_per_sm`). Owns only the measured constants these use (H100 / sm_90)."""

from __future__ import annotations

import heapq


def default_tiles(num_kv_heads: int, rows: int, batch: int = 1) -> dict[str, int]:
    """Launch shape measured best on an H100 (bf16, d 128, 69-node tree; BENCHMARKS.md). Batch 1, 16K
    prefix: wide row tiles when there are many KV heads to spread over the SMs, narrower ones otherwise.
    Batch >= 4 (measured at 8, 16K and 64K, both shapes): 64x32 tiles with 4 warps, 4 programs per SM,
    8-32% faster than the batch-1 pick. Small row counts (plain decode, short chains) get a tile that is
    not mostly padding. `batch` is the largest batch the workspace serves."""
    if batch >= 4:
        tile = dict(block_m=64, block_n=32, num_warps=4, num_stages=2)
    elif num_kv_heads >= 4:
        tile = dict(block_m=128, block_n=32, num_warps=8, num_stages=3)
    else:
        tile = dict(block_m=64, block_n=64, num_warps=8, num_stages=2)
    if rows <= 32:
        tile = dict(block_m=max(16, 1 << (rows - 1).bit_length()), block_n=64, num_warps=4, num_stages=2)
    elif rows <= 64:
        tile = dict(block_m=64, block_n=64, num_warps=4, num_stages=2)
    return tile


# Resident prefix-kernel programs per SM on sm_90 (bf16, d 128; registers and shared memory of the ptxas
# build) for the launch shapes default_tiles and the benchmark sweep use: (block_m, block_n, warps, stages).
_CTAS_PER_SM_SM90_D128 = {
    (128, 32, 8, 3): 2,
    (128, 32, 8, 4): 2,
    (128, 32, 4, 3): 2,
    (128, 64, 8, 2): 1,
    (128, 64, 8, 3): 1,
    (64, 64, 8, 2): 2,
    (64, 64, 4, 2): 2,
    (64, 64, 4, 3): 2,
    (64, 32, 4, 2): 4,
    (64, 32, 4, 3): 3,
}


def estimate_ctas_per_sm(block_m: int, block_n: int, num_warps: int, num_stages: int, head_dim: int) -> int:
    """Prefix-kernel programs resident on one SM: the sm_90 build's value for the known d=128 launch
    shapes, else 2 (what both default tiles get)."""
    if head_dim == 128:
        return _CTAS_PER_SM_SM90_D128.get((block_m, block_n, num_warps, num_stages), 2)
    return 2


def _makespan(programs: int, splits: int, per: int, last: int, slots: int, overhead: float) -> float:
    """Greedy list scheduling of the prefix kernel's programs on `slots` resident program slots, in launch
    order (split-major: every row program's split 0, then split 1, ...): splits 0..S-2 take `per` KV blocks
    each, the last split `last` blocks, and every program `overhead` more. Returns the finish time in
    block units. A program's pace does not depend on its SM's other programs (the kernel is latency bound:
    on an H100 its batch-8 time is the 2-wave count times one program's time, BENCHMARKS.md)."""
    d1, d2 = per + overhead, last + overhead
    full, extra = divmod(programs * (splits - 1), slots)  # the equal programs fill `full` rounds, then `extra`
    free = [full * d1] * (slots - extra) + [(full + 1) * d1] * extra
    finish = (full + (extra > 0)) * d1
    heapq.heapify(free)
    for _ in range(programs):  # the last split's programs go to the earliest free slots
        t = heapq.heappop(free) + d2
        heapq.heappush(free, t)
        finish = max(finish, t)
    return finish


def choose_tree_splits(
    rows_programs: int,
    max_prefix: int,
    num_sms: int = 132,
    block_n: int = 64,
    max_splits: int = 32,
    *,
    ctas_per_sm: int = 2,
    program_overhead_blocks: float = 4.0,
    merge_blocks_per_split: float = 1.0,
    min_blocks_per_split: int = 4,
    tolerance: float = 0.02,
) -> int:
    """KV splits for kernel 1, aware of wave quantisation: the split count with the smallest modelled time.

    The model: rows_programs * S programs run on num_sms * ctas_per_sm slots (`_makespan`), each taking
    its KV blocks plus `program_overhead_blocks` (prologue, partial store), and kernel 2 reads S partial
    tiles per row program (`merge_blocks_per_split` each, spread over the slots). A split keeps at least
    `min_blocks_per_split` blocks; the fewest splits within `tolerance` of the best cost win. On an H100
    it picks what the batch-1 sweeps measured best (11 splits for the Llama-8B shape, 19 for Qwen2.5-1.5B
    at 16K) and, at batch 8, 4 and 7 splits where the old "2 programs per SM" rule gave 2 and 3 (1.45
    and 1.27 waves). With 4 or more waves of row programs it does not split.
    """
    if rows_programs < 1 or num_sms < 1 or ctas_per_sm < 1 or block_n < 1:
        raise ValueError("rows_programs, num_sms, ctas_per_sm and block_n must be >= 1")
    n_blocks = max(1, -(-max_prefix // block_n))
    slots = num_sms * ctas_per_sm
    if rows_programs >= 4 * slots:
        return 1  # 4+ waves already: programs of uneven pace hide the last partial wave; splits add traffic
    costs: dict[int, float] = {}
    for splits in range(1, max(1, max_splits) + 1):
        per = -(-n_blocks // splits)
        if splits > 1 and per < min_blocks_per_split:
            break
        if -(-n_blocks // per) < splits:
            continue  # some splits would be empty: the same work as a smaller count
        last = n_blocks - per * (splits - 1)
        cost = _makespan(rows_programs, splits, per, last, slots, program_overhead_blocks)
        costs[splits] = cost + merge_blocks_per_split * splits * rows_programs / slots
    best = min(costs.values())
    return min(s for s, c in costs.items() if c <= best * (1.0 + tolerance))
