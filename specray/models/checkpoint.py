"""What a loader hands to the engine: a HF-style config dict, named weights, a tokenizer, EOS/defaults.

`Checkpoint` owns no tensors itself: `WeightSource.get(name)` materialises one tensor in HF naming
(`model.layers.0.self_attn.q_proj.weight`, ...) on demand, so a tensor-parallel rank can read only
its slices and a GGUF source can dequantize one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from specray.models.tokenizer import Tokenizer


class WeightSource(Protocol):
    """Named tensors in HF `transformers` naming and layout (Q/K rows in rotate-half order)."""

    def names(self) -> Iterable[str]: ...

    def get(self, name: str) -> torch.Tensor: ...


class DictWeightSource:
    """In-memory weights (tests, benchmarks: a HF model's `state_dict()`)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._tensors = tensors

    def names(self) -> Iterable[str]:
        return self._tensors.keys()

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]


@dataclass(frozen=True)
class GenerationDefaults:
    """From `generation_config.json` (HF) or GGUF metadata."""

    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    # sampling defaults (temperature, top_p, top_k, ...) the checkpoint recommends
    sampling: dict[str, Any] = field(default_factory=dict)


@dataclass
class Checkpoint:
    path: str
    hf_config: dict[str, Any]
    weights: WeightSource
    tokenizer: Tokenizer | None
    generation: GenerationDefaults
    format: str = "hf"  # hf | gguf | memory
