"""SDAR (`SDARForCausalLM`, `SDARMoeForCausalLM`; JetAstra) written natively in torch; names match the
published checkpoints.

Block diffusion on the Qwen3 layout (SPEC section 8): q/k/v/o with per-head RMSNorm of queries and
keys, full rotary, grouped KV heads, SwiGLU (dense) or softmax-routed experts (the MoE checkpoints,
Qwen3-MoE's router: top-k of a float32 softmax, renormalised when `norm_topk_prob`), attention
block-causal in blocks of config.json's `block_size` (one checkpoint per block size: 4 .. 64). No
logit shift. The mask id (151669) is config.json's `mask_token_id`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from prophet.models.errors import ModelLoadError
from prophet.models.family import FamilyConfig, TransformersSizes, check_heads
from prophet.models.layers import DecoderLayer, DecoderLM, ProjAttention, SwiGLU
from prophet.models.moe import RouterSpec, SparseMoE


@dataclass
class SDARConfig(TransformersSizes, FamilyConfig):
    """SDAR's config.json fields (Qwen3 names); the defaults are SDAR-8B-Chat's (Qwen3-8B sizes)."""

    vocab_size: int = 151936                 # rows of embed_tokens and lm_head (logit width)
    hidden_size: int = 4096
    intermediate_size: int = 12288           # dense SwiGLU width
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False        # lm_head is the embedding (the small Qwen3 sizes tie it)
    block_size: int = 4                      # attention block (the vendor's key; b8 .. b64 checkpoints)
    num_experts: int | None = None           # MoE checkpoints (Qwen3-MoE keys); None = every layer dense
    num_experts_per_tok: int = 8
    moe_intermediate_size: int | None = None  # width of one routed expert
    norm_topk_prob: bool = True              # renormalise the chosen experts' weights
    decoder_sparse_step: int = 1             # layer i is MoE iff (i + 1) % step == 0 ...
    mlp_only_layers: list[int] = field(default_factory=list)  # ... and i is not listed here
    mask_token_id: int = 151669
    pad_token_id: int = 151643
    eos_token_id: int = 151643               # <|endoftext|>
    eot_token_id: int | None = 151645        # <|im_end|>, ends a chat turn
    bos_token_id: int | None = 151643
    initializer_range: float = 0.02          # normal init of fresh (untrained) weights

    family: ClassVar[str] = "sdar"
    model_type: ClassVar[str] = "sdar"
    architectures: ClassVar[tuple[str, ...]] = ("SDARForCausalLM",)
    default_host: ClassVar[str] = "block"
    shift_logits: ClassVar[bool] = False
    default_block_length: ClassVar[int] = 4
    required_values: ClassVar[dict] = {
        "hidden_act": ("silu",), "attention_bias": (False,), "rope_scaling": (None,),
        "use_sliding_window": (False,),
    }
    # configuration_sdar.py's SDARConfig defaults (Qwen2-style sizes): what an absent key means to the
    # vendor's code. block_size and mask_token_id are not among its arguments; absent, they are the
    # family's (4, 151669).
    reference_defaults: ClassVar[dict] = {
        "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
    }
    written_constants: ClassVar[dict] = {
        "hidden_act": "silu", "attention_bias": False, "rope_scaling": None, "use_sliding_window": False,
        "use_cache": False,
    }

    def __post_init__(self) -> None:
        check_heads(self.num_attention_heads * self.head_dim, self.num_attention_heads, self.num_key_value_heads)
        if self.block_size < 1:
            raise ModelLoadError(f"config.json: block_size must be positive (got {self.block_size})")
        if self.num_experts and not self.moe_intermediate_size:
            raise ModelLoadError("config.json: moe_intermediate_size is missing, and num_experts is set")
        if self.decoder_sparse_step < 1:
            raise ModelLoadError(f"config.json: decoder_sparse_step must be positive (got {self.decoder_sparse_step})")

    @property
    def attention_block(self) -> int:
        """Block of the block-causal attention: config.json's block_size."""
        return self.block_size

    def is_moe(self, index: int) -> bool:
        """Whether layer `index` has routed experts (Qwen3-MoE's rule)."""
        return bool(self.num_experts) and index not in self.mlp_only_layers \
            and (index + 1) % self.decoder_sparse_step == 0

    @property
    def router(self) -> RouterSpec:
        """Qwen3-MoE routing: float32 softmax over the experts, top-k, no groups, no bias, no scaling."""
        return RouterSpec(int(self.num_experts or 0), self.num_experts_per_tok, norm_topk_prob=self.norm_topk_prob,
                          score="softmax", expert_bias=False)


@dataclass
class SDARMoeConfig(SDARConfig):
    """SDAR-MoE's config.json (Qwen3-MoE names); the defaults are SDAR-30B-A3B's (Qwen3-30B-A3B sizes)."""

    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 48
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    num_experts: int | None = 128
    moe_intermediate_size: int | None = 768

    model_type: ClassVar[str] = "sdar_moe"
    architectures: ClassVar[tuple[str, ...]] = ("SDARMoeForCausalLM",)
    # Qwen3MoeConfig's defaults for the expert keys (the SDAR-MoE configuration class derives from it;
    # its norm_topk_prob default is False, the published checkpoints write true)
    reference_defaults: ClassVar[dict] = {
        **SDARConfig.reference_defaults, "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
        "norm_topk_prob": False, "decoder_sparse_step": 1,
    }


class SDARModel(DecoderLM):
    """SDAR: forward(input_ids, attention_mask) -> logits (B, L, vocab_size), block-causal, not shifted."""

    def layer(self, index: int) -> nn.Module:
        c = self.config
        attn = ProjAttention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                             qk_norm_eps=c.rms_norm_eps)
        mlp: nn.Module = (SparseMoE(c.hidden_size, int(c.moe_intermediate_size), c.router) if c.is_moe(index)
                          else SwiGLU(c.hidden_size, c.intermediate_size))
        return DecoderLayer(c.hidden_size, c.rms_norm_eps, attn, mlp)
