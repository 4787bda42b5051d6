"""Dream written natively in torch (Qwen2 layout); parameter names match the published checkpoints."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from prophet.models.errors import ModelLoadError
from prophet.models.family import FamilyConfig, TransformersSizes, check_heads
from prophet.models.layers import DecoderLayer, DecoderLM, ProjAttention, SwiGLU


@dataclass
class DreamConfig(TransformersSizes, FamilyConfig):
    """Dream's config.json fields (Qwen2 names); the defaults are Dream-v0-7B's."""

    hidden_size: int = 3584
    intermediate_size: int = 18944           # SwiGLU inner width
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    num_hidden_layers: int = 28
    vocab_size: int = 152064                 # rows of embed_tokens and lm_head (logit width)
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 131072    # the context (prompt + generation) Dream's reference code allows
    mask_token_id: int = 151666
    pad_token_id: int = 151643
    bos_token_id: int | None = 151643
    eos_token_id: int = 151643
    eot_token_id: int | None = 151645        # <|im_end|> of the Qwen2.5 tokenizer, ends an Instruct turn
    initializer_range: float = 0.02          # normal init of fresh (untrained) weights

    family: ClassVar[str] = "dream"
    model_type: ClassVar[str] = "Dream"
    architectures: ClassVar[tuple[str, ...]] = ("DreamModel",)
    default_host: ClassVar[str] = "dream"
    shift_logits: ClassVar[bool] = True
    required_values: ClassVar[dict] = {
        "tie_word_embeddings": (False,), "hidden_act": ("silu",), "rope_scaling": (None,),
        "use_sliding_window": (False,),
    }
    written_constants: ClassVar[dict] = {
        "hidden_act": "silu", "tie_word_embeddings": False, "rope_scaling": None,
        "use_sliding_window": False, "use_cache": False,
    }

    # DreamConfig.__init__'s own defaults (Dream-org's configuration_dream.py): what a config.json
    # without the key means to the reference code (no rope_theta = 10,000, not Dream-v0's 1e6).
    reference_defaults: ClassVar[dict] = {
        "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "mask_token_id": 151666, "pad_token_id": 151643,
    }

    def __post_init__(self) -> None:
        check_heads(self.hidden_size, self.num_attention_heads, self.num_key_value_heads)


class DreamModel(DecoderLM):
    """Dream: forward(input_ids, attention_mask) -> raw logits (B, L, vocab_size), bidirectional.

    Raw means unshifted: the logit at j-1 predicts the token at j. The adapter applies the shift.
    Qwen2 layers: biases on q, k and v only, no q/k norms.
    """

    def layer(self, index: int) -> nn.Module:
        c = self.config
        attn = ProjAttention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, self.head_dim,
                             qkv_bias=True)
        return DecoderLayer(c.hidden_size, c.rms_norm_eps, attn, SwiGLU(c.hidden_size, c.intermediate_size))


@dataclass
class FastDLLMConfig(DreamConfig):
    """Fast-dLLM v2's config.json (`Fast_dLLM_QwenForCausalLM`, Qwen2 names and Dream's module); the
    defaults are Fast_dLLM_v2_7B's (Qwen2.5-7B-Instruct sizes). Block-causal attention in blocks of
    `bd_size` (32), the logits shifted as Dream's; the mask id (151665, `|<MASK>|`) is a generation
    default, not in config.json; <|im_end|> (151645) ends the answer."""

    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False        # lm_head is the embedding (Fast_dLLM_v2_1.5B, Qwen2.5-1.5B's sizes)
    bd_size: int = 32                        # attention block (the vendor's key)
    mask_token_id: int = 151665
    eos_token_id: int = 151645               # <|im_end|>: the reference decoder's stop token
    eot_token_id: int | None = 151645

    model_type: ClassVar[str] = "Fast_dLLM_Qwen"
    architectures: ClassVar[tuple[str, ...]] = ("Fast_dLLM_QwenForCausalLM",)
    default_host: ClassVar[str] = "block"
    default_block_length: ClassVar[int] = 32
    required_values: ClassVar[dict] = {
        "hidden_act": ("silu",), "rope_scaling": (None,), "use_sliding_window": (False,),
    }
    written_constants: ClassVar[dict] = {
        "hidden_act": "silu", "rope_scaling": None, "use_sliding_window": False, "use_cache": False,
    }
    # Qwen2Config's defaults (the vendor's configuration class derives from it): what an absent key means.
    reference_defaults: ClassVar[dict] = {
        "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bd_size < 1:
            raise ModelLoadError(f"config.json: bd_size must be positive (got {self.bd_size})")

    @property
    def attention_block(self) -> int | None:
        """Block of the block-causal attention: config.json's bd_size."""
        return self.bd_size
