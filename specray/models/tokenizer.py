"""Tokenizer and chat template: a thin wrapper over a `transformers` fast tokenizer.

Owns the vocabulary, the chat template and the special ids. Built from a HF checkpoint directory
(`tokenizer.json` + `tokenizer_config.json`) or from GGUF metadata (via `transformers`' GGUF
tokenizer conversion).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from specray.errors import CheckpointError


class Tokenizer:
    def __init__(self, hf_tokenizer: Any):
        self.hf = hf_tokenizer  # transformers.PreTrainedTokenizerBase

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
            raise CheckpointError(
                f"no tokenizer in {path}: expected tokenizer.json and tokenizer_config.json"
            )
        from transformers import AutoTokenizer

        try:
            return cls(AutoTokenizer.from_pretrained(str(path)))
        except Exception as e:  # noqa: BLE001 - re-raised with the path
            raise CheckpointError(f"cannot load the tokenizer in {path}: {e}") from e

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        from transformers import AutoTokenizer

        path = Path(path)
        try:
            return cls(AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"cannot build a tokenizer from the GGUF metadata of {path}: {e}") from e

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return self.hf.convert_ids_to_tokens(ids)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render messages to the prompt string (tokenise it with `add_special_tokens=False`)."""
        if not self.has_chat_template:
            raise CheckpointError("this model's tokenizer has no chat template; use a plain prompt")
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
