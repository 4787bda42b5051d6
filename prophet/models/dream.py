"""Dream written natively in torch (Qwen2 layout); parameter names match the published checkpoints."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from prophet.models.family import FamilyConfig, TransformersSizes, check_heads
from prophet.models.layers import (AttentionInputs, CacheIndex, KVCache, KVCaches, RMSNorm, attention_inputs,
                                   head_inputs, init_weights, self_attention, swiglu)


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


class DreamAttention(nn.Module):
    """Qwen2 attention projections: biases on q, k and v only."""

    def __init__(self, c: DreamConfig) -> None:
        super().__init__()
        head_dim = c.hidden_size // c.num_attention_heads
        self.n_heads, self.n_kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * head_dim, bias=True)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv_heads * head_dim, bias=True)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv_heads * head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * head_dim, c.hidden_size, bias=False)
        self.kv_cache: KVCache | None = None  # set by DreamModel.setup_cache

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        return self_attention(x, self.q_proj, self.k_proj, self.v_proj, self.o_proj,
                              self.n_heads, self.n_kv_heads, inputs, self.kv_cache)


class DreamMLP(nn.Module):
    """SwiGLU with Qwen2's names."""

    def __init__(self, c: DreamConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.gate_proj, self.up_proj, self.down_proj)


class DreamLayer(nn.Module):
    """Pre-norm bidirectional attention + SwiGLU."""

    def __init__(self, c: DreamConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = DreamAttention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = DreamMLP(c)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), inputs)
        return x + self.mlp(self.post_attention_layernorm(x))


class DreamModel(KVCaches, nn.Module):
    """Dream: forward(input_ids, attention_mask) -> raw logits (B, L, vocab_size).

    Raw means unshifted: the logit at j-1 predicts the token at j. The adapter applies the shift.
    """

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.model.layers = nn.ModuleList(DreamLayer(c) for _ in range(c.num_hidden_layers))
        self.model.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        init_weights(self, c.initializer_range)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                logits_to_keep: int = 0, cache: CacheIndex | None = None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, L) int64, attention_mask (B, L) (True/1 = real, None = no padding) -> (B, L, V);
        logits_to_keep > 0: the LM head runs on the last that many positions only -> (B, keep, V);
        keep (B, K): on those query columns only -> (B, K, V). With `cache` the queries sit at
        cache.positions and attend to their slots' cached keys/values (see setup_cache)."""
        inputs = attention_inputs(input_ids, attention_mask, self.head_dim, self.config.rope_theta,
                                  cache, self.cache_length)
        x = self.model.embed_tokens(input_ids)                  # (B, L, C)
        for layer in self.model.layers:
            x = layer(x, inputs)
        return self.lm_head(self.model.norm(head_inputs(x, logits_to_keep, keep)))  # (B, L or K, V)

    @property
    def head_dim(self) -> int:
        return self.config.hidden_size // self.config.num_attention_heads

    block_length: int | None = None  # bidirectional attention

    @property
    def kv_heads(self) -> int:
        return self.config.num_key_value_heads

    def cache_holders(self) -> list[nn.Module]:
        """The attention modules that hold the keys/values."""
        return [layer.self_attn for layer in self.model.layers]
