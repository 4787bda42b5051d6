"""LLaDA written natively in torch; parameter names match the published checkpoints (SPEC section 4)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from prophet.models.family import FamilyConfig, check_heads
from prophet.models.layers import (AttentionInputs, CacheIndex, KVCache, KVCaches, RMSNorm, attention_inputs,
                                   head_inputs, init_weights, self_attention, swiglu)


@dataclass
class LLaDAConfig(FamilyConfig):
    """LLaDA's config.json fields; the defaults are LLaDA-8B's."""

    d_model: int = 4096                  # hidden width
    n_heads: int = 32                    # query heads
    n_kv_heads: int | None = None        # key/value heads; None = n_heads
    n_layers: int = 32
    mlp_hidden_size: int | None = 12288  # SwiGLU inner width; None = mlp_ratio * d_model
    mlp_ratio: int = 4
    vocab_size: int = 126464             # tokenizer vocabulary
    embedding_size: int | None = None    # rows of wte and the output head (logit width); None = vocab_size
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    max_sequence_length: int = 4096      # longest prompt + generation
    mask_token_id: int = 126336
    eos_token_id: int = 126081
    pad_token_id: int = 126081
    eot_token_id: int | None = 126348    # <|eot_id|>, ends an Instruct turn
    bos_token_id: int | None = 126080
    init_std: float = 0.02               # normal init of fresh (untrained) weights

    family: ClassVar[str] = "llada"
    model_type: ClassVar[str] = "llada"
    architectures: ClassVar[tuple[str, ...]] = ("LLaDAModelLM",)
    default_host: ClassVar[str] = "llada"
    shift_logits: ClassVar[bool] = False
    required_values: ClassVar[dict] = {
        "block_type": ("llama",), "weight_tying": (False,), "include_bias": (False,),
        "include_qkv_bias": (False,), "alibi": (False,), "rope": (True,), "scale_logits": (False,),
        "layer_norm_type": ("rms",), "activation_type": ("silu",), "attention_layer_norm": (False,),
        "multi_query_attention": (None, False), "clip_qkv": (None,), "input_emb_norm": (False,),
    }
    # configuration_llada.py's ModelConfig defaults (GPT-2's sizes): what an absent key means to
    # the reference code. Absent block_type / rope / layer_norm_type / activation_type / weight_tying
    # mean features this implementation does not have, so such a config.json is refused.
    reference_defaults: ClassVar[dict] = {
        "d_model": 768, "n_heads": 12, "n_kv_heads": None, "n_layers": 12, "mlp_ratio": 4,
        "mlp_hidden_size": None, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "max_sequence_length": 1024,
        "vocab_size": 50257, "embedding_size": 50304, "eos_token_id": 50256, "pad_token_id": 50256,
        "mask_token_id": 50256, "block_type": "sequential", "rope": False, "layer_norm_type": "default",
        "activation_type": "swiglu", "weight_tying": True,
    }
    written_constants: ClassVar[dict] = {
        "block_type": "llama", "weight_tying": False, "include_bias": False, "include_qkv_bias": False,
        "rope": True, "layer_norm_type": "rms", "activation_type": "silu", "use_cache": False,
    }

    def __post_init__(self) -> None:
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.mlp_hidden_size = self.mlp_hidden_size or self.mlp_ratio * self.d_model
        self.embedding_size = self.embedding_size or self.vocab_size
        check_heads(self.d_model, self.n_heads, self.n_kv_heads)

    @property
    def logit_width(self) -> int:
        """Width of the logits (embedding_size, which may exceed the tokenizer vocabulary)."""
        return int(self.embedding_size)  # type: ignore[arg-type]

    @property
    def max_length(self) -> int:
        """Longest sequence the model accepts."""
        return self.max_sequence_length

    @property
    def head_counts(self) -> tuple[int, int]:
        """(attention heads, KV heads): what a tensor-parallel size must divide."""
        return self.n_heads, int(self.n_kv_heads)  # type: ignore[arg-type]

    @property
    def head_width(self) -> int:
        """Dims per attention head: the grain tensor parallelism splits widths in."""
        return self.d_model // self.n_heads

    @property
    def tp_split_widths(self) -> dict[str, int]:  # type: ignore[override]
        """The MLP width: AutoTP cuts `ff_proj` by heads but `up_proj` (a name it knows) in head_width
        grains, which agree only where tensor_parallel x head_width divides it (LLaDA-8B's 12288 does
        for 2, 4 and 8)."""
        return {"mlp_hidden_size": int(self.mlp_hidden_size)}  # type: ignore[arg-type]


class LLaDABlock(nn.Module):
    """Pre-norm bidirectional attention + SwiGLU, OLMo's 'llama' block with LLaDA's names."""

    def __init__(self, c: LLaDAConfig) -> None:
        super().__init__()
        self.head_dim = head_dim = c.head_width
        n_kv_heads = c.head_counts[1]
        self.attn_norm = RMSNorm(c.d_model, c.rms_norm_eps)
        self.ff_norm = RMSNorm(c.d_model, c.rms_norm_eps)
        self.q_proj = nn.Linear(c.d_model, c.n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(c.d_model, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(c.d_model, n_kv_heads * head_dim, bias=False)
        self.attn_out = nn.Linear(c.n_heads * head_dim, c.d_model, bias=False)
        self.ff_proj = nn.Linear(c.d_model, c.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(c.d_model, c.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(c.mlp_hidden_size, c.d_model, bias=False)
        self.kv_cache: KVCache | None = None  # set by LLaDAModel.setup_cache

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        h = self.attn_norm(x)
        x = x + self_attention(h, self.q_proj, self.k_proj, self.v_proj, self.attn_out,
                               self.head_dim, inputs, self.kv_cache)
        return x + swiglu(self.ff_norm(x), self.ff_proj, self.up_proj, self.ff_out)


class LLaDAModel(KVCaches, nn.Module):
    """LLaDA: forward(input_ids, attention_mask) -> raw logits (B, L, embedding_size), not shifted."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        transformer = nn.ModuleDict({
            "wte": nn.Embedding(c.logit_width, c.d_model),
            "blocks": nn.ModuleList(LLaDABlock(c) for _ in range(c.n_layers)),
            "ln_f": RMSNorm(c.d_model, c.rms_norm_eps),
            "ff_out": nn.Linear(c.d_model, c.logit_width, bias=False),
        })
        self.model = nn.ModuleDict({"transformer": transformer})
        init_weights(self, c.init_std)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                logits_to_keep: int = 0, cache: CacheIndex | None = None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, L) int64, attention_mask (B, L) (True/1 = real, None = no padding) -> (B, L, V);
        logits_to_keep > 0: the LM head runs on the last that many positions only -> (B, keep, V);
        keep (B, K): on those query columns only -> (B, K, V). With `cache` the queries sit at
        cache.positions and attend to their slots' cached keys/values (see setup_cache)."""
        t = self.model["transformer"]
        inputs = attention_inputs(input_ids, attention_mask, self.head_dim, self.config.rope_theta,
                                  cache, self.cache_length)
        x = t["wte"](input_ids)                                 # (B, L, C)
        for block in t["blocks"]:
            x = block(x, inputs)
        return t["ff_out"](t["ln_f"](head_inputs(x, logits_to_keep, keep)))  # (B, L or K, V)

    @property
    def head_dim(self) -> int:
        return self.config.head_width

    block_length: int | None = None  # bidirectional attention

    @property
    def kv_heads(self) -> int:
        return self.config.head_counts[1]

    def cache_holders(self) -> list[nn.Module]:
        """The attention modules that hold the keys/values."""
        return list(self.model["transformer"]["blocks"])

    def tensor_parallel_policy(self) -> dict[type[nn.Module], tuple[str, ...]]:
        """The block's attention output and MLP down projection are summed over the ranks. Both it and
        the output head are named `ff_out`; the head sits outside the blocks and stays whole."""
        return {LLaDABlock: (".attn_out", ".ff_out")}
