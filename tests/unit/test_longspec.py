"""LongSpec / GliDe proposer: greedy losslessness for every tree kind with a window smaller than the
prompts, a constant-size draft KV ring, draft logits against an independent dense computation (HF
target K/V, explicit windowed attention), checkpoint round trips (ours and the released key layout) and
shape errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from specray.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig, TreeConfig
from specray.engine.llm_engine import LLMEngine
from specray.engine.sampling_params import SamplingParams
from specray.errors import ConfigError
from specray.models.arch import ModelArch
from specray.spec.longspec import DEFAULT_WINDOW, GlideDraftLayer, LongSpecProposer, load_glide, save_glide
from specray.spec.types import DraftTree
from tests.support.tiny import make_checkpoint

WINDOW = 16
TREES = {
    "chain": TreeConfig(kind="chain", length=4),
    "beam": TreeConfig(kind="beam", shape=(4, 16, 16, 16, 16)),
    "dynamic": TreeConfig(kind="dynamic", depth=4, top_k=4, budget=16),
}
MAX_TOKENS = 128
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    root = tmp_path_factory.mktemp("longspec")
    return make_checkpoint(root / "target", "qwen2", vocab_size=128, max_position_embeddings=512, tokenizer=False)


@pytest.fixture(scope="module")
def arch(target) -> ModelArch:
    return ModelArch.from_hf_config(json.loads((target / "config.json").read_text()))


@pytest.fixture(scope="module")
def glide(arch, tmp_path_factory):
    """Random (untrained) draft weights with window 16, in our format."""
    return save_glide(GlideDraftLayer(arch, WINDOW).random_init(seed=0), tmp_path_factory.mktemp("glide"))


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in (150, 90, 121)]


def _engine(target, spec: SpeculativeConfig | None) -> LLMEngine:
    return LLMEngine(EngineConfig(
        model=str(target), device="cpu", dtype="float32", skip_tokenizer_init=True,
        cache=CacheConfig(page_size=8, num_pages=160),
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=400),
        speculative_config=spec,
    ))


@pytest.fixture(scope="module")
def reference(target, prompts):
    return [o.token_ids for o in _engine(target, None).generate(prompts, GREEDY)]


# ---- (a) greedy losslessness -------------------------------------------------------------------------


@pytest.mark.parametrize("tree", list(TREES))
def test_greedy_output_equals_ar(target, glide, prompts, reference, tree):
    engine = _engine(target, SpeculativeConfig(method="longspec", model=str(glide), tree=TREES[tree]))
    proposer = engine.spec.proposer
    assert isinstance(proposer, LongSpecProposer) and proposer.window == WINDOW  # from the checkpoint
    outs = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == reference
    assert engine.spec.stats.num_drafts > 0
    assert engine.pages_in_use() == 0
    assert proposer.states == {}  # released
    assert all(o.spec_metrics["num_spec_steps"] > 0 for o in outs)


@pytest.mark.parametrize("tree", ["chain", "beam"])
def test_sampled_requests_run(target, glide, prompts, reference, tree):
    """Sampled chains (min(1, p/q)) and point-mass beam candidates next to a greedy request: the greedy one
    stays exact, the sampled one is reproducible under its seed."""
    sampled = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=24, ignore_eos=True, seed=1)
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    runs = []
    for _ in range(2):
        engine = _engine(target, SpeculativeConfig(method="longspec", model=str(glide), tree=TREES[tree]))
        outs = engine.generate(prompts[:2], [greedy, sampled])
        assert outs[0].token_ids == reference[0][:24]
        assert len(outs[1].token_ids) == 24 and all(0 <= t < 128 for t in outs[1].token_ids)
        runs.append(outs[1].token_ids)
    assert runs[0] == runs[1]


# ---- (b) constant-size draft KV ----------------------------------------------------------------------


def _run_one(engine: LLMEngine, prompt: list[int], rid: str) -> int:
    """Generate 12 tokens; return the proposer's kv_bytes while the request is live (after spec steps)."""
    proposer = engine.spec.proposer
    engine.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    live = None
    while engine.has_unfinished_requests():
        engine.step()
        st = proposer.states.get(rid)
        if st is not None:
            a = engine.arch
            assert st.k.shape == st.v.shape == (WINDOW, a.num_kv_heads, a.head_dim)
            assert st.pos.shape == (WINDOW,)
            live = proposer.kv_bytes()
    assert live is not None
    return live


def test_ring_buffer_is_constant_size(target, glide):
    engine = _engine(target, SpeculativeConfig(method="longspec", model=str(glide), tree=TREES["beam"]))
    proposer = engine.spec.proposer
    scratch = proposer.kv_bytes()  # no live request: the step scratch only
    assert scratch == proposer.scratch_k.nbytes + proposer.scratch_v.nbytes > 0
    g = torch.Generator().manual_seed(3)
    short = _run_one(engine, torch.randint(3, 128, (20,), generator=g).tolist(), "short")
    peak_short = proposer.peak_kv_bytes
    long = _run_one(engine, torch.randint(3, 128, (300,), generator=g).tolist(), "long")
    assert short == long == scratch + proposer.ring_bytes()
    assert proposer.peak_kv_bytes == peak_short
    assert proposer.ring_bytes() == 2 * WINDOW * engine.arch.kv_size * 4  # fp32
    assert proposer.kv_bytes() == scratch  # released


def test_untrained_default_is_deterministic(target):
    spec = SpeculativeConfig(method="longspec", tree=TREES["chain"])  # model None: seeded random init
    a, b = (_engine(target, spec).spec.proposer for _ in range(2))
    assert a.window == DEFAULT_WINDOW
    for (name, pa), pb in zip(a.layer.state_dict().items(), b.layer.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert a.layer.self_attn.qkv_proj.weight.std() > 0


# ---- (c) draft logits vs an independent dense computation --------------------------------------------


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rot(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D]; cos/sin [T, D]."""
    half = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin[:, None]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [Hq, D], k/v [L, Hkv, D] -> [Hq * D], every key visible."""
    g = q.shape[0] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # [L, Hq, D]
    p = torch.softmax(torch.einsum("hd,lhd->hl", q, k) * scale, dim=-1)
    return torch.einsum("hl,lhd->hd", p, v).reshape(-1)


def _dense_logits(hf, layer: GlideDraftLayer, tokens: list[int], n_verified: int, window: int) -> torch.Tensor:
    """The draft's next-token logits after `tokens` (the last one the query, at position len-1), written
    out: HF embedding -> GliDe block (window keys recomputed from scratch, target last-layer K/V of the
    first `n_verified` tokens from HF's cache) -> HF lm_head, no final norm."""
    a = layer.arch
    D, Hq, Hkv = a.head_dim, a.num_heads, a.num_kv_heads
    eps = a.rms_norm_eps
    w = {k: v.double() for k, v in layer.state_dict().items()}
    ids = torch.tensor([tokens])
    with torch.no_grad():
        out = hf(ids[:, :n_verified], use_cache=True)
        tk = out.past_key_values.layers[-1].keys[0].transpose(0, 1).double()  # [P, Hkv, D]
        tv = out.past_key_values.layers[-1].values[0].transpose(0, 1).double()
        emb = hf.model.embed_tokens(ids)[0].double()  # [T, H]
        pos_ids = torch.arange(len(tokens))[None]
        cos, sin = (t[0].double() for t in hf.model.rotary_emb(emb[None].float(), pos_ids))  # [T, D]
    p = len(tokens) - 1
    keys = list(range(max(0, p - window), p + 1))
    h = _rms(emb, w["input_layernorm.weight"], eps)
    qkv = h @ w["self_attn.qkv_proj.weight"].T + w["self_attn.qkv_proj.bias"]  # [T, Hq*D + 2*Hkv*D]
    q = _rot(qkv[:, : Hq * D].view(-1, Hq, D), cos, sin)
    k = _rot(qkv[:, Hq * D : (Hq + Hkv) * D].reshape(-1, Hkv, D), cos, sin)
    v = qkv[:, (Hq + Hkv) * D :].reshape(-1, Hkv, D)
    x = emb[p] + _attend(q[p], k[keys], v[keys], D**-0.5) @ w["self_attn.o_proj.weight"].T
    h = _rms(x, w["post_self_attention_layernorm.weight"], eps)
    cq = (h @ w["cross_attn.q_proj.weight"].T + w["cross_attn.q_proj.bias"]).view(1, Hq, D)
    cq = _rot(cq, cos[p : p + 1], sin[p : p + 1])[0]
    x = x + _attend(cq, tk, tv, D**-0.5) @ w["cross_attn.o_proj.weight"].T
    h = _rms(x, w["post_cross_attention_layernorm.weight"], eps)
    gate, up = (h @ w["mlp.gate_up_proj.weight"].T).split(a.intermediate_size)
    x = x + (F.silu(gate) * up) @ w["mlp.down_proj.weight"].T
    return x.float() @ hf.lm_head.weight.T  # [V]


def test_draft_logits_match_dense_reference(target, arch, tmp_path):
    from transformers import AutoModelForCausalLM

    strong = save_glide(GlideDraftLayer(arch, WINDOW).random_init(seed=5, std=0.15), tmp_path / "strong")
    engine = _engine(target, SpeculativeConfig(method="longspec", model=str(strong), tree=TREES["chain"]))
    proposer = engine.spec.proposer
    g = torch.Generator().manual_seed(11)
    engine.add_request("r", torch.randint(3, 128, (40,), generator=g).tolist(),
                       SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    for _ in range(4):  # prefill + 3 speculative steps (the ring gets the prompt tail and the commits)
        engine.step()
    spec, engine.spec = engine.spec, None
    for _ in range(3):  # plain AR steps: the ring learns about these tokens lazily
        engine.step()
    engine.spec = spec
    seq = engine.seqs["r"]
    with torch.inference_mode():  # the rings are inference tensors (made under propose)
        (st,) = proposer._catch_up([seq])
    P = seq.num_tokens - 1
    assert seq.num_computed == P and st.covered == P
    assert sorted(st.pos.tolist()) == list(range(P - WINDOW, P))  # exactly the window before the root

    hf = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    ctx = seq.prompt_ids + seq.output_ids  # root = ctx[-1] at position P
    tree = DraftTree([ctx[-1], 5, 9, 17], [-1, 0, 0, 2], [0, 1, 1, 2])
    paths = {0: [], 1: [5], 2: [9], 3: [9, 17]}
    want = {n: _dense_logits(hf, proposer.layer, ctx + path, P, WINDOW) for n, path in paths.items()}
    with torch.inference_mode():
        drafter = proposer._drafter(seq, st)
        got = {0: drafter.logits(tree, [0])[0]}  # the builders' order: a level at a time
        got.update(zip([1, 2], drafter.logits(tree, [1, 2]), strict=True))
        got[3] = drafter.logits(tree, [3])[0]
        fresh = proposer._drafter(seq, st).logits(tree, [3])[0]  # ancestors' K/V computed on demand
    for n in paths:
        torch.testing.assert_close(got[n], want[n], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fresh, want[3], atol=1e-4, rtol=1e-4)


# ---- (d) checkpoints -----------------------------------------------------------------------------------


def test_save_load_roundtrip(arch, tmp_path):
    src = GlideDraftLayer(arch, window=24).random_init(seed=3)
    path = save_glide(src, tmp_path / "ours")
    dst = GlideDraftLayer(arch)
    meta = load_glide(dst, path.parent)  # a directory works as well as the file
    assert meta["format"] == "specray-glide" and meta["window"] == "24"
    for (name, a), b in zip(src.state_dict().items(), dst.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_load_released_longspec_layout(arch, tmp_path):
    """A checkpoint in the released `Qwen2GlideDecoderLayer` key layout maps onto our parameters."""
    from safetensors.torch import save_file

    src = GlideDraftLayer(arch).random_init(seed=4)
    sd = src.state_dict()
    q, k, v = sd["self_attn.qkv_proj.weight"].split([arch.q_size, arch.kv_size, arch.kv_size])
    qb, kb, vb = sd["self_attn.qkv_proj.bias"].split([arch.q_size, arch.kv_size, arch.kv_size])
    gate, up = sd["mlp.gate_up_proj.weight"].split(arch.intermediate_size)
    released = {
        "input_layernorm.weight": sd["input_layernorm.weight"],
        "self_attn.q_proj.weight": q, "self_attn.k_proj.weight": k, "self_attn.v_proj.weight": v,
        "self_attn.q_proj.bias": qb, "self_attn.k_proj.bias": kb, "self_attn.v_proj.bias": vb,
        "self_attn.o_proj.weight": sd["self_attn.o_proj.weight"],
        "post_self_attention_layernorm.weight": sd["post_self_attention_layernorm.weight"],
        "cross_attn.q_proj.weight": sd["cross_attn.q_proj.weight"],
        "cross_attn.q_proj.bias": sd["cross_attn.q_proj.bias"],
        "cross_attn.k_proj.weight": torch.randn_like(k), "cross_attn.k_proj.bias": torch.randn_like(kb),
        "cross_attn.v_proj.weight": torch.randn_like(v), "cross_attn.v_proj.bias": torch.randn_like(vb),
        "cross_attn.o_proj.weight": sd["cross_attn.o_proj.weight"],
        "post_cross_attention_layernorm.weight": sd["post_cross_attention_layernorm.weight"],
        "mlp.gate_proj.weight": gate, "mlp.up_proj.weight": up, "mlp.down_proj.weight": sd["mlp.down_proj.weight"],
    }
    (tmp_path / "released").mkdir()
    whole = {f"draft_model.{n}": t.contiguous() for n, t in released.items()}
    whole["model.norm.weight"] = torch.ones(arch.hidden_size)  # a whole-wrapper dump: target tensors dropped
    save_file(whole, tmp_path / "released" / "model.safetensors")
    dst = GlideDraftLayer(arch)
    assert load_glide(dst, tmp_path / "released")["format"] == "longspec"
    for (name, a), b in zip(sd.items(), dst.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


# ---- (e) shape mismatch --------------------------------------------------------------------------------


def test_shape_mismatch_raises_config_error(target, arch, tmp_path):
    other = dataclasses.replace(arch, hidden_size=32, intermediate_size=48)
    bad = save_glide(GlideDraftLayer(other).random_init(), tmp_path / "bad")
    msg = r"speculative_config\.model: tensor .input_layernorm\.weight.* \(32,\).*needs \(64,\)"
    with pytest.raises(ConfigError, match=msg):
        load_glide(GlideDraftLayer(arch), bad)
    with pytest.raises(ConfigError, match=r"speculative_config\.model"):
        _engine(target, SpeculativeConfig(method="longspec", model=str(bad)))
