"""Pieces shared by the native families: RMSNorm, rotary embeddings, attention (bidirectional or
block-causal), SwiGLU.

Everything runs in the dtype of the weights; only the normalisation statistics and the rotary
products are computed in float32 (as both families' own code does).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale and no bias."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The mean of squares loses precision (and can overflow in fp16), so take it in fp32.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


@dataclass
class AttentionInputs:
    """Per-forward tensors every layer shares: rotary tables, the key mask, and where keys go in the cache."""

    cos: torch.Tensor              # (B, 1, Q, D) float32
    sin: torch.Tensor              # (B, 1, Q, D) float32
    # (B, 1, 1, K) bool (bidirectional: pad keys only) or (B, 1, Q, K) (block-causal), True = attend;
    # None = attend to every key
    key_mask: torch.Tensor | None
    slots: torch.Tensor | None = None   # (B,) cache slot of each row; None = no cache
    write_at: torch.Tensor | None = None  # (B, Q) cache position of each query's key/value
    first_slot: int | None = None       # rows sit in slots first_slot .. first_slot + B - 1, in order


@dataclass
class CacheIndex:
    """Where a cached forward's queries sit: the positions are passed in, the keys/values live in the model.

    Row b's sequence occupies cache slot `slots[b]` at positions 0 .. lengths[b]-1 (its own position
    ids: no left padding inside the cache). The queries' keys/values are written at `positions`
    and then every query attends to its slot's first `lengths[b]` keys, fresh and cached alike.
    """

    slots: torch.Tensor      # (B,) int64
    positions: torch.Tensor  # (B, Q) int64 position of each query in its row; -1 = padding
    lengths: torch.Tensor    # (B,) int64 real positions of each row (prompt + window)
    # known on the host by the caller: slots == first_slot + arange(B), so attention reads the
    # cache in place (a view) instead of gathering every row's whole cache each layer
    first_slot: int | None = None


class KVCache(nn.Module):
    """One layer's keys and values for `slots` rows of up to `length` positions, stored after RoPE.

    Position `length` of every slot is scratch: padded queries write there and nobody reads it.
    """

    def __init__(self, slots: int, length: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        shape = (slots, length + 1, n_kv_heads, head_dim)  # (S, L + 1, Hkv, D)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots: torch.Tensor, write_at: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               first_slot: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, Hkv, Q, D) keys/values at their positions; return each row's slot (B, Hkv, L + 1, D):
        a view of the cache when the rows sit in consecutive slots from `first_slot`, else a gather."""
        rows = slots[:, None].expand_as(write_at)  # (B, Q)
        self.k.index_put_((rows, write_at), k.transpose(1, 2).to(self.k.dtype))
        self.v.index_put_((rows, write_at), v.transpose(1, 2).to(self.v.dtype))
        if first_slot is not None:
            end = first_slot + slots.shape[0]
            return self.k[first_slot:end].transpose(1, 2), self.v[first_slot:end].transpose(1, 2)
        return self.k[slots].transpose(1, 2), self.v[slots].transpose(1, 2)

    def move(self, src: list[int], dst: list[int]) -> None:
        """Copy the slots src into the slots dst (disjoint), keys and values."""
        if src:
            s, d = torch.tensor(src, device=self.k.device), torch.tensor(dst, device=self.k.device)
            self.k.index_copy_(0, d, self.k.index_select(0, s))
            self.v.index_copy_(0, d, self.v.index_select(0, s))


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) mask (True = real token) -> (B, L) int64 positions restarting at 0 on the first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def key_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) mask -> (B, 1, 1, L) bool that masks pad keys only.

    Query rows are never masked: a row whose every key is masked makes SDPA return NaN. A row with
    no real token at all attends to everything instead (its output is never used).
    """
    keep = attention_mask.bool()
    keep = keep | ~keep.any(-1, keepdim=True)
    return keep[:, None, None, :]


def rotary_tables(pos: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) positions -> cos, sin tables (B, 1, L, head_dim) in float32 (rotate-half layout)."""
    # Computed per call rather than kept as a buffer: a buffer would stay on the meta device
    # when weights are loaded with assign=True, and this costs head_dim/2 elements.
    exponent = torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta ** exponent)                      # (D/2,)
    freqs = pos.float()[..., None] * inv_freq                 # (B, L, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]          # (B, 1, L, D)
    return emb.cos(), emb.sin()


def block_causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, k_real: torch.Tensor,
                      block_length: int) -> torch.Tensor:
    """(B, Q) query positions, (B, K) key positions and (B, K) real keys -> (B, 1, Q, K) bool mask.

    A query at position q sees a real key at position k iff k // block_length <= q // block_length:
    its own block and every earlier one. A query that would see nothing (a padded query, position
    -1) sees every key instead, as key_padding_mask does, since SDPA returns NaN for an empty row.
    """
    seen = (k_pos[:, None, :] // block_length) <= (q_pos[:, :, None] // block_length)  # (B, Q, K)
    seen = seen & k_real[:, None, :]
    seen = seen | ~seen.any(-1, keepdim=True)
    return seen[:, None]


def two_copy_block_inputs(attention_mask: torch.Tensor, head_dim: int, theta: float,
                          block_length: int) -> AttentionInputs:
    """Attention inputs of the block-diffusion training pass (BD3-LM) over a (B, 2L) input: a noisy
    copy of each row, then its clean copy, both at the row's own positions.

    Noisy block b attends to noisy block b and to clean blocks before b; clean block b attends to
    clean blocks up to b (plain block-causal), so every noisy block is predicted in one pass from
    exactly what it sees when it is decoded. attention_mask (B, L) marks the real positions.
    """
    real = attention_mask.bool()
    pos = position_ids(attention_mask)                                  # (B, L)
    block = pos // block_length
    same = block[:, None, :] == block[:, :, None]                        # (B, Lq, Lk)
    before = block[:, None, :] < block[:, :, None]
    noisy_rows = torch.cat([same, before], dim=-1)                       # noisy queries: (B, L, 2L)
    clean_rows = torch.cat([torch.zeros_like(same), same | before], dim=-1)  # clean queries
    seen = torch.cat([noisy_rows, clean_rows], dim=1) & real.repeat(1, 2)[:, None, :]  # (B, 2L, 2L)
    seen = seen | ~seen.any(-1, keepdim=True)
    cos, sin = rotary_tables(pos.repeat(1, 2), head_dim, theta)          # (B, 1, 2L, D)
    return AttentionInputs(cos, sin, seen[:, None])


def attention_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, head_dim: int, theta: float,
                     cache: CacheIndex | None = None, cache_length: int = 0,
                     block_length: int | None = None) -> AttentionInputs:
    """Rotary tables and key mask for one forward.

    attention_mask None means no padding: no mask at all, so SDPA may pick its flash kernel on GPU.
    Finding that out from the mask would cost a host sync, so the caller, who knows, says so.
    With a cache, queries sit at `cache.positions` and keys are the slot's first `lengths` positions.
    `head_dim` is the rotated width (the whole head, or its rotary part). block_length: attention is
    block-causal over each row's own positions (see block_causal_mask); None = bidirectional.
    """
    if cache is not None:
        pos = cache.positions
        keys = torch.arange(cache_length + 1, device=pos.device)  # the slot's positions, scratch last
        real = keys[None, :] < cache.lengths[:, None]              # (B, L + 1)
        if block_length is None:
            key_mask = real[:, None, None, :]                      # (B, 1, 1, L + 1)
        else:
            key_mask = block_causal_mask(pos, keys.expand_as(real), real, block_length)  # (B, 1, Q, L + 1)
        write_at = torch.where(pos >= 0, pos, cache_length)
        cos, sin = rotary_tables(pos.clamp(min=0), head_dim, theta)
        return AttentionInputs(cos, sin, key_mask, cache.slots, write_at, cache.first_slot)
    if attention_mask is None:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        key_mask = None if block_length is None else block_causal_mask(
            pos, pos, torch.ones_like(pos, dtype=torch.bool), block_length)
        return AttentionInputs(*rotary_tables(pos, head_dim, theta), key_mask=key_mask)
    pos = position_ids(attention_mask)
    cos, sin = rotary_tables(pos, head_dim, theta)
    if block_length is None:
        return AttentionInputs(cos, sin, key_padding_mask(attention_mask))
    return AttentionInputs(cos, sin, block_causal_mask(pos, pos, attention_mask.bool(), block_length))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, L, D) queries or keys by the tables; product in float32, result in x's dtype.

    Tables narrower than D (partial rotary, LLaDA2) rotate the first R dims (rotate-half within
    them) and pass the other D - R through unchanged.
    """
    R = cos.shape[-1]
    if R < x.shape[-1]:
        return torch.cat([apply_rotary(x[..., :R], cos, sin), x[..., R:]], dim=-1)
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


def self_attention(x: torch.Tensor, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear,
                   o_proj: nn.Linear, head_dim: int, inputs: AttentionInputs,
                   cache: KVCache | None = None) -> torch.Tensor:
    """Multi-head attention with grouped KV heads: (B, L, C) -> (B, L, C); the mask is inputs'.

    The head counts are the projections' widths over head_dim, so a tensor-parallel shard of the
    projections runs its own heads. With a cache (and `inputs.slots` set) the queries' keys/values
    are written into it first, and the queries attend to their slot's cached keys/values.
    """
    B, L, _ = x.shape
    q = q_proj(x).view(B, L, -1, head_dim).transpose(1, 2)   # (B, H, L, D)
    k = k_proj(x).view(B, L, -1, head_dim).transpose(1, 2)   # (B, Hkv, L, D)
    v = v_proj(x).view(B, L, -1, head_dim).transpose(1, 2)   # (B, Hkv, L, D)
    q = apply_rotary(q, inputs.cos, inputs.sin)
    k = apply_rotary(k, inputs.cos, inputs.sin)
    return o_proj(attend(q, k, v, inputs, cache))             # (B, L, H*D) -> (B, L, C)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs,
           cache: KVCache | None = None) -> torch.Tensor:
    """Rotated (B, H, L, D) queries, (B, Hkv, L, D) keys/values -> (B, L, H*D) attention output.

    With `inputs.slots` set the keys/values are first written into `cache` and the queries attend
    to their slot's cached keys/values instead.
    """
    B, H, L, _ = q.shape
    if inputs.slots is not None:
        if cache is None:
            raise RuntimeError("a cached forward needs setup_cache() first")
        k, v = cache.update(inputs.slots, inputs.write_at, k, v, inputs.first_slot)  # (B, Hkv, L + 1, D)
    # The mask (pad keys, or block-causal) is the only restriction. With grouped heads, KV head j
    # serves query heads j*rep .. (j+1)*rep-1 (the Llama/Qwen2 grouping), which SDPA's enable_gqa
    # does without materialising the repeated keys and values.
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=inputs.key_mask,
                                       enable_gqa=k.shape[1] != H)  # (B, H, L, D)
    return y.transpose(1, 2).reshape(B, L, -1)                # (B, L, H*D)


class KVCaches:
    """setup_cache / drop_cache for a native model whose attention modules each hold a `kv_cache`,
    and the hooks a tensor-parallel engine shards it with (pipeline.parallel).

    The model names those modules (`cache_holders`), its KV heads (`kv_heads`) and `head_dim`.
    """

    cache_length: int = 0  # positions per slot of the allocated cache; 0 = none
    tp_size: int = 1       # ranks the attention heads are split over (set by prepare_tensor_parallel)

    def tensor_parallel_policy(self) -> dict[type[nn.Module], tuple[str, ...]]:
        """DeepSpeed AutoTP's injection policy: for each module class to shard, the paths below it of
        the linears whose outputs are summed over the ranks (row-parallel); its other linears are
        split by output (column-parallel), whole heads per rank. A direct child's path starts with
        '.' (AutoTP joins an empty parent name and the child's with a dot)."""
        raise NotImplementedError

    def prepare_tensor_parallel(self, rank: int, world: int) -> None:
        """Before AutoTP shards the model over `world` ranks: the KV cache will hold this rank's
        heads only, and modules that shard themselves (`prepare_tensor_parallel` of their own:
        mixture-of-experts layers, fused projections) do so."""
        self.tp_size = world
        for module in self.modules():  # type: ignore[attr-defined]
            if module is not self and hasattr(module, "prepare_tensor_parallel"):
                module.prepare_tensor_parallel(rank, world)

    def cache_holders(self) -> list[nn.Module]:
        """The modules (one per layer) whose `kv_cache` attribute the attention reads."""
        raise NotImplementedError

    def setup_cache(self, slots: int, length: int) -> None:
        """Allocate every layer's keys/values for `slots` rows of up to `length` positions."""
        self.cache_length = length
        like = next(self.parameters())  # type: ignore[attr-defined]
        for holder in self.cache_holders():
            holder.kv_cache = KVCache(slots, length, self.kv_heads // self.tp_size,  # type: ignore[attr-defined]
                                      self.head_dim, like.dtype, like.device)  # type: ignore[attr-defined]

    def drop_cache(self) -> None:
        """Free the keys/values."""
        self.cache_length = 0
        for holder in self.cache_holders():
            holder.kv_cache = None


def head_inputs(x: torch.Tensor, logits_to_keep: int, keep: torch.Tensor | None) -> torch.Tensor:
    """Hidden states the LM head runs on: the last `logits_to_keep` positions, or the (B, K) columns `keep`."""
    if keep is not None:
        return x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))  # (B, K, C)
    return x[:, -logits_to_keep:] if logits_to_keep else x


def swiglu(x: torch.Tensor, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> torch.Tensor:
    """down(silu(gate(x)) * up(x))."""
    return down(F.silu(gate(x)) * up(x))


def init_weights(module: nn.Module, std: float) -> None:
    """Normal(0, std) for linear and embedding weights, zero biases (RMSNorm scales stay 1)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


class ProjAttention(nn.Module):
    """Attention with separate q/k/v/o projections under the Llama/Qwen names: biases on q, k and v
    (Qwen2, Dream, Fast-dLLM v2) or none, and per-head RMSNorm of queries and keys before the rotary
    (`q_norm`/`k_norm`: Qwen3, SDAR, LLaDA-MoE) or none. The mask (bidirectional or block-causal) is
    the forward's; with a cache the keys/values go through `kv_cache` (see `attend`)."""

    def __init__(self, width: int, n_heads: int, n_kv_heads: int, head_dim: int, qkv_bias: bool = False,
                 qk_norm_eps: float | None = None) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(width, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(width, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(width, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, width, bias=False)
        self.q_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.kv_cache: KVCache | None = None  # set by KVCaches.setup_cache

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        B, L, _ = x.shape
        # head counts from the projections' widths: a tensor-parallel shard runs its own heads
        q = self.q_proj(x).view(B, L, -1, self.head_dim)     # (B, L, H, D)
        k = self.k_proj(x).view(B, L, -1, self.head_dim)     # (B, L, Hkv, D)
        v = self.v_proj(x).view(B, L, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)                      # type: ignore[misc]
        q = apply_rotary(q.transpose(1, 2), inputs.cos, inputs.sin)    # (B, H, L, D)
        k = apply_rotary(k.transpose(1, 2), inputs.cos, inputs.sin)    # (B, Hkv, L, D)
        return self.o_proj(attend(q, k, v.transpose(1, 2), inputs, self.kv_cache))  # (B, L, C)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) under the Llama/Qwen names, no biases: a dense MLP, one routed expert
    or the fused shared experts."""

    def __init__(self, width: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(width, inner, bias=False)
        self.up_proj = nn.Linear(width, inner, bias=False)
        self.down_proj = nn.Linear(inner, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.gate_proj, self.up_proj, self.down_proj)


class DecoderLayer(nn.Module):
    """Pre-norm: x + self_attn(input_layernorm(x)), then x + mlp(post_attention_layernorm(x))."""

    def __init__(self, width: int, eps: float, self_attn: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(width, eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(width, eps)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), inputs)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderLM(KVCaches, nn.Module):
    """The Llama/Qwen skeleton that Dream, Fast-dLLM v2, SDAR and LLaDA-MoE share: model.embed_tokens,
    model.layers (built by the family's `layer`), model.norm and lm_head (absent when the config ties it
    to the embedding). forward(input_ids, attention_mask) -> raw logits (B, L, vocab_size), never shifted
    (the adapter owns Dream's shift).

    The config names the sizes in transformers' keys (hidden_size, num_attention_heads, ...) and its
    `attention_block` (None = bidirectional, else block-causal attention in blocks of that many
    positions; the loader may override `block_length` for a checkpoint trained with another).
    A family whose checkpoint names the embedding or the attention otherwise (LLaDA2) says so in
    `embedding` and `attention`.
    """

    embedding: ClassVar[str] = "embed_tokens"  # model.<embedding>: the token embedding's name
    attention: ClassVar[str] = "self_attn"     # each layer's attention module, which holds its kv_cache

    def __init__(self, config) -> None:  # a FamilyConfig dataclass with transformers' keys
        super().__init__()
        self.config = c = config
        self.block_length: int | None = c.attention_block
        self.model = nn.Module()
        setattr(self.model, self.embedding, nn.Embedding(c.vocab_size, c.hidden_size))
        self.model.layers = nn.ModuleList(self.layer(i) for i in range(c.num_hidden_layers))
        self.model.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        tied = getattr(c, "tie_word_embeddings", False)
        self.lm_head = None if tied else nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        init_weights(self, c.initializer_range)

    def layer(self, index: int) -> nn.Module:
        """The family's decoder layer `index` (attention under `self_attn`, its MLP under `mlp`)."""
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                logits_to_keep: int = 0, cache: CacheIndex | None = None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, L) int64, attention_mask (B, L) (True/1 = real, None = no padding) -> (B, L, V);
        logits_to_keep > 0: the LM head runs on the last that many positions only -> (B, keep, V);
        keep (B, K): on those query columns only -> (B, K, V). With `cache` the queries sit at
        cache.positions and attend to their slots' cached keys/values (see setup_cache)."""
        inputs = attention_inputs(input_ids, attention_mask, self.rotary_dim, self.config.rope_theta,
                                  cache, self.cache_length, self.block_length)
        return self.head(self.hidden(input_ids, inputs), logits_to_keep, keep)

    def hidden(self, input_ids: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        """Last layer's hidden states (B, L, C) under prepared attention inputs (the training path
        builds its own, e.g. the two-copy block-diffusion mask)."""
        x = getattr(self.model, self.embedding)(input_ids)      # (B, L, C)
        for layer in self.model.layers:
            x = layer(x, inputs)
        return x

    def head(self, x: torch.Tensor, logits_to_keep: int = 0, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm and LM head on the kept positions: (B, L, C) -> (B, L or K, V)."""
        h = self.model.norm(head_inputs(x, logits_to_keep, keep))
        return F.linear(h, getattr(self.model, self.embedding).weight) if self.lm_head is None else self.lm_head(h)

    @property
    def head_dim(self) -> int:
        return self.config.head_width

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that rotary rotates (all of them; LLaDA2's partial rotary fewer)."""
        return self.head_dim

    @property
    def kv_heads(self) -> int:
        return self.config.head_counts[1]

    def cache_holders(self) -> list[nn.Module]:
        """The attention modules that hold the keys/values."""
        return [getattr(layer, self.attention) for layer in self.model.layers]

    def tensor_parallel_policy(self) -> dict[type[nn.Module], tuple[str, ...]]:
        """Attention output and dense MLP down projections are summed over the ranks; experts
        (moe.Expert, not SwiGLU) shard themselves, and AutoTP shards an untied lm_head on its own."""
        return {ProjAttention: (".o_proj",), SwiGLU: (".down_proj",)}
