"""RoPE + paged K/V cache store in one Triton launch (``rotary.rope_store_``) and its wiring into the decoder
through ``TritonAttentionBackend.store_rotated``.

Owns no data: every test builds fresh random inputs and caches (never zeros). The kernel is checked against an
independent oracle (``rope_ref`` plus a plain torch index store into a copy of the cache), bit for bit; the
decoder path with the fused store against the same model on the unfused path (``rope_`` then ``write_kv``),
bit for bit, and against the dense torch reference backend. Without CUDA the kernels run under Triton's CPU
interpreter (TRITON_INTERPRET=1, which tests/conftest.py sets before triton is imported), so the shapes are tiny.
"""

import pytest
import torch

from specray.engine import attention
from specray.engine.attention import (
    AttentionMetadata,
    TorchAttentionBackend,
    TreeAttention,
    TritonAttentionBackend,
    write_kv,
)
from specray.engine.kv_cache import KVCache, KVCacheSpec
from specray.kernels import rotary
from specray.models.arch import ModelArch
from specray.models.decoder import DecoderLM
from specray.spec.types import DraftTree
from tests.support.tiny import hf_config

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Random values bounded away from zero (|v| >= 0.05 * scale), so nothing passes by accident."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(*shape, generator=gen, dtype=torch.float64)
    v = torch.where(v.abs() < 0.05, torch.copysign(torch.full_like(v, 0.05), v), v)
    return (v * scale).to(dtype).to(DEVICE)


def rope_tables(max_pos: int, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    freqs = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float().to(DEVICE), emb.sin().float().to(DEVICE)


def qkv_views(tokens: int, num_q: int, num_kv: int, head_dim: int, dtype: torch.dtype, seed: int):
    """q [T, Hq, D], k, v [T, Hkv, D]: non-contiguous views split from one fused qkv output, as the decoder has."""
    qkv = randn(tokens, (num_q + 2 * num_kv) * head_dim, dtype=dtype, seed=seed, scale=2.0)
    q, k, v = qkv.split([num_q * head_dim, num_kv * head_dim, num_kv * head_dim], dim=-1)
    return qkv, q.view(tokens, num_q, head_dim), k.view(tokens, num_kv, head_dim), v.view(tokens, num_kv, head_dim)


def oracle_store(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A copy of cache [pages, page_size, Hkv, D] with x [T, Hkv, D] (cast) stored at the flat slots >= 0."""
    out = cache.clone()
    flat = out.view(-1, *out.shape[2:])  # [pages * page_size, Hkv, D]
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            flat[s] = x[t].to(out.dtype)
    return out


# ---------------------------------------------------------------------------------------------------------
# the kernel
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", [(4, 2), (7, 1), (2, 2)], ids=lambda h: f"hq{h[0]}-hkv{h[1]}")
@pytest.mark.parametrize("tokens", [1, 6])
def test_rope_store_matches_rope_ref_and_index_store(tokens: int, heads: tuple[int, int], dtype: torch.dtype) -> None:
    num_q, num_kv = heads
    head_dim, page_size, num_pages, max_pos = 64, 4, 7, 512
    seed = tokens * 100 + num_q * 10 + num_kv
    cos, sin = rope_tables(max_pos, head_dim)
    gen = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, max_pos, (tokens,), generator=gen).to(DEVICE)
    # distinct slots scattered over several pages (never the scratch page 0), in no particular order
    slots = (torch.randperm((num_pages - 1) * page_size, generator=gen)[:tokens] + page_size).to(DEVICE)
    qkv, q, k, v = qkv_views(tokens, num_q, num_kv, head_dim, dtype, seed)
    k_cache = randn(num_pages, page_size, num_kv, head_dim, dtype=dtype, seed=seed + 1)
    v_cache = randn(num_pages, page_size, num_kv, head_dim, dtype=dtype, seed=seed + 2)
    q0, k0, v0 = q.clone(), k.clone(), v.clone()

    ref_q, ref_k = rotary.rope_ref(q0, k0, positions, cos, sin)
    want_kc, want_vc = oracle_store(k_cache, slots, ref_k), oracle_store(v_cache, slots, v0)
    assert not torch.equal(want_kc, k_cache) and not torch.equal(want_vc, v_cache)

    assert rotary.rope_store_(q, k, v, positions, cos, sin, k_cache, v_cache, slots) is None
    assert torch.equal(v, v0), "v must not be modified"
    if DEVICE.type == "cpu":  # the interpreter has no FMA contraction: bit-exact against the reference
        assert torch.equal(q, ref_q)
        assert torch.equal(k, ref_k)
        assert torch.equal(k_cache, want_kc)
    else:
        torch.testing.assert_close(q, ref_q, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-5)
    assert torch.equal(v_cache, want_vc)

    # bit-exact against today's unfused path (rope_ then write_kv's index_copy_), on any device
    qkv2, q2, k2, v2 = qkv_views(tokens, num_q, num_kv, head_dim, dtype, seed)
    rotary.rope_(q2, k2, positions, cos, sin)
    kc2 = randn(num_pages, page_size, num_kv, head_dim, dtype=dtype, seed=seed + 1)
    vc2 = randn(num_pages, page_size, num_kv, head_dim, dtype=dtype, seed=seed + 2)
    kc2.view(-1, num_kv, head_dim).index_copy_(0, slots, k2)
    vc2.view(-1, num_kv, head_dim).index_copy_(0, slots, v2)
    assert torch.equal(qkv, qkv2) and torch.equal(k_cache, kc2) and torch.equal(v_cache, vc2)


@pytest.mark.parametrize(("dtype", "cache_dtype"), [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16),
                                                    (torch.float16, torch.float32)], ids=str)
def test_rope_store_casts_to_the_cache_dtype_and_skips_negative_slots(dtype, cache_dtype) -> None:
    """A cache dtype other than k's (k rounded to its own dtype first, then cast), int32 positions and slots,
    a padded half dim (D = 80), a negative slot (no cache write) and CUDA-graph padding rows that all write
    the scratch slot 0 with position 0."""
    tokens, num_q, num_kv, head_dim, page_size, num_pages = 5, 3, 1, 80, 2, 6
    cos, sin = rope_tables(64, head_dim)
    positions = torch.tensor([9, 63, 17, 0, 0], dtype=torch.int32, device=DEVICE)
    slots = torch.tensor([7, -1, 2, 0, 0], dtype=torch.int32, device=DEVICE)
    _, q, k, v = qkv_views(tokens, num_q, num_kv, head_dim, dtype, 51)
    with torch.no_grad():  # the two padding rows carry the same token, as replay pads with id 0
        q[4], k[4], v[4] = q[3], k[3], v[3]
    k_cache = randn(num_pages, page_size, num_kv, head_dim, dtype=cache_dtype, seed=52)
    v_cache = randn(num_pages, page_size, num_kv, head_dim, dtype=cache_dtype, seed=53)
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    ref_q, ref_k = rotary.rope_ref(q0, k0, positions.long(), cos, sin)
    want_kc, want_vc = oracle_store(k_cache, slots, ref_k), oracle_store(v_cache, slots, v0)

    rotary.rope_store_(q, k, v, positions, cos, sin, k_cache, v_cache, slots)
    assert torch.equal(v, v0)
    assert torch.equal(q[3], q0[3]) and torch.equal(k[3], k0[3])  # position 0 is the identity
    if DEVICE.type == "cpu":
        assert torch.equal(q, ref_q) and torch.equal(k, ref_k)
        assert torch.equal(k_cache, want_kc)
    assert torch.equal(v_cache, want_vc)
    # the token with slot -1 was rotated but stored nowhere: only slots 7, 2, 0 changed
    changed = ((k_cache != randn(num_pages, page_size, num_kv, head_dim, dtype=cache_dtype, seed=52))
               .view(num_pages * page_size, -1).any(-1).nonzero().flatten().tolist())
    assert changed == [0, 2, 7]
    assert not torch.equal(k[1], k0[1])


def test_rope_store_input_validation() -> None:
    cos, sin = rope_tables(16, 64)
    _, q, k, v = qkv_views(2, 4, 2, 64, torch.bfloat16, 1)
    kc = randn(3, 4, 2, 64, dtype=torch.bfloat16, seed=2)
    vc = randn(3, 4, 2, 64, dtype=torch.bfloat16, seed=3)
    pos = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    slots = torch.tensor([5, 6], device=DEVICE)
    with pytest.raises(ValueError, match="v must"):
        rotary.rope_store_(q, k, v.float(), pos, cos, sin, kc, vc, slots)
    with pytest.raises(ValueError, match="v must"):
        rotary.rope_store_(q, k, v[:, :1], pos, cos, sin, kc, vc, slots)
    with pytest.raises(ValueError, match="slots"):
        rotary.rope_store_(q, k, v, pos, cos, sin, kc, vc, slots.float())
    with pytest.raises(ValueError, match="slots"):
        rotary.rope_store_(q, k, v, pos, cos, sin, kc, vc, slots[:1])
    with pytest.raises(ValueError, match="share a shape"):
        rotary.rope_store_(q, k, v, pos, cos, sin, kc[..., :32], vc[..., :32], slots)
    with pytest.raises(ValueError, match="share a dtype"):
        rotary.rope_store_(q, k, v, pos, cos, sin, kc, vc.float(), slots)
    with pytest.raises(ValueError, match="viewable"):
        rotary.rope_store_(q, k, v, pos, cos, sin, kc.transpose(0, 1), vc.transpose(0, 1), slots)
    with pytest.raises(ValueError, match="dtype"):
        rotary.rope_store_(q, k.float(), v, pos, cos, sin, kc, vc, slots)
    before = kc.clone()
    rotary.rope_store_(q[:0], k[:0], v[:0], pos[:0], cos, sin, kc, vc, slots[:0])  # no tokens: no launch
    assert torch.equal(kc, before)


# ---------------------------------------------------------------------------------------------------------
# the decoder on the Triton backend: fused store vs rope_ + write_kv vs the torch reference
# ---------------------------------------------------------------------------------------------------------


class _UnfusedStore(TritonAttentionBackend):
    """The Triton backend as it was before the fused store: RoPE by `rope_`, then `write_kv` in `forward`."""

    def store_rotated(self, *args, **kwargs) -> bool:
        return False


def _steps(page_size: int) -> tuple[list[dict], list[list[int]]]:
    """Prefill chunks, a mixed chunk + decode step, a ragged tree-verification step and a padded decode step of
    two sequences, as dicts of the step's host inputs; and the sequences' pages (page 0 is the scratch page)."""
    pages = [[5, 2, 7, 3], [4, 6, 1]]

    def slot(s: int, p: int) -> int:
        return pages[s][p // page_size] * page_size + p % page_size

    def chunk(starts: list[int], counts: list[int]) -> dict:
        pos = [p for a, n in zip(starts, counts, strict=True) for p in range(a, a + n)]
        seq_of = [s for s, n in enumerate(counts) for _ in range(n)]
        return dict(positions=pos, slots=[slot(s, p) for s, p in zip(seq_of, pos, strict=True)], counts=counts,
                    seq_lens=[a + n for a, n in zip(starts, counts, strict=True)], trees=None)

    tree0 = DraftTree([0, 0, 0, 0], [-1, 0, 0, 1], [0, 1, 1, 2])
    tree1 = DraftTree([0, 0, 0], [-1, 0, 1], [0, 1, 2])
    prefix = [11, 6]
    tree_step = dict(
        positions=[prefix[0] + d for d in tree0.depths] + [prefix[1] + d for d in tree1.depths],
        slots=[slot(0, prefix[0] + i) for i in range(4)] + [slot(1, prefix[1] + i) for i in range(3)],
        counts=[4, 3], seq_lens=[prefix[0] + 4, prefix[1] + 3], trees=(tree0, tree1),
    )
    decode = chunk([prefix[0] + 4, prefix[1] + 3], [1, 1])  # after the tree nodes
    # CUDA-graph style padding (ModelRunner.replay): two extra rows of token 0 at position 0 writing the
    # scratch slot 0, seq_len 1, page table of zeros
    decode = dict(positions=decode["positions"] + [0, 0], slots=decode["slots"] + [0, 0], counts=[1, 1, 1, 1],
                  seq_lens=decode["seq_lens"] + [1, 1], trees=None, pad=2)
    return [chunk([0, 0], [7, 5]), chunk([7, 5], [4, 1]), tree_step, decode], pages


def _meta(step: dict, pages: list[list[int]]) -> AttentionMetadata:
    counts = step["counts"]
    qsl = [0]
    for n in counts:
        qsl.append(qsl[-1] + n)
    width = max(len(p) for p in pages)
    tables = [p + [0] * (width - len(p)) for p in pages] + [[0] * width] * step.get("pad", 0)
    trees = None
    if step["trees"] is not None:
        trees = [TreeAttention(t.ancestor_mask().to(DEVICE),
                               torch.tensor(step["positions"][qsl[s]:qsl[s + 1]], device=DEVICE))
                 for s, t in enumerate(step["trees"])]
    return AttentionMetadata(
        slot_mapping=torch.tensor(step["slots"], dtype=torch.int64, device=DEVICE),
        page_tables=torch.tensor(tables, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(step["seq_lens"], dtype=torch.int32, device=DEVICE),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=DEVICE),
        decode_only=all(n == 1 for n in counts), seq_lens_cpu=step["seq_lens"], query_start_loc_cpu=qsl,
        positions=torch.tensor(step["positions"], dtype=torch.int64, device=DEVICE) if trees is not None else None,
        trees=trees, capture_layer=1 if trees is not None else None,
    )


@pytest.mark.parametrize(("family", "dtype"), [("llama", torch.float32), ("qwen3", torch.bfloat16),
                                               ("mistral", torch.float32)])
def test_decoder_fused_rope_store_equals_unfused_path(family: str, dtype: torch.dtype, monkeypatch) -> None:
    """Prefill, tree verification and a padded decode through the Triton backend: with the fused store the
    logits, the captured queries and every cache page are bit-identical to `rope_` + `write_kv`, and the
    logits match the dense torch reference backend (unfused eager RoPE)."""
    arch = ModelArch.from_hf_config(hf_config(family, vocab_size=64).to_dict())
    torch.manual_seed(0)
    model = DecoderLM.empty(arch, 64, dtype, DEVICE).eval()  # fp32 RoPE tables, parameters in dtype
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, 0.08)
    page_size = 4
    spec = KVCacheSpec.of(arch, page_size, dtype)

    def fresh_cache() -> KVCache:
        cache = KVCache(spec, 9, DEVICE)
        for i, t in enumerate(cache.k + cache.v):  # not zeros: a missed or misplaced write shows
            t.copy_(randn(*t.shape, dtype=dtype, seed=100 + i))
        return cache

    calls = {"n": 0, "writes": 0}
    real = rotary.rope_store_

    def counting(*args, **kwargs) -> None:
        calls["n"] += 1
        real(*args, **kwargs)

    monkeypatch.setattr(rotary, "rope_store_", counting)
    real_write = attention.write_kv

    def counting_write(*args, **kwargs) -> None:
        calls["writes"] += 1
        real_write(*args, **kwargs)

    monkeypatch.setattr(attention, "write_kv", counting_write)
    caches = [fresh_cache() for _ in range(3)]
    backends = [TritonAttentionBackend(caches[0], arch.num_heads, 8, 64),
                _UnfusedStore(caches[1], arch.num_heads, 8, 64), TorchAttentionBackend(caches[2])]
    steps, pages = _steps(page_size)
    for n_step, step in enumerate(steps):
        meta = _meta(step, pages)
        real_rows = len(step["slots"]) - step.get("pad", 0)
        ids = torch.tensor([(7 * i + 3 * n_step + 1) % arch.vocab_size for i in range(real_rows)]
                           + [0] * step.get("pad", 0), device=DEVICE)
        pos = torch.tensor(step["positions"], dtype=torch.int64, device=DEVICE)
        logits = []
        for b, backend in enumerate(backends):
            model.rope.fused = b < 2  # the torch reference runs the eager RoPE formula
            before, writes = calls["n"], calls["writes"]
            with torch.no_grad():
                logits.append(model.compute_logits(model(ids, pos, backend, meta)))
            # one fused launch per layer and no write_kv on the fused path; write_kv per layer otherwise
            assert calls["n"] - before == (arch.num_layers if b == 0 else 0)
            assert calls["writes"] - writes == (0 if b == 0 else arch.num_layers)
        assert torch.equal(logits[0], logits[1]), f"step {n_step}"
        if meta.capture_layer is not None:
            assert torch.equal(backends[0].captured_q, backends[1].captured_q)
        for layer in range(arch.num_layers):
            assert torch.equal(caches[0].k[layer], caches[1].k[layer]), f"step {n_step} layer {layer}"
            assert torch.equal(caches[0].v[layer], caches[1].v[layer]), f"step {n_step} layer {layer}"
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        rel = (logits[0][:real_rows] - logits[2][:real_rows]).norm() / logits[2][:real_rows].norm()
        assert rel < tol, f"step {n_step}: {rel}"
    # independently of the unfused Triton path: the caches hold what the torch reference backend wrote
    # (eager RoPE: equal up to rounding), every written slot changed and nothing else did
    initial = fresh_cache()
    written = sorted({s for step in steps for s in step["slots"]})
    for layer in range(arch.num_layers):
        for got, ref, init in ((caches[0].k[layer], caches[2].k[layer], initial.k[layer]),
                               (caches[0].v[layer], caches[2].v[layer], initial.v[layer])):
            flat = got.view(-1, arch.num_kv_heads * arch.head_dim)
            changed = (flat != init.view_as(flat)).any(-1).nonzero().flatten().tolist()
            assert changed == written, f"layer {layer}"
            rel = (got.double() - ref.double()).norm() / ref.double().norm()
            assert rel < tol, f"layer {layer}: {rel}"


def test_store_rotated_falls_back_without_fused_rope() -> None:
    """`store_rotated` does nothing and returns False when RoPE is not fused; `forward` then writes the cache."""
    arch = ModelArch.from_hf_config(hf_config("llama", vocab_size=64).to_dict())
    model = DecoderLM(arch, 64, device=DEVICE)
    cache = KVCache(KVCacheSpec.of(arch, 4, torch.float32), 4, DEVICE)
    backend = TritonAttentionBackend(cache, arch.num_heads, 4, 64)
    _, q, k, v = qkv_views(2, arch.num_heads, arch.num_kv_heads, arch.head_dim, torch.float32, 9)
    q0, k0 = q.clone(), k.clone()
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([4, 5], device=DEVICE), page_tables=torch.tensor([[1]], dtype=torch.int32,
                                                                                   device=DEVICE),
        seq_lens=torch.tensor([2], dtype=torch.int32, device=DEVICE),
        query_start_loc=torch.tensor([0, 2], dtype=torch.int32, device=DEVICE), decode_only=False,
        seq_lens_cpu=[2], query_start_loc_cpu=[0, 2],
    )
    pos = torch.tensor([0, 1], device=DEVICE)
    assert not model.rope.fused
    assert backend.store_rotated(0, q, k, v, pos, model.rope, meta) is False
    assert torch.equal(q, q0) and torch.equal(k, k0) and not cache.k[0].any()
    write_kv(cache, 0, k, v, meta.slot_mapping)  # what forward does by default
    assert torch.equal(cache.k[0].view(-1, arch.num_kv_heads, arch.head_dim)[4:6], k0)
