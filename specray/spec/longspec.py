"""`longspec` proposer: LongSpec's GliDe draft, one decoder block attached to the frozen target.

The draft (`GlideDraftLayer`) is built from the TARGET's `ModelArch` (its hidden size, heads, KV heads,
head_dim, intermediate size, RMSNorm eps and RoPE) and runs, with a residual around each sub-block:

1. RMSNorm -> self-attention over the draft's own tokens with a left sliding window of `window` tokens
   (512 as released): the query at position i sees the draft keys at positions j with
   i - window <= j <= i (FlashAttention's `window_size=(window, -1)`, as in LongSpec's training), so
   the committed keys it can see always fit a `window`-entry ring. q/k/v projections carry a bias.
2. RMSNorm -> cross-attention: only `q_proj` (with bias, as released) and `o_proj`; keys and values are
   the target's LAST-layer K/V cache (post-RoPE) of the verified tokens, positions 0..P-1 with
   P = `seq.num_computed`; GQA by the target's KV heads; the query gets RoPE at its own position; no
   mask (every verified key is visible).
3. RMSNorm -> SwiGLU FFN of the target's intermediate size.

Embedding and LM head are the target's (`engine.model.embed_tokens`, `engine.model.compute_logits`),
not duplicated. The released code (`Qwen2Glide` / `LlamaGlide`: `self.lm_head(hidden_states)` on the
draft layer's output, in training and in every decoding path) applies NO final norm before the shared
head, and neither do we: `engine.model.norm` is not used.

Data this module owns:
- the draft layer's parameters (`LongSpecProposer.layer`);
- per request a `_RingState`: the draft's self-attention K (post-RoPE) and V in a ring buffer of
  constant size `[window, Hkv, D]` plus the position held by each slot (`-1` = empty) and how many
  committed positions it accounts for. Position p lives in slot p % window; writes wrap around.
  The self-attention K/V of a token depend only on its embedding and position (the first sub-layer
  sees only its own normed embedding), so catching up on committed tokens is one batched projection
  of at most `window` newest tokens and accepted tokens are simply re-projected at commit;
- one per-step scratch `[S, Hkv, D]` for the K/V of the tree nodes being drafted, shared by the
  sequences (drafted one after another); S = the nodes a build expands (`max_expanded_nodes`: chain
  length, 1 + sum(shape[:-1]) for beam, 1 + (depth - 1) * top_k for dynamic), constant per config.
Nothing is proportional to the context length: `kv_bytes()` = rings + scratch. The target's verified
last-layer K/V are read (gathered per drafted sequence, transiently) from the engine's paged cache.

Weights (`speculative_config.model`):
- None: deterministic random init (seeded by `EngineConfig.seed`; linear weights N(0, 0.02), zero
  biases, unit norms). UNTRAINED: drafts are a bigram-like guess through the shared head, so
  acceptance is low until the training issue produces real weights. Losslessness does not depend on it.
- our format: a safetensors file (or a directory holding `*.safetensors`) with this module's parameter
  names and metadata `format=specray-glide`, `window=<int>` (`save_glide` / `load_glide`);
- a released LongSpec draft (`sail/longspec-*`, saved by `Qwen2GlideDecoderLayer` /
  `LlamaGlideDecoderLayer.save_pretrained`): `*.safetensors` or `pytorch_model*.bin`, keys mapped:

  ======================================================  ==================================================
  released key (prefix `draft_model.`/`model.` stripped)   ours
  ======================================================  ==================================================
  input_layernorm.weight                                  input_layernorm.weight
  self_attn.{q,k,v}_proj.weight                           self_attn.qkv_proj.weight  (rows q; k; v)
  self_attn.{q,k,v}_proj.bias                             self_attn.qkv_proj.bias    (q; k; v)
  self_attn.o_proj.weight                                 self_attn.o_proj.weight
  post_self_attention_layernorm.weight                    post_self_attention_layernorm.weight
  cross_attn.q_proj.weight / .bias                        cross_attn.q_proj.weight / .bias
  cross_attn.o_proj.weight                                cross_attn.o_proj.weight
  cross_attn.{k,v}_proj.*                                 (ignored: unused at inference, as released)
  post_cross_attention_layernorm.weight                   post_cross_attention_layernorm.weight
  mlp.gate_proj.weight, mlp.up_proj.weight                mlp.gate_up_proj.weight    (rows gate; up)
  mlp.down_proj.weight                                    mlp.down_proj.weight
  ======================================================  ==================================================

  A released checkpoint carries no window; it gets LongSpec's 512. A tensor whose shape does not match
  the target raises `ConfigError` naming `speculative_config.model` and both shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from specray.config import SpeculativeConfig, TreeConfig
from specray.engine.attention import dense_attention, gather_kv
from specray.engine.sequence import Sequence
from specray.errors import CheckpointError, ConfigError
from specray.models.arch import ModelArch
from specray.models.decoder import MLP, RMSNorm
from specray.models.rope import RotaryEmbedding
from specray.spec.proposers import draft_tree
from specray.spec.types import AcceptResult, DraftTree

if TYPE_CHECKING:
    from specray.engine.llm_engine import LLMEngine

DEFAULT_WINDOW = 512  # LongSpec's draft self-attention window
GLIDE_FORMAT = "specray-glide"


def apply_rope(x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding) -> torch.Tensor:
    """x [T, H, D] rotated (rotate-half layout) at positions [T] with the target's cos/sin tables."""
    cos = rope.cos[positions].unsqueeze(1).to(x.dtype)  # [T, 1, D]
    sin = rope.sin[positions].unsqueeze(1).to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class GlideSelfAttention(nn.Module):
    def __init__(self, arch: ModelArch):
        super().__init__()
        self.qkv_proj = nn.Linear(arch.hidden_size, arch.q_size + 2 * arch.kv_size, bias=True)
        self.o_proj = nn.Linear(arch.q_size, arch.hidden_size, bias=False)


class GlideCrossAttention(nn.Module):
    def __init__(self, arch: ModelArch):
        super().__init__()
        self.q_proj = nn.Linear(arch.hidden_size, arch.q_size, bias=True)
        self.o_proj = nn.Linear(arch.q_size, arch.hidden_size, bias=False)


class GlideDraftLayer(nn.Module):
    """LongSpec's draft block for a target of architecture `arch`. Stateless: callers hand it the keys
    (`qkv` / `kv` produce this layer's own, `attend` consumes them)."""

    def __init__(self, arch: ModelArch, window: int = DEFAULT_WINDOW):
        super().__init__()
        if window < 1:
            raise ConfigError(f"the LongSpec draft window must be >= 1, got {window}")
        self.arch = arch
        self.window = window
        self.num_heads, self.num_kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
        self.q_size, self.kv_size = arch.q_size, arch.kv_size
        self.scale = arch.head_dim**-0.5
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = GlideSelfAttention(arch)
        self.post_self_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.cross_attn = GlideCrossAttention(arch)
        self.post_cross_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = MLP(arch)

    @torch.no_grad()
    def random_init(self, seed: int = 0, std: float = 0.02) -> GlideDraftLayer:
        """Deterministic init (CPU generator): linear weights N(0, std), biases 0, norm weights 1."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
        return self

    # ---- compute ---------------------------------------------------------------------------------
    def qkv(
        self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, hidden] token embeddings -> self-attention q [T, Hq, D], k [T, Hkv, D] (post-RoPE), v."""
        T = x.shape[0]
        q, k, v = self.self_attn.qkv_proj(self.input_layernorm(x)).split([self.q_size, self.kv_size, self.kv_size], -1)
        q = apply_rope(q.view(T, self.num_heads, self.head_dim), positions, rope)
        k = apply_rope(k.view(T, self.num_kv_heads, self.head_dim), positions, rope)
        return q, k, v.view(T, self.num_kv_heads, self.head_dim)

    def kv(self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> self-attention k [T, Hkv, D] (post-RoPE), v [T, Hkv, D]; no query projection."""
        T = x.shape[0]
        proj = self.self_attn.qkv_proj
        kv = F.linear(self.input_layernorm(x), proj.weight[self.q_size :], proj.bias[self.q_size :])
        k, v = kv.split([self.kv_size, self.kv_size], dim=-1)
        k = apply_rope(k.reshape(T, self.num_kv_heads, self.head_dim), positions, rope)
        return k, v.reshape(T, self.num_kv_heads, self.head_dim)

    def attend(
        self,
        x: torch.Tensor,  # [T, hidden] token embeddings
        q: torch.Tensor,  # [T, Hq, D] self-attention queries (from `qkv`)
        self_k: torch.Tensor,  # [L, Hkv, D] draft keys, the queries' own included
        self_v: torch.Tensor,  # [L, Hkv, D]
        self_mask: torch.Tensor,  # [T, L] bool
        cross_k: torch.Tensor,  # [P, Hkv, D] the target's last-layer keys of the verified tokens
        cross_v: torch.Tensor,  # [P, Hkv, D]
        positions: torch.Tensor,  # [T]
        rope: RotaryEmbedding,
    ) -> torch.Tensor:  # [T, hidden]: the draft's final hidden state (no norm: the head reads it as is)
        T = x.shape[0]
        o = dense_attention(q, self_k, self_v, self_mask, self.scale).to(x.dtype)  # [T, Hq, D]
        x = x + self.self_attn.o_proj(o.reshape(T, self.q_size))
        h = self.post_self_attention_layernorm(x)
        cq = apply_rope(self.cross_attn.q_proj(h).view(T, self.num_heads, self.head_dim), positions, rope)
        if cross_k.shape[0]:
            visible = torch.ones(T, cross_k.shape[0], dtype=torch.bool, device=x.device)
            o = dense_attention(cq, cross_k, cross_v, visible, self.scale).to(x.dtype)
        else:  # nothing verified yet: the cross-attention contributes nothing
            o = torch.zeros_like(cq)
        x = x + self.cross_attn.o_proj(o.reshape(T, self.q_size))
        return x + self.mlp(self.post_cross_attention_layernorm(x))


# ---- checkpoints -------------------------------------------------------------------------------------


def save_glide(layer: GlideDraftLayer, path: str | Path) -> Path:
    """Write our format: one safetensors file (`path`, or `path/glide.safetensors` for a directory)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.is_dir() or not path.suffix:
        path.mkdir(parents=True, exist_ok=True)
        path = path / "glide.safetensors"
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in layer.state_dict().items()}
    save_file(tensors, path, metadata={"format": GLIDE_FORMAT, "window": str(layer.window)})
    return path


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not path.exists():
        raise ConfigError(f"speculative_config.model: {str(path)!r} does not exist")
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
        if not files:
            raise ConfigError(f"speculative_config.model: {str(path)!r} holds no *.safetensors or pytorch_model*.bin")
    else:
        files = [path]
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}
    for f in files:
        if f.suffix == ".bin":
            tensors.update(torch.load(f, map_location="cpu", weights_only=True))
            continue
        with safe_open(str(f), framework="pt") as fh:
            meta.update(fh.metadata() or {})
            for k in fh.keys():
                tensors[k] = fh.get_tensor(k)
    return tensors, meta


def _strip_prefix(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The draft layer's tensors without a wrapper prefix: `draft_model.*` (a whole `Qwen2Glide` state
    dict, whose `model.*` / `lm_head.*` target tensors are dropped) or an all-`model.*` layer."""
    drafts = {k[len("draft_model.") :]: v for k, v in tensors.items() if k.startswith("draft_model.")}
    if drafts:
        return drafts
    if tensors and all(k.startswith("model.") for k in tensors):
        return {k[len("model.") :]: v for k, v in tensors.items()}
    return tensors


def _from_released(tensors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Released LongSpec keys -> our parameter names (see the module docstring's table)."""

    def get(name: str) -> torch.Tensor:
        if name not in tensors:
            raise CheckpointError(f"{where}: the LongSpec checkpoint is missing the tensor {name!r}")
        return tensors[name]

    def cat(names: list[str]) -> torch.Tensor:
        parts = [get(n) for n in names]
        if any(p.shape[1:] != parts[0].shape[1:] for p in parts):
            shapes = ", ".join(f"{n} {tuple(p.shape)}" for n, p in zip(names, parts, strict=True))
            raise ConfigError(f"speculative_config.model: {where} has inconsistent shapes: {shapes}")
        return torch.cat(parts)

    same = [
        "input_layernorm.weight", "self_attn.o_proj.weight", "post_self_attention_layernorm.weight",
        "cross_attn.q_proj.weight", "cross_attn.q_proj.bias", "cross_attn.o_proj.weight",
        "post_cross_attention_layernorm.weight", "mlp.down_proj.weight",
    ]
    out = {n: get(n) for n in same}
    qkv = ("q_proj", "k_proj", "v_proj")
    out["self_attn.qkv_proj.weight"] = cat([f"self_attn.{p}.weight" for p in qkv])
    out["self_attn.qkv_proj.bias"] = cat([f"self_attn.{p}.bias" for p in qkv])
    out["mlp.gate_up_proj.weight"] = cat(["mlp.gate_proj.weight", "mlp.up_proj.weight"])
    return out


def load_glide(layer: GlideDraftLayer, path: str | Path) -> dict[str, str]:
    """Load our format or a released LongSpec draft into `layer` (shapes checked against the target);
    returns the checkpoint's metadata (`format`: specray-glide | longspec, `window` when stored)."""
    path = Path(path)
    tensors, meta = _read_tensors(path)
    tensors = _strip_prefix(tensors)
    where = str(path)
    if "self_attn.qkv_proj.weight" in tensors:
        meta = {**meta, "format": GLIDE_FORMAT}
    elif "self_attn.q_proj.weight" in tensors:
        tensors = _from_released(tensors, where)
        meta = {**meta, "format": "longspec"}
    else:
        raise ConfigError(
            f"speculative_config.model: {where!r} is neither a specray GliDe checkpoint nor a LongSpec draft "
            f"(no self_attn.qkv_proj.weight / self_attn.q_proj.weight among {len(tensors)} tensors)"
        )
    a = layer.arch
    for name, param in layer.state_dict().items():
        if name not in tensors:
            raise CheckpointError(f"{where}: the GliDe checkpoint is missing the tensor {name!r}")
        t = tensors[name]
        if tuple(t.shape) != tuple(param.shape):
            raise ConfigError(
                f"speculative_config.model: tensor {name!r} in {where} has shape {tuple(t.shape)}, but the target "
                f"(hidden {a.hidden_size}, {a.num_heads} heads, {a.num_kv_heads} KV heads, head_dim {a.head_dim}, "
                f"intermediate {a.intermediate_size}) needs {tuple(param.shape)}"
            )
    with torch.no_grad():
        for name, param in layer.state_dict().items():
            param.copy_(tensors[name])
    return meta


def _read_window(path: str | Path) -> int | None:
    """The window stored in our format's metadata, without loading the tensors (None: not stored)."""
    from safetensors import safe_open

    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    for f in files:
        if f.suffix != ".safetensors" or not f.exists():
            continue
        with safe_open(str(f), framework="pt") as fh:
            w = (fh.metadata() or {}).get("window")
        if w is not None:
            return int(w)
    return None


# ---- the proposer ------------------------------------------------------------------------------------


@dataclass
class _RingState:
    k: torch.Tensor  # [W, Hkv, D] post-RoPE self-attention keys; position p in slot p % W
    v: torch.Tensor  # [W, Hkv, D]
    pos: torch.Tensor  # [W] int64 position held by each slot, -1 = empty
    covered: int = 0  # committed positions [0, covered) are accounted for (the last W of them held)
    root_pos: int = -1  # P of the latest propose: the root's position (= committed length then)


def max_expanded_nodes(tree: TreeConfig) -> int:
    """Nodes whose K/V a build computes (the nodes it expands, ancestors included): a scratch bound."""
    if tree.kind == "chain":
        return tree.length
    if tree.kind == "beam":
        return 1 + sum(tree.shape[:-1])
    return 1 + (tree.depth - 1) * tree.top_k


def _ancestors_or_self(tree: DraftTree, node: int) -> list[int]:
    out = []
    while node != -1:
        out.append(node)
        node = tree.parents[node]
    return out


class _Drafter:
    """Drafting one sequence's tree: the node -> scratch-slot map of this build and the target's
    verified last-layer K/V. `logits(tree, nodes)` is the `draft_tree` callback."""

    def __init__(self, prop: LongSpecProposer, st: _RingState, cross_k: torch.Tensor, cross_v: torch.Tensor):
        self.prop = prop
        self.st = st
        self.cross_k, self.cross_v = cross_k, cross_v  # [P, Hkv, D]
        self.slot_of: dict[int, int] = {}  # tree node -> scratch slot
        self.node_of: list[int] = []  # scratch slot -> tree node

    def _slots_for(self, nodes: list[int]) -> list[int]:
        p = self.prop
        for n in nodes:
            if n not in self.slot_of:
                self.slot_of[n] = len(self.node_of)
                self.node_of.append(n)
        p._ensure_scratch(len(self.node_of))
        return [self.slot_of[n] for n in nodes]

    def logits(self, tree: DraftTree, nodes: list[int]) -> torch.Tensor:  # [len(nodes), V] fp32
        p, st = self.prop, self.st
        dev = p.device
        W = p.window
        model = p.engine.model
        lineage = [_ancestors_or_self(tree, i) for i in nodes]
        # ancestors of the queried nodes that have no K/V in the scratch yet (normally none: builders expand
        # a node's parent before the node); their K/V depend only on token and position
        missing = sorted({a for line in lineage for a in line} - set(nodes) - set(self.slot_of))
        if missing:
            m_pos = torch.tensor([st.root_pos + tree.depths[i] for i in missing], device=dev)
            k, v = p.layer.kv(model.embed_tokens(torch.tensor([tree.tokens[i] for i in missing], device=dev)),
                              m_pos, model.rope)
            slots = torch.tensor(self._slots_for(missing), device=dev)
            p.scratch_k.index_copy_(0, slots, k)
            p.scratch_v.index_copy_(0, slots, v)
            p.scratch_pos.index_copy_(0, slots, m_pos)
        q_pos = torch.tensor([st.root_pos + tree.depths[i] for i in nodes], device=dev)  # [n]
        x = model.embed_tokens(torch.tensor([tree.tokens[i] for i in nodes], device=dev))  # [n, hidden]
        q, k, v = p.layer.qkv(x, q_pos, model.rope)
        slots = torch.tensor(self._slots_for(nodes), device=dev)
        p.scratch_k.index_copy_(0, slots, k)
        p.scratch_v.index_copy_(0, slots, v)
        p.scratch_pos.index_copy_(0, slots, q_pos)
        used = len(self.node_of)
        keys = torch.cat([st.k, p.scratch_k[:used]])  # [W + used, Hkv, D]
        values = torch.cat([st.v, p.scratch_v[:used]])
        key_pos = torch.cat([st.pos, p.scratch_pos[:used]])  # [W + used]
        lo = (q_pos - W)[:, None]  # [n, 1] the window's oldest visible position
        tree_vis = torch.zeros(len(nodes), W + used, dtype=torch.bool)
        tree_vis[:, :W] = True  # ring entries are all committed (< root_pos <= query position)
        for r, line in enumerate(lineage):  # scratch entries: the query's ancestors-or-self only
            tree_vis[r, [W + self.slot_of[a] for a in line]] = True
        mask = tree_vis.to(dev) & (key_pos[None, :] >= 0) & (key_pos[None, :] >= lo)  # [n, W + used]
        hidden = p.layer.attend(x, q, keys, values, mask, self.cross_k, self.cross_v, q_pos, model.rope)
        return model.compute_logits(hidden)  # [n, V]


class LongSpecProposer:
    """The `Proposer` for method `longspec`. `window` overrides the checkpoint's (ours stores one; else
    512). Per request: a `_RingState`, created at the first `propose`, dropped at `release`."""

    def __init__(self, engine: LLMEngine, cfg: SpeculativeConfig, window: int | None = None):
        self.engine = engine
        self.cfg = cfg
        self.device, self.dtype = engine.device, engine.dtype
        arch = engine.arch
        if window is None:
            window = (_read_window(cfg.model) if cfg.model else None) or DEFAULT_WINDOW
        self.window = window
        layer = GlideDraftLayer(arch, window)
        if cfg.model is None:
            layer.random_init(seed=engine.config.seed)
        else:
            load_glide(layer, cfg.model)
        self.layer = layer.to(device=self.device, dtype=self.dtype).eval()
        self.last_layer = arch.num_layers - 1
        self.states: dict[str, _RingState] = {}
        cap = max_expanded_nodes(cfg.tree)
        kv_shape = (cap, arch.num_kv_heads, arch.head_dim)
        self.scratch_k = torch.zeros(kv_shape, dtype=self.dtype, device=self.device)  # [S, Hkv, D]
        self.scratch_v = torch.zeros(kv_shape, dtype=self.dtype, device=self.device)
        self.scratch_pos = torch.zeros(cap, dtype=torch.int64, device=self.device)  # [S]
        self.peak_kv_bytes = self.kv_bytes()

    # ---- memory ----------------------------------------------------------------------------------
    def ring_bytes(self) -> int:
        """K + V bytes of one request's ring buffer: 2 x window x Hkv x D x element size."""
        a = self.engine.arch
        return 2 * self.window * a.num_kv_heads * a.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def kv_bytes(self) -> int:
        """The draft's own K/V bytes: live requests' rings + the step scratch; constant in the context."""
        rings = sum(s.k.nbytes + s.v.nbytes for s in self.states.values())
        return rings + self.scratch_k.nbytes + self.scratch_v.nbytes

    def _ensure_scratch(self, n: int) -> None:
        cap = self.scratch_k.shape[0]
        if n <= cap:
            return
        grow = n - cap
        self.scratch_k = torch.cat([self.scratch_k, self.scratch_k.new_zeros(grow, *self.scratch_k.shape[1:])])
        self.scratch_v = torch.cat([self.scratch_v, self.scratch_v.new_zeros(grow, *self.scratch_v.shape[1:])])
        self.scratch_pos = torch.cat([self.scratch_pos, self.scratch_pos.new_zeros(grow)])

    def _new_state(self) -> _RingState:
        a = self.engine.arch
        shape = (self.window, a.num_kv_heads, a.head_dim)
        return _RingState(
            k=torch.zeros(shape, dtype=self.dtype, device=self.device),
            v=torch.zeros(shape, dtype=self.dtype, device=self.device),
            pos=torch.full((self.window,), -1, dtype=torch.int64, device=self.device),
        )

    # ---- ring maintenance ------------------------------------------------------------------------
    def _push(self, items: list[tuple[_RingState, list[int], int]]) -> None:
        """Write the self-attention K/V of (state, tokens, first position) runs into their rings: one
        batched projection; only the newest `window` tokens of a run are kept."""
        W = self.window
        items = [(st, toks[-W:], start + max(0, len(toks) - W)) for st, toks, start in items if toks]
        if not items:
            return
        model = self.engine.model
        tokens = torch.tensor([t for _, toks, _ in items for t in toks], device=self.device)  # [T]
        positions = torch.tensor([start + i for _, toks, start in items for i in range(len(toks))],
                                 device=self.device)  # [T]
        k, v = self.layer.kv(model.embed_tokens(tokens), positions, model.rope)  # [T, Hkv, D]
        offset = 0
        for st, toks, _ in items:
            rows = slice(offset, offset + len(toks))
            offset += len(toks)
            slots = positions[rows] % W
            st.k.index_copy_(0, slots, k[rows].to(st.k.dtype))
            st.v.index_copy_(0, slots, v[rows].to(st.v.dtype))
            st.pos.index_copy_(0, slots, positions[rows])

    def _catch_up(self, seqs: list[Sequence]) -> list[_RingState]:
        """Bring each ring up to the committed length P = num_tokens - 1 (tokens committed by plain AR
        steps, or a new request's prompt): the newest <= window of them, one batched projection."""
        states, pending = [], []
        for seq in seqs:
            st = self.states.get(seq.request_id)
            P = seq.num_tokens - 1
            if st is None or st.covered > P:
                st = self.states[seq.request_id] = self._new_state()
            start = max(st.covered, P - self.window)
            if start < P:
                pending.append((st, seq.token_slice(start, P), start))
            st.covered = P
            st.root_pos = P
            states.append(st)
        self._push(pending)
        self.peak_kv_bytes = max(self.peak_kv_bytes, self.kv_bytes())
        return states

    def _drafter(self, seq: Sequence, st: _RingState) -> _Drafter:
        eng = self.engine
        n_keys = min(seq.num_computed, st.root_pos)  # verified tokens whose target K/V are in the cache
        pages = torch.tensor(seq.pages, dtype=torch.int64, device=eng.device)
        k, v = gather_kv(eng.cache, self.last_layer, pages, n_keys)  # [P, Hkv, D]
        return _Drafter(self, st, k, v)

    # ---- Proposer protocol -----------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, seqs: list[Sequence]) -> list[DraftTree]:
        states = self._catch_up(seqs)
        trees = []
        for seq, st in zip(seqs, states, strict=True):
            drafter = self._drafter(seq, st)
            root = seq.output_ids[-1] if seq.output_ids else seq.prompt_ids[-1]
            gen = seq.generator if seq.generator is not None else self.engine.sampler.generator
            trees.append(draft_tree(self.cfg.tree, root, drafter.logits, seq.params, gen))
        return trees

    @torch.inference_mode()
    def commit(
        self, seqs: list[Sequence], trees: list[DraftTree], results: list[AcceptResult],
        target_q: list[torch.Tensor] | None = None,
    ) -> None:
        """Push the root and the accepted tokens (positions P .. P+d) into the rings."""
        pending = []
        for seq, tree, res in zip(seqs, trees, results, strict=True):
            st = self.states.get(seq.request_id)
            if st is None or st.covered != st.root_pos:
                continue  # unknown or already advanced: the next propose catches up from the tokens
            pending.append((st, [tree.tokens[i] for i in res.path], st.root_pos))
            st.covered = st.root_pos + len(res.path)
        self._push(pending)

    def release(self, request_id: str) -> None:
        self.states.pop(request_id, None)
