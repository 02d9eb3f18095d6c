"""Tensor-parallel shards without Ray: weight slices reassemble to the checkpoint's tensors (safetensors
`get_slice` and whole-tensor sources such as GGUF), and a TP=2 forward in a gloo world of two processes
gives the single-rank logits (prefill and a paged decode step) for llama and qwen2 checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from specray.errors import ConfigError
from specray.models.arch import ModelArch
from specray.models.checkpoint import DictWeightSource
from specray.models.tensor_parallel import ShardedWeightSource, check_tp, local_arch
from tests.support.tiny import make_checkpoint

VOCAB = 131  # odd: the last rank's vocabulary slice is padded


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def ckpt(request, tmp_path_factory):
    from specray.models.loader import load_checkpoint

    path = make_checkpoint(tmp_path_factory.mktemp(request.param), request.param, vocab_size=VOCAB, tokenizer=False)
    return load_checkpoint(str(path), load_tokenizer=False)


def _reassemble(shards: list[ShardedWeightSource], name: str, dim: int) -> torch.Tensor:
    return torch.cat([s.get(name) for s in shards], dim=dim)


@pytest.mark.parametrize("lazy", [True, False])
def test_slices_reassemble(ckpt, lazy):
    arch = ModelArch.from_hf_config(ckpt.hf_config)
    full = ckpt.weights
    source = full if lazy else DictWeightSource({n: full.get(n) for n in full.names()})  # no get_slice
    shards = [ShardedWeightSource(source, arch, r, 2) for r in range(2)]
    la = local_arch(arch, 2)
    for name in full.names():
        whole = full.get(name)
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            assert shards[0].get(name).shape[1] == whole.shape[1] // 2
            torch.testing.assert_close(_reassemble(shards, name, 1), whole, rtol=0, atol=0)
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert shards[0].get(name).shape[0] == la.vocab_size == 66
            glued = _reassemble(shards, name, 0)
            torch.testing.assert_close(glued[:VOCAB], whole, rtol=0, atol=0)
            assert glued[VOCAB:].abs().sum() == 0  # padding rows
        elif any(k in name for k in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            assert shards[1].get(name).shape[0] == whole.shape[0] // 2
            torch.testing.assert_close(_reassemble(shards, name, 0), whole, rtol=0, atol=0)
        else:  # norms: replicated
            torch.testing.assert_close(shards[1].get(name), whole, rtol=0, atol=0)


def test_kv_heads_must_divide():
    arch = ModelArch.from_hf_config({"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 64,
                                     "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
                                     "num_key_value_heads": 2, "max_position_embeddings": 64})
    check_tp(arch, 2)
    with pytest.raises(ConfigError, match="tensor_parallel_size 4 must divide the model's num_key_value_heads"):
        check_tp(arch, 4)


def _forward(model, arch, tokens: list[int]) -> torch.Tensor:
    """Prefill all but the last token, then one paged decode step; logits of both steps [T, V]."""
    from specray.engine.attention import TorchAttentionBackend
    from specray.engine.kv_cache import KVCache, KVCacheSpec
    from specray.engine.model_runner import ModelRunner
    from specray.engine.sampler import Sampler

    cache = KVCache(KVCacheSpec.of(arch, 4, torch.float32), 16, torch.device("cpu"))
    runner = ModelRunner(model, cache, TorchAttentionBackend(cache), Sampler(torch.Generator()), 64)
    pages = list(range(1, 1 + -(-len(tokens) // 4)))
    n = len(tokens) - 1
    pre = runner.forward_tokens([pages], [tokens[:n]], [list(range(n))], [list(range(n))], [n])
    dec = runner.forward_tokens([pages], [tokens[n:]], [[n]], [[n]], [n + 1])
    return torch.cat([pre, dec])


def _tp_worker(rank: int, path: str, rendezvous: str, tokens: list[int], out: str) -> None:
    import torch.distributed as dist

    from specray.models.loader import load_checkpoint
    from specray.models.tensor_parallel import TPContext, TPDecoderLM

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, world_size=2, rank=rank)
    ck = load_checkpoint(path, load_tokenizer=False)
    arch = ModelArch.from_hf_config(ck.hf_config)
    model = TPDecoderLM.empty_shard(arch, TPContext(rank, 2, None), 64, torch.float32, torch.device("cpu"))
    model.load_shard(ck.weights)
    with torch.inference_mode():
        logits = _forward(model, model.arch, tokens)
    if rank == 0:
        torch.save(logits, out)
    # both ranks leave together: a rank that tears gloo down while its peer is still connected can make the
    # peer's gloo thread abort (seen once in CI as SIGABRT, "terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()
    # skip interpreter teardown: gloo's C++ threads can still abort there ("terminate called without an
    # active exception", SIGABRT in CI after the result was written); the work is done and saved
    import os

    os._exit(0)


def test_tp_forward_matches_single_rank(ckpt, tmp_path):
    from specray.models.decoder import DecoderLM

    arch = ModelArch.from_hf_config(ckpt.hf_config)
    tokens = torch.randint(3, VOCAB, (13,), generator=torch.Generator().manual_seed(0)).tolist()
    model = DecoderLM.empty(arch, 64, torch.float32, torch.device("cpu"))
    model.load_weights(ckpt.weights)
    with torch.inference_mode():
        ref = _forward(model, arch, tokens)
    out = tmp_path / "tp.pt"
    mp.spawn(_tp_worker, args=(ckpt.path, f"file://{tmp_path}/rendezvous", tokens, str(out)), nprocs=2, join=True)
    got = torch.load(out)
    assert got.shape == ref.shape == (len(tokens), VOCAB)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("data,match", [
    ({"tensor_parallel_size": 0}, "tensor_parallel_size must be an integer >= 1"),
    ({"overlap": True}, "overlap: true needs speculative_config.method 'draft_model' with draft_placement 'separate'"),
    ({"overlap": True, "speculative_config": {"method": "ngram", "draft_placement": "separate"}}, "overlap"),
])
def test_distributed_config_errors_name_the_field(data, match):
    from specray.config import load_engine_config

    with pytest.raises(ConfigError, match=match):
        load_engine_config(data)


@pytest.mark.parametrize("spec,tp,match", [
    ({"method": "ngram", "draft_placement": "separate"}, 1, "draft_placement 'separate' runs a 'draft_model'"),
    ({"method": "draft_model", "model": "x", "draft_tensor_parallel_size": 2}, 1, "draft_tensor_parallel_size"),
    ({"method": "sparse_self"}, 2, "method 'sparse_self' selects pages over all KV heads"),
])
def test_distributed_engine_rejects_unsupported_speculation(spec, tp, match):
    from specray.actors.shard import check_distributed_config
    from specray.config import load_engine_config

    with pytest.raises(ConfigError, match=match):
        check_distributed_config(load_engine_config({"speculative_config": spec, "tensor_parallel_size": tp}))


def test_all_reduce_says_why_it_falls_back_to_torch_distributed():
    """Symmetric memory is CUDA-only: on a CPU shard (or with fp16 weights) `TPAllReduce` keeps
    torch.distributed and names the reason, which the leader's stats report."""
    from specray.models.tp_comm import TPAllReduce

    red = TPAllReduce(None, dtype=torch.float32, device=torch.device("cpu"), symmetric_memory=True)
    assert not red.uses_symmetric_memory and red.fallback_reason == "not a CUDA device"
    red = TPAllReduce(None, dtype=torch.float16, device=torch.device("cuda", 0), symmetric_memory=True)
    assert not red.uses_symmetric_memory and "float16" in red.fallback_reason
    assert TPAllReduce(None).fallback_reason == "symmetric memory not requested"


@pytest.mark.parametrize("prefetch_mb", [0, 24])
def test_fused_all_reduce_wiring(ckpt, prefetch_mb):
    """With a reducer that has the fused path, O and down leave their partials in alternating regions and,
    with a prefetch size, point at the weight of the projection after the next norm (same storage, not a
    new parameter). Without fused norms nothing is wired."""
    from specray.models.tensor_parallel import TPContext, TPDecoderLM
    from specray.models.tp_comm import TPAllReduce

    arch = ModelArch.from_hf_config(ckpt.hf_config)
    red = TPAllReduce(None)
    red.regions = torch.zeros(2, 64)  # stands in for the symmetric regions set up on CUDA
    model = TPDecoderLM.empty_shard(arch, TPContext(0, 1, None, red), 64, torch.float32, torch.device("cpu"))
    params = {n for n, _ in model.named_parameters()}
    assert not model.fuse_all_reduce_norm(prefetch_mb)  # norms not fused yet
    assert all(layer.self_attn.o_proj.site is None for layer in model.layers)
    model.use_fused_ops(True)
    assert model.fuse_all_reduce_norm(prefetch_mb)
    assert {n for n, _ in model.named_parameters()} == params
    assert red.prefetch_bytes == prefetch_mb << 20
    layers = model.layers
    for i, layer in enumerate(layers):
        o, down = layer.self_attn.o_proj, layer.mlp.down_proj
        assert (o.site, down.site) == (0, 1)
        if prefetch_mb == 0:
            assert o.prefetch_next is None and down.prefetch_next is None
            continue
        assert o.prefetch_next.data_ptr() == layer.mlp.gate_up_proj.weight.data_ptr()
        nxt = layers[i + 1].self_attn.qkv_proj.weight.data_ptr() if i + 1 < len(layers) else None
        assert (down.prefetch_next.data_ptr() if down.prefetch_next is not None else None) == nxt


def test_fused_all_reduce_setup_agrees_per_step_and_says_why(monkeypatch):
    """`_setup_fused` with symmetric memory simulated on CPU (one rank): success builds one address table per
    region and one for the flags (zeroed); a failing rendezvous leaves the fused path off and names the error."""
    import torch.distributed as dist
    import torch.distributed._symmetric_memory as symm_mem

    from specray.models.tp_comm import TPAllReduce

    class Handle:
        rank = 0

        def __init__(self, t):
            self.t = t

        def get_buffer(self, rank, sizes, dtype):
            return self.t.view(dtype)[: sizes[0]]

    monkeypatch.setattr(symm_mem, "empty", lambda n, dtype, device: torch.full((n,), 7, dtype=dtype))
    monkeypatch.setattr(symm_mem, "rendezvous", lambda t, name: Handle(t))
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a: "side stream")
    for push in (True, False):  # one rank: one slot per region either way
        red = TPAllReduce(None, max_bytes=1 << 12, push=push)
        assert red._setup_fused(torch.bfloat16, torch.device("cpu"), None) == "" and red.fuses_norm
        assert red.regions.shape == (2, 1, 1 << 11)
        slots = [red.regions[0, 0].data_ptr(), red.regions[1, 0].data_ptr()]
        assert [int(t[0]) for t in red.part_tables] == slots
        assert [int(t[0]) for t in red.push_tables] == (slots if push else [])
        assert red.partial_region(1, 2, 1024).data_ptr() == slots[1]
        assert bool((red.regions.view(torch.int16) == -(1 << 15)).all())  # every slot empty: -0.0
        flags = red._keep[1]
        assert int(red.flag_table[0]) == flags.data_ptr() and int(flags.abs().sum()) == 0
        assert red.can_fuse(2, 1024, torch.bfloat16) and not red.can_fuse(0, 1024, torch.bfloat16)
        assert not red.can_fuse(3, 1024, torch.bfloat16) and not red.can_fuse(1, 1024, torch.float32)

    def refuse(t, name):
        raise RuntimeError("no peer answered")

    monkeypatch.setattr(symm_mem, "rendezvous", refuse)
    red = TPAllReduce(None, max_bytes=1 << 12)
    assert red._setup_fused(torch.bfloat16, torch.device("cpu"), None) == "RuntimeError: no peer answered"
    assert not red.fuses_norm and red.part_tables == [] and red.flag_table is None


def test_fused_all_reduce_tables_for_two_ranks(monkeypatch):
    """Rank 1 of 2 (symmetric memory simulated): push reads its own slots 0 and 1 and writes slot 1 of both ranks'
    regions; pull reads slot 0 of both ranks' regions. Oracle: addresses computed here from the layout
    [2 regions, S slots, elems]."""
    import torch.distributed as dist
    import torch.distributed._symmetric_memory as symm_mem

    from specray.models.tp_comm import TPAllReduce

    peers: dict[int, torch.Tensor] = {}

    class Handle:
        rank = 1

        def __init__(self, t):
            self.t = t

        def get_buffer(self, rank, sizes, dtype):
            if rank == 1:
                return self.t.view(dtype)[: sizes[0]]
            return peers.setdefault(sizes[0], torch.empty(sizes[0], dtype=dtype))

    monkeypatch.setattr(symm_mem, "empty", lambda n, dtype, device: torch.zeros(n, dtype=dtype))
    monkeypatch.setattr(symm_mem, "rendezvous", lambda t, name: Handle(t))
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a: "side stream")
    elems, item = 1 << 11, 2
    for push in (True, False):
        peers.clear()
        red = TPAllReduce(None, max_bytes=elems * item, push=push)
        assert red._setup_fused(torch.bfloat16, torch.device("cpu"), None) == ""
        slots = 2 if push else 1
        assert red.regions.shape == (2, slots, elems) and red.rank == 1
        base = [peers[2 * slots * elems].data_ptr(), red.regions.data_ptr()]  # rank 0's, rank 1's region

        def addr(rank, site, slot, base=base, slots=slots):
            return base[rank] + (site * slots + slot) * elems * item

        for site in (0, 1):
            if push:
                assert red.part_tables[site].tolist() == [addr(1, site, 0), addr(1, site, 1)]
                assert red.push_tables[site].tolist() == [addr(0, site, 1), addr(1, site, 1)]
                assert red.partial_region(site, 1, 8).data_ptr() == addr(1, site, 1)
            else:
                assert red.part_tables[site].tolist() == [addr(0, site, 0), addr(1, site, 0)]
                assert red.partial_region(site, 1, 8).data_ptr() == addr(1, site, 0)
        assert red.push_tables == [] or push
