"""UNIQUE page statistics (per page and KV head: mean key and RMS spread) kept next to a paged KV cache.

Data owned here: ``PageStats`` owns two device tensors, allocated once for a given KV cache:
    mean: [num_layers, num_pages, Hkv, D]  mean key of each page (``mean_dtype``: the cache dtype by default,
          which halves the bytes the scoring pass reads against fp32 and lets it use 16-bit tensor-core dots:
          3.5x faster scoring on an H100 at 32K; or fp32, which scores exactly like the fp32 torch reference)
    std:  [num_layers, num_pages, Hkv] fp32  sqrt(mean_j ||k_j - mean||^2) over the page's ``page_size`` keys
          (the same definition as ``specray.spec.sparse_self.page_statistics``)
    layer_offsets: [num_layers] int64  element offset of each layer's key tensor from layer 0's (lets one
          launch update every layer, since the cache keeps one tensor per layer)
It reads, never writes, the caller's key cache ``k[layer]``: [num_pages, page_size, Hkv, D].

Statistics of a page are valid once ``update``/``update_all`` ran after the page filled; entries of other
pages hold whatever was there before (zeros at construction). ``SparsePageAttention`` only scores the
complete pages of a prefix, so the caller updates a page when its last slot is written (for example in the
step that commits the accepted tokens). ``page_ids`` may be padded with negative ids, which are skipped,
so a static-size id buffer can be used inside a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

__all__ = ["LayerPageStats", "PageStats"]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class LayerPageStats(NamedTuple):
    """Statistics of one layer, as ``SparsePageAttention.run`` takes them."""

    mean: torch.Tensor  # [num_pages, Hkv, D] fp32 or the cache dtype
    std: torch.Tensor  # [num_pages, Hkv] fp32


@triton.jit
def _page_stats_kernel(
    k_ptr,  # layer 0's key cache [num_pages, page_size, Hkv, D]; other layers at k_ptr + layer_offsets[l]
    layer_off_ptr,  # [num_layers] int64 element offsets
    page_ids_ptr,  # [n] int32 pages to update (negative: skip)
    mean_ptr,  # [num_layers, num_pages, Hkv, D]
    std_ptr,  # [num_layers, num_pages, Hkv] fp32
    first_layer,
    stride_kp,
    stride_kt,
    stride_kh,
    stride_ml,
    stride_mp,
    stride_mh,
    stride_sl,
    stride_sp,
    stride_sh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    PAGE_PAD: tl.constexpr,
):
    idx = tl.program_id(0)
    kv_head = tl.program_id(1)
    layer = first_layer + tl.program_id(2)
    page = tl.load(page_ids_ptr + idx).to(tl.int64)
    if page >= 0:
        offs_t = tl.arange(0, PAGE_PAD)
        offs_d = tl.arange(0, BLOCK_D)
        t_mask = offs_t < PAGE_SIZE
        d_mask = offs_d < HEAD_DIM
        mask = t_mask[:, None] & d_mask[None, :]
        base = k_ptr + tl.load(layer_off_ptr + layer) + page * stride_kp + kv_head.to(tl.int64) * stride_kh
        k = tl.load(base + offs_t[:, None] * stride_kt + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(k, axis=0) / PAGE_SIZE  # [BLOCK_D]
        diff = tl.where(mask, k - mean[None, :], 0.0)
        std = tl.sqrt(tl.sum(tl.sum(diff * diff, axis=1), axis=0) / PAGE_SIZE)
        m_base = mean_ptr + layer.to(tl.int64) * stride_ml + page * stride_mp + kv_head * stride_mh
        tl.store(m_base + offs_d, mean.to(mean_ptr.dtype.element_ty), mask=d_mask)
        tl.store(std_ptr + layer.to(tl.int64) * stride_sl + page * stride_sp + kv_head * stride_sh, std)


class PageStats:
    """Per-page mean key and std of a paged KV cache, updated by a Triton kernel when pages fill.

    Args:
        k_layers: the cache's key tensors, one per layer, each [num_pages, page_size, Hkv, D] with the same
            shape, strides, dtype and device (``KVCache.k``). Kept by reference; never written.
        mean_dtype: dtype of ``mean``: None (default) = the cache dtype (half the scoring bytes of fp32; scores
            use the rounded means, so a near-tie may select differently from fp32 statistics), or torch.float32.

    Use ``PageStats.for_cache(cache)`` with a ``specray.engine.kv_cache.KVCache``. ``layer(i)`` gives the
    ``LayerPageStats`` that ``SparsePageAttention.run`` takes for layer i.
    """

    def __init__(self, k_layers: Sequence[torch.Tensor], *, mean_dtype: torch.dtype | None = None) -> None:
        if len(k_layers) < 1:
            raise ValueError("k_layers must hold at least one layer's key cache")
        k0 = k_layers[0]
        if k0.dim() != 4:
            raise ValueError(f"key cache must be [num_pages, page_size, Hkv, D], got {tuple(k0.shape)}")
        if k0.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"key cache dtype {k0.dtype} not supported (float16, bfloat16, float32)")
        if mean_dtype is None:
            mean_dtype = k0.dtype
        if mean_dtype not in (torch.float32, k0.dtype):
            raise ValueError(f"mean_dtype must be torch.float32 or the cache dtype {k0.dtype}, got {mean_dtype}")
        if k0.stride(3) != 1:
            raise ValueError("key cache must be contiguous in head_dim (stride(3) == 1)")
        for i, k in enumerate(k_layers):
            if k.shape != k0.shape or k.stride() != k0.stride() or k.dtype != k0.dtype or k.device != k0.device:
                raise ValueError(
                    f"layer {i} key cache {tuple(k.shape)} {k.dtype} {k.device} differs from layer 0's "
                    f"{tuple(k0.shape)} {k0.dtype} {k0.device} (shape, strides, dtype and device must match)"
                )
        num_pages, page_size, num_kv_heads, head_dim = k0.shape
        if not (16 <= head_dim <= 256 and head_dim % 8 == 0):
            raise ValueError(f"head_dim must be a multiple of 8 in [16, 256], got {head_dim}")
        elem = k0.element_size()
        byte_offsets = [k.data_ptr() - k0.data_ptr() for k in k_layers]
        if any(off % elem for off in byte_offsets):
            raise ValueError("layer key caches are not aligned to the element size relative to each other")

        self.k_layers = list(k_layers)
        self.num_layers = len(k_layers)
        self.num_pages = num_pages
        self.page_size = page_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.device = k0.device
        self.mean = torch.zeros(  # [L, num_pages, Hkv, D]
            self.num_layers, num_pages, num_kv_heads, head_dim, dtype=mean_dtype, device=self.device
        )
        self.std = torch.zeros(self.num_layers, num_pages, num_kv_heads, dtype=torch.float32, device=self.device)
        self.layer_offsets = torch.tensor([off // elem for off in byte_offsets], dtype=torch.int64, device=self.device)

    @classmethod
    def for_cache(cls, cache, *, mean_dtype: torch.dtype | None = None) -> PageStats:
        """Statistics for every layer of a ``specray.engine.kv_cache.KVCache``."""
        return cls(cache.k, mean_dtype=mean_dtype)

    def layer(self, layer: int) -> LayerPageStats:
        """Views of one layer's statistics: mean [num_pages, Hkv, D], std [num_pages, Hkv] fp32."""
        return LayerPageStats(self.mean[layer], self.std[layer])

    def _check_ids(self, page_ids: torch.Tensor) -> None:
        if page_ids.dim() != 1 or page_ids.dtype != torch.int32:
            raise ValueError(f"page_ids must be a 1-D int32 tensor, got {page_ids.dtype} {tuple(page_ids.shape)}")
        if page_ids.device != self.device:
            raise ValueError(f"page_ids is on {page_ids.device}, expected {self.device}")
        if not page_ids.is_contiguous():
            raise ValueError("page_ids must be contiguous")

    def _launch(self, page_ids: torch.Tensor, first_layer: int, num_layers: int) -> None:
        self._check_ids(page_ids)
        if page_ids.numel() == 0:
            return
        k0 = self.k_layers[0]
        grid = (page_ids.numel(), self.num_kv_heads, num_layers)
        _page_stats_kernel[grid](
            k0,
            self.layer_offsets,
            page_ids,
            self.mean,
            self.std,
            first_layer,
            k0.stride(0),
            k0.stride(1),
            k0.stride(2),
            self.mean.stride(0),
            self.mean.stride(1),
            self.mean.stride(2),
            self.std.stride(0),
            self.std.stride(1),
            self.std.stride(2),
            HEAD_DIM=self.head_dim,
            BLOCK_D=triton.next_power_of_2(self.head_dim),
            PAGE_SIZE=self.page_size,
            PAGE_PAD=max(2, triton.next_power_of_2(self.page_size)),
            num_warps=2,
        )

    def update(self, layer: int, page_ids: torch.Tensor) -> None:
        """Recompute the statistics of ``page_ids`` ([n] int32, negative ids skipped) for one layer."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.num_layers})")
        self._launch(page_ids, layer, 1)

    def update_all(self, page_ids: torch.Tensor) -> None:
        """Recompute the statistics of ``page_ids`` ([n] int32, negative ids skipped) for every layer, in one
        launch (grid: pages x KV heads x layers)."""
        self._launch(page_ids, 0, self.num_layers)
