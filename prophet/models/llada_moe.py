"""LLaDA-MoE (`LLaDAMoEModelLM`, inclusionAI; model_type "llada" like dense LLaDA) written natively in
torch; names match the published checkpoints.

Bidirectional masked diffusion (the LLaDA host, with its prefix and dual caches) on an OLMoE-style
layout (SPEC section 8): q/k/v/o with per-head RMSNorm of queries and keys, full rotary, every layer a
mixture of experts routed by a float32 softmax, top-8 of 64, the chosen weights NOT renormalised (the
reference hard-codes norm_topk_prob off), no shared expert, no bias, no scaling. No logit shift.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from prophet.models.errors import ModelLoadError
from prophet.models.family import FamilyConfig, TransformersSizes, check_heads
from prophet.models.layers import DecoderLayer, DecoderLM, ProjAttention
from prophet.models.moe import RouterSpec, SparseMoE


@dataclass
class LLaDAMoEConfig(TransformersSizes, FamilyConfig):
    """LLaDA-MoE's config.json fields (the vendor's names); the defaults are LLaDA-MoE-7B-A1B's."""

    vocab_size: int = 157184                 # rows of embed_tokens and lm_head (logit width)
    hidden_size: int = 2048
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int | None = None              # None = hidden_size / num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 50000.0
    max_position_embeddings: int = 8192
    num_experts: int = 64
    num_experts_per_tok: int = 8
    expert_intermediate_size: int = 1024     # width of one routed expert
    moe_layer_freq: list[int] | None = None  # 1 = MoE layer; the published files list every layer as 1
    mask_token_id: int = 156895              # <|mask|>: a generation default, not in config.json
    pad_token_id: int = 156892
    eos_token_id: int = 156892               # <|endoftext|>, also the padding of a finished window
    eot_token_id: int | None = None
    bos_token_id: int | None = None
    initializer_range: float = 0.02          # normal init of fresh (untrained) weights

    family: ClassVar[str] = "llada_moe"
    model_type: ClassVar[str] = "llada"
    architectures: ClassVar[tuple[str, ...]] = ("LLaDAMoEModelLM",)
    default_host: ClassVar[str] = "llada"
    shift_logits: ClassVar[bool] = False
    required_values: ClassVar[dict] = {
        "hidden_act": ("silu",), "attention_bias": (False,), "qk_layernorm": (True,), "rope_scaling": (None,),
        "partial_rotary_factor": (1, 1.0), "tie_word_embeddings": (False,), "shared_expert_intermediate_size": (None,),
        "moe_router_enable_expert_bias": (False, None), "routed_scaling_factor": (1, 1.0, None),
        "router_num_group": (None,), "router_topk_group": (None,),
    }
    written_constants: ClassVar[dict] = {
        "hidden_act": "silu", "attention_bias": False, "qk_layernorm": True, "rope_scaling": None,
        "partial_rotary_factor": 1, "tie_word_embeddings": False, "shared_expert_intermediate_size": None,
        "moe_router_enable_expert_bias": False, "routed_scaling_factor": 1, "norm_topk_prob": False,
        "use_cache": False,
    }

    def __post_init__(self) -> None:
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        check_heads(self.num_attention_heads * self.head_dim, self.num_attention_heads, self.num_key_value_heads)
        if self.moe_layer_freq is not None and any(f != 1 for f in self.moe_layer_freq):
            raise ModelLoadError(f"config.json: moe_layer_freq {self.moe_layer_freq} has dense layers; the native "
                                 "llada_moe implementation has every layer a mixture of experts (the published "
                                 "checkpoints' [1, 1, ...])")

    @property
    def router(self) -> RouterSpec:
        """OLMoE routing: float32 softmax over the experts, top-k, weights not renormalised."""
        return RouterSpec(self.num_experts, self.num_experts_per_tok, norm_topk_prob=False, score="softmax",
                          expert_bias=False)


class LLaDAMoEModel(DecoderLM):
    """LLaDA-MoE: forward(input_ids, attention_mask) -> logits (B, L, vocab_size), bidirectional, not shifted."""

    def layer(self, index: int) -> nn.Module:
        c = self.config
        attn = ProjAttention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, int(c.head_dim),
                             qk_norm_eps=c.rms_norm_eps)
        return DecoderLayer(c.hidden_size, c.rms_norm_eps, attn,
                            SparseMoE(c.hidden_size, c.expert_intermediate_size, c.router))
