"""Resolve a model reference (registry name, HF directory or GGUF file) and load its `Checkpoint`."""

from __future__ import annotations

from pathlib import Path

from specray.errors import CheckpointError
from specray.models.checkpoint import Checkpoint


def load_checkpoint(model: str | Path, load_tokenizer: bool = True) -> Checkpoint:
    from specray.models.registry import resolve

    path = resolve(str(model))
    if path.is_dir():
        from specray.models.hf_loader import load_hf_dir

        return load_hf_dir(path, load_tokenizer=load_tokenizer)
    if path.suffix.lower() == ".gguf":
        from specray.models.gguf_loader import load_gguf

        return load_gguf(path, load_tokenizer=load_tokenizer)
    raise CheckpointError(f"{path} is neither a HF checkpoint directory nor a .gguf file")
