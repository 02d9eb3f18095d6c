"""Tiny random checkpoints written with `transformers` (`save_pretrained`), one per model family."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def hf_config(family: str, vocab_size: int = 256, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    if family == "llama":
        common["rope_scaling"] = {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        cls = LlamaConfig
    elif family == "qwen2":
        cls = Qwen2Config
    elif family == "qwen3":
        common["head_dim"] = 32
        cls = Qwen3Config
    elif family == "mistral":
        common["sliding_window"] = 24
        cls = MistralConfig
    else:
        raise ValueError(family)
    common.update(overrides)
    return cls(**common)


def tiny_tokenizer(vocab_size: int = 256):
    """A word-level tokenizer: 'w17' <-> id 17; ids 0..2 are <unk>, <s>, </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    hf.chat_template = (
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}w3 {% endif %}"
    )
    return hf


def make_checkpoint(path: Path, family: str, seed: int = 0, tokenizer: bool = True, **overrides) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = hf_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # random init is small; widen it so logits are well separated and argmax is stable
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2)
            elif p.dim() == 2:
                p.normal_(0.0, 0.08)
            else:
                p.normal_(0.0, 0.05)
    model.save_pretrained(path)
    if tokenizer:
        tiny_tokenizer(cfg.vocab_size).save_pretrained(path)
    return path


def perturbed_copy(src: Path, dst: Path, scale: float, seed: int = 1, **config_overrides) -> Path:
    """A draft for `src`: the same architecture and vocabulary, weights + Gaussian noise (relative `scale`),
    optionally with fewer layers (`num_hidden_layers=1` keeps the first layers)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(config_overrides)
    (dst / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(src / "model.safetensors")
    keep = cfg["num_hidden_layers"]
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in tensors.items():
        if name.startswith("model.layers.") and int(name.split(".")[2]) >= keep:
            continue
        out[name] = t + scale * t.std() * torch.randn(t.shape, generator=g)
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    return dst
