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

__all__ = [
    "chunk_scores_reference",
    "page_stats_reference",
    "paged_decode_reference",
    "sparse_page_attention_reference",
    "unique_page_scores_reference",
]


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


def page_stats_reference(k_cache: torch.Tensor, page_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """UNIQUE statistics of whole pages, in fp32.

    Args:
        k_cache: [num_pages, page_size, Hkv, D] one layer's keys.
        page_ids: [n] page ids.

    Returns:
        mean: [n, Hkv, D] fp32 mean key of each page and KV head.
        std: [n, Hkv] fp32 sqrt(mean_j ||k_j - mean||^2) over the page's keys j.
    """
    keys = k_cache[page_ids.long()].float()  # [n, page_size, Hkv, D]
    mean = keys.mean(dim=1)
    std = ((keys - mean[:, None]) ** 2).sum(dim=-1).mean(dim=1).sqrt()
    return mean, std


def unique_page_scores_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    page_tables: torch.Tensor,
    prefix_lens: torch.Tensor,
    *,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    std_weight: float = 0.5,
) -> list[torch.Tensor]:
    """UNIQUE scores of each row's complete prefix pages, in fp32.

    Args:
        q: [R, Hq, D]; k_cache: [num_pages, page_size, Hkv, D]; page_tables: [R, P]; prefix_lens: [R].
        mean, std: optional statistics indexed by page id ([num_pages, Hkv, D], [num_pages, Hkv]); by default
            computed from the keys with ``page_stats_reference``.

    Returns:
        scores[r]: [Hkv, n_full_r] fp32, max over the GQA group of q.mean + std_weight * |q| * std, for the
        page-table columns 0..n_full_r-1 (n_full_r = prefix_len // page_size).
    """
    rows, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    scores = []
    for r in range(rows):
        ids = page_tables[r, : int(prefix_lens[r]) // page_size].long()
        if mean is None or std is None:
            mu, sd = page_stats_reference(k_cache, ids)  # [n_full, Hkv, D], [n_full, Hkv]
        else:
            mu, sd = mean[ids].float(), std[ids].float()
        qr = q[r].float().view(num_kv_heads, group, head_dim)  # [Hkv, G, D]
        per_head = torch.einsum("hgd,nhd->hgn", qr, mu)
        per_head = per_head + std_weight * qr.norm(dim=-1)[..., None] * sd.T[:, None, :]  # [Hkv, G, n_full]
        scores.append(per_head.amax(dim=1))
    return scores


def sparse_page_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_tables: torch.Tensor,
    prefix_lens: torch.Tensor,
    scale: float,
    budget_tokens: int,
    *,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    std_weight: float = 0.5,
    sink_pages: int = 1,
    recent_pages: int = 2,
    selected: list[list[set[int]]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[list[set[int]]]]:
    """UNIQUE page selection and attention over the kept pages, one query row at a time, in fp32.

    Args:
        q: [R, Hq, D] one row per query token.
        k_cache, v_cache: [num_pages, page_size, Hkv, D].
        page_tables: [R, P] int32 page table of each row's sequence.
        prefix_lens: [R] number of prefix keys of each row.
        scale: softmax scale.
        budget_tokens: complete pages kept per (row, KV head): budget_tokens // page_size.
        mean, std, std_weight: see ``unique_page_scores_reference``.
        sink_pages, recent_pages: first / last complete pages always kept.
        selected: optional selection to attend to instead of computing one (e.g. a kernel's, once checked to
            differ from the reference's only by near-tied scores).

    Returns:
        out: [R, Hq, D] in q.dtype (zeros for an empty prefix).
        lse: [R, Hq] fp32 natural-log LSE over the attended keys (-inf for an empty prefix).
        selected: selected[r][h] is the set of page-table columns of complete pages kept for row r and KV head
            h (the partial last page is always attended and not listed).
    """
    rows, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    budget_pages = budget_tokens // page_size
    if selected is None:
        selected = []
        scores = unique_page_scores_reference(
            q, k_cache, page_tables, prefix_lens, mean=mean, std=std, std_weight=std_weight
        )
        for r in range(rows):
            n_full = int(prefix_lens[r]) // page_size
            forced = set(range(min(sink_pages, n_full))) | set(range(max(0, n_full - recent_pages), n_full))
            row_sel = []
            for h in range(num_kv_heads):
                if n_full <= budget_pages:
                    row_sel.append(set(range(n_full)))
                    continue
                rest = [c for c in torch.argsort(scores[r][h], descending=True).tolist() if c not in forced]
                row_sel.append(forced | set(rest[: budget_pages - len(forced)]))
            selected.append(row_sel)

    out = torch.zeros(rows, num_q_heads, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.full((rows, num_q_heads), float("-inf"), dtype=torch.float32, device=q.device)
    for r in range(rows):
        n = int(prefix_lens[r])
        n_full, tail = divmod(n, page_size)
        ids = page_tables[r, : -(-n // page_size)].long()  # pages of the prefix, the partial one included
        qr = q[r].float().view(num_kv_heads, group, head_dim)  # [Hkv, G, D]
        for h in range(num_kv_heads):
            cols = sorted(selected[r][h]) + ([n_full] if tail else [])
            if not cols:
                continue
            col_t = torch.tensor(cols, device=ids.device)
            k = k_cache[ids[col_t], :, h].float().reshape(-1, head_dim)  # [n_cols * page_size, D]
            v = v_cache[ids[col_t], :, h].float().reshape(-1, head_dim)
            if tail:
                k, v = k[: k.shape[0] - page_size + tail], v[: v.shape[0] - page_size + tail]
            s = qr[h] @ k.T * scale  # [G, n_kept]
            out[r, h * group : (h + 1) * group] = torch.softmax(s, dim=-1) @ v
            lse[r, h * group : (h + 1) * group] = torch.logsumexp(s, dim=-1)
    return out.to(q.dtype), lse, selected


def chunk_scores_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    page_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    chunk_size: int = 32,
    max_chunks: int | None = None,
) -> torch.Tensor:
    """Cross-model Retrieval chunk scores, in fp32: softmax over all keys per query head, averaged over the
    heads, then averaged over each complete ``chunk_size``-token chunk (the mean of
    ``DraftModelProposer._chunk_scores``).

    Args:
        q: [B, Hq, D] one query per sequence.
        k_cache: [num_pages, page_size, Hkv, D] one layer's keys.
        page_tables: [B, P] int32; seq_lens: [B] number of keys of each sequence.
        scale: softmax scale.
        max_chunks: output width (default: (P * page_size) // chunk_size).

    Returns:
        [B, max_chunks] fp32: column c of sequence b is the score of keys [c * chunk_size, (c+1) * chunk_size)
        for c < seq_len // chunk_size and -inf past the complete chunks.
    """
    batch, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    if max_chunks is None:
        max_chunks = page_tables.shape[1] * page_size // chunk_size
    out = torch.full((batch, max_chunks), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(batch):
        n = int(seq_lens[b])
        n_chunks = min(n // chunk_size, max_chunks)
        if n_chunks == 0:
            continue
        ids = page_tables[b, : -(-n // page_size)].long()
        k = k_cache[ids].reshape(-1, num_kv_heads, head_dim)[:n].float()  # [n, Hkv, D]
        k = k.repeat_interleave(group, dim=1)  # [n, Hq, D]
        probs = torch.softmax(torch.einsum("hd,nhd->hn", q[b].float(), k) * scale, dim=-1).mean(dim=0)  # [n]
        out[b, :n_chunks] = probs[: n_chunks * chunk_size].view(n_chunks, chunk_size).mean(dim=1)
    return out
