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


MAX_TREE_NODES = 256


@dataclass(frozen=True)
class TreeConfig:
    """Draft tree: `chain` (length k), `beam` (LongSpec, global top-w per level), `dynamic` (EAGLE-2)."""

    kind: Literal["chain", "beam", "dynamic"] = "chain"
    length: int = 4  # chain
    shape: tuple[int, ...] = (4, 16, 16, 16, 16)  # beam: width of each level
    depth: int = 6  # dynamic
    top_k: int = 8  # dynamic
    budget: int = 64  # dynamic: draft nodes kept after re-ranking

    def __post_init__(self) -> None:
        _check_choice("speculative_config.tree.kind", self.kind, ("chain", "beam", "dynamic"))
        object.__setattr__(self, "shape", tuple(int(w) for w in self.shape))
        if self.kind == "chain" and self.length < 1:
            raise ConfigError(f"speculative_config.tree.length must be >= 1, got {self.length}")
        if self.kind == "beam" and (not self.shape or any(w < 1 for w in self.shape)):
            raise ConfigError(f"speculative_config.tree.shape must be non-empty positive widths, got {self.shape}")
        if self.kind == "dynamic" and (self.depth < 1 or self.top_k < 1 or self.budget < 1):
            raise ConfigError(
                f"speculative_config.tree depth/top_k/budget must be >= 1, got {self.depth}/{self.top_k}/{self.budget}"
            )
        if self.num_nodes > MAX_TREE_NODES or self.max_build_nodes > 4 * MAX_TREE_NODES:
            raise ConfigError(
                f"speculative_config.tree has {self.num_nodes} nodes ({self.max_build_nodes} while drafting); "
                f"at most {MAX_TREE_NODES} ({4 * MAX_TREE_NODES} while drafting) are supported"
            )

    @property
    def num_nodes(self) -> int:
        """Nodes including the root (static per config, so verification shapes are static)."""
        if self.kind == "chain":
            return self.length + 1
        if self.kind == "beam":
            return 1 + sum(self.shape)
        return self.budget + 1

    @property
    def max_build_nodes(self) -> int:
        """Nodes drafted while building, root included (dynamic trees draft a pool, then keep `budget`)."""
        if self.kind == "dynamic":
            return 1 + self.top_k + (self.depth - 1) * self.top_k * self.top_k
        return self.num_nodes

    @property
    def max_depth(self) -> int:
        return {"chain": self.length, "beam": len(self.shape), "dynamic": self.depth}[self.kind]


@dataclass(frozen=True)
class RetrievalConfig:
    """SpecExtend's Cross-model Retrieval for a `draft_model` proposer."""

    chunk_size: int = 32
    top_k_chunks: int = 32
    refresh_every: int = 4

    def __post_init__(self) -> None:
        for name in ("chunk_size", "top_k_chunks", "refresh_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"speculative_config.retrieval.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def budget_tokens(self) -> int:
        return self.chunk_size * self.top_k_chunks


@dataclass(frozen=True)
class SparseConfig:
    """UNIQUE top-k page selection for `sparse_self` (score = q.mean_k + std_weight * |q| * std_k)."""

    page_size: int = 16
    budget_tokens: int = 512
    std_weight: float = 0.5
    sink_pages: int = 1
    recent_pages: int = 2

    def __post_init__(self) -> None:
        if self.page_size < 1 or self.budget_tokens < self.page_size:
            raise ConfigError(
                f"speculative_config.sparse.budget_tokens ({self.budget_tokens}) must be >= page_size "
                f"({self.page_size}) >= 1"
            )
        if self.sink_pages < 0 or self.recent_pages < 0:
            raise ConfigError("speculative_config.sparse.sink_pages and recent_pages must be >= 0")
        if (self.sink_pages + self.recent_pages) * self.page_size > self.budget_tokens:
            raise ConfigError("speculative_config.sparse: sink + recent pages exceed budget_tokens")


SpecMethod = Literal["none", "ngram", "draft_model", "sparse_self", "longspec"]


@dataclass(frozen=True)
class SpeculativeConfig:
    method: SpecMethod = "none"
    model: str | None = None  # draft_model / longspec weights
    num_speculative_tokens: int | None = None  # vLLM's name: a chain of this length when `tree` is unset
    tree: TreeConfig = field(default_factory=TreeConfig)
    retrieval: RetrievalConfig | None = None  # draft_model only
    sparse: SparseConfig = field(default_factory=SparseConfig)
    window: int | None = None  # longspec: draft self-attention window (default: checkpoint's, else 512)
    prompt_lookup_min: int = 2  # ngram
    prompt_lookup_max: int = 4  # ngram
    draft_placement: Literal["colocated", "separate"] = "colocated"
    draft_tensor_parallel_size: int = 1
    # separate draft on GPUs: the share of a GPU its actor reserves; < 1 puts it on the last target shard's
    # GPU (that shard's bundle takes the rest), e.g. 0.5 for TP=2 plus a draft on a 2-GPU host
    draft_gpu_fraction: float = 1.0

    def __post_init__(self) -> None:
        _check_choice(
            "speculative_config.method", self.method, ("none", "ngram", "draft_model", "sparse_self", "longspec")
        )
        _check_choice("speculative_config.draft_placement", self.draft_placement, ("colocated", "separate"))
        check_draft_gpu_fraction(self.draft_gpu_fraction)
        if self.num_speculative_tokens is not None:
            if self.num_speculative_tokens < 1:
                raise ConfigError(
                    f"speculative_config.num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}"
                )
            object.__setattr__(self, "tree", TreeConfig(kind="chain", length=self.num_speculative_tokens))
        if self.method == "draft_model" and not self.model:
            raise ConfigError("speculative_config.model is required for method 'draft_model'")
        if self.retrieval is not None and self.method != "draft_model":
            raise ConfigError("speculative_config.retrieval applies to method 'draft_model' only")
        if self.window is not None and self.window < 1:
            raise ConfigError(f"speculative_config.window must be >= 1, got {self.window}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ConfigError(
                f"speculative_config.prompt_lookup_min ({self.prompt_lookup_min}) must be in "
                f"[1, prompt_lookup_max ({self.prompt_lookup_max})]"
            )


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
    speculative_config: SpeculativeConfig | None = None
    # distributed (specray.actors.DistributedEngine): target shards, Ray cluster, draft/verify overlap
    tensor_parallel_size: int = 1
    ray_address: str | None = None  # None: start a local Ray cluster; "auto" or "ray://..." to connect
    overlap: bool = False  # draft_placement separate: draft step i+1 while the target verifies step i
    # TP > 1 on CUDA: small all-reduces use PyTorch symmetric memory (one-shot, NVLink); True: NCCL only
    disable_custom_all_reduce: bool = False
    # with symmetric memory and fused_ops: O/down partials are summed by the RMSNorm kernel that follows
    fuse_allreduce_rmsnorm: bool = True
    # how the fused sum gets the partials: "push" (each rank writes its partial into every rank's memory; the
    # norm waits on local memory) or "pull" (a flag barrier, then NVLink reads); see specray.kernels.tp_norm
    tp_fused_sum: str = "push"
    # with the fused all-reduce: MB of the next projection's weight read into L2 while it waits (0: off;
    # experimental, not yet measured on a GPU)
    tp_weight_prefetch_mb: int = 0
    # control-plane waits (step plans, draft exchange) busy-check this long before sleeping; None: 2 ms for
    # step plans on GPUs, else 0 (spinning waiters slow the working side); see specray.actors.world.Layout
    control_plane_spin_ms: float | None = None
    # greedy decode steps: launch step N+1 (its input ids the device-side argmax of step N) before the host
    # reads step N's tokens, so scheduling and staging overlap the GPU (vLLM's name); None: on for CUDA
    async_scheduling: bool | None = None
    # distributed engine: "cores" pins each shard and the draft actor to a physical core of its own (all its
    # hardware threads), so no two busy host loops share one; "none" leaves placement to the OS. See
    # specray.actors.affinity
    cpu_affinity: str = "none"

    def __post_init__(self) -> None:
        _check_choice("dtype", self.dtype, ("auto", "float32", "float16", "bfloat16"))
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size must be an integer >= 1, got {self.tensor_parallel_size!r}")
        spec = self.speculative_config
        if self.overlap and (spec is None or spec.draft_placement != "separate" or spec.method != "draft_model"):
            raise ConfigError(
                "overlap: true needs speculative_config.method 'draft_model' with draft_placement 'separate'"
            )
        if not isinstance(self.tp_weight_prefetch_mb, int) or not 0 <= self.tp_weight_prefetch_mb <= 1024:
            raise ConfigError(
                f"tp_weight_prefetch_mb must be an integer in [0, 1024], got {self.tp_weight_prefetch_mb!r}"
            )
        spin = self.control_plane_spin_ms
        if spin is not None and (isinstance(spin, bool) or not isinstance(spin, (int, float))
                                 or not 0 <= spin <= 10_000):
            raise ConfigError(f"control_plane_spin_ms must be a number in [0, 10000] or null, got {spin!r}")
        if self.async_scheduling is not None and not isinstance(self.async_scheduling, bool):
            raise ConfigError(f"async_scheduling must be true, false or null, got {self.async_scheduling!r}")
        _check_choice("tp_fused_sum", self.tp_fused_sum, ("push", "pull"))
        _check_choice("cpu_affinity", self.cpu_affinity, ("none", "cores"))
        _check_choice("device", self.device, ("auto", "cpu", "cuda"))
        _check_choice("attention_backend", self.attention_backend, ("auto", "torch", "triton"))
        object.__setattr__(self, "cuda_graph_batch_sizes", tuple(sorted(set(self.cuda_graph_batch_sizes))))
        if any(b < 1 for b in self.cuda_graph_batch_sizes):
            raise ConfigError(f"cuda_graph_batch_sizes must be positive, got {self.cuda_graph_batch_sizes}")


    def graph_batch_sizes(self) -> tuple[int, ...]:
        """The CUDA-graph batch sizes that can occur: those up to scheduler.max_num_seqs."""
        return tuple(b for b in self.cuda_graph_batch_sizes if b <= self.scheduler.max_num_seqs)


def check_draft_gpu_fraction(value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"speculative_config.draft_gpu_fraction must be in (0, 1], got {value}")


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
        sub = _NESTED.get((cls.__name__, key))
        if sub is not None and value is not None:
            value = _build(sub, value, f"{prefix}{key}.")
        elif key in ("cuda_graph_batch_sizes", "shape"):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as e:
        raise ConfigError(f"invalid {prefix or 'config'}: {e}") from None


_NESTED: dict[tuple[str, str], type] = {
    ("EngineConfig", "cache"): CacheConfig,
    ("EngineConfig", "scheduler"): SchedulerConfig,
    ("EngineConfig", "speculative_config"): SpeculativeConfig,
    ("SpeculativeConfig", "tree"): TreeConfig,
    ("SpeculativeConfig", "retrieval"): RetrievalConfig,
    ("SpeculativeConfig", "sparse"): SparseConfig,
}


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
