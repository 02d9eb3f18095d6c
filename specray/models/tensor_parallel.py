"""Megatron-style tensor parallelism for `DecoderLM`: the rank-local architecture, the rank's weight
slices, and the parallel layers (column / row / vocabulary parallel).

Owns no global state: a `TPContext` names this rank's place (`rank`, `size`) and the torch.distributed
group whose all-reduce / all-gather joins the shards. Per rank:

- QKV and gate/up are column-parallel: rank r holds heads `[r*Hq/tp, (r+1)*Hq/tp)` of Q and
  `[r*Hkv/tp, ...)` of K and V (so the KV cache is per rank, by KV head), and columns
  `[r*I/tp, ...)` of gate and of up.
- O and down are row-parallel: their inputs are the rank's heads / columns; the partial outputs
  `[T, hidden]` are summed with one all-reduce, so the residual stream is replicated on every rank.
- Embedding and LM head are vocabulary-parallel over a vocabulary padded to a multiple of tp:
  a rank looks up only the ids in its range (zeros elsewhere, then all-reduce); the LM head makes
  `[S, V/tp]` logits that are all-gathered to `[S, V]`.

`ShardedWeightSource` presents a checkpoint's HF-named tensors already cut to the rank's slice, so the
unchanged `DecoderLM.load_weights` loads a shard: safetensors slices are read lazily (`get_slice`),
other sources (GGUF: dequantised) are cut after `get`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from specray.errors import ConfigError
from specray.models.arch import ModelArch
from specray.models.checkpoint import WeightSource
from specray.models.decoder import DecoderLM, Linear
from specray.models.rope import RotaryEmbedding
from specray.models.tp_comm import PendingSum, TPAllReduce


@dataclass(frozen=True)
class TPContext:
    rank: int  # rank within the tensor-parallel group
    size: int
    group: Any = None  # torch.distributed ProcessGroup of the tp ranks (None: the default group)
    all_reduce: TPAllReduce | None = None  # None: torch.distributed.all_reduce over `group`


def check_tp(arch: ModelArch, tp: int) -> None:
    """ConfigError unless the heads, KV heads and intermediate size divide by `tp`."""
    for what, n in (("num_attention_heads", arch.num_heads), ("num_key_value_heads", arch.num_kv_heads),
                    ("intermediate_size", arch.intermediate_size)):
        if n % tp:
            raise ConfigError(
                f"tensor_parallel_size {tp} must divide the model's {what} ({n}): each rank holds "
                f"{what} / tensor_parallel_size of them"
            )


def padded_vocab(vocab_size: int, tp: int) -> int:
    return -(-vocab_size // tp) * tp


def local_arch(arch: ModelArch, tp: int) -> ModelArch:
    """The shapes one rank holds (heads, KV heads, intermediate and vocabulary divided by tp)."""
    check_tp(arch, tp)
    return dataclasses.replace(
        arch, num_heads=arch.num_heads // tp, num_kv_heads=arch.num_kv_heads // tp,
        intermediate_size=arch.intermediate_size // tp, vocab_size=padded_vocab(arch.vocab_size, tp) // tp,
    )


class RowParallelLinear(Linear):
    """y = x_local @ W_local^T, summed over the tp ranks (no bias: O and down have none).

    With a `site` (0 or 1) and a batch that fits the fused path, the partial is written into that
    symmetric-memory region and returned as a `PendingSum`: the RMSNorm that follows does the sum."""

    reduce: TPAllReduce
    site: int | None = None
    prefetch_next: torch.Tensor | None = None  # the weight of the projection after the next norm

    def forward(self, x: torch.Tensor, gated: bool = False) -> torch.Tensor | PendingSum:
        """[T, in/tp] (gated: the MLP's gate_up [T, 2 in/tp], see `Linear.project`) -> [T, out]."""
        r = self.reduce
        if self.site is not None and r.can_fuse(x.shape[0], self.out_features, x.dtype):
            r.claim_site(self.site)
            region = r.partial_region(self.site, x.shape[0], self.out_features)  # [T, out], this rank's own slot
            if r.push and self.gemv_fits(x, gated):  # one row: the GEMV's epilogue writes every rank's slot
                from specray.kernels.gemv import gemv

                part = gemv(x, self.weight, self.gemv_config, out=region, push=r.push_tables[self.site], gated=gated)
            else:
                part = self.project(x, out=region, gated=gated)
                r.publish(self.site, part)
            return PendingSum(r, self.site, part, self.prefetch_next)
        return r(self.project(x, gated=gated))


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + V/tp) of the (padded) embedding; the lookup is all-reduced over ranks."""

    def __init__(self, num_local: int, dim: int, start: int, reduce: TPAllReduce):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_local, dim))
        self.start, self.num_local, self.reduce = start, num_local, reduce

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden]
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_local)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        x = x.masked_fill(outside[:, None], 0.0)
        return self.reduce(x)


class TPDecoderLM(DecoderLM):
    """One rank's shard of a `DecoderLM`; `arch` is the rank-local arch, `full_arch` the checkpoint's."""

    def __init__(self, full: ModelArch, tp: TPContext, max_positions: int, device: torch.device | str = "cpu"):
        arch = local_arch(full, tp.size)
        super().__init__(arch, max_positions, device)
        self.full_arch, self.tp = full, tp
        # every row-parallel layer and the embedding share it
        self.reduce = reduce = tp.all_reduce if tp.all_reduce is not None else TPAllReduce(tp.group)
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, tp.rank * arch.vocab_size,
                                                   reduce)
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.o_proj = _row_parallel(attn.o_proj, reduce)
            mlp.down_proj = _row_parallel(mlp.down_proj, reduce)

    def fuse_all_reduce_norm(self, prefetch_mb: int = 0) -> bool:
        """Let O and down leave their partials for the next RMSNorm to sum (`PendingSum`): O in region 0
        (summed by post_attention_layernorm), down in region 1 (the next layer's input_layernorm, or the final
        norm). Consecutive fused sums never share a region. Needs fused RMSNorm kernels and a reducer with
        the fused path; returns whether it is on.

        `prefetch_mb` > 0: beside each fused sum, read that much of the next projection's weight into L2
        (after O: this layer's gate/up; after down: the next layer's QKV)."""
        if not (self.reduce.fuses_norm and self.norm.fused):
            return False
        self.reduce.prefetch_bytes = prefetch_mb << 20
        for i, layer in enumerate(self.layers):
            layer.self_attn.o_proj.site = 0
            layer.mlp.down_proj.site = 1
            if prefetch_mb > 0:  # plain tensors sharing the weights' storage (not registered as parameters)
                layer.self_attn.o_proj.prefetch_next = layer.mlp.gate_up_proj.weight.detach()
                if i + 1 < len(self.layers):
                    layer.mlp.down_proj.prefetch_next = self.layers[i + 1].self_attn.qkv_proj.weight.detach()
        return True

    @classmethod
    def empty_shard(cls, full: ModelArch, tp: TPContext, max_positions: int, dtype: torch.dtype,
                    device: torch.device) -> TPDecoderLM:
        with torch.device("meta"):
            model = cls(full, tp, max_positions, device="meta")
        model = model.to(dtype).to_empty(device=device)
        model.rope = RotaryEmbedding(full.rope, full.head_dim, max_positions, device)
        return model

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [S, hidden] -> [S, V] fp32
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        local = F.linear(hidden, weight).float().contiguous()  # [S, V/tp]
        parts = [torch.empty_like(local) for _ in range(self.tp.size)]
        dist.all_gather(parts, local, group=self.tp.group)
        return torch.cat(parts, dim=-1)[:, : self.full_arch.vocab_size]

    def load_shard(self, source: WeightSource) -> None:
        self.load_weights(ShardedWeightSource(source, self.full_arch, self.tp.rank, self.tp.size))


def _row_parallel(linear: nn.Linear, reduce: TPAllReduce) -> RowParallelLinear:
    out = RowParallelLinear(linear.in_features, linear.out_features, bias=False, device=linear.weight.device)
    out.reduce = reduce
    return out


class ShardedWeightSource:
    """A `WeightSource` whose tensors are rank `rank`'s slices (HF names, shapes of `local_arch`)."""

    def __init__(self, source: WeightSource, arch: ModelArch, rank: int, size: int):
        self.source, self.arch, self.rank, self.size = source, arch, rank, size
        self.vocab_local = padded_vocab(arch.vocab_size, size) // size

    def names(self) -> Iterable[str]:
        return self.source.names()

    def _rule(self, name: str) -> tuple[int, int] | None:
        """(dim, rows per rank) of the slice, or None for a replicated tensor."""
        a, tp = self.arch, self.size
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            return 0, a.q_size // tp
        if name.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")):
            return 0, a.kv_size // tp
        if name.endswith(("gate_proj.weight", "up_proj.weight")):
            return 0, a.intermediate_size // tp
        if name.endswith("o_proj.weight"):
            return 1, a.q_size // tp
        if name.endswith("down_proj.weight"):
            return 1, a.intermediate_size // tp
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return 0, self.vocab_local
        return None

    def get(self, name: str) -> torch.Tensor:
        rule = self._rule(name)
        if rule is None:
            return self.source.get(name)
        dim, n = rule
        start = self.rank * n
        get_slice = getattr(self.source, "get_slice", None)
        if get_slice is not None:
            sl = get_slice(name)
            full_len = sl.get_shape()[dim]
            stop = min(start + n, full_len)
            part = sl[max(0, start):stop] if dim == 0 else sl[:, start:stop]
        else:
            t = self.source.get(name)
            full_len = t.shape[dim]
            part = t.narrow(dim, start, max(0, min(n, full_len - start))).contiguous()
        if part.shape[dim] < n:  # the padded vocabulary tail of the last rank
            pad = list(part.shape)
            pad[dim] = n - part.shape[dim]
            part = torch.cat([part, part.new_zeros(pad)], dim=dim)
        return part
