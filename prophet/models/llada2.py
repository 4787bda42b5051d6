"""LLaDA2.0 / 2.1 (`LLaDA2MoeModelLM`) written natively in torch; names match the published checkpoints.

Block diffusion: attention is block-causal over each row's own positions (SPEC section 8), so the
keys/values of finished blocks never change and a cache of them is exact. The layers: fused QKV by
whole heads, per-head RMSNorm on queries and keys before a partial rotary, grouped KV heads, dense
SwiGLU below `first_k_dense_replace`, sigmoid-routed experts plus shared experts above it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from prophet.models.errors import ModelLoadError
from prophet.models.family import FamilyConfig, TransformersSizes, check_heads
from prophet.models.layers import AttentionInputs, DecoderLM, KVCache, RMSNorm, SwiGLU, apply_rotary, attend
from prophet.models.moe import RouterSpec, SparseMoE

# config.json keys that mark a LLaDA2.2 checkpoint: its insert/delete edit tokens (SGLang's
# JointThresholdInDel reads them from the checkpoint). 2.2 also routes experts per block, which a
# 2.0/2.1 implementation would silently compute wrong.
LLADA22_KEYS = ("delete_token_id", "split_token_id")


@dataclass
class LLaDA2Config(TransformersSizes, FamilyConfig):
    """LLaDA2's config.json fields (the vendor's names); the defaults are LLaDA2.0/2.1-mini's."""

    vocab_size: int = 157184                 # rows of word_embeddings and lm_head (logit width)
    hidden_size: int = 2048
    intermediate_size: int | None = 5120     # dense SwiGLU width (layers below first_k_dense_replace)
    num_hidden_layers: int = 20
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int | None = 128               # None = hidden_size / num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 600000.0
    partial_rotary_factor: float = 0.5       # rotary on the first factor * head_dim dims only
    max_position_embeddings: int = 32768
    num_experts: int | None = 256            # None = every layer dense
    num_experts_per_tok: int = 8
    n_group: int = 8                         # expert groups for group-limited routing
    topk_group: int = 4                      # groups a token may route to
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    moe_intermediate_size: int | None = 512  # width of one routed expert
    moe_shared_expert_intermediate_size: int | None = None  # one shared expert's width; None = moe_intermediate_size
    num_shared_experts: int | None = 1
    first_k_dense_replace: int = 1           # layers 0 .. k-1 are dense
    mask_token_id: int = 156895              # <|mask|>: a generation default, not in the published config.json
    pad_token_id: int = 156892
    eos_token_id: int = 156892               # <|endoftext|>, also the padding of a finished window
    eot_token_id: int | None = None
    bos_token_id: int | None = None
    block_length: int | None = None          # attention block; None = the family's 32 (not a vendor key)
    initializer_range: float = 0.02          # normal init of fresh (untrained) weights

    family: ClassVar[str] = "llada2"
    model_type: ClassVar[str] = "llada2_moe"
    architectures: ClassVar[tuple[str, ...]] = ("LLaDA2MoeModelLM",)
    default_host: ClassVar[str] = "block"
    shift_logits: ClassVar[bool] = False
    default_block_length: ClassVar[int] = 32
    required_values: ClassVar[dict] = {
        "hidden_act": ("silu",), "use_qkv_bias": (False,), "use_bias": (False,), "use_qk_norm": (True,),
        "norm_head": (False,), "tie_word_embeddings": (False,), "rope_scaling": (None,),
        "score_function": ("sigmoid",), "use_sliding_window": (False,),
    }
    # configuration_llada2_moe.py's LLaDA2MoeConfig defaults, where they differ from mini's: what an
    # absent key means to the reference code. Its use_bias default (True: biased output and MLP
    # projections) is a feature this implementation does not have, so a config.json without
    # use_bias is refused. Its pad_token_id default (126081, LLaDA 1's) is not taken: ids are
    # the family's generation defaults.
    reference_defaults: ClassVar[dict] = {
        "vocab_size": 30592, "hidden_size": 1024, "intermediate_size": None, "num_hidden_layers": 24,
        "num_attention_heads": 16, "num_key_value_heads": 0, "head_dim": None, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 16384, "num_experts": 16, "num_experts_per_tok": 2,
        "num_shared_experts": 0, "moe_intermediate_size": None, "first_k_dense_replace": 0,
        "partial_rotary_factor": 0.5, "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5,
        "use_bias": True,
    }
    written_constants: ClassVar[dict] = {
        "hidden_act": "silu", "use_qkv_bias": False, "use_bias": False, "use_qk_norm": True, "norm_head": False,
        "tie_word_embeddings": False, "rope_scaling": None, "score_function": "sigmoid",
        "moe_router_enable_expert_bias": True, "router_dtype": "fp32", "use_cache": False,
    }

    @classmethod
    def from_dict(cls, raw: dict) -> "LLaDA2Config":
        """As FamilyConfig.from_dict, refusing a LLaDA2.2 checkpoint by name first."""
        marks = [k for k in LLADA22_KEYS if raw.get(k) is not None]
        if marks or "llada2.2" in str(raw.get("_name_or_path", "")).lower():
            raise ModelLoadError(f"config.json describes a LLaDA2.2 checkpoint ({', '.join(marks) or 'its name'}): "
                                 "its insert/delete edit tokens and block-level expert routing are not "
                                 "implemented; the native llada2 family runs LLaDA2.0 and LLaDA2.1")
        return super().from_dict(raw)

    def __post_init__(self) -> None:
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads < 1:
            raise ModelLoadError("config.json: num_key_value_heads must be at least 1 "
                                 f"(got {self.num_key_value_heads}); write the checkpoint's value")
        check_heads(self.num_attention_heads * self.head_dim, self.num_attention_heads, self.num_key_value_heads)
        if self.rotary_dim % 2 or self.rotary_dim == 0:
            raise ModelLoadError(f"config.json: partial_rotary_factor {self.partial_rotary_factor} of head_dim "
                                 f"{self.head_dim} gives an odd or empty rotary width {self.rotary_dim}")
        if self.dense_layers and not self.intermediate_size:
            raise ModelLoadError("config.json: intermediate_size is missing, and dense layers exist")
        if self.dense_layers < self.num_hidden_layers and not self.moe_intermediate_size:
            raise ModelLoadError("config.json: moe_intermediate_size is missing, and MoE layers exist")
        if self.block_length is not None and self.block_length < 1:
            raise ModelLoadError(f"config.json: block_length must be positive (got {self.block_length})")

    @property
    def attention_block(self) -> int:
        """Block of the block-causal attention: block_length, else the family's 32."""
        return self.block_length or self.default_block_length

    @property
    def rotary_dim(self) -> int:
        """Rotated dims of each head (the first ones)."""
        return int(int(self.head_dim) * self.partial_rotary_factor)  # type: ignore[arg-type]

    @property
    def dense_layers(self) -> int:
        """Layers 0 .. dense_layers-1 have a dense SwiGLU, the rest are MoE."""
        return self.num_hidden_layers if self.num_experts is None else min(self.first_k_dense_replace,
                                                                          self.num_hidden_layers)

    @property
    def router(self) -> RouterSpec:
        """The MoE layers' routing."""
        return RouterSpec(int(self.num_experts or 0), self.num_experts_per_tok, self.n_group, self.topk_group,
                          self.norm_topk_prob, self.routed_scaling_factor)

    @property
    def shared_width(self) -> int:
        """Width of the fused shared experts (0 = none)."""
        one = self.moe_shared_expert_intermediate_size or self.moe_intermediate_size or 0
        return one * (self.num_shared_experts or 0)


class LLaDA2Attention(nn.Module):
    """Fused QKV (rows Q | K | V by whole heads), per-head QK RMSNorm, partial rotary, output `dense`."""

    def __init__(self, c: LLaDA2Config) -> None:
        super().__init__()
        D = int(c.head_dim)  # type: ignore[arg-type]
        self.n_heads, self.n_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, D
        self.query_key_value = nn.Linear(c.hidden_size, (self.n_heads + 2 * self.n_kv_heads) * D, bias=False)
        self.query_layernorm = RMSNorm(D, c.rms_norm_eps)
        self.key_layernorm = RMSNorm(D, c.rms_norm_eps)
        self.dense = nn.Linear(self.n_heads * D, c.hidden_size, bias=False)
        self.kv_cache: KVCache | None = None  # set by LLaDA2Model.setup_cache

    @torch.no_grad()
    def prepare_tensor_parallel(self, rank: int, world: int) -> None:
        """Reorder the fused rows Q | K | V into one Q_r | K_r | V_r run per rank, so that AutoTP's
        plain split of a fused projection into `world` equal runs gives each rank whole heads of all
        three; this module then runs its rank's heads."""
        D, H, Hkv = self.head_dim, self.n_heads, self.n_kv_heads
        w = self.query_key_value.weight                                       # ((H + 2 Hkv) D, C)
        q, k, v = w.split([H * D, Hkv * D, Hkv * D])
        runs = [part.chunk(world) for part in (q, k, v)]                      # each: world x (n/world D, C)
        w.copy_(torch.cat([t for r in range(world) for t in (runs[0][r], runs[1][r], runs[2][r])]))
        self.n_heads, self.n_kv_heads = H // world, Hkv // world

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        B, L, _ = x.shape
        qkv = self.query_key_value(x).view(B, L, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=2)  # (B, L, H|Hkv, D)
        q = apply_rotary(self.query_layernorm(q).transpose(1, 2), inputs.cos, inputs.sin)  # (B, H, L, D)
        k = apply_rotary(self.key_layernorm(k).transpose(1, 2), inputs.cos, inputs.sin)    # (B, Hkv, L, D)
        return self.dense(attend(q, k, v.transpose(1, 2), inputs, self.kv_cache))         # (B, L, C)


class LLaDA2Layer(nn.Module):
    """Pre-norm block-causal attention, then a dense SwiGLU or the sparse MoE."""

    def __init__(self, c: LLaDA2Config, index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attention = LLaDA2Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp: nn.Module = (SwiGLU(c.hidden_size, int(c.intermediate_size)) if index < c.dense_layers
                               else SparseMoE(c.hidden_size, int(c.moe_intermediate_size), c.router, c.shared_width))

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        x = x + self.attention(self.input_layernorm(x), inputs)
        return x + self.mlp(self.post_attention_layernorm(x))


class LLaDA2Model(DecoderLM):
    """LLaDA2: forward(input_ids, attention_mask) -> logits (B, L, vocab_size), not shifted.

    The shared decoder skeleton under LLaDA2's names (model.word_embeddings, each layer's `attention`),
    an untied head and partial rotary. `block_length` (an attribute, the config's or the family's 32)
    sets the attention blocks; the loader may override it for a checkpoint trained with another.
    """

    embedding: ClassVar[str] = "word_embeddings"
    attention: ClassVar[str] = "attention"

    def layer(self, index: int) -> nn.Module:
        """Dense SwiGLU below first_k_dense_replace, the sparse MoE above."""
        return LLaDA2Layer(self.config, index)

    def tensor_parallel_policy(self) -> dict[type[nn.Module], tuple[str, ...]]:
        """The attention's `dense` and the dense MLP's down projection are summed over the ranks."""
        return {LLaDA2Attention: (".dense",), SwiGLU: (".down_proj",)}

    @property
    def rotary_dim(self) -> int:
        """The first partial_rotary_factor x head_dim dims are rotated, the rest passed through."""
        return self.config.rotary_dim
