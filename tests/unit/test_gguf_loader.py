"""GGUF loader: tiny llama/qwen2/qwen3 files written here with `gguf.GGUFWriter`, checked tensor by
tensor against transformers' own GGUF conversion (`load_gguf_checkpoint`, what
`from_pretrained(gguf_file=...)` runs for these archs); plus the real SmolLM2 file from the registry.

The oracle calls `load_gguf_checkpoint` directly rather than `AutoModelForCausalLM.from_pretrained`
because the latter requires `accelerate` for GGUF files, which is not a project dependency.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from specray.errors import CheckpointError, UnsupportedModelError
from specray.models.arch import ModelArch
from specray.models.gguf_loader import (
    SUPPORTED_QUANT_TYPES,
    _fit_llama3,
    _llama3_divisors,
    load_gguf,
)

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 64, 256, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# f16 scale fields inside each raw block (byte ranges) of the types gguf-py cannot quantize
_SCALE_BYTES = {Q.Q4_K: (0, 4), Q.Q5_K: (0, 4), Q.Q6_K: (208, 210), Q.Q2_K: (80, 84), Q.IQ2_XXS: (0, 2)}

# per tiny file: GGUF tensor name -> storage type (names absent here are F32)
SPECS: dict[str, dict[str, Q]] = {
    "llama": {
        "token_embd": Q.Q8_0, "output": Q.F16,
        "blk.0.attn_q": Q.Q4_0, "blk.0.attn_k": Q.F32, "blk.0.attn_v": Q.Q5_0, "blk.0.attn_output": Q.Q5_1,
        "blk.0.ffn_gate": Q.Q8_0, "blk.0.ffn_up": Q.BF16, "blk.0.ffn_down": Q.Q4_K,
        "blk.1.attn_q": Q.F16, "blk.1.attn_k": Q.Q4_1, "blk.1.attn_v": Q.F32, "blk.1.attn_output": Q.Q4_0,
        "blk.1.ffn_gate": Q.Q5_1, "blk.1.ffn_up": Q.Q4_1, "blk.1.ffn_down": Q.Q6_K,
    },
    "qwen2": {  # tied embeddings, q/k/v biases
        "token_embd": Q.Q4_1,
        "blk.0.attn_q": Q.Q8_0, "blk.0.attn_k": Q.Q4_0, "blk.0.attn_v": Q.Q5_1, "blk.0.attn_output": Q.BF16,
        "blk.0.ffn_gate": Q.Q5_0, "blk.0.ffn_up": Q.F16, "blk.0.ffn_down": Q.Q5_K,
        "blk.1.attn_q": Q.F32, "blk.1.attn_k": Q.F16, "blk.1.attn_v": Q.Q8_0, "blk.1.attn_output": Q.Q4_1,
        "blk.1.ffn_gate": Q.Q4_0, "blk.1.ffn_up": Q.Q8_0, "blk.1.ffn_down": Q.Q6_K,
    },
    "qwen3": {  # q/k norms
        "token_embd": Q.F16, "output": Q.Q8_0,
        "blk.0.attn_q": Q.Q5_0, "blk.0.attn_k": Q.Q8_0, "blk.0.ffn_down": Q.Q4_K,
        "blk.1.attn_q": Q.Q4_1, "blk.1.ffn_down": Q.Q5_K,
    },
}


def _byte_alphabet() -> list[str]:
    """GPT-2 byte-level alphabet: the printable stand-in character of each byte 0..255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def tiny_vocab() -> list[str]:
    return SPECIALS + _byte_alphabet() + ["".join(m.split()) for m in MERGES]


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to Q/K rows (rotate-half -> interleaved pairs). w: [rows, in]."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(w: np.ndarray, qtype: Q, rng: np.random.Generator) -> tuple[np.ndarray, Q | None]:
    """Storage bytes for `w` ([out, in] float32); K/IQ types get random blocks with small f16 scales."""
    if qtype == Q.F32:
        return w.astype(np.float32), None
    if qtype in _SCALE_BYTES:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (w.shape[0], w.shape[1] // block, size), dtype=np.uint8)
        lo, hi = _SCALE_BYTES[qtype]
        scales = rng.uniform(0.001, 0.01, (*raw.shape[:2], (hi - lo) // 2)).astype(np.float16)
        raw[:, :, lo:hi] = scales.view(np.uint8)
        return raw.reshape(w.shape[0], -1), qtype
    return gguf.quants.quantize(w, qtype), qtype


def write_tiny_gguf(
    path: Path,
    arch: str,
    types: dict[str, Q],
    *,
    meta: dict[str, Any] | None = None,
    rope_freqs: np.ndarray | None = None,
    theta: float = 10000.0,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Write a 2-layer model; return the HF-layout float32 weights (by GGUF name) it was made from."""
    rng = np.random.default_rng(seed)
    vocab = tiny_vocab()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(512)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(theta)
    if arch == "llama":
        w.add_rope_dimension_count(HEAD_DIM)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(vocab) - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    for key, value in (meta or {}).items():
        {str: w.add_string, float: w.add_float32, int: w.add_uint32}[type(value)](key, value)

    shapes: dict[str, tuple[int, ...]] = {"token_embd": (len(vocab), HIDDEN), "output_norm": (HIDDEN,)}
    if "output" in types:
        shapes["output"] = (len(vocab), HIDDEN)
    for i in range(LAYERS):
        b = f"blk.{i}"
        shapes |= {
            f"{b}.attn_norm": (HIDDEN,), f"{b}.ffn_norm": (HIDDEN,),
            f"{b}.attn_q": (HEADS * HEAD_DIM, HIDDEN), f"{b}.attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
            f"{b}.attn_v": (KV_HEADS * HEAD_DIM, HIDDEN), f"{b}.attn_output": (HIDDEN, HEADS * HEAD_DIM),
            f"{b}.ffn_gate": (INTER, HIDDEN), f"{b}.ffn_up": (INTER, HIDDEN), f"{b}.ffn_down": (HIDDEN, INTER),
        }
        if arch == "qwen2":
            shapes |= {f"{b}.attn_q.bias": (HEADS * HEAD_DIM,), f"{b}.attn_k.bias": (KV_HEADS * HEAD_DIM,),
                       f"{b}.attn_v.bias": (KV_HEADS * HEAD_DIM,)}
        if arch == "qwen3":
            shapes |= {f"{b}.attn_q_norm": (HEAD_DIM,), f"{b}.attn_k_norm": (HEAD_DIM,)}

    originals: dict[str, np.ndarray] = {}
    for base, shape in shapes.items():
        name = base if base.endswith(".bias") else f"{base}.weight"
        hf = rng.normal(0.0, 0.5, shape).astype(np.float32)  # HF layout
        if "norm" in base:
            hf = 1.0 + 0.1 * hf
        originals[name] = hf
        stored = hf
        if arch == "llama" and base.rsplit(".", 1)[-1] in ("attn_q", "attn_k"):
            stored = _llamacpp_permute(hf, HEADS if base.endswith("attn_q") else KV_HEADS)
        data, raw_dtype = _encode(stored, types.get(base, Q.F32), rng)
        w.add_tensor(name, data, raw_dtype=raw_dtype)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return originals


def transformers_tensors(path: Path, cfg: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """transformers' GGUF conversion of `path`: (HF-named tensors, its parsed config)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    hf_cfg = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})
    with torch.device("meta"):  # only its parameter names are used, to map GGUF names
        model = AutoModelForCausalLM.from_config(hf_cfg)
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)
    return parsed["tensors"], parsed["config"]


def assert_matches_transformers(path: Path, *, load_tokenizer: bool = False) -> Any:
    ck = load_gguf(path, load_tokenizer=load_tokenizer)
    ref, ref_cfg = transformers_tensors(path, ck.hf_config)
    names = set(ck.weights.names())
    assert names == set(ref), names ^ set(ref)
    for name in sorted(names):
        ours, theirs = ck.weights.get(name), ref[name]
        assert ours.dtype == torch.float32 and ours.shape == theirs.shape, name
        diff = (ours - theirs.float()).abs().max().item()
        assert diff <= 1e-6, f"{name} ({ck.weights.quant_type(name)}): max abs diff {diff}"
    cfg = ck.hf_config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "vocab_size", "tie_word_embeddings"):
        assert cfg[key] == ref_cfg[key], key
    assert cfg["rms_norm_eps"] == pytest.approx(ref_cfg["rms_norm_eps"], rel=1e-6)
    assert cfg["rope_parameters"]["rope_theta"] == pytest.approx(ref_cfg["rope_theta"], rel=1e-6)
    if "head_dim" in ref_cfg:
        assert cfg["head_dim"] == ref_cfg["head_dim"]
    return ck


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, np.ndarray]]]:
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for arch, types in SPECS.items():
        path = root / f"tiny-{arch}.gguf"
        out[arch] = (path, write_tiny_gguf(path, arch, types))
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_matches_transformers(tiny, arch):
    path, originals = tiny[arch]
    ck = assert_matches_transformers(path)
    assert ck.format == "gguf"
    a = ModelArch.from_hf_config(ck.hf_config)
    assert (a.family, a.num_layers, a.num_heads, a.num_kv_heads, a.head_dim) == (arch, 2, 4, 2, 16)
    assert a.tie_word_embeddings == (arch == "qwen2")
    assert a.attention_bias == (arch == "qwen2") and a.qk_norm == (arch == "qwen3")
    # independent of transformers: F32 tensors come back exactly in HF (rotate-half) layout
    for name, hf in originals.items():
        stored = SPECS[arch].get(name.rsplit(".", 1)[0], Q.F32) if name.endswith(".weight") else Q.F32
        hf_name = next(n for n in ck.weights.names() if ck.weights.gguf_name(n) == name)
        got = ck.weights.get(hf_name).numpy()
        if stored == Q.F32:
            np.testing.assert_array_equal(got, hf, err_msg=name)
        elif stored in (Q.F16, Q.BF16, Q.Q8_0):
            np.testing.assert_allclose(got, hf, atol=0.05, err_msg=name)  # quantized, but same row order


def test_all_supported_quant_types_are_exercised():
    used = {t for types in SPECS.values() for t in types.values()} | {Q.F32}
    assert used == set(SUPPORTED_QUANT_TYPES)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tokenizer_chat_template_and_generation_defaults(tiny, arch):
    ck = load_gguf(tiny[arch][0])
    tok = ck.tokenizer
    assert ck.generation.eos_token_ids == (2,) and ck.generation.bos_token_id == 1
    assert (ck.hf_config["eos_token_id"], ck.hf_config["bos_token_id"]) == (2, 1)
    assert tok.eos_token_id == 2 and tok.bos_token_id == 1  # transformers' llama converter gets eos wrong
    vocab = tiny_vocab()
    ids = tok.encode("hello world", add_special_tokens=False)
    assert ids == [vocab.index("hello"), vocab.index("Ġworld")]
    assert tok.decode(ids) == "hello world"
    assert tok.has_chat_template
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_truncated_file(tiny, tmp_path):
    src = tiny["llama"][0].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(src[:-100])
    with pytest.raises(CheckpointError) as e:
        load_gguf(cut)
    msg = str(e.value)
    assert "truncated" in msg and str(len(src) - 100) in msg and str(cut) in msg
    need = int(msg.split("needs ")[1].split()[0])
    assert len(src) - 100 < need <= len(src)

    for size in (0, 10, 2000):  # inside the header / the vocabulary metadata
        cut.write_bytes(src[:size])
        with pytest.raises(CheckpointError, match="cut.gguf"):
            load_gguf(cut)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_gguf(tmp_path / "missing.gguf")


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_embedding_length(HIDDEN)
    w.add_tensor("token_embd.weight", np.zeros((8, HIDDEN), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match=r"'gpt2'.*llama, qwen2, qwen3"):
        load_gguf(path)


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.IQ2_XXS], ids=lambda q: q.name)
def test_unsupported_quant_type(tmp_path, qtype):
    path = tmp_path / "q.gguf"
    write_tiny_gguf(path, "llama", {**SPECS["llama"], "blk.1.ffn_down": qtype})
    with pytest.raises(UnsupportedModelError, match=rf"blk\.1\.ffn_down\.weight.*{qtype.name}"):
        load_gguf(path, load_tokenizer=False)


def test_rope_scaling_metadata(tmp_path):
    path = tmp_path / "r.gguf"
    write_tiny_gguf(path, "llama", {}, meta={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})
    rope = load_gguf(path, load_tokenizer=False).hf_config["rope_parameters"]
    assert rope == {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}

    path.unlink()
    write_tiny_gguf(path, "llama", {}, meta={"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0})
    with pytest.raises(UnsupportedModelError, match="yarn"):
        load_gguf(path, load_tokenizer=False)


def test_llama3_rope_freqs_tensor(tmp_path):
    # Llama 3.1 parameters; with head_dim 128 the low/high factors are recoverable
    p = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    fit = _fit_llama3(Path("x"), 500000.0, 128, _llama3_divisors(500000.0, 128, p), 8192)
    assert fit["factor"] == pytest.approx(8.0) and fit["original_max_position_embeddings"] == 8192
    assert fit["low_freq_factor"] == pytest.approx(1.0, rel=1e-6)
    assert fit["high_freq_factor"] == pytest.approx(4.0, rel=1e-6)

    # a tiny file (head_dim 16: one medium frequency): the fit reproduces the stored factors
    divisors = _llama3_divisors(500000.0, HEAD_DIM, p).astype(np.float32)  # [head_dim/2]
    path = tmp_path / "l3.gguf"
    write_tiny_gguf(path, "llama", {}, theta=500000.0, rope_freqs=divisors)
    ck = load_gguf(path, load_tokenizer=False)
    rope = ck.hf_config["rope_parameters"]
    assert rope["rope_type"] == "llama3" and rope["factor"] == pytest.approx(8.0)
    np.testing.assert_allclose(_llama3_divisors(500000.0, HEAD_DIM, rope), divisors, rtol=1e-5)
    assert "rope_freqs.weight" not in {ck.weights.gguf_name(n) for n in ck.weights.names()}
    assert ModelArch.from_hf_config(ck.hf_config).rope.rope_type == "llama3"


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from specray.models.registry import pull

    return pull("smollm2-135m")  # cached after the first run (`make test` pulls it first)


@pytest.mark.slow
def test_real_smollm2_matches_transformers(smollm2):
    ck = assert_matches_transformers(smollm2, load_tokenizer=True)  # every tensor, ~40 s in all
    assert ck.hf_config["architectures"] == ["LlamaForCausalLM"]
    assert ck.hf_config["rms_norm_eps"] == 1e-5 and ck.hf_config["tie_word_embeddings"] is True
    assert ck.generation.eos_token_ids == (2,) and ck.generation.bos_token_id == 1
    tok = ck.tokenizer
    assert tok.vocab_size == 49152 and tok.eos_token_id == 2
    assert tok.convert_ids_to_tokens([2]) == ["<|im_end|>"]
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    a = ModelArch.from_hf_config(ck.hf_config)
    assert (a.hidden_size, a.num_layers, a.num_heads, a.num_kv_heads, a.head_dim) == (576, 30, 9, 3, 64)
