"""Dense PyTorch references for the attention kernels, used as test oracles.

This module owns no state and no device buffers: every function takes the paged KV cache as given,
gathers each sequence's pages into dense fp32 tensors and computes the exact result. They are slow
(one Python iteration per sequence) and meant for tests and debugging only.

Paged KV cache layout shared with ``specray.kernels.paged_decode``:
    k_cache, v_cache: [num_pages, page_size, num_kv_heads, head_dim]
    page_tables:      [batch, max_pages_per_seq] int32 page ids (entries past a sequence's end are padding)
    seq_lens:         [batch] int32, number of valid KV tokens (the token being decoded is already written)
"""

from __future__ import annotations

import torch

__all__ = ["paged_decode_reference"]


def paged_decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-token decode attention over a paged KV cache, computed densely in fp32.

    Args:
        q: [B, Hq, D] query of the token being decoded, one per sequence.
        k_cache, v_cache: [num_pages, page_size, Hkv, D]; Hq must be a multiple of Hkv (GQA).
        page_tables: [B, P] int32 page ids.
        seq_lens: [B] int32 number of valid KV tokens (keys at positions 0..seq_len-1).
        scale: softmax scale applied to q.k.
        sliding_window: if given (W >= 1), key j is visible iff j > seq_len - 1 - W.

    Returns:
        out: [B, Hq, D] in q.dtype (zeros for a sequence with no visible key).
        lse: [B, Hq] fp32 natural-log log-sum-exp of the scaled scores (-inf with no visible key).
    """
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError("expected q [B, Hq, D] and k_cache == v_cache shape [num_pages, page_size, Hkv, D]")
    batch, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(f"num_q_heads={num_q_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    group = num_q_heads // num_kv_heads

    out = torch.zeros(batch, num_q_heads, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.full((batch, num_q_heads), float("-inf"), dtype=torch.float32, device=q.device)
    lens = seq_lens.tolist()
    for b in range(batch):
        n = int(lens[b])
        start = 0 if sliding_window is None else max(0, n - sliding_window)
        if n <= start:
            continue
        num_seq_pages = -(-n // page_size)
        pages = page_tables[b, :num_seq_pages].long()
        # [n, Hkv, D] dense keys/values of this sequence, then the visible range only.
        k = k_cache[pages].reshape(-1, num_kv_heads, head_dim)[start:n].float()
        v = v_cache[pages].reshape(-1, num_kv_heads, head_dim)[start:n].float()
        qb = q[b].float().view(num_kv_heads, group, head_dim)  # [Hkv, G, D]
        scores = torch.einsum("hgd,nhd->hgn", qb, k) * scale  # [Hkv, G, n]
        row_lse = torch.logsumexp(scores, dim=-1)  # [Hkv, G]
        probs = torch.exp(scores - row_lse[..., None])
        out[b] = torch.einsum("hgn,nhd->hgd", probs, v).reshape(num_q_heads, head_dim)
        lse[b] = row_lse.reshape(num_q_heads)
    return out.to(q.dtype), lse
