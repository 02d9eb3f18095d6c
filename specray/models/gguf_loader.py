"""Load a llama.cpp GGUF file as a `Checkpoint`: a synthesised HF config, lazily dequantized weights.

Owns the translation from GGUF to HF `transformers` conventions: metadata keys -> config fields,
GGUF tensor names -> HF parameter names, quantized blocks -> float32 tensors in HF shape ([out, in]),
and llama.cpp's interleaved Q/K row order (llama arch only) -> HF rotate-half order. The file stays
memory-mapped; `GGUFWeightSource.get` dequantizes one tensor per call.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from specray.errors import CheckpointError, SpecrayError, UnsupportedModelError
from specray.models.checkpoint import Checkpoint, GenerationDefaults

Q = GGMLQuantizationType
SUPPORTED_QUANT_TYPES: tuple[Q, ...] = (
    Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K,
)
# GGUF `general.architecture` -> HF `architectures[0]`
SUPPORTED_ARCHS: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_PERMUTED_QK_ARCHS = ("llama",)  # llama.cpp's converter interleaves Q/K rows for these

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_IGNORED_TENSORS = ("rope_freqs.weight",)  # llama3 rope factors: folded into the config instead
_SAMPLING_KEYS = {
    "temp": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
    "penalty_repeat": "repetition_penalty",
}


class _Reader(GGUFReader):
    """`GGUFReader` that checks the tensor table against the file size before slicing the data.

    It also reads through a plain ndarray view of the memmap: `np.memmap.__getitem__` dominates the
    metadata parse of a 50k-token vocabulary (about 3x slower than this).
    """

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self.__dict__["_plain"] = self.data.view(np.ndarray)
        count = int(count)
        arr = plain[offset : offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
        need, last = start_offs, "(none)"
        for field in fields:
            _, name_data, _, dims, raw_dtype, offset = field.parts
            name = bytes(name_data).decode("utf-8", "replace")
            try:
                qtype = Q(int(raw_dtype[0]))
            except ValueError:
                raise UnsupportedModelError(
                    f"tensor {name!r} has unknown GGML type id {int(raw_dtype[0])}"
                ) from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            end = start_offs + int(offset[0]) + int(np.prod(dims, dtype=np.int64)) * type_size // block
            if end > need:
                need, last = end, name
        if need > self.data.size:
            raise CheckpointError(
                f"GGUF file is truncated: its tensor table needs {need} bytes (up to the end of tensor "
                f"{last!r}) but the file has {self.data.size} bytes"
            )
        super()._build_tensors(start_offs, fields)


class GGUFWeightSource:
    """HF-named float32 tensors, dequantized from the memory-mapped GGUF on each `get`."""

    def __init__(self, reader: GGUFReader, hf_to_gguf: dict[str, str], qk_heads: dict[str, int]):
        self._tensors = {t.name: t for t in reader.tensors}
        self._reader = reader  # keeps the memmap alive
        self._hf_to_gguf = hf_to_gguf
        self._qk_heads = qk_heads  # gguf name -> head count whose rows llama.cpp interleaved

    def names(self) -> Iterable[str]:
        return self._hf_to_gguf.keys()

    def gguf_name(self, name: str) -> str:
        return self._hf_to_gguf[name]

    def quant_type(self, name: str) -> str:
        return self._tensors[self._hf_to_gguf[name]].tensor_type.name

    def get(self, name: str) -> torch.Tensor:
        t = self._tensors[self._hf_to_gguf[name]]
        arr = dequantize(t.data, t.tensor_type)  # [out, in] (ggml dims reversed) or [n]
        if arr.dtype != np.float32 or not arr.flags.writeable or not arr.flags.c_contiguous:
            arr = np.array(arr, dtype=np.float32, order="C")
        w = torch.from_numpy(arr)
        n_head = self._qk_heads.get(t.name)
        return _unpermute_rows(w, n_head) if n_head else w


def _unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K permute: rows (head, i, pair) -> (head, pair, i). w: [n_head*head_dim, ...]."""
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def _open(path: Path) -> GGUFReader:
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist")
    size = path.stat().st_size
    try:
        return _Reader(path)
    except SpecrayError as e:
        raise type(e)(f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt or truncated header
        raise CheckpointError(
            f"{path} ({size} bytes) is not a readable GGUF file (truncated or corrupt header?): "
            f"{type(e).__name__}: {e}"
        ) from e


def _meta(reader: GGUFReader) -> dict[str, Any]:
    """Scalar and short-array metadata values (the vocabulary arrays are left to the tokenizer)."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and len(field.data) > 64:
            continue
        out[key] = field.contents()
    return out


def load_gguf(path: str | Path, *, load_tokenizer: bool = True) -> Checkpoint:
    """Parse `path` into a `Checkpoint` (format "gguf"); tensors are dequantized lazily."""
    path = Path(path)
    reader = _open(path)
    meta = _meta(reader)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModelError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHS)}"
        )
    tensors = {t.name: t for t in reader.tensors}
    for t in reader.tensors:
        if t.tensor_type not in SUPPORTED_QUANT_TYPES:
            raise UnsupportedModelError(
                f"{path}: tensor {t.name!r} has quantization type {t.tensor_type.name}, which specray does "
                f"not support; supported: {', '.join(q.name for q in SUPPORTED_QUANT_TYPES)}"
            )

    cfg = _hf_config(path, arch, meta, tensors)
    hf_to_gguf = _name_map(path, tensors, cfg["num_hidden_layers"])
    _check_shapes(path, cfg, tensors, hf_to_gguf)
    qk_heads: dict[str, int] = {}
    if arch in _PERMUTED_QK_ARCHS:
        for name in tensors:
            if m := _LAYER_RE.fullmatch(name):
                if m[2] == "attn_q":
                    qk_heads[name] = cfg["num_attention_heads"]
                elif m[2] == "attn_k":
                    qk_heads[name] = cfg["num_key_value_heads"]

    eos_ids = _eos_ids(meta)
    bos = meta.get("tokenizer.ggml.bos_token_id")
    sampling = {hf: meta[f"general.sampling.{k}"] for k, hf in _SAMPLING_KEYS.items()
                if f"general.sampling.{k}" in meta}
    tokenizer = _tokenizer(path, meta) if load_tokenizer else None
    return Checkpoint(
        path=str(path),
        hf_config=cfg,
        weights=GGUFWeightSource(reader, hf_to_gguf, qk_heads),
        tokenizer=tokenizer,
        generation=GenerationDefaults(
            eos_token_ids=eos_ids, bos_token_id=None if bos is None else int(bos), sampling=sampling
        ),
        format="gguf",
    )


def _hf_config(path: Path, arch: str, meta: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    def req(key: str) -> Any:
        full = f"{arch}.{key}"
        if full not in meta:
            raise CheckpointError(f"{path}: GGUF metadata has no {full!r}")
        return meta[full]

    hidden = int(req("embedding_length"))
    n_heads = int(req("attention.head_count"))
    n_kv = int(meta.get(f"{arch}.attention.head_count_kv", n_heads))
    q = tensors.get("blk.0.attn_q.weight")
    q_rows = int(q.shape[1]) if q is not None else hidden  # ggml dims are [in, out]
    head_dim = int(meta.get(f"{arch}.attention.key_length", q_rows // n_heads))
    rot = meta.get(f"{arch}.rope.dimension_count")
    if rot is not None and int(rot) != head_dim:
        raise UnsupportedModelError(
            f"{path}: partial rotary embedding (rope.dimension_count={rot}, head_dim={head_dim}) "
            "is not supported"
        )
    embd = tensors.get("token_embd.weight")
    vocab = meta.get(f"{arch}.vocab_size")
    if vocab is None:
        if embd is None:
            raise CheckpointError(f"{path}: no {arch}.vocab_size in the metadata and no token_embd.weight")
        vocab = int(embd.shape[1])  # ggml dims [hidden, vocab]
    ctx = int(meta.get(f"{arch}.context_length", 2048))
    cfg: dict[str, Any] = {
        "architectures": [SUPPORTED_ARCHS[arch]],
        "model_type": arch,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": int(req("feed_forward_length")),
        "num_hidden_layers": int(req("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rms_norm_eps": _f32(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "max_position_embeddings": ctx,
        "rope_parameters": _rope(path, arch, meta, tensors, head_dim, ctx),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
    }
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), _eos_ids(meta)
    if bos is not None:
        cfg["bos_token_id"] = int(bos)
    if eos:
        cfg["eos_token_id"] = eos[0] if len(eos) == 1 else list(eos)
    if (pad := meta.get("tokenizer.ggml.padding_token_id")) is not None:
        cfg["pad_token_id"] = int(pad)
    return cfg


def _rope(
    path: Path, arch: str, meta: dict[str, Any], tensors: dict[str, Any], head_dim: int, ctx: int
) -> dict[str, Any]:
    theta = _f32(meta.get(f"{arch}.rope.freq_base", 10000.0))
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = _f32(meta.get(f"{arch}.rope.scaling.factor", 1.0))
    orig = int(meta.get(f"{arch}.rope.scaling.original_context_length", 0) or 0)
    if "rope_freqs.weight" in tensors:
        divisors = dequantize(tensors["rope_freqs.weight"].data, tensors["rope_freqs.weight"].tensor_type)
        if not np.allclose(divisors, 1.0):
            return _fit_llama3(path, theta, head_dim, np.asarray(divisors, dtype=np.float64), orig or 8192)
    if kind in ("none", "") or factor == 1.0:
        return {"rope_type": "default", "rope_theta": theta}
    if kind == "linear":
        return {"rope_type": "linear", "rope_theta": theta, "factor": factor}
    raise UnsupportedModelError(f"{path}: rope scaling type {kind!r} is not supported (only linear, llama3)")


def _llama3_divisors(theta: float, head_dim: int, p: dict[str, Any]) -> np.ndarray:
    """Per-frequency divisors of llama3 rope scaling (what llama.cpp stores as `rope_freqs`)."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # [head_dim/2]
    y = p["original_max_position_embeddings"] * inv_freq / (2 * math.pi)  # orig / wavelength
    lo, hi, f = p["low_freq_factor"], p["high_freq_factor"], p["factor"]
    s = np.clip((y - lo) / (hi - lo), 0.0, 1.0)
    return 1.0 / ((1.0 - s) / f + s)


def _fit_llama3(path: Path, theta: float, head_dim: int, d: np.ndarray, orig: int) -> dict[str, Any]:
    """Recover llama3 rope parameters from llama.cpp's `rope_freqs` divisors, and verify the fit.

    Only low/orig and high/orig are identifiable; `orig` comes from the metadata or defaults to 8192.
    """
    factor = float(d.max())
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    y = orig * inv_freq / (2 * math.pi)  # [head_dim/2]
    full, none = np.isclose(d, factor, rtol=1e-4), np.isclose(d, 1.0, rtol=1e-4)
    mid = ~(full | none)
    if full.all():  # every frequency divided by `factor`: plain linear scaling
        return {"rope_type": "linear", "rope_theta": theta, "factor": factor}
    s = (1.0 / d[mid] - 1.0 / factor) / (1.0 - 1.0 / factor)  # smoothing weight of medium frequencies
    if mid.sum() >= 2:  # s = (y - lo) / (hi - lo) is linear in y
        slope, lo = np.polyfit(s, y[mid], 1)
        hi = lo + slope
    else:  # any lo (hi) between the neighbouring samples reproduces the factors; take the midpoint
        lo = ((y[full].max() if full.any() else 0.0) + y[~full].min()) / 2
        if mid.any():
            hi = lo + (y[mid][0] - lo) / s[0]
        else:
            hi = (y[~none].max() + (y[none].min() if none.any() else 2 * y.max())) / 2
    p = {
        "rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": float(lo),
        "high_freq_factor": float(hi), "original_max_position_embeddings": orig,
    }
    if hi <= lo or not np.allclose(_llama3_divisors(theta, head_dim, p), d, rtol=1e-3):
        raise UnsupportedModelError(f"{path}: rope_freqs does not follow llama3 rope scaling")
    return p


def _f32(x: Any) -> float:
    """A float32 metadata value as the short decimal it was written from (9.99999974e-06 -> 1e-05)."""
    return float(f"{float(x):.7g}")


def _eos_ids(meta: dict[str, Any]) -> tuple[int, ...]:
    ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        v = meta.get(f"tokenizer.ggml.{key}")
        if v is not None and int(v) not in ids:
            ids.append(int(v))
    return tuple(ids)


def _name_map(path: Path, tensors: dict[str, Any], n_layers: int) -> dict[str, str]:
    """HF name -> GGUF name for every tensor; unknown tensors and missing core tensors raise."""
    out: dict[str, str] = {}
    for name in tensors:
        if name in _IGNORED_TENSORS:
            continue
        if name in _GLOBAL_NAMES:
            out[_GLOBAL_NAMES[name]] = name
            continue
        m = _LAYER_RE.fullmatch(name)
        if m is None or m[2] not in _LAYER_NAMES or int(m[1]) >= n_layers:
            raise UnsupportedModelError(f"{path}: unexpected tensor {name!r} (no HF equivalent)")
        out[f"model.layers.{m[1]}.{_LAYER_NAMES[m[2]]}.{m[3]}"] = name
    required = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{mod}.weight"
        for i in range(n_layers)
        for mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
                    "input_layernorm", "post_attention_layernorm")
    ]
    missing = [n for n in required if n not in out]
    if missing:
        raise CheckpointError(f"{path}: missing tensors {missing[:5]} ({len(missing)} in all)")
    return out


def _check_shapes(
    path: Path, cfg: dict[str, Any], tensors: dict[str, Any], hf_to_gguf: dict[str, str]
) -> None:
    h, inter, v, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    expected = {  # HF shapes, [out, in]
        "embed_tokens": (v, h), "lm_head": (v, h), "norm": (h,), "q_proj": (q, h), "k_proj": (kv, h),
        "v_proj": (kv, h), "o_proj": (h, q), "gate_proj": (inter, h), "up_proj": (inter, h),
        "down_proj": (h, inter), "input_layernorm": (h,), "post_attention_layernorm": (h,),
        "q_norm": (hd,), "k_norm": (hd,),
    }
    for hf, gg in hf_to_gguf.items():
        parts = hf.split(".")
        want = expected[parts[-2]]
        if parts[-1] == "bias":
            want = want[:1]
        got = tuple(int(x) for x in reversed(tensors[gg].shape))
        if got != want:
            raise CheckpointError(f"{path}: tensor {gg!r} has shape {list(got)}, expected {list(want)}")


def _tokenizer_cache_dir(path: Path) -> Path:
    from specray.models.registry import cache_dir

    st = path.stat()
    return cache_dir().parent / "tokenizers" / f"{path.stem}-{st.st_size}-{st.st_mtime_ns}"


def _tokenizer(path: Path, meta: dict[str, Any]) -> Any:
    """Convert the GGUF vocabulary once (about 20 s for a 49K vocabulary) and keep the result as a
    HF tokenizer directory in the cache, keyed by file name, size and mtime."""
    from specray.models.tokenizer import Tokenizer

    cached = _tokenizer_cache_dir(path)
    if (cached / "tokenizer.json").exists():
        try:
            return Tokenizer.from_hf_dir(cached)
        except CheckpointError:
            pass  # a broken cache entry: convert again
    tok = _convert_tokenizer(path, meta)
    try:
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        tok.hf.save_pretrained(str(tmp))
        tmp.rename(cached)
    except OSError:
        pass  # read-only or racing cache: the converted tokenizer is still returned
    return tok


def _convert_tokenizer(path: Path, meta: dict[str, Any]) -> Any:
    from specray.models.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(path)
    hf = tok.hf
    # transformers' GGUF llama converter sets eos_token from the bos id; restore the file's specials
    for attr in ("bos", "eos"):
        tid = meta.get(f"tokenizer.ggml.{attr}_token_id")
        if tid is not None and 0 <= int(tid) < len(hf) and getattr(hf, f"{attr}_token_id") != int(tid):
            setattr(hf, f"{attr}_token", hf.convert_ids_to_tokens(int(tid)))
    template = meta.get("tokenizer.chat_template")
    if template and not getattr(hf, "chat_template", None):
        hf.chat_template = template
    return tok
