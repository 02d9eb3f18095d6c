"""Attention dispatch: per-step metadata, the backend interface, and the dense torch reference backend.

`AttentionMetadata` owns the per-step index tensors that map a flat token batch onto the paged KV
cache. A backend's `forward` writes the step's new K/V into the cache (`slot_mapping`) and returns
attention of each query token over its sequence's keys `0 .. seq_len-1`, causal by position, with an
optional sliding window (key j visible to the query at position i iff i - W < j <= i).

Backends: `TorchAttentionBackend` (dense fp32 reference, any device; the test oracle) and
`TritonAttentionBackend` (CUDA: Triton split-KV paged decode, SDPA for prefill chunks). A backend may also
offer `store_rotated(layer, q, k, v, positions, rope, meta) -> bool`: RoPE and the K/V store done by the
backend before `forward` (the Triton backend: one fused kernel); when it returns True the caller passes
`kv_stored=True` to `forward`, which then skips its own write.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from specray.engine.kv_cache import KVCache

if TYPE_CHECKING:
    from specray.models.rope import RotaryEmbedding

# SDPA kernels for the context chunks of the Triton backend. The memory-efficient kernel takes any mask and
# has no per-shape setup. Left free, SDPA picked a backend (on H200, torch 2.11) whose first call at each new
# (queries, keys) shape took ~40 ms; a draft's working set changes that shape at every refresh, so a fresh
# draft process paid it over and over (BENCHMARKS.md, session 9). Math is the fallback for inputs the
# memory-efficient kernel rejects.
PREFILL_SDPA_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# A fresh causal chunk (`AttentionMetadata.fresh_causal`, captured in CUDA graphs once per length bucket, so a
# per-shape setup is paid at capture only): flash where it takes the dtype, else memory-efficient. Not cuDNN.
FRESH_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class TreeAttention:
    """One sequence's tree part: its last `M` keys are tree nodes (at `key_positions`); the step's
    queries see every earlier key (causal by position) and only the tree keys that `mask` allows."""

    mask: torch.Tensor  # [n_q, M] bool: query i may attend tree key m
    key_positions: torch.Tensor  # [M] int64 RoPE positions of the tree keys


@dataclass
class TreeBatch:
    """Static-shape tree step (CUDA-graph capturable): B sequences x N nodes, flattened to R = B*N rows.
    Padding nodes see only themselves; padding sequences have prefix length 0."""

    row_tables: torch.Tensor  # [R, P] int32: each row's sequence page table
    row_prefix_lens: torch.Tensor  # [R] int32: committed prefix length of the row's sequence
    tree_slots: torch.Tensor  # [B, N] int64: cache slots of the nodes' K/V
    tree_mask: torch.Tensor  # [B, N, N] bool ancestor-or-self


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token
    page_tables: torch.Tensor  # [S, P] int32
    seq_lens: torch.Tensor  # [S] int32: K/V length after this step's tokens are written
    query_start_loc: torch.Tensor  # [S+1] int32
    decode_only: bool  # every sequence has exactly one query token
    # host copies (empty under CUDA-graph replay, where only the tensors are used)
    seq_lens_cpu: list[int]
    query_start_loc_cpu: list[int]
    # token positions [T] when they are not `seq_len - n_q .. seq_len - 1` (tree steps); None otherwise
    positions: torch.Tensor | None = None
    # per sequence: tree-masked keys (verification, tree drafting); None = plain causal chunk
    trees: list[TreeAttention | None] | None = None
    # a layer whose post-RoPE queries the backend keeps in `captured_q` (retrieval scores)
    capture_layer: int | None = None
    # static-shape tree step (CUDA graphs); replaces `trees` and the host copies
    tree_batch: TreeBatch | None = None
    # one sequence's first T tokens with nothing cached before them (`fresh_graphs`): causal attention over
    # the step's own k/v, no page gathers, no host copies (CUDA-graph safe); trailing padding sees the real
    # tokens, never the other way round
    fresh_causal: bool = False

    def mask_for(self, s: int, n_q: int, seq_len: int, window: int | None, device) -> torch.Tensor:
        """[n_q, seq_len] bool visibility of sequence s's keys to its queries."""
        tree = self.trees[s] if self.trees is not None else None
        a = self.query_start_loc_cpu[s]
        if self.positions is None:
            q_pos = torch.arange(seq_len - n_q, seq_len, device=device)
        else:
            q_pos = self.positions[a : a + n_q].to(device)
        if tree is None:
            return visibility_mask(q_pos, seq_len, window)
        m = tree.key_positions.shape[0]
        k_pos = torch.cat([torch.arange(seq_len - m, device=device), tree.key_positions.to(device)])
        mask = k_pos[None, :] <= q_pos[:, None]
        if window is not None:
            mask &= k_pos[None, :] > q_pos[:, None] - window
        mask[:, seq_len - m :] &= tree.mask.to(device)
        return mask


class AttentionBackend(Protocol):
    """`forward` writes k/v at `meta.slot_mapping`, then attends. Optional (looked up with getattr):
    `store_rotated(layer, q, k, v, positions, rope, meta) -> bool`; see the module docstring."""

    def forward(
        self,
        layer: int,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor: ...  # [T, Hq, D]


def write_kv(cache: KVCache, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    kc, vc = cache.k[layer], cache.v[layer]
    kc.view(-1, *kc.shape[2:]).index_copy_(0, slots, k.to(kc.dtype))
    vc.view(-1, *vc.shape[2:]).index_copy_(0, slots, v.to(vc.dtype))


def gather_kv(cache: KVCache, layer: int, page_row: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[seq_len, Hkv, D] keys and values of one sequence, in position order."""
    ps = cache.spec.page_size
    n_pages = -(-seq_len // ps)
    kc, vc = cache.k[layer], cache.v[layer]
    pages = page_row[:n_pages].long()
    k = kc[pages].reshape(-1, *kc.shape[2:])[:seq_len]
    v = vc[pages].reshape(-1, *vc.shape[2:])[:seq_len]
    return k, v


def visibility_mask(q_pos: torch.Tensor, seq_len: int, window: int | None) -> torch.Tensor:
    """[n_q, seq_len] bool: True where the key is visible to the query."""
    kpos = torch.arange(seq_len, device=q_pos.device)
    mask = kpos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= kpos[None, :] > q_pos[:, None] - window
    return mask


def dense_attention(
    q: torch.Tensor,  # [n_q, Hq, D]
    k: torch.Tensor,  # [L, Hkv, D]
    v: torch.Tensor,  # [L, Hkv, D]
    mask: torch.Tensor,  # [n_q, L] bool, or [Hkv, n_q, L] for a per-KV-head mask (sparse pages)
    scale: float,
) -> torch.Tensor:  # [n_q, Hq, D] fp32
    n_q, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    qf = q.float().view(n_q, Hkv, G, D).permute(1, 2, 0, 3)  # [Hkv, G, n_q, D]
    kf = k.float().permute(1, 0, 2)  # [Hkv, L, D]
    vf = v.float().permute(1, 0, 2)
    scores = torch.einsum("hgqd,hkd->hgqk", qf, kf) * scale
    if mask.dim() == 3:
        mask = mask[:, None]  # [Hkv, 1, n_q, L]
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("hgqk,hkd->hgqd", probs, vf)  # [Hkv, G, n_q, D]
    return out.permute(2, 0, 1, 3).reshape(n_q, Hq, D)


class TorchAttentionBackend:
    """Reference: gathers each sequence's pages and runs dense fp32 attention (loop over sequences)."""

    def __init__(self, cache: KVCache):
        self.cache = cache

    def forward(self, layer, q, k, v, meta, scale, sliding_window):
        write_kv(self.cache, layer, k, v, meta.slot_mapping)
        if meta.capture_layer == layer:
            self.captured_q = q.clone()
        if meta.fresh_causal:
            n = q.shape[0]
            mask = visibility_mask(torch.arange(n, device=q.device), n, sliding_window)
            return dense_attention(q, k, v, mask, scale).to(q.dtype)
        out = torch.empty_like(q)
        qsl = meta.query_start_loc_cpu
        groups: dict[tuple[int, int], list[int]] = {}  # (seq_len, n_q) -> sequences, batched together
        for s, seq_len in enumerate(meta.seq_lens_cpu):
            groups.setdefault((seq_len, qsl[s + 1] - qsl[s]), []).append(s)
        for (seq_len, n_q), members in groups.items():
            if len(members) == 1:
                s = members[0]
                a = qsl[s]
                ks, vs = gather_kv(self.cache, layer, meta.page_tables[s], seq_len)
                mask = meta.mask_for(s, n_q, seq_len, sliding_window, q.device)
                out[a : a + n_q] = dense_attention(q[a : a + n_q], ks, vs, mask, scale).to(q.dtype)
                continue
            rows = torch.cat([torch.arange(qsl[s], qsl[s] + n_q) for s in members]).to(q.device)
            ks, vs = gather_kv_batch(self.cache, layer, meta.page_tables[members], seq_len)  # [G, L, Hkv, D]
            if meta.trees is None and meta.positions is None:  # identical causal masks
                masks = meta.mask_for(members[0], n_q, seq_len, sliding_window, q.device)[None].expand(
                    len(members), -1, -1)
            else:
                masks = torch.stack([meta.mask_for(s, n_q, seq_len, sliding_window, q.device) for s in members])
            o = dense_attention_batch(q[rows].view(len(members), n_q, *q.shape[1:]), ks, vs, masks, scale)
            out[rows] = o.reshape(-1, *q.shape[1:]).to(q.dtype)
        return out


def gather_kv_batch(cache: KVCache, layer: int, page_rows: torch.Tensor, seq_len: int):
    """page_rows [G, P] -> keys, values [G, seq_len, Hkv, D] of G sequences of equal length."""
    ps = cache.spec.page_size
    n_pages = -(-seq_len // ps)
    kc, vc = cache.k[layer], cache.v[layer]
    pages = page_rows[:, :n_pages].long()
    g = pages.shape[0]
    k = kc[pages].reshape(g, -1, *kc.shape[2:])[:, :seq_len]
    v = vc[pages].reshape(g, -1, *vc.shape[2:])[:, :seq_len]
    return k, v


def dense_attention_batch(q, k, v, mask, scale) -> torch.Tensor:
    """q [G, n_q, Hq, D], k/v [G, L, Hkv, D], mask [G, n_q, L] -> [G, n_q, Hq, D] fp32."""
    g, n_q, hq, d = q.shape
    hkv = k.shape[2]
    qf = q.float().view(g, n_q, hkv, hq // hkv, d)
    scores = torch.einsum("gqhid,gkhd->ghiqk", qf, k.float()) * scale  # [G, Hkv, grp, n_q, L]
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    o = torch.einsum("ghiqk,gkhd->gqhid", probs, v.float())
    return o.reshape(g, n_q, hq, d)


class TritonAttentionBackend:
    """CUDA: decode-only steps use the Triton split-KV paged kernel (CUDA-graph safe); tree steps
    (verification, tree drafting) the Triton Hybrid Tree Attention kernel; steps with prefill chunks run
    torch SDPA per sequence over its gathered pages."""

    def __init__(self, cache: KVCache, num_q_heads: int, max_batch_size: int, max_model_len: int):
        from specray.kernels.paged_decode import PagedDecodeAttention, choose_num_splits

        self.cache = cache
        spec = cache.spec
        dev = cache.k[0].device
        num_sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 8
        self._decoders: dict[int, PagedDecodeAttention] = {}
        self._make = lambda bs: PagedDecodeAttention(
            bs, num_q_heads, spec.num_kv_heads, spec.head_dim,
            choose_num_splits(bs, spec.num_kv_heads, max_model_len, num_sms=num_sms), dev,
        )
        self.max_batch_size = max_batch_size
        self.num_q_heads, self.max_model_len = num_q_heads, max_model_len
        self._trees: dict[tuple[int, int], object] = {}  # (batch, nodes) -> HybridTreeAttention
        self._tree_step: AttentionMetadata | None = None

    def tree_kernel_for(self, batch: int, nodes: int):
        """The Hybrid Tree Attention kernel sized for `batch` sequences of at most `nodes` queries each."""
        from specray.kernels.tree_attention import HybridTreeAttention

        key = (batch, nodes)
        if key not in self._trees:
            spec = self.cache.spec
            self._trees[key] = HybridTreeAttention(
                batch * nodes, batch, nodes, self.num_q_heads, spec.num_kv_heads, spec.head_dim,
                self.max_model_len, self.cache.k[0].device,
            )
        return self._trees[key]

    def _hybrid_tree(self, layer: int, q: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """Ragged tree steps (eager): one Hybrid Tree Attention launch for the whole batch. The step's
        tree index tensors are built once per step (at layer 0) and reused by every layer."""
        if layer == 0 or self._tree_step is not meta:
            self.plan_ragged_tree(meta)
        out, _ = self.tree_kernel.run(q, self.cache.k[layer], self.cache.v[layer], scale)
        return out

    def plan_ragged_tree(self, meta: AttentionMetadata) -> None:
        """Build the step's tree index tensors (prefix lengths, node slots, masks) once and plan the
        Hybrid Tree Attention kernel with them; `tree_kernel` then serves every layer of the step."""
        ps = self.cache.spec.page_size
        qsl = meta.query_start_loc_cpu
        b = len(meta.seq_lens_cpu)
        n_qs = [qsl[s + 1] - qsl[s] for s in range(b)]
        ms = [t.key_positions.shape[0] for t in meta.trees]
        cap_b = 1 << (b - 1).bit_length()  # power-of-two caps: few kernel instances
        cap_n = min(128, max(16, 1 << (max(n_qs) - 1).bit_length()))
        m_max = max(ms)
        slots = torch.zeros(b, m_max, dtype=torch.int64)
        mask = torch.zeros(b, max(n_qs), m_max, dtype=torch.bool)
        prefix = [seq_len - m for seq_len, m in zip(meta.seq_lens_cpu, ms, strict=True)]
        tables = meta.page_tables.cpu()
        for s in range(b):
            pos = torch.arange(prefix[s], meta.seq_lens_cpu[s])
            slots[s, : ms[s]] = tables[s].long()[pos // ps] * ps + pos % ps
            mask[s, : n_qs[s], : ms[s]] = meta.trees[s].mask.cpu()
        dev = meta.page_tables.device
        kern = self.tree_kernel_for(cap_b, cap_n)
        kern.plan(meta.query_start_loc, torch.tensor(prefix, dtype=torch.int32, device=dev), meta.page_tables,
                  slots.to(dev), mask.to(dev), torch.tensor(ms, dtype=torch.int32, device=dev))
        self.tree_kernel, self._tree_step = kern, meta

    def _hybrid_tree_batched(self, layer: int, q: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """The same Hybrid Tree Attention over a static [B, N] batch: no host syncs (CUDA-graph safe)."""
        tb = meta.tree_batch
        b, n = tb.tree_slots.shape
        kern = self.tree_kernel_for(b, n)
        # per-sequence views of the row-expanded tables: row b*N is sequence b's first node
        kern.plan(meta.query_start_loc, tb.row_prefix_lens[::n], tb.row_tables[::n], tb.tree_slots, tb.tree_mask)
        out, _ = kern.run(q, self.cache.k[layer], self.cache.v[layer], scale)
        return out

    def decoder_for(self, batch_size: int):
        if batch_size not in self._decoders:
            self._decoders[batch_size] = self._make(batch_size)
        return self._decoders[batch_size]

    def store_rotated(
        self,
        layer: int,
        q: torch.Tensor,  # [T, Hq, D], rotated in place
        k: torch.Tensor,  # [T, Hkv, D], rotated in place
        v: torch.Tensor,  # [T, Hkv, D]
        positions: torch.Tensor,  # [T] RoPE positions
        rope: RotaryEmbedding,
        meta: AttentionMetadata,
    ) -> bool:
        """RoPE of q and k plus this step's K/V cache store at `meta.slot_mapping`, in one Triton launch
        (`rotary.rope_store_`: q, k end up as `rope` leaves them, the cache as `write_kv` leaves it). Only when
        `rope.fused` is on and the tensors fit the kernel; returns whether it ran (False: nothing was done, the
        caller applies `rope` and `forward` writes the cache). No host sync, no allocation: CUDA-graph safe."""
        kc, vc = self.cache.k[layer], self.cache.v[layer]  # [pages, page_size, Hkv, D]
        if not getattr(rope, "fused", False):
            return False
        if kc.dtype not in (torch.float16, torch.bfloat16, torch.float32) or v.shape != k.shape or v.stride(-1) != 1:
            return False  # not a layout the kernel takes: the unfused RoPE + write_kv
        from specray.kernels import rotary

        rotary.rope_store_(q, k, v, positions, rope.cos, rope.sin, kc, vc, meta.slot_mapping)
        return True

    def forward(self, layer, q, k, v, meta, scale, sliding_window, kv_stored: bool = False):
        """kv_stored: `store_rotated` already wrote this step's k/v for `layer` (skip `write_kv`)."""
        if not kv_stored:
            write_kv(self.cache, layer, k, v, meta.slot_mapping)
        if meta.capture_layer == layer:
            self.captured_q = q.clone()
        if meta.fresh_causal:
            return fresh_causal_attention(q, k, v, scale)
        if meta.tree_batch is not None:
            return self._hybrid_tree_batched(layer, q, meta, scale)
        if meta.trees is not None and sliding_window is None:
            return self._hybrid_tree(layer, q, meta, scale)
        if meta.decode_only and meta.trees is None:
            dec = self.decoder_for(q.shape[0])
            out, _ = dec.run(q, self.cache.k[layer], self.cache.v[layer], meta.page_tables, meta.seq_lens,
                             scale, sliding_window)
            return out
        out = torch.empty_like(q)
        qsl = meta.query_start_loc_cpu
        with sdpa_kernel(PREFILL_SDPA_BACKENDS):  # pinned: see PREFILL_SDPA_BACKENDS
            for s, seq_len in enumerate(meta.seq_lens_cpu):
                a, b = qsl[s], qsl[s + 1]
                ks, vs = gather_kv(self.cache, layer, meta.page_tables[s], seq_len)
                mask = meta.mask_for(s, b - a, seq_len, sliding_window, q.device)
                out[a:b] = sdpa_tokens(q[a:b], ks, vs, scale, attn_mask=mask[None, None])
        return out


def sdpa_tokens(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, **sdpa_kw) -> torch.Tensor:
    """SDPA of token-major tensors, q [n_q, Hq, D] over k/v [L, Hkv, D] -> [n_q, Hq, D]. The GQA heads are
    expanded (keeps SDPA on its fused kernels) and the inputs made 4-D: SDPA's fused kernels take only those;
    3-D ones fall back to its math path, which upcasts to fp32 and materialises the scores (about 3x the
    device time of the GEMMs at 1K tokens, and ~0.4 ms of host ops per layer). `sdpa_kw`: `attn_mask`
    ([1, 1, n_q, L]) or `is_causal`. The caller picks the backends (`sdpa_kernel`)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], scale=scale, **sdpa_kw,
    )  # [1, Hq, n_q, D]
    return o[0].transpose(0, 1)


def fresh_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal SDPA of one chunk over its own keys. q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]."""
    with sdpa_kernel(FRESH_SDPA_BACKENDS):
        return sdpa_tokens(q, k, v, scale, is_causal=True)
