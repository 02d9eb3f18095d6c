"""The decoder-only transformer for the llama, qwen2, qwen3 and mistral families.

Owns the model weights (fused QKV and gate/up projections) and the forward over a flat batch of
tokens from many sequences: `input_ids [T]`, `positions [T]`; attention (and the KV-cache write) is
delegated to an `AttentionBackend` with per-step `AttentionMetadata`, so the same module serves
prefill chunks, decode and (later) tree verification.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from specray.errors import CheckpointError
from specray.models.arch import ModelArch
from specray.models.checkpoint import WeightSource
from specray.models.rope import RotaryEmbedding
from specray.models.tp_comm import PendingSum

if TYPE_CHECKING:
    from specray.engine.attention import AttentionBackend, AttentionMetadata


class RMSNorm(nn.Module):
    """HF-exact RMSNorm; `forward(x, residual)` first adds the residual stream (in x.dtype) and returns
    (normed, new_residual). With `fused=True` (CUDA) one Triton kernel does both; for a tensor-parallel
    `PendingSum` the same kernel also sums the ranks' partials."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.fused = False

    def forward(self, x: torch.Tensor | PendingSum, residual: torch.Tensor | None = None):
        if isinstance(x, PendingSum):  # tensor parallel: sum the ranks' partials, add, normalise in one kernel
            return x.reduce_norm(residual, self.weight, self.eps)
        if self.fused:
            from specray.kernels import fused

            if residual is None:
                return fused.rms_norm(x, self.weight, self.eps)
            return fused.add_rms_norm(x, residual, self.weight, self.eps)
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(dtype)
        return out if residual is None else (out, residual)


class Linear(nn.Linear):
    """`nn.Linear` whose single-row products (batch-1 decode) run the Triton GEMV of `specray.kernels.gemv`
    when `fused` is set (CUDA, 16-bit weights whose shape a launch config divides); every other call is
    `F.linear`."""

    fused = False
    gemv_config = None  # chosen once, when `fused` is set

    def use_gemv(self, enabled: bool) -> None:
        from specray.kernels.gemv import choose_config

        cfg = choose_config(*self.weight.shape) if enabled else None
        self.fused = cfg is not None and self.weight.dtype in (torch.float16, torch.bfloat16)
        self.gemv_config = cfg

    def gemv_fits(self, x: torch.Tensor, gated: bool = False) -> bool:
        if not self.fused:
            return False
        from specray.kernels.gemv import fits

        return fits(x, self.weight, self.gemv_config, gated)

    def project(self, x: torch.Tensor, out: torch.Tensor | None = None, gated: bool = False) -> torch.Tensor:
        """``x @ W^T + b`` [T, out_features], into `out` when given (e.g. a tensor-parallel partial region).
        `gated`: x is an MLP's gate_up [T, 2 * in_features] and the input is ``silu(gate) * up`` (fused kernels:
        inside the GEMV for one row, else the silu_mul kernel first)."""
        if self.gemv_fits(x, gated):
            from specray.kernels.gemv import gemv

            return gemv(x, self.weight, self.gemv_config, out=out, bias=self.bias, gated=gated)
        if gated:
            from specray.kernels import fused

            x = fused.silu_mul(x)
        if out is None:
            return F.linear(x, self.weight, self.bias)
        if self.bias is None:
            return torch.matmul(x, self.weight.t(), out=out)
        return torch.addmm(self.bias, x, self.weight.t(), out=out)

    def forward(self, x: torch.Tensor, gated: bool = False) -> torch.Tensor:
        return self.project(x, gated=gated)


class Attention(nn.Module):
    def __init__(self, arch: ModelArch, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
        self.q_size, self.kv_size = arch.q_size, arch.kv_size
        self.scale = self.head_dim**-0.5
        self.sliding_window = arch.sliding_windows[layer_idx] if arch.sliding_windows else None
        self.qkv_proj = Linear(arch.hidden_size, self.q_size + 2 * self.kv_size, bias=arch.attention_bias)
        self.o_proj = Linear(self.q_size, arch.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, arch.rms_norm_eps) if arch.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, arch.rms_norm_eps) if arch.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        positions: torch.Tensor,  # [T]
        rope: RotaryEmbedding,
        backend: AttentionBackend,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # per head, on the strided views
        # the backend may rotate q/k and store k/v into its cache in one kernel (Triton, fused RoPE)
        store = getattr(backend, "store_rotated", None)
        if store is not None and store(self.layer_idx, q, k, v, positions, rope, meta):
            out = backend.forward(self.layer_idx, q, k, v, meta, self.scale, self.sliding_window, kv_stored=True)
        else:
            q, k = rope(positions, q, k)
            out = backend.forward(self.layer_idx, q, k, v, meta, self.scale, self.sliding_window)  # [T, Hq, D]
        return self.o_proj(out.reshape(T, self.q_size))


class MLP(nn.Module):
    def __init__(self, arch: ModelArch):
        super().__init__()
        self.intermediate = arch.intermediate_size
        self.gate_up_proj = Linear(arch.hidden_size, 2 * arch.intermediate_size, bias=False)
        self.down_proj = Linear(arch.intermediate_size, arch.hidden_size, bias=False)
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [T, 2I]
        if self.fused:  # silu(gate) * up: inside the down GEMV for one row, else the silu_mul kernel
            return self.down_proj(gate_up, gated=True)
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = Attention(arch, layer_idx)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = MLP(arch)

    def forward(self, x, residual, positions, rope, backend, meta) -> tuple[torch.Tensor, torch.Tensor]:
        """x: this layer's input delta [T, hidden]; residual: the stream so far (None at layer 0)."""
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, positions, rope, backend, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class DecoderLM(nn.Module):
    def __init__(self, arch: ModelArch, max_positions: int, device: torch.device | str = "cpu"):
        super().__init__()
        self.arch = arch
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch, i) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.lm_head = None if arch.tie_word_embeddings else nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        self.rope = RotaryEmbedding(arch.rope, arch.head_dim, max_positions, device)

    @classmethod
    def empty(cls, arch: ModelArch, max_positions: int, dtype: torch.dtype, device: torch.device) -> DecoderLM:
        """Build with uninitialised parameters directly on `device` (no CPU init of large weights)."""
        with torch.device("meta"):
            model = cls(arch, max_positions, device="meta")
        model = model.to(dtype).to_empty(device=device)
        model.rope = RotaryEmbedding(arch.rope, arch.head_dim, max_positions, device)
        return model

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        backend: AttentionBackend,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden]
        x = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, self.rope, backend, meta)
        x, _ = self.norm(x, residual)
        return x

    def use_fused_ops(self, enabled: bool = True) -> None:
        """Route norms, RoPE and SiLU*mul through the Triton kernels of `specray.kernels.fused`, and the
        layers' batch-1 projections through `specray.kernels.gemv`."""
        for m in self.modules():
            if isinstance(m, (RMSNorm, MLP, RotaryEmbedding)):
                m.fused = enabled
            if isinstance(m, Linear):
                m.use_gemv(enabled)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [S, hidden] -> [S, V] fp32
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()

    # ---- weights -------------------------------------------------------------------------------
    @torch.no_grad()
    def load_weights(self, source: WeightSource) -> None:
        """Copy HF-named tensors from `source` into the (fused) parameters; errors name the tensor."""
        available = set(source.names())

        def fetch(name: str, shape: tuple[int, ...]) -> torch.Tensor:
            if name not in available:
                raise CheckpointError(f"checkpoint is missing the tensor {name!r}")
            t = source.get(name)
            if tuple(t.shape) != shape:
                raise CheckpointError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
            return t

        def put(param: torch.Tensor, parts: list[tuple[str, tuple[int, ...]]]) -> None:
            offset = 0
            for name, shape in parts:
                t = fetch(name, shape)
                param[offset : offset + shape[0]].copy_(t)
                offset += shape[0]

        a = self.arch
        H, I = a.hidden_size, a.intermediate_size
        put(self.embed_tokens.weight, [("model.embed_tokens.weight", (a.vocab_size, H))])
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            attn = layer.self_attn
            qkv = [("q_proj", a.q_size), ("k_proj", a.kv_size), ("v_proj", a.kv_size)]
            put(attn.qkv_proj.weight, [(f"{p}self_attn.{n}.weight", (s, H)) for n, s in qkv])
            if a.attention_bias:
                put(attn.qkv_proj.bias, [(f"{p}self_attn.{n}.bias", (s,)) for n, s in qkv])
            put(attn.o_proj.weight, [(f"{p}self_attn.o_proj.weight", (H, a.q_size))])
            if attn.q_norm is not None:
                put(attn.q_norm.weight, [(f"{p}self_attn.q_norm.weight", (a.head_dim,))])
                put(attn.k_norm.weight, [(f"{p}self_attn.k_norm.weight", (a.head_dim,))])
            gate_up = [(f"{p}mlp.gate_proj.weight", (I, H)), (f"{p}mlp.up_proj.weight", (I, H))]
            put(layer.mlp.gate_up_proj.weight, gate_up)
            put(layer.mlp.down_proj.weight, [(f"{p}mlp.down_proj.weight", (H, I))])
            put(layer.input_layernorm.weight, [(f"{p}input_layernorm.weight", (H,))])
            put(layer.post_attention_layernorm.weight, [(f"{p}post_attention_layernorm.weight", (H,))])
        put(self.norm.weight, [("model.norm.weight", (H,))])
        if self.lm_head is not None:
            put(self.lm_head.weight, [("lm_head.weight", (a.vocab_size, H))])
