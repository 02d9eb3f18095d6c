"""Paged KV cache: the per-layer K/V page tensors and the page allocator that hands pages to sequences.

`KVCache` owns `k[layer]`, `v[layer]`: `[num_pages, page_size, num_kv_heads, head_dim]`. A token at
position `p` of a sequence lives in slot `page_table[p // page_size] * page_size + p % page_size`.
Page 0 is reserved as a scratch page (padding rows of CUDA-graph batches write there), so it is
never handed out. `PageAllocator` owns the free list; sequences own their page tables (lists of ids).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specray.config import CacheConfig
from specray.models.arch import ModelArch

SCRATCH_PAGE = 0


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: torch.dtype

    @property
    def bytes_per_page(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.page_size * self.num_kv_heads * self.head_dim * elem

    @classmethod
    def of(cls, arch: ModelArch, page_size: int, dtype: torch.dtype) -> KVCacheSpec:
        return cls(arch.num_layers, arch.num_kv_heads, arch.head_dim, page_size, dtype)


def num_pages_for(spec: KVCacheSpec, cfg: CacheConfig, device: torch.device) -> int:
    """Pages the budget allows: explicit `num_pages`, else the CPU byte budget, else the free CUDA
    memory left under `gpu_memory_utilization` after weights (call after loading the model)."""
    if cfg.num_pages is not None:
        return cfg.num_pages + 1  # + the scratch page
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used = total - free  # weights, this process's pools, other processes
        budget = cfg.gpu_memory_utilization * total - used - 0.05 * total  # 5%: activations, graphs
        n = int(budget // spec.bytes_per_page)
    else:
        n = cfg.cpu_kv_cache_bytes // spec.bytes_per_page
    if n < 2:
        raise MemoryError(
            f"the KV cache budget fits {n} pages of {spec.bytes_per_page} bytes; "
            "raise cache.gpu_memory_utilization / cache.cpu_kv_cache_bytes or set cache.num_pages"
        )
    return int(n)


class KVCache:
    def __init__(self, spec: KVCacheSpec, num_pages: int, device: torch.device):
        self.spec = spec
        self.num_pages = num_pages
        shape = (num_pages, spec.page_size, spec.num_kv_heads, spec.head_dim)
        self.k = [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]
        self.v = [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]

    @property
    def nbytes(self) -> int:
        return self.num_pages * self.spec.bytes_per_page


class PageAllocator:
    """Free list of page ids 1..num_pages-1 (page 0 is the scratch page)."""

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free: list[int] = list(range(num_pages - 1, SCRATCH_PAGE, -1))  # pop() gives low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_usable(self) -> int:
        return self.num_pages - 1

    @property
    def num_used(self) -> int:
        return self.num_usable - self.num_free

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV pages, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))
        pages.clear()


def pages_needed(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)
