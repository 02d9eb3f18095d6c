"""Frozen dataclasses for every engine knob, and YAML/JSON loading with errors that name the field.

`EngineConfig` owns the model reference (path or registry name), device/dtype, and the cache and
scheduler settings. `load_engine_config(path_or_dict)` validates unknown keys and value ranges.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from specray.errors import ConfigError

DType = Literal["auto", "float32", "float16", "bfloat16"]
Device = Literal["auto", "cpu", "cuda"]
AttentionBackendName = Literal["auto", "torch", "triton"]


@dataclass(frozen=True)
class CacheConfig:
    page_size: int = 16
    # CUDA: fraction of the device memory the engine may use (weights + activations + KV)
    gpu_memory_utilization: float = 0.9
    # CPU: bytes set aside for KV pages
    cpu_kv_cache_bytes: int = 1 << 30
    # explicit page count; overrides both budgets when set
    num_pages: int | None = None

    def __post_init__(self) -> None:
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ConfigError(f"cache.page_size must be a power of two >= 1, got {self.page_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(
                f"cache.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.cpu_kv_cache_bytes <= 0:
            raise ConfigError(f"cache.cpu_kv_cache_bytes must be positive, got {self.cpu_kv_cache_bytes}")
        if self.num_pages is not None and self.num_pages < 1:
            raise ConfigError(f"cache.num_pages must be >= 1, got {self.num_pages}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    # token budget of one step; a prompt longer than this is prefilled in chunks
    max_num_batched_tokens: int = 2048
    # None: the model's max_position_embeddings
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ConfigError(f"scheduler.max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ConfigError(
                f"scheduler.max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"scheduler.max_num_seqs ({self.max_num_seqs})"
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"scheduler.max_model_len must be >= 2, got {self.max_model_len}")


@dataclass(frozen=True)
class EngineConfig:
    model: str = "smollm2-135m"  # HF directory, GGUF file, or a registry name
    tokenizer: str | None = None  # defaults to the model's own
    skip_tokenizer_init: bool = False  # token ids in and out only (vLLM's name)
    dtype: DType = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: Device = "auto"
    seed: int = 0
    attention_backend: AttentionBackendName = "auto"  # auto: triton on CUDA, torch on CPU
    cuda_graphs: bool = True
    fused_ops: bool = True  # CUDA: Triton kernels for RMSNorm(+residual), RoPE and SiLU*mul
    cuda_graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        _check_choice("dtype", self.dtype, ("auto", "float32", "float16", "bfloat16"))
        _check_choice("device", self.device, ("auto", "cpu", "cuda"))
        _check_choice("attention_backend", self.attention_backend, ("auto", "torch", "triton"))
        object.__setattr__(self, "cuda_graph_batch_sizes", tuple(sorted(set(self.cuda_graph_batch_sizes))))
        if any(b < 1 for b in self.cuda_graph_batch_sizes):
            raise ConfigError(f"cuda_graph_batch_sizes must be positive, got {self.cuda_graph_batch_sizes}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown field {prefix}{unknown[0]}; known fields: {', '.join(prefix + k for k in fields)}"
        )
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        sub = {"cache": CacheConfig, "scheduler": SchedulerConfig}.get(key) if cls is EngineConfig else None
        if sub is not None:
            value = _build(sub, value or {}, f"{prefix}{key}.")
        elif key == "cuda_graph_batch_sizes":
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as e:
        raise ConfigError(f"invalid {prefix or 'config'}: {e}") from None


def load_engine_config(source: str | Path | dict[str, Any]) -> EngineConfig:
    """Build an `EngineConfig` from a dict, or a YAML/JSON file (optionally under an `engine:` key)."""
    if isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        text = path.read_text()
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot parse {path}: {e}") from None
        data = data or {}
    if isinstance(data, dict) and "engine" in data:
        data = data["engine"]
    return _build(EngineConfig, data, "")
