"""Dense fp32 torch reference for Hybrid Tree Attention (the test oracle of ``tree_attention``).

Owns no state. For each sequence it gathers the committed prefix keys from the paged cache and the tree
node keys from their flat slots, builds the full [n, prefix + n] visibility (prefix: all visible;
tree: ``tree_mask``), and runs one softmax over both: no split, no LSE merge, so it checks the
kernel's merge independently.
"""

from __future__ import annotations

import torch

__all__ = ["tree_attention_reference"]


def tree_attention_reference(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
    v_cache: torch.Tensor,
    qo_indptr: torch.Tensor,  # [B+1]
    prefix_lens: torch.Tensor,  # [B]
    page_tables: torch.Tensor,  # [B, P]
    tree_slots: torch.Tensor | None,  # [B, N_MAX] flat slots of the node keys
    tree_mask: torch.Tensor | None,  # [B, N_MAX, M_MAX] bool
    scale: float,
    tree_lens: torch.Tensor | None = None,  # [B] tree keys per sequence (default: its query count)
) -> tuple[torch.Tensor, torch.Tensor]:  # out [T, Hq, D] fp32, lse [T, Hq] fp32
    t, hq, d = q.shape
    ps, hkv = k_cache.shape[1], k_cache.shape[2]
    g = hq // hkv
    kflat = k_cache.reshape(-1, hkv, d)
    vflat = v_cache.reshape(-1, hkv, d)
    out = torch.zeros(t, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((t, hq), float("-inf"), dtype=torch.float32, device=q.device)
    indptr = qo_indptr.tolist()
    for b, plen in enumerate(prefix_lens.tolist()):
        a, e = indptr[b], indptr[b + 1]
        n = e - a
        pos = torch.arange(plen, device=q.device)
        slots = page_tables[b].long()[pos // ps] * ps + pos % ps  # [plen]
        vis = torch.ones(n, plen, dtype=torch.bool, device=q.device)
        if tree_slots is not None:
            m = n if tree_lens is None else int(tree_lens[b])
            slots = torch.cat([slots, tree_slots[b, :m].long()])
            vis = torch.cat([vis, tree_mask[b, :n, :m]], dim=1)
        if slots.numel() == 0:
            continue
        k = kflat[slots].float().repeat_interleave(g, dim=1)  # [L, Hq, D]
        v = vflat[slots].float().repeat_interleave(g, dim=1)
        s = torch.einsum("nhd,lhd->hnl", q[a:e].float(), k) * scale
        s = s.masked_fill(~vis[None], float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)  # [Hq, n]
        p = torch.exp(s - row_lse[..., None]).nan_to_num(0.0)
        out[a:e] = torch.einsum("hnl,lhd->nhd", p, v)
        lse[a:e] = row_lse.t()
    return out, lse
